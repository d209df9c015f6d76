"""Hardware-aware search: per-layer configurations chosen by measured accuracy and latency.

``run_search(pipe, evaluate=..., accuracy_budget=..., latency_budget=..., time_budget=..., checkpoint=...,
resume=...)`` is what ``hago_py.quantize(..., search=True)`` calls; see hago_py.search.search for the
algorithm, space.py for the search space derived from the spec, evaluators.py for the metric / proxy /
latency sources, strategies/ for greedy, MILP and refinement, pareto.py for the front and the choice.
"""
from .search import run_search

__all__ = ["run_search"]
