"""Realize a multipoint layer (quant/multipoint.py) whose channels have more than one point: the extra points
become extra rows (output channels) of the same integer Conv / Gemm / MatMul, summed back after the kernel.

Two realizations (option ``multipoint_kernel``):

* ``accumulate`` (default, exact): the integer kernel's int32 accumulators are scaled per row and summed,

      Q(x) ─ ConvInteger / MatMulInteger(W_rows, int8, zero point 0) ─ Cast ─ Mul(s_x * a_row) ─┐
          ┌──────────────────────────────────────────────────────────────────────────────────┘
          └─ Slice(rows 0..C-1) + Gather(rows of point i) [* 0/1 mask_i] + ... + bias ─> original output

  which equals the float layer with the summed weights sum_i a_i q_i (no rounding besides the points'). ONNX
  Runtime runs ConvInteger / MatMulInteger on its MLAS int8 GEMM.
* ``requantize``: DQ(x), DQ(W_rows, a_rows), DQ(bias on each channel's first row) -> Conv -> Q(s_w, z_w) ->
  DQ -> the same sum. DQ -> Conv -> Q is what ONNX Runtime fuses into QLinearConv / QGemm (the plain int8
  kernels, the artifact check sees them), at the price of one more 8-bit rounding of the widened output (its
  range calibrated on the FP32 layer output).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from ..ir.names import NameAllocator
from ..ir.passes._util import new_initializer
from .multipoint import combine_plan

_DT = {"uint8": np.uint8, "int8": np.int8}


def widen(graph: ir.Graph, names: NameAllocator, node: ir.Node, lp, q: np.ndarray, bias: Optional[np.ndarray],
          x_tq) -> None:
    """Rewrite ``node`` into its widened form. ``q``: the integer rows (R rows on the weight's channel axis);
    ``bias``: the layer's constant bias over its C channels (or None); ``x_tq``: the input's resolved qparams."""
    from .realize import _named_node

    tq = lp.weight
    mp = tq.multipoint
    c, r = len(mp["points"]), len(tq.scale)
    comb = combine_plan(mp["points"], int(mp.get("group", 1)))
    axis = 1 if node.op_type in ("Conv", "Gemm") else -1  # output channels: NC... for Conv / Gemm, last for MatMul
    trailing = q.ndim - 2 if node.op_type == "Conv" else 0  # spatial dims after the channel axis
    cshape = [c] + [1] * trailing
    sx, zx = float(x_tq.scale[0]), int(x_tq.zero_point[0])
    x_dtype = _DT[x_tq.dtype]
    base = node.name
    b = _Builder(graph, names, f"{base}/", f"{base}_")
    new, init, add = b.new, b.init, b.add

    w_name = node.inputs[1].name or base
    kernel = mp.get("kernel", "accumulate")
    if kernel in ("requantize", "float"):
        if kernel == "requantize" and mp.get("out_scale") is None:
            raise ValueError(f"layer {base}: multipoint_kernel='requantize' needs the widened output's range")
        s_w = init(f"{w_name}_rows_scale", np.asarray(tq.scale, np.float32))
        z_w = init(f"{w_name}_rows_zero_point", np.zeros(r, np.int8))
        wq = init(f"{w_name}_rows_quantized", q.astype(np.int8))
        wdq = _named_node(names, "DequantizeLinear", [wq, s_w, z_w], f"{base}/weight_dq", [f"{w_name}_rows_dequantized"],
                          {"axis": ir.AttrInt64("axis", int(tq.axis))})
        graph.insert_before(node, wdq)
        node.replace_input_with(1, wdq.outputs[0])
        if bias is not None:
            b_rows = np.zeros(r, np.float64)
            for ch, row in _first_rows(comb).items():
                b_rows[row] = bias[ch]
            bs = (np.float64(sx) * np.asarray(tq.scale, np.float64)).astype(np.float32)
            bq = np.clip(np.rint(b_rows / bs), -2**31, 2**31 - 1).astype(np.int32)
            bdq = _named_node(names, "DequantizeLinear", [init(f"{base}_rows_bias_quantized", bq),
                                                          init(f"{base}_rows_bias_scale", bs)],  # zero point: 0
                              f"{base}/bias_dq", [f"{base}_rows_bias_dequantized"], {"axis": ir.AttrInt64("axis", 0)})
            graph.insert_before(node, bdq)
            node.replace_input_with(2, bdq.outputs[0])
        old = node.outputs[0]
        if kernel == "requantize":
            s = init(f"{base}_rows_out_scale", np.asarray(mp["out_scale"], np.float32))
            z = init(f"{base}_rows_out_zero_point", np.asarray(mp["out_zero_point"], _DT[mp["out_dtype"]]))
            yq = add("QuantizeLinear", [old, s, z], "rows_quantize")
            y = add("DequantizeLinear", [yq, s, z], "rows")
        else:  # float: the simulated layer (activation points feed it a two-point input)
            y = add("Identity", [old], "rows")
        acc = _sum_rows(y, comb, c, axis, cshape, add, init, base)
        graph.insert_after(node, new)
        name, typ, shape = old.name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, acc, replace_graph_outputs=True)
        new[0].replace_input_with(0, old)
        old.name, old.shape = names.value(f"{base}_rows_float"), None
        acc.name, acc.type, acc.shape = name, typ, shape
        return
    # accumulate: integer kernel with int32 output, per-row scale, sum
    xs, xz = init(f"{base}_x_scale", np.asarray(sx, np.float32)), init(f"{base}_x_zero_point", np.asarray(zx, x_dtype))
    xq = add("QuantizeLinear", [node.inputs[0], xs, xz], "x_quantize")  # the input's own grid: exact
    wz = init(f"{w_name}_rows_zero_point", np.asarray(0, np.int8))
    if node.op_type == "Conv":
        wq = init(f"{w_name}_rows_quantized", q.astype(np.int8))
        acc32 = add("ConvInteger", [xq, wq, xz, wz], "conv_integer",
                    {k: a for k, a in node.attributes.items() if k in ("auto_pad", "dilations", "group", "kernel_shape",
                                                                         "pads", "strides")})
    else:
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values())
        wk = q.T if trans_b else q  # MatMulInteger wants [K, R]
        wq = init(f"{w_name}_rows_quantized", np.ascontiguousarray(wk).astype(np.int8))
        acc32 = add("MatMulInteger", [xq, wq, xz, wz], "matmul_integer")
    f = add("Cast", [acc32], "accumulators", {"to": ir.AttrInt64("to", int(ir.DataType.FLOAT))})
    rs = (np.float64(sx) * np.asarray(tq.scale, np.float64)).astype(np.float32).reshape([r] + [1] * trailing)
    y = add("Mul", [f, init(f"{base}_rows_scale", rs)], "rows")
    acc = _sum_rows(y, comb, c, axis, cshape, add, init, base)
    if bias is not None:
        acc = add("Add", [acc, init(f"{base}_bias", np.asarray(bias, np.float32).reshape(cshape))], "bias")
    graph.insert_before(node, new)
    old = node.outputs[0]
    name, typ, shape = old.name, old.type, old.shape
    ir.convenience.replace_all_uses_with(old, acc, replace_graph_outputs=True)
    old.name = None
    graph.remove(node, safe=True)  # its FP32 weight becomes unused and is dropped
    acc.name, acc.type, acc.shape = name, typ, shape


class _Builder:
    """Fresh initializers (``init``) and nodes (``add``: op, inputs, suffix -> its output), collected in ``new``."""

    def __init__(self, graph: ir.Graph, names: NameAllocator, node_prefix: str, value_prefix: str):
        self.graph, self.names, self.np, self.vp, self.new = graph, names, node_prefix, value_prefix, []

    def init(self, name, arr) -> ir.Value:
        return new_initializer(self.graph, name, arr, self.names)

    def add(self, op, inputs, suffix, attrs=None) -> ir.Value:
        from .realize import _named_node

        n = _named_node(self.names, op, inputs, f"{self.np}{suffix}", [f"{self.vp}{suffix}"], attrs)
        self.new.append(n)
        return n.outputs[0]


def _sum_rows(y: ir.Value, comb, c: int, axis: int, cshape, add, init, base: str) -> ir.Value:
    """sum over points i of rows gather[i] of ``y`` (masked where a channel has no point i)."""
    acc = None
    for i, (idx, mask) in enumerate(zip(comb["gather"], comb["mask"])):
        if i == 0 and idx == list(range(c)):
            part = add("Slice", [y, init(f"{base}_p0_start", np.asarray([0], np.int64)),
                                 init(f"{base}_p0_end", np.asarray([c], np.int64)),
                                 init(f"{base}_p0_axis", np.asarray([axis], np.int64))], "point0")
        else:
            part = add("Gather", [y, init(f"{base}_p{i}_rows", np.asarray(idx, np.int64))], f"point{i}",
                       {"axis": ir.AttrInt64("axis", axis)})
        if mask is not None:
            part = add("Mul", [part, init(f"{base}_p{i}_mask", np.asarray(mask, np.float32).reshape(cshape))],
                       f"point{i}_masked")
        acc = part if acc is None else add("Add", [acc, part], f"sum{i}")
    return acc


def _first_rows(comb) -> dict:
    """{channel: its first point's row}."""
    return {ch: row for ch, row in enumerate(comb["gather"][0])}


def activation_points(graph: ir.Graph, names: NameAllocator, node: ir.Node, x_tq, mp, w_ndim: int):
    """Give ``node`` a two-point input where ``mp["act_points"]`` says so: x1 = DQ(Q(x)) on the activation's own
    grid (clipped to its bits), x2 = DQ(Q(x - x1)) on the residual grid, input = x1 + mask * x2. Returns the nodes
    that read the raw float x (realize must not re-route them through the activation's own Q/DQ)."""
    from .observers import qrange
    base = f"{node.name}_act"
    b = _Builder(graph, names, f"{node.name}/act_", f"{base}_")
    new, init, add = b.new, b.init, b.add

    x = node.inputs[0]
    dt = _DT[x_tq.dtype]
    qmin, qmax = qrange(x_tq.dtype, x_tq.bits, x_tq.narrow)
    s1, z1 = float(x_tq.scale[0]), int(x_tq.zero_point[0])
    lo1, hi1 = (qmin - z1) * s1, (qmax - z1) * s1
    c1 = add("Clip", [x, init(f"{base}_lo1", np.asarray(lo1, np.float32)), init(f"{base}_hi1", np.asarray(hi1, np.float32))],
             "clip1")
    s1v, z1v = init(f"{base}_s1", np.asarray(s1, np.float32)), init(f"{base}_z1", np.asarray(z1, dt))
    x1 = add("DequantizeLinear", [add("QuantizeLinear", [c1, s1v, z1v], "q1"), s1v, z1v], "x1")
    r = add("Sub", [x, x1], "residual")
    lo2, hi2 = mp["act_range2"]
    c2 = add("Clip", [r, init(f"{base}_lo2", np.asarray(lo2, np.float32)), init(f"{base}_hi2", np.asarray(hi2, np.float32))],
             "clip2")
    s2v, z2v = init(f"{base}_s2", np.asarray(mp["act_scale2"], np.float32)), init(f"{base}_z2", np.asarray(mp["act_zero_point2"], dt))
    x2 = add("DequantizeLinear", [add("QuantizeLinear", [c2, s2v, z2v], "q2"), s2v, z2v], "x2")
    pts = np.asarray(mp["act_points"])
    trailing = w_ndim - 2 if node.op_type == "Conv" else 0
    mask = (pts > 1).astype(np.float32).reshape([pts.size] + [1] * trailing)
    xe = add("Add", [x1, add("Mul", [x2, init(f"{base}_mask", mask)], "x2_masked")], "two_point")
    graph.insert_before(node, new)
    node.replace_input_with(0, xe)
    return {new[0], new[3]}  # the first Clip and the Sub read the raw float input
