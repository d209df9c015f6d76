"""The refinement stage: single-layer moves (strategies/refine.py) from the best feasible plan, measured end
to end while they improve it. Input: the trial runner (Table, points in its state); output: the measured
points it adds to the state."""
from __future__ import annotations

from .pareto import choose
from .strategies import accurate_moves, faster_moves
from .trials import Trials


def refine(tr: Trials, faster: bool) -> None:
    st = tr.state
    best = tr.best(st.timing["speed_tie"])
    if best is None:
        return
    tried = 0
    while tried < st.refine_moves:
        full = st.full[best["id"]]
        moves = faster_moves(st.table, full, st.refine_moves) if faster else \
            accurate_moves(st.table, full, st.refine_moves)
        moves = [m for m in moves if tr.point_key(m) not in st.points]
        if not moves:
            break
        improved = False
        for m in moves:
            if tried >= st.refine_moves:
                break
            changed = [n for n in m if m[n] != full[n]]
            p = tr.eval_plan(m, "refine", "refine: " + ", ".join(
                f"{n} -> {tr.space.label(n, m[n])}" for n in changed))
            tried += 1
            if tr.feasible(p) and choose([p, best], st.acc_b, st.latency_budget, st.objective) is p:
                best, improved = p, True
                break
        if not improved:
            break
