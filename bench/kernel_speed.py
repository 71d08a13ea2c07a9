"""Kernel bandwidth and end-to-end decode speed of the GPU runtime (a benchmark, not a test).

Three tables, on one device:

1. **Copy bandwidth**: ``dst.copy_(src)`` of a 1 GiB buffer (256 MiB on CPU), bytes read plus
   bytes written per second: the roofline of the decode kernels, which read every key and value
   of a buffer once.
2. **Kernels**, per kernel, model shape and context: median time, bytes moved, achieved
   bandwidth and its fraction of the copy bandwidth, and the largest difference from the
   reference on the same inputs.

   - ``budgeted decode``: ``budgeted_attention`` of one token over a budgeted group, ``C``
     slots with a per-slot bias (``C`` = context x ``--budget``, the 1/8 budget's share of a
     head). Triton twice: one program per (row, KV head), the kernel as specified, and with the
     split count the op picks itself (shape-only, :func:`plan_splits`).
   - ``split-K decode``: ``budgeted_attention`` over a full head's buffer of ``context`` slots,
     all filled (``kv_length`` = context); flash-decoding split + combine.
   - ``cache update``: ``budgeted_cache_update`` of one token (all heads of a layer, a fold
     step): a few rows, so its time is launch latency, not bandwidth.
   - ``quantized decode kXvY``: ``quantized_attention`` of one token over a full head group at
     ``--quant-context`` (4096) stored as KIVI codes (group 32): a body of whole token groups
     plus a residual ring half full; next to it, ``full-precision decode``, the split-K kernel
     over the same context in the K/V dtype, the baseline the codes compete with.
   - ``quantized append kXvY``: ``quantized_append`` of one token (all heads of a layer), once
     into the ring (``no flush``) and once filling it (``flush``: the ring quantized into the
     body); each timed run first resets the row's length (one small copy), so both stay in
     their state.

   Bytes moved: what the operation must read and write (keys and values of the filled slots,
   bias, queries, output; the update's rows and counters), not the split workspace. Times: on
   CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run, median over
   100 ms of runs); on CPU the median of ``--runs`` wall-clock runs, 64 MiB written before
   each (so the data comes from memory there too). ``max abs err``: against the reference run in
   fp32 on the same values (the update: against one reference step from the same state).
   Implementations: ``triton`` (the kernels, compiled), ``reference`` (the plain-torch op),
   ``triton (interpreter)`` (``--interpret`` on a machine without a GPU: Triton's interpreter
   on one tiny size, a correctness demo whose times mean nothing).
3. **End-to-end decode** (``--artifact DIR``): tokens/s of the artifact served by the kvcompile
   runtime (``kvcompile.runtime.load(DIR, device=..., dtype=...)``: CUDA graphs on, the Triton
   kernels serving) against the uncompressed model in transformers with its own cache
   (``DynamicCache``, SDPA) and the kvcompile runtime with every head full, on seeded random
   prompts of each context (``bench/decode.py``'s systems and timing: each step synchronised,
   as when a server reads every token back). The artifact's plan is refitted from its bundled
   profile at ``--budget`` of each context, when the refit keeps the artifact's full heads (its
   weights are permuted for those); otherwise the artifact's own plan is served and the table
   says so. SmolLM2's RoPE covers 8192 positions: beyond that both systems run the same
   weights at positions the model was not trained on (the transformers config gets a larger
   ``max_position_embeddings``), so the outputs mean nothing there while the work per token is
   that of a same-shaped long-context model.

Without a GPU the script still runs every table on CPU (reference implementations, CPU-sized
contexts) and says that no GPU was present; the GPU goals are then not assessed.

    python bench/kernel_speed.py --markdown                       # GPU: 8K/32K/128K, bfloat16
    python bench/kernel_speed.py --artifact /tmp/bench/artifact   # + end-to-end decode
    python bench/kernel_speed.py --interpret                      # CPU: + the kernels, interpreted
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/decode.py; before torch loads

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

MIB = 1024 * 1024
GPU_CONTEXTS = (8192, 32768, 131072)
CPU_CONTEXTS = (2048, 8192)
CPU_E2E_CONTEXTS = (1024,)
INTERPRETER_CONTEXT = 1024  # split-K splits it in 2 there
QUANT_CONTEXT = 4096  # the quantized kernels' rows (full heads at 4K)
QUANT_GROUP = 32
QUANT_STORAGES = ((4, 4), (8, 8))  # (key bits, value bits)
GOAL_CONTEXT = 32768
GOAL_BANDWIDTH = 0.70  # of the copy bandwidth, budgeted decode and split-K at GOAL_CONTEXT
GOAL_SPEEDUP = 2.0  # end-to-end tokens/s of the artifact over transformers at GOAL_CONTEXT


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of one layer: KV heads, query heads per KV head, head dim."""

    name: str
    kv_heads: int
    group: int
    head_dim: int


SHAPES = (ModelShape("SmolLM2-135M", 3, 3, 64), ModelShape("Llama-3-8B", 8, 4, 128))


@dataclass
class KernelRow:
    kernel: str
    shape: str
    context: int
    slots: int
    implementation: str
    ms: float
    nbytes: int
    max_err: float | None

    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.nbytes / (self.ms / 1e3)


# -- timing ---------------------------------------------------------------------------------------

CPU_FLUSH_BYTES = 64 << 20  # written before each CPU run: larger than the last-level cache


def median_ms(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    """Median time of ``fn`` in ms, caches flushed before each run: CUDA events and an L2
    flush (``triton.testing.do_bench``), or the wall clock after writing 64 MiB on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    flush = torch.empty(CPU_FLUSH_BYTES, dtype=torch.uint8)
    times = []
    for _ in range(runs):
        flush.fill_(1)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, runs: int) -> tuple[int, float]:
    """(buffer bytes, bytes read + written per second) of a device-to-device copy."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, runs)
    return nbytes, 2 * nbytes / (ms / 1e3)


# -- kernel cases ---------------------------------------------------------------------------------

def _attention_inputs(shape: ModelShape, slots: int, budgeted: bool, dtype: torch.dtype,
                      device: torch.device, seed: int):
    """Random q, k, v (and a 0 / ln n / -inf bias, or a full kv_length) for one layer's call."""
    gen = torch.Generator().manual_seed(seed)
    hq = shape.kv_heads * shape.group

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dtype=dtype, device=device)

    q = randn(1, hq, 1, shape.head_dim)
    k = randn(1, shape.kv_heads, slots, shape.head_dim)
    v = randn(1, shape.kv_heads, slots, shape.head_dim)
    if not budgeted:
        return q, k, v, None, torch.full((1,), slots, dtype=torch.int64, device=device)
    choice = torch.randint(0, 8, (1, shape.kv_heads, slots), generator=gen)
    bias = torch.zeros(1, shape.kv_heads, slots)
    bias[choice == 0] = float("-inf")
    bias[:, :, 4] = torch.log(torch.tensor(float(max(1, slots * 7))))  # the compensation slot
    return q, k, v, bias.to(device), None


def attention_rows(shape: ModelShape, context: int, budget: float, dtype: torch.dtype,
                   device: torch.device, implementations: list[str], runs: int) -> list[KernelRow]:
    from kvcompile.runtime import ops

    rows = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for kernel, slots in (("budgeted decode", max(16, int(context * budget))),
                          ("split-K decode", context)):
        budgeted = kernel == "budgeted decode"
        q, k, v, bias, kv_length = _attention_inputs(shape, slots, budgeted, dtype, device,
                                                     seed=context)
        scale = shape.head_dim ** -0.5
        nbytes = 2 * k.numel() * itemsize + 2 * q.numel() * itemsize
        nbytes += 0 if bias is None else bias.numel() * bias.element_size()
        exact = ops._budgeted_attention_ref(q.float(), k.float(), v.float(), bias, kv_length,
                                            not budgeted, 0, scale)  # fp32 on the same values
        variants: list[tuple[str, Callable[[], torch.Tensor]]] = []
        for impl in implementations:
            if impl == "reference":
                variants.append(("reference", partial(ops._budgeted_attention_ref, q, k, v, bias,
                                                      kv_length, not budgeted, 0, scale)))
                continue
            from kvcompile.runtime import triton_kernels as tk

            if budgeted:
                variants.append((f"{impl}, 1 program per (row, KV head)",
                                 partial(tk.decode_attention, q, k, v, bias, None, scale,
                                         num_splits=1)))
            splits = tk.plan_splits(shape.kv_heads, slots, tk.sm_count(device))
            variants.append((f"{impl}, {splits} split{'s' * (splits > 1)} (auto)",
                             partial(tk.decode_attention, q, k, v, bias, kv_length, scale)))
        for name, fn in variants:
            err = float((fn().float() - exact).abs().max())
            ms = median_ms(fn, device, runs)
            rows.append(KernelRow(kernel, shape.name, context, slots, name, ms, nbytes, err))
    return rows


def update_rows(shape: ModelShape, context: int, budget: float, dtype: torch.dtype,
                device: torch.device, implementations: list[str], runs: int) -> list[KernelRow]:
    """One fold step of every head of a layer (ring full, selected slots used, comp_n > 0)."""
    from kvcompile.plan import BudgetLayout
    from kvcompile.runtime import ops

    layout = BudgetLayout.split(max(16, int(context * budget)), 4, 1, 0.25)
    gen = torch.Generator().manual_seed(context)
    heads, d = shape.kv_heads, shape.head_dim
    size = (1, heads, layout.capacity, d)
    k_buf, v_buf = (torch.randn(size, generator=gen).to(dtype=dtype, device=device)
                    for _ in range(2))
    bias = torch.zeros(size[:3], device=device)
    counters = torch.tensor([[layout.sinks, 10 * layout.window, layout.selected, 3]],
                            device=device)
    k_new, v_new = (torch.randn(1, heads, 1, d, generator=gen).to(dtype=dtype, device=device)
                    for _ in range(2))
    args = (layout.sinks, layout.compensation, layout.selected, layout.window)
    itemsize = k_buf.element_size()
    nbytes = 10 * heads * d * itemsize + 2 * heads * 4 + 64  # read 6 rows, write 4; bias; counters
    baseline = [t.clone() for t in (k_buf, v_buf, bias, counters)]
    ops._budgeted_cache_update_ref(*baseline, k_new, v_new, *args)  # one step, the reference
    rows = []
    for impl in implementations:
        state = [t.clone() for t in (k_buf, v_buf, bias, counters)]
        if impl == "reference":
            def fn(state=state):
                ops._budgeted_cache_update_ref(*state, k_new, v_new, *args)
            name = "reference"
        else:
            from kvcompile.runtime import triton_kernels as tk

            def fn(state=state):
                tk.cache_update(*state, k_new, v_new, *args)
            name = impl
        fn()  # one step from the common state: every implementation must agree
        err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(state, baseline,
                                                                             strict=True))
        ms = median_ms(fn, device, runs)
        rows.append(KernelRow("cache update", shape.name, context, layout.capacity, name, ms,
                              nbytes, err))
    return rows


def _quantized_inputs(shape: ModelShape, context: int, bits: tuple[int, int],
                      dtype: torch.dtype, device: torch.device, seed: int):
    """A full head group at ``context`` tokens as the quantized buffer holds it: codes of the
    whole groups (minus one, so the ring is half full), the query, the lengths."""
    from kvcompile.runtime.quant import Quantized, quantize_keys, quantize_values

    gen = torch.Generator().manual_seed(seed)
    hkv, d = shape.kv_heads, shape.head_dim
    in_ring = QUANT_GROUP // 2
    body = max(0, (context - in_ring) // QUANT_GROUP * QUANT_GROUP)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    keys, values = quantize_keys(randn(1, hkv, body, d), bits[0], QUANT_GROUP), \
        quantize_values(randn(1, hkv, body, d), bits[1], QUANT_GROUP)
    keys, values = (Quantized(*(t.to(device) for t in (x.codes, x.scale, x.zero)))
                    for x in (keys, values))
    q = randn(1, hkv * shape.group, 1, d).to(dtype=dtype, device=device)
    k_res, v_res = (randn(1, hkv, QUANT_GROUP, d).to(dtype=dtype, device=device)
                    for _ in range(2))
    lengths = (torch.tensor([body], device=device), torch.tensor([in_ring], device=device))
    return q, keys, values, k_res, v_res, lengths


def _quantized_nbytes(keys, values, k_res: torch.Tensor, q: torch.Tensor, in_ring: int) -> int:
    """Codes, scales and zeros of the body, the ring's filled slots, the query and output."""
    body = sum(t.numel() * t.element_size() for x in (keys, values)
               for t in (x.codes, x.scale, x.zero))
    return body + 2 * k_res[:, :, :in_ring].numel() * k_res.element_size() \
        + 2 * q.numel() * q.element_size()


def quantized_attention_rows(shape: ModelShape, context: int, dtype: torch.dtype,
                             device: torch.device, implementations: list[str],
                             runs: int) -> list[KernelRow]:
    """``quantized_attention`` over a full head group per storage, and the full-precision
    split-K decode over the same context (the baseline)."""
    from kvcompile.runtime import ops
    from kvcompile.runtime.quant_ops import _quantized_attention_ref

    rows = []
    scale = shape.head_dim ** -0.5
    for bits in QUANT_STORAGES:
        q, keys, values, k_res, v_res, (body, in_ring) = _quantized_inputs(
            shape, context, bits, dtype, device, seed=context + bits[0])
        args = (q, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero,
                body, k_res, v_res, None, in_ring, *bits, QUANT_GROUP, scale)
        exact = _quantized_attention_ref(q.float(), *args[1:8], k_res.float(), v_res.float(),
                                         *args[10:])
        nbytes = _quantized_nbytes(keys, values, k_res, q, int(in_ring[0]))
        variants: list[tuple[str, Callable[[], torch.Tensor]]] = []
        for impl in implementations:
            if impl == "reference":
                variants.append(("reference", partial(_quantized_attention_ref, *args)))
                continue
            from kvcompile.runtime import triton_kernels as tk
            from kvcompile.runtime import triton_quant as tq

            splits = tk.plan_splits(shape.kv_heads, keys.codes.shape[2], tk.sm_count(device))
            variants.append((f"{impl}, {splits} split{'s' * (splits > 1)} (auto)",
                             partial(tq.quantized_decode_attention, q, keys, values, body,
                                     k_res, v_res, None, in_ring, *bits, QUANT_GROUP, scale)))
        kernel = f"quantized decode k{bits[0]}v{bits[1]}"
        for name, fn in variants:
            err = float((fn().float() - exact).abs().max())
            ms = median_ms(fn, device, runs)
            rows.append(KernelRow(kernel, shape.name, context, keys.codes.shape[2], name, ms,
                                  nbytes, err))
    q, k, v, _, kv_length = _attention_inputs(shape, context, False, dtype, device, seed=context)
    exact = ops._budgeted_attention_ref(q.float(), k.float(), v.float(), None, kv_length, True,
                                        0, scale)
    nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    for impl in implementations:
        if impl == "reference":
            fn = partial(ops._budgeted_attention_ref, q, k, v, None, kv_length, True, 0, scale)
        else:
            from kvcompile.runtime import triton_kernels as tk

            fn = partial(tk.decode_attention, q, k, v, None, kv_length, scale)
        err = float((fn().float() - exact).abs().max())
        rows.append(KernelRow(f"full-precision decode {str(dtype).removeprefix('torch.')}",
                              shape.name, context, context, impl, median_ms(fn, device, runs),
                              nbytes, err))
    return rows


def quantized_append_rows(shape: ModelShape, dtype: torch.dtype, device: torch.device,
                          implementations: list[str], runs: int) -> list[KernelRow]:
    """``quantized_append`` of one token to every head of a layer, into the ring and with a
    flush, per storage; the error is against one reference step from the same state."""
    from kvcompile.plan import Storage
    from kvcompile.runtime.quant import Quantized
    from kvcompile.runtime.quant_cache import QuantizedFullBuffer
    from kvcompile.runtime.quant_ops import _quantized_append_ref

    rows = []
    gen = torch.Generator().manual_seed(shape.head_dim)
    heads, d = shape.kv_heads, shape.head_dim
    for bits in QUANT_STORAGES:
        buf = QuantizedFullBuffer.empty(1, heads, QUANT_CONTEXT, d, Storage(*bits, QUANT_GROUP),
                                        dtype, device)
        buf.k_res.copy_(torch.randn(buf.k_res.shape, generator=gen))
        buf.v_res.copy_(torch.randn(buf.v_res.shape, generator=gen))
        k_new, v_new = (torch.randn(1, heads, 1, d, generator=gen).to(dtype=dtype, device=device)
                        for _ in range(2))
        itemsize = buf.k_res.element_size()
        token = 2 * 2 * heads * d * itemsize + 16  # read the token, write its slot; the length
        flushed = 2 * heads * QUANT_GROUP * d * itemsize + sum(  # read the ring, write a group
            t[:, :, :QUANT_GROUP].numel() * t.element_size()
            for x in (buf.keys, buf.values) for t in (x.codes, x.scale, x.zero))
        for case, start, nbytes in (("no flush", 5 * QUANT_GROUP, token),
                                    ("flush", 6 * QUANT_GROUP - 1, token + flushed)):
            start_length = torch.tensor([start], device=device)
            original = [buf.keys.codes, buf.keys.scale, buf.keys.zero, buf.values.codes,
                        buf.values.scale, buf.values.zero, buf.k_res, buf.v_res, buf.length]
            baseline = [t.clone() for t in original]
            baseline[8].copy_(start_length)
            _quantized_append_ref(*baseline, k_new, v_new, *bits, QUANT_GROUP)
            for impl in implementations:
                state = [t.clone() for t in original]
                if impl == "reference":
                    step: Callable[..., None] = _quantized_append_ref
                    name = "reference"
                else:
                    from kvcompile.runtime import triton_quant as tq

                    def step(*args, tq=tq):
                        tq.quantized_append(Quantized(*args[:3]), Quantized(*args[3:6]),
                                            *args[6:])
                    name = impl

                def fn(state=state, step=step, start=start_length,
                       tail=(k_new, v_new, *bits, QUANT_GROUP)):
                    state[8].copy_(start)
                    step(*state, *tail)

                fn()
                err = max(float((a.float() - b.float()).abs().max())
                          for a, b in zip(state, baseline, strict=True))
                rows.append(KernelRow(f"quantized append k{bits[0]}v{bits[1]}", shape.name,
                                      QUANT_CONTEXT, QUANT_GROUP, f"{name}, {case}",
                                      median_ms(fn, device, runs), nbytes, err))
    return rows


def kernel_table(rows: list[KernelRow], copy_bw: float, markdown: bool) -> str:
    header = ["kernel", "model shape", "context", "slots", "implementation", "median µs",
              "MiB moved", "GB/s", "of copy", "max abs err"]
    body = [[r.kernel, r.shape, str(r.context), str(r.slots), r.implementation,
             f"{r.ms * 1e3:.1f}", f"{r.nbytes / MIB:.2f}", f"{r.bandwidth() / 1e9:.1f}",
             f"{r.bandwidth() / copy_bw:.0%}", "-" if r.max_err is None else f"{r.max_err:.1e}"]
            for r in rows]
    return render(header, body, markdown, left={0, 1, 4})


# -- end to end ---------------------------------------------------------------------------------

def e2e_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             contexts: list[int]) -> tuple[list[list[str]], dict[int, float]]:
    """Rows of the end-to-end table and the artifact's speed-up over transformers per context."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import decode  # bench/decode.py: its systems, prefill and timing

    from kvcompile.models import load_model
    from kvcompile.runtime import load
    from kvcompile.runtime.placement import dtype_name

    longest = max(contexts) + args.e2e_steps + decode.warmup_steps(device)
    engine = load(args.artifact, device=str(device), dtype=dtype_name(dtype), max_context=longest)
    loaded = load_model(engine.manifest.source_model.source if engine.manifest else "default")
    config = copy.deepcopy(loaded.config)
    config.max_position_embeddings = max(config.max_position_embeddings, longest)
    hf_model = decode.load_transformers_model(dataclasses.replace(loaded, config=config), dtype,
                                              device)
    run_args = argparse.Namespace(seed=args.seed, steps=args.e2e_steps, rounds=args.rounds)
    rows, speedups = [], {}
    for context in contexts:
        plan, plan_note = plan_at(engine, args.artifact, context, args.budget)
        with torch.inference_mode():
            results = decode.run_context(context, run_args, engine, hf_model,
                                         engine.arch.vocab_size, plan=plan)
        base = next(r for r in results if r.system.startswith("transformers"))
        for res in results:
            speed = base.median_ms / res.median_ms
            note = plan_note if res.system == "kvcompile artifact" else \
                ("all heads" if "full" in res.system else "own cache")
            rows.append([str(context), res.system, note, f"{res.median_ms:.2f}",
                         f"{1e3 / res.median_ms:.1f}", f"{res.kv_bytes / MIB:.1f}",
                         f"{res.memory_ratio:.3f}x", f"{speed:.2f}x"])
            if res.system == "kvcompile artifact":
                speedups[context] = speed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, speedups


def plan_at(engine, artifact: Path, context: int, budget: float):
    """The artifact's plan refitted at ``budget`` of ``context`` (same full heads), or its own."""
    from kvcompile.fit.greedy import fit
    from kvcompile.fit.pipeline import stats_from_profile
    from kvcompile.profile.record import load_profile
    from kvcompile.settings import FitSettings

    stats = stats_from_profile(load_profile(Path(artifact) / "profile.yaml"))
    arch = dataclasses.replace(engine.arch, max_context=max(engine.arch.max_context, context))
    refit = fit(stats, arch, FitSettings(kv_budget=budget, at_context=context)).plan
    if [lp.full_heads for lp in refit.layers] == [lp.full_heads for lp in engine.plan.layers]:
        return refit, f"refit: {budget:g} at {context}"
    return engine.plan, "artifact's own (a refit changes its full heads)"


# -- output ---------------------------------------------------------------------------------------

def render(header: list[str], rows: list[list[str]], markdown: bool, left: set[int]) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i in left else "---:" for i in range(len(header))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def goals(rows: list[KernelRow], copy_bw: float, speedups: dict[int, float],
          gpu: bool) -> list[str]:
    """The issue's goals against what was measured (assessed on a GPU only)."""
    out = []
    for kernel in ("budgeted decode", "split-K decode"):
        at_goal = [r for r in rows if r.kernel == kernel and r.context == GOAL_CONTEXT
                   and r.implementation.startswith("triton") and "auto" in r.implementation]
        if not gpu or not at_goal:
            out.append(f"- {kernel} >= {GOAL_BANDWIDTH:.0%} of copy bandwidth at {GOAL_CONTEXT}: "
                       f"not assessed ({'no GPU' if not gpu else 'context not run'})")
            continue
        parts = [f"{r.shape} {r.bandwidth() / copy_bw:.0%}" for r in at_goal]
        met = all(r.bandwidth() / copy_bw >= GOAL_BANDWIDTH for r in at_goal)
        out.append(f"- {kernel} >= {GOAL_BANDWIDTH:.0%} of copy bandwidth at {GOAL_CONTEXT}: "
                   f"{', '.join(parts)}: {'met' if met else 'NOT met'}")
    if not gpu or GOAL_CONTEXT not in speedups:
        out.append(f"- end-to-end at {GOAL_CONTEXT} >= {GOAL_SPEEDUP:g}x transformers' tokens/s: "
                   f"not assessed ({'no GPU' if not gpu else 'no --artifact or context not run'})")
    else:
        speed = speedups[GOAL_CONTEXT]
        out.append(f"- end-to-end at {GOAL_CONTEXT} >= {GOAL_SPEEDUP:g}x transformers' tokens/s: "
                   f"{speed:.2f}x: {'met' if speed >= GOAL_SPEEDUP else 'NOT met'}")
    return out


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None,
                        help="cuda (default when a GPU is present) or cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="KV and weight precision (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help=f"contexts in tokens (default: {' '.join(map(str, GPU_CONTEXTS))} "
                             f"on CUDA, {' '.join(map(str, CPU_CONTEXTS))} on CPU)")
    parser.add_argument("--quant-context", type=int, default=QUANT_CONTEXT,
                        help="context of the quantized decode rows (full heads as codes)")
    parser.add_argument("--budget", type=float, default=0.125,
                        help="KV budget: budgeted capacity = context x budget; refit budget")
    parser.add_argument("--runs", type=int, default=20,
                        help="timed runs per kernel on CPU (CUDA: do_bench's 100 ms)")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: also run the Triton kernels in Triton's interpreter "
                             f"(one tiny size, {INTERPRETER_CONTEXT} tokens)")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="artifact directory (kvcompile build): adds end-to-end decode")
    parser.add_argument("--e2e-contexts", type=int, nargs="+", default=None,
                        help="end-to-end contexts (default: --contexts on CUDA, "
                             f"{' '.join(map(str, CPU_E2E_CONTEXTS))} on CPU)")
    parser.add_argument("--e2e-steps", type=int, default=32, help="timed decode steps per system")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (end to end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch intra-op threads")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(argv)

    gpu_present = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if gpu_present else "cpu"))
    if device.type == "cuda" and not gpu_present:
        parser.error("--device cuda: no CUDA GPU is available to torch on this machine")
    on_gpu = device.type == "cuda"
    if args.interpret and on_gpu:
        parser.error("--interpret is for machines without a GPU (a GPU runs the kernels compiled)")
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is imported
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    contexts = args.contexts or list(GPU_CONTEXTS if on_gpu else CPU_CONTEXTS)
    torch.set_num_threads(args.threads)

    implementations = ["reference"]
    if on_gpu:
        from kvcompile.runtime import kernels

        serving = kernels.enable()
        if serving == "triton":
            implementations.insert(0, "triton")
        where = f"{torch.cuda.get_device_name(device)}; kernels: {serving}"
    else:
        where = (f"CPU, {torch.get_num_threads()} threads. NO GPU PRESENT: the reference "
                 f"implementations are timed on CPU at CPU-sized contexts; on a GPU this script "
                 f"times the Triton kernels at {', '.join(map(str, GPU_CONTEXTS))} tokens, "
                 f"bfloat16, and assesses the goals")
    print(f"# {where}; torch {torch.__version__}; {str(dtype).removeprefix('torch.')}; "
          f"budget {args.budget:g}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)

    started = time.perf_counter()
    nbytes, copy_bw = copy_bandwidth(device, args.runs)
    print(f"## Copy bandwidth\n\n{device.type} copy of {nbytes // MIB} MiB: "
          f"{copy_bw / 1e9:.1f} GB/s (read + write)\n")

    rows: list[KernelRow] = []
    for shape in SHAPES:
        for context in contexts:
            rows += attention_rows(shape, context, args.budget, dtype, device, implementations,
                                   args.runs)
            rows += update_rows(shape, context, args.budget, dtype, device, implementations,
                                args.runs)
        rows += quantized_attention_rows(shape, args.quant_context, dtype, device,
                                         implementations, args.runs)
        rows += quantized_append_rows(shape, dtype, device, implementations, args.runs)
    if args.interpret:
        for shape in SHAPES[:1]:
            label = ["triton (interpreter)", "reference"]
            rows += attention_rows(shape, INTERPRETER_CONTEXT, args.budget, dtype, device, label,
                                   runs=3)
            rows += update_rows(shape, INTERPRETER_CONTEXT, args.budget, dtype, device, label,
                                runs=3)
            rows += quantized_attention_rows(shape, INTERPRETER_CONTEXT, dtype, device, label,
                                             runs=3)
            rows += quantized_append_rows(shape, dtype, device, label, runs=3)
    print(f"## Kernels\n\n{kernel_table(rows, copy_bw, args.markdown)}\n")

    speedups: dict[int, float] = {}
    if args.artifact is not None:
        e2e_contexts = args.e2e_contexts or (contexts if on_gpu else list(CPU_E2E_CONTEXTS))
        body, speedups = e2e_rows(args, device, dtype, e2e_contexts)
        header = ["context", "system", "plan", "ms/token", "tokens/s", "KV MiB allocated",
                  "memory ratio", "speed vs transformers"]
        print(f"## End-to-end decode\n\n{render(header, body, args.markdown, left={1, 2})}\n")
    else:
        print("## End-to-end decode\n\nnot run: pass --artifact DIR (built with `kvcompile "
              "build`) to time the artifact against transformers\n")
    print("## Goals\n\n" + "\n".join(goals(rows, copy_bw, speedups, on_gpu)))
    print(f"# {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
