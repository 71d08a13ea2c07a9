"""Decode speed and KV memory: a kvcompile artifact vs the uncompressed model (a benchmark, not a test).

For each context length ``L`` a seeded random prompt of ``L`` token ids is prefilled, then
``--steps`` greedy single-token decode steps are timed (after one untimed warm-up step) for

* ``transformers``  — the source model in transformers with its own ``DynamicCache``
  (``use_cache=True``, ``past_key_values=``), the reference the goal is measured against;
* ``kvcompile full`` — the kvcompile runtime with every head full (``engine.uncompressed_plan()``);
* ``artifact``       — the kvcompile runtime with the artifact's static-budget plan;
* ``onnxruntime``    — with ``--backend onnx``, also the artifact's ONNX graphs in onnxruntime
  (CPU provider, cache buffers bound as input and output), prefilled by its own prefill graph.

The three systems are timed in interleaved rounds (``--rounds``) so that load from other
processes on a shared machine hits them alike; the reported time is the median step.
``--device cuda --dtype bfloat16`` runs all three on the GPU in that precision (each step is
timed to its completion: ``torch.cuda.synchronize`` before the clock stops; the kvcompile
systems replay their decode step as a CUDA graph, with the Triton kernels where they serve).
KV MiB: what each system really allocated, in the run's dtype (transformers: its cache's keys
and values; kvcompile: ``StaticKVCache.nbytes``, all KV state, allocated for ``L`` + warm-up +
timed steps; onnxruntime: ``OnnxCache.nbytes`` at the graphs' context). The memory ratio is
``kvcompile.memory``'s one definition, never a ratio of those allocations: all of a plan's KV
state over the source model's own cache at the same context, every full-precision value
counted in bfloat16 whatever the run computes in (transformers' own cache: 1 by definition).
``--storage k4v4`` also times the artifact's plan with its groups quantized (the same
slots in fewer bytes).

    python bench/decode.py --artifact /tmp/bench/artifact --contexts 2048 8192 --markdown
    python bench/decode.py --artifact /tmp/bench/artifact --device cuda --dtype bfloat16
"""
from __future__ import annotations

import os

# Spinning OpenMP workers turn a busy shared machine (other processes on the same cores) into
# multi-second decode steps: each of the hundreds of small ops per token waits for a descheduled
# thread. Sleep-waiting workers keep the measurement meaningful; export OMP_WAIT_POLICY=ACTIVE
# to measure with spinning. Must be set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

MIB = 1024 * 1024
AGREEMENT = {torch.float32: 1e-2, torch.bfloat16: 2.0, torch.float16: 1.0}
"""Largest |logit difference| between transformers and the kvcompile runtime (all heads full)
on the last prompt position that still means "the same model": half precision rounds every
activation, so two correct implementations differ by tenths there; another model would differ
by several units."""


@dataclass
class Result:
    context: int
    system: str
    step_ms: list[float]
    kv_bytes: int  # allocated, in the run's dtype
    memory_ratio: float  # kvcompile.memory's definition: values counted in bfloat16

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.step_ms)


class Decoder:
    """One system at one context: ``prefill()`` once, then ``step()`` per decoded token."""

    name: str
    prefill_logits: torch.Tensor | None = None  # last prompt position, [1, V]

    def prefill(self, ids: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def kv_bytes(self) -> int:
        raise NotImplementedError

    def memory_ratio(self) -> float:
        """``kvcompile.memory.plan_memory_ratio`` of what this system keeps (bfloat16 values)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class TransformersDecoder(Decoder):
    name = "transformers (DynamicCache)"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = None
        self.token: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.prefill_logits = out.logits[:, -1]
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> None:
        out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def kv_bytes(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def memory_ratio(self) -> float:
        return 1.0  # the source model's own cache: the definition's reference

    def close(self) -> None:
        self.cache = None


class RuntimeDecoder(Decoder):
    """The kvcompile Engine with a StaticKVCache for ``plan``."""

    def __init__(self, name: str, engine, plan, max_context: int) -> None:
        self.name = name
        self.engine = engine
        self.plan = plan
        self.cache = engine.allocate(1, max_context=max_context, plan=plan)
        self.token: torch.Tensor | None = None

    def set_logits(self, logits: torch.Tensor) -> None:
        self.token = logits.argmax(-1, keepdim=True)

    def prefill(self, ids: torch.Tensor) -> None:
        self.set_logits(self.engine.prefill(ids, [self.cache]))

    def step(self) -> None:
        self.set_logits(self.engine.extend(self.token, self.cache))

    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def memory_ratio(self) -> float:
        from kvcompile.memory import plan_memory_ratio

        return plan_memory_ratio(self.plan, self.engine.arch, self.cache.max_context)

    def close(self) -> None:
        self.cache = None


class OnnxDecoder(Decoder):
    """The artifact's ONNX graphs (``kvcompile.runtime.load(DIR, backend="onnx")``)."""

    name = "onnxruntime artifact"

    def __init__(self, engine, max_context: int, arch) -> None:
        self.engine = engine
        self.arch = arch  # the source model's (the ONNX engine holds none)
        self.cache = engine.allocate(1, max_context=max_context)
        self.token = None

    def prefill(self, ids: torch.Tensor) -> None:
        logits = self.engine.prefill(ids.cpu().numpy(), [self.cache])
        self.prefill_logits = torch.from_numpy(logits)
        self.token = logits.argmax(-1)[:, None]

    def step(self) -> None:
        self.token = self.engine.decode_step(self.token, self.cache).argmax(-1)[:, None]

    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def memory_ratio(self) -> float:
        from kvcompile.memory import plan_memory_ratio

        # the graphs' buffers hold their build context whatever a request asks for
        return plan_memory_ratio(self.engine.plan, self.arch, self.engine.buffer_context)

    def close(self) -> None:
        self.cache = None


def load_transformers_model(loaded, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> torch.nn.Module:
    """The source model as a transformers model, from the weights kvcompile already loaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(loaded.config, dtype=dtype,
                                             attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(loaded.state, strict=False)
    missing = [m for m in missing if not (loaded.arch.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"transformers model does not match the loaded weights: "
                         f"missing {missing}, unexpected {unexpected}")
    if loaded.arch.tie_embeddings:
        model.tie_weights()
    return model.to(device).eval()


def warmup_steps(device: torch.device) -> int:
    """Untimed steps per system: on CUDA the kvcompile decode step runs eagerly once, then is
    captured as a CUDA graph on its second call; the timed steps are replays."""
    return 2 if device.type == "cuda" else 1


def time_interleaved(decoders: list[Decoder], steps: int, rounds: int,
                     device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Warm-up steps, then ``steps`` timed steps each, in ``rounds`` interleaved rounds.

    On CUDA each step is timed to its completion (``torch.cuda.synchronize``)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup_steps(device)):
        for dec in decoders:
            dec.step()
    sync()
    times: dict[str, list[float]] = {dec.name: [] for dec in decoders}
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for dec in decoders:
            for _ in range(n):
                t0 = time.perf_counter()
                dec.step()
                sync()
                times[dec.name].append((time.perf_counter() - t0) * 1000.0)
    return times


def with_storage(plan, storage):
    """``plan`` with both head groups of every layer stored as ``storage`` (same slots)."""
    from dataclasses import replace

    return replace(plan, layers=tuple(replace(layer, full_storage=storage, budget_storage=storage)
                                      for layer in plan.layers))


def run_context(length: int, args: argparse.Namespace, engine, hf_model, vocab: int,
                plan=None, onnx_engine=None) -> list[Result]:
    """Prefill a seeded random prompt of ``length`` ids, then time decode steps of every system;
    ``plan`` (default: the artifact's) is the static-budget plan the artifact system serves,
    ``onnx_engine`` adds the artifact's ONNX graphs in onnxruntime, ``args.storage`` the
    artifact's plan with its groups quantized."""
    gen = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(0, vocab, (1, length), generator=gen).to(engine.device)
    max_context = length + args.steps + warmup_steps(engine.device)
    decoders: list[Decoder] = []
    if hf_model is not None:
        decoders.append(TransformersDecoder(hf_model))
    full = RuntimeDecoder("kvcompile, all heads full", engine, engine.uncompressed_plan(), max_context)
    art = RuntimeDecoder("kvcompile artifact", engine, plan or engine.plan, max_context)
    stored = [RuntimeDecoder(f"kvcompile artifact, {storage.name}", engine,
                             with_storage(plan or engine.plan, storage), max_context)
              for storage in getattr(args, "storage", [])]
    decoders += [full, art, *stored]
    t0 = time.perf_counter()
    if hf_model is not None:
        decoders[0].prefill(ids)
    # one exact prefill feeds both kvcompile caches (same keys and values, stored twice)
    logits = engine.prefill(ids, [full.cache, art.cache, *(dec.cache for dec in stored)])
    for dec in (full, art, *stored):
        dec.prefill_logits = logits
        dec.set_logits(logits)
    print(f"[L={length}] prefill done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if onnx_engine is not None:
        t0 = time.perf_counter()
        decoders.append(OnnxDecoder(onnx_engine, max_context, engine.arch))
        decoders[-1].prefill(ids)
        diff = float((decoders[-1].prefill_logits - art.prefill_logits).abs().max())
        print(f"[L={length}] onnxruntime prefill {time.perf_counter() - t0:.1f} s; last-position "
              f"logits vs the torch runtime: max |diff| = {diff:.2e}", file=sys.stderr)
    if hf_model is not None:  # same weights, same function: the baselines must agree
        diff = float((decoders[0].prefill_logits - full.prefill_logits).abs().max())
        print(f"[L={length}] last-position logits, transformers vs kvcompile full: "
              f"max |diff| = {diff:.2e}", file=sys.stderr)
        if diff > AGREEMENT[engine.model.dtype]:
            raise SystemExit("transformers and the kvcompile runtime disagree: not the same model")
    times = time_interleaved(decoders, args.steps, args.rounds, engine.device)
    results = [Result(length, dec.name, times[dec.name], dec.kv_bytes(), dec.memory_ratio())
               for dec in decoders]
    for dec in decoders:
        dec.close()
    gc.collect()
    return results


def format_table(results: list[Result], markdown: bool) -> str:
    header = ["context", "system", "decode ms/token (median)", "mean", "KV MiB allocated",
              "time vs transformers", "memory ratio"]
    rows = []
    for res in results:
        ref = next((r for r in results if r.context == res.context and r.system.startswith("transformers")),
                   None)
        time_ratio = f"{res.median_ms / ref.median_ms:.2f}x" if ref else "-"
        kv_ratio = f"{res.memory_ratio:.3f}x"
        rows.append([str(res.context), res.system, f"{res.median_ms:.1f}", f"{res.mean_ms:.1f}",
                     f"{res.kv_bytes / MIB:.1f}", time_ratio, kv_ratio])
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if i != 1 else "---" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, type=Path,
                        help="artifact directory built by `kvcompile build`")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192],
                        help="prompt lengths in tokens (default: 2048 8192)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per system (default: 32)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleave the systems' timed steps in this many rounds (default: 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="precision of weights and KV (default: the artifact's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers baseline (kvcompile systems only)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="onnx: also time the artifact's ONNX graphs in onnxruntime (CPU)")
    parser.add_argument("--storage", nargs="*", default=[],
                        help="also time the artifact's plan with every group stored so "
                             "(e.g. k8v8 k4v4): the same slots in fewer bytes")
    args = parser.parse_args(argv)
    from kvcompile.plan import Storage

    try:
        args.storage = [Storage.parse(name) for name in args.storage]
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    args.rounds = min(args.rounds, args.steps)

    torch.set_num_threads(args.threads)
    from kvcompile.build.artifact import load_engine
    from kvcompile.models import load_model

    engine = load_engine(args.artifact, device=args.device, dtype=args.dtype)
    hf_model = None
    if not args.no_transformers:
        source = engine.manifest.source_model  # load_engine always sets the manifest
        loaded = load_model(source.source)
        if loaded.fingerprint != source.fingerprint:
            raise SystemExit(f"the artifact was built from {source.name} ({source.fingerprint[:19]}…), "
                             f"but {source.source!r} now loads a different model")
        hf_model = load_transformers_model(loaded, engine.model.dtype, engine.device)
    vocab = engine.arch.vocab_size
    onnx_engine = None
    if args.backend == "onnx":
        from kvcompile.runtime.onnx_backend import load_onnx_engine

        onnx_engine = load_onnx_engine(args.artifact, verify=False, device="cpu",
                                       threads=args.threads)
        too_long = [c for c in args.contexts if c + args.steps + 1 > onnx_engine.max_context]
        if too_long:
            parser.error(f"--contexts {too_long}: context + steps + 1 must fit the "
                         f"{onnx_engine.max_context} tokens the ONNX graphs were built for")

    import transformers
    if engine.device.type == "cuda":
        from kvcompile.runtime import kernels

        where = f"{torch.cuda.get_device_name(engine.device)}, kernels: {kernels.serving()}, " \
                f"CUDA graphs {'on' if engine.cuda_graphs else 'off'}"
    else:
        where = f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {where}, "
          f"{str(engine.model.dtype).removeprefix('torch.')}, "
          f"artifact {args.artifact} ({engine.plan.n_full} full KV heads), "
          f"steps {args.steps}, rounds {args.rounds}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results: list[Result] = []
    with torch.inference_mode():
        for length in args.contexts:
            results += run_context(length, args, engine, hf_model, vocab, onnx_engine=onnx_engine)
    print(format_table(results, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
