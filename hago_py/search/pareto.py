"""Pareto front over (speed-up vs FP32, metric) and the choice of the point for the budgets.

A point is a dict with at least ``metric`` (higher is better), ``speedup`` (FP32 latency / latency, >1 is
faster), ``drop`` (FP32 metric - metric) and ``latency`` ("measured" | "predicted"). The FP32 model is a point
(speed-up 1, drop 0) but is never *chosen*: a search returns a quantized model or a SearchError.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..errors import SearchError

EPS = 1e-12


def pareto_front(points: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Points not dominated in (speedup, metric), sorted by speed-up (slowest first)."""
    pts = sorted(points, key=lambda p: (-p["speedup"], -p["metric"]))
    front, best_metric = [], -float("inf")
    for p in pts:
        if p["metric"] > best_metric + EPS:
            front.append(p)
            best_metric = p["metric"]
    return sorted(front, key=lambda p: p["speedup"])


def feasible(p: Dict[str, Any], accuracy_budget: Optional[float], latency_budget: Optional[float]) -> bool:
    ok = True
    if accuracy_budget is not None:
        ok &= p["drop"] <= accuracy_budget + EPS
    if latency_budget is not None:
        ok &= p["speedup"] >= latency_budget - EPS
    return bool(ok)


def better(a: Dict[str, Any], b: Optional[Dict[str, Any]], objective: str) -> bool:
    """Is ``a`` preferred to ``b`` under ``objective`` ('speed': fastest, then best metric; 'metric': the reverse)."""
    if b is None:
        return True
    ka = (a["speedup"], a["metric"]) if objective == "speed" else (a["metric"], a["speedup"])
    kb = (b["speedup"], b["metric"]) if objective == "speed" else (b["metric"], b["speedup"])
    return ka > kb


def choose(points: Sequence[Dict[str, Any]], accuracy_budget: Optional[float], latency_budget: Optional[float],
           objective: str, tie: float = 0.0) -> Optional[Dict[str, Any]]:
    """The preferred feasible quantized point. With objective 'speed' and ``tie`` > 0, every feasible point
    within ``tie`` (relative) of the fastest one counts as equally fast and the most accurate of them wins:
    a 1 % speed-up that the timing cannot resolve is not worth a measured accuracy loss."""
    pts = [p for p in points if p.get("quantized", True) and feasible(p, accuracy_budget, latency_budget)]
    if objective == "speed" and tie > 0 and pts:
        fastest = max(p["speedup"] for p in pts)
        pts = [p for p in pts if p["speedup"] >= fastest * (1.0 - tie)]
        return max(pts, key=lambda p: (p["metric"], p["speedup"]))
    best = None
    for p in pts:
        if better(p, best, objective):
            best = p
    return best


def closest(points: Sequence[Dict[str, Any]], accuracy_budget: Optional[float],
            latency_budget: Optional[float]) -> Optional[Dict[str, Any]]:
    """The quantized point nearest to meeting both budgets (smallest relative violation)."""
    pts = [p for p in points if p.get("quantized", True)]
    if not pts:
        return None

    def violation(p):
        v = 0.0
        if accuracy_budget is not None:
            v += max(0.0, p["drop"] - accuracy_budget) / max(abs(accuracy_budget), abs(p.get("fp32_metric", 1.0))
                                                             * 1e-3, 1e-9)
        if latency_budget is not None:
            v += max(0.0, latency_budget - p["speedup"]) / max(latency_budget, 1e-9)
        return v

    return min(pts, key=lambda p: (violation(p), -p["speedup"], -p["metric"]))


def budget_error(points: Sequence[Dict[str, Any]], accuracy_budget: Optional[float], latency_budget: Optional[float],
                 metric_name: str, fp32_metric: float, stopped_early: bool = False) -> SearchError:
    """SearchError naming the budget, the closest point found and what to relax."""
    c = closest(points, accuracy_budget, latency_budget)
    asked = []
    if accuracy_budget is not None:
        asked.append(f"accuracy_budget={accuracy_budget:g} (max drop of {metric_name}, FP32 = {fp32_metric:.6g})")
    if latency_budget is not None:
        asked.append(f"latency_budget={latency_budget:g}x (min speed-up vs FP32)")
    msg = "no quantized plan meets " + " and ".join(asked)
    if c is None:
        msg += ": the search measured no quantized plan"
        if stopped_early:
            msg += " before time_budget ran out; raise time_budget"
        return SearchError(msg, closest=None)
    msg += (f"; closest point: {metric_name} {c['metric']:.6g} (drop {c['drop']:.4g}) at {c['speedup']:.2f}x "
            f"({c['latency']}, {c.get('n_fp32', 0)} of {c.get('n_layers', '?')} layers FP32)")
    relax = []
    if accuracy_budget is not None and c["drop"] > accuracy_budget + EPS:
        relax.append(f"accuracy_budget to >= {c['drop']:.4g}")
    if latency_budget is not None and c["speedup"] < latency_budget - EPS:
        relax.append(f"latency_budget to <= {c['speedup']:.2f}")
    if relax:
        msg += "; relax " + " and ".join(relax)
    if stopped_early:
        msg += " (time_budget stopped the search early: a larger one may find more)"
    return SearchError(msg, closest=dict(c))
