"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Each weight chooses floor or ceil:  Ŵ = s · (clip(⌊W/s⌋ + z + h(V), qmin, qmax) - z)  with the rectified
sigmoid h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1), ζ = 1.1, γ = -0.1.  V starts where h(V) equals the fractional
part of W/s (so the soft weight starts at W) and minimises

    L(Ŵ)/D + λ Σ_ij (1 - |2 h(V_ij) - 1|^β)

with Adam, where L is the layer's reconstruction loss (problem.py; the exact full-batch gradient
2(Ŵ H - W Cᵀ) comes from the statistics, no sampling) and D the mean curvature of L along one integer step
(so λ means the same on every layer; the default λ = 10 in these units, while the paper's 0.01 is relative to
an unnormalised per-sample loss).  The first ``warmup`` fraction of the iterations has no regulariser;
then β decays linearly from ``beta_start`` (20) to ``beta_end`` (2).  The result is hard rounding h >= 0.5.
A few late checkpoints of the hard rounding are scored exactly and the best per output channel is kept;
channels still worse than nearest rounding fall back to it (problem.finish).

Cost per iteration is one (N×K)·(K×K) product per group plus ~30 elementwise passes over the weight
(done in cache-sized blocks); without ``iterations`` the count is chosen from the layer's size (``work``
multiply-adds, between ``min_iterations`` and ``max_iterations``, problem.auto_iterations), deterministically:
1000 for layers up to N·K·(K + 1024) ≈ 2e8 (e.g. 64×576), ~50 for N = K = 1280 (~60-90 ms per iteration on
2 CPU cores).  Quality grows with the iterations; pass ``iterations`` for more.  The learning rate defaults to
``30 / iterations`` (at most 0.5) (Adam moves V by at most ~lr per step, and V must travel a few units).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ...errors import OptionError
from .problem import (Adam, auto_iterations, bmm, check_params, chunks, finish, LayerProblem, normalised_quadratic,
                      Objective, positive, RoundingResult, rowdot, split_active, validate)

#: Adam moves a parameter by at most ~lr per step; V has to travel a few units: lr = LR_TRAVEL / iterations
LR_TRAVEL = 30.0

DEFAULTS = {
    "iterations": None,        # None: from the work budget
    "max_iterations": 1000,
    "min_iterations": 50,
    "work": 2e11,              # multiply-adds per layer when iterations is None
    "lr": None,                # None: 30 / iterations, at most 0.5
    "reg_weight": 10.0,        # λ, in units of the normalised reconstruction loss
    "warmup": 0.2,
    "beta_start": 20.0,
    "beta_end": 2.0,
    "zeta": 1.1,
    "gamma": -0.1,
    "checkpoints": 4,          # hard roundings scored at 100%, 90%, 80%, 70% of the iterations
}


def solve(problem: LayerProblem, *, seed: int = 0, **params: Any) -> RoundingResult:
    """AdaRound on one layer.  Deterministic: ``seed`` is accepted for a uniform interface, unused."""
    t0 = time.perf_counter()
    validate(problem)
    p = problem
    prm = check_params("adaround", p, params, DEFAULTS)
    positive("adaround", p, prm, "max_iterations", "min_iterations", integer=True)
    positive("adaround", p, prm, "work", "beta_start", "beta_end")
    positive("adaround", p, prm, "reg_weight", "checkpoints", allow_zero=True)
    if prm["iterations"] is not None:
        positive("adaround", p, prm, "iterations", integer=True)
    if prm["lr"] is not None:
        positive("adaround", p, prm, "lr")
    if not (isinstance(prm["warmup"], (int, float)) and 0 <= prm["warmup"] < 1):
        raise OptionError(f"layer {p.name!r}: adaround warmup={prm['warmup']!r} must be in [0, 1)")
    zeta, gamma = float(prm["zeta"]), float(prm["gamma"])
    if not (zeta > 1 and gamma < 0):
        raise OptionError(f"layer {p.name!r}: adaround needs zeta > 1 and gamma < 0 (got {zeta}, {gamma})")
    if prm["beta_end"] < 1 or prm["beta_start"] < prm["beta_end"]:
        raise OptionError(f"layer {p.name!r}: adaround needs beta_start >= beta_end >= 1")
    iters = auto_iterations(p, prm["iterations"], int(prm["max_iterations"]), int(prm["min_iterations"]),
                            float(prm["work"]))
    lr = float(prm["lr"]) if prm["lr"] is not None else min(0.5, LR_TRAVEL / iters)
    lam = float(prm["reg_weight"])
    width = zeta - gamma

    obj = Objective(p)
    w = np.asarray(p.w, np.float32)
    s = np.asarray(p.scale, np.float32)[..., None]
    z = np.asarray(p.zero_point, np.int64)[..., None]
    u = w / s
    wf = np.floor(u)
    frac = (u - wf).astype(np.float32)
    wf = np.clip(wf, p.qmin - 2 - z, p.qmax + 1 - z).astype(np.int64)   # out-of-range stays out of range
    base = wf + z
    active, fixed = split_active(p, base)
    s_act = np.where(active, s, np.float32(0)).astype(np.float32)
    wfix = (fixed - z).astype(np.float64) * s.astype(np.float64)
    dfix = np.where(active, 0.0, wfix - p.w.astype(np.float64)).astype(np.float32)
    c0 = dfix - frac * s_act                     # Δ = Ŵ - W = h * s_act + c0

    dnorm, hn, en = normalised_quadratic(p, obj, s[..., 0])
    # the optimised variable is U = -V (saves a pass); dL/dU = -dL/dV, folded into these constants
    saw = (-width * s_act).astype(np.float32)
    reg_c = 2.0 * lam * width                     # d/dh λ(1-|2h-1|^β) = -2λβ|2h-1|^(β-1)sign(2h-1)

    p0 = np.clip((frac.astype(np.float64) - gamma) / width, 1e-6, 1 - 1e-6)
    uvar = np.log((1.0 - p0) / p0).astype(np.float32)          # U = -logit(p0)
    adam = Adam(uvar, lr)

    warm = int(math.ceil(prm["warmup"] * iters))
    n_ck = int(prm["checkpoints"])
    ck = {int(round(iters * (1.0 - 0.1 * j))) for j in range(n_ck)} | {iters}
    ck = {c for c in ck if c >= 1}
    blocks = chunks(w.shape)
    big = max((w[b].size for b in blocks), default=1)
    sig_b, hh_b, tmp_b = (np.empty(big, np.float32) for _ in range(3))
    hc, fac, delta, pm = (np.empty(w.shape, np.float32) for _ in range(4))
    best_q = np.zeros(w.shape, bool)
    best_score = np.full(w.shape[:2], np.inf)
    ck_done = 0

    for it in range(1, iters + 1):
        beta = None
        if it > warm and lam > 0:
            rel = (it - warm) / max(iters - warm, 1)
            beta = prm["beta_end"] + (prm["beta_start"] - prm["beta_end"]) * max(0.0, 1.0 - rel)
        # elementwise, block by block (stays in cache): h, dh/dV, Δ
        for b in blocks:
            uv = uvar[b]
            sig, hh = (x[:uv.size].reshape(uv.shape) for x in (sig_b, hh_b))
            hcb, facb = hc[b], fac[b]
            # h = clip(σ(V)(ζ-γ)+γ, 0, 1) with σ(V) = 1/(1+exp(U))
            np.exp(uv, out=sig)
            sig += 1.0
            np.reciprocal(sig, out=sig)
            np.multiply(sig, width, out=hh)
            hh += gamma
            np.clip(hh, 0.0, 1.0, out=hcb)
            # dh/dV = (ζ-γ) σ(1-σ) inside (0, 1), 0 where clipped (the width is in saw / reg_c)
            np.subtract(1.0, sig, out=facb)
            facb *= sig
            facb *= (hcb == hh)
            np.multiply(hcb, s_act[b], out=delta[b])
            delta[b] += c0[b]
        # reconstruction gradient (normalised): (Δ Hn + En) * s, one GEMM for the whole layer
        bmm(delta, hn, pm)
        for b in blocks:
            grad = pm[b]
            grad += en[b]
            grad *= saw[b]
            if beta is not None:
                hcb = hc[b]
                sig, hh = (x[:hcb.size].reshape(hcb.shape) for x in (sig_b, hh_b))
                # a = 2h - 1;  grad_h += -2λβ |a|^(β-1) sign(a)
                np.multiply(hcb, 2.0, out=hh)
                hh -= 1.0
                np.abs(hh, out=sig)
                with np.errstate(divide="ignore"):
                    np.log(sig, out=sig)
                sig *= np.float32(beta - 1.0)
                np.exp(sig, out=sig)
                np.copysign(sig, hh, out=sig)
                sig *= np.float32(reg_c * beta)
                grad += sig
            grad *= fac[b]
            adam.step(grad, it, b, tmp=tmp_b[:grad.size].reshape(grad.shape))
        if it in ck:
            ck_done += 1
            _checkpoint(uvar, width, gamma, active, s_act, c0, hn, en, best_q, best_score)

    q = np.where(active, base + best_q.astype(np.int64), fixed)
    hfin = np.clip(width / (1.0 + np.exp(uvar[active].astype(np.float64))) + gamma, 0.0, 1.0)
    sat = float(np.mean((hfin <= 0) | (hfin >= 1))) if hfin.size else 1.0
    q_near = np.clip(np.rint(w / s) + z, p.qmin, p.qmax)
    info = {"iterations": iters, "lr": lr, "reg_weight": lam, "checkpoints": ck_done,
            "saturated_fraction": sat, "flipped_vs_nearest": int(np.count_nonzero(q != q_near))}
    return finish(p, "adaround", q, p.scale, p.bias, info, t0, obj=obj, separable=True)


def _checkpoint(uvar, width, gamma, active, s_act, c0, hn, en, best_q, best_score) -> None:
    """Score the hard rounding h >= 0.5 of the current V per output channel (normalised loss up to a
    per-row constant) and keep, per row, the best seen so far."""
    hard = ((width / (1.0 + np.exp(uvar)) + gamma) >= 0.5) & active
    dh = hard.astype(np.float32) * s_act + c0
    pm = bmm(dh, hn, np.empty_like(dh))
    pm *= 0.5
    pm += en
    score = rowdot(pm, dh).astype(np.float64)
    better = score < best_score
    best_q[...] = np.where(better[..., None], hard, best_q)
    best_score[...] = np.where(better, score, best_score)
