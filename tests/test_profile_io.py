"""The profile file: round trip, byte-identical output, schema errors naming the bad path."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kvcompile.errors import ProfileError
from kvcompile.fit.choice import ChoiceConfig
from kvcompile.fit.greedy import fit
from kvcompile.fit.pipeline import (
    make_profile,
    measure_answer_loss,
    run_profile,
    stats_from_profile,
)
from kvcompile.memory import plan_bytes
from kvcompile.models import LoadedModel, load_model
from kvcompile.plan import Selection, Storage
from kvcompile.profile.calibration import CalibConfig, CalibPrompt
from kvcompile.profile.record import (
    PROFILE_FORMAT,
    Profile,
    load_profile,
    profile_to_dict,
    save_profile,
)
from kvcompile.profile.statistics import HeadStatistics, ProfileSettings, profile_heads
from kvcompile.settings import FitSettings
from tests.tiny import VOCAB, save_tokenizer, tiny_hf_model, tiny_loaded

SETTINGS = ProfileSettings(capacity_grid=(8, 16, 32), sinks=2, last_queries=8, repeat_queries=16)
REQUEST = FitSettings(kv_budget=0.3, at_context=128, min_window=4)
Edit = Callable[[Any], None]
STAT_FIELDS = ("induction", "echo", "needle", "sink_mass", "local_mass", "entropy", "error", "retrieval",
               "layer_loss")


def tiny_prompts() -> list[CalibPrompt]:
    gen = torch.Generator().manual_seed(0)
    text = tuple(torch.randint(0, VOCAB, (48,), generator=gen).tolist())
    block = tuple(torch.randperm(VOCAB - 1, generator=gen)[:12].add(1).tolist())
    return [
        CalibPrompt("text-0", "text", text),
        CalibPrompt("repeat-0", "repeat", (0, *block * 3), repeat_period=12, repeat_start=1),
        CalibPrompt("passkey-0", "passkey", text[:40], answer_positions=(37, 38), needle_spans=((10, 14),),
                    context_length=34),
    ]


def build_profile(loaded: LoadedModel) -> tuple[Profile, HeadStatistics]:
    """The profile stage on a tiny model, every step real (profile_heads, answer loss, fit, make_profile)."""
    model = loaded.build()
    stats = profile_heads(model, tiny_prompts(), SETTINGS)
    sensitivity = measure_answer_loss(model, tiny_prompts(), stats, REQUEST, SETTINGS)
    result = fit(stats, loaded.arch, REQUEST)
    calibration = {"seed": 0, "prompts": 3, "tokens": 48 + 37 + 40}
    profile = make_profile(loaded, stats, result, REQUEST, calibration, SETTINGS)
    profile.sensitivity = sensitivity
    return profile, stats


def saved_tiny_model(root: Path) -> tuple[Path, LoadedModel, Profile]:
    """A tiny qwen2 model saved as a local model directory (weights and tokenizer) under
    ``root``, loaded back from it as a user's model would be, and its profile: what an
    artifact build needs."""
    source = root / "model"
    tiny_hf_model("qwen2", seed=6).save_pretrained(source)
    save_tokenizer(source)
    loaded = load_model(str(source), reuse=False)
    return source, loaded, build_profile(loaded)[0]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded("qwen2", seed=6)


@pytest.fixture(scope="module")
def profile_and_stats(loaded: LoadedModel) -> tuple[Profile, HeadStatistics]:
    return build_profile(loaded)


@pytest.fixture
def saved(tmp_path: Path, profile_and_stats: tuple[Profile, HeadStatistics]) -> Path:
    path = tmp_path / "profile.yaml"
    save_profile(profile_and_stats[0], path)
    return path


# ------------------------------------------------------------------- round trip


def test_round_trip_equals(saved: Path, profile_and_stats: tuple[Profile, HeadStatistics]) -> None:
    profile = profile_and_stats[0]
    back = load_profile(saved)
    assert back.plan == profile.plan
    assert back.fingerprint == profile.fingerprint
    assert back.memory == profile.memory
    assert back.fit == profile.fit
    assert back.model == profile.model
    assert profile_to_dict(back) == profile_to_dict(profile)
    labels = {(h["layer"], h["head"]): h["label"] for h in back.heads}
    for i, layer in enumerate(profile.plan.layers):
        for head in layer.full_heads:
            assert labels[(i, head)] == "full"
        for head in layer.budgeted_heads:
            assert labels[(i, head)] == "budgeted"


def test_round_trip_statistics_and_refit(saved: Path, profile_and_stats: tuple[Profile, HeadStatistics],
                                         loaded: LoadedModel) -> None:
    profile, stats = profile_and_stats
    back = stats_from_profile(load_profile(saved))
    assert back.capacity_grid == stats.capacity_grid
    for name in STAT_FIELDS:  # values are written with 6 significant digits
        torch.testing.assert_close(getattr(back, name), getattr(stats, name), rtol=1e-5, atol=1e-7)
    assert back.layer_loss_full == stats.layer_loss_full and stats.layer_loss_full
    assert fit(back, loaded.arch, REQUEST).plan == profile.plan


def test_save_load_save_is_byte_identical(saved: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.yaml"
    save_profile(load_profile(saved), again)
    assert again.read_bytes() == saved.read_bytes()


def test_same_inputs_give_byte_identical_files(tmp_path: Path, saved: Path) -> None:
    """A fresh model object, a fresh profiling run, a fresh fit: the same bytes."""
    fresh, _ = build_profile(tiny_loaded("qwen2", seed=6))
    path = tmp_path / "fresh.yaml"
    save_profile(fresh, path)
    assert path.read_bytes() == saved.read_bytes()
    other, _ = build_profile(tiny_loaded("qwen2", seed=7))  # guard: different weights differ
    save_profile(other, tmp_path / "other.yaml")
    assert (tmp_path / "other.yaml").read_bytes() != saved.read_bytes()


def test_file_is_plain_safe_yaml(saved: Path, loaded: LoadedModel) -> None:
    data = yaml.safe_load(saved.read_text())
    assert data["format"] == PROFILE_FORMAT
    assert data["model"]["fingerprint"] == loaded.fingerprint
    arch = loaded.arch
    assert len(data["heads"]) == arch.n_layers * arch.n_kv_heads
    assert all(len(h["error"]) == len(SETTINGS.capacity_grid) for h in data["heads"])


# ------------------------------------------------------------------- schema errors


def edited(saved: Path, tmp_path: Path, edit: Edit) -> Path:
    data = yaml.safe_load(saved.read_text())
    edit(data)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _set(path: tuple[Any, ...], value: Any) -> Edit:
    def edit(data: Any) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit


def _delete(key: str) -> Edit:
    return lambda data: data.pop(key)


def _also_full(data: Any) -> None:
    layer = data["plan"]["layers"][0]
    layer["full"] = layer["full"] + layer["budgeted"][:1]


CASES = {
    "wrong-format": (_set(("format",), "kvcompile-profile/0"), "format"),
    "missing-plan": (_delete("plan"), "plan: missing"),
    "string-retrieval": (_set(("heads", 3, "retrieval"), "high"), "heads[3].retrieval"),
    "bool-entropy": (_set(("heads", 1, "entropy"), True), "heads[1].entropy"),
    "bad-label": (_set(("heads", 0, "label"), "maybe"), "heads[0].label"),
    "short-error": (_set(("heads", 2, "error"), [0.1, 0.05]), "heads[2].error"),
    "head-twice-budgeted": (_set(("plan", "layers", 1, "budgeted"), [0, 0]), "plan.layers[1]"),
    "head-full-and-budgeted": (_also_full, "plan.layers[0]"),
    "negative-head": (_set(("plan", "layers", 0, "full"), [-1]), "plan.layers[0].full[0]"),
    "layer-out-of-order": (_set(("plan", "layers", 1, "layer"), 0), "plan.layers[1].layer"),
    "window-zero": (_set(("plan", "layers", 0, "window"), 0), "plan.layers[0]"),
    "bad-selection": (_set(("plan", "selection"), "magic"), "plan"),
    "missing-fingerprint": (lambda d: d["model"].pop("fingerprint"), "model.fingerprint"),
    "grid-not-list": (_set(("profiling", "capacity_grid"), "16,32"), "profiling.capacity_grid"),
    "heads-count": (lambda d: d["heads"].pop(), "heads"),
    "answer-loss-rows": (lambda d: d["sensitivity"]["answer_loss"].pop(), "sensitivity.answer_loss"),
    "answer-loss-short": (_set(("sensitivity", "answer_loss", 0), [0.1]), "sensitivity.answer_loss[0]"),
    "answer-loss-negative": (_set(("sensitivity", "answer_loss", 1), [-1.0, 0.0, 0.0]), "sensitivity.answer_loss[1]"),
    "answer-reference-head": (_set(("sensitivity", "reference_full_heads"), [[99, 0]]),
                              "sensitivity.reference_full_heads[0]"),
    "answer-reference-capacity": (_set(("sensitivity", "reference_capacity"), 0), "sensitivity.reference_capacity"),
    "missing-at-context": (lambda d: d["fit"].pop("at_context"), "fit.at_context: missing"),
    "budget-out-of-range": (_set(("fit", "kv_budget"), 1.5), "fit.kv_budget"),
    "unknown-fit-setting": (_set(("fit", "settings", "magic"), 1), "fit.settings.magic"),
    "target-in-fit-settings": (_set(("fit", "settings", "kv_budget"), 0.5), "fit.settings.kv_budget"),
    "string-sinks": (_set(("fit", "settings", "sinks"), "four"), "fit.settings.sinks"),
    "bool-full-heads": (_set(("fit", "settings", "full_heads"), True), "fit.settings.full_heads"),
    "bad-fit-selection": (_set(("fit", "settings", "selection"), "magic"), "fit.settings.selection"),
    "observation-window-zero": (_set(("fit", "settings", "observation_window"), 0), "fit.settings.observation_window"),
    "values-above-keys": (_set(("fit", "settings", "budget_storage"), "k2v4"), "fit.settings.budget_storage"),
    "storage-not-a-name": (_set(("fit", "settings", "full_storage"), 8), "fit.settings.full_storage"),
    "unknown-baseline": (_set(("fit", "settings", "baseline_dtype"), "int8"), "fit.settings.baseline_dtype"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_schema_errors_name_the_path(case: str, saved: Path, tmp_path: Path) -> None:
    edit, where = CASES[case]
    path = edited(saved, tmp_path, edit)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}"), message
    assert "\n" not in message


@pytest.mark.parametrize("key, value", [("selected_fraction", 1.5), ("selected_fraction", "half"),
                                        ("magic", 1), ("policy", "best"), ("budget_storage", "k3v3")])
def test_tampered_chosen_settings_are_refused(key: str, value: Any, tmp_path: Path) -> None:
    """The settings that rebuild the shipped plan are checked like a fit request."""
    shipped = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.yaml"
    path = edited(shipped, tmp_path, _set(("choice", "chosen_settings", key), value))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: choice.chosen_settings"), str(info.value)


@pytest.mark.parametrize("key, value", [("budget_storage", "k2v4"), ("full_storage", "int4")])
def test_tampered_candidate_storage_is_refused(key: str, value: Any, tmp_path: Path) -> None:
    """A candidate's storages are checked as the fit checks them, by their path."""
    shipped = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.yaml"
    path = edited(shipped, tmp_path, lambda d: d["choice"]["candidates"][0].update({key: value}))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: choice.candidates[0].{key}"), str(info.value)


@pytest.mark.parametrize("value", [1.5, "half"])
def test_tampered_candidate_split_is_refused(value: Any, tmp_path: Path) -> None:
    """A candidate's selected share (the summary table prints it) is checked on reading."""
    shipped = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.yaml"
    path = edited(shipped, tmp_path, lambda d: d["choice"]["candidates"][0].update(selected_fraction=value))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: choice.candidates[0].selected_fraction"), str(info.value)


CUSTOM = FitSettings(kv_budget=0.3, at_context=128, full_heads=1, full_rank="needle", retrieval_threshold=0.4,
                     sinks=2, compensation=0, selected_fraction=0.25, min_window=4, min_budgeted_capacity=8,
                     equal_weight=0.2, answer_weight=0.7, selection=Selection("key_norm", 32),
                     budget_storage=Storage(4, 2, 16))


def test_fit_settings_round_trip_in_their_file_form(profile_and_stats: tuple[Profile, HeadStatistics],
                                                    tmp_path: Path) -> None:
    """Every setting comes back; the file keeps the keys it always had, each once."""
    path = tmp_path / "custom.yaml"
    save_profile(dataclasses.replace(profile_and_stats[0], settings=CUSTOM), path)
    assert load_profile(path).settings == CUSTOM
    fit_data = yaml.safe_load(path.read_text())["fit"]
    assert (fit_data["kv_budget"], fit_data["at_context"]) == (0.3, 128)
    assert fit_data["settings"] == {
        "policy": "profiled", "full_heads": 1, "full_rank": "needle", "retrieval_threshold": 0.4, "sinks": 2,
        "compensation": 0, "selected_fraction": 0.25, "min_window": 4, "min_budgeted_capacity": 8,
        "equal_weight": 0.2, "answer_weight": 0.7, "selection": "key_norm", "observation_window": 32,
        "baseline_dtype": "bfloat16", "full_storage": "full", "budget_storage": "k4v2g16"}
    assert not set(fit_data) & {"policy", "retrieval_threshold", "min_budgeted_capacity", "equal_weight",
                                "answer_weight"}  # once, in ``settings``


def test_profiles_before_fit_settings_keep_what_they_recorded(saved: Path, tmp_path: Path) -> None:
    """Without ``fit.settings``: the weights and policy beside the target, the plan's selection,
    the defaults for the rest. With it, ``settings`` wins over those older keys."""
    def older(data: Any) -> None:
        settings = data["fit"].pop("settings")
        assert settings["equal_weight"] == 0.5
        data["fit"].update(policy="uniform", retrieval_threshold=0.3, equal_weight=0.25)
        data["plan"]["observation_window"] = 32

    path = edited(saved, tmp_path, older)
    assert load_profile(path).settings == FitSettings(
        kv_budget=0.3, at_context=128, policy="uniform", retrieval_threshold=0.3, equal_weight=0.25,
        selection=Selection("attention", 32))
    both = edited(saved, tmp_path, lambda d: d["fit"].update(equal_weight=0.25, policy="uniform"))
    assert load_profile(both).settings == REQUEST


def test_refit_command_uses_the_recorded_settings(profile_and_stats: tuple[Profile, HeadStatistics], loaded: LoadedModel,
                                                  tmp_path: Path) -> None:
    """``kvcompile fit`` changes the budget and keeps every other recorded setting: the
    refitted layouts have the recorded sinks, compensation and selection."""
    from click.testing import CliRunner

    from kvcompile.cli import main

    path, out = tmp_path / "custom.yaml", tmp_path / "refit.yaml"
    save_profile(dataclasses.replace(profile_and_stats[0], settings=CUSTOM), path)
    result = CliRunner().invoke(main, ["fit", str(path), "--kv-budget", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    refit = load_profile(out)
    assert refit.settings == dataclasses.replace(CUSTOM, kv_budget=0.5)
    assert refit.plan.selection == Selection("key_norm", 32) and refit.plan.n_full == 1
    layouts = [layer.layout for layer in refit.plan.layers if layer.budgeted_heads]
    assert layouts and all((lay.sinks, lay.compensation) == (2, 0) for lay in layouts)
    assert all(layer.budget_storage == Storage(4, 2, 16) for layer in refit.plan.layers)
    budget = 0.5 * 2 * 4 * 128 * 2 * loaded.arch.head_dim * 2  # of the bf16 cache: 2 layers x 4 KV heads x 128 tokens
    assert refit.fit["budget_bytes"] == budget
    assert budget - 8 * 2 * loaded.arch.head_dim * 2 < plan_bytes(refit.plan, loaded.arch, 128) <= budget


def test_plan_layer_count_must_match_model(saved: Path, tmp_path: Path) -> None:
    path = edited(saved, tmp_path, lambda d: d["plan"]["layers"].pop())
    with pytest.raises(ProfileError, match=r"plan\.layers: has 1 layers, the model has 2"):
        load_profile(path)


def test_unedited_dump_loads(saved: Path, tmp_path: Path) -> None:
    """Guard for the cases above: the re-dumped, unedited file is valid."""
    path = edited(saved, tmp_path, lambda data: None)
    assert load_profile(path).plan == load_profile(saved).plan


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"format: [unclosed\n  - x: y", "not valid YAML"),
        (b"\xff\xfe\x00garbage\x80", "not valid YAML"),
        (b"- just\n- a list\n", "(top level)"),
        (b"", "(top level)"),
    ],
    ids=["syntax", "binary", "list", "empty"],
)
def test_non_profile_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "absent.yaml")


def test_directory_is_not_a_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError):
        load_profile(tmp_path)


def test_extra_top_level_keys_survive(saved: Path, tmp_path: Path) -> None:
    path = edited(saved, tmp_path, _set(("notes",), {"reviewed_by": "ci"}))
    back = load_profile(path)
    assert back.extra == {"notes": {"reviewed_by": "ci"}}
    out = tmp_path / "out.yaml"
    save_profile(dataclasses.replace(back), out)
    assert yaml.safe_load(out.read_text())["notes"] == {"reviewed_by": "ci"}


# ------------------------------------------------------------------- real SmolLM2 (slow)

# every prompt kind, kept short: the whole suite must stay fast on 2 shared CPU cores
SMALL_CALIB = CalibConfig(n_text=1, text_length=160, n_passkey=1, n_multikey=1, probe_length=160,
                          repeat_block=48, repeat_times=3)
SMOL_REQUEST = FitSettings(kv_budget=0.25, at_context=2048)


@pytest.fixture(scope="module")
def smol_run(smollm2: LoadedModel) -> tuple[Profile, list[tuple[int, int, str]]]:
    ticks: list[tuple[int, int, str]] = []
    # the proxy fit alone (no measured choice): this module checks its labels and budget
    profile = run_profile(smollm2, SMALL_CALIB, SMOL_REQUEST, choice=None,
                          progress=lambda done, total, prompt: ticks.append((done, total, prompt.kind)))
    return profile, ticks


@pytest.mark.slow
def test_smollm2_profile_labels_heads_and_meets_budget(
    smol_run: tuple[Profile, list[tuple[int, int, str]]], smollm2: LoadedModel
) -> None:
    profile, ticks = smol_run
    # one tick per prompt, then one per needle probe replayed for the answer loss
    assert [t[:2] for t in ticks] == [(i, 6) for i in range(1, 7)]
    assert sorted(t[2] for t in ticks) == ["multikey", "multikey", "passkey", "passkey", "repeat", "text"]
    assert profile.fingerprint == smollm2.fingerprint
    heads = profile.heads
    assert len(heads) == 30 * 3
    for head in heads:
        layer = profile.plan.layers[head["layer"]]
        expected = "full" if head["head"] in layer.full_heads else "budgeted"
        assert head["label"] == expected
    full = [h["retrieval"] for h in heads if h["label"] == "full"]
    budgeted = [h["retrieval"] for h in heads if h["label"] == "budgeted"]
    assert full and min(full) > max(budgeted)
    # SmolLM2 has induction heads: the repeated random block must reveal at least one
    assert max(h["induction"] for h in heads) > 0.5
    # the plan meets the budget in bf16 bytes at 2048 tokens, up to a few budgeted slots (a key, a
    # value and a float32 bias each): one per KV head of a layer, and the rounding of the fit's units
    budget = math.floor(0.25 * 90 * 2048 * 2 * 64 * 2)
    used = plan_bytes(profile.plan, smollm2.arch, 2048)
    assert profile.fit["budget_bytes"] == budget and profile.fit["used_bytes"] == used
    assert profile.fit["used_slots"] == profile.plan.kv_slots(2048)
    assert budget - 6 * (2 * 64 * 2 + 4) < used <= budget
    row = next(r for r in profile.memory if r["context"] == 2048)
    assert row["kv_bytes"] == used
    assert row["uncompressed_bytes"] == 30 * 3 * 2048 * 2 * 64 * 2
    # the answer-loss reference keeps full exactly what the local curves alone make full
    stats = stats_from_profile(profile)
    local_only = fit(stats, smollm2.arch, dataclasses.replace(SMOL_REQUEST, answer_weight=0.0)).plan
    reference = {tuple(lh) for lh in profile.sensitivity["reference_full_heads"]}
    assert reference == {(i, h) for i, layer in enumerate(local_only.layers) for h in layer.full_heads}
    assert profile.sensitivity["probes"] == 2 and stats.layer_loss.shape == (30, 8)
    assert float(stats.layer_loss.sum()) > 0


@pytest.mark.slow
def test_smollm2_profile_is_deterministic(
    smol_run: tuple[Profile, list[tuple[int, int, str]]], smollm2: LoadedModel, tmp_path: Path
) -> None:
    # the default path, measured choice (every storage) included, twice; its held-out prompts
    # at 512 tokens rather than the default 2048, for time (each candidate serves every one)
    config = ChoiceConfig(length=512)
    save_profile(run_profile(smollm2, SMALL_CALIB, SMOL_REQUEST, choice=config), tmp_path / "first.yaml")
    save_profile(run_profile(smollm2, SMALL_CALIB, SMOL_REQUEST, choice=config), tmp_path / "second.yaml")
    assert load_profile(tmp_path / "first.yaml").choice is not None
    assert (tmp_path / "first.yaml").read_bytes() == (tmp_path / "second.yaml").read_bytes()


def test_summary_names_the_layers_whose_answers_suffer_most(
        profile_and_stats: tuple[Profile, HeadStatistics]) -> None:
    from rich.console import Console

    from kvcompile.fit.summary import print_profile_summary

    profile = dataclasses.replace(profile_and_stats[0], sensitivity={
        "reference_capacity": 16, "probes": 3, "reference_full_heads": [],
        "answer_loss": [[0.5, 0.2, 0.0], [0.9, 0.3, 0.1]]})
    console = Console(record=True, width=200)
    print_profile_summary(console, profile)
    line = next(x for x in console.export_text().splitlines() if x.startswith("answer loss"))
    assert "cut to 16 slots (3 probes" in line and line.endswith("L1 0.300, L0 0.200")


def test_refit_command_sets_the_storages_and_the_baseline(profile_and_stats: tuple[Profile, HeadStatistics],
                                                          loaded: LoadedModel, tmp_path: Path) -> None:
    """``kvcompile fit --full-storage/--budget-storage/--baseline-dtype`` refit in those
    storages within the bytes of that baseline; a bad storage is one line, exit 2."""
    from click.testing import CliRunner

    from kvcompile.cli import main

    path, out = tmp_path / "profile.yaml", tmp_path / "refit.yaml"
    save_profile(profile_and_stats[0], path)
    args = ["fit", str(path), "--kv-budget", "0.5", "-o", str(out), "--full-storage", "k8v4",
            "--budget-storage", "k4v4g16", "--baseline-dtype", "float32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    refit = load_profile(out)
    assert (refit.settings.full_storage, refit.settings.budget_storage) == (Storage(8, 4), Storage(4, 4, 16))
    assert refit.settings.baseline_dtype == "float32"
    assert any(layer.quantized_selected for layer in refit.plan.layers)
    assert all(layer.full_storage == Storage(8, 4) for layer in refit.plan.layers if layer.full_heads)
    budget = 0.5 * 2 * 4 * 128 * 2 * loaded.arch.head_dim * 4  # float32 values this time
    assert plan_bytes(refit.plan, loaded.arch, 128, 4) <= budget == refit.fit["budget_bytes"]
    bad = CliRunner().invoke(main, ["fit", str(path), "--kv-budget", "0.5", "-o", str(out),
                                    "--budget-storage", "k2v4"])
    assert bad.exit_code == 2
    assert bad.output.count("\n") == 1 and "--budget-storage: keys need at least as many bits" in bad.output


def test_measured_choice_of_precision_round_trips_and_refits(profile_and_stats: tuple[Profile, HeadStatistics],
                                                             loaded: LoadedModel, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile whose measured choice shipped a quantized plan records each group's storage
    (plan, candidates, chosen settings); ``kvcompile fit`` without the model rebuilds that plan
    at the same budget and refits it, in the same storages, at another."""
    from click.testing import CliRunner

    from kvcompile.cli import main
    from kvcompile.fit import choice
    from tests.test_choice import random_prompts

    profile, stats = profile_and_stats
    monkeypatch.setattr(choice, "held_out_prompts", lambda tokenizer, config: random_prompts(1, 1, 120, 6, 0))
    config = choice.ChoiceConfig(storages=(("k8v8", "k8v8"),))
    result, record = choice.choose_plan(loaded.build(), None, stats, REQUEST, config)
    chosen = record["chosen_settings"]
    assert result.plan.quantized and chosen.full_storage == chosen.budget_storage == Storage(8, 8)
    path, same, other = tmp_path / "chosen.yaml", tmp_path / "same.yaml", tmp_path / "other.yaml"
    save_profile(dataclasses.replace(profile, plan=result.plan, choice=record), path)
    back = load_profile(path)
    assert back.plan == result.plan and back.choice["chosen_settings"] == chosen
    rows = {row["name"]: row for row in back.choice["candidates"]}
    assert rows[record["chosen"]]["budget_storage"] == "k8v8g32"
    for out, budget in ((same, REQUEST.kv_budget), (other, 0.5)):
        ran = CliRunner().invoke(main, ["fit", str(path), "--kv-budget", str(budget), "-o", str(out)])
        assert ran.exit_code == 0, ran.output
    assert load_profile(same).plan == result.plan
    refit = load_profile(other)
    assert (refit.settings.full_storage, refit.settings.budget_storage) == (Storage(8, 8), Storage(8, 8))
    assert any(layer.quantized_selected for layer in refit.plan.layers)
    assert plan_bytes(refit.plan, loaded.arch, 128) <= 0.5 * 2 * 4 * 128 * 2 * loaded.arch.head_dim * 2
