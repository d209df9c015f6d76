"""The backend protocol: the one small interface every backend (ORT, TVM Relax, remote) implements.

compile(model, target) -> artifact       build something runnable for the target
run(artifact, feeds) -> list of outputs   execute one batch
time(artifacts, feed) -> TimingResult     time several artifacts interleaved in one process
describe() -> str                         where it measures, for reports ("ORT local (...)", "TVM RPC key@host:port")

Timing rules (shared 2-core machines): warm up, then round-robin the artifacts, one call each per
round, so drift and other tenants hit all of them alike; report median and spread per artifact and
ratios against the first artifact (the baseline, normally FP32).
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any, Dict, List, Mapping, Protocol, Sequence

import numpy as np


@dataclass
class Timing:
    """Latency samples of one artifact, in seconds."""

    label: str
    samples: List[float]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.samples, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples, 90))

    def summary(self) -> Dict[str, float]:
        return {"median_ms": self.median * 1e3, "p10_ms": self.p10 * 1e3, "p90_ms": self.p90 * 1e3,
                "repeats": len(self.samples)}


@dataclass
class TimingResult:
    """Interleaved timings. ``speedup(label)``: median over rounds of baseline time / label time (>1 means
    faster); each round times every model once, so drift and other tenants hit both sides of a ratio alike
    (the ratio of the two medians is ``ratio_of_medians``; under drift it disagrees with the per-round spread)."""

    timings: List[Timing]
    threads: int
    measured: bool = True  # False when predicted by a cost model
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> Timing:
        return self.timings[0]

    def speedup(self, label: str) -> float:
        return self.speedup_spread(label)["median"]

    def ratio_of_medians(self, label: str) -> float:
        t = {x.label: x for x in self.timings}[label]
        return self.baseline.median / t.median

    def speedup_spread(self, label: str) -> Dict[str, float]:
        """Speedup from per-round ratios: median, p10, p90 (rounds are paired, so drift cancels)."""
        t = {x.label: x for x in self.timings}[label]
        r = np.asarray(self.baseline.samples) / np.asarray(t.samples)
        return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
                "p90": float(np.percentile(r, 90))}

    def to_dict(self) -> Dict[str, Any]:
        out = {"threads": self.threads, "measured": self.measured, "meta": self.meta, "models": {}}
        for t in self.timings:
            d = t.summary()
            d["speedup_vs_baseline"] = self.speedup(t.label)
            d["speedup_spread"] = self.speedup_spread(t.label)
            out["models"][t.label] = d
        return out


class Backend(Protocol):
    name: str

    def compile(self, model, target: Mapping[str, Any] | None = None) -> Any: ...

    def run(self, artifact: Any, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]: ...

    def time(self, artifacts: Mapping[str, Any], feed: Mapping[str, np.ndarray], *,
             repeats: int = 50, warmup: int = 5) -> TimingResult: ...

    def describe(self) -> str: ...


def measured_on(backend) -> str:
    """Where ``backend`` measures latency, as reports label it: its ``describe()``, else its name."""
    describe = getattr(backend, "describe", None)
    if callable(describe):
        return str(describe())
    return f"{getattr(backend, 'name', type(backend).__name__)} (this machine)"
