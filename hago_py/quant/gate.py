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


def deployed_run(qmodel: onnx.ModelProto, feed: Mapping[str, np.ndarray], threads: int = 1):
    """(outputs, None) when ``qmodel`` loads and runs in ONNX Runtime in its deployed form (full optimization),
    else (None, ORT's one-line error)."""
    be = OrtBackend(threads=threads)
    try:
        return be.run(be.compile(qmodel, optimization="all"), feed), None
    except HagoError as e:
        return None, str(e)


def deployable(pipe, built, layers=None):
    """(``built``, its deployed outputs on the first check batch), or a rebuild in which the layers that make
    ONNX Runtime's optimizer fail are kept FP32.

    ORT's graph optimizer has bugs of its own that a valid QDQ graph can trigger (seen: rank-3 MatMul + Add with
    signed int8 activations, where MatMulAddFusion, QDQ propagation and the S8->U8 transformer build a
    QuantizeLinear whose output_dtype contradicts its zero point). Instead of failing the whole model, the
    responsible layer is found by bisection over the quantized layers (a rebuild per step, only when the load
    failed) and kept FP32, named in ``built.info["ort_fallback"]`` and its plan reason; one culprit per round, by a
    binary search for the shortest failing-to-loading prefix of the quantized layers. After DEPLOY_ROUNDS culprits
    the whole last loading prefix is kept FP32 (so many culprits cost accuracy, not the model). Gives up only when
    that does not load either: then the outputs are None and ``built.info["deploy_error"]`` holds ORT's error, which
    verify_output reports as an InternalError."""
    feed, threads = pipe.check_batches[0], pipe.opts.threads
    outs, err = deployed_run(built.model, feed, threads)
    if err is None:
        return built, outs
    fallen: dict = {}
    base = dict(layers or {})

    def build_without(names):
        return pipe.build(dict(base, **{n: {"quantize": False} for n in list(fallen) + list(names)}))

    def finish(trial, outs):
        for n, why in fallen.items():
            if n in trial.plan.layers:
                trial.plan.layers[n].reason = ("kept FP32: ONNX Runtime's graph optimizer fails on the model with "
                                               f"this layer quantized ({why[:160]})")
        trial.info["ort_fallback"] = fallen
        return trial, outs

    loading: list = []  # layers known to make the model load when kept FP32 (with those fallen)
    for _ in range(DEPLOY_ROUNDS):
        cand = [lp.node for lp in built.plan.quantized_layers() if lp.node not in fallen]
        if not cand or deployed_run(build_without(cand).model, feed, threads)[1] is not None:
            break  # not even every remaining layer FP32 loads: not a per-layer problem
        # the shortest prefix of cand that, kept FP32, makes the model load: its last layer is a culprit. (Halving
        # towards the failing half found a wrong layer when culprits sat in both halves.) Later rounds find the others.
        lo, hi = 0, len(cand)  # cand[:hi] FP32 loads, cand[:lo] FP32 fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if deployed_run(build_without(cand[:mid]).model, feed, threads)[1] is None:
                hi = mid
            else:
                lo = mid
        fallen[cand[hi - 1]] = err
        loading = cand[:hi]
        trial = build_without([])
        outs, err = deployed_run(trial.model, feed, threads)
        if err is None:
            return finish(trial, outs)
    if loading and err is not None:  # out of rounds: keep the whole last loading prefix FP32 (it loads)
        for n in loading:
            fallen.setdefault(n, err)
        trial = build_without([])
        outs, err2 = deployed_run(trial.model, feed, threads)
        if err2 is None:
            return finish(trial, outs)
    built.info["deploy_error"] = err
    return built, None


DEPLOY_ROUNDS = 8


def verify_output(qmodel: onnx.ModelProto, outputs, error=None) -> None:
    """InternalError unless ``qmodel`` passes onnx.checker, holds nothing unused, and loaded in ORT with full
    optimization (the deployed form) and ran with finite ``outputs`` (from :func:`deployed_run`; ``error``: ORT's
    message when it did not)."""
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
    if outputs is None:
        fail(f"ONNX Runtime: {error}")
    bad = [o.name for o, v in zip(qmodel.graph.output, outputs)
           if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))]
    if bad:
        fail(f"output '{bad[0]}' is not finite on the calibration data")
