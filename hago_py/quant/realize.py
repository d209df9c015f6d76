"""realize(model, plan) -> QDQ ONNX model that ONNX Runtime fuses into integer kernels.

* Static layers: weights become integer initializers + DequantizeLinear (per-channel axis where planned);
  biases become int32 initializers with scale = s_x * s_w (what QLinearConv / QGemm consume); every
  planned activation gets QuantizeLinear -> DequantizeLinear right after its producer.
* Dynamic layers (MatMul/Gemm): DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq) -> Cast -> Mul(s_x*s_w)
  (+ bias), the pattern ORT fuses into DynamicQuantizeMatMul.
The same graph is both the simulation (ORT basic optimization keeps Q/DQ as float ops) and the
deployment (ORT full optimization fuses them), so accuracy is always measured on the deployed graph.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..errors import ModelError
from ..ir.io import to_ir, to_proto, without_value_info
from ..ir.passes._util import const_array, new_initializer
from .plan import QuantPlan, TensorQuant
from .weights import quantize_weight

_NP = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32, "int16": np.int16, "uint16": np.uint16}


def _int_array(q: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in ("int4", "uint4"):
        import ml_dtypes

        return q.astype(ml_dtypes.int4 if dtype == "int4" else ml_dtypes.uint4)
    return q.astype(_NP[dtype])


def _qparam_values(graph: ir.Graph, base: str, tq: TensorQuant, cache: Dict):
    key = (tq.dtype, tuple(tq.scale), tuple(tq.zero_point))
    if key in cache:
        return cache[key]
    per_channel = tq.granularity == "per_channel" and len(tq.scale) > 1
    scale = np.asarray(tq.scale, np.float32) if per_channel else np.asarray(tq.scale[0], np.float32)
    zp = np.asarray(tq.zero_point) if per_channel else np.asarray(tq.zero_point[0])
    s_val = new_initializer(graph, base + "_scale", scale)
    z_val = new_initializer(graph, base + "_zero_point", _int_array(zp, tq.dtype))
    cache[key] = (s_val, z_val)
    return s_val, z_val


def realize(model: onnx.ModelProto, plan: QuantPlan, *, weights: Optional[Dict[str, np.ndarray]] = None
            ) -> onnx.ModelProto:
    """Build the QDQ model. ``weights`` may hold pre-rounded integer weights per layer (from a rounding
    method that needs data); otherwise each weight is rounded here with the plan's rounding scheme."""
    if any(lp.weight is not None and lp.weight.dtype in ("int4", "uint4") for lp in plan.quantized_layers()):
        from ..ir.io import upgrade_opset

        model = upgrade_opset(model, 21, "the model (int4 weights need DequantizeLinear-21)")
    m = to_ir(model)
    graph = m.graph
    nodes = {n.name: n for n in graph}
    qcache: Dict = {}
    weights = weights or {}

    # 1. weights (+ bias) of static and dynamic weighted layers
    for lp in plan.quantized_layers():
        if lp.weight is None:
            continue
        node = nodes.get(lp.node)
        if node is None:
            raise ModelError(f"plan names node '{lp.node}' which is not in the model; the plan was made for "
                             "another model (check plan.model_digest)")
        w_val = node.inputs[1]
        w = const_array(w_val)
        tq = lp.weight
        q = weights.get(lp.node)
        if q is None:
            q = quantize_weight(w, tq)
        dynamic = plan.activations.get(lp.inputs[0]) is not None and plan.activations[lp.inputs[0]].mode == "dynamic"
        if dynamic:
            _realize_dynamic(graph, node, lp, q, plan.activations[lp.inputs[0]], qcache)
            continue
        wq = new_initializer(graph, f"{w_val.name}_quantized", _int_array(q, tq.dtype))
        s_val, z_val = _qparam_values(graph, f"{w_val.name}", tq, {})
        attrs = {"axis": ir.AttrInt64("axis", int(tq.axis))} if tq.granularity == "per_channel" and len(tq.scale) > 1 else {}
        dq = ir.Node("", "DequantizeLinear", [wq, s_val, z_val], attributes=attrs,
                     name=f"{lp.node}/weight_dq", num_outputs=1)
        dq.outputs[0].name = f"{w_val.name}_dequantized"
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        # bias -> int32 with scale s_x * s_w (only when the input scale is static and known)
        if lp.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_array(node.inputs[2])
            x_tq = plan.resolve(lp.inputs[0]) if lp.inputs and lp.inputs[0] in plan.activations else None
            if b is not None and x_tq is not None and x_tq.scale is not None:
                bs = (np.float64(x_tq.scale[0]) * np.asarray(tq.scale, np.float64)).astype(np.float32)
                bs = np.broadcast_to(bs, b.shape) if bs.size == 1 else bs
                bq = np.clip(np.rint(b.astype(np.float64) / bs), -2**31, 2**31 - 1).astype(np.int32)
                bq_val = new_initializer(graph, f"{node.inputs[2].name}_quantized", bq)
                bs_val = new_initializer(graph, f"{node.inputs[2].name}_scale", bs.astype(np.float32))
                bz_val = new_initializer(graph, f"{node.inputs[2].name}_zero_point", np.zeros(b.shape, np.int32))
                bdq = ir.Node("", "DequantizeLinear", [bq_val, bs_val, bz_val],
                              attributes={"axis": ir.AttrInt64("axis", 0)}, name=f"{lp.node}/bias_dq",
                              num_outputs=1)
                bdq.outputs[0].name = f"{node.inputs[2].name}_dequantized"
                graph.insert_before(node, bdq)
                node.replace_input_with(2, bdq.outputs[0])

    # 2. static activations: Q -> DQ after the producer
    values = _values_by_name(graph)
    for name, tq in plan.activations.items():
        if tq.mode != "static":
            continue
        tq_eff = plan.resolve(name)
        if tq_eff.scale is None:
            raise ModelError(f"tensor '{name}' has no calibrated scale in the plan; run calibrate first")
        v = values.get(name)
        if v is None:
            raise ModelError(f"plan quantizes tensor '{name}' which is not in the model")
        users = [(u.node, u.idx) for u in v.uses()]
        s_val, z_val = _qparam_values(graph, name, TensorQuant(tensor=name, dtype=tq_eff.dtype,
                                                               scale=tq_eff.scale, zero_point=tq_eff.zero_point),
                                      {})
        q = ir.Node("", "QuantizeLinear", [v, s_val, z_val], name=f"{name}/quantize", num_outputs=1)
        q.outputs[0].name = f"{name}_quantized"
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{name}/dequantize",
                     num_outputs=1)
        dq.outputs[0].name = f"{name}_dequantized"
        prod = v.producer()
        if prod is not None:
            graph.insert_after(prod, [q, dq])
        else:
            first = next(iter(graph))
            graph.insert_before(first, [q, dq])
        for user, idx in users:
            user.replace_input_with(idx, dq.outputs[0])

    m.graph.sort()
    RemoveUnusedNodesPass()(m)
    out = to_proto(m)
    out.producer_name = "hago_py"
    # The artifact carries no intermediate shape annotations (the prepared graph is shape-inferred; exported
    # models usually are not). With them ORT 1.32 proves the residual Add's operands equal in shape and fuses
    # Add + LayerNormalization into SkipLayerNormalization, which is slower on this CPU (MiniLM-L6 W8 dynamic:
    # 15.7 -> 14.1 ms without it, same run, 1 thread); the FP32 model gets no such fusion. Without them ORT
    # optimizes the quantized model the way it optimizes the FP32 input.
    return without_value_info(out)


def _values_by_name(graph: ir.Graph) -> Dict[str, ir.Value]:
    vals = {v.name: v for v in graph.inputs}
    for n in graph:
        for o in n.outputs:
            if o.name:
                vals[o.name] = o
    return vals


def _realize_dynamic(graph: ir.Graph, node: ir.Node, lp, q: np.ndarray, x_tq: TensorQuant, cache: Dict) -> None:
    """MatMul / Gemm with dynamic activations -> DynamicQuantizeLinear + MatMulInteger + rescale."""
    tq = lp.weight
    x = node.inputs[0]
    if node.op_type == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values()):
        q = q.T  # MatMulInteger wants [K, N]
    key = ("dql", x.name)
    if key not in cache:
        dql = ir.Node("", "DynamicQuantizeLinear", [x], name=f"{x.name}/dynamic_quantize", num_outputs=3)
        for o, suf in zip(dql.outputs, ("_quantized", "_scale", "_zero_point")):
            o.name = f"{x.name}{suf}"
        graph.insert_before(node, dql)
        cache[key] = dql
    dql = cache[key]
    wq = new_initializer(graph, f"{node.inputs[1].name}_quantized", _int_array(q, tq.dtype))
    per_channel = tq.granularity == "per_channel" and len(tq.scale) > 1
    wz = new_initializer(graph, f"{node.inputs[1].name}_zero_point",
                         _int_array(np.asarray(tq.zero_point if per_channel else tq.zero_point[0]), tq.dtype))
    ws = new_initializer(graph, f"{node.inputs[1].name}_scale",
                         np.asarray(tq.scale if per_channel else tq.scale[0], np.float32))
    mmi = ir.Node("", "MatMulInteger", [dql.outputs[0], wq, dql.outputs[2], wz], name=f"{node.name}/matmul_integer",
                  num_outputs=1)
    cast = ir.Node("", "Cast", mmi.outputs, attributes={"to": ir.AttrInt64("to", int(ir.DataType.FLOAT))},
                   name=f"{node.name}/cast", num_outputs=1)
    sc = ir.Node("", "Mul", [dql.outputs[1], ws], name=f"{node.name}/scale", num_outputs=1)
    mul = ir.Node("", "Mul", [cast.outputs[0], sc.outputs[0]], name=f"{node.name}/rescale", num_outputs=1)
    new_nodes = [mmi, cast, sc, mul]
    out_v = mul.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        add = ir.Node("", "Add", [out_v, node.inputs[2]], name=f"{node.name}/bias", num_outputs=1)
        new_nodes.append(add)
        out_v = add.outputs[0]
    for i, n in enumerate(new_nodes):
        n.outputs[0].name = f"{node.name}/dyn_{i}"
    graph.insert_before(node, new_nodes)
    old = node.outputs[0]
    name = old.name
    ir.convenience.replace_all_uses_with(old, out_v, replace_graph_outputs=True)
    graph.remove(node, safe=False)
    old.name = None
    out_v.name = name
