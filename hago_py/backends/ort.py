"""ONNX Runtime backend: the default, measured backend on CPU hosts.

A QDQ model runs two ways on ORT:
* ``optimization="all"`` (deployment): ORT fuses DQ->op->Q into integer kernels (QLinearConv, ...).
* ``optimization="basic"`` (simulation): constant folding only, Q/DQ stay float ops, so the
  model computes the exact fake-quant arithmetic. Comparing the two exposes kernel effects such as
  the int16 saturation of vpmaddubsw on AVX2.
"""
from __future__ import annotations

import os
import time as _time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import onnx

from ..errors import BackendError
from .base import Timing, TimingResult

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _model_bytes(model: Union[onnx.ModelProto, bytes, str, os.PathLike]) -> Union[bytes, str]:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return os.fspath(model)


class OrtBackend:
    """ORT on the CPU execution provider (or another EP named by the spec)."""

    name = "ort"

    def __init__(self, threads: int = 1, providers: Optional[List[str]] = None):
        self.threads = int(threads)
        self.providers = providers or ["CPUExecutionProvider"]

    # -- protocol ---------------------------------------------------------------------------
    def compile(self, model, target: Mapping[str, Any] | None = None, *, optimization: str = "all",
                optimized_model_path: str | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
        so.log_severity_level = 3
        if optimized_model_path:
            so.optimized_model_filepath = str(optimized_model_path)
        try:
            return ort.InferenceSession(_model_bytes(model), so, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types with long messages
            raise BackendError(f"ONNX Runtime could not load the model: {str(e).splitlines()[0]}") from e

    def run(self, artifact, feeds: Mapping[str, np.ndarray], output_names: Optional[List[str]] = None):
        try:
            return artifact.run(output_names, dict(feeds))
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed to run the model: {str(e).splitlines()[0]}") from e

    def time(self, artifacts: Mapping[str, Any], feed: Mapping[str, np.ndarray], *, repeats: int = 50,
             warmup: int = 5, min_time_s: float = 0.0) -> TimingResult:
        """Round-robin timing: every round calls each artifact once, in rotating order."""
        labels = list(artifacts)
        sessions = {k: (self.compile(v) if not hasattr(v, "run") else v) for k, v in artifacts.items()}
        feed = dict(feed)
        for _ in range(warmup):
            for k in labels:
                sessions[k].run(None, feed)
        samples: Dict[str, List[float]] = {k: [] for k in labels}
        t_start = _time.perf_counter()
        r = 0
        while r < repeats or (_time.perf_counter() - t_start) < min_time_s:
            order = labels[r % len(labels):] + labels[: r % len(labels)]
            for k in order:
                t0 = _time.perf_counter()
                sessions[k].run(None, feed)
                samples[k].append(_time.perf_counter() - t0)
            r += 1
        return TimingResult([Timing(k, samples[k]) for k in labels], threads=self.threads,
                            meta={"backend": "onnxruntime", "providers": self.providers,
                                  "ort_version": _ort_version()})

    # -- helpers ------------------------------------------------------------------------------
    def predict(self, model, batches: Iterable[Mapping[str, np.ndarray]], *, optimization: str = "all",
                output_names: Optional[List[str]] = None) -> List[List[np.ndarray]]:
        sess = self.compile(model, optimization=optimization)
        return [self.run(sess, b, output_names) for b in batches]


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
