"""realize(model, plan) -> QDQ ONNX model that ONNX Runtime fuses into integer kernels.

* Static layers: weights become integer initializers + DequantizeLinear (per-channel axis where planned);
  biases become int32 initializers with scale = s_x * s_w (what QLinearConv / QGemm consume); every
  planned activation gets QuantizeLinear -> DequantizeLinear right after its producer.
* Dynamic layers (MatMul/Gemm): DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq) -> Cast -> Mul(s_x*s_w)
  (+ bias), the pattern ORT fuses into DynamicQuantizeMatMul; with activation_granularity="per_token" one
  symmetric int8 scale per token instead (quant/per_token.py); inputs the plan marks ``pad_mask`` get their
  padding rows zeroed first (quant/padding.py).
The same graph is both the simulation (ORT basic optimization keeps Q/DQ as float ops) and the
deployment (ORT full optimization fuses them), so accuracy is always measured on the deployed graph.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from ..errors import ModelError
from ..ir.io import to_ir, to_proto, without_value_info
from ..ir.names import NameAllocator
from ..ir.passes._util import const_array, new_initializer
from ..ir.passes._util import named_node as _named_node
from .codebook import MIN_OPSET, CodebookWriter
from .padding import masked_input
from .per_token import MIN_OPSET as PER_TOKEN_OPSET
from .per_token import matmul_rows, quantize_rows
from .plan import QuantPlan, TensorQuant
from .weights import quantize_weight

_NP = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32, "int16": np.int16, "uint16": np.uint16}


def _int_array(q: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in ("int4", "uint4"):
        import ml_dtypes

        return q.astype(ml_dtypes.int4 if dtype == "int4" else ml_dtypes.uint4)
    return q.astype(_NP[dtype])


def _qparam_values(graph: ir.Graph, names: NameAllocator, base: str, tq: TensorQuant):
    per_channel = tq.granularity == "per_channel" and len(tq.scale) > 1
    scale = np.asarray(tq.scale, np.float32) if per_channel else np.asarray(tq.scale[0], np.float32)
    zp = np.asarray(tq.zero_point) if per_channel else np.asarray(tq.zero_point[0])
    return (new_initializer(graph, base + "_scale", scale, names),
            new_initializer(graph, base + "_zero_point", _int_array(zp, tq.dtype), names))


def _opset_needed(plan: QuantPlan) -> int:
    """DequantizeLinear / QuantizeLinear with int4 / uint4 need opset 21, and so do int16 / uint16."""
    dtypes = {lp.weight.dtype for lp in plan.quantized_layers() if lp.weight is not None}
    dtypes |= {tq.dtype for tq in plan.activations.values() if tq.mode == "static"}
    if dtypes & {"int4", "uint4", "int16", "uint16"}:
        return 21
    nonuniform = any(lp.weight is not None and lp.weight.scheme == "nonuniform" for lp in plan.quantized_layers())
    per_token = any(tq.mode == "dynamic" and tq.granularity == "per_token" for tq in plan.activations.values())
    # the codebook expansion (BitShift, GatherElements); per-token dynamic activations (quant/per_token.py)
    return max(MIN_OPSET if nonuniform else 0, PER_TOKEN_OPSET if per_token else 0)


def realize(model: onnx.ModelProto, plan: QuantPlan, *, weights: Optional[Dict[str, np.ndarray]] = None,
            info: Optional[Dict] = None) -> onnx.ModelProto:
    """Build the QDQ model. ``weights`` may hold pre-rounded integer weights per layer (from a rounding
    method that needs data); otherwise each weight is rounded here with the plan's rounding scheme.
    ``info`` (a dict) receives ``bias_adjusted``: the layers whose weight scale was raised so that their
    int32 bias does not overflow."""
    need = _opset_needed(plan)
    if need:
        from ..ir.io import upgrade_opset

        model = upgrade_opset(model, need, f"the model (int4 / int16 Q/DQ need opset 21, non-uniform weights {MIN_OPSET})")
    m = to_ir(model)
    graph = m.graph
    names = NameAllocator.for_graph(graph)
    nodes = {n.name: n for n in graph}
    dql_cache: Dict = {}
    wcache: Dict = {}  # shared (tied) weights with identical quantization: one initializer, one DQ
    weights = weights or {}
    adjusted = []
    books = CodebookWriter(graph, names)  # weight_scheme="nonuniform": packed indices + codebook (quant/codebook.py)
    raw_users: set = set()  # nodes that read an activation's float value on purpose (multipoint activation points)

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
        if w is None:
            raise ModelError(f"layer '{lp.node}': weight '{w_val.name}' is not a constant in the model; the plan "
                             "was made for another model")
        tq = lp.weight
        q = weights.get(lp.node)
        if q is None:
            q = quantize_weight(w, tq)
        x_name = lp.inputs[0] if lp.inputs else None
        x_tq = plan.activations.get(x_name) if x_name else None
        if x_tq is not None and x_tq.mode == "dynamic":
            _realize_dynamic(graph, names, node, lp, q, x_tq, dql_cache, books)
            continue
        bias = _bias(node, lp)
        if bias is not None and x_tq is not None:
            x_scale = plan.resolve(x_name).scale
            q = np.array(q)  # the bias fit may re-round it: never change the caller's array
            if x_scale is not None and _fit_bias(bias, float(x_scale[0]), q, tq):
                adjusted.append(lp.node)
                lp.notes.append("weight scale raised on some output channels so that the int32 bias "
                                "(bias / (s_x * s_w)) does not overflow (near-zero weights with a non-zero bias)")
        mp = tq.multipoint if tq.scheme == "multipoint" else None
        if mp and mp.get("act_points") and x_tq is not None:  # two-point inputs (simulated, quant/widen.py)
            from .widen import activation_points

            raw_users |= activation_points(graph, names, node, plan.resolve(x_name), mp, q.ndim)
        if mp and x_tq is not None and len(tq.scale) > len(mp["points"]):
            from .widen import widen  # extra points as extra rows of this integer layer (quant/multipoint.py)

            widen(graph, names, node, lp, q, bias, plan.resolve(x_name))
            continue
        key = (w_val.name, tq.dtype, tq.granularity, tq.axis, tuple(tq.scale), tuple(tq.zero_point),
               q.shape, hash(np.ascontiguousarray(q).tobytes()))
        if key not in wcache:
            wq = _weight_value(graph, names, books, w_val.name, _int_array(q, tq.dtype), tq, tq.axis)
            s_val, z_val = _qparam_values(graph, names, f"{w_val.name}", tq)
            attrs = {"axis": ir.AttrInt64("axis", int(tq.axis))} if tq.granularity == "per_channel" \
                and len(tq.scale) > 1 else {}
            dq = _named_node(names, "DequantizeLinear", [wq, s_val, z_val], f"{lp.node}/weight_dq",
                             [f"{w_val.name}_dequantized"], attrs)
            graph.insert_before(node, dq)
            wcache[key] = dq.outputs[0]
        node.replace_input_with(1, wcache[key])
        # bias -> int32 with scale s_x * s_w (only when the input scale is static and known)
        if bias is not None and x_tq is not None and plan.resolve(x_name).scale is not None:
            b_name = node.inputs[2].name or f"{lp.node}_bias"
            bs = (np.float64(plan.resolve(x_name).scale[0]) * np.asarray(tq.scale, np.float64)).astype(np.float32)
            bs = np.broadcast_to(bs, bias.shape) if bs.size == 1 else bs
            bq = np.clip(np.rint(bias.astype(np.float64) / bs), -2**31, 2**31 - 1).astype(np.int32)
            bq_val = new_initializer(graph, f"{b_name}_quantized", bq, names)
            bs_val = new_initializer(graph, f"{b_name}_scale", bs.astype(np.float32), names)
            # no zero point: DequantizeLinear's is optional (absent = 0), and ORT fuses QLinearConv / QGemm without it
            bdq = _named_node(names, "DequantizeLinear", [bq_val, bs_val], f"{lp.node}/bias_dq",
                              [f"{b_name}_dequantized"], {"axis": ir.AttrInt64("axis", 0)})
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
        users = [(u.node, u.idx) for u in v.uses() if u.node not in raw_users]
        s_val, z_val = _qparam_values(graph, names, name, TensorQuant(
            tensor=name, dtype=tq_eff.dtype, scale=tq_eff.scale, zero_point=tq_eff.zero_point))
        src, pre = v, []
        lo_hi = _narrow_range(tq_eff)
        if lo_hi is not None:  # fewer bits than the container (A4 in uint8): clip to the bits' range, or Q would not
            lo, hi = lo_hi
            clip = _named_node(names, "Clip", [v, new_initializer(graph, f"{name}_clip_min", np.asarray(lo, np.float32),
                                                                  names),
                                               new_initializer(graph, f"{name}_clip_max", np.asarray(hi, np.float32),
                                                               names)],
                               f"{name}/clip_to_bits", [f"{name}_clipped"])
            src, pre = clip.outputs[0], [clip]
        q = _named_node(names, "QuantizeLinear", [src, s_val, z_val], f"{name}/quantize", [f"{name}_quantized"])
        dq = _named_node(names, "DequantizeLinear", [q.outputs[0], s_val, z_val], f"{name}/dequantize",
                         [f"{name}_dequantized"])
        prod = v.producer()
        if prod is not None:
            graph.insert_after(prod, pre + [q, dq])
        else:
            first = next(iter(graph))
            graph.insert_before(first, pre + [q, dq])
        for user, idx in users:
            user.replace_input_with(idx, dq.outputs[0])

    books.finish()  # the codebook expansion chains, one per group of equal-K layers (quant/codebook.py)
    m.graph.sort()
    RemoveUnusedNodesPass()(m)
    RemoveUnusedOpsetsPass()(m)
    out = to_proto(m)
    out.producer_name = "hago_py"
    if info is not None:
        info["bias_adjusted"] = adjusted
    # The artifact carries no intermediate shape annotations (the prepared graph is shape-inferred; exported
    # models usually are not). With them ORT 1.32 proves the residual Add's operands equal in shape and fuses
    # Add + LayerNormalization into SkipLayerNormalization, which is slower on this CPU (MiniLM-L6 W8 dynamic:
    # 15.7 -> 14.1 ms without it, same run, 1 thread); the FP32 model gets no such fusion. Without them ORT
    # optimizes the quantized model the way it optimizes the FP32 input.
    return without_value_info(out)


def _narrow_range(tq: TensorQuant):
    """(lo, hi) float bounds of an activation quantized to fewer bits than its container (A4 in uint8: 0..15),
    or None. QuantizeLinear saturates at the container's range only, so without this clip values beyond the
    calibrated range would keep up to 8 bits and a simulated A4 would look better than A4 is."""
    from .observers import qrange

    if tq.dtype not in _NP or not tq.scale or not tq.zero_point:
        return None
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    if (qmin, qmax) == qrange(tq.dtype, None, tq.narrow):
        return None
    s, z = float(tq.scale[0]), int(tq.zero_point[0])
    return (qmin - z) * s, (qmax - z) * s


BIAS_LIMIT = 2.0 ** 30  # |int32 bias| kept below half the int32 range: the accumulation needs headroom too


def _bias(node: ir.Node, lp) -> Optional[np.ndarray]:
    """The layer's constant bias as a vector over the output channels, or None (no bias, computed bias, or a
    Gemm bias that really varies over rows). Gemm's C broadcasts: a scalar, [1] or [1, N] becomes [N]."""
    if lp.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    b = const_array(node.inputs[2])
    if b is None:
        return None
    n_out = node.outputs[0].shape[-1] if lp.op_type == "Gemm" and node.outputs[0].shape is not None else None
    if lp.op_type == "Gemm":
        if n_out is None or not isinstance(n_out, int):
            n_out = len(lp.weight.scale) if lp.weight.scale and len(lp.weight.scale) > 1 else None
        if b.size == 1 and isinstance(n_out, int):
            return np.full(n_out, b.reshape(-1)[0], b.dtype)
        if b.ndim == 2 and b.shape[0] == 1:
            b = b.reshape(-1)
        if b.ndim != 1 or (isinstance(n_out, int) and b.shape[0] != n_out):
            return None
    return b if b.ndim == 1 else None


def _fit_bias(bias: np.ndarray, x_scale: float, q: np.ndarray, tq: TensorQuant) -> bool:
    """Raise the weight scale of the output channels whose int32 bias would overflow (``q`` and ``tq`` are
    updated in place, the weight re-rounded on the coarser grid); True when something changed.

    A channel with near-zero weights and a real bias (a pruned channel, a folded BatchNorm with gamma ~ 0) gets
    a weight scale ~1e-9: bias / (s_x * s_w) then exceeds int32 and wraps, silently turning that output into
    garbage. Its weights are negligible next to its bias, so a coarser weight grid costs nothing."""
    s = np.asarray(tq.scale, np.float64)
    per_channel = tq.granularity == "per_channel" and s.size > 1
    need = np.abs(bias.astype(np.float64)) / (x_scale * BIAS_LIMIT)
    if per_channel:
        if need.shape != s.shape:
            return False
        new_s = np.maximum(s, need)
    else:
        new_s = np.maximum(s, need.max(initial=0.0)).reshape(s.shape)
    if np.all(new_s <= s):
        return False
    from .observers import qrange

    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    z = np.asarray(tq.zero_point, np.int64)
    shape = [1] * q.ndim
    if per_channel:
        shape[tq.axis] = -1
    s_old, s_new, zz = s.reshape(shape), new_s.reshape(shape), z.reshape(shape) if per_channel else z
    deq = (q.astype(np.int64) - zz) * s_old
    q[...] = np.clip(np.rint(deq / s_new) + zz, qmin, qmax).astype(q.dtype)
    tq.scale = [float(np.float32(v)) for v in new_s.reshape(-1)]
    return True


def _values_by_name(graph: ir.Graph) -> Dict[str, ir.Value]:
    vals = {v.name: v for v in graph.inputs}
    for n in graph:
        for o in n.outputs:
            if o.name:
                vals[o.name] = o
    return vals


def _weight_value(graph: ir.Graph, names: NameAllocator, books: CodebookWriter, base: str, q: np.ndarray,
                  tq: TensorQuant, axis: Optional[int]) -> ir.Value:
    """The integer weight as a graph value: a plain initializer, or for a non-uniform weight (per channel on
    ``axis``) the codebook expansion when that is smaller (tq.storage records which)."""
    if tq.scheme != "nonuniform":
        return new_initializer(graph, f"{base}_quantized", q, names)
    if axis is None or q.ndim < 2:
        val, tq.storage = new_initializer(graph, f"{base}_quantized", q, names), "int8"
        return val
    val, tq.storage = books.weight(q, axis, tq.levels_bits, base)
    return val


def _realize_dynamic(graph: ir.Graph, names: NameAllocator, node: ir.Node, lp, q: np.ndarray,
                     x_tq: TensorQuant, cache: Dict, books: Optional[CodebookWriter] = None) -> None:
    """MatMul / Gemm with dynamic activations -> DynamicQuantizeLinear + MatMulInteger + rescale.
    MatMulInteger takes 8-bit weights only: narrower weights (W2-W4, simulated) sit in an int8 container."""
    tq = lp.weight
    own_books = books is None  # realize passes its writer and finishes it once at the end
    books = books or CodebookWriter(graph, names)
    x = node.inputs[0]
    if node.op_type == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values()):
        q = q.T  # MatMulInteger wants [K, N]
    dtype = {"int4": "int8", "uint4": "uint8"}.get(tq.dtype, tq.dtype)
    per_token = x_tq.granularity == "per_token"
    key = ("dql", id(x))
    if per_token:
        x_rows = quantize_rows(graph, names, x, x_tq.bits, node, cache)  # quant/per_token.py
    elif key not in cache:
        base = x.name or node.name
        src = x if not x_tq.pad_mask else masked_input(graph, names, x, x_tq.pad_mask, node, cache)  # padding.py
        dql = _named_node(names, "DynamicQuantizeLinear", [src], f"{base}/dynamic_quantize",
                          [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"])
        graph.insert_before(node, dql)
        cache[key] = dql
    w_name = node.inputs[1].name
    wq = _weight_value(graph, names, books, w_name, _int_array(q, dtype), tq, 1 if tq.axis is not None else None)
    if own_books:
        books.finish()
    per_channel = tq.granularity == "per_channel" and len(tq.scale) > 1
    wz = new_initializer(graph, f"{w_name}_zero_point",
                         _int_array(np.asarray(tq.zero_point if per_channel else tq.zero_point[0]), dtype), names)
    ws = new_initializer(graph, f"{w_name}_scale", np.asarray(tq.scale if per_channel else tq.scale[0], np.float32),
                         names)
    if per_token:
        new_nodes = matmul_rows(names, node, x_rows, wq, wz, ws)
    else:
        dql = cache[key]
        mmi = _named_node(names, "MatMulInteger", [dql.outputs[0], wq, dql.outputs[2], wz],
                          f"{node.name}/matmul_integer", [f"{node.name}/dyn_0"])
        cast = _named_node(names, "Cast", mmi.outputs, f"{node.name}/cast", [f"{node.name}/dyn_1"],
                           {"to": ir.AttrInt64("to", int(ir.DataType.FLOAT))})
        sc = _named_node(names, "Mul", [dql.outputs[1], ws], f"{node.name}/scale", [f"{node.name}/dyn_2"])
        mul = _named_node(names, "Mul", [cast.outputs[0], sc.outputs[0]], f"{node.name}/rescale",
                          [f"{node.name}/dyn_3"])
        new_nodes = [mmi, cast, sc, mul]
    out_v = new_nodes[-1].outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        add = _named_node(names, "Add", [out_v, node.inputs[2]], f"{node.name}/bias", [f"{node.name}/dyn_4"])
        new_nodes.append(add)
        out_v = add.outputs[0]
    graph.insert_before(node, new_nodes)
    old = node.outputs[0]
    name = old.name
    ir.convenience.replace_all_uses_with(old, out_v, replace_graph_outputs=True)
    old.name = None
    graph.remove(node, safe=True)  # detaches the node's inputs: the FP32 weight becomes unused and is dropped
    out_v.name = name
    out_v.type, out_v.shape = old.type, old.shape  # a graph output must keep its declared type
