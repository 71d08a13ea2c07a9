"""Compile passes: ``compile_model`` (torch: the head permutation) and ``passes.onnx``."""
from kvcompile.passes.permute import (
    ATTENTION_NAME,
    PASSES,
    CompiledModel,
    check_plan,
    compile_model,
)

__all__ = ["ATTENTION_NAME", "PASSES", "CompiledModel", "check_plan", "compile_model"]
