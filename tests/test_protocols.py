"""The three engines and three caches against the ``Engine`` and ``KVCache`` Protocols.

``isinstance`` on a runtime-checkable Protocol only asks whether names exist; this checks
every member on real instances (loaded from one tiny artifact with its ONNX graphs): data
members are values, not methods, and methods take the Protocol's parameters, in its order,
with its defaults. A control shows the check fails when a member is missing or its call
differs.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import pytest
import torch

from kvcompile.build.artifact import build_artifact, compile_engine
from kvcompile.eval.backends import OnnxBesideTorch, load_for_eval
from kvcompile.eval.evaluate import memory_context
from kvcompile.plan import Plan
from kvcompile.runtime import load
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.engine import Engine as TorchEngine
from kvcompile.runtime.head_order import ReorderedCache
from kvcompile.runtime.manifest import Manifest
from kvcompile.runtime.onnx_backend import OnnxCache, OnnxEngine
from kvcompile.runtime.protocols import Engine, KVCache, LayeredKVCache
from tests.test_profile_io import saved_tiny_model
from tests.tiny import tiny_loaded

CONTEXT = 64


def protocol_members(protocol: type) -> dict[str, Any]:
    """Name -> declaration (a property or a function) of ``protocol`` and its bases."""
    members: dict[str, Any] = {}
    for base in reversed(protocol.__mro__):
        if base in (Protocol, object) or not getattr(base, "_is_protocol", False):
            continue
        for name, value in vars(base).items():
            if (not name.startswith("_") or name == "__getitem__") and (
                    isinstance(value, property) or inspect.isfunction(value)):
                members[name] = value
    return members


def _call_problems(name: str, declared: Any, found: Any) -> list[str]:
    """``found`` (a bound method) must accept every call ``declared`` allows."""
    want = [p for p in inspect.signature(declared).parameters.values() if p.name != "self"]
    have = list(inspect.signature(found).parameters.values())
    star = any(p.kind is p.VAR_POSITIONAL for p in have)
    positional = [p for p in have if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    for i, param in enumerate(want):
        if i >= len(positional):
            if not star:
                problems.append(f"{name}() lacks parameter {param.name!r}")
            continue
        theirs = positional[i]
        if theirs.name != param.name and not star:
            problems.append(f"{name}() has {theirs.name!r} where the Protocol has {param.name!r}")
        if param.default is not param.empty and theirs.default is param.empty:
            problems.append(f"{name}() requires {param.name!r}, which the Protocol lets callers omit")
        elif param.default is not param.empty and theirs.default != param.default:
            problems.append(f"{name}() defaults {param.name!r} to {theirs.default!r}, not "
                            f"{param.default!r}")
    for extra in positional[len(want):]:
        if extra.default is extra.empty:
            problems.append(f"{name}() requires {extra.name!r}, which the Protocol does not pass")
    return problems


def conformance(obj: Any, protocol: type) -> list[str]:
    """Every way ``obj`` falls short of ``protocol`` (empty: it satisfies it)."""
    problems = []
    for name, declared in protocol_members(protocol).items():
        if not hasattr(obj, name):
            problems.append(f"{type(obj).__name__} lacks {name!r}")
            continue
        found = getattr(obj, name)
        if isinstance(declared, property):
            if inspect.ismethod(found):
                problems.append(f"{type(obj).__name__}.{name} is a method, the Protocol's a value")
        elif not callable(found):
            problems.append(f"{type(obj).__name__}.{name} is not callable")
        else:
            problems += [f"{type(obj).__name__}.{p}" for p in _call_problems(name, declared, found)]
    return problems


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("protocols")
    _, loaded, profile = saved_tiny_model(root)
    build_artifact(loaded, profile, root / "artifact", max_context=CONTEXT)
    return {"torch": load(root / "artifact"), "onnx": load(root / "artifact", backend="onnx"),
            "beside": load_for_eval(root / "artifact", "onnx")}


def test_the_protocols_declare_what_their_users_call() -> None:
    assert set(protocol_members(KVCache)) == {"plan", "length", "max_context", "nbytes", "reset"}
    assert set(protocol_members(LayeredKVCache)) == {*protocol_members(KVCache), "__getitem__",
                                                     "positions", "advance"}
    assert {"buffer_context", "manifest", "allocate", "prefill", "extend", "generate"} <= set(
        protocol_members(Engine))


def test_the_three_engines_satisfy_the_engine_protocol(engines) -> None:
    assert [type(e) for e in engines.values()] == [TorchEngine, OnnxEngine, OnnxBesideTorch]
    for engine in engines.values():
        assert conformance(engine, Engine) == []
        assert isinstance(engine.manifest, Manifest) and engine.plan == engine.manifest.plan
    # buffer_context is what eval's memory ratio reads, without probing for it
    assert engines["torch"].buffer_context is None
    assert engines["onnx"].buffer_context == engines["beside"].buffer_context == CONTEXT
    assert memory_context(engines["torch"], 16) == 16
    assert memory_context(engines["beside"], 16) == CONTEXT


def test_the_three_caches_satisfy_the_cache_protocol(engines) -> None:
    torch_engine = engines["torch"]
    static = torch_engine.allocate(1, CONTEXT)
    caches = [static, engines["onnx"].allocate(1),
              ReorderedCache(static, torch_engine.plan.to_served(permuted_by=torch_engine.plan),
                             torch_engine.arch.group_size)]
    assert [type(c) for c in caches] == [StaticKVCache, OnnxCache, ReorderedCache]
    served = torch_engine.plan.to_served(permuted_by=torch_engine.plan)
    # every cache counts the same state (kvcompile.memory): the ONNX one counts past_length
    # once per layer with full heads, where the torch runtime keeps a length per such layer
    for cache, plan in zip(caches, (torch_engine.plan, torch_engine.plan, served), strict=True):
        assert conformance(cache, KVCache) == []
        assert cache.length == 0 and cache.max_context == CONTEXT
        assert cache.nbytes == static.nbytes and cache.plan == plan
    for cache in (caches[0], caches[2]):  # what the torch engine computes with
        assert conformance(cache, LayeredKVCache) == []
    assert conformance(caches[1], LayeredKVCache)  # the ONNX cache is not one: the check can tell


def test_the_check_fails_for_a_missing_member_or_a_different_call(engines) -> None:
    """Control: one member removed or one call changed, and the engine no longer conforms."""
    class NoBufferContext(OnnxBesideTorch):
        def __getattribute__(self, name: str) -> Any:
            if name == "buffer_context":
                raise AttributeError(name)
            return super().__getattribute__(name)

    class ExtendWithoutAllLogits(TorchEngine):
        def extend(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:  # type: ignore[override]
            return super().extend(input_ids, cache)

    class AllocateWithoutDefaults(TorchEngine):
        def allocate(self, batch: int, max_context: int | None = None,  # type: ignore[override]
                     plan: Any = None) -> StaticKVCache:
            return super().allocate(batch, max_context, plan)

    beside, base = engines["beside"], engines["torch"]
    missing = NoBufferContext(beside.torch_engine, beside.onnx_engine)
    assert conformance(missing, Engine) == ["NoBufferContext lacks 'buffer_context'"]
    for broken, word in ((ExtendWithoutAllLogits, "all_logits"), (AllocateWithoutDefaults, "batch")):
        engine = broken(base.model, base.plan, base.tokenizer, max_context=CONTEXT)
        engine.manifest = base.manifest
        found = conformance(engine, Engine)
        assert len(found) == 1 and word in found[0], found


def test_the_onnx_engine_beside_torch_generates_as_the_onnx_engine(engines) -> None:
    """The members OnnxBesideTorch gained for the Protocol serve the artifact's graphs."""
    prompt = [5, 9, 11, 3, 40, 41, 7]
    expected = engines["onnx"].generate(prompt, max_new_tokens=6)
    found = engines["beside"].generate(prompt, max_new_tokens=6)
    assert found.token_ids == expected.token_ids and found.kv_bytes == expected.kv_bytes
    assert engines["beside"].encode("w5 w6") == engines["onnx"].encode("w5 w6")


def test_an_engine_without_an_artifact_has_no_manifest() -> None:
    loaded = tiny_loaded("llama")
    plan = Plan.uncompressed(loaded.arch.n_layers, loaded.arch.n_kv_heads)
    _, engine = compile_engine(loaded, plan, max_context=32)
    assert engine.manifest is None and engine.buffer_context is None
    assert conformance(engine, Engine) == []
