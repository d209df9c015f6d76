"""Canonicalize an imported module so that the integer rewrites see one form per activation.

``from_onnx`` imports ONNX ``Clip`` (opset >= 11, bounds as inputs) not as ``relax.clip`` but as
``call_tir(maximum, (x, where(isnan(lo), -inf, lo)))`` followed by ``call_tir(minimum, ...)`` — TE functions the
dataflow patterns cannot read. This pass reads the constant bounds (through that NaN guard), then rewrites every
``call_tir`` of a topi ``maximum`` / ``minimum`` against a scalar constant into ``relax.clip`` (one-sided with an
infinite other bound) and merges ``clip(clip(x, lo, +inf), -inf, hi)`` into ``clip(x, lo, hi)``. Semantics are
unchanged: ``maximum(x, c) == clip(x, c, +inf)`` for every x (NaN bounds were already replaced by the importer).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from . import requantize as rq

_INF = math.inf


def _patterns() -> Dict[str, Any]:
    from tvm.relax.dpl import is_const, is_gv, is_op, is_tuple, wildcard

    p: Dict[str, Any] = {"x": wildcard(), "c": is_const(), "gv": is_gv(), "nan_c": is_const()}
    # the importer's NaN guard: where(isnan(c), -+inf, c)
    p["guard"] = is_op("relax.where")(is_op("relax.isnan")(p["nan_c"]), is_const(), is_const())
    p["root"] = is_op("relax.call_tir")(p["gv"], is_tuple([p["x"], p["c"] | p["guard"]]))
    return p


def _bound(m, p):
    if p["guard"] in m:
        c = rq.const_np(m[p["nan_c"]])
        alt, val = (rq.const_np(a) for a in m[p["guard"]].args[1:3])
        if c is None or alt is None or val is None or c.size != 1 or val.size != 1 or alt.size != 1:
            return None
        c = alt if np.isnan(c.reshape(())) else val
    else:
        c = rq.const_np(m[p["c"]])
    if c is None or c.size != 1 or not np.issubdtype(c.dtype, np.floating):
        return None
    return float(c.reshape(()))


def _pv(v: float):
    from tvm import relax
    from tvm.relax.utils import convert_to_expr

    return relax.prim_value(convert_to_expr(float(v)))


def _clip_args(call):
    return float(rq._prim(call.args[1])), float(rq._prim(call.args[2]))


def canonicalize_clips(mod):
    """``mod`` with clamp-style ``call_tir(maximum|minimum, (x, scalar))`` as ``relax.clip`` (merged)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    p = _patterns()

    def to_clip(orig, m):
        name = str(m[p["gv"]].name_hint)
        lo_hi = None
        b = _bound(m, p)
        if b is not None and rq.dtype_of(orig).startswith("float"):
            if name.startswith("maximum"):
                lo_hi = (b, _INF)
            elif name.startswith("minimum"):
                lo_hi = (-_INF, b)
        if lo_hi is None:
            return orig
        return relax.op.clip(m[p["x"]], _pv(lo_hi[0]),
                             _pv(lo_hi[1]))

    inner = is_op("relax.clip")(wildcard(), wildcard(), wildcard())
    outer = is_op("relax.clip")(inner, wildcard(), wildcard())

    def merge(orig, m):
        a_lo, a_hi = _clip_args(m[inner])
        b_lo, b_hi = _clip_args(orig)
        lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
        if lo > hi:
            return orig
        return relax.op.clip(m[inner].args[0], _pv(lo),
                             _pv(hi))

    out = tvm.IRModule()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = rewrite_call(p["root"], to_clip, func)
            func = rewrite_call(outer, merge, func)
            func = relax.analysis.remove_all_unused(func)
        out[gv] = func
    return relax.transform.DeadCodeElimination()(out)
