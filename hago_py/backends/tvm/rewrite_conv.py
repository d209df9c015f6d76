"""Integer conv2d: rewrites the float fake-quant conv that ``from_onnx`` imports from a QDQ Conv.

Matches (NCHW / OIHW, per-tensor activation scale, int8 weights with zero point 0, per-channel or per-tensor)::

    quantize( [relu | clip]( add( conv2d(dequantize(x), dequantize(W)), [reshape](dequantize(b)) ) ), s_y, z_y)

with the bias and the activation optional, and rewrites it into::

    xp  = pad(x, pads, pad_value=z_x)                     # only when z_x != 0 and the conv pads
    acc = conv2d(xp, W, out_dtype="int32")                # uint8/int8 x int8 -> int32, groups / depthwise kept
    acc = acc + (b_int32 - z_x * sum(W) per output channel)
    y   = cast(clamp(requantize(acc, s_x*s_w/s_y) + z_y, lo, hi))   # relu / clip folded into lo, hi

The bias must be int32 at scale ``s_x*s_w`` (what hago emits); another bias scale is rescaled to it at compile
time and noted. Anything else is left as is and listed as ``left_float`` with the reason.

Also matched: a ConvInteger + Cast(float) lowered by ``importer.lower_conv_integer`` (multipoint's widened
convolutions, whose int32 accumulators are scaled and summed by float ops after the kernel)::

    conv2d(dequantize(x, 1, z_x), dequantize(W, 1, 0))
        ->  astype(conv2d(pad(x, z_x), W, out_dtype="int32") - z_x * sum(W) per output channel, "float32")

Only unit scales make it this form; any other float conv2d over dequantized inputs is not this rewrite's (no
record).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from . import requantize as rq
from .rewriter import NoMatch, Rewriter, Unsupported, output_quantize, requantized_output

PATTERN_NAME = "conv2d"


def _patterns():
    from tvm.relax.dpl import is_const, is_op, wildcard

    p: Dict[str, Any] = {}
    p["x"], p["xs"], p["xz"] = wildcard(), is_const(), is_const()
    p["w"], p["ws"], p["wz"] = is_const(), is_const(), is_const()
    p["b"], p["bs"], p["bz"] = is_const(), is_const(), is_const()
    dq = is_op("relax.dequantize")
    p["conv"] = is_op("relax.nn.conv2d")(dq(p["x"], p["xs"], p["xz"]), dq(p["w"], p["ws"], p["wz"]))
    dqb = dq(p["b"], p["bs"], p["bz"])
    p["add"] = is_op("relax.add")(p["conv"], dqb | is_op("relax.reshape")(dqb, wildcard()))
    core = p["add"] | p["conv"]
    return requantized_output(p, core)


def _accumulator_pattern():
    """conv2d(dequantize(x, 1, z_x), dequantize(W, 1, z_w)): a lowered ConvInteger + Cast(float)."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    p: Dict[str, Any] = {"accumulators": True}
    p["x"], p["xs"], p["xz"] = wildcard(), is_const(), is_const()
    p["w"], p["ws"], p["wz"] = is_const(), is_const(), is_const()
    dq = is_op("relax.dequantize")
    p["conv"] = is_op("relax.nn.conv2d")(dq(p["x"], p["xs"], p["xz"]), dq(p["w"], p["ws"], p["wz"]))
    p["root"] = p["conv"]
    return p


def bias_int32(m, p, acc_scale: np.ndarray, n_out: int, notes: List[str]) -> np.ndarray:
    """The matched bias as int64 at ``acc_scale`` (per output channel); zeros without a bias."""
    if p["b"] not in m:
        return np.zeros(n_out, np.int64)
    b = rq.const_np(m[p["b"]]).astype(np.int64).reshape(-1)
    bs = rq.const_np(m[p["bs"]]).astype(np.float64).reshape(-1)
    bz = rq.const_np(m[p["bz"]]).astype(np.int64).reshape(-1)
    if np.any(bz != 0) or not np.allclose(bs, acc_scale, rtol=1e-5, atol=0):
        notes.append("bias rescaled to s_x*s_w at compile time")
        return np.round((b - bz) * bs / acc_scale).astype(np.int64)
    return b


class ConvRewriter(Rewriter):
    """Callable for ``rewrite_call``: rewrites one match, appends a record to ``self.layers``."""

    prefix, op = "conv2d", "relax.nn.conv2d"

    def __init__(self, plan_spec: Dict[str, Any]):
        super().__init__(plan_spec)
        self.patterns = [_patterns(), _accumulator_pattern()]

    @staticmethod
    def _integer_conv(m, p, zx, w, corr, rec):
        """conv2d(x, W) in int32 plus ``corr`` per output channel; x padded with its zero point z_x."""
        from tvm.relax import op

        a = m[p["conv"]].attrs
        x = m[p["x"]]
        pad = [int(v) for v in a.padding]                          # top, left, bottom, right
        xin = x
        if zx != 0 and any(pad):
            xin = op.nn.pad(x, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], pad_value=int(zx))
            pad = [0, 0, 0, 0]
        acc = op.nn.conv2d(xin, rq._const(w, "int8", w.shape, keep_shape=True), strides=a.strides, padding=pad,
                           dilation=a.dilation, groups=int(a.groups), out_dtype="int32")
        rec["padded_with_zero_point"] = bool(xin is not x)
        return op.add(acc, rq._const(corr, "int32", (1, w.shape[0], 1, 1)))

    def _rewrite_accumulators(self, p, m, rec):
        """A lowered ConvInteger + Cast(float): unit scales; exact integer conv, accumulators cast to float."""
        from tvm.relax import op

        x_dtype = rq.dtype_of(m[p["x"]])
        sx, zx = rq.scalar(m[p["xs"]]), rq.scalar(m[p["xz"]])
        ws = rq.const_np(m[p["ws"]]).astype(np.float64)
        w, wz = rq.const_np(m[p["w"]]), rq.const_np(m[p["wz"]])
        if sx != 1.0 or np.any(ws != 1.0):
            raise NoMatch()    # a float conv of a QDQ layer another rewrite left float: not a ConvInteger
        if x_dtype not in ("uint8", "int8") or zx is None:
            raise Unsupported(f"activation {x_dtype} with a per-channel zero point: needs per-tensor uint8/int8")
        if w.dtype != np.int8 or np.any(wz != 0):
            raise Unsupported("weights must be int8 with zero point 0 (symmetric)")
        corr = -int(zx) * w.astype(np.int64).reshape(w.shape[0], -1).sum(1)
        if np.abs(corr).max(initial=0) >= 2 ** 31:
            raise Unsupported("z_x * sum(W) overflows int32")
        acc = self._integer_conv(m, p, zx, w, corr, rec)
        rec.update(status="integer", pattern="conv2d_accumulators (ConvInteger)", x_dtype=x_dtype,
                   out_dtype="int32 -> float32", weight_shape=list(w.shape), groups=int(m[p["conv"]].attrs.groups),
                   notes=[])
        return op.astype(acc, "float32")

    def _rewrite(self, p, m, rec):
        conv = m[p["conv"]]
        a = conv.attrs
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
            raise Unsupported(f"layout {a.data_layout}/{a.kernel_layout}: only NCHW / OIHW is integerized")
        if p.get("accumulators"):
            return self._rewrite_accumulators(p, m, rec)
        x = m[p["x"]]
        x_dtype = rq.dtype_of(x)
        sx, zx = rq.scalar(m[p["xs"]]), rq.scalar(m[p["xz"]])
        if x_dtype not in ("uint8", "int8") or sx is None or zx is None:
            raise Unsupported(f"activation {x_dtype} with a per-channel or non-constant scale: needs per-tensor "
                               "uint8/int8 activations")
        w = rq.const_np(m[p["w"]])
        ws = rq.const_np(m[p["ws"]]).astype(np.float32).reshape(-1)
        wz = rq.const_np(m[p["wz"]])
        if w.dtype != np.int8 or np.any(wz != 0):
            raise Unsupported("weights must be int8 with zero point 0 (symmetric): re-quantize with symmetric "
                               "weights")
        n_out = w.shape[0]
        ys, yz, out_dtype, lo, hi, act = output_quantize(m, p)
        notes: List[str] = []
        ws_c = np.broadcast_to(ws, (n_out,))
        acc_scale = np.float64(np.float32(sx)) * ws_c.astype(np.float64)
        bias = bias_int32(m, p, acc_scale, n_out, notes)
        corr = bias - int(zx) * w.astype(np.int64).reshape(n_out, -1).sum(1)
        if np.abs(corr).max(initial=0) >= 2 ** 31:
            raise Unsupported("bias - z_x * sum(W) overflows int32")
        acc = self._integer_conv(m, p, zx, w, corr, rec)
        M = (np.float32(sx) * ws_c.astype(np.float32)) / np.float32(ys)
        plan = rq.plan([M], self.rq)
        y = rq.finish(rq.emit([acc], plan, (1, n_out, 1, 1)), int(yz), lo, hi, out_dtype)
        rec.update(status="integer", pattern="conv2d" + ("+bias" if p["b"] in m else "") + (f"+{act}" if act else ""),
                   x_dtype=x_dtype, out_dtype=out_dtype, weight_shape=list(w.shape), groups=int(a.groups),
                   requantize=rq.describe(plan), clamp=[lo, hi],
                   notes=notes)
        return y
