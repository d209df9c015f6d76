"""FlexRound (Lee et al., "FlexRound: Learnable Rounding based on Element-wise Division for Post-Training
Quantization", ICML 2023), on the layer statistics.

    Ŵ = s₁ · (clip(round(W / (s₁ · exp(S₂) · exp(s₃) [· exp(s₄)])) + z, qmin, qmax) - z)

with a learnable common step s₁ (one per output channel when ``per_channel``, one shared scalar otherwise),
a per-element S₂ (N×K), a per-output-channel s₃ and, with ``use_s4``, a per-input s₄ (over the K fan-in
columns: per input feature for a linear layer, per (input channel, kernel tap) for a convolution).  S₂, s₃,
s₄ start at 0 and s₁ at the problem's scale, so the start is nearest rounding.  Rounding is straight-through:
with D = s₁ e^{S₂} e^{s₃} e^{s₄} and u = W / D, inside the range dŴ/d(log D) = -s₁ u, so the update of an
element grows with |W| (the point of the paper); dŴ/d(log s₁) also has the direct term s₁(q - z).  All
are optimised with Adam on the layer reconstruction loss (problem.py); log s₁ is the learned variable (keeps
it positive).  The forward pass is hard, so every iterate's loss is exact and the best is kept (per output
channel when rows are independent).  Returns the integer q and the learned s₁ as the scale; the bias is
unchanged.  Channels still worse than nearest rounding fall back to it (problem.finish).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .problem import (Adam, auto_iterations, check_params, chunks, finish, keep_best, LayerProblem, nearest,
                      normalised_quadratic, Objective, positive, RoundingResult, rowdot, validate)

DEFAULTS = {
    "iterations": None,        # None: from the work budget
    "max_iterations": 1000,
    "min_iterations": 50,
    "work": 2e11,
    "lr": None,                # S2, s3, s4 (log-divisor units); None: 0.15 / (qmax - qmin)
    "lr_scale": None,          # log s1; None: lr / 2
    "use_s4": False,
}


def solve(problem: LayerProblem, *, seed: int = 0, **params: Any) -> RoundingResult:
    """FlexRound on one layer.  Deterministic: ``seed`` is accepted for a uniform interface, unused."""
    t0 = time.perf_counter()
    validate(problem)
    p = problem
    prm = check_params("flexround", p, params, DEFAULTS)
    positive("flexround", p, prm, "max_iterations", "min_iterations", integer=True)
    positive("flexround", p, prm, "work")
    if prm["iterations"] is not None:
        positive("flexround", p, prm, "iterations", integer=True)
    for nm in ("lr", "lr_scale"):
        if prm[nm] is not None:
            positive("flexround", p, prm, nm)
    iters = auto_iterations(p, prm["iterations"], int(prm["max_iterations"]), int(prm["min_iterations"]),
                            float(prm["work"]))
    lr = float(prm["lr"]) if prm["lr"] is not None else 0.15 / (p.qmax - p.qmin)
    lr_s = float(prm["lr_scale"]) if prm["lr_scale"] is not None else lr / 2
    use_s4 = bool(prm["use_s4"])

    obj = Objective(p)
    gr, nn, k = p.w.shape
    w = np.asarray(p.w, np.float32)
    s0 = np.asarray(p.scale, np.float32)
    z = np.asarray(p.zero_point, np.int64)
    zf = z[..., None].astype(np.float32)
    dnorm, hn, en = normalised_quadratic(p, obj, s0)

    ls1 = np.zeros((gr, nn) if p.per_channel else (1, 1), np.float32)     # log(s1 / s0)
    s2 = np.zeros(w.shape, np.float32)
    s3 = np.zeros((gr, nn), np.float32)
    s4 = np.zeros((gr, k), np.float32)
    opts = [Adam(ls1, lr_s), Adam(s2, lr), Adam(s3, lr)] + ([Adam(s4, lr)] if use_s4 else [])
    q0 = nearest(p)
    # each row's loss depends only on its own (q, s1): iterates can be mixed per row unless s1 is shared
    rows_indep = bool(p.per_channel)
    best = None
    blocks = chunks(w.shape)
    big = max((w[b].size for b in blocks), default=1)
    tmp_b = np.empty(big, np.float32)
    delta, pm, qz, uin = (np.empty(w.shape, np.float32) for _ in range(4))
    inr = np.empty(w.shape, bool)
    score = np.empty((gr, nn))
    g1 = np.empty((gr, nn))
    g3 = np.empty((gr, nn), np.float32)
    g4 = np.zeros((gr, k), np.float32)
    for it in range(0, iters + 1):
        s1 = (s0.astype(np.float64) * np.exp(np.broadcast_to(ls1, (gr, nn)).astype(np.float64))).astype(np.float32)
        s1f = s1[..., None]
        for b in blocks:
            dv = np.add(s2[b], s3[b][..., None], out=uin[b])     # log D - log s1
            if use_s4:
                dv += s4[b[0]][:, None, :]
            np.exp(dv, out=dv)
            dv *= s1f[b]                                         # D
            u = np.divide(w[b], dv, out=dv)                      # u = W / D
            qi = np.rint(u, out=qz[b])
            qi += zf[b]
            ib = inr[b]
            np.greater_equal(qi, p.qmin, out=ib)
            ib &= qi <= p.qmax
            np.clip(qi, p.qmin, p.qmax, out=qi)
            qi -= zf[b]                                          # q - z
            np.multiply(qi, s1f[b], out=delta[b])
            delta[b] -= w[b]
            u *= ib
        np.matmul(delta, hn, out=pm)
        t = it + 1
        for b in blocks:
            db, pb = delta[b], pm[b]
            score[b] = 0.5 * rowdot(pb, db) + rowdot(en[b], db)
            if it == iters:
                continue
            gw = pb
            gw += en[b]
            gw *= s1f[b]                                         # dJ/dŴ · s1
            # dJ/dlog D = -g s1 u (inside the range);  dJ/dlog s1 = that + g s1 (q - z)
            a = uin[b]
            a *= gw
            np.negative(a, out=a)
            g3[b] = a.sum(axis=2)
            g1[b] = g3[b] + rowdot(qz[b], gw)
            if use_s4:
                g4[b[0]] += a.sum(axis=1)
            opts[1].step(a, t, b, tmp=tmp_b[:a.size].reshape(a.shape))
        best = keep_best(best, score, (qz + zf).astype(np.int64), s1, rows_indep)
        if it == iters:
            break
        opts[0].step((g1 if p.per_channel else np.asarray(g1.sum()).reshape(1, 1)).astype(np.float32), t)
        opts[2].step(g3, t)
        if use_s4:
            opts[3].step(g4, t)
            g4[...] = 0.0

    _, q, s_best = best
    info = {"iterations": iters, "lr": lr, "lr_scale": lr_s, "use_s4": use_s4,
            "scale_change": float(np.max(np.abs(np.log(s_best.astype(np.float64) / s0)))),
            "changed_vs_nearest": int(np.count_nonzero(q != q0))}
    bias = None if p.bias is None else np.asarray(p.bias, np.float32).copy()
    return finish(p, "flexround", q, s_best, bias, info, t0, obj=obj, separable=rows_indep)
