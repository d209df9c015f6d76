"""Constant folding: evaluate nodes whose inputs are all constants and store the results as initializers.

Exporters leave shape arithmetic (Constant -> ConstantOfShape -> Concat -> Reshape -> Pad pads...) that
hides the real structure from pattern matching (e.g. a Pad feeding a Conv) and from the quantizer.
Each foldable node is evaluated once with the ONNX reference evaluator (exact ONNX semantics).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

_NEVER_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan",
}
MAX_FOLDED_ELEMENTS = 1 << 22  # do not materialise huge constants (e.g. a folded Expand)


def _const_array(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    return None


def _evaluate(node: ir.Node, arrays: list, opset: int) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    in_names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    out_names = [f"o{k}" for k in range(len(node.outputs))]
    proto_node = ir.serde.serialize_node(node)
    n = helper.make_node(node.op_type, in_names, out_names, domain=node.domain or "")
    n.attribute.extend(proto_node.attribute)
    inputs = [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for nm, a in zip(in_names, arrays) if a is not None]
    outputs = [helper.make_tensor_value_info(nm, onnx.TensorProto.UNDEFINED, None) for nm in out_names]
    g = helper.make_graph([n], "fold", inputs, outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    feeds = {nm: a for nm, a in zip(in_names, arrays) if a is not None}
    try:
        return list(ReferenceEvaluator(m).run(None, feeds))
    except Exception:
        return None


class ConstantFoldingPass(ir.passes.InPlacePass):
    """Fold constant sub-expressions (and Constant nodes) into initializers."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import LiftConstantsToInitializersPass

        modified = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        opset = model.opset_imports.get("", 17)
        graph = model.graph
        outputs = {id(v) for v in graph.outputs}
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
                continue
            if any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
                continue
            if any(id(o) in outputs for o in node.outputs):
                continue
            arrays = [_const_array(v) if v is not None else None for v in node.inputs]
            if not node.inputs or any(a is None for a, v in zip(arrays, node.inputs) if v is not None):
                continue
            results = _evaluate(node, arrays, opset)
            if results is None or any(np.asarray(r).size > MAX_FOLDED_ELEMENTS for r in results):
                continue
            new_values = []
            for out, res in zip(node.outputs, results):
                res = np.asarray(res)
                nv = ir.Value(name=out.name + "__folded", shape=ir.Shape(res.shape),
                              type=ir.TensorType(ir.DataType.from_numpy(res.dtype)),
                              const_value=ir.tensor(res, name=out.name))
                new_values.append(nv)
                ir.convenience.replace_all_uses_with(out, nv)
            graph.remove(node, safe=True)
            for out, nv in zip(node.outputs, new_values):
                nv.name = out.name
                out.name = None
                graph.register_initializer(nv)
            modified = True
        if modified:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
