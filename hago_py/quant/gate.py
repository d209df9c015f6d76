"""The last gate before a quantized model leaves hago_py: it must be a valid ONNX model that the backend
loads and runs, with every initializer, node and opset import used.

A model that fails here is hago_py's bug, never the user's: the user's FP32 model was checked to load and
run in the same backend when it was read (:func:`check_user_model`). So a failure is an
:class:`~hago_py.errors.InternalError` (CLI exit 1), raised before anything is written.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from ..backends.ort import OrtBackend
from ..errors import BackendError, HagoError, InternalError, ModelError


def check_user_model(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], where: str, threads: int = 1) -> None:
    """The user's FP32 model must load and run in ONNX Runtime on a calibration batch (ModelError if not)."""
    be = OrtBackend(threads=threads)
    try:
        be.run(be.compile(model, optimization="basic"), feed)
    except BackendError as e:
        raise ModelError(f"{where} does not run in ONNX Runtime on the calibration data ({e}); check the model "
                         "and the data against each other", details=e.details) from e


def verify_output(qmodel: onnx.ModelProto, feed: Mapping[str, np.ndarray], threads: int = 1) -> None:
    """InternalError unless ``qmodel`` passes onnx.checker, holds nothing unused, loads in ORT with full
    optimization (the deployed form) and runs on ``feed`` with finite outputs."""
    def fail(what: str, details=None):
        raise InternalError(f"hago_py produced an invalid model ({what}); nothing was written. This is a bug in "
                            "hago_py: please report it with the output of HAGO_DEBUG=1", details=details)

    try:
        onnx.checker.check_model(qmodel, full_check=False)
    except Exception as e:
        fail(f"onnx.checker: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}", str(e))
    used = {i for n in qmodel.graph.node for i in n.input} | {o.name for o in qmodel.graph.output}
    unused = [t.name for t in qmodel.graph.initializer if t.name not in used]
    if unused:
        fail(f"{len(unused)} unused initializer(s), e.g. '{unused[0]}'")
    domains = {n.domain or "" for n in qmodel.graph.node}
    extra = [o.domain for o in qmodel.opset_import if (o.domain or "") not in domains | {"", "ai.onnx"}]
    if extra:
        fail(f"unused opset import(s) {', '.join(extra)}")
    be = OrtBackend(threads=threads)
    try:
        outs = be.run(be.compile(qmodel, optimization="all"), feed)
    except HagoError as e:
        fail(f"ONNX Runtime: {e}", e.details)
    bad = [o.name for o, v in zip(qmodel.graph.output, outs)
           if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))]
    if bad:
        fail(f"output '{bad[0]}' is not finite on the calibration data")
