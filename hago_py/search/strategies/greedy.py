"""HAGO-style greedy: a path of plans from the fastest to the most accurate, in sensitivity order.

Every layer starts at its fastest candidate. Per layer, the candidates that are worth taking lie on the lower
convex hull of (latency, error); each hull segment buys an error reduction for a latency increase. Taking
the segments of all layers in order of error reduction per unit of latency (the most sensitive, cheapest to
restore layers first) gives a path of plans whose estimated error falls and whose estimated latency rises
monotonically — the greedy solution of the multiple-choice knapsack at every budget along the way. The
search then measures plans along the path by bisection on the user's metric (or on the measured latency).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

from .table import Table


def hull(points: Dict[str, Tuple[float, float]], start: Optional[str] = None) -> List[str]:
    """Keys of the lower convex hull of {key: (err, dlat)} from ``start`` (default: the fastest point) to the
    most accurate one."""
    if not points:
        return []
    order = sorted(points, key=lambda k: (points[k][1], points[k][0], k))
    out = [start if start is not None else order[0]]
    while True:
        e0, l0 = points[out[-1]]
        best, best_slope = None, 0.0
        for k in order:
            e, l = points[k]
            if e >= e0 - 1e-15:
                continue
            if l <= l0:      # more accurate and not slower: always take it (infinite slope)
                slope = float("inf")
            else:
                slope = (e0 - e) / (l - l0)
            if best is None or slope > best_slope + 1e-18 or (
                    abs(slope - best_slope) <= 1e-18 and points[k][0] < points[best][0]):
                best, best_slope = k, slope
        if best is None:
            return out
        out.append(best)


def greedy_path(table: Table, start: Optional[Mapping[str, str]] = None) -> List[Dict[str, str]]:
    """Assignments (node -> key, all layers named) from the fastest plan (or from ``start``, e.g. the
    reference: HAGO's restore-in-sensitivity-order path) to the most accurate one."""
    begin, segments = {}, []
    for node, pts in table.rows.items():
        h = hull(pts, None if start is None else start.get(node, table.ref[node]))
        begin[node] = h[0]
        for a, b in zip(h, h[1:]):
            de = pts[a][0] - pts[b][0]
            dl = pts[b][1] - pts[a][1]
            slope = float("inf") if dl <= 0 else de / dl
            segments.append((slope, de, node, b))
    # steepest first; ties: larger error reduction first; then a stable order
    order = list(table.rows)
    segments.sort(key=lambda s: (-s[0], -s[1], order.index(s[2])))
    cur = table.full(begin)
    path = [dict(cur)]
    for _, _, node, key in segments:
        cur[node] = key
        path.append(dict(cur))
    return path


def sensitivity_order(table: Table) -> List[str]:
    """Layers by the error their reference configuration contributes (most sensitive first)."""
    return sorted(table.rows, key=lambda n: -table.rows[n][table.ref[n]][0])
