"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), on the layer statistics.

Asymmetric target.  The layer sees x̃ (quantized input) but must reproduce W x, so the per-row loss is
(ŵ - w*)ᵀ H (ŵ - w*) + const with w* = H⁻¹ C w: the least-squares weight for the quantized input,
W* = W Cᵀ H⁻¹.  With the dampening λ = ``percdamp`` · mean(diag H) GPTQ minimises instead
ŵᵀ(H + λI)ŵ - 2ŵᵀ(C w + λ w), i.e. the same loss plus a proximal term λ||ŵ - w||², whose minimiser is

    W* = W + W (C - H)ᵀ (H + λI)⁻¹

This is what is rounded.  It equals W exactly when C = H (the input is not quantized), and the correction
stays bounded when H is singular.

Rounding.  Columns (inputs) are quantized one at a time, in order of decreasing diag(H) with ``act_order``;
the error of each column, divided by the diagonal of the upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, is fed
back to the columns not yet quantized through the rows of U, with the lazy batch update of the paper
(``blocksize`` columns at a time, the rest of the matrix updated once per block).  The scale and zero point
are the problem's (not re-fitted).  Columns of dead inputs (diag H = 0: the input is always 0, so its weight
does not matter) keep their nearest rounding and feed back nothing.  If (H + λI) is not numerically
positive definite λ is multiplied by 10, up to 4 times.

With H diagonal with equal entries and C = H, W* = W, U is diagonal, no error is fed back and the result is
exactly nearest rounding.  Rows still worse than nearest fall back to it (problem.finish).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from ...errors import DataError
from .problem import LayerProblem, Objective, RoundingResult, check_params, finish, nearest, positive, validate

DEFAULTS = {
    "percdamp": 0.01,
    "blocksize": 128,
    "act_order": True,
    "asymmetric": True,          # False: round W itself (classic GPTQ, ignores C)
    "iterations": None,          # accepted for a uniform interface; GPTQ is one pass
}


def _inverse(hd: np.ndarray) -> Optional[np.ndarray]:
    """(H + λI)⁻¹ per group (symmetrised), or None if singular / not finite.  Positive definiteness is
    checked by the Cholesky factorisation of the result (numpy's LU inverse is faster here than LAPACK's
    potri in scipy's build)."""
    try:
        inv = np.linalg.inv(hd)
    except np.linalg.LinAlgError:
        return None
    inv = 0.5 * (inv + inv.transpose(0, 2, 1))
    return inv if np.all(np.isfinite(inv)) else None


def _upper_chol(a: np.ndarray) -> Optional[np.ndarray]:
    try:
        u = np.linalg.cholesky(a).transpose(0, 2, 1)
    except np.linalg.LinAlgError:
        return None
    return u if np.all(np.isfinite(u)) else None


def solve(problem: LayerProblem, *, seed: int = 0, **params: Any) -> RoundingResult:
    """GPTQ on one layer.  Deterministic: ``seed`` is accepted for a uniform interface, unused."""
    t0 = time.perf_counter()
    validate(problem)
    p = problem
    prm = check_params("gptq", p, params, DEFAULTS)
    positive("gptq", p, prm, "percdamp", allow_zero=True)
    positive("gptq", p, prm, "blocksize", integer=True)
    bs = int(prm["blocksize"])
    obj = Objective(p)
    gr, nn, k = p.w.shape
    w = np.asarray(p.w, np.float32)
    s32 = np.asarray(p.scale, np.float32)                      # (G, N)
    z = np.asarray(p.zero_point, np.int64)

    h = np.array(p.h, np.float64)
    diag = np.diagonal(h, axis1=1, axis2=2).copy()             # (G, K)
    dead = diag <= 0
    live_mean = np.array([diag[i][~dead[i]].mean() if np.any(~dead[i]) else 1.0 for i in range(gr)])
    damp = float(prm["percdamp"]) * live_mean                  # (G,)
    idx = np.arange(k)
    h[:, idx, idx] = np.where(dead, 1.0, diag)                 # dead inputs: decoupled unit diagonal

    # column order (act_order: decreasing diag H, stable, so equal diagonals keep their order)
    if prm["act_order"]:
        perm = np.argsort(-diag, axis=1, kind="stable")        # (G, K)
    else:
        perm = np.broadcast_to(idx, (gr, k)).copy()

    hinv = u = None
    tries = 0
    for tries in range(5):
        d = np.where(damp > 0, damp, 1e-10 * live_mean) * (10.0 ** tries)
        hd = h + d[:, None, None] * np.eye(k)[None]
        hinv = _inverse(hd)
        if hinv is None:
            continue
        # (P H Pᵀ)⁻¹ = P H⁻¹ Pᵀ
        hp = np.take_along_axis(np.take_along_axis(hinv, perm[:, :, None], 1), perm[:, None, :], 2)
        u = _upper_chol(hp)
        if u is not None:
            break
    if u is None:
        raise DataError(f"layer {p.name!r}: the input statistics H are not positive semi-definite even with "
                        f"dampening {d.max():.3g}; recompute the calibration statistics (float64 accumulation)")

    # target W* = W + W (C - H)ᵀ (H + λI)⁻¹  (exactly W when C == H)
    w64 = w.astype(np.float64)
    if prm["asymmetric"]:
        ch = np.asarray(p.c, np.float64) - np.asarray(p.h, np.float64)
        corr = (hinv @ (ch @ w64.transpose(0, 2, 1))).transpose(0, 2, 1)   # (G, N, K)
        corr[np.broadcast_to(dead[:, None, :], corr.shape)] = 0.0
        target = w64 + corr
    else:
        target = w64.copy()

    # columns as rows (G, K, N): each column is contiguous
    wt = np.ascontiguousarray(np.take_along_axis(target, perm[:, None, :], 2).transpose(0, 2, 1))
    qt = np.empty((gr, k, nn), np.int64)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = wt[:, i1:i2].copy()                               # (G, B, N)
        err1 = np.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]                                     # (G, N)
            qc = np.clip(np.rint(col.astype(np.float32) / s32) + z, p.qmin, p.qmax).astype(np.int64)
            qt[:, i1 + i] = qc
            deq = ((qc - z).astype(np.float32) * s32).astype(np.float64)
            e = (col - deq) / u1[:, i, i][:, None]             # (G, N)
            if i + 1 < i2 - i1:
                w1[:, i + 1:] -= u1[:, i, i + 1:, None] * e[:, None, :]
            err1[:, i] = e
        if i2 < k:
            wt[:, i2:] -= u[:, i1:i2, i2:].transpose(0, 2, 1) @ err1
    q = qt.transpose(0, 2, 1)
    inv = np.argsort(perm, axis=1, kind="stable")
    q = np.take_along_axis(q, inv[:, None, :], 2)
    # dead inputs keep nearest rounding of the FP32 weight
    if np.any(dead):
        qn = nearest(p)
        q = np.where(dead[:, None, :], qn, q)
    info = {"iterations": 1, "damp": float(d.max()), "damp_retries": int(tries), "dead_inputs": int(dead.sum()),
            "act_order": bool(prm["act_order"]), "asymmetric": bool(prm["asymmetric"]),
            "target_shift": float(np.linalg.norm(target - w64) / max(np.linalg.norm(w64), 1e-30))}
    return finish(p, "gptq", q, p.scale, p.bias, info, t0, obj=obj, separable=True)
