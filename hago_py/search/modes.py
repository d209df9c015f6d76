"""The strategy stage: end-to-end plans chosen from the layer table and measured.

Input: the trial runner with the Table, budgets and reference point in its state; output: the measured
points it adds to the state. ``accuracy_mode``: the fastest plan within the accuracy budget (HAGO's greedy
restore path and the latency-first greedy path, each by bisection on the measured metric, then the integer
program around the boundary found); ``latency_mode``: the most accurate plan within the latency budget.
Both end with the float-island trials (islands.py) and refinement (refinement.py).
"""
from __future__ import annotations

from typing import Dict, List

from .islands import island_trials
from .refinement import refine
from .strategies import greedy_path, milp_solve
from .trials import Trials


def full_path(tr: Trials) -> List[Dict[str, str]]:
    return [dict(tr.ref_assign, **a) for a in greedy_path(tr.state.table)]


def accuracy_mode(tr: Trials) -> None:
    """Fastest plan with drop <= accuracy budget (and speed-up >= latency budget when given)."""
    st = tr.state
    table = st.table
    acc_ok = lambda p: p["drop"] <= st.acc_b + 1e-12  # noqa: E731
    # 1. HAGO's greedy from the sensitivity order: restore layers from the reference, most sensitive per
    #    latency first, until the metric fits (bisection). Plans near the measured reference first.
    if not acc_ok(st.ref_point):
        path = [dict(tr.ref_assign, **a) for a in greedy_path(table, start=tr.ref_assign)]
        tr.log("greedy", f"restore path from the reference: {len(path)} plans, est. error "
                         f"{table.err(path[0]):.3g} -> {table.err(path[-1]):.3g}, est. "
                         f"{table.speedup(path[0]):.2f}x -> {table.speedup(path[-1]):.2f}x")
        bisect(tr, path, acc_ok, "restore path", first=1)
    # 2. the fastest -> most accurate path (latency first): bisection for the fastest plan that fits,
    #    among the plans estimated faster than the best feasible one measured so far
    path = full_path(tr)
    tr.log("greedy", f"greedy path: {len(path)} plans from est. {table.speedup(path[0]):.2f}x / error "
                     f"{table.err(path[0]):.3g} to {table.speedup(path[-1]):.2f}x / error "
                     f"{table.err(path[-1]):.3g}")
    keep = [a for a in path if tr.promising(a)]
    if len(keep) < len(path):
        tr.log("greedy", f"{len(path) - len(keep)} slower plans of the path cannot beat the best feasible "
                         f"plan measured so far ({tr.best()['speedup']:.2f}x): not measured")
    path = keep or path[:1]
    errs = [table.err(a) for a in path]
    ref_err = max(table.err(tr.ref_assign), 1e-12)
    feas = [p for p in st.points.values() if tr.feasible(p)]
    if feas:     # start at the first plan estimated no worse than a plan measured feasible
        target = max(table.err(st.full[p["id"]]) for p in feas)
    elif st.ref_point["drop"] > 0:
        slope = st.ref_point["drop"] / ref_err          # metric drop per unit of estimated error
        target = 0.8 * st.acc_b / slope
    else:
        target = float("inf")
    guess = next((i for i, e in enumerate(errs) if e <= target), len(path) - 1)
    lo, hi = bisect(tr, path, acc_ok, "greedy path", first=guess)
    # 3. the integer program at the estimated errors around the boundary the measurements found
    feas = [p for p in st.points.values() if tr.feasible(p)]
    levels = [table.err(path[hi])]
    if lo >= 0:
        levels += [0.5 * (table.err(path[hi]) + table.err(path[lo])), table.err(path[lo])]
    if feas:       # the slack the measured feasible plans show
        levels.append(max(p.get("est_err", levels[0]) for p in feas))
    levels = sorted(set(round(e, 15) for e in levels))
    tr.log("milp", f"integer program (min latency s.t. est. error <= E) at E = "
                   f"{', '.join(f'{e:.3g}' for e in levels)}")
    for e in levels:
        a = milp_solve(table, objective="latency", max_err=e)
        if a is not None and tr.promising(dict(tr.ref_assign, **a)):
            tr.eval_plan(dict(tr.ref_assign, **a), "milp", f"MILP min latency, est. error <= {e:.3g}")
    island_trials(tr)
    refine(tr, faster=True)


def bisect(tr: Trials, path, ok, name: str, first: int = 0):
    """Smallest index of ``path`` whose measured plan satisfies ``ok`` (path assumed monotone). Returns
    (lo, hi): path[lo] failed (-1: none measured), path[hi] passed (len-1 if never measured)."""
    lo, hi = -1, len(path) - 1
    guess = first
    while hi - lo > 1:
        mid = guess if lo < guess < hi else (lo + hi) // 2
        guess = -1
        p = tr.eval_plan(path[mid], "greedy", f"{name} step {mid}/{len(path) - 1}")
        if ok(p):     # accuracy only: a plan with no layer left quantized still bounds the path
            hi = mid
        else:
            lo = mid
    return lo, hi


def latency_mode(tr: Trials) -> None:
    """Most accurate plan with speed-up >= latency budget."""
    S = tr.state.latency_budget
    table = tr.state.table
    path = full_path(tr)
    speeds = [table.speedup(a) for a in path]
    tr.log("greedy", f"greedy path: {len(path)} plans, est. speed-up {speeds[0]:.2f}x .. {speeds[-1]:.2f}x")
    fast_ok = lambda p: p["speedup"] >= S - 1e-12  # noqa: E731
    lo, hi = -1, len(path)             # path[lo] meets S (virtual -1: unknown), path[hi] misses it (virtual)
    first = tr.eval_plan(path[0], "greedy", "greedy path: fastest plan")
    if not fast_ok(first):
        a = milp_solve(table, objective="latency")
        if a is not None:
            tr.eval_plan(dict(tr.ref_assign, **a), "milp", "MILP minimum latency")
        return
    lo = 0
    guess = max([i for i, s in enumerate(speeds) if s >= S] or [0])
    while hi - lo > 1:
        mid = guess if lo < guess < hi else (lo + hi) // 2
        guess = -1
        p = tr.eval_plan(path[mid], "greedy", f"greedy path step {mid}/{len(path) - 1}")
        if fast_ok(p):
            lo = mid
        else:
            hi = mid
    for margin in (1.0, 1.03, 1.06):
        a = milp_solve(table, objective="error", max_latency=1.0 / (S * margin))
        if a is not None:
            tr.eval_plan(dict(tr.ref_assign, **a), "milp", f"MILP min error, est. speed-up >= {S * margin:.2f}x")
    island_trials(tr)
    refine(tr, faster=False)
