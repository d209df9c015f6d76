"""Index guards: a compiled model refuses out-of-range Gather indices instead of reading past its table.

``tvm.relax.frontend.onnx`` imports an ONNX Gather as ``where(i < 0, i + n, i)`` followed by
``take(table, ., mode="fast")``: no bounds check, so a token id >= the table's rows reads outside the table and
the compiled library segfaults (seen with TVM 0.27 on an embedding model: exit 139). ONNX says an out-of-range
index is an error, and ONNX Runtime raises one. :func:`guard_gather_indices` adds, before the function's
dataflow block, one check per graph input that feeds such a ``take`` (directly, through the negative-index
``where`` or an ``astype``):

    assert(min(ids) >= -n and max(ids) < n, "input 'ids' holds an index outside [-n, n) ...")

with ``n`` the smallest table those takes read, so the VirtualMachine raises an error instead. The function
becomes impure (``R.function(pure=False)``: an assert has an effect); its dataflow block, where fusion and
tuning work, is unchanged. Takes whose indices come from anything else (computed ids, constants) are left as
they are.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple


def _bindings(func) -> Dict[object, object]:
    from tvm import relax

    out = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                out[b.var] = b.value
    return out


def _source_param(expr, values, params, depth: int = 0):
    """The function parameter ``expr`` is (through the import's negative-index ``where`` and ``astype``)."""
    from tvm import relax

    if any(expr.same_as(p) for p in params):
        return expr
    if depth > 4 or not isinstance(expr, relax.Var) or expr not in values:
        return None
    v = values[expr]
    if not isinstance(v, relax.Call) or not hasattr(v.op, "name"):
        return None
    if v.op.name == "relax.where" and len(v.args) == 3:
        return _source_param(v.args[2], values, params, depth + 1)
    if v.op.name == "relax.astype":
        return _source_param(v.args[0], values, params, depth + 1)
    return None


def _rows(call) -> Optional[int]:
    """Static extent of the table's indexed axis, or None."""
    ty = getattr(call.args[0], "ty", None) or getattr(call.args[0], "struct_info", None)
    shape = getattr(ty, "shape", None)
    try:
        dims = [int(d) for d in shape.values] if hasattr(shape, "values") else [int(d) for d in shape]
        axis = int(call.attrs.axis) if call.attrs.axis is not None else 0
        return dims[axis]
    except (TypeError, ValueError, AttributeError, IndexError):
        return None


def unguarded_takes(func) -> List[Tuple[object, int]]:
    """(graph input, rows) for every ``take(table, ids, mode="fast")`` whose ids come from a graph input."""
    from tvm import relax

    values = _bindings(func)
    out = []
    for v in values.values():
        if not (isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.take"):
            continue
        if str(getattr(v.attrs, "mode", "")) != "fast":
            continue
        p = _source_param(v.args[1], values, list(func.params))
        n = _rows(v)
        if p is not None and n is not None:
            out.append((p, n))
    return out


def guard_gather_indices(mod, func_name: str = "main"):
    """``mod`` with bounds checks on the graph inputs that index tables (see the module docstring); (mod, list
    of {"input", "rows"} guarded)."""
    from tvm import relax
    from tvm.relax import op

    if func_name not in [gv.name_hint for gv in mod.functions]:
        return mod, []
    func = mod[func_name]
    rows: Dict[str, Tuple[object, int]] = {}
    for p, n in unguarded_takes(func):
        key = str(getattr(p, "name", None) or getattr(p, "name_hint", ""))
        rows[key] = (p, min(n, rows[key][1]) if key in rows else n)
    if not rows:
        return mod, []
    bb = relax.BlockBuilder()
    binds = []

    def bind(name, expr):
        expr = bb.normalize(expr)
        var = relax.Var(name, expr.ty)
        binds.append(relax.VarBinding(var, expr))
        return var

    for key, (p, n) in sorted(rows.items()):
        dtype = str(p.ty.dtype)
        lo = bind(f"{key}_min", op.min(p))
        hi = bind(f"{key}_max", op.max(p))
        ok = bind(f"{key}_in_range", op.logical_and(bind(f"{key}_ge", op.greater_equal(lo, relax.const(-n, dtype))),
                                                    bind(f"{key}_lt", op.less(hi, relax.const(n, dtype)))))
        bind(f"{key}_checked", op.assert_op(ok, format=f"input '{key}' holds an index outside [-{n}, {n}): the "
                                                       f"model's table has {n} rows (ONNX Gather: out of range)"))
    body = relax.SeqExpr([relax.BindingBlock(binds)] + list(func.body.blocks), func.body.body)
    out = mod.copy() if hasattr(mod, "copy") else mod
    out[func_name] = relax.Function(func.params, body, func.ret_ty, is_pure=False, attrs=func.attrs)
    return out, [{"input": k, "rows": n} for k, (_, n) in sorted(rows.items())]
