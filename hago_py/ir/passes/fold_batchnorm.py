"""Fold BatchNormalization (inference mode) into the preceding Conv / Gemm / MatMul.

y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
  = (W * s) x + (b - mean) * s + beta,     s = gamma / sqrt(var + eps)   (per output channel)
Quantizing the folded weights is what the deployed kernel computes; quantizing before folding would
quantize a tensor that never exists at run time.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._util import attr, const_array, new_initializer, single_consumer


class FoldBatchNormPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            if len([o for o in bn.outputs if o is not None and o.uses()]) > 1 or attr(bn, "training_mode", 0):
                continue
            x = bn.inputs[0]
            prod = x.producer() if x is not None else None
            if prod is None or single_consumer(x) is not bn:
                continue
            params = [const_array(v) for v in bn.inputs[1:5]]
            if any(p is None for p in params):
                continue
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            eps = float(attr(bn, "epsilon", 1e-5))
            s = gamma / np.sqrt(var + eps)
            shift = beta - mean * s
            if prod.op_type == "Conv":
                w = const_array(prod.inputs[1])
                if w is None:
                    continue
                b = const_array(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2] is not None else None
                w_new = w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))
            elif prod.op_type in ("Gemm", "MatMul"):
                w = const_array(prod.inputs[1])
                if w is None or w.ndim != 2:
                    continue
                trans_b = prod.op_type == "Gemm" and attr(prod, "transB", 0)
                if prod.op_type == "Gemm" and (attr(prod, "alpha", 1.0) != 1.0 or attr(prod, "beta", 1.0) != 1.0):
                    continue
                b = const_array(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2] is not None else None
                w_new = w.astype(np.float64) * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
                if prod.op_type == "MatMul":
                    # MatMul has no bias input: turn it into Gemm(transB=0) so the shift has a home
                    # only when the input is 2-D; otherwise leave the BN alone.
                    if x.shape is None or len(x.shape) != 2:
                        continue
            else:
                continue
            b_new = (b.astype(np.float64) * s if b is not None else 0.0) + shift
            w_val = new_initializer(graph, (prod.inputs[1].name or "w") + "_bnfolded", w_new.astype(np.float32))
            b_val = new_initializer(graph, (prod.name or "node") + "_bias_bnfolded", b_new.astype(np.float32))
            if prod.op_type == "MatMul":
                gemm = ir.Node("", "Gemm", [prod.inputs[0], w_val, b_val], name=prod.name, num_outputs=1)
                graph.insert_before(prod, gemm)
                ir.convenience.replace_all_uses_with(bn.outputs[0], gemm.outputs[0], replace_graph_outputs=True)
                gemm.outputs[0].name = bn.outputs[0].name
                graph.remove([bn, prod], safe=False)
            else:
                prod.replace_input_with(1, w_val)
                if len(prod.inputs) > 2:
                    prod.replace_input_with(2, b_val)
                else:
                    prod.resize_inputs(3)
                    prod.replace_input_with(2, b_val)
                out_name = bn.outputs[0].name
                ir.convenience.replace_all_uses_with(bn.outputs[0], prod.outputs[0], replace_graph_outputs=True)
                graph.remove(bn, safe=False)
                if prod.outputs[0].is_graph_output():
                    prod.outputs[0].name = out_name
            modified = True
        if modified:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
