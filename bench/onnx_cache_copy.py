"""What binding the cache in place saves an onnxruntime decode step (a benchmark, not a test).

After one prefill of ``L`` seeded random tokens, the same decode steps run in two modes,
interleaved in rounds:

* **in place** — the backend's binding: every cache tensor is both the ``past.*`` input and the
  ``present.*`` output, so the scatters that write the cache skip their input copy and a step
  writes only the new slots (``docs/ONNX.md``: at most three per budgeted head, one per full
  head);
* **copying** — the ``present.*`` outputs go to a second set of buffers, swapped every step:
  what a caller pays that feeds the outputs back as new arrays. Every step copies every cache
  tensor, whatever ``L`` is (the buffers are static).

Prints, per context, both modes' median step time and the cache bytes each writes per step;
the logits of the two modes must agree exactly (same graph, same inputs).

    python bench/onnx_cache_copy.py --artifact /tmp/bench/artifact --contexts 2048 8000
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/decode.py

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from kvcompile.runtime import onnx_io  # noqa: E402
from kvcompile.runtime.onnx_backend import OnnxCache, load_onnx_engine  # noqa: E402

MIB = 1024 * 1024


def human(nbytes: int) -> str:
    """KiB below a MiB, MiB above (a tiny model's whole cache is a few KiB)."""
    return f"{nbytes / MIB:.1f} MiB" if nbytes >= MIB else f"{nbytes / 1024:.1f} KiB"


def written_per_step(engine) -> int:
    """Cache bytes an in-place step writes, per row (the slots of docs/ONNX.md)."""
    total = 0
    d = next(spec.shape[-1] for spec in engine.cache_specs if len(spec.shape) == 4)
    for layer in engine.plan.layers:
        if layer.full_heads:
            total += 2 * len(layer.full_heads) * d * 4
        if layer.budgeted_heads:
            layout = layer.layout
            slots = 1 + layout.compensation + (layout.selected > 0)
            total += slots * len(layer.budgeted_heads) * (2 * d * 4 + 4) + 32
    return total


def swap_binding(engine, source: OnnxCache, target: OnnxCache):
    binding = engine.decode_session.io_binding()
    binding.bind_ortvalue_input(onnx_io.INPUT_IDS, source.ids)
    binding.bind_ortvalue_input(onnx_io.PAST_LENGTH, source.past_length)
    for spec in engine.cache_specs:
        binding.bind_ortvalue_input(spec.input_name, source.values[spec])
        binding.bind_ortvalue_output(spec.output_name, target.values[spec])
    binding.bind_ortvalue_output(onnx_io.LOGITS, source.logits)
    return binding


def run_context(engine, length: int, steps: int, rounds: int, seed: int) -> dict:
    ids = np.random.default_rng(seed + length).integers(0, engine.vocab_size, (1, length))
    in_place, first, second = (engine.allocate(1) for _ in range(3))
    started = time.perf_counter()
    logits = engine.prefill(ids, [in_place])
    print(f"[L={length}] onnxruntime prefill {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    engine.prefill(ids, [first])
    bindings = (swap_binding(engine, first, second), swap_binding(engine, second, first))
    token = logits.argmax(-1)[:, None]
    times = {"in place": [], "copying": []}
    position = length
    for _ in range(rounds):
        for _ in range(steps // rounds):
            in_place.ids.update_inplace(token)
            first.ids.update_inplace(token)
            second.ids.update_inplace(token)
            for cache in (in_place, first, second):
                cache.set_length(position)
            t0 = time.perf_counter()
            engine.decode_session.run_with_iobinding(in_place.decode_binding())
            times["in place"].append(time.perf_counter() - t0)
            binding = bindings[(position - length) % 2]
            source = first if (position - length) % 2 == 0 else second
            t0 = time.perf_counter()
            engine.decode_session.run_with_iobinding(binding)
            times["copying"].append(time.perf_counter() - t0)
            a, b = in_place.logits.numpy(), source.logits.numpy()
            if not np.array_equal(a, b):
                raise SystemExit("the two modes disagree: not the same computation")
            token = a.argmax(-1)[:, None]
            position += 1
    cache_bytes = in_place.nbytes  # every cache tensor a copying step copies
    return {"context": length, "in_place_ms": 1e3 * statistics.median(times["in place"]),
            "copying_ms": 1e3 * statistics.median(times["copying"]),
            "written_bytes": written_per_step(engine), "cache_bytes": cache_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8000])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    engine = load_onnx_engine(args.artifact, verify=False, device="cpu", threads=args.threads)
    print(f"# load average {os.getloadavg()[0]:.2f}, {args.threads} threads, "
          f"max context {engine.max_context}", file=sys.stderr)
    print("| context | mode | decode ms/token (median) | cache bytes written per step |")
    print("|---:|---|---:|---:|")
    for length in args.contexts:
        row = run_context(engine, length, args.steps, args.rounds, args.seed)
        print(f"| {length} | in place | {row['in_place_ms']:.1f} | {human(row['written_bytes'])} |")
        print(f"| {length} | copying | {row['copying_ms']:.1f} | {human(row['cache_bytes'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
