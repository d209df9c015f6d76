"""ONNX Runtime backend: the default, measured backend on CPU hosts.

A QDQ model runs two ways on ORT:
* ``optimization="all"`` (deployment): ORT fuses DQ->op->Q into integer kernels (QLinearConv, ...).
* ``optimization="basic"`` (simulation): constant folding only, Q/DQ stay float ops, so the
  model computes the exact fake-quant arithmetic. Comparing the two exposes kernel effects such as
  the int16 saturation of vpmaddubsw on AVX2.
"""
from __future__ import annotations

import os
import re
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


def _model_label(model: Any) -> str:
    """How a message names the model: its file, or its graph name."""
    if isinstance(model, onnx.ModelProto):
        return f"model '{model.graph.name}'" if model.graph.name else "the model"
    if isinstance(model, (str, os.PathLike)):
        return f"model file {os.fspath(model)}"
    return "the model"


# What ORT's error text names, most specific first. ORT has no structured errors: these patterns follow the
# messages of onnxruntime 1.2x (session creation, kernel execution, input validation).
_NODE_PATTERNS = (
    re.compile(r"running (?P<op>[\w.]+) node\. Name:'(?P<node>[^']*)'"),         # kernel failure at run time
    re.compile(r"In Node, \(\"(?P<node>[^\"]*)\", (?P<op>[\w.]+),"),               # graph resolve / no kernel
    re.compile(r"Optype \((?P<op>[\w.]+)\).*? in node \((?P<node>[^)]*)\)"),     # type inference
    re.compile(r"[Nn]ode \((?P<node>[^)]+)\) [Oo]p \((?P<op>[\w.]+)\)"),          # shape inference
    re.compile(r"[Nn]ode[ :]+'(?P<node>[^']+)'"),
    re.compile(r"[Nn]ode name:\s*(?P<node>\S+)"),
)
_INPUT_PATTERNS = (
    re.compile(r"for input: (?P<input>[^\s,]+)"),
    re.compile(r"Required inputs \((?P<input>\[[^\]]*\])\) are missing"),
    re.compile(r"[Ii]nvalid input name: (?P<input>\S+)"),
)
_CATEGORY = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(?P<cat>[A-Z_]+)\s*:\s*")
_SOURCE_REF = re.compile(r"\S*/onnxruntime[^\s]*\.(?:h|cc|cpp|cu):\d+\s+(?:[\w:<>~,&*\s]+\([^()]*\)\s*)?")


def ort_error_facts(text: str) -> Dict[str, Optional[str]]:
    """What an ORT error text names: category (FAIL, INVALID_ARGUMENT, ...), node, op, input, and a short
    cause with ORT's source locations and boilerplate removed."""
    text = str(text)
    flat = " ".join(text.split())
    facts: Dict[str, Optional[str]] = {"category": None, "node": None, "op": None, "input": None}
    m = _CATEGORY.search(flat)
    if m:
        facts["category"] = m.group("cat")
    for pat in _NODE_PATTERNS:
        m = pat.search(flat)
        if m:
            facts["node"] = m.groupdict().get("node")
            facts["op"] = m.groupdict().get("op")
            break
    for pat in _INPUT_PATTERNS:
        m = pat.search(flat)
        if m:
            facts["input"] = m.group("input").strip("'\"")
            break
    cause = _CATEGORY.sub("", flat)
    if "Status Message:" in cause:
        cause = cause.split("Status Message:", 1)[1]
    if _SOURCE_REF.search(cause):  # "<file>:<line> <function>(...) <condition> was false. <message>"
        cause = _SOURCE_REF.sub("", cause)
        if " was false." in cause:
            cause = cause.split(" was false.", 1)[1]
    # "This is an invalid model. In Node, ("n", Op, "", -1) : (inputs) -> (outputs) , Error <what>"
    cause = re.sub(r"^.*?In Node, \(.*?\) -> \(.*?\)\s*,\s*Error\s*", "", cause)
    cause = re.sub(r"\s*Please fix either the inputs/outputs or the model\.?", "", cause).strip(" .:")
    if len(cause) > 160:
        cause = cause[:157].rstrip() + "..."
    facts["cause"] = cause or None
    return facts


def backend_error(action: str, model_label: str, err: BaseException) -> BackendError:
    """A one-line BackendError for ORT failing to ``action`` ("load" / "run") a model: what failed, the node or
    input ORT's text names, a short cause and what to do; ORT's full text goes into ``details`` (the CLI shows
    it with HAGO_DEBUG=1)."""
    full = str(err)
    f = ort_error_facts(full)
    where = ""
    if f["node"]:
        where = f" at node '{f['node']}'" + (f" ({f['op']})" if f.get("op") else "")
    elif f["input"]:
        where = f" for inputs {f['input']}" if f["input"].startswith("[") else f" for input '{f['input']}'"
    cat = f["category"] or ""
    if action == "load":
        if cat == "NO_SUCHFILE":
            todo = "check the path"
        elif cat == "INVALID_PROTOBUF":
            todo = "the bytes are not an ONNX model: re-export or re-download it"
        elif cat in ("NOT_IMPLEMENTED",) or "No Op registered" in full or "Could not find an implementation" in full:
            todo = (f"the op / opset is not supported by onnxruntime {_ort_version()}: use ops of the default "
                    "domain at a supported opset or upgrade onnxruntime")
        else:
            todo = "check the model with onnx.checker.check_model(model, full_check=True) and fix what it reports"
    else:
        if f["input"] or cat == "INVALID_ARGUMENT":
            todo = "feed data whose names, dtypes and shapes match the model inputs"
        elif f["node"]:
            todo = ("check that the data matches the shapes the model was exported for (a node failed on it); "
                    "if it does, the model itself is broken there")
        else:
            todo = "check the data against the model inputs"
    cause = f": {f['cause']}" if f.get("cause") else ""
    return BackendError(f"ONNX Runtime could not {action} {model_label}{where}{cause}; {todo}", details=full)


class OrtBackend:
    """ORT on the CPU execution provider (or another EP named by the spec)."""

    name = "ort"

    def __init__(self, threads: int = 1, providers: Optional[List[str]] = None):
        self.threads = int(threads)
        self.providers = providers or ["CPUExecutionProvider"]

    def describe(self) -> str:
        """Where this backend measures, for reports: 'ORT local (CPUExecutionProvider)'."""
        return f"ORT local ({', '.join(self.providers)})"

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
        label = _model_label(model)
        try:
            sess = ort.InferenceSession(_model_bytes(model), so, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types with long messages
            raise backend_error("load", label, e) from e
        try:
            sess._hago_label = label  # named again in run errors
        except Exception:  # pragma: no cover - a session type that refuses attributes
            pass
        return sess

    def run(self, artifact, feeds: Mapping[str, np.ndarray], output_names: Optional[List[str]] = None):
        try:
            return artifact.run(output_names, dict(feeds))
        except Exception as e:
            raise backend_error("run", getattr(artifact, "_hago_label", "the model"), e) from e

    def time(self, artifacts: Mapping[str, Any], feed: Mapping[str, np.ndarray], *, repeats: int = 50,
             warmup: int = 5, min_time_s: float = 0.0) -> TimingResult:
        """Round-robin timing: every round calls each artifact once, in rotating order."""
        labels = list(artifacts)
        sessions = {k: (self.compile(v) if not hasattr(v, "run") else v) for k, v in artifacts.items()}
        feed = dict(feed)
        for _ in range(warmup):
            for k in labels:
                self.run(sessions[k], feed)
        samples: Dict[str, List[float]] = {k: [] for k in labels}
        t_start = _time.perf_counter()
        r = 0
        while r < repeats or (_time.perf_counter() - t_start) < min_time_s:
            order = labels[r % len(labels):] + labels[: r % len(labels)]
            for k in order:
                sess = sessions[k]
                t0 = _time.perf_counter()
                try:
                    sess.run(None, feed)
                except Exception as e:
                    raise backend_error("run", getattr(sess, "_hago_label", f"model '{k}'"), e) from e
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
