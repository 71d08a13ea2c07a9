"""ONNX graph passes: the exported source graphs -> the plan's static-budget graphs.

Built on onnx-ir's pass infrastructure (each pass says whether it changed the model and
checks its pre/postconditions) and, for the attention swap, the onnxscript rewriter.
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from kvcompile.arch import ArchSpec
from kvcompile.plan import Plan

from .attach import AttachFunctionBodies
from .permute import PermuteKVHeads
from .rewrite import RewriteDecode, RewritePrefillAttention, RewritePrefillCache
from .validate import StaticBudgetGraphError, ValidateStaticBudgetGraph

__all__ = ["AttachFunctionBodies", "PermuteKVHeads", "RewriteDecode", "RewritePrefillAttention",
           "RewritePrefillCache", "StaticBudgetGraphError", "ValidateStaticBudgetGraph",
           "static_budget_passes"]


def static_budget_passes(kind: str, plan: Plan, arch: ArchSpec,
                         max_context: int) -> list[ir.passes.PassBase]:
    """The passes that turn the ``kind`` (prefill | decode) source graph into the plan's."""
    if kind == "prefill":
        rewrites = [RewritePrefillAttention(plan), RewritePrefillCache(plan, arch, max_context)]
    elif kind == "decode":
        rewrites = [RewriteDecode(plan, arch, max_context)]
    else:
        raise ValueError(f"unknown graph kind {kind!r}")
    return [PermuteKVHeads(plan, arch), *rewrites, RemoveUnusedNodesPass(),
            TopologicalSortPass(), AttachFunctionBodies(),
            ValidateStaticBudgetGraph(plan, arch, max_context, kind)]
