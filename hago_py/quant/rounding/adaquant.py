"""AdaQuant (Hubara et al., "Accurate Post Training Quantization With Small Calibration Sets", ICML 2021),
plus its two closed-form companions: bias correction and BN re-estimation.

``solve`` jointly optimises, with Adam, on the layer's reconstruction loss (problem.py):

* a continuous weight W + s₀·U (U in units of the initial step s₀), quantized in the forward pass as
  s·(clip(round((W + s₀U)/s) + z, qmin, qmax) - z) with straight-through rounding (dŴ/dU = s₀ inside the
  range, 0 where clipped);
* the step s = s₀·exp(ℓ): one ℓ per output channel when ``per_channel``, one shared ℓ otherwise (its
  gradient, LSQ-style, is Σ g·s·((q - z) - u) inside the range and Σ g·s·(q - z) where clipped);
* the bias b̂ = b + σ·β (σ: RMS of the FP32 output channel), when the layer has a bias (``tune_bias``).

The forward pass is the hard-quantized layer, so every iteration's loss is exact; the best iterate is kept
(per output channel when rows are independent, as a whole with a shared scale), scored with the bias it will
get: the bias of the result is re-fitted in closed form (``bias_correction``: the optimal bias for the final
weight), which can only lower the loss.  Channels still worse than nearest rounding fall back to it (problem.finish).

``bias_correction`` and ``bn_reestimate`` work on any rounding and are computed from the statistics.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Tuple

import numpy as np

from .problem import (Adam, auto_iterations, check_params, chunks, dequant, finish, keep_best, LayerProblem, nearest,
                      normalised_quadratic, Objective, positive, RoundingResult, rowdot, validate)

DEFAULTS = {
    "iterations": None,        # None: from the work budget
    "max_iterations": 1000,
    "min_iterations": 50,
    "work": 2e11,
    "lr": None,                # weight perturbation U (units of the step); None: min(0.03, 16 / iterations)
    "lr_scale": None,          # log step; None: lr / 10
    "lr_bias": None,           # bias in units of the output RMS; None: lr / 10
    "learn_scale": True,
    "tune_bias": None,         # None: only when the layer has a bias
}


def _fp_bias(p: LayerProblem) -> np.ndarray:
    return np.zeros(np.shape(p.scale), np.float64) if p.bias is None else np.asarray(p.bias, np.float64)


def bias_correction(problem: LayerProblem, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Empirical bias correction: b' = b - E[Ŵ x̃ - W x] = b - (Ŵ m̃ - W m) / n, (G, N) float32.

    This is the bias minimising the reconstruction loss for the weight Ŵ = dequant(q, scale); it makes the
    mean output error over the calibration rows zero.  A layer without bias gets one (b = 0)."""
    validate(problem, need_rows=False)
    p = problem
    w_hat = dequant(q, scale, p.zero_point).astype(np.float64)
    err = (np.einsum("gnk,gk->gn", w_hat, np.asarray(p.m_q, np.float64))
           - np.einsum("gnk,gk->gn", np.asarray(p.w, np.float64), np.asarray(p.m, np.float64))) / p.n
    return (_fp_bias(p) - err).astype(np.float32)


def _moments(w: np.ndarray, second: np.ndarray, first: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row mean and variance of w·x over the rows, from Σxxᵀ and Σx."""
    mean = np.einsum("gnk,gk->gn", w, first) / n
    ex2 = np.einsum("gnk,gnk->gn", w @ second, w) / n
    return mean, np.maximum(ex2 - mean * mean, 0.0)


def bn_reestimate(problem: LayerProblem, q: np.ndarray, scale: np.ndarray, bias: Optional[np.ndarray] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Re-match the per-output-channel mean and variance of the quantized layer output to the FP32 output
    (what re-estimating a folded BatchNorm does), from the statistics.  Returns (scale, bias), float32 (G, N).

    FP32 output channel i: mean μ_i = w_i·m/n + b_i, variance σ_i² = w_iᵀ G w_i / n - (w_i·m/n)².
    Quantized: μ̂_i = ŵ_i·m̃/n + b̂_i, σ̂_i² = ŵ_iᵀ H ŵ_i / n - (ŵ_i·m̃/n)².  When ``per_channel`` the step of
    channel i is multiplied by a_i = σ_i / σ̂_i (Ŵ = s(q - z) scales with s); a per-tensor step is shared, so
    it is left alone (a = 1).  The bias is then set so the means match: b̂_i = μ_i - a_i ŵ_i·m̃/n (computed with
    the rounded float32 step).  ``bias`` (the current bias of the quantized layer) is replaced, so it does not
    enter the result; it is accepted for symmetry with the other post-processing steps."""
    validate(problem, need_rows=False)
    p = problem
    zp = np.asarray(p.zero_point, np.int64)
    scale = np.asarray(scale, np.float32)
    if scale.shape != np.shape(p.scale) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        from ...errors import OptionError
        raise OptionError(f"layer {p.name!r}: bn_reestimate needs finite positive scales of shape "
                          f"{np.shape(p.scale)}, got {scale.shape}")
    w64 = np.asarray(p.w, np.float64)
    mu_fp, var_fp = _moments(w64, np.asarray(p.g, np.float64), np.asarray(p.m, np.float64), p.n)
    mu_fp = mu_fp + _fp_bias(p)
    w_hat = dequant(q, scale, zp).astype(np.float64)
    if p.per_channel:
        _, var_q = _moments(w_hat, np.asarray(p.h, np.float64), np.asarray(p.m_q, np.float64), p.n)
        ok = (var_q > 0) & (var_fp > 0)
        a = np.where(ok, np.sqrt(np.where(ok, var_fp, 1.0) / np.where(ok, var_q, 1.0)), 1.0)
        new_scale = (scale.astype(np.float64) * a).astype(np.float32)
        new_scale = np.where(np.isfinite(new_scale) & (new_scale > 0), new_scale, scale).astype(np.float32)
        w_hat = dequant(q, new_scale, zp).astype(np.float64)
    else:
        new_scale = scale.copy()
    mu_q = np.einsum("gnk,gk->gn", w_hat, np.asarray(p.m_q, np.float64)) / p.n
    return new_scale, (mu_fp - mu_q).astype(np.float32)


def solve(problem: LayerProblem, *, seed: int = 0, **params: Any) -> RoundingResult:
    """AdaQuant on one layer.  Deterministic: ``seed`` is accepted for a uniform interface, unused."""
    t0 = time.perf_counter()
    validate(problem)
    p = problem
    prm = check_params("adaquant", p, params, DEFAULTS)
    positive("adaquant", p, prm, "max_iterations", "min_iterations", integer=True)
    positive("adaquant", p, prm, "work")
    if prm["iterations"] is not None:
        positive("adaquant", p, prm, "iterations", integer=True)
    for nm in ("lr", "lr_scale", "lr_bias"):
        if prm[nm] is not None:
            positive("adaquant", p, prm, nm)
    iters = auto_iterations(p, prm["iterations"], int(prm["max_iterations"]), int(prm["min_iterations"]),
                            float(prm["work"]))
    lr = float(prm["lr"]) if prm["lr"] is not None else min(0.03, 16.0 / iters)
    lr_s = float(prm["lr_scale"]) if prm["lr_scale"] is not None else lr / 10
    lr_b = float(prm["lr_bias"]) if prm["lr_bias"] is not None else lr / 10
    tune_bias = (p.bias is not None) if prm["tune_bias"] is None else bool(prm["tune_bias"])
    learn_scale = bool(prm["learn_scale"])

    obj = Objective(p)
    gr, nn, k = p.w.shape
    w = np.asarray(p.w, np.float32)
    s0 = np.asarray(p.scale, np.float32)
    z = np.asarray(p.zero_point, np.int64)
    zf = z[..., None].astype(np.float32)
    dnorm, hn, en = normalised_quadratic(p, obj, s0)
    mq = np.asarray(p.m_q, np.float64)
    b_fp = _fp_bias(p)
    sigma = np.sqrt(np.maximum(obj.energy_rows, 0.0) / p.n)
    sigma = np.where(sigma > 0, sigma, 1.0)

    uvar = np.zeros(w.shape, np.float32)
    lsh = (gr, nn) if p.per_channel else (1, 1)
    lvar = np.zeros(lsh, np.float32)
    q0 = nearest(p)
    d_init = (bias_correction(p, q0, s0).astype(np.float64) - b_fp) if tune_bias else np.zeros((gr, nn))
    bvar = (d_init / sigma).astype(np.float32)
    opt_u, opt_l, opt_b = Adam(uvar, lr), Adam(lvar, lr_s), Adam(bvar, lr_b)

    best = None                       # [score per row, q, scale]
    rows_indep = p.per_channel or not learn_scale
    blocks = chunks(w.shape)
    big = max((w[b].size for b in blocks), default=1)
    tmp_b = np.empty(big, np.float32)
    delta, pm, qz, uin = (np.empty(w.shape, np.float32) for _ in range(4))
    inr = np.empty(w.shape, bool)
    s0f = s0[..., None]
    mq32 = mq.astype(np.float32)
    score = np.empty((gr, nn))
    dm = np.empty((gr, nn))
    gl = np.empty((gr, nn))
    for it in range(0, iters + 1):
        s = (s0.astype(np.float64) * np.exp(np.broadcast_to(lvar, (gr, nn)).astype(np.float64))).astype(np.float32)
        sf = s[..., None]
        d = bvar.astype(np.float64) * sigma                      # b̂ - b
        # forward (hard quantization), block by block
        for b in blocks:
            u = np.multiply(s0f[b], uvar[b], out=uin[b])
            u += w[b]
            u /= sf[b]
            qi = np.rint(u, out=qz[b])
            qi += zf[b]
            ib = inr[b]
            np.greater_equal(qi, p.qmin, out=ib)
            ib &= qi <= p.qmax
            np.clip(qi, p.qmin, p.qmax, out=qi)
            qi -= zf[b]                                          # q - z
            np.multiply(qi, sf[b], out=delta[b])
            delta[b] -= w[b]
            u *= ib                                              # u inside the range, 0 where clipped
        np.matmul(delta, hn, out=pm)
        t = it + 1
        for b in blocks:
            db, pb = delta[b], pm[b]
            # normalised per-row loss (up to a constant): Δ Hn Δ / 2 + En Δ + bias terms
            dm[b] = np.matmul(db, mq32[b[0]][..., None])[..., 0]
            score[b] = 0.5 * rowdot(pb, db) + rowdot(en[b], db)
            if it == iters:
                continue
            gw = pb
            gw += en[b]                                          # dJ/dŴ
            if tune_bias:
                gw += ((2.0 / dnorm) * d[b])[..., None].astype(np.float32) * mq32[b[0]][:, None, :]
            if learn_scale:
                # dŴ/dℓ = s((q - z) - u) inside the range, s(q - z) where clipped
                tmp = tmp_b[:gw.size].reshape(gw.shape)
                np.subtract(qz[b], uin[b], out=tmp)
                gl[b] = rowdot(tmp, gw)
            gw *= inr[b]
            gw *= s0f[b]
            opt_u.step(gw, t, b, tmp=tmp_b[:gw.size].reshape(gw.shape))
        dm += obj.wdm                                            # Ŵm̃ - Wm
        if tune_bias:
            # scored with the optimal bias for this weight (what is returned): 2d·dm + n d² = -dm²/n
            score -= dm * dm / (p.n * dnorm)
        best = keep_best(best, score, (qz + zf).astype(np.int64), s, rows_indep)
        if it == iters:
            break
        if learn_scale:
            g = gl * s
            opt_l.step((g if p.per_channel else np.asarray(g.sum()).reshape(1, 1)).astype(np.float32), t)
        if tune_bias:
            opt_b.step(((2.0 / dnorm) * (dm + p.n * d) * sigma).astype(np.float32), t)

    _, q, s_best = best
    bias = None
    if tune_bias:
        bias = bias_correction(p, q, s_best)                   # optimal bias for the final weight
    elif p.bias is not None:
        bias = np.asarray(p.bias, np.float32).copy()
    info = {"iterations": iters, "lr": lr, "lr_scale": lr_s, "lr_bias": lr_b, "tune_bias": tune_bias,
            "learn_scale": learn_scale,
            "scale_change": float(np.max(np.abs(np.log(s_best.astype(np.float64) / s0)))),
            "changed_vs_nearest": int(np.count_nonzero(q != q0))}
    return finish(p, "adaquant", q, s_best, bias, info, t0, obj=obj, separable=rows_indep)
