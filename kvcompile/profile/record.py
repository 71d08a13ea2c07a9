"""The profile file (``kvcompile-profile/1``): statistics, labels, fit settings, plan, memory table.

Loading validates the whole schema and names the first bad field by its path, so a
hand-edited or truncated profile fails with a message, not a KeyError three stages later.
The fit's settings are read into one :class:`~kvcompile.settings.FitSettings`, from
``fit.kv_budget``, ``fit.at_context`` and ``fit.settings``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kvcompile import __version__
from kvcompile.errors import ProfileError
from kvcompile.plan import Plan
from kvcompile.plan_io import Reader as _Reader
from kvcompile.plan_io import plan_from_dict, plan_to_dict
from kvcompile.settings import TARGET, FitSettings, read_settings
from kvcompile.yamlio import FlowDict, FlowList, atomic_write_text, dump_yaml, rounded

if TYPE_CHECKING:
    from kvcompile.models import LoadedModel

PROFILE_FORMAT = "kvcompile-profile/1"
HEAD_FIELDS = ("retrieval", "induction", "echo", "needle", "sink_mass", "local_mass", "entropy")
# profiles made before ``fit.settings`` recorded these beside the target (and the selection only in
# the plan); read where ``fit.settings`` lacks them, never written
LEGACY_FIT_KEYS = ("policy", "retrieval_threshold", "min_budgeted_capacity", "equal_weight", "answer_weight")


@dataclass
class Profile:
    model: dict[str, Any]  # source, name, fingerprint, architecture
    calibration: dict[str, Any]
    profiling: dict[str, Any]  # capacity grid and scoring settings
    heads: list[dict[str, Any]]  # one per (layer, kv head): statistics, error curve, label
    settings: FitSettings  # what the fit was told: the memory target and how to spend it
    fit: dict[str, Any]  # what it did: full heads and their rule, slots, notes, held-out validation
    plan: Plan
    memory: list[dict[str, Any]]
    kvcompile_version: str = __version__
    # end-to-end answer loss per layer (``sensitivity``): settings + one curve per layer
    sensitivity: dict[str, Any] | None = None
    # the measured choice among candidate plans (``kvcompile.fit.choice``): prompts, losses, winner,
    # and the winner's settings (``chosen_settings``, a FitSettings)
    choice: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.model["fingerprint"]


def check_profile_matches(profile: Profile, loaded: LoadedModel) -> None:
    """A profile applies only to the model whose weights it was made from."""
    if profile.fingerprint != loaded.fingerprint:
        raise ProfileError(
            f"the profile was made for model {profile.model.get('name', '?')} "
            f"({profile.fingerprint[:19]}…), not {loaded.name} ({loaded.fingerprint[:19]}…); "
            f"run `kvcompile profile {loaded.source}` first"
        )


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    heads = []
    for head in profile.heads:
        entry = FlowDict(layer=head["layer"], head=head["head"], label=head["label"])
        for name in HEAD_FIELDS:
            entry[name] = rounded(head[name])
        entry["error"] = FlowList(rounded(e) for e in head["error"])
        heads.append(entry)
    data = {
        "format": PROFILE_FORMAT,
        "kvcompile_version": profile.kvcompile_version,
        "model": profile.model,
        "calibration": profile.calibration,
        "profiling": {**profile.profiling, "capacity_grid": FlowList(profile.profiling["capacity_grid"])},
        "fit": {**{key: getattr(profile.settings, key) for key in TARGET},
                "settings": profile.settings.recorded(), **profile.fit},
        "plan": plan_to_dict(profile.plan),
        "memory": [FlowDict(row) for row in profile.memory],
        "heads": heads,
    }
    if profile.sensitivity is not None:
        sensitivity = dict(profile.sensitivity)
        sensitivity["reference_full_heads"] = [FlowList(lh) for lh in sensitivity["reference_full_heads"]]
        sensitivity["answer_loss"] = [FlowList(rounded(x) for x in row) for row in sensitivity["answer_loss"]]
        data["sensitivity"] = sensitivity
    if profile.choice is not None:
        choice = dict(profile.choice)
        choice["uncompressed"] = FlowDict(choice["uncompressed"])
        choice["candidates"] = [FlowDict(row) for row in choice["candidates"]]
        if "chosen_settings" in choice:
            choice["chosen_settings"] = choice["chosen_settings"].recorded()
        data["choice"] = choice
    data.update(profile.extra)
    return data


def save_profile(profile: Profile, path: Path) -> None:
    atomic_write_text(Path(path), dump_yaml(profile_to_dict(profile)))


# -- loading with path-named errors -------------------------------------------------------


def profile_from_dict(data: Any, source: str = "profile") -> Profile:
    reader = _Reader(source)
    data = reader.mapping(data, "(top level)")
    fmt = data.get("format")
    if fmt != PROFILE_FORMAT:
        raise reader.fail("format", f"expected {PROFILE_FORMAT!r}, got {fmt!r} (not a kvcompile profile, or a newer format)")
    model = reader.get(data, "model", "", dict)
    reader.get(model, "fingerprint", "model", str)
    arch = reader.get(model, "architecture", "model", dict)
    n_layers = reader.get(arch, "layers", "model.architecture", int)
    n_kv = reader.get(arch, "kv_heads", "model.architecture", int)
    calibration = reader.get(data, "calibration", "", dict)
    profiling = reader.get(data, "profiling", "", dict)
    grid = reader.int_list(profiling, "capacity_grid", "profiling")
    plan = plan_from_dict(reader.get(data, "plan", "", dict), reader)
    settings, fit = _fit_from_dict(reader, reader.get(data, "fit", "", dict), plan)
    if len(plan.layers) != n_layers:
        raise reader.fail("plan.layers", f"has {len(plan.layers)} layers, the model has {n_layers}")
    for i, layer in enumerate(plan.layers):
        if sorted(layer.full_heads + layer.budgeted_heads) != list(range(n_kv)):
            raise reader.fail(f"plan.layers[{i}]", f"full + budgeted must list each of the {n_kv} KV heads once")
    memory = reader.get(data, "memory", "", list)
    heads = reader.get(data, "heads", "", list)
    if len(heads) != n_layers * n_kv:
        raise reader.fail("heads", f"expected {n_layers * n_kv} entries, got {len(heads)}")
    for i, head in enumerate(heads):
        p = f"heads[{i}]"
        head = reader.mapping(head, p)
        reader.get(head, "layer", p, int)
        reader.get(head, "head", p, int)
        label = reader.get(head, "label", p, str)
        if label not in ("full", "budgeted", "sliding"):
            raise reader.fail(f"{p}.label", f"expected full, budgeted or sliding, got {label!r}")
        for name in HEAD_FIELDS:
            reader.get(head, name, p, (int, float))
        error = reader.get(head, "error", p, list)
        if len(error) != len(grid):
            raise reader.fail(f"{p}.error", f"expected {len(grid)} values (one per capacity), got {len(error)}")
    sensitivity = None
    if "sensitivity" in data:
        sensitivity = _sensitivity_from_dict(reader, data["sensitivity"], n_layers, n_kv, len(grid))
    choice = _choice_from_dict(reader, data["choice"], settings) if "choice" in data else None
    known = {"format", "kvcompile_version", "model", "calibration", "profiling", "fit", "plan", "memory", "heads",
             "sensitivity", "choice"}
    extra = {k: v for k, v in data.items() if k not in known}
    return Profile(model, calibration, profiling, heads, settings, fit, plan, memory,
                   kvcompile_version=str(data.get("kvcompile_version", "?")), sensitivity=sensitivity,
                   choice=choice, extra=extra)


def _fit_from_dict(reader: _Reader, data: dict[str, Any], plan: Plan) -> tuple[FitSettings, dict[str, Any]]:
    """The fit section: its settings (the target, then ``settings``), and the rest as recorded."""
    path = "fit"
    for key in TARGET:
        reader.get(data, key, path, object)  # required; read with checks below
    older = replace(FitSettings(), selection=plan.selection)  # the defaults of profiles before ``settings``
    settings = read_settings(reader, data, path, older, keys=(*TARGET, *LEGACY_FIT_KEYS))
    if "settings" in data:
        settings = read_settings(reader, data["settings"], f"{path}.settings", settings)
    rest = {key: value for key, value in data.items() if key not in (*TARGET, *LEGACY_FIT_KEYS, "settings")}
    return settings, rest


CHOICE_LOSSES = ("answer_nll", "text_nll", "text_kl")


def _choice_from_dict(reader: _Reader, data: Any, settings: FitSettings) -> dict[str, Any]:
    """The measured choice; its ``chosen_settings`` are read at the fit's target (the choice is
    measured there), with the defaults for any a profile does not record."""
    path = "choice"
    data = reader.mapping(data, path)
    if reader.get(data, "context_tokens", path, int) < 1:
        raise reader.fail(f"{path}.context_tokens", "must be positive")
    reader.get(data, "prompts", path, dict)
    reader.get(data, "rule", path, str)

    def losses(row: dict[str, Any], at: str) -> None:
        for name in CHOICE_LOSSES:
            value = reader.get(row, name, at, (int, float))
            if not value >= 0:
                raise reader.fail(f"{at}.{name}", f"expected a non-negative number, got {value!r}")

    losses(reader.mapping(reader.get(data, "uncompressed", path, dict), f"{path}.uncompressed"), f"{path}.uncompressed")
    rows = reader.get(data, "candidates", path, list)
    if not rows:
        raise reader.fail(f"{path}.candidates", "expected at least one candidate")
    names = []
    for i, row in enumerate(rows):
        at = f"{path}.candidates[{i}]"
        row = reader.mapping(row, at)
        names.append(reader.get(row, "name", at, str))
        reader.get(row, "policy", at, str)
        reader.get(row, "full_heads", at, int)
        reader.get(row, "equal_weight", at, (int, float))
        # profiled candidates of profiles that record the split and storages: checked as the fit checks them
        read_settings(reader, row, at, FitSettings(), keys=("selected_fraction", "full_storage", "budget_storage"))
        reader.get(row, "eligible", at, bool)
        reader.get(row, "score", at, (int, float))
        losses(row, at)
    chosen = reader.get(data, "chosen", path, str)
    data = dict(data)
    if "chosen_settings" in data:  # absent from profiles made before it was recorded
        target = replace(FitSettings(), **{key: getattr(settings, key) for key in TARGET})
        data["chosen_settings"] = read_settings(reader, data["chosen_settings"], f"{path}.chosen_settings", target)
    if chosen not in names:
        raise reader.fail(f"{path}.chosen", f"{chosen!r} is not one of the candidates")
    if not rows[names.index(chosen)]["eligible"]:
        raise reader.fail(f"{path}.chosen", f"{chosen!r} is not eligible (measured worse than uniform)")
    return data


def _sensitivity_from_dict(reader: _Reader, data: Any, n_layers: int, n_kv: int, n_grid: int) -> dict[str, Any]:
    path = "sensitivity"
    data = reader.mapping(data, path)
    reference = reader.get(data, "reference_capacity", path, int)
    if reference < 1:
        raise reader.fail(f"{path}.reference_capacity", f"must be positive, got {reference}")
    reader.get(data, "probes", path, int)
    for i, pair in enumerate(reader.get(data, "reference_full_heads", path, list)):
        if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, int) for x in pair)
                or not (0 <= pair[0] < n_layers and 0 <= pair[1] < n_kv)):
            raise reader.fail(f"{path}.reference_full_heads[{i}]", f"expected [layer, head] of this model, got {pair!r}")
    rows = reader.get(data, "answer_loss", path, list)
    if len(rows) != n_layers:
        raise reader.fail(f"{path}.answer_loss", f"expected {n_layers} rows (one per layer), got {len(rows)}")
    for i, row in enumerate(rows):
        p = f"{path}.answer_loss[{i}]"
        if not isinstance(row, list) or len(row) != n_grid:
            raise reader.fail(p, f"expected {n_grid} values (one per capacity)")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in row):
            raise reader.fail(p, "expected non-negative numbers")
    return data


def load_profile(path: Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist; create one with `kvcompile profile MODEL -o {path}`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProfileError(f"{path}: not valid YAML ({first})") from exc
    return profile_from_dict(data, source=str(path))
