"""Fold Gemm's ``alpha`` into its constant weight and ``beta`` into its constant bias.

Y = alpha * A @ B + beta * C equals A @ (alpha * B) + (beta * C): with B and C constant the scalars cost
nothing, and the Gemm becomes the plain form the integer kernels (QGemm) take. A weight or bias shared with
another node gets a scaled copy, never an in-place change.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._util import attr, const_array, new_initializer


class FoldGemmScalarsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
                continue
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            if alpha == 1.0 and beta == 1.0:
                continue
            has_c = len(node.inputs) > 2 and node.inputs[2] is not None
            b = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            c = const_array(node.inputs[2]) if has_c else None
            if b is None or (has_c and beta != 1.0 and c is None) or not np.isfinite([alpha, beta]).all():
                continue
            if alpha != 1.0:
                node.replace_input_with(1, new_initializer(graph, f"{node.inputs[1].name or 'B'}_alpha",
                                                           (b * np.asarray(alpha, b.dtype)).astype(b.dtype)))
            if has_c and beta != 1.0:
                node.replace_input_with(2, new_initializer(graph, f"{node.inputs[2].name or 'C'}_beta",
                                                           (c * np.asarray(beta, c.dtype)).astype(c.dtype)))
            node.attributes.pop("alpha", None)
            node.attributes.pop("beta", None)
            modified = True
        return ir.passes.PassResult(model, modified=modified)
