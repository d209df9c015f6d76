"""Integer matmul: rewrites the float fake-quant Gemm / MatMul that ``from_onnx`` imports from QDQ.

Matches (static activations: per-tensor uint8/int8 ``x`` of any rank, 2-D int8 weights with zero point 0, per
output channel or per tensor)::

    [quantize]( [relu | clip]( add( matmul(dequantize(x), [permute_dims](dequantize(W))), bias ) ) )

``permute_dims`` is Gemm's transB; ``bias`` is ``dequantize(int32 b)`` (Gemm from hago) or a float constant
(MatMul + Add), both optional. Rewrites it into::

    acc = matmul(x, W_kn, out_dtype="int32") + (b_int32 - z_x * sum_k W[k, n])
    y   = cast(clamp(requantize(acc, s_x*s_w/s_y) + z_y, lo, hi))      # with a quantize after it
    y   = float32(acc) * (s_x*s_w)                                     # float output (e.g. the logits)

A float bias is quantized to int32 at ``s_x*s_w`` at compile time (noted). Activations folded only into a
quantized output (a float output keeps its relu / clip as float ops). Dynamic activations (hago's
``activation_mode="dynamic"``: DynamicQuantizeLinear + MatMulInteger) are already integer in the ONNX model and
import as such; they are not this rewrite's business.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from . import requantize as rq
from .rewrite_conv import bias_int32
from .rewriter import Rewriter, Unsupported, output_quantize, requantized_output


def _patterns(quantized: bool, with_bias: bool):
    from tvm.relax.dpl import is_const, is_op, wildcard

    p: Dict[str, Any] = {}
    dq = is_op("relax.dequantize")
    p["x"], p["xs"], p["xz"] = wildcard(), is_const(), is_const()
    p["w"], p["ws"], p["wz"] = is_const(), is_const(), is_const()
    p["b"], p["bs"], p["bz"] = is_const(), is_const(), is_const()
    p["fb"] = is_const()
    p["dqw"] = dqw = dq(p["w"], p["ws"], p["wz"])
    p["perm"] = is_op("relax.permute_dims")(dqw)
    p["mm"] = is_op("relax.matmul")(dq(p["x"], p["xs"], p["xz"]), p["perm"] | dqw)
    p["add"] = is_op("relax.add")(p["mm"], dq(p["b"], p["bs"], p["bz"]) | p["fb"])
    core = p["add"] if with_bias else p["mm"]
    if not quantized:
        p["root"] = core
        return p
    core = p["add"] | p["mm"]
    return requantized_output(p, core)


class MatmulRewriter(Rewriter):
    """Callable for ``rewrite_call``. ``quantized``: match layers with a quantize after them; else float-output
    layers (use :attr:`patterns`, with and then without a bias)."""

    prefix, op = "matmul", "relax.matmul"

    def __init__(self, plan_spec: Dict[str, Any], quantized: bool = True):
        super().__init__(plan_spec)
        self.quantized = quantized
        self.patterns = [_patterns(quantized, True)] + ([] if quantized else [_patterns(False, False)])

    def _rewrite(self, p, m, rec):
        from tvm.relax import op

        x = m[p["x"]]
        x_dtype = rq.dtype_of(x)
        sx, zx = rq.scalar(m[p["xs"]]), rq.scalar(m[p["xz"]])
        if x_dtype not in ("uint8", "int8") or sx is None or zx is None:
            raise Unsupported(f"activation {x_dtype} is not per-tensor uint8/int8")
        w = rq.const_np(m[p["w"]])
        ws = rq.const_np(m[p["ws"]]).astype(np.float32).reshape(-1)
        wz = rq.const_np(m[p["wz"]])
        if w.dtype != np.int8 or w.ndim != 2 or np.any(wz != 0):
            raise Unsupported("weights must be 2-D int8 with zero point 0 (symmetric)")
        transposed = p["perm"] in m
        if transposed:
            axes = m[p["perm"]].attrs.axes
            if axes is not None and [int(a) for a in axes] != [1, 0]:
                raise Unsupported("weight permutation other than a transpose")
            w = w.T
        n_out = w.shape[1]
        if ws.size > 1:
            dq_axis = int(m[p["dqw"]].attrs.axis)
            if dq_axis != (0 if transposed else 1):
                raise Unsupported("per-channel weight scales not along the output features")
        ws_c = np.broadcast_to(ws, (n_out,))
        acc_scale = np.float64(np.float32(sx)) * ws_c.astype(np.float64)
        notes: List[str] = []
        if p["fb"] in m and p["add"] in m:
            fb = rq.const_np(m[p["fb"]]).astype(np.float64)
            if fb.size not in (1, n_out) or fb.ndim > 1:
                raise Unsupported("float bias of another shape than [N]")
            bias = np.round(np.broadcast_to(fb.reshape(-1), (n_out,)) / acc_scale).astype(np.int64)
            notes.append("float bias quantized to int32 at s_x*s_w at compile time")
        else:
            bias = bias_int32(m, p, acc_scale, n_out, notes) if p["add"] in m else np.zeros(n_out, np.int64)
        corr = bias - int(zx) * w.astype(np.int64).sum(0)
        if np.abs(corr).max(initial=0) >= 2 ** 31:
            raise Unsupported("bias - z_x * sum(W) overflows int32")
        acc = op.matmul(x, rq._const(w, "int8", w.shape, keep_shape=True), out_dtype="int32")
        acc = op.add(acc, rq._const(corr, "int32", (n_out,)))
        has_bias = p["add"] in m
        rec.update(x_dtype=x_dtype, weight_shape=list(w.shape), transposed=transposed, notes=notes)
        if not self.quantized:
            y = op.multiply(op.astype(acc, "float32"), rq._const(acc_scale.astype(np.float32), "float32", (n_out,)))
            rec.update(status="integer", pattern="matmul" + ("+bias" if has_bias else "") + "->float",
                       out_dtype="float32", requantize="dequantize (float32 acc * s_x*s_w)")
            return y
        ys, yz, out_dtype, lo, hi, act = output_quantize(m, p)
        M = (np.float32(sx) * ws_c.astype(np.float32)) / np.float32(ys)
        plan = rq.plan([M], self.rq)
        rec.update(status="integer", pattern="matmul" + ("+bias" if has_bias else "") + (f"+{act}" if act else ""),
                   out_dtype=out_dtype, requantize=rq.describe(plan), clamp=[lo, hi])
        return rq.finish(rq.emit([acc], plan, (n_out,)), int(yz), lo, hi, out_dtype)

