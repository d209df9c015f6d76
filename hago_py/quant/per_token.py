"""Dynamic per-token activation quantization (activation_granularity="per_token").

One symmetric 8-bit scale per row of the last axis, computed at run time, so a token's result does not depend on
the other tokens (other sentences, padding) of its run. Standard ONNX ops, opset >= 13:

    amax = ReduceMax(Abs(x), axes=[-1], keepdims=1)              # axes an attribute before opset 18, an input from 18
    s    = Div(Max(amax, TINY), qmax)                            # [..., 1]
    x_q  = Clip(Round(Div(x, s)), -qmax, qmax)                   # the symmetric int8 grid, on float
    x_u8 = Cast<uint8>(Add(x_q, 128))                            # exact: integers in [1, 255]
    y    = Mul(Mul(Cast<float>(MatMulInteger(x_u8, W_q, 128, w_zp)), s), w_scale)

The int8 grid travels as uint8 with the constant zero point 128 (MatMulInteger subtracts it exactly): ONNX Runtime
1.32 runs MatMulInteger with int8 A and int8 B correctly on the CPU, but on its generic kernel, ~20x slower than
the uint8 x int8 MLAS kernel (MiniLM-L6, batch 1, 1 thread: 79 ms in the 36 MatMulIntegers against an 11 ms FP32
model). ``quantize_rows`` is the quantizing half, shared by the layers that read the same tensor; ``fake_quant``
is the same arithmetic in numpy (reconstruction statistics, tests).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import onnx_ir as ir

from ..ir.names import NameAllocator
from ..ir.passes._util import named_node, new_initializer

MIN_OPSET = 13
TINY = np.float32(1e-30)  # an all-zero row: scale TINY / qmax (a normal float), every value quantizes to 0
ZERO_POINT = 128  # the int8 grid shifted into uint8 (see above)


def qmax_of(bits: int) -> int:
    """Largest level of the symmetric narrow int8 grid at ``bits`` (8 at most: the int8 container)."""
    return 2 ** (min(int(bits), 8) - 1) - 1


def _node(names: NameAllocator, op: str, inputs, name: str, out: str, attributes=None) -> ir.Node:
    return named_node(names, op, inputs, name, [out], attributes)


def quantize_rows(graph: ir.Graph, names: NameAllocator, x: ir.Value, bits: int, before: ir.Node,
                  cache: Dict) -> Tuple[ir.Value, ir.Value, ir.Value]:
    """(x_u8, its zero point 128, s float [..., 1]) of ``x``, inserted before ``before``; built once per tensor
    (``cache``)."""
    key = ("per_token", id(x))
    if key in cache:
        return cache[key]
    base = x.name or before.name
    qmax = qmax_of(bits)
    c = {k: new_initializer(graph, f"{base}_{k}", np.asarray(v, np.float32), names)
         for k, v in (("tiny", TINY), ("qmax", qmax), ("qmin", -qmax), ("shift", ZERO_POINT))}
    zp = new_initializer(graph, f"{base}_zero_point", np.asarray(ZERO_POINT, np.uint8), names)
    opset = graph.opset_imports.get("", MIN_OPSET)
    ab = _node(names, "Abs", [x], f"{base}/abs", f"{base}_abs")
    if opset >= 18:
        axes = new_initializer(graph, f"{base}_token_axes", np.asarray([-1], np.int64), names)
        amax = _node(names, "ReduceMax", [ab.outputs[0], axes], f"{base}/amax", f"{base}_amax",
                     {"keepdims": ir.AttrInt64("keepdims", 1)})
    else:
        amax = _node(names, "ReduceMax", [ab.outputs[0]], f"{base}/amax", f"{base}_amax",
                     {"axes": ir.AttrInt64s("axes", [-1]), "keepdims": ir.AttrInt64("keepdims", 1)})
    floor = _node(names, "Max", [amax.outputs[0], c["tiny"]], f"{base}/amax_floor", f"{base}_amax_floor")
    s = _node(names, "Div", [floor.outputs[0], c["qmax"]], f"{base}/token_scale", f"{base}_token_scale")
    xs = _node(names, "Div", [x, s.outputs[0]], f"{base}/scaled", f"{base}_scaled")
    rnd = _node(names, "Round", [xs.outputs[0]], f"{base}/round", f"{base}_rounded")
    clip = _node(names, "Clip", [rnd.outputs[0], c["qmin"], c["qmax"]], f"{base}/clip", f"{base}_clipped")
    shift = _node(names, "Add", [clip.outputs[0], c["shift"]], f"{base}/shift", f"{base}_shifted")
    xq = _node(names, "Cast", [shift.outputs[0]], f"{base}/to_uint8", f"{base}_quantized",
               {"to": ir.AttrInt64("to", int(ir.DataType.UINT8))})
    graph.insert_before(before, [ab, amax, floor, s, xs, rnd, clip, shift, xq])
    cache[key] = (xq.outputs[0], zp, s.outputs[0])
    return cache[key]


def matmul_rows(names: NameAllocator, node: ir.Node, x: Tuple[ir.Value, ir.Value, ir.Value], wq: ir.Value,
                wz: ir.Value, ws: ir.Value) -> list:
    """MatMulInteger(x_u8, W_q) -> Cast float -> * s (per token) -> * w_scale: the new nodes, in order.
    ``x``: what quantize_rows returned."""
    xq, xz, s = x
    mmi = _node(names, "MatMulInteger", [xq, wq, xz, wz], f"{node.name}/matmul_integer", f"{node.name}/dyn_0")
    cast = _node(names, "Cast", mmi.outputs, f"{node.name}/cast", f"{node.name}/dyn_1",
                 {"to": ir.AttrInt64("to", int(ir.DataType.FLOAT))})
    row = _node(names, "Mul", [cast.outputs[0], s], f"{node.name}/token_rescale", f"{node.name}/dyn_2")
    col = _node(names, "Mul", [row.outputs[0], ws], f"{node.name}/rescale", f"{node.name}/dyn_3")
    return [mmi, cast, row, col]


def fake_quant(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """What quantize_rows + dequantize does to ``x`` (float32 arithmetic of the graph)."""
    x = np.asarray(x, np.float32)
    qmax = np.float32(qmax_of(bits))
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), TINY) / qmax
    return (np.clip(np.rint(x / s), -qmax, qmax) * s).astype(np.float32)
