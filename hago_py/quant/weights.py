"""Weight quantization: qparams per tensor / per channel, then the plan's rounding scheme."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .observers import qrange
from .plan import TensorQuant
from .rounding import get_rounder

_DATA_DRIVEN = ("adaround", "adaquant", "flexround", "gptq", "brecq")


def weight_qparams(w: np.ndarray, tq: TensorQuant) -> Tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (arrays of length C for per-channel, length 1 per-tensor)."""
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    if tq.granularity == "per_channel":
        axes = tuple(i for i in range(w.ndim) if i != tq.axis)
        lo, hi = w.min(axis=axes), w.max(axis=axes)
    else:
        lo, hi = np.array([w.min()]), np.array([w.max()])
    lo = np.minimum(lo.astype(np.float64), 0.0)
    hi = np.maximum(hi.astype(np.float64), 0.0)
    if tq.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        if tq.dtype.startswith("u"):
            zp = np.full(amax.shape, (qmin + qmax + 1) // 2, np.int64)
            half = min(qmax - zp[0], zp[0] - qmin) if amax.size else 1
        else:
            zp = np.zeros(amax.shape, np.int64)
            half = min(qmax, -qmin)
        scale = amax / half
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    return scale, zp


def _codebook_pays(shape, axis, bits) -> bool:
    """Whether the packed-index + codebook storage of a non-uniform weight is smaller than plain int8
    (the test realize's CodebookWriter applies too)."""
    if axis is None or len(shape) < 2:
        return False
    from .codebook import codebook_pays

    return codebook_pays(shape, axis, bits)


def quantize_weight(w: np.ndarray, tq: TensorQuant, **ctx) -> np.ndarray:
    """Fill tq.scale / tq.zero_point and return the integer weight (int64 array, within the dtype range)."""
    if tq.method != "nearest" and tq.method in _DATA_DRIVEN:
        from ..errors import OptionError

        raise OptionError(f"weight '{tq.tensor}' uses rounding {tq.method!r}, which needs calibration statistics: "
                          "it is applied by hago_py.quantize / Pipeline.build (pass the weights it returns to "
                          "realize), not by realize alone")
    if tq.scheme == "multipoint":  # rows of points (quant/multipoint.py)
        from .multipoint import weight_rows

        return weight_rows(w, tq)
    scale, zp = weight_qparams(w, tq)
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    axis = tq.axis if tq.granularity == "per_channel" else None
    if tq.scheme == "nonuniform" and not _codebook_pays(w.shape, axis, tq.levels_bits):
        # the codebook would not make this layer's file smaller (depthwise 3x3, K <~ 32): restricting its
        # levels would cost accuracy for nothing, so it keeps the full INT8 grid (plain int8 storage)
        q = get_rounder("nearest")(w, scale, zp, qmin, qmax, axis)
        tq.scale, tq.zero_point = [float(x) for x in scale], [int(z) for z in zp]
        tq.levels = {"full_int8": True}
        return q
    if tq.scheme == "nonuniform":  # at most 2**levels_bits values of this grid per channel (quant/nonuniform.py)
        from .nonuniform import quantize_nonuniform

        q, tq.levels = quantize_nonuniform(w, scale, zp, qmin, qmax, tq.axis if tq.granularity == "per_channel"
                                           else None, tq.levels_bits, importance=ctx.get("importance"),
                                           covariance=ctx.get("covariance"))
        tq.scale = [float(s) for s in scale]
        tq.zero_point = [int(z) for z in zp]
        return q
    q = get_rounder(tq.method)(w, scale, zp, qmin, qmax, tq.axis if tq.granularity == "per_channel" else None, **ctx)
    tq.scale = [float(s) for s in scale]
    tq.zero_point = [int(z) for z in zp]
    return q


def dequantize(q: np.ndarray, tq: TensorQuant) -> np.ndarray:
    s = np.asarray(tq.scale, np.float32)
    z = np.asarray(tq.zero_point, np.int64)
    if tq.granularity == "per_channel" and s.size > 1:
        shape = [1] * q.ndim
        shape[tq.axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q - z) * s).astype(np.float32)
