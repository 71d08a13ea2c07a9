"""Every benchmark script runs to the end, and none can shadow a module it imports.

``python bench/X.py`` puts ``bench/`` first on ``sys.path``, so a bench module named like an
installed package or a standard-library module replaces it in that process for every importer
(``bench/kernels.py`` once hid the PyPI package ``kernels`` that transformers imports, and every
script that loaded a model failed). The smoke runs start each script as a user does, in a
subprocess, on a tiny llama saved as a local model directory with a character-level tokenizer
(real text encodes, so the benchmark's generated cases build), its profile and its artifact, at
the smallest sizes, and check a property of the table each prints.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvcompile.build.artifact import build_artifact
from kvcompile.models import load_model
from kvcompile.profile.record import load_profile, save_profile
from kvcompile.stats import wilson_interval
from tests.regressions import ARTIFACT
from tests.test_profile_io import build_profile
from tests.tiny import tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(path.stem for path in BENCH.glob("*.py"))
CONTEXT = 256  # tokens of every generated case and fitted plan (the smallest the layouts allow)
TIMEOUT = 300  # seconds per script; each takes seconds at these sizes


# ----------------------------------------------------------------------- no shadowing

_IMPORTABLE = """
import importlib.metadata, importlib.util, json, sys
names = json.loads(sys.argv[1])
top = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
top |= set(importlib.metadata.packages_distributions())
print(json.dumps([n for n in names if n in top or importlib.util.find_spec(n) is not None]))
"""


def importable(names: list[str]) -> list[str]:
    """Those of ``names`` that a plain ``import NAME`` finds in this environment without the
    checkout on ``sys.path`` (``-I``: no script directory, working directory or PYTHONPATH):
    the standard library, installed distributions' top-level modules, the installed packages."""
    done = subprocess.run([sys.executable, "-I", "-c", _IMPORTABLE, json.dumps(names)],
                          capture_output=True, text=True, cwd="/", timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_no_bench_script_shadows_an_importable_module() -> None:
    assert len(SCRIPTS) >= 8
    assert importable(SCRIPTS) == []


def test_the_shadowing_check_sees_the_stdlib_and_installed_packages() -> None:
    found = importable(["json", "yaml", "kvcompile", "transformers", "decode", "kernel_speed"])
    assert found == ["json", "yaml", "kvcompile", "transformers"]


# ------------------------------------------------------------------------- tiny model


def save_char_tokenizer(directory: Path) -> None:
    """One token per printable ASCII character (and newline), saved next to a model: any
    English text encodes, and decodes back to itself."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    vocab.update({chr(code): 4 + code - 32 for code in range(32, 127)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)


@dataclass(frozen=True)
class TinyBench:
    model: Path
    profile: Path
    artifact: Path
    work: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyBench:
    """A tiny llama as a local model directory, its profile and its artifact (ONNX included)."""
    root = tmp_path_factory.mktemp("bench")
    model = root / "model"
    tiny_hf_model("llama", seed=6, vocab_size=100, max_position_embeddings=2048).save_pretrained(model)
    save_char_tokenizer(model)
    loaded = load_model(str(model), reuse=False)
    text = "The pass key is 12345.\n"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text, add_special_tokens=False)) == text
    profile = build_profile(loaded)[0]
    save_profile(profile, root / "profile.yaml")
    build_artifact(loaded, profile, root / "artifact", max_context=2 * CONTEXT)
    return TinyBench(model, root / "profile.yaml", root / "artifact", root)


def run(script: str, *args: object) -> str:
    """``python bench/SCRIPT.py ARGS`` from the checkout's root, as documented; its stdout
    followed by its stderr (progress and notes). Fails on a non-zero exit."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT)
    assert done.returncode == 0, f"bench/{script}.py exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text``, each a list of rows ``{header: cell}`` (the gate's
    boxed tables, ``+---+`` rules, are not Markdown and are skipped)."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) > 1 and set("".join(block[1])) <= set("-: "):  # a Markdown table
            header, _, *rows = block
            found.append([dict(zip(header, row, strict=True)) for row in rows])
        block = []
    return found


def number(cell: str) -> float:
    return float(cell.rstrip("x%").replace("+", ""))


def accuracy(cell: str) -> tuple[float, float, float]:
    """``'50% [9, 91]'`` -> (50, 9, 91), checked to be an interval around its estimate."""
    match = re.fullmatch(r"(\d+)% \[(\d+), (\d+)\]", cell)
    assert match, cell
    value, low, high = map(float, match.groups())
    assert 0 <= low <= value <= high <= 100, cell
    return value, low, high


# ------------------------------------------------------------------------ smoke runs


def smoke_decode(tiny: TinyBench, request) -> None:
    out = run("decode", "--artifact", tiny.artifact, "--contexts", 64, "--steps", 2, "--rounds", 1,
              "--threads", 1, "--markdown", "--backend", "onnx")
    rows = {row["system"]: row for row in tables(out)[0]}
    assert set(rows) == {"transformers (DynamicCache)", "kvcompile, all heads full",
                         "kvcompile artifact", "onnxruntime artifact"}
    assert all(row["context"] == "64" and number(row["decode ms/token (median)"]) > 0
               for row in rows.values())
    # the memory ratio is kvcompile.memory's (bfloat16 values), not a ratio of the float32
    # allocations; by hand, at 64 + 2 timed + 1 warm-up tokens: each full layer's keys and
    # values plus its int64 length, over the keys and values
    from kvcompile.runtime import load
    from kvcompile.runtime.cache import StaticKVCache

    engine = load(tiny.artifact)
    arch, tokens = engine.arch, 64 + 2 + 1
    source = arch.n_layers * arch.n_kv_heads * tokens * 2 * arch.head_dim * 2
    assert rows["transformers (DynamicCache)"]["memory ratio"] == "1.000x"
    assert rows["kvcompile, all heads full"]["memory ratio"] == \
        f"{(source + 8 * arch.n_layers) / source:.3f}x"
    kept = StaticKVCache.allocate(engine.plan, 1, tokens, arch.head_dim, arch.group_size,
                                  dtype=torch.bfloat16).nbytes
    assert rows["kvcompile artifact"]["memory ratio"] == f"{kept / source:.3f}x"
    assert 0 < kept / source < 1
    # the graphs' buffers hold their build context (2 * CONTEXT) whatever the request
    graphs = 2 * CONTEXT
    kept = StaticKVCache.allocate(engine.plan, 1, graphs, arch.head_dim, arch.group_size,
                                  dtype=torch.bfloat16).nbytes
    source = arch.n_layers * arch.n_kv_heads * graphs * 2 * arch.head_dim * 2
    assert rows["onnxruntime artifact"]["memory ratio"] == f"{kept / source:.3f}x"
    # the uncompressed runtime computes what transformers does
    diff = re.search(r"transformers vs kvcompile full: max \|diff\| = (\S+)", out)
    assert diff and float(diff.group(1)) < 1e-4


def smoke_kernel_speed(tiny: TinyBench, request) -> None:
    interpret = importlib.util.find_spec("triton") is not None
    out = run("kernel_speed", "--device", "cpu", "--contexts", CONTEXT, "--runs", 2,
              "--quant-context", CONTEXT, "--artifact", tiny.artifact, "--e2e-contexts", CONTEXT, "--e2e-steps", 2,
              "--rounds", 1, "--threads", 1, "--markdown", *(["--interpret"] if interpret else []))
    kernels, e2e = tables(out)
    timed = {(row["kernel"], row["model shape"]) for row in kernels
             if row["context"] == str(CONTEXT) and row["implementation"] == "reference"
             and not row["kernel"].startswith(("quantized", "full-precision"))}
    assert timed == {(kernel, shape) for kernel in ("budgeted decode", "split-K decode", "cache update")
                     for shape in ("SmolLM2-135M", "Llama-3-8B")}
    assert all(float(row["max abs err"]) < 1e-4 and number(row["median µs"]) > 0 for row in kernels)
    quantized = {(row["kernel"], row["model shape"], row["implementation"]) for row in kernels
                 if row["kernel"].startswith("quantized")}
    assert {(kernel, "Llama-3-8B", "reference") for kernel in
            ("quantized decode k4v4", "quantized decode k8v8")} <= quantized
    assert ("quantized append k4v4", "SmolLM2-135M", "reference, flush") in quantized
    if interpret:  # the Triton kernels themselves, interpreted, against the reference: 4 budgeted
        # rows, 2 quantized decode + 1 full-precision baseline, 4 quantized append
        assert sum(row["implementation"].startswith("triton (interpreter)") for row in kernels) == 11
    systems = {row["system"]: row for row in e2e}
    assert set(systems) == {"transformers (DynamicCache)", "kvcompile, all heads full",
                            "kvcompile artifact"}
    assert 0 < number(systems["kvcompile artifact"]["memory ratio"]) < 1
    assert "not assessed (no GPU)" in out


def smoke_onnx_cache_copy(tiny: TinyBench, request) -> None:
    out = run("onnx_cache_copy", "--artifact", tiny.artifact, "--contexts", 64, 96, "--steps", 2,
              "--rounds", 1, "--threads", 1)
    rows = tables(out)[0]
    assert [(row["context"], row["mode"]) for row in rows] == [
        ("64", "in place"), ("64", "copying"), ("96", "in place"), ("96", "copying")]
    unit = {"KiB": 1024, "MiB": 1024 ** 2}
    written = [float(row["cache bytes written per step"].split()[0])
               * unit[row["cache bytes written per step"].split()[1]] for row in rows]
    # in place a step writes a few slots; copying rewrites every (static) buffer, at any context
    assert 0 < written[0] == written[2] < written[1] == written[3]


@pytest.fixture(scope="module")
def policy_runs(tiny: TinyBench) -> dict[int, tuple[str, Path]]:
    """bench/policies.py twice: seed 0 with the measured choice (its refits kept), seed 1 with
    the proxy fit."""
    runs = {}
    for seed, extra in ((0, ("--refits", tiny.work / "refits")), (1, ("--proxy",))):
        path = tiny.work / f"policies-{seed}.json"
        runs[seed] = (run("policies", "--model", tiny.model, "--profile", tiny.profile,
                          "--budgets", 0.5, "--at-context", CONTEXT, "--lengths", CONTEXT,
                          "--samples", 2, "--agreement-tokens", 4, "--seed", seed, "--threads", 1,
                          "--json", path, *extra), path)
    return runs


POLICY_SYSTEMS = ["uncompressed", "profiled", "profiled-fp", "uniform", "pyramid", "quantized"]


def best_full_precision(choice: dict) -> dict:
    """The recorded full-precision candidate (``uniform`` included) with the lowest score the
    choice's rule gives: each loss over the uncompressed model divided by uniform's, averaged,
    among those no worse than uniform on either loss; computed here from the record alone."""
    base = choice["uncompressed"]

    def losses(row: dict) -> tuple[float, float]:
        return (row["answer_nll"] - base["answer_nll"],
                row["text_nll"] - base["text_nll"] + row["text_kl"])

    rows = [row for row in choice["candidates"]
            if row["policy"] == "uniform" or (row["full_storage"], row["budget_storage"]) == ("full", "full")]
    uniform = losses(next(row for row in rows if row["policy"] == "uniform"))
    eligible = [row for row in rows if all(m <= u for m, u in zip(losses(row), uniform, strict=True))]

    def score(row: dict) -> float:
        return sum(m / u if u > 1e-9 else (0.0 if m <= 1e-9 else float("inf"))
                   for m, u in zip(losses(row), uniform, strict=True))

    return min(eligible, key=lambda row: (score(row), row["policy"] != "uniform"))


def smoke_policies(tiny: TinyBench, request) -> None:
    for out, _ in request.getfixturevalue("policy_runs").values():
        rows = tables(out)[-1]
        assert [row["policy"] for row in rows] == POLICY_SYSTEMS
        for row in rows[1:]:  # each plan holds the budget at the context it was fitted for
            assert row["KV budget"] == "0.5" and 0 < number(row[f"memory @ {CONTEXT}"]) <= 0.5005
            number(row[f"continuation@{CONTEXT} NLL Δ"])
        for row in rows:
            accuracy(row[f"passkey@{CONTEXT}"])
            accuracy(row[f"multikey@{CONTEXT}"])
        by_policy = {row["policy"]: row for row in rows}
        # full precision counts 16 bits per value plus the bias and counters; codes hold fewer
        for policy in ("profiled-fp", "uniform", "pyramid"):
            assert by_policy[policy]["storage"] == "full" and number(by_policy[policy]["bits/value"]) > 16
        assert by_policy["quantized"]["storage"] in ("k4v4g32", "k2v2g32")
        # 4 or 2 bits plus scales, zero points and the ring: less than half of full precision's
        assert number(by_policy["quantized"]["bits/value"]) < number(by_policy["uniform"]["bits/value"]) / 2
    out = request.getfixturevalue("policy_runs")[0][0]
    assert "0.5:profiled: chose" in out  # measured choice
    # profiled-fp: the full-precision candidate the same measured choice ranks best
    refit = load_profile(tiny.work / "refits" / "0.5-profiled.yaml")
    best = best_full_precision(refit.choice)
    row = {row["policy"]: row for row in tables(out)[-1]}["profiled-fp"]
    assert int(row["full heads"]) == best["full_heads"]
    if not refit.plan.quantized:  # the choice shipped full precision: that same plan
        assert best["name"] == refit.choice["chosen"]


def smoke_pool(tiny: TinyBench, request) -> None:
    runs = request.getfixturevalue("policy_runs")
    figure = tiny.work / "pooled.png"
    out = run("pool", *(path for _, path in runs.values()), "--plot", figure)
    assert out.startswith("seeds 0, 1;")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pooled = tables(out)[0]
    assert [row["policy"] for row in pooled] == POLICY_SYSTEMS
    single = [tables(text)[-1] for text, _ in runs.values()]
    for index, row in enumerate(pooled[1:], start=1):  # equal n per run: the mean of the runs
        kl = [float(table[index]["KL"]) for table in single]
        assert abs(float(row["KL"]) - sum(kl) / 2) <= 0.0011, (row, kl)
        for task in ("passkey", "multikey"):  # correct answers add up: 4 cases, one interval
            cell = f"{task}@{CONTEXT}"
            correct = sum(round(accuracy(table[index][cell])[0] * 2 / 100) for table in single)
            low, high = wilson_interval(correct, 4)
            assert row[cell] == f"{100 * correct / 4:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def smoke_variants(tiny: TinyBench, request) -> None:
    out = run("variants", "--model", tiny.model, "--profile", tiny.profile, "--budget", 0.4,
              "--at-context", CONTEXT, "--lengths", CONTEXT, "--samples", 2, "--threads", 1,
              "--variant", "base=", "--variant", "quarter=selected_fraction:0.25",
              "--variant", "late=layers:1-1@0.5")
    rows = {row["policy"]: row for row in tables(out)[-1]}
    assert list(rows) == ["uncompressed", "base", "quarter", "late"]
    memory = {name: number(rows[name][f"memory @ {CONTEXT}"]) for name in ("base", "quarter", "late")}
    # another share of selected slots keeps the memory; a layer from the 0.5 fit adds to it
    assert memory["base"] == memory["quarter"] < memory["late"]
    assert 0 < memory["base"] <= 0.4005


def smoke_oracle_selection(tiny: TinyBench, request) -> None:
    out = run("oracle_selection", "--model", tiny.model, "--profile", tiny.profile,
              "--budget", 0.5, "--at-context", CONTEXT, "--length", CONTEXT, "--samples", 2,
              "--threads", 1)
    rows = {row["selection"]: row for row in tables(out)[-1]}
    assert list(rows) == ["baseline", "shipped selection", "oracle selection"]
    for name, row in rows.items():
        for task in ("passkey", "multikey"):
            correct, n = map(int, row[task].split("/"))
            assert n == 2 and 0 <= correct <= n, (name, row)
    assert rows["baseline"]["continuation"] == "—"
    for name in ("shipped selection", "oracle selection"):  # an NLL change and a KL (never < 0)
        assert re.fullmatch(r"NLL [-+]\d+\.\d+%, KL \d+\.\d+", rows[name]["continuation"]), name


def smoke_gate_variants(tiny: TinyBench, request) -> None:
    rules = tiny.work / "memory-rules.yaml"
    threshold = 0.5
    rules.write_text(f"format: kvcompile-gates/1\nrules:\n  - max_memory_ratio: {threshold}\n")
    out = run("gate_variants", "--model", tiny.model, "--profile", tiny.profile,
              "--artifact", tiny.artifact, "--lengths", CONTEXT,
              "--samples", "passkey=2,continuation=2", "--agreement-tokens", 4,
              "--rules", rules, "--threads", 1)
    rows = {row["system"]: row for row in tables(out)[0]}
    assert list(rows)[:2] == ["uncompressed", ARTIFACT] and len(rows) == 6  # + 4 broken variants
    verdicts = dict(re.findall(r"^## (.+): (PASS|FAIL)$", out, flags=re.M))
    assert set(verdicts) == set(rows) - {"uncompressed"}
    for name, verdict in verdicts.items():  # the gate reads the memory the table shows
        assert (verdict == "PASS") == (number(rows[name]["KV memory"]) <= threshold), name


def smoke_serve(tiny: TinyBench, request) -> None:
    config = json.loads((tiny.model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # keys and values of every layer and KV head at the context, float32: one uncompressed slot
    per_slot = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * CONTEXT * 4
    max_tokens, slots = 4, 3
    out = run("serve", "--artifact", tiny.artifact, "--kv-memory", slots * per_slot + per_slot // 2,
              "--context", CONTEXT, "--prompt-tokens", 48, "--max-tokens", max_tokens,
              "--concurrency", 1, 2, 16, "--requests-per-client", 1, "--threads", 1,
              "--deadline", 240, "--markdown")
    rows = tables(out)[0]
    by_system: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_system.setdefault(row["system"], []).append(row)
    assert list(by_system) == ["kvcompile artifact", "kvcompile uncompressed",
                               "transformers StaticCache, one batch"]
    unc = by_system["kvcompile uncompressed"]
    # the uncompressed server holds what the memory divides into; 16 clients exceed it: skipped
    assert [(r["concurrent sequences"], r["clients"]) for r in unc] == [
        ("3", "1"), ("3", "2"), ("3", "3"), ("3", "16")]
    assert abs(number(unc[0]["KV MiB"]) - slots * per_slot / 2**20) < 0.005 * slots * per_slot / 2**20
    art = by_system["kvcompile artifact"]
    art_slots = int(art[0]["concurrent sequences"])
    assert art_slots >= slots  # the artifact's plan never needs more bytes than full heads
    for row in unc[:3] + [r for r in art if int(r["clients"]) <= art_slots]:
        clients = int(row["clients"])
        assert row["requests done"] == f"{clients}/{clients}", row
        assert 0 < int(row["generated tokens"]) <= clients * max_tokens, row
        assert number(row["tokens/s"]) > 0 and number(row["TTFT p50 ms"]) >= 0, row
        assert number(row["TTFT p95 ms"]) >= number(row["TTFT p50 ms"]), row
    assert unc[3]["note"].startswith("skipped") and unc[3]["requests done"] == "0/0"
    # transformers' own static cache of the same context: as many sequences as the server's
    hf = by_system["transformers StaticCache, one batch"]
    assert [(r["concurrent sequences"], r["clients"], r["requests done"]) for r in hf] == [
        ("3", "3", "3/3")]
    assert int(hf[0]["generated tokens"]) == 3 * max_tokens  # min_new_tokens: exactly that many
    assert hf[0]["KV MiB"] == unc[0]["KV MiB"]
    ratio = re.search(r"concurrent sequences (\S+)x \((\d+) vs (\d+)\)", out)
    assert ratio and (int(ratio.group(2)), int(ratio.group(3))) == (art_slots, slots)
    assert abs(float(ratio.group(1)) - art_slots / slots) < 0.006


def _bench_module(name: str):  # noqa: ANN202 - a module loaded from its file
    """``bench/NAME.py`` imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quantized_bytes(bits: int, n_layers: int, n_kv: int, head_dim: int, context: int) -> int:
    """By hand, every head of every layer full in ``bits``-bit codes (groups of 32): whole
    groups of tokens as codes with a float16 scale and zero per value group of 32 channels and
    per key channel and token group, the last ``min(32, context)`` tokens in bf16, a length."""
    body = context // 32 * 32
    codes = body * 2 * head_dim * bits // 8
    value_scales = body * (head_dim // 32) * 2 * 2
    key_scales = body // 32 * head_dim * 2 * 2
    residual = min(32, context) * 2 * head_dim * 2
    return n_layers * (n_kv * (codes + value_scales + key_scales + residual) + 8)


def test_quantization_alone_takes_4_bits_else_2_else_reports_the_budget_unmet() -> None:
    """bench/policies.py's "quantized" baseline: every head full in codes, the most bits whose
    bytes fit the budget, or a one-line report that none does."""
    from kvcompile.arch import arch_from_config
    from kvcompile.memory import plan_bytes
    from kvcompile.plan import Storage
    from tests.tiny import tiny_config

    policies = _bench_module("policies")
    arch = arch_from_config(tiny_config("llama", head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=4096))
    context = 1000  # not a whole number of groups: 31 groups as codes, 32 tokens in the ring
    whole = arch.n_layers * arch.n_kv_heads * context * 2 * arch.head_dim * 2
    four, two = (_quantized_bytes(b, arch.n_layers, arch.n_kv_heads, arch.head_dim, context) for b in (4, 2))
    assert two < four < whole / 2
    for budget, storage in ((four / whole, Storage(4, 4)), ((four - 1) / whole, Storage(2, 2)),
                            (two / whole, Storage(2, 2)), (0.5, Storage(4, 4))):
        plan, what = policies.quantization_alone(arch, budget, context)
        assert plan is not None, what
        assert all(layer.full_heads == tuple(range(arch.n_kv_heads)) and not layer.budgeted_heads
                   and layer.full_storage == storage for layer in plan.layers)
        assert plan_bytes(plan, arch, context) == (four if storage.key_bits == 4 else two)
        assert storage.name in what
    plan, what = policies.quantization_alone(arch, (two - 1) / whole, context)
    assert plan is None and "\n" not in what and what.startswith("cannot meet the budget")
    assert f"k4v4g32 takes {four} B, k2v2g32 takes {two} B" in what


SMOKE: dict[str, Callable[[TinyBench, pytest.FixtureRequest], None]] = {
    "decode": smoke_decode,
    "gate_variants": smoke_gate_variants,
    "kernel_speed": smoke_kernel_speed,
    "onnx_cache_copy": smoke_onnx_cache_copy,
    "oracle_selection": smoke_oracle_selection,
    "policies": smoke_policies,
    "pool": smoke_pool,
    "serve": smoke_serve,
    "variants": smoke_variants,
}


def test_every_bench_script_has_a_smoke_run() -> None:
    assert sorted(SMOKE) == SCRIPTS


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_script_runs_to_the_end_on_a_tiny_model(script: str, tiny: TinyBench,
                                                      request) -> None:
    SMOKE[script](tiny, request)
