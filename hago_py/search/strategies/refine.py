"""Refinement around the best measured plan: single-layer moves ranked by the estimates, and the choice of
the top candidates to re-measure together (one interleaved timing run, so their ratios are comparable)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

from ..space import FP32
from .table import Table


def _one_layer_plans(table: Table, assign: Mapping[str, str], moves) -> List[Dict[str, str]]:
    """For each (layer, candidate): the full assignment ``assign`` with that one layer moved."""
    out = []
    for n, key in moves:
        a = table.full(assign)
        a[n] = key
        out.append(a)
    return out


def faster_moves(table: Table, assign: Mapping[str, str], k: int = 3) -> List[Dict[str, str]]:
    """Up to ``k`` plans that each move one layer to a faster candidate — or, where the table has
    int8-region boundaries, two int8 layers joined by an edge to float together (an island neither would
    form alone) — cheapest in estimated error per latency saved first (spend the remaining accuracy slack).
    Savings are the table's full latency model, so growing an existing float island counts the boundary it
    removes."""
    base = table.full(assign)
    e0, l0 = table.err(base), table.latency(base)

    def move(change: Dict[str, str]):
        """(error added per latency saved, -saving, change, plan) if the change is estimated faster."""
        a = dict(base, **change)
        e, lat = table.err(a), table.latency(a)
        return (max(e - e0, 0.0) / (l0 - lat), -(l0 - lat), sorted(change.items()), a) if lat < l0 - 1e-12 else None

    moves = []
    for n, pts in table.rows.items():
        found = [m for m in (move({n: key}) for key in pts if key != base[n]) if m is not None]
        if found:        # per layer: the cheapest faster candidate (first of equal costs, in row order)
            moves.append(min(found, key=lambda m: m[0]))
    for u, v, _ in table.edges:
        if u in table.rows and v in table.rows and FP32 in table.rows[u] and FP32 in table.rows[v] \
                and not table.is_float(base, u) and not table.is_float(base, v):
            m = move({u: FP32, v: FP32})
            if m is not None:
                moves.append(m)
    moves.sort(key=lambda m: (m[0], m[1], m[2]))
    return [m[3] for m in moves[:k]]


def accurate_moves(table: Table, assign: Mapping[str, str], k: int = 3) -> List[Dict[str, str]]:
    """Up to ``k`` plans that each move one layer to a more accurate candidate, largest error reduction per
    latency added first (spend the remaining latency slack)."""
    moves = []
    for n, pts in table.rows.items():
        cur = assign.get(n, table.ref[n])
        e0, l0 = pts[cur]
        best = None
        for key, (e, l) in pts.items():
            if e < e0 - 1e-15:
                gain = (e0 - e) / max(l - l0, 1e-9)
                if best is None or gain > best[0]:
                    best = (gain, key)
        if best is not None:
            moves.append((-best[0], n, best[1]))
    moves.sort()
    return _one_layer_plans(table, assign, [(n, key) for _, n, key in moves[:k]])


def top_candidates(points: Sequence[Dict], objective: str, k: int = 4, window: float = 0.1) -> List[Dict]:
    """The best ``k`` feasible points within ``window`` (relative) of the best on the objective."""
    if not points:
        return []
    if objective == "speed":
        best = max(p["speedup"] for p in points)
        sel = [p for p in points if p["speedup"] >= best * (1 - window)]
        sel.sort(key=lambda p: (-p["speedup"], -p["metric"]))
    else:
        best = max(p["metric"] for p in points)
        span = max(abs(best), 1e-12) * window * 0.1
        sel = [p for p in points if p["metric"] >= best - span]
        sel.sort(key=lambda p: (-p["metric"], -p["speedup"]))
    return sel[:k]
