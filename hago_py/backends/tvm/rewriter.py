"""The shared shape of an integer rewrite: a ``rewrite_call`` callback that records every match.

A subclass sets ``prefix`` / ``op``, builds ``self.patterns`` (a list of pattern dicts, each with a "root")
and implements ``_rewrite(p, matches, rec) -> expr``, raising :class:`Unsupported` (with the reason) for a
match it cannot make integer: the layer then stays float and is listed with that reason.
"""
from __future__ import annotations

from typing import Any, Dict, List


def requantized_output(p: Dict[str, Any], core):
    """Complete pattern dict ``p``: ``quantize([relu | clip](core), ys, yz)`` as ``p["root"]``."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    p["relu"] = is_op("relax.nn.relu")(core)
    p["clip"] = is_op("relax.clip")(core, wildcard(), wildcard())
    p["ys"], p["yz"] = is_const(), is_const()
    p["root"] = is_op("relax.quantize")(p["relu"] | p["clip"] | core, p["ys"], p["yz"])
    return p


class Unsupported(Exception):
    """A matched layer that cannot be rewritten; the message is the reason written to the report."""


def output_quantize(m, p):
    """(s_y, z_y, out_dtype, lo, hi, act) of a match of :func:`requantized_output`: the per-tensor output scale
    and zero point, and the clamp the relu / clip folds into; :class:`Unsupported` otherwise."""
    from . import requantize as rq

    ys, yz = rq.scalar(m[p["ys"]]), rq.scalar(m[p["yz"]])
    out_dtype = str(m[p["root"]].attrs.out_dtype)
    if ys is None or yz is None or out_dtype not in rq.QRANGE:
        raise Unsupported("output quantize is per-channel or not 8/16-bit")
    bounds = rq.activation_bounds(m, p["relu"], p["clip"], ys, int(yz), out_dtype)
    if bounds is None:
        raise Unsupported("clip bounds are not constants")
    return (ys, int(yz), out_dtype) + tuple(bounds)


class NoMatch(Exception):
    """The pattern matched an expression that is not this rewrite's form: left as is, not recorded."""


class Rewriter:
    prefix = "layer"
    op = ""

    def __init__(self, plan_spec: Dict[str, Any]):
        self.rq = plan_spec
        self.patterns: List[Dict[str, Any]] = []
        self.layers: List[Dict[str, Any]] = []
        self._seen: Dict[Any, Dict[str, Any]] = {}

    @property
    def roots(self):
        return [p["root"] for p in self.patterns]

    def __call__(self, orig, m):
        p = next(p for p in self.patterns if p["root"] in m)
        rec: Dict[str, Any] = {"name": f"{self.prefix}_{len(self.layers)}", "op": self.op}
        try:
            out = self._rewrite(p, m, rec)
        except NoMatch:
            return orig
        except Unsupported as e:
            if orig in self._seen:            # rewrite_call may offer an unchanged match again
                return orig
            rec.update(status="left_float", reason=str(e))
            out = orig
        self._seen[orig] = rec
        self.layers.append(rec)
        return out

    def _rewrite(self, p, m, rec):  # pragma: no cover - abstract
        raise NotImplementedError
