"""The quantized cache's ONNX function bodies against the torch references, one node at a time.

References: ``runtime/quant.py`` (quantize, exact: codes and float16 scales bit for bit) and
``runtime/quant_ops.py`` (``quantized_append``, exact; ``quantized_attention``, float32 noise).
onnxruntime runs each node's attached body with nothing registered.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcompile.plan import Storage
from kvcompile.runtime.quant import Quantized, quantize_keys, quantize_values
from kvcompile.runtime.quant_cache import QuantizedFullBuffer
from kvcompile.runtime.quant_ops import quantized_append, quantized_attention
from tests.test_onnx_graphs import run_op  # one kvcompile node and its body in onnxruntime

STORAGES = (Storage(8, 8, 4), Storage(4, 2, 4), Storage(2, 2, 3), Storage(8, 4, 5))


def _attributes(storage: Storage) -> dict:
    return {"key_bits": storage.key_bits, "value_bits": storage.value_bits,
            "group": storage.group}


def _as_numpy(q: Quantized) -> list[np.ndarray]:
    return [q.codes.numpy(), q.scale.numpy(), q.zero.numpy()]


@pytest.mark.parametrize("storage", STORAGES)
def test_quantize_body_equals_the_torch_quantizer(storage: Storage) -> None:
    """Rows holding different numbers of tokens (none, a partial group, all): the held tokens'
    codes and float16 scales bit for bit, zeros after them (an empty buffer's). Head dim 6
    leaves a partial channel group and a partial last byte for every width but 8."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 4, 2, 11, 6
    k, v = torch.randn(b, h, n, d, generator=gen) * 3, torch.randn(b, h, n, d, generator=gen)
    k[..., 1] += 40  # an outlier channel
    v[2, 1, 4] = 0.5  # a constant value group: scale 0
    lengths = np.array([0, 5, n, 8])
    found = run_op("QuantizeKV", "", [k.numpy(), v.numpy(), lengths], _attributes(storage), 6)
    for row, length in enumerate(lengths):
        keys = np.zeros_like(found[0][row]), np.zeros_like(found[1][row]), np.zeros_like(found[2][row])
        values = [np.zeros_like(found[i][row]) for i in (3, 4, 5)]
        if length:
            qk = quantize_keys(k[row:row + 1, :, :length], storage.key_bits, storage.group)
            qv = quantize_values(v[row:row + 1, :, :length], storage.value_bits, storage.group)
            for dst, src in zip((*keys, *values), (*_as_numpy(qk), *_as_numpy(qv)), strict=True):
                dst[:, :src.shape[2]] = src[0]
        for index, want in enumerate((*keys, *values)):
            assert found[index].dtype == want.dtype
            np.testing.assert_array_equal(found[index][row], want, err_msg=f"row {row} out {index}")


@pytest.mark.parametrize("storage", STORAGES)
def test_append_body_equals_the_torch_op_across_flushes(storage: Storage) -> None:
    """Rows out of step (row 1 ahead by two tokens) appended past several flushes and up to
    the body's last group: every state tensor equal after every step."""
    gen = torch.Generator().manual_seed(1)
    b, h, d, context = 2, 2, 6, 4 * storage.group + 1
    buffer = QuantizedFullBuffer.empty(b, h, context, d, storage)
    for _ in range(2):
        new = torch.randn(1, h, 1, d, generator=gen)
        buffer.rows(1, 2).write(new, new)

    def state() -> list[np.ndarray]:
        return [*_as_numpy(buffer.keys), *_as_numpy(buffer.values), buffer.k_res.numpy(),
                buffer.v_res.numpy()]

    found = [t.copy() for t in state()]
    for _ in range(context - 1):
        k_new, v_new = torch.randn(b, h, 1, d, generator=gen), torch.randn(b, h, 1, d, generator=gen)
        length = buffer.length.numpy().copy()
        found = run_op("QuantizedAppend", "", [*found, length, k_new.numpy(), v_new.numpy()],
                       _attributes(storage), 8)
        quantized_append(buffer.keys, buffer.values, buffer.k_res, buffer.v_res, buffer.length,
                         k_new, v_new, key_bits=storage.key_bits, value_bits=storage.value_bits,
                         group=storage.group)
        for index, (got, want) in enumerate(zip(found, state(), strict=True)):
            np.testing.assert_array_equal(got, want, err_msg=f"length {length} out {index}")
    assert buffer.length.min() == 4 * storage.group  # four flushes in every row, row 1 past the body


@pytest.mark.parametrize("storage", STORAGES[:2])
@pytest.mark.parametrize("overload", ["length", "bias"])
def test_attention_body_equals_the_torch_op(storage: Storage, overload: str) -> None:
    """GQA, rows holding different numbers of codes (one none) and full-precision slots
    (a masked slot, a compensation-like bias); float32 noise only (1e-6)."""
    gen = torch.Generator().manual_seed(2)
    b, hkv, g, slots, n_fp, d = 3, 2, 3, 10, 5, 6
    keys = quantize_keys(torch.randn(b, hkv, slots, d, generator=gen) * 2, storage.key_bits,
                         storage.group)
    values = quantize_values(torch.randn(b, hkv, slots, d, generator=gen), storage.value_bits,
                             storage.group)
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    k_fp, v_fp = torch.randn(b, hkv, n_fp, d, generator=gen), torch.randn(b, hkv, n_fp, d, generator=gen)
    q_length = torch.tensor([7, 0, 10])
    fp_bias = fp_length = None
    if overload == "bias":
        fp_bias = torch.zeros(b, hkv, n_fp)
        fp_bias[:, :, 2], fp_bias[:, 1, 0] = float("-inf"), 1.7
    else:
        fp_length = torch.tensor([3, 5, 0])
    expected = quantized_attention(q, keys, values, q_length, k_fp, v_fp, fp_bias=fp_bias,
                                   fp_length=fp_length, key_bits=storage.key_bits,
                                   value_bits=storage.value_bits, group=storage.group, scale=0.4)
    inputs = [q.numpy(), *_as_numpy(keys), *_as_numpy(values), q_length.numpy(), k_fp.numpy(),
              v_fp.numpy(), None if fp_bias is None else fp_bias.numpy(),
              None if fp_length is None else fp_length.numpy()]
    found = run_op("QuantizedAttention", overload, inputs, {**_attributes(storage), "scale": 0.4},
                   1)[0]
    np.testing.assert_allclose(found, expected.numpy(), atol=1e-6, rtol=0)
    inputs[7] = np.zeros(b, dtype=np.int64)  # control: the codes are attended to
    without = run_op("QuantizedAttention", overload, inputs, {**_attributes(storage), "scale": 0.4},
                     1)[0]
    assert np.abs(without[0] - found[0]).max() > 1e-2
