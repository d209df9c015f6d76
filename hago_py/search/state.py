"""The search's state: plain data, passed from stage to stage.

Settings fixed for a run (budgets, limits, timing), the progress counters and log, what the reference
stage found (FP32 metric, budgets, reference point), every measured plan (``points``, with the full
per-layer assignment in ``full``), and the layer-table stage's outputs (per-layer results, context,
variants, boundary model, the Table the strategies use). Everything in it follows from the trial records
of the checkpoint (checkpoint.py): a resumed run replays them and rebuilds the same state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .strategies import Table

TABLE_SHARE = 0.6                # share of time_budget the layer table may use before strategies start
# speed_tie: speed-ups within this relative margin of the fastest feasible plan count as equal, and the most
# accurate of them is chosen (two ORT sessions of one identical model time up to ~4 % apart on a shared VM)
DEFAULT_TIMING = {"plan_repeats": 30, "plan_min_time_s": 1.5, "layer_repeats": 15, "layer_min_time_s": 0.4,
                  "retime_min_time_s": 3.0, "speed_tie": 0.02}


class _OutOfTime(Exception):
    pass


class _TableTime(_OutOfTime):
    """The layer table's share of time_budget is spent: the strategies go on with a partial table."""


class _TrialLimit(Exception):
    pass


@dataclass
class SearchState:
    # settings (fixed for the run)
    accuracy_budget: Optional[float]
    latency_budget: Optional[float]
    time_budget: Optional[float]
    max_plan_trials: int
    refine_moves: int
    variant_layers: int
    timing: Dict[str, float]
    peers: Any = None                    # for the report: a list of {"name", "speedup", "drop"} or a path
    t0: float = field(default_factory=time.perf_counter)
    deadline: Optional[float] = None
    table_deadline: Optional[float] = None
    # progress
    log_lines: List[Dict[str, Any]] = field(default_factory=list)
    n_new: int = 0
    n_replayed: int = 0
    n_plan_trials: int = 0
    stopped_early: bool = False
    # reference stage: the FP32 metric, the budgets that follow from it, the reference plan's point
    fp32_metric: Optional[float] = None
    acc_b: Optional[float] = None
    budget_note: str = ""
    objective: Optional[str] = None      # "speed" | "metric"; None until the budgets are set
    ref_point: Optional[Dict[str, Any]] = None
    hybrid_info: Optional[Dict[str, Any]] = None
    # every measured plan, by point key, and its full per-layer assignment
    points: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    full: Dict[str, Dict[str, str]] = field(default_factory=dict)
    # layer-table stage
    group_results: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    pruned_kinds: Dict[Tuple[str, str], str] = field(default_factory=dict)
    ctx_assign: Optional[Dict[str, str]] = None
    ctx_results: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    variant_results: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    edges: List[Tuple[str, str, float]] = field(default_factory=list)
    edge_cost: float = 0.0
    edge_info: Dict[str, Any] = field(default_factory=dict)
    edge_objs: List[Any] = field(default_factory=list)
    table: Optional[Table] = None
    table_details: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time_budget is not None:
            self.deadline = self.t0 + self.time_budget
            self.table_deadline = self.t0 + TABLE_SHARE * self.time_budget

    @property
    def budgets_set(self) -> bool:
        return self.objective is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, table: bool = False) -> bool:
        d = self.table_deadline if table else self.deadline
        return d is not None and time.perf_counter() > d
