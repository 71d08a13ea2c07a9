"""ONNX graph passes: the exported source graphs -> the plan's static-budget graphs.

Built on onnx-ir's pass infrastructure (each pass says whether it changed the model and
checks its pre/postconditions, and onnx-ir's ``PassManager`` runs them) and, for the
attention swap, the onnxscript rewriter.
"""
from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from kvcompile.arch import ArchSpec
from kvcompile.plan import Plan

from .attach import AttachFunctionBodies
from .permute import PermuteKVHeads
from .rewrite import RewriteDecode, RewritePrefillAttention, RewritePrefillCache
from .validate import StaticBudgetGraphError, ValidateStaticBudgetGraph

__all__ = ["AttachFunctionBodies", "PassFailed", "PermuteKVHeads", "RewriteDecode",
           "RewritePrefillAttention", "RewritePrefillCache", "StaticBudgetGraphError",
           "ValidateStaticBudgetGraph", "run_static_budget_passes", "static_budget_passes"]


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


class PassFailed(Exception):
    """A pass refused the graph (a pre/postcondition or a ``PassError``): which pass, and the
    reason it gave, unwrapped from the two ``PassError`` layers the ``PassManager`` adds."""

    def __init__(self, pass_name: str, reason: BaseException) -> None:
        super().__init__(f"{pass_name}: {reason}")
        self.pass_name = pass_name
        self.reason = reason


class _Logged(ir.passes.PassBase):
    """One pass, run as is, whose result is logged: the build report lists whether each pass
    changed the graph, which the ``PassManager`` only reports for all of them together."""

    def __init__(self, inner: ir.passes.PassBase, log: list[dict[str, Any]]) -> None:
        self.inner = inner
        self.log = log

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        name = type(self.inner).__name__
        try:
            result = self.inner(model)
        except (ir.passes.PassError, ir.passes.InvariantError) as exc:
            raise PassFailed(name, exc.__cause__ or exc) from exc
        self.log.append({"pass": name, "modified": result.modified})
        return result


def run_static_budget_passes(model: ir.Model, kind: str, plan: Plan, arch: ArchSpec,
                             max_context: int) -> list[dict[str, Any]]:
    """Rewrite the ``kind`` source graph ``model`` in place for ``plan`` under onnx-ir's
    ``PassManager``; returns each pass and whether it changed the graph.

    A pass that refuses the graph raises :class:`PassFailed`; anything else a pass raises
    (a bug) propagates as the pass raised it.
    """
    log: list[dict[str, Any]] = []
    passes = static_budget_passes(kind, plan, arch, max_context)
    manager = ir.passes.PassManager([_Logged(p, log) for p in passes], steps=1)
    failure: BaseException | None = None
    try:
        manager(model)
    except ir.passes.PassError as exc:
        failure = exc
        while isinstance(failure, ir.passes.PassError) and failure.__cause__ is not None:
            failure = failure.__cause__  # the manager wraps what the pass raised: step, then pass
    if failure is not None:
        raise failure  # as the pass raised it (PassFailed, or a bug), with its own cause
    return log
