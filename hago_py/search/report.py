"""The result stage: the choice, the final end-to-end build and the report's ``search`` section.

Input: the trial runner with every measured point in its state. ``finish`` chooses the fastest plan within
the accuracy budget (or the most accurate within the latency budget), builds it and hands it to
hago_py.result.finish (deployability, output gate, artifact check, latency through the search's latency
backend),
then adds the Pareto front, the chosen point and ``report["search"]``; a SearchError naming the closest
point when no quantized plan meets the budgets. Output: a hago_py.result.Result.
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..quant.plan import QuantPlan
from ..result import Result, finish as finish_result
from .pareto import budget_error, choose, pareto_front
from .space import FP32
from .trials import Trials


def finish(tr: Trials) -> Result:
    st = tr.state
    points = list(st.points.values())
    chosen = choose(points, st.acc_b, st.latency_budget, st.objective,
                    tie=st.timing["speed_tie"]) if st.budgets_set else None
    fp32_metric = st.fp32_metric if st.fp32_metric is not None else 1.0
    fp32_point = {"id": "fp32", "stage": "reference", "note": "FP32 model", "metric": fp32_metric,
                  "drop": 0.0, "speedup": 1.0, "latency": tr.lat_kind, "metric_kind": tr.metric_kind,
                  "assign": {n: FP32 for n in tr.space.layers}, "plan": None, "n_fp32": len(tr.space.layers),
                  "n_layers": len(tr.space.layers), "quantized": False}
    front = pareto_front(points + [fp32_point])
    if chosen is None:
        err = budget_error(points, st.acc_b if st.budgets_set else st.accuracy_budget, st.latency_budget,
                           tr.metric_name, st.fp32_metric if st.fp32_metric is not None else float("nan"),
                           stopped_early=st.stopped_early)
        tr.ckpt.save({"done": True, "error": str(err)})
        err.pareto = front
        raise err
    full = st.full[chosen["id"]]
    built = tr.build(full)
    measured = tr.lat_kind == "measured"
    result = finish_result(tr.pipe, built, measure_latency=measured, backend=tr.timer)
    if not measured:
        s = chosen["speedup"]
        result.report["latency"] = {"measured": False, "speedup": s, "threads": tr.opts.threads,
                                    "speedup_spread": {"median": s, "p10": s, "p90": s},
                                    "source": tr.lat.describe(), "measured_on": tr.lat.where()}
    for p in front:
        p["on_front"] = True
    chosen = dict(chosen, chosen=True)
    result.pareto = front
    result.chosen = chosen
    result.report["search"] = search_report(tr, chosen, front, built.plan)
    result.report["timings_s"]["search"] = st.elapsed()
    if st.hybrid_info:   # the hybrid selection that gave the stage "hybrid" point
        result.report["hybrid"] = st.hybrid_info
    tr.ckpt.save({"done": True, "chosen": chosen["id"]})
    tr.log("done", f"chosen plan {chosen['id'][:8]}: {tr.metric_name} {chosen['metric']:.6g} (drop "
                   f"{chosen['drop']:+.4g}) at {chosen['speedup']:.3f}x ({chosen['latency']}); "
                   f"{st.n_new} trials measured, {st.n_replayed} replayed, {st.elapsed():.0f} s")
    result.report["search"]["log"] = list(st.log_lines)
    return result


def search_report(tr: Trials, chosen, front, plan: QuantPlan) -> Dict[str, Any]:
    st = tr.state
    trials = []
    for rec in tr.ckpt.records():
        t = {k: rec.get(k) for k in ("index", "kind", "stage", "metric", "speedup", "latency", "seconds", "key")
             if rec.get(k) is not None}
        if rec.get("kind") == "plan":
            t["assign"] = rec.get("assign")
            t["proxy_fidelity"] = (rec.get("proxy") or {}).get("fidelity")
        elif rec.get("kind") in ("layer", "variants"):
            t["node"] = rec.get("node")
            t["candidates"] = {k: {kk: v[kk] for kk in ("nmse", "ratio", "se", "dlat", "failed") if kk in v}
                               for k, v in (rec.get("results") or {}).items() if not k.startswith("_")}
        trials.append(t)
    n_layer_cands = sum(len(t.get("candidates") or {}) for t in trials if t["kind"] in ("layer", "variants"))
    peers = None
    if st.peers is not None:
        from ..report.plot import load_peers

        peers = load_peers(st.peers)
    return {
        "metric": {"kind": tr.metric_kind, "name": tr.metric_name, "fp32": st.fp32_metric,
                   "definition": tr.user.describe() if tr.user else tr.proxy.describe(),
                   "higher_is_better": True},
        "budgets": {"accuracy": st.acc_b, "accuracy_note": st.budget_note, "latency": st.latency_budget,
                    "time_s": st.time_budget},
        "objective": ("fastest plan within the accuracy budget" if st.objective == "speed"
                      else "most accurate plan within the latency budget"),
        "latency_source": {"kind": tr.lat_kind, "description": tr.lat.describe(), "measured_on": tr.lat.where(),
                           "target_reachable": tr.reachable, "why": tr.reach_why},
        "space": tr.space.describe(),
        "remedy": tr.remedy_info,
        "layers": layer_rows(tr, chosen, plan),
        "pareto": [_public(p) for p in front],
        "points": [_public(p) for p in st.points.values()],
        "chosen": _public(chosen),
        "trials": trials,
        "counts": {"trials": len(trials), "measured_this_run": st.n_new, "replayed": st.n_replayed,
                   "plan_trials": sum(1 for t in trials if t["kind"] == "plan"),
                   "layer_candidates": n_layer_cands},
        "search_s": st.elapsed(),
        "stopped_early": st.stopped_early,
        "checkpoint": str(tr.ckpt.path) if tr.ckpt.path else None,
        "table_notes": dict(st.table.notes) if st.table else {},
        "table": table_report(tr),
        "boundaries": st.edge_info,
        "peers": peers,
    }


def table_report(tr: Trials) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """The per-layer estimates the strategies used: error contribution and latency change (fraction of the
    FP32 latency; measured, shrunk towards the cost model where noisier than the effect, or predicted)."""
    st = tr.state
    if not st.table:
        return {}
    out = {}
    for node, row in st.table.rows.items():
        out[node] = {}
        for key, (e, dl) in row.items():
            d = {"err": e, "dlat": dl, "latency": tr.lat_kind}
            extra = st.table_details.get(node, {}).get(key)
            if extra:
                d["dlat_measured"] = extra["dlat_measured"]
                d["dlat_se"] = extra.get("se")
            out[node][key] = d
    return out


def layer_rows(tr: Trials, chosen, plan: QuantPlan) -> List[Dict[str, Any]]:
    full = tr.state.full[chosen["id"]]
    shapes = {}
    try:
        shapes = tr.shapes()
    except Exception:  # shapes are decoration for the report: never fail the search on them
        pass
    table = tr.state.table
    sens = {n: table.rows[n][table.ref[n]][0] for n in table.rows} if table else {}
    total = sum(sens.values()) or 1e-30
    rank = {n: i + 1 for i, n in enumerate(sorted(sens, key=lambda n: -sens[n]))}
    nodes = {n.name: n for n in tr.pipe.prepared.graph.node}
    rows = []
    for node, ls in tr.space.layers.items():
        key = full[node]
        row_t = table.rows.get(node, {}) if table else {}
        dl_fp = row_t.get(FP32, (0, None))[1]
        dl_ch = row_t.get(key, (0, None))[1]
        saving = (dl_fp - dl_ch) if (dl_fp is not None and dl_ch is not None) else None
        out = nodes[node].output[0] if node in nodes and nodes[node].output else None
        lp = plan.layers.get(node)
        rows.append({
            "node": node, "op": ls.op, "weight_shape": ls.weight_shape, "output_shape": shapes.get(out),
            "config": ls.candidates[key].label, "key": key, "reference": ls.candidates[ls.ref].label,
            "quantized": bool(lp.quantize) if lp else key != FP32,
            "sensitivity": sens.get(node), "sensitivity_share": sens.get(node, 0.0) / total if node in sens else None,
            "sensitivity_rank": rank.get(node), "latency_saving": saving,
            "latency_share": saving,
            "dlat_fp32": dl_fp, "why": _why(tr, node, ls, key, row_t, sens, rank, saving, lp),
        })
    return rows


def _why(tr: Trials, node, ls, key, row, sens, rank, saving, lp) -> str:
    n = len(sens)
    r = rank.get(node)
    where = f"sensitivity rank {r}/{n}" if r else "not in the layer table"
    quant_dl = [dl for k, (e, dl) in row.items() if k != FP32 and tr.space.layers[node].candidates[k].structural]
    if key == FP32:
        if row and FP32 in row and quant_dl and row[FP32][1] < min(quant_dl):
            return (f"kept FP32: every INT8 variant was {'measured' if tr.lat_kind == 'measured' else 'predicted'}"
                    f" slower here (FP32 saves {100 * (min(quant_dl) - row[FP32][1]):.1f} % of the FP32 model time)")
        return f"kept FP32: {where}; quantizing it costs more accuracy than the budget leaves"
    if lp is not None and not lp.quantize:
        return f"FP32 in the plan: {lp.reason}"
    s = f"quantized ({where}"
    if saving is not None:
        s += f", saves {100 * saving:.1f} % of the FP32 model time vs keeping it FP32"
    s += ")"
    if key != ls.ref:
        c = ls.candidates[key]
        if c.structural:
            s += f"; {c.label} instead of the reference {ls.candidates[ls.ref].label}"
            if key in row:
                s += f" (est. {-100 * row[key][1]:+.1f} % time, error {row[key][0]:.2g} vs {row[ls.ref][0]:.2g})"
        else:
            s += f"; variant {key.split('+', 1)[1]} lowered the layer's error ({row.get(key, (0,))[0]:.2g} vs " \
                 f"{row.get(ls.ref, (0,))[0]:.2g})"
    return s


def _public(p: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in p.items()}
