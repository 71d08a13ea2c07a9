"""A tiny Gemma-3 (sliding and full layers) through the CLI: profile, inspect and eval agree
on the memory ratio, and that ratio is the runtime's state over transformers' own cache, both
with values in bfloat16 (``kvcompile.memory``)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvcompile.arch import arch_from_description
from kvcompile.build.artifact import load_engine
from kvcompile.cli import main
from kvcompile.fit.greedy import fit
from kvcompile.fit.pipeline import chosen_request, stats_from_profile
from kvcompile.profile.record import load_profile
from kvcompile.runtime.cache import StaticKVCache
from tests.tiny import save_tokenizer, tiny_hf_model

CONTEXT = 1024  # a row of every memory table (inspect shows 1024, 2048 and max_context)
WINDOW = 48


def invoke(*args: object):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("gemma")
    model_dir = work / "tiny-gemma3"
    hf = tiny_hf_model("gemma3_text", seed=4, sliding_window=WINDOW, max_position_embeddings=2048)
    hf.save_pretrained(model_dir)
    save_tokenizer(model_dir)
    profile = work / "profile.yaml"
    invoke("profile", model_dir, "-o", profile, "--kv-budget", 0.5, "--at-context", CONTEXT,
           "--calib-length", 160, "--calib-prompts", 1)
    artifact = work / "artifact"
    invoke("build", model_dir, "--profile", profile, "-o", artifact, "--max-context", CONTEXT + 96)
    inspect = invoke("inspect", artifact).output
    report = work / "report"
    invoke("eval", artifact, "--tasks", "continuation", "--lengths", CONTEXT, "--samples", 1,
           "--agreement-tokens", 4, "-o", report)
    return {"hf": hf, "profile": profile, "artifact": artifact, "inspect": inspect,
            "report": json.loads((work / "report.json").read_text())}


def _transformers_bytes(hf, context: int) -> int:
    from transformers import StaticCache

    cache = StaticCache(config=hf.config, max_cache_len=context)
    with torch.no_grad():
        hf(torch.tensor([[3, 4]]), cache=cache, use_cache=True)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _truth(gemma_run: dict) -> float:
    """The artifact's state as the runtime allocates it in bfloat16, over transformers' own
    bfloat16 cache at CONTEXT (sliding layers at their window)."""
    engine = load_engine(gemma_run["artifact"])
    arch = engine.arch
    cache = StaticKVCache.allocate(engine.plan, 1, CONTEXT, arch.head_dim, arch.group_size,
                                   dtype=torch.bfloat16)
    source = _transformers_bytes(copy.deepcopy(gemma_run["hf"]).to(torch.bfloat16), CONTEXT)
    # the sliding layers are counted at their window: the old definition would give less
    assert source < arch.n_layers * arch.n_kv_heads * CONTEXT * 2 * arch.head_dim * 2
    return cache.nbytes / source


def test_inspect_and_eval_agree_with_transformers(gemma_run: dict) -> None:
    truth = _truth(gemma_run)
    assert 0.1 < truth < 0.9
    line = next(ln for ln in gemma_run["inspect"].splitlines() if re.match(rf"\W*{CONTEXT}\W", ln))
    cells = [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]
    assert float(cells[-1]) == pytest.approx(truth, abs=1e-4)
    memory = gemma_run["report"]["kv_memory"]
    assert memory["baseline_dtype"] == "bfloat16" and memory["ratio"] == pytest.approx(truth, abs=1e-6)
    assert gemma_run["report"]["tasks"][0]["memory_ratio"] == pytest.approx(truth, abs=1e-6)
    # beside the ratio: what the float32 runtime allocated at the eval's context
    engine = load_engine(gemma_run["artifact"])
    assert memory["allocated_dtype"] == "float32"
    assert memory["allocated_bytes"] == engine.allocate(1, max_context=memory["context"]).nbytes


def test_the_profile_holds_its_budget_by_the_definition(gemma_run: dict) -> None:
    truth = _truth(gemma_run)
    profile = load_profile(gemma_run["profile"])
    row = next(r for r in profile.memory if r["context"] == CONTEXT)
    assert row["ratio"] == pytest.approx(truth, abs=1e-4)
    assert truth <= 0.5 + 1e-9


def test_profile_records_the_measured_choice(gemma_run: dict) -> None:
    choice = load_profile(gemma_run["profile"]).choice
    assert choice is not None and choice["chosen"] in {c["name"] for c in choice["candidates"]}
    assert any(c["name"] == "uniform" for c in choice["candidates"])


def test_the_recorded_choice_rebuilds_the_profile_plan(gemma_run: dict) -> None:
    """``chosen_settings`` refit from the statistics give the plan the profile ships."""
    profile = load_profile(gemma_run["profile"])
    arch = arch_from_description(profile.model["architecture"])
    request = chosen_request(profile, profile.settings.kv_budget, profile.settings.at_context)
    assert fit(stats_from_profile(profile), arch, request).plan == profile.plan


def test_refit_without_the_model_keeps_the_definition(gemma_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "refit.yaml"
    invoke("fit", gemma_run["profile"], "--kv-budget", 0.4, "-o", out)
    refit = load_profile(out)
    row = next(r for r in refit.memory if r["context"] == CONTEXT)
    assert row["ratio"] <= 0.4
    assert refit.choice is None
    assert any("not a measured choice" in note for note in refit.fit["notes"])
