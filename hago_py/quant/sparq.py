"""SPARQ: post-training sparsity-aware quantization of 8-bit activations (Shomron et al., NeurIPS 2021).

SPARQ keeps 8-bit activations but feeds a MAC array that multiplies only ``n``-bit (default 4-bit) windows of
them, exploiting the many zero and small activations:

* **bSPARQ** (bit-level): an 8-bit magnitude ``m`` is trimmed to an ``n``-bit window placed at its leading
  one. The window may only sit at a few shifts ``s`` (the bits dropped below the window): ``options=5``
  allows every shift ``{0, .., 8-n}`` (for ``n=4`` that is the paper's 5opt ``{0,1,2,3,4}``), ``options=3``
  allows ``{0, ceil((8-n)/2), 8-n}`` (3opt ``{0,2,4}``) and ``options=2`` allows ``{0, 8-n}`` (2opt
  ``{0,4}``). The shift used is the smallest allowed one with ``m < 2**(n+s)``; the dropped bits are rounded
  (``rounding="round"``: half up, ``m' = floor((m + 2**(s-1)) / 2**s) * 2**s``, saturating at the largest
  window value ``(2**n - 1) * 2**(8-n)``, e.g. 255 -> 240 for ``n=4``; a round-up to ``2**(n+s)`` below
  the top is exactly representable by the next window and is kept) or truncated (``rounding="truncate"``).
* **vSPARQ** (value-level, ``pairs=True``): activations are taken in pairs along the reduction
  (input-channel) axis, channels ``(2k, 2k+1)`` at the same other coordinates. When either member of a pair
  is zero the other one keeps its full 8 bits (it borrows its partner's ``n``-bit budget); otherwise both
  are bSPARQ-trimmed. With an odd channel count the last channel is paired with a padding zero and so keeps
  its 8 bits, as a hardware array that pads the reduction dimension with zeros would.

**Sign-magnitude extension.** The paper trims post-ReLU unsigned activations. hago_py activations are uint8
with a zero point ``z`` (``z = 0`` after ReLU) or int8, so SPARQ is applied to ``v = q - z`` in
sign-magnitude form: ``sign(v) * sparq(|v|)``, then ``z`` is added back and the result is clipped into the
dtype range. "Zero" in the pair rule means ``v == 0`` (the real value 0). For post-ReLU tensors with
``z = 0`` this is exactly the paper's scheme; for tensors with negative values it is our labelled extension.

**Simulation.** No CPU or GPU has a SPARQ MAC array. :func:`insert_sparq` therefore inserts an exact
integer ONNX subgraph between an activation's QuantizeLinear and a new DequantizeLinear used only by the
quantized weighted layer (Conv / Gemm / MatMul) that consumes it; ONNX Runtime runs that subgraph and then
the ordinary kernel. Accuracy is measured exactly (the layer sees the very values SPARQ hardware would
multiply); speed is *not* that of SPARQ hardware (the extra subgraph makes it slower). Predicted speed-ups
for a SPARQ array come from the roofline model (:func:`hago_py.hw.cost.predict_sparq_speedup`).

Functions: :func:`sparq_reference` (numpy reference on integer ``v``), :func:`sparq_quantized` (the same on
stored ``q`` with zero point and dtype clipping, what the ONNX subgraph computes), :func:`sparq_stats`
(fractions and error for reports), :func:`build_sparq_subgraph` (the ONNX nodes for one tensor) and
:func:`insert_sparq` (rewrite a realized QDQ model).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OptionError
from ..ir.names import NameAllocator

__all__ = [
    "allowed_shifts",
    "sparq_reference",
    "sparq_quantized",
    "sparq_stats",
    "build_sparq_subgraph",
    "insert_sparq",
    "SPARQ_MIN_OPSET",
    "WEIGHTED_OPS",
]

#: Opset the inserted subgraph needs (integer Min / Clip and GreaterOrEqual need 12; QDQ models are 13+).
SPARQ_MIN_OPSET = 13
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_ROUNDING = ("round", "truncate")
_DTYPES = {TensorProto.UINT8: ("uint8", 0, 255), TensorProto.INT8: ("int8", -128, 127)}


# ---------------------------------------------------------------------------------------------------------
# Numpy reference
# ---------------------------------------------------------------------------------------------------------


def _check_args(window_bits: Any, options: Any, rounding: Any) -> None:
    if isinstance(window_bits, bool) or not isinstance(window_bits, (int, np.integer)) or not 2 <= window_bits <= 7:
        raise OptionError(f"SPARQ window_bits must be an integer in 2..7 (got {window_bits!r})")
    if isinstance(options, bool) or options not in (2, 3, 5):
        raise OptionError(f"SPARQ options must be 5, 3 or 2 (the paper's 5opt / 3opt / 2opt; got {options!r})")
    if rounding not in _ROUNDING:
        raise OptionError(f"SPARQ rounding must be 'round' or 'truncate' (got {rounding!r})")


def allowed_shifts(window_bits: int = 4, options: int = 5) -> Tuple[int, ...]:
    """The window shifts (bits dropped below an ``n``-bit window of an 8-bit value) allowed, ascending.

    5: every shift ``0..8-n``; 3: ``{0, ceil((8-n)/2), 8-n}``; 2: ``{0, 8-n}`` (duplicates removed).
    """
    _check_args(window_bits, options, "round")
    top = 8 - int(window_bits)
    if options == 5:
        return tuple(range(top + 1))
    if options == 3:
        return tuple(sorted({0, (top + 1) // 2, top}))
    return tuple(sorted({0, top}))


def _bsparq_magnitude(m: np.ndarray, window_bits: int, options: int, rounding: str) -> np.ndarray:
    """bSPARQ on non-negative integer magnitudes (< 256), int64 in and out."""
    n = int(window_bits)
    shifts = allowed_shifts(n, options)
    s = np.full(m.shape, shifts[0], dtype=np.int64)
    for lo, hi in zip(shifts[:-1], shifts[1:]):  # smallest allowed s with m < 2**(n+s)
        s = np.where(m >= (1 << (n + lo)), hi, s)
    d = np.left_shift(np.int64(1), s)
    if rounding == "round":
        out = (m + d // 2) // d * d
        out = np.minimum(out, ((1 << n) - 1) << (8 - n))
    else:
        out = m // d * d
    return out


def _pair_keep(v: np.ndarray, axis: int) -> np.ndarray:
    """True where the pair rule keeps the full value: the element's pair partner (or itself) is zero.

    Pairs are channels (2k, 2k+1) along ``axis``; an odd last channel is paired with a padding zero.
    """
    vv = np.moveaxis(v, axis, -1)
    c = vv.shape[-1]
    keep = np.ones(vv.shape, dtype=bool)
    ce = c - (c % 2)
    if ce:
        pairs = vv[..., :ce].reshape(vv.shape[:-1] + (ce // 2, 2))
        pz = (pairs[..., 0] == 0) | (pairs[..., 1] == 0)
        keep[..., :ce] = np.repeat(pz, 2, axis=-1)
    return np.moveaxis(keep, -1, axis)


def _as_int(v: Any, what: str = "v") -> np.ndarray:
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.integer):
        raise OptionError(f"SPARQ {what} must be an integer array (q - zero_point), got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (np.abs(a).max() > 255):
        raise OptionError(f"SPARQ works on 8-bit activations: |{what}| must be <= 255 (got {np.abs(a).max()})")
    return a


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise OptionError(f"SPARQ pair axis {axis} is out of range for a {ndim}-d tensor")
    return axis % ndim


def _sparq_parts(v: np.ndarray, window_bits: int, options: int, pairs: bool, axis: int,
                 rounding: str) -> Tuple[np.ndarray, np.ndarray]:
    """(trimmed v, keep mask): keep = True where the pair rule kept the full value."""
    _check_args(window_bits, options, rounding)
    v = _as_int(v)
    trimmed = np.sign(v) * _bsparq_magnitude(np.abs(v), window_bits, options, rounding)
    if pairs and v.ndim:
        keep = _pair_keep(v, _norm_axis(axis, v.ndim))
    else:
        keep = np.zeros(v.shape, dtype=bool)
    return np.where(keep, v, trimmed), keep


def sparq_reference(v: np.ndarray, window_bits: int = 4, options: int = 5, pairs: bool = True, axis: int = 1,
                    rounding: str = "round") -> np.ndarray:
    """SPARQ on integer activations ``v = q - zero_point`` (|v| <= 255), in sign-magnitude form.

    Returns the trimmed ``v`` (same shape, int64). ``pairs``: vSPARQ pair rule along ``axis`` (the reduction
    axis); ``options``: 5, 3 or 2 allowed window shifts; ``rounding``: "round" (half up, saturating at the
    top window value) or "truncate". The result is not clipped to a dtype range: see :func:`sparq_quantized`.
    """
    return _sparq_parts(v, window_bits, options, pairs, axis, rounding)[0]


def sparq_quantized(q: np.ndarray, zero_point: int = 0, dtype: str = "uint8", window_bits: int = 4,
                    options: int = 5, pairs: bool = True, axis: int = 1, rounding: str = "round") -> np.ndarray:
    """SPARQ on stored 8-bit activations ``q``: ``clip(z + sparq_reference(q - z), dtype range)`` as ``dtype``.

    This is what the subgraph inserted by :func:`insert_sparq` computes.
    """
    lo, hi = {"uint8": (0, 255), "int8": (-128, 127)}[dtype]
    v = np.asarray(q).astype(np.int64) - int(zero_point)
    out = sparq_reference(v, window_bits, options, pairs, axis, rounding) + int(zero_point)
    return np.clip(out, lo, hi).astype(dtype)


def sparq_stats(v: np.ndarray, window_bits: int = 4, options: int = 5, pairs: bool = True, axis: int = 1,
                rounding: str = "round") -> Dict[str, float]:
    """What SPARQ does to integer activations ``v = q - z``, as fractions of all elements.

    ``zero``: v == 0; ``kept_8bit``: non-zero and kept at full 8 bits by the pair rule (partner zero, or the
    odd last channel); ``trimmed``: non-zero and bSPARQ-trimmed; ``trimmed_changed``: trimmed and changed by
    it; ``mse``: mean over all elements of (trimmed - v)**2 in integer units; ``mse_trimmed``: the same mean
    over the trimmed elements only; ``count``: number of elements.
    """
    v = _as_int(v)
    out, keep = _sparq_parts(v, window_bits, options, pairs, axis, rounding)
    n = int(v.size)
    if n == 0:
        return {"count": 0, "zero": 0.0, "kept_8bit": 0.0, "trimmed": 0.0, "trimmed_changed": 0.0,
                "mse": 0.0, "mse_trimmed": 0.0}
    nz = v != 0
    trimmed = nz & ~keep
    err = (out - v).astype(np.float64) ** 2
    return {
        "count": n,
        "zero": float((~nz).sum()) / n,
        "kept_8bit": float((nz & keep).sum()) / n,
        "trimmed": float(trimmed.sum()) / n,
        "trimmed_changed": float((trimmed & (out != v)).sum()) / n,
        "mse": float(err.mean()),
        "mse_trimmed": float(err[trimmed].mean()) if trimmed.any() else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------
# ONNX subgraph
# ---------------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, names: NameAllocator, prefix: str):
        self.names, self.prefix = names, prefix
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []

    def const(self, tag: str, value, dtype=np.int32) -> str:
        name = self.names.value(f"{self.prefix}_{tag}")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], tag: str, out: Optional[str] = None, **attrs) -> str:
        out = out or self.names.value(f"{self.prefix}_{tag}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=self.names.node(f"{self.prefix}_{tag}"), **attrs))
        return out


def build_sparq_subgraph(q_name: str, out_name: str, *, zero_point: int, elem_type: int, axis: int,
                         channels: Optional[int], window_bits: int = 4, options: int = 5, pairs: bool = True,
                         rounding: str = "round", names: Optional[NameAllocator] = None,
                         prefix: Optional[str] = None) -> Tuple[List[onnx.NodeProto], List[onnx.TensorProto]]:
    """Integer-only ONNX nodes computing ``out_name = sparq_quantized(q_name)``; returns (nodes, initializers).

    ``elem_type``: TensorProto.UINT8 or INT8 (input and output); ``axis``: the pair (reduction) axis, which
    may be negative; ``channels``: its static size (needed with ``pairs``: an odd last channel keeps its
    value). Every other dimension may be dynamic. Ops: Cast, Sub, Abs, Sign, GreaterOrEqual, Where, Add, Div,
    Mul, Min, Equal, Shape, Slice, Concat, Reshape, Clip - int32 / int64 / bool tensors only. ``names``:
    allocator that hands out fresh node / value names (``out_name`` must already be reserved by the caller).
    """
    _check_args(window_bits, options, rounding)
    if elem_type not in _DTYPES:
        raise OptionError(f"SPARQ needs uint8 or int8 activations (got ONNX type {elem_type})")
    _, lo, hi = _DTYPES[elem_type]
    if not lo <= int(zero_point) <= hi:
        raise OptionError(f"zero point {zero_point} outside the {_DTYPES[elem_type][0]} range")
    if pairs and (channels is None or channels < 1):
        raise OptionError("SPARQ pairs need the static size of the reduction axis (channels)")
    n = int(window_bits)
    names = names or NameAllocator([q_name, out_name])
    b = _Builder(names, prefix or f"{q_name}_sparq")
    z = b.const("zp", int(zero_point))
    x = b.op("Cast", [q_name], "i32", to=TensorProto.INT32)
    v = b.op("Sub", [x, z], "v")
    m = b.op("Abs", [v], "mag")
    sg = b.op("Sign", [v], "sign")
    shifts = allowed_shifts(n, options)
    d = b.const("div0", 1 << shifts[0])
    for i, (lo_s, hi_s) in enumerate(zip(shifts[:-1], shifts[1:])):  # divisor 2**s for the window of m
        ge = b.op("GreaterOrEqual", [m, b.const(f"thr{i + 1}", 1 << (n + lo_s))], f"ge{i + 1}")
        d = b.op("Where", [ge, b.const(f"div{i + 1}", 1 << hi_s), d], f"div{i + 1}_sel")
    if rounding == "round":
        half = b.op("Div", [d, b.const("two", 2)], "half")  # 2**(s-1), 0 for s = 0
        num = b.op("Add", [m, half], "num")
    else:
        num = m
    r = b.op("Mul", [b.op("Div", [num, d], "quot"), d], "win")  # non-negative: Div truncation = floor
    if rounding == "round":
        r = b.op("Min", [r, b.const("cap", ((1 << n) - 1) << (8 - n))], "capped")
    t = b.op("Mul", [r, sg], "trim")
    if pairs:
        t = _pair_rule(b, v, t, axis, int(channels))
    y = b.op("Add", [t, z], "q32")
    y = b.op("Clip", [y, b.const("lo", lo), b.const("hi", hi)], "clip")
    b.op("Cast", [y], "out", out=out_name, to=elem_type)
    return b.nodes, b.inits


def _pair_rule(b: _Builder, v: str, t: str, axis: int, c: int) -> str:
    """Where(pair has a zero, v, t) over channel pairs along ``axis``; an odd last channel keeps v."""
    I64_MAX = np.iinfo(np.int64).max
    ce = c - (c % 2)
    if ce == 0:
        return v  # one channel: paired with padding, kept
    end_ax = I64_MAX if axis == -1 else axis + 1
    if ce != c:  # odd: work on the first c-1 channels, keep the last one
        ax = b.const("axis", [axis], np.int64)
        start, stop = b.const("ch0", [0], np.int64), b.const("che", [ce], np.int64)
        ve = b.op("Slice", [v, start, stop, ax], "v_even")
        te = b.op("Slice", [t, start, stop, ax], "t_even")
        v_last = b.op("Slice", [v, stop, b.const("chend", [I64_MAX], np.int64), ax], "v_last")
    else:
        ve, te, v_last = v, t, None
    shape = b.op("Shape", [ve], "shape")
    pieces = [b.op("Slice", [shape, b.const("s0", [0], np.int64), b.const("sa", [axis], np.int64)], "pre")] \
        if axis != 0 else []
    pieces.append(b.const("pairdims", [ce // 2, 2], np.int64))
    if end_ax != I64_MAX:
        pieces.append(b.op("Slice", [shape, b.const("sb", [end_ax], np.int64),
                                     b.const("send", [I64_MAX], np.int64)], "post"))
    pshape = b.op("Concat", pieces, "pshape", axis=0) if len(pieces) > 1 else pieces[0]
    vp = b.op("Reshape", [ve, pshape], "v_pairs")
    tp = b.op("Reshape", [te, pshape], "t_pairs")
    pax = b.const("pax", [axis + 1 if axis >= 0 else axis], np.int64)
    a0 = b.op("Slice", [vp, b.const("p0", [0], np.int64), b.const("p1", [1], np.int64), pax], "first")
    a1 = b.op("Slice", [vp, b.const("p1b", [1], np.int64), b.const("p2", [2], np.int64), pax], "second")
    prod = b.op("Mul", [a0, a1], "pprod")  # |a0 * a1| <= 255 * 255: no int32 overflow
    pz = b.op("Equal", [prod, b.const("zero", 0)], "pzero")
    sel = b.op("Where", [pz, vp, tp], "psel")
    out = b.op("Reshape", [sel, shape], "paired")
    if v_last is not None:
        out = b.op("Concat", [out, v_last], "withlast", axis=axis)
    return out


# ---------------------------------------------------------------------------------------------------------
# Rewriting a realized QDQ model
# ---------------------------------------------------------------------------------------------------------


def _all_names(graph: onnx.GraphProto, values: Set[str], nodes: Set[str]) -> None:
    values.update(i.name for i in graph.initializer)
    values.update(i.name for i in graph.sparse_initializer if i.values.name)
    for coll in (graph.input, graph.output, graph.value_info):
        values.update(v.name for v in coll)
    for node in graph.node:
        if node.name:
            nodes.add(node.name)
        values.update(x for x in list(node.input) + list(node.output) if x)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _all_names(g, values, nodes)


def _constant_values(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _static_rank(model: onnx.ModelProto, name: str) -> Optional[int]:
    for coll in (model.graph.value_info, model.graph.input, model.graph.output):
        for vi in coll:
            if vi.name == name and vi.type.tensor_type.HasField("shape"):
                return len(vi.type.tensor_type.shape.dim)
    return None


def _reduction(node: onnx.NodeProto, wshape: Tuple[int, ...]) -> Optional[Tuple[int, Optional[int]]]:
    """(pair axis, its size) for the data input of a weighted node, from the weight's static shape."""
    if node.op_type == "Conv":
        if len(wshape) < 3:
            return None
        return 1, int(wshape[1]) * int(_attr(node, "group", 1))
    if node.op_type == "Gemm":
        if len(wshape) != 2:
            return None
        k = wshape[1] if _attr(node, "transB", 0) else wshape[0]
        return (0 if _attr(node, "transA", 0) else 1), int(k)
    if node.op_type == "MatMul":
        if not wshape:
            return None
        return -1, int(wshape[-2] if len(wshape) >= 2 else wshape[0])
    return None


def insert_sparq(model: onnx.ModelProto, window_bits: int = 4, options: int = 5, pairs: bool = True,
                 rounding: str = "round", layers: Optional[Iterable[str]] = None
                 ) -> Tuple[onnx.ModelProto, Dict[str, Dict[str, Any]]]:
    """Insert SPARQ trimming of the activation inputs of quantized weighted layers into a realized QDQ model.

    For each 8-bit QuantizeLinear -> DequantizeLinear activation pair (scalar, constant scale and zero point)
    whose DequantizeLinear output is input 0 of a Conv / Gemm / MatMul whose input 1 is a DequantizeLinear
    of a constant, an integer subgraph (see :func:`build_sparq_subgraph`) is placed between the Q output and
    a new DequantizeLinear that only those weighted consumers read; any other consumer (a residual Add, ...)
    keeps the original DequantizeLinear and its untrimmed value. ``layers``: optional node names to restrict
    to. The pair axis is 1 for Conv and Gemm (0 for Gemm with transA=1) and the last axis for MatMul.

    Returns (new model, info) with ``info[dq_output] = {"consumers", "axis", "channels", "window_bits",
    "options", "pairs", "rounding", "dtype", "zero_point", "trimmed_output"}`` (``trimmed_output``: the new
    DequantizeLinear's output). When one activation feeds weighted layers with different pair axes, each
    axis gets its own subgraph and the extra entries are keyed ``"<dq_output>@axis<axis>"``. The input model
    is not modified; the opset is raised to 13 only when it is lower.
    """
    _check_args(window_bits, options, rounding)
    if not isinstance(model, onnx.ModelProto):
        raise OptionError(f"insert_sparq needs an onnx.ModelProto (got {type(model).__name__})")
    only = None if layers is None else set(layers)
    from ..ir.io import default_opset, upgrade_opset

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if default_opset(out) < SPARQ_MIN_OPSET:
        out = upgrade_opset(out, SPARQ_MIN_OPSET, where="the model given to insert_sparq")
    g = out.graph
    consts = _constant_values(g)
    producer = {o: n for n in g.node for o in n.output if o}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    vals: Set[str] = set()
    nds: Set[str] = set()
    _all_names(g, vals, nds)
    names = NameAllocator(vals, nds)

    def scalar(name: Optional[str]) -> Optional[np.ndarray]:
        if name is None or name not in consts:
            return None
        a = consts[name]
        return a if a.size == 1 else None

    def weight_is_const_dq(name: str) -> Optional[Tuple[int, ...]]:
        p = producer.get(name)
        if p is None or p.op_type != "DequantizeLinear" or p.input[0] not in consts:
            return None
        return tuple(consts[p.input[0]].shape)

    info: Dict[str, Dict[str, Any]] = {}
    insert_after: Dict[int, List[onnx.NodeProto]] = {}
    node_index = {id(n): i for i, n in enumerate(g.node)}
    for dq in list(g.node):
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        scale = scalar(dq.input[1] if len(dq.input) > 1 else None)
        if scale is None:
            continue
        zp_name = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
        if zp_name is None and len(q.input) > 2 and q.input[2]:
            zp_name = q.input[2]
        if zp_name is not None:
            zp = scalar(zp_name)
            if zp is None or zp.dtype not in (np.uint8, np.int8):
                continue
            zero_point, elem_type = int(zp.reshape(())), (TensorProto.UINT8 if zp.dtype == np.uint8
                                                         else TensorProto.INT8)
        else:
            zero_point, elem_type = 0, TensorProto.UINT8
        if _attr(q, "output_dtype", 0) not in (0, elem_type):
            continue
        groups: Dict[Tuple[int, Optional[int]], List[onnx.NodeProto]] = {}
        for c in consumers.get(dq.output[0], []):
            if c.op_type not in WEIGHTED_OPS or c.domain not in ("", "ai.onnx") or not c.input \
                    or c.input[0] != dq.output[0] or len(c.input) < 2:
                continue
            if only is not None and c.name not in only:
                continue
            wshape = weight_is_const_dq(c.input[1])
            if wshape is None:
                continue
            red = _reduction(c, wshape)
            if red is None:
                continue
            axis, ch = red
            if axis == -1:  # MatMul: report the positive axis when the rank is known
                rank = _static_rank(out, dq.output[0])
                axis = rank - 1 if rank else -1
            groups.setdefault((axis, ch), []).append(c)
        dtype = _DTYPES[elem_type][0]
        for gi, ((axis, ch), cs) in enumerate(groups.items()):
            base = dq.output[0]
            trimmed_q = names.value(f"{base}_sparq_q")
            new_dq_out = names.value(f"{base}_sparq")
            nodes, inits = build_sparq_subgraph(
                dq.input[0], trimmed_q, zero_point=zero_point, elem_type=elem_type, axis=axis, channels=ch,
                window_bits=window_bits, options=options, pairs=pairs, rounding=rounding, names=names,
                prefix=f"{base}_sparq")
            new_dq = helper.make_node("DequantizeLinear", [trimmed_q] + list(dq.input[1:]), [new_dq_out],
                                      name=names.node(f"{dq.name or base}_sparq"))
            new_dq.attribute.extend(dq.attribute)
            insert_after.setdefault(node_index[id(dq)], []).extend(nodes + [new_dq])
            g.initializer.extend(inits)
            for c in cs:
                c.input[0] = new_dq_out
            key = base if gi == 0 else f"{base}@axis{axis}"
            info[key] = {"consumers": [c.name for c in cs], "axis": axis, "channels": ch,
                         "window_bits": int(window_bits), "options": int(options), "pairs": bool(pairs),
                         "rounding": rounding, "dtype": dtype, "zero_point": zero_point,
                         "trimmed_output": new_dq_out}
    if insert_after:
        new_nodes: List[onnx.NodeProto] = []
        for i, n in enumerate(g.node):
            kept = onnx.NodeProto()
            kept.CopyFrom(n)  # copies: the originals go away with the del below
            new_nodes.append(kept)
            new_nodes.extend(insert_after.get(i, []))
        del g.node[:]
        g.node.extend(new_nodes)
    return out, info
