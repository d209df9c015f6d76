"""Integer Add: rewrites the requantizing residual Add of two quantized tensors.

Matches (per-tensor scales and zero points on both inputs and the output)::

    quantize( [relu | clip]( add(dequantize(a, s_a, z_a), dequantize(b, s_b, z_b)) ), s_y, z_y)

and rewrites it into one requantize of two terms (the spec's arithmetic)::

    y = cast(clamp(requantize([a - z_a, b - z_b], [s_a/s_y, s_b/s_y]) + z_y, lo, hi))

except for ``float_scale`` / ``half_to_even`` (ORT's arithmetic), which is MLAS QLinearAdd's exact form
(``requantize.mlas_add_np``: zero points folded into one float constant, fused multiply-adds).

with a relu / clip folded into ``lo, hi``.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from . import requantize as rq
from .rewriter import Rewriter, Unsupported


def _patterns():
    from tvm.relax.dpl import is_const, is_op, wildcard

    dq = is_op("relax.dequantize")
    p: Dict[str, Any] = {}
    for k in ("a", "b"):
        p[k], p[k + "s"], p[k + "z"] = wildcard(), is_const(), is_const()
    p["add"] = is_op("relax.add")(dq(p["a"], p["as"], p["az"]), dq(p["b"], p["bs"], p["bz"]))
    p["relu"] = is_op("relax.nn.relu")(p["add"])
    p["clip"] = is_op("relax.clip")(p["add"], wildcard(), wildcard())
    p["ys"], p["yz"] = is_const(), is_const()
    p["root"] = is_op("relax.quantize")(p["relu"] | p["clip"] | p["add"], p["ys"], p["yz"])
    return p


class AddRewriter(Rewriter):
    """Callable for ``rewrite_call``: rewrites one requantizing Add, appends a record to ``self.layers``."""

    prefix, op = "add", "relax.add"

    def __init__(self, plan_spec: Dict[str, Any]):
        super().__init__(plan_spec)
        self.patterns = [_patterns()]

    def _rewrite(self, p, m, rec):
        from tvm.relax import op

        vals = {k: rq.scalar(m[p[k]]) for k in ("as", "az", "bs", "bz", "ys", "yz")}
        if any(v is None for v in vals.values()):
            raise Unsupported("per-channel scales / zero points: the integer Add needs per-tensor ones")
        dtypes = [rq.dtype_of(m[p[k]]) for k in ("a", "b")]
        out_dtype = str(m[p["root"]].attrs.out_dtype)
        if any(d not in rq.QRANGE for d in dtypes) or out_dtype not in rq.QRANGE:
            raise Unsupported(f"input dtypes {dtypes} / output {out_dtype} are not 8/16-bit integers")
        bounds = rq.activation_bounds(m, p["relu"], p["clip"], vals["ys"], int(vals["yz"]), out_dtype)
        if bounds is None:
            raise Unsupported("clip bounds are not constants")
        lo, hi, act = bounds
        if self.rq["style"] == "float_scale" and self.rq["rounding"] == "half_to_even":
            consts = rq.mlas_add_constants(vals["as"], vals["bs"], vals["ys"], int(vals["az"]), int(vals["bz"]),
                                           int(vals["yz"]))
            rec.update(status="integer", pattern="add" + (f"+{act}" if act else ""), x_dtype=dtypes,
                       out_dtype=out_dtype, requantize="float_scale/half_to_even (MLAS QLinearAdd form)",
                       clamp=[lo, hi], notes=[])
            return rq.finish(rq.emit_mlas_add(m[p["a"]], m[p["b"]], consts), 0, lo, hi, out_dtype)
        terms = []
        for k in ("a", "b"):
            t = op.astype(m[p[k]], "int32")
            z = int(vals[k + "z"])
            terms.append(op.subtract(t, rq._const(z, "int32", ())) if z else t)
        Ms = [np.float32(vals[k + "s"]) / np.float32(vals["ys"]) for k in ("a", "b")]
        plan = rq.plan(Ms, self.rq)
        rec.update(status="integer", pattern="add" + (f"+{act}" if act else ""), x_dtype=dtypes, out_dtype=out_dtype,
                   requantize=rq.describe(plan), clamp=[lo, hi], notes=[])
        return rq.finish(rq.emit(terms, plan, ()), int(vals["yz"]), lo, hi, out_dtype)
