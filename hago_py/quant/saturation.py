"""Per-layer estimate of int16 pair-sum saturation (vpmaddubsw-style hazards), from calibration data.

For a layer y = W x quantized to u8 activations x_q and s8 weights w_q, a kernel with an int16
intermediate computes p_j = x_q[2j] * w_q[2j] + x_q[2j+1] * w_q[2j+1] and saturates each p_j to
[-2^15, 2^15-1] before the int32 accumulation. Given the layer's real quantized inputs (a few calibration
samples, im2col'd in NHWC order (kh, kw, c), the order ORT's NHWC QLinearConv uses), the lost part
sum_j (p_j - sat(p_j)) is computed exactly; its energy relative to the layer output is the layer's
saturation SQNR. Layers above ``threshold_db`` do not need a remedy.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .observers import qrange
from .plan import TensorQuant
from .weights import weight_qparams


def _im2col_nhwc(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """x [N, C, H, W] -> rows [N*OH*OW, kh*kw*C] (NHWC order)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, oh, ow, kh, kw, c), x.dtype)
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dilations[0], j * dilations[1]
            patch = xp[:, :, hs:hs + strides[0] * oh:strides[0], ws:ws + strides[1] * ow:strides[1]]
            cols[:, :, :, i, j, :] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, kh * kw * c)


def layer_rows_and_weight(op_type: str, attrs: Dict, x: np.ndarray, w: np.ndarray,
                          axis: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Return (rows [M, K], weight matrix [N, K]) with K in the kernel's reduction order.

    The layout is taken from the op, never from the quantization axis (which is None for per-tensor
    weights): Conv weights are [N, C, kh, kw]; MatMul weights are [K, N]; Gemm weights are [N, K] with
    ``transB=1`` and [K, N] otherwise. Activations of any rank >= 1 are flattened to rows of their last
    (reduction) axis, e.g. [B, S, K] -> [B*S, K]. ``axis`` is accepted for backward compatibility and ignored.
    Raises ValueError for a layout that is not modelled (grouped / non-2-D Conv, Gemm with transA, batched
    MatMul weights, mismatched reduction sizes).
    """
    if op_type == "Conv":
        if w.ndim != 4 or int(attrs.get("group", 1)) != 1 or x.ndim != 4:
            raise ValueError("only 2-D, non-grouped convolutions are modelled")
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"Conv input has {x.shape[1]} channels but the weight expects {w.shape[1]}")
        kh, kw = w.shape[2], w.shape[3]
        rows = _im2col_nhwc(x, (kh, kw), attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]),
                            attrs.get("dilations", [1, 1]))
        wm = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        return rows, wm
    if op_type == "MatMul":
        if w.ndim != 2:
            raise ValueError(f"MatMul weight of rank {w.ndim} (batched weights) is not modelled")
        wm = w.T  # [K, N] -> [N, K]
    elif op_type == "Gemm":
        if w.ndim != 2 or int(attrs.get("transA", 0)):
            raise ValueError("only Gemm with a 2-D weight and transA=0 is modelled")
        wm = w if int(attrs.get("transB", 0)) else w.T  # transB=1 stores [N, K]; transB=0 stores [K, N]
    else:
        raise ValueError(f"op {op_type} has no modelled dot-product layout")
    if x.ndim < 1 or x.shape[-1] != wm.shape[1]:
        raise ValueError(f"{op_type} activation of shape {tuple(x.shape)} does not reduce over the weight's "
                         f"{wm.shape[1]} inputs")
    rows = x.reshape(-1, x.shape[-1])
    return rows, wm


def saturation_sqnr_db(rows_q: np.ndarray, zp_x: int, wq: np.ndarray, intermediate_bits: int = 16,
                       max_rows: int = 2048, seed: int = 0, chunk: int = 128) -> float:
    """SQNR (dB) of the layer's integer output against the error caused by pair-sum saturation."""
    rng = np.random.default_rng(seed)
    if rows_q.shape[0] > max_rows:
        rows_q = rows_q[rng.choice(rows_q.shape[0], max_rows, replace=False)]
    k = rows_q.shape[1]
    if k % 2:
        rows_q = np.pad(rows_q, ((0, 0), (0, 1)))
        wq = np.pad(wq, ((0, 0), (0, 1)))
        k += 1
    lo, hi = -(2 ** (intermediate_bits - 1)), 2 ** (intermediate_bits - 1) - 1
    x = rows_q.astype(np.int32)
    w = wq.astype(np.int32)
    signal = float(np.sum(((x - zp_x) @ w.T).astype(np.float64) ** 2))
    err = 0.0
    xe, xo = x[:, 0::2], x[:, 1::2]
    we, wo = w[:, 0::2], w[:, 1::2]
    for s in range(0, x.shape[0], chunk):
        p = xe[s:s + chunk, None, :] * we[None] + xo[s:s + chunk, None, :] * wo[None]  # [m, N, K/2]
        excess = (p - np.clip(p, lo, hi)).sum(axis=2, dtype=np.int64)
        err += float(np.sum(excess.astype(np.float64) ** 2))
    if err == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / err)


def quantize_rows(rows: np.ndarray, act: TensorQuant) -> Tuple[np.ndarray, int]:
    qmin, qmax = qrange(act.dtype, act.bits)
    zp = int(act.zero_point[0])
    q = np.clip(np.rint(rows / np.float32(act.scale[0])) + zp, qmin, qmax).astype(np.int32)
    return q, zp


def int_weight(w: np.ndarray, tq: TensorQuant) -> np.ndarray:
    from .rounding.nearest import round_weight

    scale, zp = weight_qparams(w, tq)
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    return round_weight(w, scale, zp, qmin, qmax, tq.axis if tq.granularity == "per_channel" else None)
