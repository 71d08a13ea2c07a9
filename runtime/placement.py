"""Where and in what precision the runtime serves: ``--device`` and ``--dtype`` resolved once.

One place turns the names users type into torch objects and refuses what this machine
cannot do (a CUDA device without a GPU), with one line saying what to do instead.
"""
from __future__ import annotations

import torch

from kvcompile.errors import KVCompileError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")


class PlacementError(KVCompileError):
    """A device or dtype this machine or artifact cannot serve."""


def resolve_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype) -> torch dtype."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise PlacementError(f"dtype {name} is not served; use one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise PlacementError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> torch device; CUDA must really be there."""
    try:
        device = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise PlacementError(f"unsupported device {str(name)!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError("--device cuda: no CUDA GPU is available to torch on this machine "
                                 "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PlacementError(f"--device {device}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
    return device
