"""Non-uniform 3-4 bit weights on the INT8 grid (weight_scheme="nonuniform").

After GVSL & Kumar, "Hybrid and Non-Uniform Quantization Methods using Retro Synthesis Data for Efficient
Inference" (arXiv 2012.13716): the weights of each output channel are grouped into clusters, and each
cluster gets a number of quantization steps that depends on its population and its range. Per channel:

1. **Clusters** (1-D, deterministic): k-means on the sorted weights with k centres started at evenly spaced
   quantiles (e.g. the dense centre and the two tails); no randomness. Every k in ``CLUSTERS`` is tried and the
   one with the lowest error after snapping is kept per channel.
2. **Allocation** of the ``2**bits`` levels: the high-resolution optimum (Panter-Dite: point density
   proportional to p(x)^(1/3)) gives cluster k a share proportional to ``n_k^(1/3) * r_k^(2/3)`` (population
   n_k, range r_k); every non-empty cluster gets at least one level; integers by largest remainder.
   Inside a cluster the levels are uniform (cell midpoints of its range).
3. **Lloyd refinement** (``LLOYD_ITERS`` iterations of 1-D k-means on the levels, then on the integer grid):
   kept only where it lowers the channel's weight MSE (measured after snapping).
4. **Snap** the levels onto the channel's own INT8 grid (scale s_c = max|w_c| / qmax from ``weight_qparams``,
   qmax 127, or 63 with reduce_range), deduplicate, and assign every weight to the nearest snapped level.

The error is weighted by ``importance`` when given: E[x_j^2] of the input each weight multiplies (``input_importance``,
one pass on the FP32 model, done by Pipeline.build), so the levels minimize the layer's output error for uncorrelated
inputs; assignment stays nearest. ``mean_shift`` is the optional, labelled bias correction (bias_correction=True).

So the layer still runs on the target's INT8 kernel (per-channel int8 weights, unchanged scales); only the
set of int8 values a channel uses is restricted to at most ``2**bits``, which is what lets realize store the
weight as 4-bit (or 3-bit) indices plus a per-channel int8 codebook (quant/codebook.py).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import numpy as np

LEVEL_BITS = (3, 4)          # weight_bits accepted with weight_scheme="nonuniform"
DEFAULT_BITS = 4             # a per-layer nonuniform layer whose weight_bits (layer or global) is not 3 / 4
# clusters per channel (e.g. 3: the centre + two tails); a tuple: every count is tried per channel and the one
# with the lowest (importance-weighted) error after snapping is kept ("per-channel cluster count")
CLUSTERS = (1, 2, 3, 4, 5)
KMEANS_ITERS = 16            # iterations of the 1-D cluster k-means
LLOYD_ITERS = 8              # Lloyd refinement iterations of the levels (0: off); kept only if the MSE drops
# refinement of the levels under the layer's full input covariance H = E[x x^T] (``covariance``; 0: off): each
# iteration fixes the nearest assignment, solves the levels minimizing the output error (u - q)^T H (u - q) on the
# integer grid, reassigns by nearest; the best levels met by that error are kept (never worse than the start)
COV_ITERS = 6
# refine from the levels of every cluster count (CLUSTERS), keep the lowest full error (False: only from the best
# levels under the diagonal error)
COV_ALL_STARTS = True


def layer_levels_bits(options, node: str) -> Optional[int]:
    """Non-uniform level bits of layer ``node`` under ``options`` (QuantOptions), or None when it is uniform.

    The layer's weight_scheme (per-layer setting, else the global one) decides; the bits are the layer's
    weight_bits when it sets 3 or 4, else the global weight_bits when 3 or 4, else ``DEFAULT_BITS``. A layer
    that inherits a global nonuniform scheme but sets weight_bits outside 3-4 (e.g. edge_weight_bits=8) is
    uniform at those bits."""
    scheme = options.layer(node, "weight_scheme", options.weight_scheme)
    if scheme != "nonuniform":
        return None
    lb = options.layers.get(node, {}).get("weight_bits")
    if lb is not None:
        return int(lb) if lb in LEVEL_BITS else None
    return int(options.weight_bits) if options.weight_bits in LEVEL_BITS else DEFAULT_BITS


# -- per channel ------------------------------------------------------------------------------------------
def clusters_1d(x: np.ndarray, k: int, iters: int = KMEANS_ITERS, h: Optional[np.ndarray] = None) -> np.ndarray:
    """Cluster boundaries of sorted values ``x`` by 1-D k-means (start: quantiles (2i+1)/2k; ``h``: importance
    weights of the values, weighted centroids): an int array ``b`` of length m+1 with cluster i = x[b[i]:b[i+1]],
    all non-empty, in increasing order."""
    h = np.ones_like(x) if h is None else h
    n = x.size
    k = max(1, min(k, int(np.unique(x).size)))
    cent = np.quantile(x, (2 * np.arange(k) + 1) / (2 * k))
    b = None
    for _ in range(iters):
        thr = (cent[:-1] + cent[1:]) / 2
        cuts = np.searchsorted(x, thr, side="right")
        nb = np.unique(np.concatenate([[0], cuts, [n]]))
        if b is not None and nb.size == b.size and np.array_equal(nb, b):
            break
        b = nb
        sw = np.add.reduceat(h, b[:-1])
        cent = np.where(sw > 0, np.add.reduceat(x * h, b[:-1]) / np.where(sw > 0, sw, 1.0),
                        np.add.reduceat(x, b[:-1]) / np.diff(b))
    return b


def allocate_steps(n: np.ndarray, r: np.ndarray, total: int) -> np.ndarray:
    """Levels per cluster: share proportional to n^(1/3) r^(2/3) (Panter-Dite), at least one per non-empty
    cluster, integers by largest remainder (ties: the lower cluster index), summing to ``total``."""
    n = np.asarray(n, np.float64)
    r = np.asarray(r, np.float64)
    m = n.size
    if m == 0:
        return np.zeros(0, np.int64)
    if total < m:  # more clusters than levels: the most populous ones get a level each
        out = np.zeros(m, np.int64)
        out[np.argsort(-n, kind="stable")[:total]] = 1
        return out
    a = np.cbrt(n) * np.power(r, 2.0 / 3.0)
    if a.sum() <= 0:
        a = np.cbrt(n)
    ideal = total * a / a.sum()
    steps = np.maximum(np.floor(ideal).astype(np.int64), 1)
    while steps.sum() > total:  # the minimum of one level overshot: take from the largest
        over = np.where(steps > 1, steps - ideal, -np.inf)
        steps[int(np.argmax(over))] -= 1
    rem = ideal - steps
    for i in np.argsort(-rem, kind="stable")[: total - int(steps.sum())]:
        steps[i] += 1
    return steps


def _uniform_levels(x: np.ndarray, b: np.ndarray, steps: np.ndarray) -> np.ndarray:
    lv = []
    for i, m in enumerate(steps):
        if m <= 0:
            continue
        lo, hi = x[b[i]], x[b[i + 1] - 1]
        lv.append(lo + (np.arange(m) + 0.5) * (hi - lo) / m)
    return np.sort(np.concatenate(lv))


def _assign(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (sorted ``levels``) for each value; a tie goes to the lower level."""
    thr = (levels[:-1] + levels[1:]) / 2
    return np.searchsorted(thr, x, side="left")


def _centroids(x: np.ndarray, h: np.ndarray, idx: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """Importance-weighted mean of each level's cell (the level itself for an empty cell)."""
    cnt = np.bincount(idx, weights=h, minlength=lv.size)
    sums = np.bincount(idx, weights=h * x, minlength=lv.size)
    return np.where(cnt > 0, sums / np.where(cnt > 0, cnt, 1.0), lv)


def _lloyd(x: np.ndarray, h: np.ndarray, levels: np.ndarray, iters: int) -> np.ndarray:
    lv = levels.astype(np.float64)
    for _ in range(iters):
        new = _centroids(x, h, _assign(x, lv), lv)
        if np.max(np.abs(new - lv)) < 1e-9:
            break
        lv = np.sort(new)
    return lv


def _snap(levels: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.unique(np.clip(np.rint(levels), qmin, qmax)).astype(np.int64)


def _grid_lloyd(x: np.ndarray, h: np.ndarray, lv: np.ndarray, qmin: int, qmax: int, iters: int) -> np.ndarray:
    """Lloyd iterations with the levels kept on the integer grid (cell means rounded)."""
    for _ in range(iters):
        new = _snap(_centroids(x, h, _assign(x, lv.astype(np.float64)), lv.astype(np.float64)), qmin, qmax)
        if np.array_equal(new, lv):
            break
        lv = new
    return lv


def _mse(x: np.ndarray, h: np.ndarray, lv: np.ndarray) -> float:
    return float(np.sum(h * (x - lv[_assign(x, lv.astype(np.float64))]) ** 2))


def channel_levels(u: np.ndarray, bits: int, qmin: int, qmax: int, *, clusters=None,
                   lloyd_iters: Optional[int] = None, importance: Optional[np.ndarray] = None,
                   candidates: Optional[list] = None) -> Tuple[np.ndarray, bool, int]:
    """The snapped integer levels (sorted, unique, within [qmin, qmax], at most 2**bits) for one channel's
    values ``u`` in grid units (w / s + zero point); whether the Lloyd refinement was kept; the cluster count
    used (``clusters``: an int, or a tuple of counts tried, the lowest error kept).
    ``clusters`` / ``lloyd_iters``: None = the module constants CLUSTERS / LLOYD_ITERS. ``importance``: a weight
    per value (e.g. E[x^2] of the input it multiplies): the levels then minimize the importance-weighted squared
    error (populations become importance mass); every value is still assigned to its nearest level.
    ``candidates`` (a list) receives the levels found for each cluster count tried (starts for refine_levels)."""
    clusters = _counts(CLUSTERS if clusters is None else clusters)
    lloyd_iters = LLOYD_ITERS if lloyd_iters is None else int(lloyd_iters)
    u = np.asarray(u, np.float64).reshape(-1)
    order = np.argsort(u, kind="stable")
    x = u[order]
    h = np.ones_like(x) if importance is None else np.broadcast_to(
        np.asarray(importance, np.float64).reshape(-1), u.shape)[order]
    total = 1 << int(bits)
    if x.size == 0:
        return np.zeros(1, np.int64), False, 0
    grid = _snap(x, qmin, qmax)
    if grid.size <= total:  # the channel already uses few enough grid values: nearest rounding is optimal
        return grid, False, 0
    hn = h * (h.size / h.sum()) if h.sum() > 0 else np.ones_like(h)  # importance mass in units of one value
    best, best_mse, refined, best_k = None, np.inf, False, 0
    for k in clusters:
        b = clusters_1d(x, k, h=h)
        n = np.add.reduceat(hn, b[:-1])
        r = x[b[1:] - 1] - x[b[:-1]]
        steps = allocate_steps(n, r, total)
        init = _uniform_levels(x, b, steps)
        base = _snap(init, qmin, qmax)
        m = _mse(x, h, base)
        k_best, k_mse, k_ref = base, m, False
        if lloyd_iters > 0:  # kept only if it lowers the error
            cand = _grid_lloyd(x, h, _snap(_lloyd(x, h, init, lloyd_iters), qmin, qmax), qmin, qmax, lloyd_iters)
            m = _mse(x, h, cand)
            if m < k_mse:
                k_best, k_mse, k_ref = cand, m, True
        if candidates is not None:
            candidates.append(k_best)
        if k_mse < best_mse:
            best, best_mse, refined, best_k = k_best, k_mse, k_ref, b.size - 1
    return best, refined, best_k


def refine_levels(x: np.ndarray, lv: np.ndarray, H: np.ndarray, qmin: int, qmax: int, iters: Optional[int] = None
                  ) -> np.ndarray:
    """Integer levels (sorted, unique, within [qmin, qmax], at most ``lv.size``) of one channel whose values ``x``
    (grid units, in the K order of ``H``) are assigned to the nearest level, chosen by the layer's output error
    e(L) = (x - L[a])^T H (x - L[a]) with a = nearest(x, L) and ``H`` = E[x x^T] of the layer's input (correlations
    and the mean shift E[d^T x]^2 included, which the diagonal importance leaves out). One channel of
    :func:`refine_levels_batch`; returns the best levels met (never a higher e than ``lv``'s)."""
    best, _ = refine_levels_batch(np.asarray(x, np.float64)[None], np.sort(np.asarray(lv, np.float64))[None], H,
                                  qmin, qmax, iters)
    return np.unique(best[0]).astype(np.int64)


_BATCH_ELEMENTS = 1 << 22   # channels x K x levels of the one-hot assignment held at once


def _assign_rows(U: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Nearest level index per value, row by row (``L`` [C, m] sorted; ties to the lower level, as _assign)."""
    thr = (L[:, :-1] + L[:, 1:]) / 2
    return (U[:, :, None] > thr[:, None, :]).sum(axis=2)


def _row_errors(U: np.ndarray, L: np.ndarray, a: np.ndarray, H: np.ndarray) -> np.ndarray:
    d = U - np.take_along_axis(L, a, axis=1)
    return ((d @ H) * d).sum(axis=1)


def refine_levels_batch(U: np.ndarray, LV: np.ndarray, H: np.ndarray, qmin: int, qmax: int,
                        iters: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Output-error refinement of the levels of many channels of one layer at once: ``U`` [C, K] values in grid
    units, ``LV`` [C, m] sorted starting levels (a row may repeat a level), ``H`` [K, K] = E[x x^T].
    Alternates, for every channel: for the current nearest assignment A (one-hot [K, m]) the least-squares
    levels L = (A^T H A)^-1 A^T H u, placed on the integer grid by coordinate descent from the rounded solution
    (an empty level keeps its place); then the nearest assignment to the new levels. Returns the best levels met
    per channel [C, m] (sorted, may repeat) and their errors (u - L[a])^T H (u - L[a]) [C] — never above the
    start's. The products with H are one matrix multiply per chunk of channels (BLAS), not a loop."""
    iters = COV_ITERS if iters is None else int(iters)
    U = np.asarray(U, np.float64)
    H = np.asarray(H, np.float64)
    c, k = U.shape
    m = LV.shape[1]
    step = max(1, _BATCH_ELEMENTS // max(k * m, 1))
    best_all, err_all = np.empty((c, m)), np.empty(c)
    eye = np.eye(m)[None]
    for lo in range(0, c, step):
        u = U[lo:lo + step]
        cur = np.sort(np.asarray(LV[lo:lo + step], np.float64), axis=1)
        a = _assign_rows(u, cur)
        best, best_e = cur.copy(), _row_errors(u, cur, a, H)
        act = np.arange(len(u))           # channels whose levels still move
        for _ in range(iters):
            ua, ca, aa = u[act], cur[act], a[act]
            A = (aa[:, :, None] == np.arange(m)).astype(np.float64)                    # [c, K, m]
            HA = (H @ A.transpose(1, 0, 2).reshape(k, -1)).reshape(k, len(act), m).transpose(1, 0, 2)
            G = np.matmul(A.transpose(0, 2, 1), HA)                                     # A^T H A  [c, m, m]
            b = np.matmul(HA.transpose(0, 2, 1), ua[:, :, None])[:, :, 0]               # A^T H u  [c, m]
            live = A.sum(axis=1) > 0
            dead = ~live
            Gs = G + eye * (1e-9 * np.trace(G, axis1=1, axis2=2)[:, None, None] + 1e-300) + eye * dead[:, :, None]
            try:
                sol = np.linalg.solve(Gs, np.where(live, b, ca)[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                break
            L = np.where(live, np.clip(np.rint(sol), qmin, qmax), ca)
            for _sweep in range(3):   # integer coordinate descent on each channel's quadratic
                moved = np.zeros(len(act), bool)
                for j in range(m):
                    gjj = G[:, j, j]
                    ok = live[:, j] & (gjj > 0)
                    v = np.clip(np.rint((b[:, j] - (G[:, j, :] * L).sum(axis=1) + gjj * L[:, j])
                                        / np.where(ok, gjj, 1.0)), qmin, qmax)
                    ch = ok & (v != L[:, j])
                    L[:, j] = np.where(ch, v, L[:, j])
                    moved |= ch
                if not moved.any():
                    break
            new = np.sort(L, axis=1)
            a_new = _assign_rows(ua, new)
            e = _row_errors(ua, new, a_new, H)
            better = e < best_e[act]
            best[act[better]], best_e[act[better]] = new[better], e[better]
            going = ~np.all(new == ca, axis=1)
            cur[act], a[act] = new, a_new
            act = act[going]
            if not act.size:
                break
        best_all[lo:lo + step], err_all[lo:lo + step] = best, best_e
    return best_all, err_all


def cov_error(u: np.ndarray, lv: np.ndarray, H: np.ndarray) -> float:
    """The output error (u - L[a])^T H (u - L[a]) of the nearest assignment of ``u`` to the levels ``lv``."""
    u = np.asarray(u, np.float64)
    lv = np.unique(np.asarray(lv, np.float64))
    d = u - lv[_assign(u, lv)]
    return float(d @ H @ d)


def _pad_levels(lv: np.ndarray, m: int) -> np.ndarray:
    """Sorted levels as a row of ``m`` (the last level repeated: an empty duplicate changes no assignment)."""
    lv = np.sort(np.asarray(lv, np.float64))
    return np.concatenate([lv, np.full(m - lv.size, lv[-1])]) if lv.size < m else lv[:m]


def _counts(clusters) -> Tuple[int, ...]:
    return tuple(int(k) for k in clusters) if isinstance(clusters, (tuple, list)) else (int(clusters),)


# results of quantize_nonuniform by their inputs: the saturation remedy's trial builds and the sanity check's rebuilds
# realize the same weights several times (Lite0: ~1 min per realization on 2 cores)
_CACHE: "OrderedDict[str, Tuple[np.ndarray, Dict[str, Any]]]" = OrderedDict()
CACHE_BYTES = 256 << 20


def _cache_key(*arrays, **params) -> str:
    h = hashlib.sha1(repr(sorted(params.items())).encode())
    for a in arrays:
        a = np.ascontiguousarray(a) if a is not None else np.zeros(0)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def quantize_nonuniform(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
                        axis: Optional[int], bits: int, *, clusters: Optional[int] = None,
                        lloyd_iters: Optional[int] = None, importance: Optional[np.ndarray] = None,
                        covariance: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Integer weight (int64, the shape of ``w``) whose every output channel (``axis``; None: the tensor is
    one channel) uses at most 2**bits values of its own grid [qmin, qmax]; and a summary of the levels.
    ``importance``: [C or 1, K] weights of the channel-major [C, K] layout (``input_importance``), or None.
    ``covariance``: [K, K] input covariance E[x x^T] of the layer (ungrouped layers, K order), or None: the levels
    found with ``importance`` are then refined by the full output error (:func:`refine_levels`)."""
    clusters = _counts(CLUSTERS if clusters is None else clusters)
    lloyd_iters = LLOYD_ITERS if lloyd_iters is None else int(lloyd_iters)
    w = np.asarray(w, np.float32)
    k = w.size // max(w.shape[int(axis) % w.ndim] if axis is not None and w.ndim else 1, 1)
    if covariance is not None and (COV_ITERS <= 0 or np.shape(covariance) != (k, k)):
        covariance = None  # off, or not in this weight's K layout (grouped convolutions): the diagonal only
    key = _cache_key(w, np.asarray(scale, np.float32), np.asarray(zero_point, np.int64), importance, covariance,
                     qmin=int(qmin), qmax=int(qmax), axis=axis, bits=int(bits), clusters=clusters,
                     lloyd_iters=lloyd_iters, iters=KMEANS_ITERS, cov_iters=COV_ITERS)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        q, summary = _CACHE[key]
        return q.astype(np.int64), dict(summary)
    q, summary = _quantize_nonuniform(w, scale, zero_point, qmin, qmax, axis, bits, clusters, lloyd_iters, importance,
                                      covariance)
    _CACHE[key] = (q.astype(np.int16), dict(summary))
    while sum(v[0].nbytes for v in _CACHE.values()) > CACHE_BYTES and len(_CACHE) > 1:
        _CACHE.popitem(last=False)
    return q, summary


def _quantize_nonuniform(w, scale, zero_point, qmin, qmax, axis, bits, clusters, lloyd_iters, importance,
                         covariance=None):
    ax = 0 if axis is None else int(axis) % max(w.ndim, 1)
    wm = np.moveaxis(w, ax, 0).reshape(w.shape[ax] if w.ndim else 1, -1) if axis is not None \
        else w.reshape(1, -1)
    c = wm.shape[0]
    s = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (c,)) if np.size(scale) in (1, c) else None
    z = np.broadcast_to(np.asarray(zero_point, np.int64).reshape(-1), (c,))
    if importance is not None:
        importance = np.asarray(importance, np.float64).reshape(-1, wm.shape[1])
    if s is None:
        raise ValueError(f"scale of size {np.size(scale)} does not match {c} channels")
    q = np.empty(wm.shape, np.int64)
    used = np.zeros(c, np.int64)
    refined = cov_moved = 0
    H = None if covariance is None else np.asarray(covariance, np.float64)
    ks: Dict[int, int] = {}
    U = np.empty(wm.shape, np.float64)
    levels, starts = [], []
    for i in range(c):
        u = wm[i].astype(np.float32) / s[i]  # the same float32 division as nearest rounding
        U[i] = u.astype(np.float64) + float(z[i])
        imp = None if importance is None else importance[i if importance.shape[0] > 1 else 0]
        cand: list = []
        lv, ref, k_used = channel_levels(U[i], bits, qmin, qmax, clusters=clusters, lloyd_iters=lloyd_iters,
                                         importance=imp, candidates=cand)
        ks[k_used] = ks.get(k_used, 0) + 1
        refined += int(ref)
        levels.append(lv)
        # k_used 0: the channel already has few enough grid values (exact): nothing to refine
        starts.append(([lv] + (cand if COV_ALL_STARTS else [])) if k_used else [])
    todo = [i for i in range(c) if starts[i]]
    if H is not None and todo:
        # every channel from each of its starts (the best levels under the diagonal error, then every cluster
        # count's), all channels of the layer at once; a channel keeps the lowest full error met
        m = 1 << int(bits)
        best_e = np.full(len(todo), np.inf)
        best_l = np.zeros((len(todo), m))
        for j in range(max(len(starts[i]) for i in todo)):
            LV = np.stack([_pad_levels(starts[i][min(j, len(starts[i]) - 1)], m) for i in todo])
            Lr, Er = refine_levels_batch(U[todo], LV, H, qmin, qmax)
            better = Er < best_e
            best_l[better], best_e[better] = Lr[better], Er[better]
        for t, i in enumerate(todo):
            new = np.unique(best_l[t]).astype(np.int64)
            cov_moved += int(not np.array_equal(new, levels[i]))
            levels[i] = new
    for i in range(c):
        lv = levels[i]
        q[i] = lv[_assign(U[i], lv.astype(np.float64))]
        used[i] = np.unique(q[i]).size
    out = q.reshape((c,) + tuple(np.delete(np.array(w.shape), ax))) if axis is not None else q.reshape(w.shape)
    if axis is not None:
        out = np.moveaxis(out, 0, ax)
    summary = {"levels_per_channel_min": int(used.min()), "levels_per_channel_mean": round(float(used.mean()), 2),
               "levels_per_channel_max": int(used.max()), "channels": int(c), "lloyd_kept_channels": int(refined),
               "clusters_used": {str(k): v for k, v in sorted(ks.items())}, "lloyd_iters": int(lloyd_iters),
               "importance": "input E[x^2]" if importance is not None else "none"}
    if H is not None:
        summary.update({"covariance": "input E[x x^T]", "covariance_moved_channels": int(cov_moved)})
    return np.ascontiguousarray(out), summary


def uniform_nearest(w: np.ndarray, bits: int, axis: Optional[int] = 0) -> np.ndarray:
    """Reference: symmetric per-channel uniform ``bits``-bit nearest rounding, dequantized (for comparisons)."""
    w = np.asarray(w, np.float32)
    qmax = (1 << (bits - 1)) - 1
    axes = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    amax = np.abs(w).max(axis=axes, keepdims=True)
    s = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.rint(w / s), -qmax, qmax) * s


# -- importance of each weight: the energy of the input it multiplies ---------------------------------------
IMPORTANCE_SAMPLES = 64      # calibration samples of the E[x^2] pass (Pipeline.build)
IMPORTANCE_FLOOR = 1e-3      # importance below this fraction of the layer's mean is raised to it


def input_importance(model, layers, batches, *, threads: int = 1,
                     means: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Per layer (``layers``: {node: (op_type, weight shape, group)}) the importance of each weight of the
    channel-major [C, K] layout: E[x_j^2] of the input element it multiplies (over the batches, positions and
    tokens), as [1, K] (or [C, K] for grouped convolutions). One ORT pass over ``batches`` on the FP32 model.
    The levels chosen with it minimize sum_j E[x_j^2] (w_j - q_j)^2: the layer's output error when the inputs
    are uncorrelated, instead of the plain weight error. ``means`` (a dict) receives E[x_j] in the same layout
    (for the mean-shift bias correction, ``mean_shift``)."""
    from .calibrate import tensor_pass

    inputs = {n.name: n.input[0] for n in model.graph.node if n.name in layers}
    names = sorted(set(inputs.values()))
    if not names:
        return {}
    acc: Dict[str, np.ndarray] = {}
    acc1: Dict[str, np.ndarray] = {}
    cnt: Dict[str, int] = {}
    for _, outs in tensor_pass(model, names, batches, threads=threads):
        for n in names:
            x = np.asarray(outs[n], np.float64)
            if x.ndim == 4 and any(layers[nd][0] == "Conv" for nd, i in inputs.items() if i == n):
                e, e1 = np.einsum("nchw,nchw->c", x, x), x.sum(axis=(0, 2, 3))
                k = x.shape[0] * x.shape[2] * x.shape[3]
            else:
                x2 = x.reshape(-1, x.shape[-1])
                e, e1, k = np.einsum("rk,rk->k", x2, x2), x2.sum(axis=0), x2.shape[0]
            acc[n] = e if n not in acc else acc[n] + e
            acc1[n] = e1 if n not in acc1 else acc1[n] + e1
            cnt[n] = cnt.get(n, 0) + k
    out: Dict[str, np.ndarray] = {}
    for node, (op, w_shape, group) in layers.items():
        x_name = inputs.get(node)
        if x_name not in acc:
            continue
        def layout(e):
            if op != "Conv":
                return e.reshape(1, -1)
            c_out, c_in = int(w_shape[0]), int(w_shape[1])
            spatial = int(np.prod(w_shape[2:]))
            g = max(int(group), 1)
            per_group = e.reshape(g, c_in)
            lay = np.repeat(per_group, spatial, axis=1)                  # [g, c_in * spatial] in K order
            return lay[np.arange(c_out) // max(c_out // g, 1)] if g > 1 else lay

        if op == "Conv" and acc[x_name].size != int(w_shape[1]) * max(int(group), 1):
            continue
        imp = layout(acc[x_name] / max(cnt[x_name], 1))
        if means is not None:
            means[node] = layout(acc1[x_name] / max(cnt[x_name], 1))
        mean = imp.mean(axis=1, keepdims=True)
        out[node] = np.maximum(imp, IMPORTANCE_FLOOR * np.where(mean > 0, mean, 1.0))
    return out


def mean_shift(w: np.ndarray, q: np.ndarray, scale, zero_point, axis: int, mean: np.ndarray) -> np.ndarray:
    """Mean-shift bias correction (labelled ``bias_correction`` in the plan): per output channel, the expected
    output error sum_j (w_j - s (q_j - z)) E[x_j] that the non-uniform weights add, to be added to the bias."""
    c = w.shape[axis]
    wm = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(c, -1)
    qm = np.moveaxis(np.asarray(q, np.float64), axis, 0).reshape(c, -1)
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (c,))[:, None]
    z = np.broadcast_to(np.asarray(zero_point, np.float64).reshape(-1), (c,))[:, None]
    return ((wm - s * (qm - z)) * np.broadcast_to(mean, wm.shape)).sum(axis=1)
