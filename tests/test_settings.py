"""The fit's settings: one class, one default per setting, one flat file form."""
from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kvcompile.errors import BudgetError
from kvcompile.plan import BudgetLayout, Plan, Selection, Storage
from kvcompile.profile.sensitivity import SensitivitySettings
from kvcompile.profile.statistics import ProfileSettings
from kvcompile.runtime.cache import LayerKV
from kvcompile.settings import TARGET, FitSettings, setting_kinds

SHIPPED = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.yaml"
CUSTOM = FitSettings(kv_budget=0.25, at_context=4096, policy="pyramid", full_heads=3, full_rank="needle",
                     retrieval_threshold=0.7, sinks=2, compensation=0, selected_fraction=0.25, min_window=8,
                     min_budgeted_capacity=64, equal_weight=0.1, answer_weight=0.9,
                     selection=Selection("key_norm", 64), baseline_dtype="float32",
                     full_storage=Storage(8, 4, 32), budget_storage=Storage(4, 2, 16))


def test_the_selection_defaults_are_the_plans() -> None:
    """The fit, the runtime's cache and the answer-loss measurement start from the plan's
    selection; the profiler's layout and reference capacity from the fit's and the profile's."""
    assert Plan(()).selection == Selection() == Selection("attention", 16)
    assert FitSettings().selection == Plan(()).selection
    for method in (LayerKV.prefill, LayerKV.store):
        assert inspect.signature(method).parameters["selection"].default == Plan(()).selection
    assert SensitivitySettings().fit == FitSettings()
    assert ProfileSettings().sinks == FitSettings().sinks
    assert SensitivitySettings().reference_capacity == ProfileSettings().answer_reference


def test_layout_is_the_split_of_the_settings() -> None:
    assert CUSTOM.layout(42) == BudgetLayout(2, 0, 10, 30)  # 40 free slots: a quarter selected
    assert FitSettings().layout(100) == BudgetLayout(4, 1, 48, 47)


def test_recorded_settings_are_the_shipped_profiles_keys() -> None:
    """New profiles record the keys the shipped profile has, in its order, and read them back;
    a profile made before the memory baseline and the storages (without those keys) reads as
    their defaults."""
    chosen = yaml.safe_load(SHIPPED.read_text())["choice"]["chosen_settings"]
    assert list(FitSettings().recorded()) == list(chosen)
    assert FitSettings().with_values(**chosen).recorded() == chosen
    older = {k: v for k, v in chosen.items()
             if k not in ("baseline_dtype", "full_storage", "budget_storage")}
    old = FitSettings().with_values(**older)
    assert (old.baseline_dtype, old.full_storage, old.budget_storage) == ("bfloat16", Storage(), Storage())
    target = {name: getattr(CUSTOM, name) for name in TARGET}
    assert FitSettings(**target).with_values(**CUSTOM.recorded()) == CUSTOM
    assert set(setting_kinds()) == {*TARGET, *CUSTOM.recorded()}


def test_with_values_takes_the_flat_names() -> None:
    assert FitSettings().with_values(selection="key_norm").selection == Selection("key_norm", 16)
    assert FitSettings().with_values(observation_window=256, sinks=0) == \
        FitSettings(sinks=0, selection=Selection(observation_window=256))
    with pytest.raises(BudgetError, match="--selection: selection must be one of"):
        FitSettings().with_values(selection="magic")
    with pytest.raises(BudgetError, match="unknown fit setting 'sink'"):
        FitSettings().with_values(sink=2)
    with pytest.raises(BudgetError, match="selection must be a Selection"):
        replace(FitSettings(), selection="key_norm")  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="--kv-budget"):
        FitSettings().with_values(kv_budget=0)


def test_storages_are_recorded_by_name_and_parsed_back() -> None:
    recorded = CUSTOM.recorded()
    assert (recorded["full_storage"], recorded["budget_storage"]) == ("k8v4g32", "k4v2g16")
    assert FitSettings().with_values(full_storage="k8v4", budget_storage="full") == \
        FitSettings(full_storage=Storage(8, 4, 32))
    with pytest.raises(BudgetError, match="--budget-storage: keys need at least as many bits"):
        FitSettings().with_values(budget_storage="k2v4")
    with pytest.raises(BudgetError, match="--full-storage: storage must be 'full' or like"):
        FitSettings().with_values(full_storage="int4")
    with pytest.raises(BudgetError, match="full_storage must be a Storage"):
        replace(FitSettings(), full_storage="k8v8")  # type: ignore[arg-type]
