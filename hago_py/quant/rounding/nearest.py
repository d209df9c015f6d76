"""Round-to-nearest (ties to even, as numpy and the ONNX QuantizeLinear spec do)."""
from __future__ import annotations

import numpy as np


def _bshape(scale: np.ndarray, ndim: int, axis):
    if axis is None or scale.size == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def round_weight(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, axis=None,
                 **ctx) -> np.ndarray:
    s = _bshape(np.asarray(scale, np.float32), w.ndim, axis)
    z = _bshape(np.asarray(zero_point, np.int64), w.ndim, axis)
    q = np.rint(w.astype(np.float32) / s) + z
    return np.clip(q, qmin, qmax).astype(np.int64)
