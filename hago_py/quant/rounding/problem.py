"""The per-layer reconstruction problem shared by the data-driven rounding solvers.

For a layer y = W x + b (W grouped as (G, N, K): G groups, N output channels per group, K fan-in) the
quantized layer computes ŷ = Ŵ x̃ + b̂, with x̃ its input in the partially quantized model.  Over the
calibration rows n = 1..n the squared reconstruction error is, per group, with d = b̂ - b,

    L(Ŵ, b̂) = Σ_n ||Ŵ x̃_n + b̂ - W x_n - b||²
            = tr(Ŵ H Ŵᵀ) - 2 tr(Ŵ C Wᵀ) + tr(W G Wᵀ) + 2 dᵀ(Ŵ m̃ - W m) + n ||d||²

with H = Σ x̃x̃ᵀ, C = Σ x̃xᵀ, G = Σ xxᵀ, m̃ = Σ x̃, m = Σ x.  Everything a solver needs is in those
statistics, so no sample is kept.  The gradients are dL/dŴ = 2(Ŵ H - W Cᵀ + d m̃ᵀ) and
dL/db̂ = 2(Ŵ m̃ - W m) + 2 n d.

Evaluated naively the three trace terms are large and nearly cancel.  Writing Ŵ = W + Δ:

    L = tr(Δ H Δᵀ) + 2 tr(Δ (H - C) Wᵀ) + tr(W (H - C - Cᵀ + G) Wᵀ) + bias terms

where the last term (the error caused by the quantized *input* alone) does not depend on Ŵ.  This is the
form used here (in float64): every term is of the size of the error itself.  The loss separates over output
channels (rows): row i only depends on ŵ_i, its scale and its bias.

Reported losses (``RoundingResult.info['loss']``, ``['loss_nearest']``) are *relative*: L divided by the
FP32 output energy Σ_n ||W x_n||² = tr(W G Wᵀ) (both carry the same factor n, so this is also the per-row
mean error over the per-row mean energy).

This module also holds what the solvers share: validation, nearest rounding, dequantization, an Adam
optimizer, the iteration budget and the final "never worse than nearest" check.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ...errors import DataError, OptionError

__all__ = ["LayerProblem", "RoundingResult", "validate", "nearest", "dequant", "loss", "row_losses",
           "relative_loss"]


@dataclass
class LayerProblem:
    w: np.ndarray        # (G, N, K) float32 FP32 weight
    h: np.ndarray        # (G, K, K) float64  Σ x̃ x̃ᵀ
    c: np.ndarray        # (G, K, K) float64  Σ x̃ xᵀ
    g: np.ndarray        # (G, K, K) float64  Σ x xᵀ
    m_q: np.ndarray      # (G, K) float64 Σ x̃
    m: np.ndarray        # (G, K) float64 Σ x
    n: int               # number of rows (samples × spatial positions)
    scale: np.ndarray    # (G, N) float32 initial quantization step per output channel
    zero_point: np.ndarray  # (G, N) int64
    qmin: int
    qmax: int
    per_channel: bool    # False: one scale shared by all channels (learned scales stay shared)
    bias: Optional[np.ndarray] = None   # (G, N) float32 or None
    name: str = ""       # layer name, for error messages


@dataclass
class RoundingResult:
    q: np.ndarray                 # (G, N, K) int64 within [qmin, qmax]
    scale: np.ndarray             # (G, N) float32
    bias: Optional[np.ndarray]    # (G, N) float32 or None
    info: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _label(p: LayerProblem) -> str:
    return f"layer {p.name!r}" if p.name else "layer <unnamed>"


def validate(p: LayerProblem, *, need_rows: bool = True) -> None:
    """Check shapes, finiteness and qparams; raise DataError (statistics / weight) or OptionError (qparams).

    ``need_rows``: the data-driven solvers fit K unknowns per output channel to the statistics, which needs
    at least K calibration rows (n >= K); nearest rounding, bias correction and BN re-estimation do not."""
    lab = _label(p)
    w = np.asarray(p.w)
    if w.ndim != 3 or min(w.shape) < 1:
        raise DataError(f"{lab}: weight must have shape (G, N, K) with G, N, K >= 1, got {w.shape}; "
                        "reshape it with LayerGeometry.to_grouped")
    gr, nn, k = w.shape
    for name, want in (("h", (gr, k, k)), ("c", (gr, k, k)), ("g", (gr, k, k)), ("m_q", (gr, k)), ("m", (gr, k)),
                       ("scale", (gr, nn)), ("zero_point", (gr, nn))):
        got = np.shape(getattr(p, name))
        if tuple(got) != want:
            raise DataError(f"{lab}: '{name}' has shape {tuple(got)} but the weight {w.shape} needs {want}; "
                            "build the statistics and qparams for the grouped weight (G, N, K)")
    if p.bias is not None and tuple(np.shape(p.bias)) != (gr, nn):
        raise DataError(f"{lab}: bias has shape {tuple(np.shape(p.bias))}, expected {(gr, nn)} (G, N)")
    if not np.all(np.isfinite(w)):
        raise DataError(f"{lab}: the FP32 weight contains NaN or Inf; fix the model before quantizing it")
    if p.bias is not None and not np.all(np.isfinite(p.bias)):
        raise DataError(f"{lab}: the FP32 bias contains NaN or Inf; fix the model before quantizing it")
    for name in ("h", "c", "g", "m_q", "m"):
        if not np.all(np.isfinite(getattr(p, name))):
            raise DataError(f"{lab}: calibration statistic '{name}' contains NaN or Inf (overflowing activations "
                            "or bad calibration data); check the calibration samples and the FP32 model outputs")
    if isinstance(p.n, bool) or not isinstance(p.n, (int, np.integer)) or p.n < 1:
        raise DataError(f"{lab}: the number of calibration rows n={p.n!r} must be a positive integer; "
                        "give calibration samples")
    if need_rows and p.n < k:
        raise DataError(f"{lab} has fan-in K={k} but only n={int(p.n)} calibration rows; give at least K rows "
                        f"(more calibration samples) or use nearest rounding for this layer")
    for name in ("h", "g"):
        d = np.diagonal(getattr(p, name), axis1=1, axis2=2)
        if np.any(d < 0):
            raise DataError(f"{lab}: statistic '{name}' has a negative diagonal, so it is not a sum of x xᵀ; "
                            "recompute the calibration statistics")
    if not (isinstance(p.qmin, (int, np.integer)) and isinstance(p.qmax, (int, np.integer))) or p.qmin >= p.qmax:
        raise OptionError(f"{lab}: integer range [qmin={p.qmin!r}, qmax={p.qmax!r}] is empty or not integer; "
                          "use qrange(dtype, bits, narrow)")
    s = np.asarray(p.scale)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise OptionError(f"{lab}: quantization scales must be finite and > 0 (got min {np.nanmin(s)!r}); "
                          "compute them with weight_qparams")
    z = np.asarray(p.zero_point)
    if not np.issubdtype(z.dtype, np.integer) or np.any(z < p.qmin) or np.any(z > p.qmax):
        raise OptionError(f"{lab}: zero points must be integers in [{p.qmin}, {p.qmax}]; "
                          "compute them with weight_qparams")
    if not p.per_channel and (np.any(s != s.reshape(-1)[0]) or np.any(z != z.reshape(-1)[0])):
        raise OptionError(f"{lab} is per-tensor (per_channel=False) but its scales / zero points differ between "
                          "channels; give one shared scale and zero point, or set per_channel=True")


def check_params(method: str, p: LayerProblem, given: Mapping[str, Any], defaults: Mapping[str, Any]
                 ) -> Dict[str, Any]:
    """Merge ``given`` over ``defaults``; unknown names are an OptionError naming the layer."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise OptionError(f"{_label(p)}: unknown {method} parameter(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    out.update(given)
    return out


def positive(method: str, p: LayerProblem, params: Mapping[str, Any], *names: str, integer: bool = False,
             allow_zero: bool = False) -> None:
    for nm in names:
        v = params[nm]
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v >= 0 if allow_zero else v > 0) and (not integer or float(v).is_integer())
        if not ok:
            kind = "an integer" if integer else "a number"
            raise OptionError(f"{_label(p)}: {method} parameter {nm}={v!r} must be {kind} "
                              f"{'>= 0' if allow_zero else '> 0'}")


# --------------------------------------------------------------------------------------------------
# rounding helpers
# --------------------------------------------------------------------------------------------------
def nearest(p: LayerProblem) -> np.ndarray:
    """Round-to-nearest (ties to even) integer weight (G, N, K) int64, exactly as rounding.nearest does."""
    s = np.asarray(p.scale, np.float32)[..., None]
    z = np.asarray(p.zero_point, np.int64)[..., None]
    q = np.rint(np.asarray(p.w, np.float32) / s) + z
    return np.clip(q, p.qmin, p.qmax).astype(np.int64)


def dequant(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """(q - zp) * scale in float32, (G, N, K), as the deployed model computes it."""
    s = np.asarray(scale, np.float32)[..., None]
    z = np.asarray(zp, np.int64)[..., None]
    return ((np.asarray(q, np.int64) - z).astype(np.float32) * s).astype(np.float32)


class Objective:
    """The loss of one problem, with the Ŵ-independent parts precomputed (float64)."""

    def __init__(self, p: LayerProblem):
        self.p = p
        self.w = np.asarray(p.w, np.float64)
        h, c, g = (np.asarray(a, np.float64) for a in (p.h, p.c, p.g))
        self.h = h
        self.hc = h - c                                              # H - C
        self.e = self.w @ self.hc.transpose(0, 2, 1)                 # W (H - C)ᵀ, (G, N, K)
        self.const = rowdot(self.w @ (self.hc - c.transpose(0, 2, 1) + g), self.w)
        self.energy_rows = rowdot(self.w @ g, self.w)
        self.energy = float(self.energy_rows.sum())
        self.m_q = np.asarray(p.m_q, np.float64)
        self.wdm = np.einsum("gnk,gk->gn", self.w, self.m_q - np.asarray(p.m, np.float64))   # w·(m̃ - m)
        self.b = np.zeros(np.shape(p.scale)) if p.bias is None else np.asarray(p.bias, np.float64)

    def rows(self, w_hat: np.ndarray, bias_hat: Optional[np.ndarray] = None) -> np.ndarray:
        """Per-row loss (G, N), unnormalised."""
        delta = np.asarray(w_hat, np.float64) - self.w
        out = rowdot(delta @ self.h + 2.0 * self.e, delta) + self.const
        if bias_hat is not None:
            d = np.asarray(bias_hat, np.float64) - self.b
            out = out + 2.0 * d * (np.einsum("gnk,gk->gn", delta, self.m_q) + self.wdm) + self.p.n * d * d
        return out

    def relative(self, total: float) -> float:
        """total / tr(W G Wᵀ); the absolute loss when the FP32 output energy is 0."""
        return float(total / self.energy) if self.energy > 0 else float(total)


def row_losses(p: LayerProblem, w_hat: np.ndarray, bias_hat: Optional[np.ndarray] = None) -> np.ndarray:
    """Per output channel reconstruction loss (G, N) of ``w_hat`` (and ``bias_hat``; None: the FP32 bias)."""
    return Objective(p).rows(w_hat, bias_hat)


def loss(p: LayerProblem, w_hat: np.ndarray, bias_hat: Optional[np.ndarray] = None, *,
         relative: bool = False) -> float:
    """Σ_n ||Ŵ x̃_n + b̂ - W x_n - b||² from the statistics (exact up to float64 rounding).

    ``bias_hat=None`` means the bias is unchanged.  ``relative=True`` divides by tr(W G Wᵀ)."""
    obj = Objective(p)
    total = float(obj.rows(w_hat, bias_hat).sum())
    return obj.relative(total) if relative else total


def relative_loss(p: LayerProblem, w_hat: np.ndarray, bias_hat: Optional[np.ndarray] = None) -> float:
    return loss(p, w_hat, bias_hat, relative=True)


# --------------------------------------------------------------------------------------------------
# shared solver machinery
# --------------------------------------------------------------------------------------------------
class Adam:
    """Adam (Kingma & Ba 2015) for one float32 array, updated in place; ``step(grad, t, sl)`` updates the
    part ``sl`` (an index into the array) with the gradient of that part at step t (1-based), so a large
    array can be updated chunk by chunk.  The moments are kept unnormalised (M = m/(1-b1), V = v/(1-b2)),
    which saves passes over the data and changes nothing else."""

    def __init__(self, x: np.ndarray, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.x = x
        self.lr = float(lr)
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = np.zeros_like(x)
        self.v = np.zeros_like(x)

    def step(self, grad: np.ndarray, t: int, sl=Ellipsis, tmp: Optional[np.ndarray] = None) -> None:
        c1 = 1.0 - self.b1 ** t
        c2 = 1.0 - self.b2 ** t
        m, v, x = self.m[sl], self.v[sl], self.x[sl]
        m *= self.b1
        m += grad
        v *= self.b2
        if tmp is None:
            tmp = np.empty_like(grad)
        np.multiply(grad, grad, out=tmp)
        v += tmp
        # x -= lr/c1 * (1-b1) M / (sqrt((1-b2) V / c2) + eps)
        k = (self.lr * (1.0 - self.b1) / c1)
        np.sqrt(v, out=tmp)
        tmp *= np.float32(math.sqrt((1.0 - self.b2) / c2) / k)
        tmp += np.float32(self.eps / k)
        np.divide(m, tmp, out=tmp)
        x -= tmp


def chunks(shape: Tuple[int, int, int], target: int = 65536):
    """Index pairs (group slice, row slice) splitting a (G, N, K) array into blocks of ~``target`` elements
    (whole groups when G > 1, row ranges when G == 1), so elementwise passes stay in cache."""
    gr, nn, k = shape
    if gr == 1:
        step = max(1, target // max(k, 1))
        return [(slice(0, 1), slice(r, min(r + step, nn))) for r in range(0, nn, step)]
    step = max(1, target // max(nn * k, 1))
    return [(slice(g, min(g + step, gr)), slice(0, nn)) for g in range(0, gr, step)]


def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ_k a[..., k] b[..., k] in the inputs' precision (a batched BLAS dot; much faster than einsum)."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def bmm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = a @ b for (g, r, K) @ (g, K, K); a plain 2-D GEMM when g == 1."""
    if a.shape[0] == 1:
        np.matmul(a[0], b[0], out=out[0])
    else:
        np.matmul(a, b, out=out)
    return out


#: cost of one iteration of an iterative solver ~ G*N*K*(K + ELEMENTWISE_COST) multiply-adds
ELEMENTWISE_COST = 1024


def auto_iterations(p: LayerProblem, iterations: Optional[int], max_iterations: int, min_iterations: int,
                    work: float) -> int:
    """``iterations`` when given; otherwise as many as ``work`` multiply-adds allow, in
    [min_iterations, max_iterations].  Deterministic (depends on the shape only, never on the clock)."""
    if iterations is not None:
        return int(iterations)
    gr, nn, k = np.shape(p.w)
    per_it = float(gr) * nn * k * (k + ELEMENTWISE_COST)
    return int(max(min_iterations, min(max_iterations, work // per_it)))


def normalised_quadratic(p: LayerProblem, obj: "Objective", scale: np.ndarray
                         ) -> Tuple[float, np.ndarray, np.ndarray]:
    """(normaliser, 2H / normaliser, 2E / normaliser): the loss's quadratic and linear terms scaled so one
    integer step of one weight costs O(1) (see ``normaliser``), float32, as the Adam-based solvers use them."""
    dnorm = normaliser(p, scale)
    hn = (np.asarray(p.h, np.float64) * (2.0 / dnorm)).astype(np.float32)
    en = (obj.e * (2.0 / dnorm)).astype(np.float32)
    return dnorm, hn, en


def normaliser(p: LayerProblem, scale: np.ndarray) -> float:
    """Mean curvature of the loss along one integer step of one weight: mean_{i,j} s_i² H_jj (> 0).

    Dividing the loss by it makes one rounding decision cost O(1), so learning rates and regulariser
    weights mean the same on every layer."""
    s2 = np.asarray(scale, np.float64) ** 2                          # (G, N)
    dh = np.diagonal(np.asarray(p.h, np.float64), axis1=1, axis2=2)  # (G, K)
    v = float(np.mean(s2[:, :, None] * dh[:, None, :]))
    if not (v > 0 and math.isfinite(v)):
        v = float(np.mean(s2)) * max(float(np.mean(dh)), 1.0 / max(p.n, 1)) or 1.0
    return v


def finish(p: LayerProblem, method: str, q: np.ndarray, scale: np.ndarray, bias: Optional[np.ndarray],
           info: Dict[str, Any], t0: float, *, obj: Optional[Objective] = None,
           separable: bool = True) -> RoundingResult:
    """Compare with nearest rounding and fall back where the method is worse; fill the common info.

    ``separable``: rows may be replaced independently (true unless one learned scale is shared by all
    rows).  Rows (or the whole tensor) where the method's loss exceeds nearest's get nearest's integers,
    the initial scale and the FP32 bias; ``info['fallback']`` says so."""
    obj = obj or Objective(p)
    q = np.clip(np.asarray(q, np.int64), p.qmin, p.qmax)
    scale = np.asarray(scale, np.float32).copy()
    bias = None if bias is None else np.asarray(bias, np.float32).copy()
    q0 = nearest(p)
    s0 = np.asarray(p.scale, np.float32)
    zp = np.asarray(p.zero_point, np.int64)
    l0 = obj.rows(dequant(q0, s0, zp))
    l1 = obj.rows(dequant(q, scale, zp), bias)
    worse = l1 > l0
    fallback = "none"
    if np.any(worse):
        if separable and not np.all(worse):
            fallback = "rows"
            q = np.where(worse[..., None], q0, q)
            scale = np.where(worse, s0, scale).astype(np.float32)
            if bias is not None:
                b0 = np.zeros_like(bias) if p.bias is None else np.asarray(p.bias, np.float32)
                bias = np.where(worse, b0, bias).astype(np.float32)
            l1 = np.where(worse, l0, l1)
        elif separable or l1.sum() > l0.sum():
            fallback = "nearest"
            worse = np.ones_like(worse)
            q, scale, l1 = q0, s0.copy(), l0
            bias = None if p.bias is None else np.asarray(p.bias, np.float32).copy()
        else:
            worse = np.zeros_like(worse)
    if not p.per_channel:
        assert np.all(scale == scale.reshape(-1)[0])
    out = {"method": method,
           "loss_nearest": obj.relative(float(l0.sum())),
           "loss": obj.relative(float(l1.sum())),
           "fallback": fallback,
           "fallback_rows": int(np.count_nonzero(worse)),
           "iterations": int(info.pop("iterations", 0)),
           "seconds": time.perf_counter() - t0}
    if fallback != "none":
        out["note"] = (f"{method} was worse than nearest rounding on {out['fallback_rows']} of {worse.size} "
                       f"output channels; those use nearest rounding")
    out.update(info)
    return RoundingResult(q=q.astype(np.int64), scale=scale, bias=bias, info=out)


def split_active(p: LayerProblem, base: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For integer candidates ``base`` (+0 or +1 to be chosen) the mask of elements where the choice
    matters (both candidates in range) and the clipped fixed value elsewhere."""
    active = (base >= p.qmin) & (base <= p.qmax - 1)
    fixed = np.clip(base, p.qmin, p.qmax)
    return active, fixed


def keep_best(best, score: np.ndarray, q: np.ndarray, s: np.ndarray, rows_indep: bool):
    """Best-so-far [score, q, scale] of an iterative solver: per output row when rows are independent
    (per-channel scales), else for the whole tensor (one shared scale)."""
    if best is None:
        return [score.copy(), q, s.copy()]
    if rows_indep:
        better = score < best[0]
        if np.any(better):
            best[0] = np.where(better, score, best[0])
            best[1] = np.where(better[..., None], q, best[1])
            best[2] = np.where(better, s, best[2])
        return best
    if score.sum() < best[0].sum():
        return [score.copy(), q, s.copy()]
    return best
