"""Per-layer estimates the strategies optimise over: for each layer and candidate, the estimated error
contribution (proxy units, >= 0, FP32 = 0) and the latency change vs the reference plan (fraction of the
FP32 model's latency; negative = faster), measured one layer at a time in the reference plan.

Errors are additive. Latency is additive up to the int8-region boundaries (see search/boundaries.py): with
``edges`` (u, v, cost) — u / v a layer name, or None for the model's float inputs / outputs —

    latency(plan) = ref_latency + sum_L dlat_L(c_L) - sum_{L flipped} corr_L + B(plan) - B(ref)

where B(plan) = sum of the costs of the edges whose two ends differ in precision (float vs int8), and corr_L
is the boundary change that flipping L alone in the reference causes (already inside its measured dlat_L).
Flipping one layer alone gives back exactly its measured dlat; a run of adjacent float layers pays the
boundaries around the run only. Without edges this is the plain sum. Interactions beyond that are left to
the end-to-end trials.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Mapping, Optional, Tuple

from ..space import FP32

EdgeCost = Tuple[Optional[str], Optional[str], float]


@dataclass
class Table:
    rows: Dict[str, Dict[str, Tuple[float, float]]]      # node -> key -> (err, dlat)
    ref: Dict[str, str]                                  # node -> reference key (dlat 0)
    ref_latency: float                                   # reference latency / FP32 latency
    fixed_err: float = 0.0                               # error of layers without rows (kept at reference)
    notes: Dict[str, str] = field(default_factory=dict)
    edges: List[EdgeCost] = field(default_factory=list)  # boundary costs (fraction of FP32 latency)
    fixed_float: Dict[str, bool] = field(default_factory=dict)   # layers without rows: float in every plan?

    def err(self, assign: Mapping[str, str]) -> float:
        return self.fixed_err + sum(r[assign.get(n, self.ref[n])][0] for n, r in self.rows.items())

    def is_float(self, assign: Mapping[str, str], node: Optional[str]) -> bool:
        if node is None:
            return True
        if node in self.rows:
            return assign.get(node, self.ref[node]) == FP32
        return bool(self.fixed_float.get(node, False))

    def boundary(self, assign: Mapping[str, str]) -> float:
        return sum(c for u, v, c in self.edges if self.is_float(assign, u) != self.is_float(assign, v))

    @cached_property
    def corrections(self) -> Dict[str, float]:
        """corr_L: the boundary change of flipping layer L alone (float <-> int8) in the reference."""
        b_ref = self.boundary(self.ref)
        touched = {n for e in self.edges for n in e[:2]}
        return {n: self.boundary(dict(self.ref, **{n: "_int8" if self.ref[n] == FP32 else FP32})) - b_ref
                for n in self.rows if n in touched}

    def latency(self, assign: Mapping[str, str]) -> float:
        lat = self.ref_latency + sum(r[assign.get(n, self.ref[n])][1] for n, r in self.rows.items())
        if not self.edges:
            return lat
        corr = self.corrections
        for n, c in corr.items():
            if self.is_float(assign, n) != self.is_float(self.ref, n):
                lat -= c
        return lat + self.boundary(assign) - self.boundary(self.ref)

    def speedup(self, assign: Mapping[str, str]) -> float:
        return 1.0 / max(self.latency(assign), 1e-9)

    def full(self, assign: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        assign = assign or {}
        return {n: assign.get(n, k) for n, k in self.ref.items()}
