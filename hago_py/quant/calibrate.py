"""calibrate(model, plan, data) -> plan with activation scales / zero points.

The FP32 model is extended so that every tensor the plan quantizes statically is also a graph output;
ORT runs it batch by batch and each tensor's observer streams the values (histograms, bounded memory).
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import numpy as np
import onnx

from ..backends.ort import OrtBackend
from ..errors import DataError
from .observers import make_observer, qparams_from_range
from .plan import QuantPlan


def progress_iter(it, enabled: bool, desc: str, unit: str):
    """``it`` wrapped in a tqdm bar when ``enabled`` (and tqdm is importable)."""
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc=desc, unit=unit, leave=False)


def token_rows(x: np.ndarray, mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Row selector for a token-wise tensor [B, S, K] under a [B, S] padding mask (None: all rows)."""
    if mask is None or x.ndim != 3 or tuple(x.shape[:2]) != tuple(np.shape(mask)):
        return None
    return np.asarray(mask).reshape(-1) != 0


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """Copy of ``model`` that also returns the given intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    vis = {vi.name: vi for vi in m.graph.value_info}
    for n in names:
        if n in existing:
            continue
        if n in vis:
            m.graph.output.append(vis[n])
        else:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def calibration_targets(plan: QuantPlan):
    return [n for n, tq in plan.activations.items() if tq.mode == "static" and tq.shared_with is None]


def collect(model: onnx.ModelProto, plan: QuantPlan, data: Iterable[Mapping[str, np.ndarray]], *,
            percentile: float = 99.999, threads: int = 1, progress: bool = False) -> Dict[str, object]:
    """Stream the calibration set through the model; return {tensor: observer} for every static tensor."""
    return collect_tensors(model, {n: plan.activations[n].method for n in calibration_targets(plan)}, data,
                           percentile=percentile, threads=threads, progress=progress)


def collect_tensors(model: onnx.ModelProto, methods: Mapping[str, str], data: Iterable[Mapping[str, np.ndarray]],
                    *, percentile: float = 99.999, threads: int = 1, progress: bool = False,
                    mask_input: Optional[str] = None, token_wise=()) -> Dict[str, object]:
    """One pass over ``data``: an observer of the given method for each tensor name in ``methods``. With
    ``mask_input`` (a [batch, seq] graph input whose zeros mark padding) the tensors in ``token_wise`` are observed
    on their real rows only (quant/padding.py)."""
    names = list(methods)
    if not names:
        return {}
    aug = with_outputs(model, names)
    backend = OrtBackend(threads=threads)
    sess = backend.compile(aug, optimization="basic")
    out_names = [o.name for o in sess.get_outputs()]
    idx = {n: out_names.index(n) for n in names}
    observers = {}
    for n in names:
        opts = {"percentile": percentile} if methods[n] == "percentile" else {}
        observers[n] = make_observer(methods[n], n, **opts)
    seen = 0
    token_wise = set(token_wise) if mask_input else set()
    for batch in progress_iter(data, progress, "calibrating", "batch"):
        outs = backend.run(sess, batch)
        mask = batch.get(mask_input) if token_wise else None
        for n in names:
            x = np.asarray(outs[idx[n]], dtype=np.float32)
            sel = token_rows(x, mask) if n in token_wise else None
            if sel is not None:
                if not sel.any():
                    continue  # a batch of padding only: nothing to observe
                x = x.reshape(-1, x.shape[-1])[sel]
            observers[n].update(x)
        seen += 1
    if seen == 0:
        raise DataError("calibration set is empty: no batch reached the model; pass at least one sample")
    return observers


def apply_observers(plan: QuantPlan, observers: Dict[str, object]) -> QuantPlan:
    """Fill scale / zero point of every static activation from its observer; shared tensors follow."""
    for n, obs in observers.items():
        tq = plan.activations[n]
        scale, zp = obs.compute_qparams(tq.dtype, bits=tq.bits, symmetric=tq.symmetric, narrow=tq.narrow)
        tq.scale = [float(scale)]
        tq.zero_point = [int(zp)]
        tq.stats = obs.state()
    for n, tq in plan.activations.items():
        if tq.shared_with is not None:
            src = plan.resolve(n)
            tq.scale, tq.zero_point, tq.dtype = list(src.scale), list(src.zero_point), src.dtype
    plan.history.append("calibrate")
    return plan


def calibrate(model, plan, data, **kw) -> QuantPlan:
    return apply_observers(plan, collect(model, plan, data, **kw))


def tensor_pass(model: onnx.ModelProto, names, data: Iterable[Mapping[str, np.ndarray]], *, threads: int = 1):
    """One ORT pass over ``data`` with the tensors ``names`` exposed: yields (batch, {name: array}) per batch
    (feeds the model does not take are dropped)."""
    names = list(names)
    backend = OrtBackend(threads=threads)
    sess = backend.compile(with_outputs(model, names), optimization="basic")
    out_names = [o.name for o in sess.get_outputs()]
    in_names = {i.name for i in sess.get_inputs()}
    for batch in data:
        outs = backend.run(sess, {k: v for k, v in batch.items() if k in in_names})
        yield batch, {n: outs[out_names.index(n)] for n in names}


def channel_absmax(model: onnx.ModelProto, names, data: Iterable[Mapping[str, np.ndarray]], *,
                   mask_input: str | None = None, threads: int = 1) -> Dict[str, np.ndarray]:
    """Per-channel (last axis) max|x| of each tensor in ``names`` over ``data``, one pass. With
    ``mask_input`` (a [batch, seq] graph input whose zeros mark padding), padding rows of [batch, seq, C]
    tensors are left out."""
    names = list(names)
    if not names:
        return {}
    amax: Dict[str, np.ndarray] = {}
    for batch, outs in tensor_pass(model, names, data, threads=threads):
        mask = batch.get(mask_input) if mask_input else None
        for n in names:
            x = np.abs(np.asarray(outs[n], dtype=np.float32))
            sel = token_rows(x, mask)
            x = x.reshape(-1, x.shape[-1]) if sel is None else x.reshape(-1, x.shape[-1])[sel]
            m = x.max(axis=0) if x.size else np.zeros(x.shape[-1], np.float32)
            amax[n] = m if n not in amax else np.maximum(amax[n], m)
    if not amax:
        raise DataError("calibration set is empty: no batch reached the model; pass at least one sample")
    return amax
