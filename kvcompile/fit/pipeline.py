"""The ``profile`` stage as a function: model + calibration -> statistics -> fitted Profile."""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kvcompile.arch import arch_from_description
from kvcompile.errors import CalibrationError, ContextLengthError
from kvcompile.fit.choice import ChoiceConfig, choose_plan
from kvcompile.fit.greedy import FitResult, check_request, fit
from kvcompile.memory import memory_table
from kvcompile.models import LoadedModel
from kvcompile.plan import Plan
from kvcompile.profile.calibration import CalibConfig, CalibPrompt, build_calibration_set
from kvcompile.profile.record import Profile, check_profile_matches
from kvcompile.profile.sensitivity import SensitivitySettings, answer_probes, layer_sensitivity
from kvcompile.profile.statistics import HeadStatistics, ProfileSettings, profile_heads
from kvcompile.runtime.model import CompactLM
from kvcompile.runtime.placement import dtype_name
from kvcompile.settings import FitSettings
from kvcompile.yamlio import FlowList

VALIDATION_LENGTH = 2048  # held-out prompt for the plan's KL check (``validation``)


def head_records(stats: HeadStatistics, plan: Plan) -> list[dict[str, Any]]:
    records = []
    for layer, layer_plan in enumerate(plan.layers):
        for head in range(stats.retrieval.shape[1]):
            label = "sliding" if layer_plan.sliding else ("full" if head in layer_plan.full_heads else "budgeted")
            record: dict[str, Any] = {"layer": layer, "head": head, "label": label}
            for name in ("retrieval", "induction", "echo", "needle", "sink_mass", "local_mass", "entropy"):
                record[name] = float(getattr(stats, name)[layer, head])
            record["error"] = [float(e) for e in stats.error[layer, head]]
            records.append(record)
    return records


def stats_from_profile(profile: Profile) -> HeadStatistics:
    """Rebuild statistics from a saved profile, so refitting needs no model run."""
    arch = profile.model["architecture"]
    shape = (arch["layers"], arch["kv_heads"])

    def grid_of(name: str) -> torch.Tensor:
        values = torch.zeros(shape)
        for head in profile.heads:
            values[head["layer"], head["head"]] = float(head[name])
        return values

    error = torch.zeros((*shape, len(profile.profiling["capacity_grid"])))
    for head in profile.heads:
        error[head["layer"], head["head"]] = torch.tensor(head["error"], dtype=torch.float)
    layer_loss, layer_loss_full = None, frozenset()
    if profile.sensitivity is not None:
        layer_loss = torch.tensor(profile.sensitivity["answer_loss"], dtype=torch.float)
        layer_loss_full = frozenset((layer, head) for layer, head in profile.sensitivity["reference_full_heads"])
    return HeadStatistics(
        capacity_grid=tuple(profile.profiling["capacity_grid"]),
        induction=grid_of("induction"), echo=grid_of("echo"), needle=grid_of("needle"),
        sink_mass=grid_of("sink_mass"), local_mass=grid_of("local_mass"), entropy=grid_of("entropy"),
        error=error, layer_loss=layer_loss, layer_loss_full=layer_loss_full,
    )


def calibration_summary(prompts: Sequence[CalibPrompt], config: CalibConfig, user_files: Sequence[Path]) -> dict[str, Any]:
    files = []
    for path in user_files:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        files.append({"path": Path(path).name, "sha256": digest,
                      "prompts": sum(1 for p in prompts if p.kind == "user")})
    return {
        "seed": config.seed,
        "prompts": len(prompts),
        "tokens": sum(len(p.input_ids) for p in prompts),
        "kinds": dict(sorted(Counter(p.kind for p in prompts).items())),
        "settings": {k: v for k, v in asdict(config).items() if k != "seed"},
        "user_files": files,
    }


def fit_summary(result: FitResult) -> dict[str, Any]:
    """What the fit did, as the profile records it beside its settings (``Profile.fit``)."""
    return {
        "full_heads": result.plan.n_full,
        "full_heads_rule": result.full_rule,
        "budget_bytes": result.budget_bytes,
        "used_bytes": result.used_bytes,
        "budget_slots": result.budget_slots,
        "used_slots": result.used_slots,
        "notes": list(result.notes),
    }


def _ticker(progress: Callable[[int, int, Any], None] | None, total: int) -> Callable[[Any], None]:
    """A per-prompt callback that reports ``(done, total, prompt)`` to ``progress``."""
    done = 0

    def tick(prompt: Any) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, prompt)

    return tick


def request_from_profile(profile: Profile, kv_budget: float, at_context: int) -> FitSettings:
    """The profile's fit settings (the user's) at another memory target."""
    return replace(profile.settings, kv_budget=kv_budget, at_context=at_context)


def chosen_request(profile: Profile, kv_budget: float, at_context: int) -> FitSettings:
    """The settings of the plan the measured choice shipped, at another memory target: they
    rebuild that plan from the statistics (``request_from_profile`` is the user's request, whose
    proxy fit the choice may have passed over). Profiles without a recorded choice: the request."""
    settings = (profile.choice or {}).get("chosen_settings")
    if settings is None:
        return request_from_profile(profile, kv_budget, at_context)
    return replace(settings, kv_budget=kv_budget, at_context=at_context)


def run_profile(
    loaded: LoadedModel,
    calib: CalibConfig,
    request: FitSettings,
    user_files: Sequence[Path] = (),
    settings: ProfileSettings = ProfileSettings(),
    progress: Callable[[int, int, CalibPrompt], None] | None = None,
    validate: bool = True,
    choice: ChoiceConfig | None = ChoiceConfig(),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Profile:
    """Calibrate, fit and (``choice``) choose the plan by measurement; ``None`` keeps the proxy fit.

    The held-out prompts of the measured choice are as long as the calibration probes
    (``calib.probe_length``, at most the fit's reference context) and use the calibration seed.
    The model runs on ``device`` in ``dtype`` (statistics are accumulated in float64 on the
    host whatever the precision); the profile records the precision.
    """
    arch = loaded.arch
    check_request(arch, request)
    if max(calib.text_length, calib.probe_length, calib.repeat_block * calib.repeat_times) > arch.max_context:
        raise ContextLengthError(
            f"calibration prompts longer than the model's maximum context ({arch.max_context} tokens); "
            f"lower --calib-length"
        )
    prompts = build_calibration_set(loaded.tokenizer, calib, list(user_files))
    model = loaded.build().to(device=device, dtype=dtype)
    probes = answer_probes(prompts)
    measure_answers = request.policy == "profiled" and settings.answer_reference > 0 and bool(probes)
    if choice is not None and request.policy == "profiled":
        choice = replace(choice, seed=calib.seed, length=min(calib.probe_length, request.at_context))
    else:
        choice = None
    tick = _ticker(progress, len(prompts) + (len(probes) if measure_answers else 0)
                   + (choice.n_passkey + choice.n_multikey + choice.n_text if choice else 0))
    stats = profile_heads(model, prompts, settings, progress=tick)
    sensitivity = measure_answer_loss(model, prompts, stats, request, settings, tick) if measure_answers else None
    measured = None
    if choice is not None:
        try:
            result, measured = choose_plan(model, loaded.tokenizer, stats, request, choice, progress=tick)
        except ValueError as err:  # a probe that does not fit the held-out length
            raise CalibrationError(f"held-out prompts of the measured choice: {err}: raise --calib-length") from None
    else:
        result = fit(stats, arch, request)
    profile = make_profile(loaded, stats, result, request, calibration_summary(prompts, calib, user_files),
                           settings)
    profile.profiling["dtype"] = dtype_name(dtype)
    profile.sensitivity = sensitivity
    profile.choice = measured
    if validate:
        from kvcompile.fit.validation import validate_plan

        profile.fit["validation"] = validate_plan(
            model, result.plan, loaded.tokenizer, min(request.at_context, VALIDATION_LENGTH), calib.seed)
    return profile


def measure_answer_loss(
    model: CompactLM,
    prompts: Sequence[CalibPrompt],
    stats: HeadStatistics,
    request: FitSettings,
    settings: ProfileSettings,
    progress: Callable[[CalibPrompt], None] | None = None,
) -> dict[str, Any]:
    """Fill ``stats.layer_loss`` (``sensitivity``) and return the profile's record of it.

    The reference state keeps full the heads a fit on the local curves alone makes full,
    with the layouts the request builds; the curves then say which other layers must see
    further back for the answers to survive.
    """
    plan = fit(stats, model.arch, request).plan
    reference_full = sorted((layer, head) for layer, layer_plan in enumerate(plan.layers)
                            for head in layer_plan.full_heads)
    answer_settings = SensitivitySettings(reference_capacity=settings.answer_reference, fit=request)
    stats.layer_loss = layer_sensitivity(model, prompts, set(reference_full), settings.capacity_grid,
                                         answer_settings, progress=progress)
    stats.layer_loss_full = frozenset(reference_full)
    return {"reference_capacity": settings.answer_reference,
            "probes": len(answer_probes(prompts)),
            "reference_full_heads": [list(lh) for lh in reference_full],
            "answer_loss": stats.layer_loss.tolist()}


def make_profile(
    loaded: LoadedModel,
    stats: HeadStatistics,
    result: FitResult,
    request: FitSettings,
    calibration: dict[str, Any],
    settings: ProfileSettings,
) -> Profile:
    arch = loaded.arch
    return Profile(
        model={"source": loaded.source, "name": loaded.name, "fingerprint": loaded.fingerprint,
               "architecture": arch.describe()},
        calibration=calibration,
        profiling={"capacity_grid": FlowList(settings.capacity_grid), "sinks": settings.sinks,
                   "last_queries": settings.last_queries, "repeat_queries": settings.repeat_queries,
                   "local_window": settings.local_window, "score": "0.4 needle + 0.4 induction + 0.2 echo (each / max)"},
        heads=head_records(stats, result.plan),
        settings=request,
        fit=fit_summary(result),
        plan=result.plan,
        memory=memory_table(result.plan, arch, request.bytes_per_value, extra=(request.at_context,)),
    )


def refit_profile(profile: Profile, request: FitSettings, loaded: LoadedModel | None = None,
                  choice: ChoiceConfig = ChoiceConfig(),
                  progress: Callable[[int, int, Any], None] | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Profile:
    """``profile`` refitted at another budget from its stored statistics.

    Without a model this is the proxy fit alone (seconds; the profile says the choice was not
    measured). With the profile's model it re-runs the measured choice and the held-out
    validation at the new budget.
    """
    stats = stats_from_profile(profile)
    arch = arch_from_description(profile.model["architecture"]) if loaded is None else loaded.arch
    check_request(arch, request)
    measured = None
    validation = None
    if loaded is None or request.policy != "profiled":
        result = fit(stats, arch, request)
        if loaded is None:
            result.notes.append("refitted without the model: the proxy fit, not a measured choice "
                                "(pass --model to measure)")
    else:
        from kvcompile.fit.validation import validate_plan

        check_profile_matches(profile, loaded)
        model = loaded.build().to(device=device, dtype=dtype)
        seed = int(profile.calibration.get("seed", 0))
        length = int(profile.calibration.get("settings", {}).get("probe_length", choice.length))
        choice = replace(choice, seed=seed, length=min(length, request.at_context))
        tick = _ticker(progress, choice.n_passkey + choice.n_multikey + choice.n_text)
        result, measured = choose_plan(model, loaded.tokenizer, stats, request, choice, progress=tick)
        validation = validate_plan(model, result.plan, loaded.tokenizer, min(request.at_context, VALIDATION_LENGTH),
                                   seed)
    fit_record = fit_summary(result)
    if validation is not None:
        fit_record["validation"] = validation
    return Profile(
        model=profile.model, calibration=profile.calibration, profiling=profile.profiling,
        heads=head_records(stats, result.plan), settings=request, fit=fit_record, plan=result.plan,
        memory=memory_table(result.plan, arch, request.bytes_per_value, extra=(request.at_context,)),
        sensitivity=profile.sensitivity, choice=measured, extra=dict(profile.extra),
    )
