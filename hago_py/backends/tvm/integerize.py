"""Compose the integer rewrites over every Relax function of a module, and say what stayed float.

Order: conv2d and matmul/Gemm layers with a quantized output, then (after dead-code removal, so the float
cores they replaced are gone) matmul/Gemm layers with a float output, then requantizing Adds. Finally every
remaining float ``conv2d`` / ``matmul`` and every float ``add`` of a dequantized tensor is listed in
``left_float`` with the reason; other ops computing in float (pooling, reshape, ...) are counted in
``float_ops``, with "integer conv2d" / "integer matmul" (integer compute ops: rewritten, or imported as integer
like hago's dynamic-activation MatMulInteger) and "float (plan) ..." (compute ops without a quantized input:
the plan keeps them float). Nothing is left float silently.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Tuple

from . import requantize as rq
from .rewrite_add import AddRewriter
from .rewrite_conv import ConvRewriter
from .rewrite_matmul import MatmulRewriter

_COMPUTE = ("relax.nn.conv2d", "relax.matmul")
_QDQ = ("relax.quantize", "relax.dequantize")


def _float_leftovers(func) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    import tvm
    from tvm import relax

    left: List[Dict[str, Any]] = []
    ops: Counter = Counter()
    producers: Dict[Any, Any] = {}

    def op_of(e):
        e = producers.get(e, e)
        return e.op.name if isinstance(e, relax.Call) and isinstance(e.op, tvm_op_type()) else None

    def _dequantized(a, depth=0):
        """``a`` is a dequantize, maybe behind reshapes / transposes."""
        name = op_of(a)
        if name == "relax.dequantize":
            return True
        if name in ("relax.reshape", "relax.permute_dims") and depth < 3:
            return _dequantized(producers.get(a, a).args[0], depth + 1)
        return False

    def visit(binding):
        v, e = binding.var, binding.value
        producers[v] = e
        if not isinstance(e, relax.Call) or not isinstance(e.op, tvm_op_type()):
            return
        name = e.op.name
        dtype = rq.dtype_of(v)
        if not dtype.startswith("float"):
            if name in _COMPUTE:
                ops["integer " + name.split(".")[-1]] += 1
            return
        if name in _COMPUTE and not any(_dequantized(a) for a in e.args):
            ops["float (plan) " + name.split(".")[-1]] += 1      # the plan keeps it float: no quantized input
        elif name in _COMPUTE:
            left.append({"op": name, "name": _name(v), "status": "left_float",
                         "reason": "not inside a matched QDQ pattern (inputs not dequantized int8, or output not "
                                   "requantized / not a supported form)"})
        elif name == "relax.add" and any(op_of(a) == "relax.dequantize" for a in e.args) and all(
                op_of(a) != "relax.dequantize" or not isinstance(producers.get(a, a).args[0], tvm.ir.expr.Constant)
                for a in e.args):
            left.append({"op": name, "name": _name(v), "status": "left_float",
                         "reason": "add of dequantized tensors without a quantize after it (or not per-tensor)"})
        elif name not in _QDQ:
            ops[name] += 1

    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                visit(binding)
    return left, dict(ops)


def _name(v) -> str:
    return str(getattr(v, "name", None) or getattr(v, "name_hint", ""))


def tvm_op_type():
    import tvm

    return tvm.ir.Op


def integerize(mod, spec=None) -> Tuple[Any, Dict[str, Any]]:
    """(rewritten IRModule, info). ``spec``: hardware spec (name / path / HardwareSpec / dict) whose
    ``requantize`` section sets the requantize arithmetic; None = float_scale, half_to_even (ORT's).

    info: ``layers`` (one record per matched layer: name, op, pattern, status "integer" or "left_float" with the
    reason, dtypes, requantize), ``left_float`` (float conv2d / matmul / dequantized adds that no rewrite
    covered, plus matched layers that could not be rewritten), ``float_ops`` (count of other float ops),
    ``counts`` and ``requantize`` (the spec section used)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    from .canonicalize import canonicalize_clips

    rq_spec = rq.spec_requantize(spec)
    mod = canonicalize_clips(mod)
    passes = [[ConvRewriter(rq_spec), MatmulRewriter(rq_spec, quantized=True)],
              [MatmulRewriter(rq_spec, quantized=False)], [AddRewriter(rq_spec)]]
    out = tvm.IRModule()
    layers: List[Dict[str, Any]] = []
    left: List[Dict[str, Any]] = []
    float_ops: Counter = Counter()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            for group in passes:
                for rw in group:
                    for root in rw.roots:
                        func = rewrite_call(root, rw, func)
                func = relax.analysis.remove_all_unused(func)
            lf, ops = _float_leftovers(func)
            left += lf
            float_ops.update(ops)
        out[gv] = func
    for group in passes:
        for rw in group:
            layers += rw.layers
    out = relax.transform.DeadCodeElimination()(out) if out.functions else out
    left = [dict(x) for x in layers if x["status"] == "left_float"] + left
    counts = Counter(x["op"].split(".")[-1] for x in layers if x["status"] == "integer")
    # integer compute ops in the result that no rewrite made: imported integer already (MatMulInteger /
    # ConvInteger of hago's dynamic-activation layers)
    integer_ops = sum(v for k, v in float_ops.items() if k.startswith("integer "))
    rewritten_compute = counts.get("conv2d", 0) + counts.get("matmul", 0)
    imported = max(0, integer_ops - rewritten_compute)
    info = {"layers": layers, "left_float": left, "float_ops": dict(float_ops),
            "counts": dict(counts, rewritten=sum(counts.values()), left_float=len(left), imported_integer=imported,
                           float_in_plan=sum(v for k, v in float_ops.items() if k.startswith("float (plan)"))),
            "requantize": rq_spec}
    return out, info
