"""Calibration observers: estimate the clipping range of an activation tensor from streamed batches.

Every observer sees the calibration data one batch at a time (``update``) and keeps only a summary
whose size does not depend on the number of batches: a running min/max for :class:`MinMaxObserver`,
and a fixed-bin-count histogram for the histogram observers (percentile, MSE, entropy).  Activations
themselves are never stored.

Histogram design (``_Histogram``)
---------------------------------
Bins have a power-of-two width ``w = 2**e`` and are anchored at zero: global bin ``g`` covers
``[g*w, (g+1)*w)``.  The histogram is a window of ``bins`` consecutive global bins starting at
``off = floor(min / w)``.  ``e`` is the *smallest* exponent for which the data range ``[min, max]``
fits in the window (and ``w >= 2**-24 * max|x|``, float32 resolution, which bounds the indices).

When a batch extends the range, ``e`` grows by ``k >= 0`` and the window moves: old global bin ``g``
becomes ``g >> k``, i.e. ``2**k`` old bins merge *exactly* into one new bin - no proportional
redistribution, no smearing.  Since ``e`` and ``off`` are pure functions of the global ``[min, max]``,
and binning with a power-of-two width is exact in floating point, the final histogram is bit-for-bit
the same whatever the batch split or order.  The price is resolution: the data occupies between about
``bins/2`` and ``bins`` bins (its |x| fold, used by symmetric percentile and entropy, at least
``bins/4`` for two-sided data).  Memory is ``bins`` int64 counters plus a few scalars.

Exact zeros (very common after Relu / padding) are also counted separately, so that they can be
treated as a point mass at 0 (they are always exactly representable: ranges always contain 0).

Ranges returned by ``compute_range`` always contain 0 (``lo <= 0 <= hi``); a tensor with no negative
value gets ``lo == 0.0`` exactly.  Symmetric ranges are ``(-t, t)`` for two-sided data, ``(0, t)``
for non-negative data and ``(-t, 0)`` for non-positive data; only ``t`` matters for the qparams.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from hago_py.errors import DataError, OptionError

__all__ = [
    "qrange",
    "qparams_from_range",
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
    "make_observer",
    "OBSERVERS",
]

_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32
_F32_MAX = float(np.finfo(np.float32).max)
_DTYPE_RE = re.compile(r"^(u?)int(\d+)$")
_CHUNK = 1 << 20  # elements binned at a time


# --------------------------------------------------------------------------------------------------
# integer ranges and qparams
# --------------------------------------------------------------------------------------------------
def _parse_dtype(dtype: Any) -> Tuple[bool, int]:
    """-> (signed, width) for 'int8', 'uint8', 'int4', ... (numpy dtypes accepted too)."""
    name = dtype if isinstance(dtype, str) else None
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    m = _DTYPE_RE.match(name.strip().lower())
    if not m or not 2 <= int(m.group(2)) <= 32:
        raise OptionError(f"unsupported quantized dtype {dtype!r}; expected int<N> or uint<N> with "
                          f"2 <= N <= 32 (e.g. 'int8', 'uint8', 'int4', 'uint4')")
    return m.group(1) == "", int(m.group(2))


def qrange(dtype: str, bits: Optional[int] = None, narrow: bool = False) -> Tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of ``dtype`` using ``bits`` of it (default: all of them).

    ``bits`` below the container width models 'reduce_range' (e.g. 7-bit values in an int8 container:
    (-64, 63); in uint8: (0, 127)).  ``narrow`` drops the most negative value of a signed type
    (int8 -> (-127, 127)); it has no effect on unsigned types.
    """
    signed, width = _parse_dtype(dtype)
    if bits is None:
        bits = width
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= width:
        raise OptionError(f"bits={bits!r} is invalid for {dtype}: expected an integer in [2, {width}]")
    bits = int(bits)
    if signed:
        qmax = (1 << (bits - 1)) - 1
        qmin = -qmax if narrow else -qmax - 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    return qmin, qmax


def _sym_zero_point(dtype: Any, qmin: int, qmax: int) -> int:
    signed, _ = _parse_dtype(dtype)
    return 0 if signed else (qmin + qmax + 1) // 2


def qparams_from_range(lo: float, hi: float, dtype: str, bits: Optional[int] = None,
                       symmetric: bool = False, narrow: bool = False) -> Tuple[float, int]:
    """``(scale, zero_point)`` mapping the float range ``[lo, hi]`` onto ``qrange(dtype, bits, narrow)``.

    The range is first widened to contain 0 so that 0.0 quantizes exactly to ``zero_point``.

    * asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zp = round(qmin - lo / scale)`` (clipped).
    * symmetric, signed type: ``scale = max(|lo|, |hi|) / qmax``, ``zp = 0`` (int8: /127; 7-bit: /63).
    * symmetric, unsigned type: ``zp = (qmin + qmax + 1) // 2`` (128 for uint8),
      ``scale = max(|lo|, |hi|) / (qmax - zp)`` (/127 for uint8).
    * degenerate range (all zero): ``scale = 1.0``.

    ``scale`` is a Python float that is exactly representable in float32 and >= the smallest normal
    float32; ``zero_point`` is a Python int in ``[qmin, qmax]``.
    """
    qmin, qmax = qrange(dtype, bits, narrow)
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise OptionError(f"range bounds must be numbers, got lo={lo!r}, hi={hi!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise OptionError(f"cannot compute qparams from a non-finite range [{lo}, {hi}]")
    if lo > hi:
        raise OptionError(f"cannot compute qparams from an empty range: lo={lo} > hi={hi}")
    lo, hi = min(lo, 0.0), max(hi, 0.0)

    if symmetric:
        zp = _sym_zero_point(dtype, qmin, qmax)
        amax = max(-lo, hi)
        scale = amax / (qmax - zp)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = None
    if scale == 0.0:
        scale = 1.0
    scale = float(np.float32(max(scale, _F32_TINY)))
    if not math.isfinite(scale) or scale > _F32_MAX:
        raise OptionError(f"range [{lo}, {hi}] is too wide for a float32 scale")
    if zp is None:
        zp = int(round(qmin - lo / scale))
        zp = min(max(zp, qmin), qmax)
    return scale, int(zp)


class _QSpec:
    """Resolved quantization request (dtype/bits/symmetric/narrow) used by the range searches."""

    __slots__ = ("dtype", "bits", "symmetric", "narrow", "qmin", "qmax", "zp")

    def __init__(self, dtype, bits, symmetric, narrow):
        self.qmin, self.qmax = qrange(dtype, bits, narrow)
        self.dtype, self.bits, self.symmetric, self.narrow = dtype, bits, bool(symmetric), bool(narrow)
        self.zp = _sym_zero_point(dtype, self.qmin, self.qmax) if self.symmetric else None

    def as_dict(self) -> Dict[str, Any]:
        return {"dtype": str(self.dtype), "bits": None if self.bits is None else int(self.bits),
                "symmetric": self.symmetric, "narrow": self.narrow}


# --------------------------------------------------------------------------------------------------
# streaming histogram
# --------------------------------------------------------------------------------------------------
class _Histogram:
    """Zero-anchored, power-of-two-width histogram over a window of ``bins`` bins (see module doc)."""

    def __init__(self, bins: int):
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.exp: Optional[int] = None  # bin width = 2**exp
        self.off = 0                    # global index of counts[0]

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp is not None else float("nan")

    def _fits(self, e: int, mn: float, mx: float) -> bool:
        return math.floor(math.ldexp(mx, -e)) - math.floor(math.ldexp(mn, -e)) <= self.bins - 1

    def _exponent(self, mn: float, mx: float) -> int:
        """Smallest e with [mn, mx] inside one window of width-2**e bins (and e >= float32 resolution)."""
        amax = max(abs(mn), abs(mx))
        e_res = (math.frexp(amax)[1] - 1 - 24) if amax > 0 else -149
        span = mx - mn
        if span <= 0:
            return e_res
        e = max(e_res, math.ceil(math.log2(span / (self.bins - 1))) - 3)
        while not self._fits(e, mn, mx):
            e += 1
        return e

    def add(self, x: np.ndarray, mn: float, mx: float) -> None:
        """Add the (flat, finite) values ``x``; ``mn``/``mx`` is the global range including ``x``.
        Bin indices are computed exactly in float64 (scaling by a power of two is exact)."""
        e = self._exponent(mn, mx)
        off = math.floor(math.ldexp(mn, -e))
        if self.exp is None:
            self.exp, self.off = e, off
        elif e != self.exp or off != self.off:
            k = e - self.exp
            nz = np.flatnonzero(self.counts)
            g = (nz.astype(np.int64) + self.off) >> min(k, 62)
            local = np.clip(g - off, 0, self.bins - 1)
            self.counts = np.bincount(local, weights=self.counts[nz], minlength=self.bins
                                      ).round().astype(np.int64)
            self.exp, self.off = e, off
        for start in range(0, x.size, _CHUNK):  # bounded float64 temporaries for huge batches
            part = x[start:start + _CHUNK].astype(np.float64)
            idx = np.floor(np.ldexp(part, -e), out=part)
            idx -= off
            np.clip(idx, 0, self.bins - 1, out=idx)
            self.counts += np.bincount(idx.astype(np.int64), minlength=self.bins)

    def signed_bins(self, mn: float, mx: float, zeros: int):
        """Non-empty bins as sorted arrays (left, right, count); exact zeros are a point bin [0, 0]."""
        counts = self.counts.astype(np.float64)
        w = self.width
        g = np.arange(self.bins, dtype=np.int64) + self.off
        zi = -self.off
        if zeros and 0 <= zi < self.bins:
            counts[zi] -= zeros
        left = np.clip(g * w, mn, mx)
        right = np.clip((g + 1) * w, mn, mx)
        keep = counts > 0
        left, right, counts = left[keep], right[keep], counts[keep]
        if zeros:
            # the zero point goes before the bin [0, w) and after the bin [-w, 0)
            pos = int(np.searchsorted(g[keep], 0, side="left"))
            left = np.insert(left, pos, 0.0)
            right = np.insert(right, pos, 0.0)
            counts = np.insert(counts, pos, float(zeros))
        return left, right, counts

    def folded_counts(self, zeros: int, include_zeros: bool):
        """|x| histogram on the same grid: (first folded index, counts) - folded bin f covers
        ``[f*w, (f+1)*w)`` of |x|.  Exact zeros are kept in bin 0 iff ``include_zeros``."""
        nz = np.flatnonzero(self.counts)
        cnt = self.counts[nz].astype(np.float64)
        g = nz.astype(np.int64) + self.off
        f = np.where(g >= 0, g, -g - 1)
        if not include_zeros and zeros:
            cnt = cnt - np.where(g == 0, float(zeros), 0.0)
        if f.size == 0:
            return 0, np.zeros(0)
        f0 = int(f.min())
        return f0, np.bincount(f - f0, weights=cnt)


def _quantile(left: np.ndarray, right: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Value at quantile ``q`` (0..1) of a binned distribution, linear within bins."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    j = int(np.clip(np.searchsorted(cum, target, side="left"), 0, len(cum) - 1))
    prev = cum[j] - counts[j]
    frac = 0.0 if counts[j] <= 0 else min(max((target - prev) / counts[j], 0.0), 1.0)
    return float(left[j] + (right[j] - left[j]) * frac)


# --------------------------------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------------------------------
class Observer:
    """Base observer: validates and streams batches, tracks min/max/count; subclasses choose ranges."""

    method = "base"
    _DEFAULTS: Dict[str, Any] = {}

    def __init__(self, name: str, **opts):
        self.name = str(name)
        unknown = sorted(set(opts) - set(self._DEFAULTS))
        if unknown:
            valid = ", ".join(sorted(self._DEFAULTS)) or "(none)"
            raise OptionError(f"unknown option(s) {', '.join(unknown)} for the '{self.method}' observer "
                              f"of tensor '{self.name}'; valid options: {valid}")
        self.opts: Dict[str, Any] = {**self._DEFAULTS, **opts}
        self._check_options()
        self.count = 0
        self.batches = 0
        self.min = math.inf
        self.max = -math.inf
        self.zeros = 0
        self._last: Optional[Dict[str, Any]] = None

    # -- subclass hooks --------------------------------------------------------------------------
    def _check_options(self) -> None:
        pass

    def _update(self, x: np.ndarray, bmin: float, bmax: float) -> None:
        pass

    def _range(self, spec: _QSpec) -> Tuple[float, float]:
        raise NotImplementedError

    def _opt_error(self, msg: str) -> OptionError:
        return OptionError(f"'{self.method}' observer of tensor '{self.name}': {msg}")

    # -- public API --------------------------------------------------------------------------------
    def update(self, x: np.ndarray) -> None:
        """Stream one batch (any shape).  Raises DataError on NaN/Inf or non-numeric data."""
        a = np.asarray(x)
        if a.dtype.kind not in "biuf":
            raise DataError(f"calibration data for tensor '{self.name}' has dtype {a.dtype}, expected a "
                            f"real numeric (float32) array; check the calibration data / model")
        if a.size == 0:
            return
        a = a.ravel()  # a view for contiguous batches; no float64 copy of the whole batch
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            n_nan = int(np.isnan(a).sum())
            n_inf = int(np.isinf(a).sum())
            raise DataError(f"tensor '{self.name}' has {n_nan} NaN and {n_inf} Inf value(s) in "
                            f"calibration batch {self.batches}; check the calibration data / model "
                            f"(unnormalised inputs, overflow, or a broken preprocessing step)")
        bmin, bmax = float(a.min()), float(a.max())
        self._update(a, bmin, bmax)
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        self.zeros += int(np.count_nonzero(a == 0))
        self.count += int(a.size)
        self.batches += 1

    def _require_data(self) -> None:
        if self.count == 0:
            raise DataError(f"no calibration data reached tensor '{self.name}' (observer '{self.method}' "
                            f"was never updated); check the calibration data / model")

    def _finish(self, lo: float, hi: float, spec: _QSpec) -> Tuple[float, float]:
        """Clamp to the data, include 0, apply the symmetric sign convention."""
        lo = min(max(float(lo), self.min), 0.0)
        hi = max(min(float(hi), self.max), 0.0)
        if self.min >= 0:
            lo = 0.0
        if self.max <= 0:
            hi = 0.0
        if spec.symmetric:
            t = max(-lo, hi)
            lo = -t if self.min < 0 else 0.0
            hi = t if self.max > 0 else 0.0
        return lo, hi

    def compute_range(self, dtype: str, bits: Optional[int] = None, symmetric: bool = False,
                      narrow: bool = False) -> Tuple[float, float]:
        """Clipping range ``(lo, hi)``, ``lo <= 0 <= hi``, for quantizing to ``dtype``/``bits``."""
        spec = _QSpec(dtype, bits, symmetric, narrow)
        self._require_data()
        lo, hi = self._finish(*self._range(spec), spec)
        self._last = {"lo": lo, "hi": hi, **spec.as_dict()}
        return lo, hi

    def compute_qparams(self, dtype: str, bits: Optional[int] = None, symmetric: bool = False,
                        narrow: bool = False) -> Tuple[float, int]:
        lo, hi = self.compute_range(dtype, bits, symmetric, narrow)
        return qparams_from_range(lo, hi, dtype, bits, symmetric, narrow)

    def state(self) -> Dict[str, Any]:
        """JSON-able summary (min/max are None before any data)."""
        seen = self.count > 0
        return {
            "name": self.name,
            "method": self.method,
            "options": {k: (v if isinstance(v, (str, bool, int, float)) or v is None else str(v))
                        for k, v in self.opts.items()},
            "count": int(self.count),
            "batches": int(self.batches),
            "zeros": int(self.zeros),
            "min": float(self.min) if seen else None,
            "max": float(self.max) if seen else None,
            "range": dict(self._last) if self._last else None,
        }

    def nbytes(self) -> int:
        """Bytes of array state held by the observer (constant in the number of batches)."""
        return 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, count={self.count}, "
                f"min={self.min if self.count else None}, max={self.max if self.count else None})")


class MinMaxObserver(Observer):
    """Running min/max; ``averaging='ema'`` uses an exponential moving average of per-batch min/max
    (``momentum`` 0.9: ``v = momentum * v + (1 - momentum) * batch_value``)."""

    method = "minmax"
    _DEFAULTS = {"averaging": "none", "momentum": 0.9}

    def _check_options(self) -> None:
        if self.opts["averaging"] not in ("none", "ema"):
            raise self._opt_error(f"averaging={self.opts['averaging']!r}; expected 'none' or 'ema'")
        m = self.opts["momentum"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise self._opt_error(f"momentum={m!r}; expected a number in [0, 1)")
        self.ema_min: Optional[float] = None
        self.ema_max: Optional[float] = None

    def _update(self, x, bmin, bmax):
        m = float(self.opts["momentum"])
        if self.ema_min is None:
            self.ema_min, self.ema_max = bmin, bmax
        else:
            self.ema_min = m * self.ema_min + (1 - m) * bmin
            self.ema_max = m * self.ema_max + (1 - m) * bmax

    def _range(self, spec):
        if self.opts["averaging"] == "ema":
            return self.ema_min, self.ema_max
        return self.min, self.max

    def state(self):
        s = super().state()
        if self.opts["averaging"] == "ema":
            s["ema_min"], s["ema_max"] = self.ema_min, self.ema_max
        return s


class _HistogramObserver(Observer):
    """Base of the histogram observers (``bins`` counters, see the module docstring)."""

    _DEFAULTS = {"bins": 2048}

    def _check_options(self) -> None:
        b = self.opts["bins"]
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 16 <= b <= 1 << 20:
            raise self._opt_error(f"bins={b!r}; expected an integer in [16, 1048576]")
        self.hist = _Histogram(int(b))

    def _update(self, x, bmin, bmax):
        self.hist.add(x, min(self.min, bmin), max(self.max, bmax))

    @property
    def bin_width(self) -> float:
        return self.hist.width

    def histogram(self) -> Tuple[np.ndarray, np.ndarray]:
        """(edges, counts) copies of the current window (edges has ``bins + 1`` entries)."""
        edges = (np.arange(self.hist.bins + 1) + self.hist.off) * self.hist.width
        return edges, self.hist.counts.copy()

    def nbytes(self) -> int:
        return int(self.hist.counts.nbytes)

    def _abs_bins(self):
        """Sorted (left, right, count) of |x| with exact zeros as a point bin at 0."""
        f0, cnt = self.hist.folded_counts(self.zeros, include_zeros=False)
        w = self.hist.width
        amax = max(-self.min, self.max)
        f = np.arange(cnt.size) + f0
        left = np.minimum(f * w, amax)
        right = np.minimum((f + 1) * w, amax)
        keep = cnt > 0
        left, right, cnt = left[keep], right[keep], cnt[keep]
        if self.zeros:
            left, right = np.r_[0.0, left], np.r_[0.0, right]
            cnt = np.r_[float(self.zeros), cnt]
        return left, right, cnt

    def state(self):
        s = super().state()
        s["bins"] = int(self.hist.bins)
        s["bin_width"] = float(self.hist.width) if self.count else None
        return s


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile of the data: asymmetric ``[q(100-p), q(p)]``, symmetric ``q_|x|(p)``."""

    method = "percentile"
    _DEFAULTS = {"bins": 2048, "percentile": 99.99}

    def _check_options(self) -> None:
        super()._check_options()
        p = self.opts["percentile"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 100.0:
            raise self._opt_error(f"percentile={p!r}; expected a number in (0, 100]")
        if p < 50.0:
            raise self._opt_error(f"percentile={p!r}; expected >= 50 (it is the upper percentile)")

    def _range(self, spec):
        q = float(self.opts["percentile"]) / 100.0
        if spec.symmetric:
            t = _quantile(*self._abs_bins(), q)
            return -t, t
        left, right, cnt = self.hist.signed_bins(self.min, self.max, self.zeros)
        return _quantile(left, right, cnt, 1.0 - q), _quantile(left, right, cnt, q)


class MSEObserver(_HistogramObserver):
    """Range minimising the expected quantization MSE estimated from the histogram.

    For a candidate clipping interval ``[a, b]`` with step ``s``: a bin (centre ``c``, width ``w``,
    count ``n``) inside contributes ``n * s**2 / 12`` (rounding noise), outside
    ``n * ((c - clamp(c))**2 + w**2 / 12)`` (clipping); exact zeros contribute nothing.  Costs of all
    candidates come from prefix sums (O(bins) per search).  Candidates are the bin edges:
    symmetric -> 1-D search over ``t`` (interval ``[s*(qmin-zp), t]``); non-negative (non-positive)
    asymmetric -> 1-D over ``hi`` (``lo``) with the other end at 0; two-sided asymmetric -> coarse 2-D
    grid over ``(lo, hi)`` then coordinate-descent refinement on the full edge grid.
    """

    method = "mse"
    _COARSE = 256

    def _range(self, spec):
        left, right, cnt = self.hist.signed_bins(self.min, self.max, self.zeros)
        c = 0.5 * (left + right)
        keep = (cnt > 0) & ~((left == 0.0) & (right == 0.0))  # exact zeros cost nothing
        c, wd, n = c[keep], (right - left)[keep], cnt[keep]
        if n.size == 0:  # only zeros
            return 0.0, 0.0
        z = np.zeros(1)
        S0 = np.concatenate([z, np.cumsum(n)])
        S1 = np.concatenate([z, np.cumsum(n * c)])
        S2 = np.concatenate([z, np.cumsum(n * (c * c + wd * wd / 12.0))])
        total = S0[-1]

        def below(a):  # clipping cost / count of bins with centre < a
            k = np.searchsorted(c, a, side="left")
            err = S2[k] - 2.0 * a * S1[k] + a * a * S0[k]
            return np.maximum(err, 0.0), S0[k]

        def above(b):  # clipping cost / count of bins with centre > b
            k = np.searchsorted(c, b, side="right")
            s0, s1, s2 = S0[-1] - S0[k], S1[-1] - S1[k], S2[-1] - S2[k]
            return np.maximum(s2 - 2.0 * b * s1 + b * b * s0, 0.0), s0

        edges = np.unique(np.concatenate([left, right, [self.min, self.max]]))
        mn, mx = self.min, self.max

        if spec.symmetric:
            zp = spec.zp
            steps = spec.qmax - zp
            ratio = (zp - spec.qmin) / steps  # lower end = -ratio * t
            t_full = max(mx, -mn / ratio, 0.0)
            t = np.unique(np.concatenate([edges[edges > 0], -edges[edges < 0] / ratio, [t_full]]))
            t = t[(t > 0) & (t <= t_full)]
            if t.size == 0:
                return 0.0, 0.0
            eb, nb = below(-ratio * t)
            ea, na = above(t)
            cost = eb + ea + (t / steps) ** 2 / 12.0 * (total - nb - na)
            best = float(t[_argmin_last(cost)])
            return -best, best

        levels = spec.qmax - spec.qmin
        his = np.unique(np.concatenate([edges[(edges > 0) & (edges < mx)], [mx]])) if mx > 0 else z
        los = np.unique(np.concatenate([edges[(edges < 0) & (edges > mn)], [mn]])) if mn < 0 else z
        eb, nb = below(los)
        ea, na = above(his)
        if los.size == 1 or his.size == 1:  # one end fixed (at 0 or at the only candidate)
            if los.size == 1:
                cost = eb[0] + ea + ((his - los[0]) / levels) ** 2 / 12.0 * (total - nb[0] - na)
                j = _argmin_last(cost)
                return float(los[0]), float(his[j])
            cost = eb + ea[0] + ((his[0] - los) / levels) ** 2 / 12.0 * (total - nb - na[0])
            i = int(np.argmin(cost))
            return float(los[i]), float(his[0])

        def cost2(i, j):
            return (eb[i] + ea[j] + ((his[j] - los[i]) / levels) ** 2 / 12.0 * (total - nb[i] - na[j]))

        ci = np.unique(np.linspace(0, los.size - 1, min(los.size, self._COARSE)).round().astype(int))
        cj = np.unique(np.linspace(0, his.size - 1, min(his.size, self._COARSE)).round().astype(int))
        grid = cost2(ci[:, None], cj[None, :])
        a, b = np.unravel_index(int(np.argmin(grid)), grid.shape)
        i, j = int(ci[a]), int(cj[b])
        allj, alli = np.arange(his.size), np.arange(los.size)
        for _ in range(50):
            j_new = _argmin_last(cost2(i, allj))
            i_new = int(np.argmin(cost2(alli, j_new)))
            if (i_new, j_new) == (i, j):
                break
            i, j = i_new, j_new
        return float(los[i]), float(his[j])


def _argmin_last(cost: np.ndarray) -> int:
    """Index of the minimum, preferring the last one (the widest range) on ties."""
    return int(cost.size - 1 - np.argmin(cost[::-1]))


def _xlogx(v):
    v = np.asarray(v, dtype=np.float64)
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def _kl_divergences(hist: np.ndarray, nlevels: int, eps: float = 1e-4, stride: int = 1):
    """TensorRT-style KL divergence for every threshold ``i`` in ``[nlevels, len(hist)]`` bins.

    For threshold ``i``: P = hist[:i] with the outliers (hist[i:]) added to its last bin; Q = hist[:i]
    split into ``nlevels`` near-equal chunks (chunk ``j`` is bins ``[ceil(j*i/n), ceil((j+1)*i/n))``),
    each chunk's sum spread evenly over the bins where P is non-zero.  Both are smoothed (zeros get
    ``eps``, taken proportionally from the non-zeros, as in MXNet/TVM) and normalised; returns
    ``(thresholds, KL(P || Q))`` with ``inf`` where Q cannot be formed.  Thresholds are
    ``nlevels, nlevels + stride, ...`` plus ``len(hist)``.  Vectorised over the thresholds with prefix
    sums; ``sum p' log p'`` uses a 2nd-order expansion in ``eps`` (error
    ~eps^3, negligible for integer counts).
    """
    H = np.asarray(hist, dtype=np.float64)
    nb, m = H.size, int(nlevels)
    I = np.arange(m, nb + 1, max(int(stride), 1), dtype=np.int64)
    if I.size and I[-1] != nb:
        I = np.append(I, nb)
    if I.size == 0:
        return I, np.zeros(0)
    nzmask = H > 0
    safe = np.where(nzmask, H, 1.0)
    z0 = np.zeros(1)
    C = np.concatenate([z0, np.cumsum(H)])
    Z = np.concatenate([z0, np.cumsum(nzmask)])
    F1 = np.concatenate([z0, np.cumsum(np.where(nzmask, H * np.log(safe), 0.0))])
    G1 = np.concatenate([z0, np.cumsum(np.where(nzmask, np.log(safe) + 1.0, 0.0))])
    G2 = np.concatenate([z0, np.cumsum(np.where(nzmask, 1.0 / safe, 0.0))])
    N = C[-1]
    If = I.astype(np.float64)

    tail = N - C[I]
    hl = H[I - 1]
    last = hl + tail
    lastnz = last > 0
    nzp = Z[I - 1] + lastnz
    zp = If - nzp
    with np.errstate(divide="ignore", invalid="ignore"):
        e_p = np.where(nzp > 0, eps * zp / np.maximum(nzp, 1), 0.0)  # taken from each non-zero bin
        elog = eps * math.log(eps) if eps > 0 else 0.0  # a zero bin becomes eps
        A = (F1[I - 1] - e_p * G1[I - 1] + 0.5 * e_p * e_p * G2[I - 1]
             + (If - 1 - Z[I - 1]) * elog
             + np.where(lastnz, _xlogx(last - e_p), elog))

        idt = np.int32 if nb * (m + 1) < 2**31 else np.int64
        j = np.arange(m + 1, dtype=idt)
        b = j[None, :] * I.astype(idt)[:, None]
        b += m - 1
        b //= m  # (T, m+1) chunk boundaries
        S = np.diff(C[b], axis=1)
        Zc = np.diff(Z[b], axis=1)
        del b
        Zc[:, -1] += (lastnz & ~(hl > 0))
        qnz = S > 0
        nzq = np.einsum("ij,ij->i", Zc, qnz.astype(np.float64))
        zq = If - nzq
        e_q = eps * zq / np.maximum(nzq, 1)
        # q value per chunk (S / Zc - e_q where the chunk has mass, else eps); chunks with Zc == 0
        # carry no p mass and get q = 1 (log 0 contribution)
        qv = np.divide(S, Zc, out=np.ones_like(S), where=Zc > 0)
        qv -= e_q[:, None]
        empty = ~qnz & (Zc > 0)
        qv[empty] = eps
        qv[Zc <= 0] = 1.0
        qbad = (qv <= 0).any(axis=1)
        np.maximum(qv, 1e-300, out=qv)
        np.log(qv, out=qv)
        S[:, -1] += tail  # S becomes P (p mass per chunk)
        S -= Zc * e_p[:, None]
        Bterm = np.einsum("ij,ij->i", S, qv)
        Bterm += zp * elog  # p-zero bins: p' = q' = eps
        kl = A / N - np.log(N) - Bterm / N + np.log(np.where(C[I] > 0, C[I], 1.0))
        bad = (nzq <= 0) | qbad | (e_p >= 1) | (e_q >= 1)
    kl = np.where(bad, np.inf, np.maximum(kl, 0.0))
    return I, kl


class EntropyObserver(_HistogramObserver):
    """TensorRT-style entropy (KL-divergence) calibration on the |x| histogram.

    The |x| histogram is merged by a power of two into
    ``kl_bins``..``2*kl_bins`` bins over ``[0, max|x|]`` (fewer if the histogram is coarser); every
    threshold from ``nlevels`` bins up (every bin, every 2nd bin above 1.5*kl_bins bins, so about
    ``kl_bins`` thresholds as in TensorRT) is scored with :func:`_kl_divergences`; the threshold with the
    smallest divergence (the largest on ties) is used: symmetric ``(-t, t)``, asymmetric the data range
    intersected with ``[-t, t]``.  ``nlevels`` is the number of quantization levels covering ``[0, t]``:
    ``qmax + 1`` (symmetric signed, 128 for int8), ``qmax - zp + 1`` (symmetric unsigned), the whole
    range for one-sided asymmetric data (256 for uint8 after Relu), half of it for two-sided data.
    Exact zeros are left out of the |x| histogram (unlike pytorch-quantization): they are exactly
    representable whatever the threshold, and the spike they make in bin 0 (half of a Relu output)
    otherwise dominates the divergence and drags the threshold far down (~2 sigma for Relu(N(0,1))).
    The internal histogram defaults to 8192 bins so the |x| histogram has >= ~2048 bins.
    """

    method = "entropy"
    _DEFAULTS = {"bins": 8192, "kl_bins": 2048, "eps": 1e-4}

    def _check_options(self) -> None:
        super()._check_options()
        k = self.opts["kl_bins"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 16 <= k <= 1 << 16:
            raise self._opt_error(f"kl_bins={k!r}; expected an integer in [16, 65536]")
        e = self.opts["eps"]
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e < 0.1:
            raise self._opt_error(f"eps={e!r}; expected a number in [0, 0.1)")

    def _nlevels(self, spec: _QSpec) -> int:
        if spec.symmetric:
            return spec.qmax - spec.zp + 1
        full = spec.qmax - spec.qmin + 1
        return full if (self.min >= 0 or self.max <= 0) else full // 2

    def _abs_histogram(self):
        """(|x| counts from 0, bin width) merged so that it has < 2*kl_bins bins."""
        f0, cnt = self.hist.folded_counts(self.zeros, include_zeros=False)
        nfold = f0 + cnt.size
        kl_bins = int(self.opts["kl_bins"])
        r = 0
        while (nfold >> (r + 1)) >= kl_bins:  # merge by 2**r while >= kl_bins bins remain
            r += 1
        idx = (np.arange(cnt.size) + f0) >> r
        merged = np.bincount(idx, weights=cnt, minlength=((nfold - 1) >> r) + 1)
        return merged, self.hist.width * (1 << r)

    def _range(self, spec):
        amax = max(-self.min, self.max)
        if amax == 0:
            return 0.0, 0.0
        H, w = self._abs_histogram()
        m = self._nlevels(spec)
        t = amax
        if H.size > m:
            stride = max(1, int(round(H.size / int(self.opts["kl_bins"]))))
            I, kl = _kl_divergences(H, m, float(self.opts["eps"]), stride)
            if np.isfinite(kl).any():
                i = int(I[_argmin_last(kl)])
                t = min(i * w, amax)
        return -t, t


OBSERVERS: Dict[str, type] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(method: str, name: str, **opts) -> Observer:
    """Build the observer for calibration ``method`` ('minmax', 'percentile', 'mse', 'entropy')."""
    key = str(method).strip().lower()
    cls = OBSERVERS.get(key)
    if cls is None:
        raise OptionError(f"unknown calibration method {method!r} for tensor '{name}'; valid methods: "
                          f"{', '.join(sorted(OBSERVERS))}")
    return cls(name, **opts)
