"""Attach the reference body of every ``kvcompile`` node as a model-local function.

With the bodies attached, onnxruntime with nothing registered inlines and runs every
``kvcompile`` node; a kernel registered for the op later wins over its body. Bodies are in
the model's default-domain opset (``onnx_io.OPSET``), one per (op, overload) in use.
"""
from __future__ import annotations

import onnx_ir as ir

from kvcompile.runtime import onnx_io

from .functions import function_for

MIN_IR_VERSION = 10  # function overloads


def kvcompile_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == onnx_io.DOMAIN]


class AttachFunctionBodies(ir.passes.InPlacePass):
    """One model-local ``FunctionProto`` per ``(kvcompile op, overload)`` the graph uses."""

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("") != onnx_io.OPSET:
            raise ir.passes.PreconditionError(
                f"the model's default opset is {model.opset_imports.get('')}, the bodies' is "
                f"{onnx_io.OPSET}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for op_type, overload in sorted({(node.op_type, node.overload)
                                         for node in kvcompile_nodes(model)}):
            if (onnx_io.DOMAIN, op_type, overload) not in model.functions:
                function = function_for(op_type, overload)
                model.functions[function.identifier()] = function
                modified = True
        if modified:
            model.opset_imports[onnx_io.DOMAIN] = onnx_io.DOMAIN_VERSION
            model.ir_version = max(model.ir_version, MIN_IR_VERSION)
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in kvcompile_nodes(model):
            if (node.domain, node.op_type, node.overload) not in model.functions:
                raise ir.passes.PostconditionError(f"{node.op_type} ({node.overload}) has no body")
