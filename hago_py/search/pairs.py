"""The boundary stage: the cost of leaving the int8 region, from adjacent layer pairs timed in float together.

Input: the trial runner and the layer table's per-layer results (state.group_results). ``boundary_pass``
finds the edges (boundaries.py), times the most promising pairs of adjacent layers in float together (in
place, against the reference, like the layer table) and fits the boundary cost per element from them, so
that the table's latency model lets float islands share their boundaries. Output: a ``Boundaries``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from ..errors import RemoteError
from .boundaries import fit_cost, layer_edges
from .checkpoint import stable_hash
from .space import FP32
from .state import _TableTime
from .trials import BUILD_ERRORS, Trials, failure

PAIR_TRIALS = 4                  # adjacent layer pairs timed in float together to fit the boundary cost


@dataclass
class Boundaries:
    edges: List[Tuple[str, str, float]] = field(default_factory=list)   # (u, v, latency cost) per edge
    cost: float = 0.0                                                   # per element, fraction of FP32 latency
    info: Dict[str, Any] = field(default_factory=dict)                  # for the report
    objs: List[Any] = field(default_factory=list)                       # boundaries.Edge objects


def edge_prior(tr: Trials) -> float:
    """Cost model's boundary cost per element, as a fraction of the FP32 latency: a QuantizeLinear and a
    DequantizeLinear (float read + int8 write, int8 read + float write), scaled in measured mode by how
    far the measured reference speed-up is from the predicted one."""
    cm = getattr(tr.spec, "cost_model", None)
    if cm is None:
        return 0.0
    per_elem_s = 10.0 / cm.memory_bandwidth_bytes_per_s
    if tr.prior is None:
        return per_elem_s / tr.fp32_s
    gain_pred = 1.0 - tr.prior_ref_s() / tr.prior_fp32_s
    ref_lat = tr.ref_latency()
    k = min(2.0, max(0.1, (1.0 - ref_lat) / gain_pred)) if gain_pred > 1e-6 and ref_lat < 1 else 1.0
    return k * per_elem_s / tr.prior_fp32_s


def boundary_pass(tr: Trials) -> Boundaries:
    out = Boundaries()
    groups = tr.state.group_results
    if not groups:
        return out
    try:
        shapes = tr.shapes()
    except Exception as e:  # noqa: BLE001 - the boundary model is an estimate: the search goes on without it
        tr.log("boundaries", f"no int8-region boundary model (shapes unavailable: {type(e).__name__})")
        return out
    edges = layer_edges(tr.pipe.prepared, tr.space.layers, shapes)
    out.objs = edges
    if not edges:
        return out
    prior = edge_prior(tr)
    single = {n: tr.measured_dlat(res[FP32]) for n, res in groups.items() if FP32 in res and "failed" not in res[FP32]}
    single = {n: d for n, d in single.items() if d is not None}
    cands = [e for e in edges if e.u in single and e.v in single
             and tr.ref_assign[e.u] != FP32 and tr.ref_assign[e.v] != FP32]
    cands.sort(key=lambda e: (single[e.u] + single[e.v] - 2 * prior * e.numel, e.u, e.v))
    ref_hash = stable_hash(tr.space.config(tr.ref_assign))
    pairs, measured = [], []
    for e in cands[:PAIR_TRIALS]:
        payload = {"pair": [e.u, e.v], "ref": ref_hash}

        def run(e=e):
            measured = tr.lat_kind == "measured"
            try:
                built = tr.build(dict(tr.ref_assign, **{e.u: FP32, e.v: FP32}))
                timed = tr.timed(built.model) if measured else None
            except RemoteError:   # the device, not the pair
                raise
            except BUILD_ERRORS as err:
                return {"pair": [e.u, e.v], "failed": failure(err)}
            if measured:
                r = tr.lat.compare({"ref": tr.ref_timed(), "pair": timed}, layer=True)["pair"]
                return {"pair": [e.u, e.v], "ratio": r["ratio"], "se": r["se"]}
            s = tr.lat.seconds(built.plan, built.model)
            return {"pair": [e.u, e.v], "dlat": (s - tr.ref_seconds()) / tr.fp32_s}

        try:
            rec = tr.trial("pair", payload, run, stage="boundaries", table=True)
        except _TableTime:
            break
        d_uv = None if "failed" in rec else tr.measured_dlat(rec)
        if d_uv is None:
            continue
        y = single[e.u] + single[e.v] - d_uv
        pairs.append((y, e.numel))
        measured.append({"u": e.u, "v": e.v, "numel": e.numel, "dlat_u": single[e.u], "dlat_v": single[e.v],
                         "dlat_pair": d_uv, "shared_boundary": y / 2})
    out.cost = fit_cost(pairs, prior)
    out.edges = [(e.u, e.v, out.cost * e.numel) for e in edges]
    out.info = {"edges": [e.to_dict() for e in edges], "cost_per_element": out.cost,
                "prior_per_element": prior, "pairs": measured}
    tr.log("boundaries", f"int8-region boundaries: {len(edges)} edges; {len(pairs)} adjacent pairs timed in "
                         f"float together; boundary cost {out.cost * 1e6:.3g} ppm of the FP32 latency per "
                         f"element (cost model: {prior * 1e6:.3g})")
    return out
