"""Import first in a kernel test: without a GPU the Triton kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, read when the kernels are decorated, so set before they are imported)
on CPU tensors; with one, compiled, on CUDA."""
from __future__ import annotations

import os
import platform

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if platform.system() == "Linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  a dependency on this platform: missing must fail, not skip
else:
    pytest.importorskip("triton")

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

