"""Per-layer estimates the strategies optimise over: for each layer and candidate, the estimated error
contribution (proxy units, >= 0, FP32 = 0) and the latency change vs the reference plan (fraction of the
FP32 model's latency; negative = faster). A plan's estimates are additive:

    err(plan) = sum_L err_L(c_L)          latency(plan) = ref_latency + sum_L dlat_L(c_L)

Both come from the layer-table trials (one layer changed at a time in the reference plan), so interactions
between layers are ignored here and corrected by the end-to-end trials.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple


@dataclass
class Table:
    rows: Dict[str, Dict[str, Tuple[float, float]]]      # node -> key -> (err, dlat)
    ref: Dict[str, str]                                  # node -> reference key (dlat 0)
    ref_latency: float                                   # reference latency / FP32 latency
    fixed_err: float = 0.0                               # error of layers without rows (kept at reference)
    notes: Dict[str, str] = field(default_factory=dict)

    def err(self, assign: Mapping[str, str]) -> float:
        return self.fixed_err + sum(r[assign.get(n, self.ref[n])][0] for n, r in self.rows.items())

    def latency(self, assign: Mapping[str, str]) -> float:
        return self.ref_latency + sum(r[assign.get(n, self.ref[n])][1] for n, r in self.rows.items())

    def speedup(self, assign: Mapping[str, str]) -> float:
        return 1.0 / max(self.latency(assign), 1e-9)

    def full(self, assign: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        assign = assign or {}
        return {n: assign.get(n, k) for n, k in self.ref.items()}
