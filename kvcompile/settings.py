"""The fit's settings: the one home of each setting and its default.

``kvcompile profile`` fits with them; the profile records them (``fit.settings``, and the
measured choice's winner as ``choice.chosen_settings``) and ``kvcompile fit`` rebuilds them
from there at another memory target. How budgeted heads select tokens is the plan's own
:class:`~kvcompile.plan.Selection`, held here, not copied.

A core module, so the profile record, the profile stage (the answer-loss measurement builds
the fit's layouts) and the fit all read the same class without importing each other. The
file form is flat, with the names of the command line: the selection's two settings are
the keys ``selection`` (its rule) and ``observation_window``; the head groups' storages are
written by name (``full``, ``k8v4g32``). Profiles made before the storages and the baseline
dtype were recorded read as full precision against bfloat16, the defaults.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from typing import Any

from kvcompile.errors import BudgetError
from kvcompile.memory import BASELINE_DTYPES
from kvcompile.plan import FULL_STORAGE, BudgetLayout, Selection, Storage
from kvcompile.plan_io import Reader

POLICIES = ("profiled", "uniform", "pyramid")
FULL_RANKS = ("retrieval", "needle")  # the head statistic that orders candidates for full heads
# the memory target: what a refit changes; the profile records it beside the settings
TARGET = ("kv_budget", "at_context")
SELECTION_KEYS = {"selection": "rule", "observation_window": "observation_window"}  # flat key: field
STORAGE_KEYS = ("full_storage", "budget_storage")  # recorded by name (``Storage.name``)
_KINDS: dict[str, Any] = {"float": (int, float), "int": int, "str": str, "int | None": (int, type(None)),
                          "Storage": str}


@dataclass(frozen=True)
class FitSettings:
    """Everything the fit is told: the memory target and how to spend it."""

    kv_budget: float = 0.125  # fraction of the uncompressed cache's bytes (``baseline_dtype``) at ``at_context``
    at_context: int = 8192
    policy: str = "profiled"
    full_heads: int | None = None  # override the fitted number of full heads
    full_rank: str = "retrieval"  # with full_heads: rank heads by the retrieval score or the needle mass alone
    retrieval_threshold: float = 0.5  # full when score >= threshold x best score
    sinks: int = 4
    compensation: int = 1
    # share of a budgeted head's free slots picked by score; 0.5 measured a lower NLL than 0.25 on
    # both benchmark genres at 1/8 with the same answers (docs/BENCHMARKS.md)
    selected_fraction: float = 0.5
    min_window: int = 16
    min_budgeted_capacity: int = 128  # full heads may not push budgeted heads below this on average
    equal_weight: float = 0.5  # budgeted capacities: (1 - w) x greedy on the error curves + w x equal split
    answer_weight: float = 0.5  # share of the end-to-end answer-loss curves in the greedy's objective
    selection: Selection = Selection()  # the profiled plan's; the baselines keep the default
    # what --kv-budget counts against: the source model's cache in this dtype (``kvcompile.memory``)
    baseline_dtype: str = "bfloat16"
    full_storage: Storage = FULL_STORAGE  # the full heads' body (``LayerPlan.full_storage``)
    budget_storage: Storage = FULL_STORAGE  # the budgeted heads' selected slots

    def __post_init__(self) -> None:
        if not 0 < self.kv_budget <= 1:
            raise BudgetError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.at_context < 1:
            raise BudgetError(f"--at-context must be positive, got {self.at_context}")
        if self.policy not in POLICIES:
            raise BudgetError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.full_rank not in FULL_RANKS:
            raise BudgetError(f"full-head ranking must be one of {', '.join(FULL_RANKS)}, got {self.full_rank!r}")
        if self.full_heads is not None and self.full_heads < 0:
            raise BudgetError(f"--full-heads must be >= 0, got {self.full_heads}")
        if not 0 <= self.selected_fraction < 1:
            raise BudgetError(f"selected fraction must be in [0, 1), got {self.selected_fraction}")
        if not 0 <= self.equal_weight <= 1:
            raise BudgetError(f"--equal-weight must be in [0, 1], got {self.equal_weight}")
        if not 0 <= self.answer_weight <= 1:
            raise BudgetError(f"--answer-weight must be in [0, 1], got {self.answer_weight}")
        if not isinstance(self.selection, Selection):
            raise BudgetError(f"selection must be a Selection, got {self.selection!r} "
                              f"(with_values(selection=...) takes the rule by name)")
        if self.baseline_dtype not in BASELINE_DTYPES:
            raise BudgetError(f"--baseline-dtype must be one of {', '.join(BASELINE_DTYPES)}, "
                              f"got {self.baseline_dtype!r}")
        for key in STORAGE_KEYS:
            if not isinstance(getattr(self, key), Storage):
                raise BudgetError(f"{key} must be a Storage, got {getattr(self, key)!r} "
                                  f"(with_values({key}=...) takes its name, e.g. 'k8v4g32')")

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one full-precision value in the baseline the budget counts against."""
        return BASELINE_DTYPES[self.baseline_dtype]

    def layout(self, capacity: int) -> BudgetLayout:
        """A budgeted head's layout of ``capacity`` slots under these settings."""
        return BudgetLayout.split(capacity, self.sinks, self.compensation, self.selected_fraction)

    def with_values(self, **values: Any) -> FitSettings:
        """These settings with some changed by their flat names (the file's and the command
        line's: ``selection`` is the rule, ``observation_window`` its window)."""
        selection = self.selection
        for key, attr in SELECTION_KEYS.items():
            if key in values:
                try:
                    selection = replace(selection, **{attr: values.pop(key)})
                except ValueError as err:
                    raise BudgetError(f"--{key.replace('_', '-')}: {err}") from None
        for key in STORAGE_KEYS:
            if isinstance(values.get(key), str):
                try:
                    values[key] = Storage.parse(values[key])
                except ValueError as err:
                    raise BudgetError(f"--{key.replace('_', '-')}: {err}") from None
        unknown = sorted(set(values) - {f.name for f in fields(self)})
        if unknown:
            raise BudgetError(f"unknown fit setting {unknown[0]!r}; one of {', '.join(setting_kinds())}")
        return replace(self, selection=selection, **values)

    def recorded(self) -> dict[str, Any]:
        """Every setting but the target, flat, as the profile records them."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "selection":
                out.update({key: getattr(self.selection, attr) for key, attr in SELECTION_KEYS.items()})
            elif f.name in STORAGE_KEYS:
                out[f.name] = getattr(self, f.name).name
            elif f.name not in TARGET:
                out[f.name] = getattr(self, f.name)
        return out


def setting_kinds() -> dict[str, Any]:
    """Flat name -> the types its value may have (for ``isinstance``), in field order."""
    selection_types = {f.name: f.type for f in fields(Selection)}
    kinds: dict[str, Any] = {}
    for f in fields(FitSettings):
        if f.name == "selection":
            kinds.update({key: _KINDS[selection_types[attr]] for key, attr in SELECTION_KEYS.items()})
        else:
            kinds[f.name] = _KINDS[str(f.type)]
    return kinds


def read_settings(reader: Reader, data: Any, path: str, base: FitSettings,
                  keys: Collection[str] | None = None) -> FitSettings:
    """``base`` with settings read from the mapping ``data`` by their flat names, each checked
    by type and by the fit's own checks; the first bad one fails at its path.

    ``keys`` None: ``data`` holds recorded settings alone (every setting but the target) and
    any other key is refused. Else only the names in ``keys`` are read, where present.
    """
    data = reader.mapping(data, path)
    kinds = setting_kinds()
    if keys is None:
        kinds = {key: kind for key, kind in kinds.items() if key not in TARGET}
        for key in data:
            if key not in kinds:
                raise reader.fail(f"{path}.{key}", f"not a recorded fit setting; expected one of {', '.join(kinds)}")
    settings = base
    for key in kinds if keys is None else keys:
        if key not in data:
            continue
        value = reader.get(data, key, path, kinds[key])
        if isinstance(value, bool):
            raise reader.fail(f"{path}.{key}", f"expected a number, got {value!r}")
        try:
            settings = settings.with_values(**{key: value})
        except BudgetError as err:
            raise reader.fail(f"{path}.{key}", str(err)) from None
    return settings
