"""The layer-table stage: per-layer accuracy and latency estimates for the strategies.

Input: the trial runner (trials.Trials) and the reference point in its state. Each stage function returns
its results; the driver stores them in the state:

- ``layer_table``: every structural candidate of a layer built into the reference plan alone, proxy-scored
  and timed in place against the reference -> (group_results, pruned_kinds);
- ``context_pass``: the accuracy re-measured with the dominant layers in FP32 -> (ctx_assign, ctx_results);
- ``variants``: accuracy-only variants of the most sensitive layers -> variant_results;
- ``make_table``: the strategies' Table (errors, latency changes, boundary edges) -> (Table, details).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from ..errors import HagoError, RemoteError
from .checkpoint import stable_hash
from .space import FP32
from .state import _TableTime
from .strategies import Table
from .trials import BUILD_ERRORS, Trials, failure

RACE_LAYERS = 6                  # candidate kinds that never help on this many layers of an op are pruned
RACE_MIN_GAIN = 0.002            # "faster" means saving more than 0.2 % of the FP32 latency
DOMINANT_SHARE = 0.4             # layers carrying >= 40 % of the reference's error set the accuracy context
SIGNIFICANCE = 2.0               # paired proxy changes within 2 standard errors are treated as noise


def layer_table(tr: Trials) -> Tuple[Dict[str, Dict[str, Any]], Dict[Tuple[str, str], str]]:
    st = tr.state
    ref_cfg = tr.space.config(tr.ref_assign)
    group_results: Dict[str, Dict[str, Any]] = {}
    st.group_results = group_results      # filled in place: a stop by time keeps the layers measured so far
    groups = [(n, ls) for n, ls in tr.space.layers.items() if len(ls.structural()) > 1]
    tr.log("table", f"layer table: {len(groups)} layers, "
                    f"{sum(len(ls.structural()) - 1 for _, ls in groups)} structural candidates, each built "
                    "into the reference plan alone, proxy-scored and timed in place against the reference")
    pruned: Dict[Tuple[str, str], str] = {}
    stats: Dict[Tuple[str, str], List[int]] = {}      # (op, key) -> [layers measured, layers where it helped]
    primed = False
    for node, ls in groups:
        cands = {k: c.config for k, c in ls.structural().items() if k != ls.ref and (ls.op, k) not in pruned}
        payload = {"node": node, "cands": cands, "ref": stable_hash(ref_cfg)}

        def run(node=node, cands=cands):
            nonlocal primed
            if not primed:
                _prime_structural(tr, groups)
                primed = True
            measured = tr.lat_kind == "measured"
            sessions, res = ({"ref": tr.ref_timed()} if measured else {}), {}
            for key in cands:
                try:
                    built = tr.build(dict(tr.ref_assign, **{node: key}))
                    sess = tr.session(built.model)
                    timed = tr.timed(built.model, sess) if measured else None
                except RemoteError:   # the device, not the candidate
                    raise
                except BUILD_ERRORS as e:
                    res[key] = {"failed": failure(e)}
                    continue
                res[key] = dict(tr.sens_proxy.paired(sess, tr.ref_errors()),
                                n_quantized=len(built.plan.quantized_layers()))
                if measured:
                    sessions[key] = timed
                    res[key]["prior_s"] = tr.prior.seconds(built.plan)
                else:
                    s = tr.lat.seconds(built.plan, built.model)
                    res[key].update(seconds=s, dlat=(s - tr.ref_seconds()) / tr.fp32_s)
            if measured and len(sessions) > 1:
                r = tr.lat.compare(sessions, layer=True)
                for key in sessions:
                    if key != "ref":
                        res[key].update(ratio=r[key]["ratio"], se=r[key]["se"],
                                        paired_median=r[key]["paired_median"], ms=r[key]["low_ms"])
                res["_ref"] = {"ms": r["ref"]["low_ms"], "repeats": r["ref"]["repeats"]}
            return {"node": node, "results": res, "latency": tr.lat_kind}

        try:
            rec = tr.trial("layer", payload, run, stage="layer table", table=True)
        except _TableTime:
            tr.log("table", f"layer table stopped after {len(group_results)} of {len(groups)} layers: "
                            "its share of time_budget is spent (the rest is kept for end-to-end trials); the "
                            "other layers stay at the reference configuration")
            return group_results, pruned
        group_results[node] = rec["results"]
        _race(tr, ls, rec["results"], stats, pruned)
    tr.log("table", "layer table complete")
    return group_results, pruned


def _race(tr: Trials, ls, results: Mapping[str, Any], stats: Dict[Tuple[str, str], List[int]],
          pruned: Dict[Tuple[str, str], str]) -> None:
    """Adaptive pruning: a candidate kind (e.g. uint8 per-channel Conv) that after RACE_LAYERS layers of an
    op type was never faster nor more accurate than the reference configuration is not measured on the
    remaining layers of that op type (deterministic given the recorded trials, so resume agrees)."""
    ref_lat = tr.ref_latency()
    for key, r in results.items():
        if key.startswith("_") or key == FP32 or "failed" in r:
            continue
        st = stats.setdefault((ls.op, key), [0, 0])
        st[0] += 1
        faster = ("ratio" in r and tr.blend(r, ref_lat) < -RACE_MIN_GAIN) or r.get("dlat", 0.0) < -RACE_MIN_GAIN
        se = r.get("dnmse_se")
        better = isinstance(se, float) and math.isfinite(se) and r.get("dnmse", 0.0) < -SIGNIFICANCE * se
        st[1] += int(bool(faster or better))
        if st[0] >= RACE_LAYERS and st[1] == 0 and (ls.op, key) not in pruned:
            why = (f"{key} on {ls.op}: neither faster nor more accurate than the reference on the first "
                   f"{st[0]} layers; not measured on the others")
            pruned[(ls.op, key)] = why
            tr.log("table", "pruned " + why)


def dominant(tr: Trials) -> List[str]:
    ctx = tr.state.ctx_assign if tr.state.ctx_assign is not None else tr.ref_assign
    return [n for n, k in ctx.items() if k != tr.ref_assign[n]]


def acc_results(tr: Trials, node: str) -> Dict[str, Any]:
    """Accuracy results of a layer's structural candidates: measured in the context (see context_pass)
    when the layer was re-measured there, else in the reference."""
    return tr.state.ctx_results.get(node) or tr.state.group_results.get(node, {})


def sensitivity(tr: Trials) -> Dict[str, float]:
    """Error each layer's reference configuration contributes: the paired proxy change when the layer
    alone goes back to FP32 (all the others as in the reference / the context)."""
    out = {}
    for node in tr.state.group_results:
        fp = acc_results(tr, node).get(FP32, {})
        if "dnmse" in fp:
            out[node] = max(0.0, -fp["dnmse"])
    return out


def context_pass(tr: Trials) -> Tuple[Dict[str, str], Dict[str, Dict[str, Any]]]:
    """When a few layers dominate the reference's error, the other layers' small effects drown in it
    (their paired changes are mostly cross terms with the dominant error). Re-measure the accuracy of the
    other layers' candidates with the dominant layers restored to FP32 — the context every plan within
    a tight budget will have. Latency stays from the reference's in-place timing."""
    st = tr.state
    ctx_assign, ctx_results = dict(tr.ref_assign), {}
    st.ctx_assign, st.ctx_results = ctx_assign, ctx_results
    sens = sensitivity(tr)
    # shares of the reference's measured error (the per-layer sums can fall short of it: interactions)
    total = max(sum(sens.values()), st.ref_point.get("sens_nmse") or 0.0)
    if total <= 0:
        return ctx_assign, ctx_results
    dom = [n for n in sorted(sens, key=lambda n: -sens[n]) if sens[n] >= DOMINANT_SHARE * total]
    dom = [n for n in dom if FP32 in tr.space.layers[n].active()]
    if not dom or len(dom) == len(sens):
        return ctx_assign, ctx_results
    ctx_assign = dict(tr.ref_assign, **{n: FP32 for n in dom})
    st.ctx_assign = ctx_assign
    tr.log("context", f"{', '.join(dom)} carr{'y' if len(dom) > 1 else 'ies'} "
                      f"{100 * sum(sens[n] for n in dom) / total:.0f} % of the reference's error: the "
                      "other layers' accuracy is re-measured with them in FP32")
    ctx_hash = stable_hash(tr.space.config(ctx_assign))
    for node in st.group_results:
        if node in dom:
            continue
        ls = tr.space.layers[node]
        cands = {k: c.config for k, c in ls.structural().items() if k != ls.ref}
        payload = {"node": node, "cands": cands, "ctx": ctx_hash}

        def run(node=node, cands=cands):
            return {"node": node, "results": tr.paired_group(node, cands, ctx_assign)}

        try:
            rec = tr.trial("layer-context", payload, run, stage="layer table", table=True)
        except _TableTime:
            return ctx_assign, ctx_results
        ctx_results[node] = rec["results"]
    return ctx_assign, ctx_results


def variants(tr: Trials) -> Dict[str, Dict[str, Any]]:
    st = tr.state
    sens = sensitivity(tr)
    total = sum(sens.values())
    chosen = [n for n in sorted(sens, key=lambda n: -sens[n]) if sens[n] > 0][: st.variant_layers]
    chosen = [n for n in chosen if any(not c.structural for c in tr.space.layers[n].active().values())]
    out: Dict[str, Dict[str, Any]] = {}
    st.variant_results = out
    if not chosen:
        return out
    tr.log("variants", f"accuracy-only variants (clipping / remedy / rounding) for the {len(chosen)} most "
                       f"sensitive layers ({100 * sum(sens[n] for n in chosen) / max(total, 1e-30):.0f} % of "
                       "the estimated error)")
    primed = False
    for node in chosen:
        ls = tr.space.layers[node]
        cands = {k: c.config for k, c in ls.active().items() if not c.structural}
        ctx = st.ctx_assign if node not in dominant(tr) else tr.ref_assign
        payload = {"node": node, "variants": cands, "ref": stable_hash(tr.space.config(ctx))}

        def run(node=node, cands=cands, ctx=ctx):
            nonlocal primed
            if not primed:
                _prime_observers(tr, chosen)
                primed = True
            return {"node": node, "results": tr.paired_group(node, cands, ctx)}

        try:
            rec = tr.trial("variants", payload, run, stage="variants", table=True)
        except _TableTime:
            return out
        out[node] = rec["results"]
    return out


def _prime_structural(tr: Trials, groups) -> None:
    """Calibrate, in one pass per candidate kind, every activation range the layer table's candidates
    need (e.g. static ranges for layers the reference runs with dynamic activations), instead of one
    calibration pass per candidate build."""
    kinds = sorted({k for _, ls in groups for k in ls.structural() if k not in (ls.ref, FP32)})
    for kind in kinds:
        layers = tr.space.config(tr.ref_assign)
        for n, ls in groups:
            if kind in ls.structural():
                layers[n] = dict(ls.candidates[kind].config)
        try:
            opts = tr.pipe.options(layers)
            tr.pipe.calibrate(tr.pipe.annotate(opts), opts)
        except (HagoError, ValueError, RuntimeError):
            continue    # the candidates' own builds will report the problem


def _prime_observers(tr: Trials, nodes: Sequence[str]) -> None:
    """Calibrate every clipping method the variants need in one pass per method (not one per layer)."""
    methods = sorted({c.config["clipping"] for n in nodes for c in tr.space.layers[n].active().values()
                      if "clipping" in c.config})
    for m in methods:
        layers = tr.space.config(tr.ref_assign)
        for n in nodes:
            if any(c.config.get("clipping") == m for c in tr.space.layers[n].active().values()):
                layers[n] = dict(layers[n], clipping=m)
        opts = tr.pipe.options(layers)
        tr.pipe.calibrate(tr.pipe.annotate(opts), opts)


def make_table(tr: Trials) -> Tuple[Table, Dict[str, Dict[str, Any]]]:
    st = tr.state
    m_ref = st.ref_point["sens_nmse"] if st.ref_point else 0.0
    ref_lat = tr.ref_latency() if st.ref_point else 1.0
    rows, notes = {}, {}
    details: Dict[str, Dict[str, Any]] = {}
    e_ref = sensitivity(tr)
    for node, res in st.group_results.items():
        ls = tr.space.layers[node]
        er = e_ref.get(node, 0.0)
        row = {ls.ref: (er, 0.0)}
        acc = acc_results(tr, node)
        for key, r in res.items():
            if key.startswith("_") or "failed" in r or key not in ls.candidates:
                continue
            a = acc.get(key, r)
            if "failed" in a:
                continue
            e = 0.0 if key == FP32 else cand_err(er, a)
            if "ratio" in r:
                dl = tr.blend(r, ref_lat)
                details.setdefault(node, {})[key] = {
                    "dlat": dl, "dlat_measured": tr.measured_dlat(r), "se": r.get("se"), "nmse": r["nmse"]}
            elif "dlat" in r:
                dl = r["dlat"]
            else:
                continue
            row[key] = (e, dl)
        for key, r in st.variant_results.get(node, {}).items():
            if "failed" in r or key not in ls.candidates:
                continue
            parent = ls.candidates[key].parent or ls.ref
            if parent in row:
                row[key] = (cand_err(er, r), row[parent][1])
        if len(row) > 1:
            rows[node] = row
    total = sum(rows[n][tr.ref_assign[n]][0] for n in rows)
    k = 1.0
    if total > 0 and m_ref > 0:
        k = min(2.0, max(0.5, m_ref / total))
        notes["scale"] = f"per-layer errors scaled by {k:.3f} so that the reference's estimate matches its measure"
    rows = {n: {key: (e * k, dl) for key, (e, dl) in row.items()} for n, row in rows.items()}
    fixed = max(0.0, m_ref - k * total)
    ref = {n: tr.ref_assign[n] for n in rows}
    edges = list(st.edges)
    if edges:
        notes["boundaries"] = (f"{len(edges)} int8-region boundary edges at "
                               f"{st.edge_cost * 1e6:.3g} ppm of the FP32 latency per element")
    fixed_float = {n: tr.ref_assign[n] == FP32 for n in tr.space.layers if n not in rows}
    return Table(rows=rows, ref=ref, ref_latency=ref_lat, fixed_err=fixed, notes=notes, edges=edges,
                 fixed_float=fixed_float), details


def cand_err(e_ref: float, r: Dict[str, Any]) -> float:
    """Error contribution of a candidate: the layer's reference contribution plus the candidate's paired
    change on the sensitivity samples. A change within two standard errors is noise: the candidate then
    counts as marginally worse than the reference, so it is only taken for a latency gain."""
    d, se = r.get("dnmse"), r.get("dnmse_se")
    if d is None:
        return e_ref
    if isinstance(se, float) and math.isfinite(se) and abs(d) <= SIGNIFICANCE * se:
        return e_ref * (1 + 1e-6) + 1e-15
    return max(0.0, e_ref + d)
