"""The float-island stage: plans with the first / last layers of the model in float, measured end to end.

Input: the trial runner (best feasible point so far, Table, boundary edges in its state); output: the
measured points it adds to the state.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from .space import FP32
from .trials import Trials

ISLAND_DEPTH = 3                 # float islands at the model's inputs / outputs: up to this many layers deep
ISLAND_MARGIN = 0.9              # ... measured unless estimated > 10 % slower than the best plan (estimates are noisy)


def io_islands(edges: Sequence[Any], layers: Dict[str, Any]) -> List[Tuple[str, List[str]]]:
    """Chains of the first / last 1..ISLAND_DEPTH layers from each model input / output along single-edge
    paths: a float island there pays a boundary on one side only (the model's I/O is float), and the first
    layers (few channels, large maps) are where the INT8 kernels gain least. ``edges``: boundaries.Edge
    objects; ``layers``: the search space's layers (node -> LayerSpace)."""
    succ: Dict[str, List[str]] = {}
    pred: Dict[str, List[str]] = {}
    for e in edges:
        if e.u is not None and e.v is not None:
            succ.setdefault(e.u, []).append(e.v)
            pred.setdefault(e.v, []).append(e.u)
    out: List[Tuple[str, List[str]]] = []
    for e in edges:
        start, nxt, side = (e.v, succ, "input") if e.u is None else (e.u, pred, "output") if e.v is None \
            else (None, None, "")
        if start is None or FP32 not in layers[start].active():
            continue
        chain = [start]
        while len(chain) < ISLAND_DEPTH and len(nxt.get(chain[-1], [])) == 1:
            n = nxt[chain[-1]][0]
            if FP32 not in layers[n].active() or n in chain:
                break
            chain.append(n)
        out += [(side, chain[:k]) for k in range(1, len(chain) + 1)]
    return out


def island_trials(tr: Trials) -> None:
    """Measure float islands at the model's inputs / outputs end to end from the best feasible plan unless the
    estimates put them clearly (ISLAND_MARGIN) slower: single-layer in-place timings resolve a 2-4 % island
    poorly (on EfficientNet-Lite0 the stem + first block in float measured 2-4 % faster in multi-session A/B
    runs, while the estimate from the layers' own timings put it > 3 % slower). At most 2 * ISLAND_DEPTH
    plans per model input / output."""
    st = tr.state
    best = tr.best(st.timing["speed_tie"])
    base = st.full[best["id"]] if best is not None else dict(tr.ref_assign)
    floor = ISLAND_MARGIN * (best["speedup"] if best is not None else st.ref_point["speedup"])
    for side, chain in io_islands(st.edge_objs, tr.space.layers):
        a = dict(base, **{n: FP32 for n in chain})
        if a == base or tr.point_key(a) in st.points:
            continue
        if st.objective == "speed" and st.table.speedup(a) < floor:
            continue        # clearly slower even by the noisy estimates
        tr.eval_plan(a, "islands", f"float island at the model {side}: {', '.join(chain)}")
