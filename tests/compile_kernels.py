"""Compile the Triton kernels ahead of time for a Hopper GPU (sm_90), without a GPU.

Run by ``tests/test_kernels.py`` in a subprocess (the interpreter must be off when the kernels
module is imported): Triton's own compiler and the ptxas it ships turn every kernel variant the
runtime launches into a cubin, which catches what the interpreter forgives (types, ``tl.dot``
shapes, lowering). Prints, per variant, facts about the machine code as JSON: PTX instruction
counts, shared memory, registers and local memory (register spills). Arguments are specialised
as Triton's JIT specialises the runtime's calls (unit strides, 16-aligned pointers).
:func:`problems` states what those facts must show; importing this module compiles nothing and
leaves ``TRITON_INTERPRET`` alone, so the test can check that rule on synthetic PTX too.

    python -m tests.compile_kernels               # the budgeted kernels
    python -m tests.compile_kernels --quantized   # the quantized cache's kernels
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

INSTRUCTIONS = ("div.rn.f32", "div.full.f32", "div.approx.f32", "fma.rn.f32", "mul.rn.f32",
                "bar.sync", "mma.sync", "cvt.rn.bf16.f32", "ex2.approx.f32")
# every tensor-core product: mma.sync (Ampere style) and wgmma.mma_async (Hopper)
TENSOR_CORE = re.compile(r"(?<![\w.])(?:mma|wgmma\.mma_async)\.")


def instruction_facts(ptx: str) -> dict[str, int]:
    """Counts of the instructions the checks read, from one variant's PTX."""
    facts = {op: len(re.findall(re.escape(op) + r"\b", ptx)) for op in INSTRUCTIONS}
    facts["mma"] = len(TENSOR_CORE.findall(ptx))
    facts["cp.async"] = len(re.findall(r"cp\.async\.", ptx))  # loads pipelined through shared
    # the quantized append's round-half-to-even: y + 1.5 * 2^23 - 1.5 * 2^23, both adds kept
    facts["round add"] = len(re.findall(r"add\.rn\.f32\s[^;]*0f[4C]B400000;", ptx))
    return facts


def problems(facts: dict[str, dict]) -> list[str]:
    """What is wrong with the compiled variants (empty: nothing). No variant spills registers;
    the update's fold keeps the reference's roundings (IEEE division, no FMA, a barrier between
    its reads and writes); decode attention pipelines its K/V loads through shared memory
    (cp.async); half-precision decode runs its products on tensor cores, and an fp32 variant
    runs none there (a tensor-core product of fp32 inputs is tf32: 10 mantissa bits)."""
    found = []
    for name, fact in facts.items():
        if fact["local_bytes"] != 0:
            found.append(f"{name}: {fact['local_bytes']} B of spilled registers")
        if "fp32" in name and fact["mma"] != 0:
            found.append(f"{name}: {fact['mma']} tensor-core products (tf32) in an fp32 variant")
        if name.startswith(("cache update", "quantized append")):
            if fact["div.rn.f32"] == 0 or (name.startswith("cache") and fact["bar.sync"] == 0):
                found.append(f"{name}: no IEEE division or no barrier")
            if fact["fma.rn.f32"] or fact["div.full.f32"] or fact["div.approx.f32"]:
                found.append(f"{name}: FMA or approximate division in the fold")
            if name.startswith("quantized") and fact["round add"] == 0:
                found.append(f"{name}: the rounding's magic-number adds were folded away")
        elif name.startswith("quantized attention"):  # dequantized in registers: no cp.async
            if "fp32" not in name and fact["mma"] == 0:
                found.append(f"{name}: half-precision products not on tensor cores")
        elif "decode" in name:
            if fact["cp.async"] == 0:
                found.append(f"{name}: K/V loads not pipelined (no cp.async)")
            if "fp32" not in name and fact["mma"] == 0:
                found.append(f"{name}: half-precision products not on tensor cores")
    return found


OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
UNIT_STRIDES = re.compile(r"stride_(q|k|v|o|kn|vn|kf|vf|kr|vr|ks)d|stride_bias_s|stride_cc|"
                          r"stride_(kc|vc)c|stride_vsg")
# value scales per token hold ceil(d / group) entries (4 at d 128, group 32): unaligned strides
UNALIGNED_INTS = re.compile(r"stride_bias_[bh]|stride_cb|n_slots|n_kv_heads|n_heads|n_splits|"
                            r"sinks|compensation|selected|window|stride_vs[bhs]|n_codes|n_fp|"
                            r"n_groups")


def _specialize(kernel, constexprs: dict) -> tuple[dict, dict]:
    """What Triton's JIT specializes on for a contiguous ``[B, H, S, D]`` layout with D a
    multiple of 16: last-dim strides equal to 1 become constants, pointers (torch allocations)
    and the other strides are multiples of 16. Sizes that vary (capacity, heads, layout) get no
    hint. Returns extra constexprs and the divisibility attributes."""
    units, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            continue
        if UNIT_STRIDES.fullmatch(name):
            units[name] = 1
        elif name.endswith("_ptr") or (name.startswith("stride_") or name == "split_slots") \
                and not UNALIGNED_INTS.fullmatch(name):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return units, attrs


def _compile(kernel, pointers: dict[str, str], config: dict, **constexprs) -> dict:
    """One variant, with the launcher's own ``config`` and the JIT's specializations: integer
    arguments are i32 (as the launcher passes them), ``scale`` fp32."""
    constexprs = {**{k: v for k, v in config.items() if k not in OPTIONS}, **constexprs}
    units, attrs = _specialize(kernel, constexprs)
    constexprs.update(units)
    options = {k: v for k, v in config.items() if k in OPTIONS}
    signature = {name: pointers.get(name, "fp32" if name == "scale" else "i32")
                 for name in kernel.arg_names}
    for name in constexprs:
        signature[name] = "constexpr"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)  # Hopper
    backend = triton.compiler.make_backend(target)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target,
                              options=backend.parse_options(options).__dict__)
    facts: dict = instruction_facts(compiled.asm["ptx"])
    facts["shared_bytes"] = compiled.metadata.shared
    facts.update(_resources(compiled.asm["cubin"]))
    return facts


def _resources(cubin: bytes) -> dict[str, int | None]:
    """Registers per thread and local memory (spilled registers) of the cubin, read by the
    cuobjdump Triton ships; None where it is missing."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {"registers": None, "local_bytes": None}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvcompile-{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        usage = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
    finally:
        path.unlink()
    found = {key: re.search(rf"{key}:(\d+)", usage) for key in ("REG", "LOCAL")}
    return {"registers": int(found["REG"].group(1)) if found["REG"] else None,
            "local_bytes": int(found["LOCAL"].group(1)) if found["LOCAL"] else None}


def variants() -> dict[str, dict]:
    """The variants the runtime launches (bf16 and fp32; head dim 64 and 128; group 3)."""
    import torch

    from kvcompile.runtime import triton_kernels as tk  # compiled: the interpreter must be off

    out = {}
    for dtype, name, head_dim in ((torch.bfloat16, "bf16", 64), (torch.bfloat16, "bf16", 128),
                                  (torch.float32, "fp32", 64)):
        io = {arg: f"*{name}" for arg in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        attention = tk.attention_config(dtype, 3, head_dim)
        out[f"budgeted decode {name} d{head_dim}"] = _compile(
            tk._grouped_decode_kernel, {**io, "bias_ptr": "*fp32"}, attention,
            HAS_BIAS=True, HAS_LENGTH=False, length_ptr=None)
        partials = {arg: "*fp32" for arg in ("part_m_ptr", "part_l_ptr", "part_acc_ptr")}
        out[f"split-K decode {name} d{head_dim}"] = _compile(
            tk._split_decode_kernel, {**io, **partials, "length_ptr": "*i64"}, attention,
            HAS_BIAS=False, HAS_LENGTH=True, bias_ptr=None)
        out[f"combine {name} d{head_dim}"] = _compile(
            tk._combine_splits_kernel, {**partials, "out_ptr": f"*{name}", "length_ptr": "*i64"},
            tk.combine_config(3, head_dim, 64), HAS_LENGTH=True)
        update = {arg: f"*{name}" for arg in ("k_ptr", "v_ptr", "k_new_ptr", "v_new_ptr")}
        out[f"cache update {name} d{head_dim}"] = _compile(
            tk._cache_update_kernel, {**update, "bias_ptr": "*fp32", "counters_ptr": "*i64"},
            tk.update_config(3, head_dim))
    return out


def quantized_variants() -> dict[str, dict]:
    """The quantized cache's variants: decode attention (one program and split-K) and the
    append, for k4v4 / k2v2 bf16 at head dim 128 and k8v8 fp32 at 64 (query group 4)."""
    import torch

    from kvcompile.runtime import triton_quant as tq  # compiled: the interpreter must be off

    codes = {arg: "*u8" for arg in ("kc_ptr", "vc_ptr")}
    scales = {arg: "*fp16" for arg in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")}
    partials = {arg: "*fp32" for arg in ("part_m_ptr", "part_l_ptr", "part_acc_ptr")}
    out = {}
    for dtype, name, head_dim, key_bits, value_bits, group in (
            (torch.bfloat16, "bf16", 128, 4, 4, 32), (torch.bfloat16, "bf16", 128, 2, 2, 128),
            (torch.float32, "fp32", 64, 8, 8, 32)):
        tag = f"{name} d{head_dim} k{key_bits}v{value_bits} g{group}"
        io = {arg: f"*{name}" for arg in ("q_ptr", "kf_ptr", "vf_ptr", "out_ptr")}
        bits = dict(KEY_BITS=key_bits, VALUE_BITS=value_bits, QUANT_GROUP=group)
        attention = tq.quantized_attention_config(dtype, 4, head_dim)
        out[f"quantized attention one program {tag}"] = _compile(
            tq._quantized_decode_kernel, {**io, **codes, **scales, "q_length_ptr": "*i64",
                                          "fp_bias_ptr": "*fp32", "part_m_ptr": f"*{name}",
                                          "part_l_ptr": f"*{name}", "part_acc_ptr": f"*{name}"},
            attention, **bits, HAS_BIAS=True, HAS_FP_LENGTH=False, SPLIT=False,
            fp_length_ptr=None)
        out[f"quantized attention split-K {tag}"] = _compile(
            tq._quantized_decode_kernel, {**io, **codes, **scales, **partials,
                                          "q_length_ptr": "*i64", "fp_length_ptr": "*i64"},
            attention, **bits, HAS_BIAS=False, HAS_FP_LENGTH=True, SPLIT=True, fp_bias_ptr=None)
        ring = {arg: f"*{name}" for arg in ("kr_ptr", "vr_ptr", "kn_ptr", "vn_ptr")}
        out[f"quantized append {tag}"] = _compile(
            tq._quantized_append_kernel, {**codes, **scales, **ring, "length_ptr": "*i64"},
            tq.append_config(group, head_dim), KEY_BITS=key_bits, VALUE_BITS=value_bits)
    return out


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # read when the kernels module is imported
    json.dump(quantized_variants() if "--quantized" in sys.argv[1:] else variants(), sys.stdout)
