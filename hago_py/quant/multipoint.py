"""Multipoint weights: each output channel is a sum of low-bit vectors (Liu, Ye, Zhou, Liu, "Post-training
quantization with multiple points: mixed precision without mixed precision", AAAI 2021).

A channel's weight vector w (length K) is approximated by ``sum_i a_i q_i`` with every ``q_i`` on the same
low-bit integer grid (``weight_bits``) and a real coefficient ``a_i`` per point. The points are built greedily:
point i quantizes the residual ``r = w - sum_{j<i} a_j q_j`` to the nearest grid value for the coefficient
``a_i`` that minimizes the channel's output error ``sum_k E[x_k^2] (r_k - a_i q_ik)^2`` (a 1-D search over
fractions of ``max|r| / qmax``). Rounding to the nearest grid value never moves an element further from its
target than 0 would, so the error never grows with a point (tested).

How many points a channel gets is decided by its output error (the paper's adaptive rule, made a budget
here): every channel starts with one point; extra points go, greedily across all multipoint layers, to the
channel whose next point removes the most output noise-to-signal per unit of cost, until the budget is spent.
The budget is an average point count per channel (``multipoint_points``, the paper's complexity measure), or a
fraction of extra multiply-accumulates (``complexity_budget``: cost of a row = its MACs). Grouped convolutions
(depthwise) keep one point count for the whole layer (every group must widen alike).

Realization (quant/realize.py, ``widen``): a k-point channel is k rows of the same integer Conv / Gemm / MatMul,
each row with its own per-channel scale ``a_i`` (zero point 0) and the bias on the first row only; the
widened output is quantized once (it is what ORT's QLinearConv / QGemm produce) and the rows are summed back to
the C channels after the kernel (Gather along the channel axis + Add, with a 0/1 mask where only some channels
have that point). So the points run on the target's 8-bit integer kernel: with ``weight_bits`` < 8 they are
low-bit values in an int8 container (no CPU here has a 4-bit kernel: labelled simulated in the report).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_POINTS = 4
# fractions of max|r| / qmax tried for a point's coefficient (1.0 = min-max, smaller ones clip outliers)
SCALE_FRACTIONS = np.linspace(0.2, 1.0, 33)
# a lone point's coefficient: the error-optimal one over SCALE_FRACTIONS. Measured on ResNet-20 W4A8 (full test
# set, 2026-12-03): as the only point of every channel it scores 6.4 pp below FP32 (min-max 3.5 pp: the diagonal
# input-energy weighting misjudges outlier weights), yet with 1.25 points per channel it gives -0.85 pp against
# -1.58 pp with min-max lone points; kept for the multipoint budget it serves, labelled in the README
ONE_POINT_FRACTIONS = SCALE_FRACTIONS
# first-point coefficients tried when a channel gets two or more points (fractions of max|w| / qmax)
FIRST_FRACTIONS = np.linspace(0.3, 1.0, 15)
# joint least-squares refits of a channel's coefficients per point count (refit_coefficients; 0: the greedy's own)
REFIT_ROUNDS = 4
REFIT_CANDIDATES = False
_CHUNK = 1 << 22  # elements of the [channels, fractions, K] error tensor computed at once


def channel_major(w: np.ndarray, axis: int) -> np.ndarray:
    """[C, K] view of a weight with its output channels on ``axis`` (float64)."""
    return np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)


def from_channel_major(m: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """Inverse of :func:`channel_major` for a [R, K] array whose rows are channels of a tensor of ``shape``
    with R rows on ``axis``."""
    moved = [m.shape[0]] + [s for i, s in enumerate(shape) if i != axis]
    return np.moveaxis(m.reshape(moved), 0, axis)


def best_point(r: np.ndarray, imp: np.ndarray, qmin: int, qmax: int,
               fractions: np.ndarray = SCALE_FRACTIONS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One greedy point for every row of ``r`` [C, K]: (coefficient a [C] (float32-exact), integer q [C, K],
    remaining weighted error [C]). ``imp`` [1 or C, K] weighs each element's error (E[x_k^2])."""
    c, k = r.shape
    amax = np.abs(r).max(axis=1)
    top = float(max(qmax, -qmin))
    imp = np.broadcast_to(imp, (c, k))
    a_out = np.ones(c, np.float64)
    q_out = np.zeros((c, k), np.int64)
    e_out = (imp * r * r).sum(axis=1)
    step = max(1, _CHUNK // max(1, len(fractions) * k))
    for lo in range(0, c, step):
        sl = slice(lo, min(c, lo + step))
        cand = (amax[sl, None] * fractions[None, :] / top).astype(np.float32).astype(np.float64)
        cand = np.where(cand > 0, cand, 1.0)
        rr = r[sl, None, :]
        q = np.clip(np.rint(rr / cand[:, :, None]), qmin, qmax)
        err = (imp[sl, None, :] * (rr - cand[:, :, None] * q) ** 2).sum(axis=2)
        best = err.argmin(axis=1)
        idx = np.arange(best.size)
        better = err[idx, best] < e_out[sl]  # a point that cannot reduce the error stays all-zero
        a_out[sl] = np.where(better, cand[idx, best], 1.0)
        q_out[sl] = np.where(better[:, None], q[idx, best], 0).astype(np.int64)
        e_out[sl] = np.where(better, err[idx, best], e_out[sl])
    return a_out, q_out, e_out


def sequential_rows(w: np.ndarray, a: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """The integer points Q [C, k, K] of every channel of ``w`` [C, K] for its coefficients ``a`` [C, k]
    (float32-exact): point i rounds the running residual ``w - sum_{j<i} a_j q_j`` to the nearest grid value of
    ``a_i``, which is the rule :func:`rows_from_scales` rebuilds a plan's rows by."""
    r = np.array(w, np.float64)
    out = np.zeros(a.shape + (w.shape[1],), np.int64)
    for i in range(a.shape[1]):
        q = np.clip(np.rint(r / a[:, i, None]), qmin, qmax)
        out[:, i] = q.astype(np.int64)
        r = r - a[:, i, None] * q
    return out


def refit_coefficients(w: np.ndarray, A: np.ndarray, Q: np.ndarray, E: np.ndarray, qmin: int, qmax: int, *,
                       imp: Optional[np.ndarray] = None, H: Optional[np.ndarray] = None,
                       rounds: int = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint refit of each channel's k coefficients: for its points Q the coefficients minimizing the output error
    (w - Q^T a)^T H (w - Q^T a) jointly (least squares, a = (Q H Q^T)^-1 Q H w; the greedy's coefficients are
    optimal one step at a time only), then the points re-derived from the new coefficients by the sequential
    residual rounding (:func:`sequential_rows`, so the plan's scales still rebuild the rows), ``rounds`` times.
    A channel takes the best (A, Q) met, by the same error: never worse than the given (A, Q) with error ``E``.
    Coefficients stay positive and float32-exact; a point that is all zero keeps its coefficient."""
    rounds = REFIT_ROUNDS if rounds is None else int(rounds)
    A = np.array(A, np.float64)
    Q = np.array(Q, np.int64)
    E = np.array(E, np.float64)
    if rounds <= 0 or A.size == 0:
        return A, Q, E
    w = np.asarray(w, np.float64)
    c, k = A.shape
    diag = None if H is not None else np.broadcast_to(np.ones((1, w.shape[1])) if imp is None else
                                                       np.asarray(imp, np.float64), w.shape)

    def errf(d):
        return ((d @ H) * d).sum(axis=1) if H is not None else (diag * d * d).sum(axis=1)

    a_cur, q_cur = A, Q
    for _ in range(rounds):
        qf = q_cur.astype(np.float64)
        qh = qf @ H if H is not None else qf * diag[:, None, :]            # [C, k, K]
        G = np.einsum("cik,cjk->cij", qh, qf)
        b = np.einsum("cik,ck->ci", qh, w)
        live = np.abs(q_cur).sum(axis=2) > 0                               # [C, k]
        eye = np.eye(k)[None]
        G = np.where(live[:, :, None] & live[:, None, :], G, 0.0) + eye * (~live)[:, :, None]
        G = G + eye * (1e-12 * np.trace(G, axis1=1, axis2=2)[:, None, None] + 1e-300)
        b = np.where(live, b, 0.0)
        try:
            a_ls = np.linalg.solve(G, b[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        a_ls = np.where(live, a_ls, a_cur)
        ok = np.isfinite(a_ls).all(axis=1) & (a_ls > 0).all(axis=1)
        a_new = np.where(ok[:, None], a_ls, a_cur).astype(np.float32).astype(np.float64)
        a_new = np.where(a_new > 0, a_new, a_cur)
        q_new = sequential_rows(w, a_new, qmin, qmax)
        e_new = errf(w - (a_new[:, :, None] * q_new).sum(axis=1))
        better = e_new < E
        A = np.where(better[:, None], a_new, A)
        Q = np.where(better[:, None, None], q_new, Q)
        E = np.where(better, e_new, E)
        if np.array_equal(a_new, a_cur):
            break
        a_cur, q_cur = a_new, q_new
    return A, Q, E


def greedy_points(w: np.ndarray, imp: Optional[np.ndarray], qmin: int, qmax: int, max_points: int = MAX_POINTS,
                  H: Optional[np.ndarray] = None, refit: Optional[int] = None
                  ) -> Tuple[List[np.ndarray], List[np.ndarray], np.ndarray]:
    """The best k-point approximation of every channel of ``w`` [C, K] for k = 1..max_points: coefficients
    A[k-1] [C, k], integer points Q[k-1] [C, k, K], and the output error E [C, max_points + 1] (E[:, 0]: no
    point, E[:, k]: with k points; never increasing in k with the diagonal error).

    The error of a weight change d is d^T H d with ``H`` the input covariance E[x x^T] when given (correlations
    included), else sum_k imp_k d_k^2 (the diagonal). Each point's coefficient comes from a search over fractions
    of max|r| / qmax (the residual points' by the diagonal error, cheap); the lone point (k = 1) and, for k >= 2,
    the first point are searched by the full error, the later points greedy on the residual: a first point that
    clips less leaves a residual the next points can resolve, which the plain greedy order misses."""
    w = np.asarray(w, np.float64)
    imp = np.ones((1, w.shape[1])) if imp is None else np.asarray(imp, np.float64)
    c, k = w.shape

    def errf(d):
        return ((d @ H) * d).sum(axis=1) if H is not None else (imp * d * d).sum(axis=1)

    top = float(max(qmax, -qmin))
    amax = np.abs(w).max(axis=1)

    def first(t):
        a = (amax * t / top).astype(np.float32).astype(np.float64)
        a = np.where(a > 0, a, 1.0)
        return a, np.clip(np.rint(w / a[:, None]), qmin, qmax).astype(np.int64)

    e0 = errf(w)
    if H is None:
        a1, q1, e1 = best_point(w, imp, qmin, qmax, ONE_POINT_FRACTIONS)
    else:
        a1, q1, e1 = np.ones(c), np.zeros((c, k), np.int64), e0.copy()
        for t in ONE_POINT_FRACTIONS:
            a, q = first(t)
            e = errf(w - a[:, None] * q)
            better = e < e1
            a1, e1 = np.where(better, a, a1), np.where(better, e, e1)
            q1 = np.where(better[:, None], q, q1)
    a1, q1, e1 = refit_coefficients(w, a1[:, None], q1[:, None, :], e1, qmin, qmax, imp=imp, H=H, rounds=refit)
    A, Q, E = [a1], [q1], [e0, e1]
    if max_points < 2:
        return A, Q, np.stack(E, 1)
    best_e = [np.full(c, np.inf) for _ in range(max_points - 1)]
    best_a = [np.zeros((c, j + 2)) for j in range(max_points - 1)]
    best_q = [np.zeros((c, j + 2, k), np.int64) for j in range(max_points - 1)]
    for t in FIRST_FRACTIONS:
        a, q = first(t)
        r = w - a[:, None] * q
        aa, qq = [a], [q]
        for j in range(max_points - 1):
            an, qn, _ = best_point(r, imp, qmin, qmax)
            r = r - an[:, None] * qn
            aa.append(an)
            qq.append(qn)
            en = errf(r)
            ca, cq = np.stack(aa, 1), np.stack(qq, 1)
            if REFIT_CANDIDATES:
                ca, cq, en = refit_coefficients(w, ca, cq, en, qmin, qmax, imp=imp, H=H, rounds=refit)
            better = en < best_e[j]
            best_e[j] = np.where(better, en, best_e[j])
            best_a[j][better] = ca[better]
            best_q[j][better] = cq[better]
    for j in range(max_points - 1):  # the plain greedy order is a candidate too (its first point is optimal)
        resid = w - (A[-1][:, :, None] * Q[-1]).sum(axis=1)
        an, qn, _ = best_point(resid, imp, qmin, qmax)
        en = errf(resid - an[:, None] * qn)
        cand_a = np.concatenate([A[-1], an[:, None]], 1)
        cand_q = np.concatenate([Q[-1], qn[:, None, :]], 1)
        keep = best_e[j] <= en
        a_k = np.where(keep[:, None], best_a[j], cand_a)
        q_k = np.where(keep[:, None, None], best_q[j], cand_q)
        e_k = np.minimum(best_e[j], en)
        a_k, q_k, e_k = refit_coefficients(w, a_k, q_k, e_k, qmin, qmax, imp=imp, H=H, rounds=refit)
        A.append(a_k)
        Q.append(q_k)
        E.append(e_k)  # with H a point may not lower d^T H d: the allocation then skips it
    return A, Q, np.stack(E, 1)


def rows_from_scales(w: np.ndarray, scales: Sequence[float], parent: Sequence[int], qmin: int, qmax: int) -> np.ndarray:
    """The integer rows [R, K] of a multipoint weight from its per-row coefficients: the rows of channel c
    (``parent[row] == c``, in row order) quantize the running residual to the nearest grid value, exactly as
    :func:`greedy_points` did (so a plan's scales reproduce its weights without the calibration statistics)."""
    w = np.asarray(w, np.float64)
    s = np.asarray(scales, np.float32).astype(np.float64)
    parent = np.asarray(parent, np.int64)
    out = np.zeros((len(parent), w.shape[1]), np.int64)
    resid = w.copy()
    for row in range(len(parent)):
        c = parent[row]
        q = np.clip(np.rint(resid[c] / s[row]), qmin, qmax).astype(np.int64)
        out[row] = q
        resid[c] = resid[c] - s[row] * q
    return out


def row_layout(points: Sequence[int], group: int = 1) -> Tuple[List[int], List[int]]:
    """Row order of a widened layer with ``points[c]`` points per channel: (parent channel per row, point
    index per row). Ungrouped: the C first points in channel order, then every second point, and so on (the
    primary rows stay rows 0..C-1). Grouped (every channel the same k points): each group's rows together,
    point-major inside the group, so the group structure of the convolution is kept."""
    points = [int(p) for p in points]
    c = len(points)
    if group > 1:
        k = points[0]
        m = c // group
        parent, index = [], []
        for g in range(group):
            for i in range(k):
                for j in range(m):
                    parent.append(g * m + j)
                    index.append(i)
        return parent, index
    parent, index = list(range(c)), [0] * c
    for i in range(1, max(points, default=1)):
        for ch in range(c):
            if points[ch] > i:
                parent.append(ch)
                index.append(i)
    return parent, index


@dataclass
class LayerCandidate:
    """What the allocation needs of one layer: its normalized error after p points per channel
    (err [C, P + 1], in units of the layer's mean output energy), the cost of one extra row (1 or its MACs),
    and whether the layer is grouped (all channels take a point together)."""
    node: str
    err: np.ndarray
    row_cost: float
    grouped: bool = False


def allocate(cands: Sequence[LayerCandidate], budget: float, max_points: int = MAX_POINTS) -> Dict[str, np.ndarray]:
    """Points per channel for every layer: one each, then greedily the next point with the largest error
    reduction per cost, while the summed cost of the extra rows stays within ``budget``."""
    points = {c.node: np.ones(c.err.shape[0], np.int64) for c in cands}
    heap: List[Tuple[float, int, str, int]] = []
    by_node = {c.node: c for c in cands}
    tie = 0

    def push(c: LayerCandidate, ch: int) -> None:
        nonlocal tie
        p = points[c.node]
        if c.grouped:
            k = int(p[0])
            if k >= max_points or k >= c.err.shape[1] - 1:
                return
            gain, cost = float((c.err[:, k] - c.err[:, k + 1]).sum()), c.row_cost * c.err.shape[0]
        else:
            k = int(p[ch])
            if k >= max_points or k >= c.err.shape[1] - 1:
                return
            gain, cost = float(c.err[ch, k] - c.err[ch, k + 1]), c.row_cost
        if gain <= 0 or cost <= 0:
            return
        tie += 1
        heapq.heappush(heap, (-gain / cost, tie, c.node, ch))

    for c in cands:
        for ch in ([0] if c.grouped else range(c.err.shape[0])):
            push(c, ch)
    spent = 0.0
    while heap:
        _, _, node, ch = heapq.heappop(heap)
        c = by_node[node]
        cost = c.row_cost * (c.err.shape[0] if c.grouped else 1)
        if spent + cost > budget + 1e-9:
            continue  # too expensive now; a cheaper candidate may still fit
        spent += cost
        if c.grouped:
            points[node] += 1
        else:
            points[node][ch] += 1
        push(c, ch)
    return points


def combine_plan(points: Sequence[int], group: int = 1) -> Dict[str, List]:
    """For each point index i: the row of channel c's i-th point (``gather[i][c]``; row 0 where c has no such
    point) and a 0/1 mask (``mask[i]``, None when every channel has it). Used by realize to sum the widened
    output back to C channels."""
    parent, index = row_layout(points, group)
    c = len(points)
    kmax = max(int(p) for p in points)
    gather = [[0] * c for _ in range(kmax)]
    have = [[0] * c for _ in range(kmax)]
    for row, (ch, i) in enumerate(zip(parent, index)):
        gather[i][ch] = row
        have[i][ch] = 1
    mask = [None if all(h) else h for h in have]
    return {"gather": gather, "mask": mask}


def layer_point_bits(options, node: str) -> Optional[int]:
    """Bits of the points of layer ``node`` under ``options`` (QuantOptions), or None when the layer is not
    multipoint (its weight_scheme, per layer else global, decides; its weight_bits, per layer else global)."""
    if options.layer(node, "weight_scheme", options.weight_scheme) != "multipoint":
        return None
    bits = int(options.layer(node, "weight_bits", options.weight_bits))
    return bits if 2 <= bits <= 8 else None


def _out_positions(model, node) -> int:
    """Output positions per sample a row of ``node`` is computed at (H*W of a Conv, tokens of a MatMul; 1 when
    unknown), from the prepared model's inferred shapes."""
    vi = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    v = vi.get(node.output[0])
    if v is None or not v.type.HasField("tensor_type"):
        return 1
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
    inner = dims[2:] if node.op_type == "Conv" else dims[1:-1]
    return int(np.prod([d for d in inner if d > 0])) if inner else 1


def model_macs(model) -> Tuple[float, Dict[str, Tuple[int, float]]]:
    """MACs per sample of every Conv / Gemm / MatMul with a constant weight: (total, {node: (channels, MACs per
    output channel)})."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    out: Dict[str, Tuple[int, float]] = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        shape = inits[n.input[1]]
        if len(shape) < 2:
            continue
        if n.op_type == "Conv":
            c, k = shape[0], int(np.prod(shape[1:]))
        elif n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            c, k = shape[0], shape[1]
        else:
            c, k = shape[1], shape[0]
        out[n.name] = (int(c), float(k) * _out_positions(model, n))
    return float(sum(c * m for c, m in out.values())), out


def choose_points(pipe, plan, opts, weights) -> Tuple[Dict[str, np.ndarray], Dict]:
    """weight_scheme="multipoint": the points of every multipoint layer of ``plan`` (filled into its weight
    TensorQuant: per-row scales, ``multipoint``) and their integer rows ({node: array}, merged into
    ``weights``); the summary for the report. Statistics: E[x^2] of each layer's input (shared with the
    non-uniform scheme, one FP32 pass), the widened outputs' ranges (the pipeline's observers)."""
    import time

    from onnx import numpy_helper

    from . import nonuniform as nu
    from .calibrate import collect_tensors
    from .observers import qrange

    model = pipe.prepared
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    layers = {lp.node: lp for lp in plan.quantized_layers()
              if lp.weight is not None and lp.weight.scheme == "multipoint" and lp.node in nodes}
    if not layers:
        return dict(weights or {}), {}, {}
    t0 = time.perf_counter()
    group = {n: next((a.i for a in nodes[n].attribute if a.name == "group"), 1) for n in layers}
    todo = {n: (lp.op_type, list(inits[lp.weight.tensor].dims), group[n])
            for n, lp in layers.items() if n not in pipe._nu_importance}
    if todo:
        pipe._nu_importance.update(nu.input_importance(model, todo, pipe.first_batches(nu.IMPORTANCE_SAMPLES, exact=True),
                                                       threads=pipe.opts.threads, means=pipe._nu_means))
    total_macs, geo = model_macs(model)
    static = {n: bool(lp.inputs) and plan.activations.get(lp.inputs[0]) is not None
              and plan.activations[lp.inputs[0]].mode == "static" for n, lp in layers.items()}
    by_mac = opts.complexity_budget is not None
    if FULL_COVARIANCE:
        missing = [n for n in layers if n not in pipe._mp_cov]
        if missing:
            pipe._mp_cov.update(input_covariance(model, missing, pipe.first_batches(COV_SAMPLES, exact=True),
                                                 threads=pipe.opts.threads, means=pipe._mp_cov_mean))
    cands, greedy = [], {}
    for n, lp in layers.items():
        tq = lp.weight
        w = numpy_helper.to_array(inits[tq.tensor]).astype(np.float32)
        qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
        kmax = int(opts.max_points) if static[n] else 1
        H = pipe._mp_cov.get(n)
        wm = channel_major(w, tq.axis)
        H = H if H is not None and H.shape[0] == wm.shape[1] else None
        imp = pipe._nu_importance.get(n)
        centred = bool(opts.bias_correction) and CENTRED_WITH_BIAS_CORRECTION and _bias_of(nodes[n], inits, pipe) is not None
        if centred and H is not None and pipe._mp_cov_mean.get(n) is not None:
            # the mean-shift correction moves the mean output error E[d^T x] into the bias: what stays is the
            # error of the centred input, d^T (H - m m^T) d, so the points are fitted (and allocated) by that
            m = pipe._mp_cov_mean[n]
            H = H - np.outer(m, m)
            imp = np.clip(np.diag(H), 0.0, None)[None]
        elif centred and imp is not None and pipe._nu_means.get(n) is not None and imp.shape == np.shape(pipe._nu_means[n]):
            imp = np.clip(imp - np.asarray(pipe._nu_means[n]) ** 2, 0.0, None)
        else:
            centred = False
        key = (n, tq.bits, qmin, qmax, kmax, tq.axis, H is not None, centred, REFIT_ROUNDS)
        if key not in pipe._mp_cache:
            pipe._mp_cache[key] = greedy_points(wm, imp, qmin, qmax, kmax, H=H)
        A, Q, E = pipe._mp_cache[key]
        greedy[n] = (w.shape, A, Q, E)
        sig = float(E[:, 0].mean()) or 1.0
        per_row = geo.get(n, (1, 1.0))[1] if by_mac else 1.0
        cands.append(LayerCandidate(n, E / sig, per_row, grouped=group[n] > 1))
    div = layer_divergence(pipe, {n: (layers[n].weight.tensor, greedy[n]) for n in layers}, layers)
    factor = {n: divergence_factor(greedy[n][3], div[n]) for n in layers}
    for cand in cands:  # error in units of the model-output divergence (its measured slope for this layer)
        e = greedy[cand.node][3]
        cand.err = e / (float(e[:, 0].sum()) or 1.0) * factor[cand.node]
    act = _activation_candidates(pipe, plan, layers, nodes, inits, greedy, factor, geo) if by_mac else {}
    cands += [c for c, _ in act.values()]
    chans = sum(E.shape[0] for _, _, _, E in greedy.values())
    budget = float(opts.complexity_budget) * total_macs if by_mac else (float(opts.multipoint_points) - 1.0) * chans
    points = allocate(cands, budget, int(opts.max_points))
    out = dict(weights or {})
    biases: Dict[str, np.ndarray] = {}
    need_range: Dict[str, str] = {}
    for n, lp in layers.items():
        tq = lp.weight
        shape, A, Q, E = greedy[n]
        p = points[n]
        parent, index = row_layout(p, group[n])
        rows = np.stack([Q[p[ch] - 1][ch, i] for ch, i in zip(parent, index)])
        out[n] = from_channel_major(rows, shape, tq.axis).astype(np.int64)
        tq.scale = [float(np.float32(A[p[ch] - 1][ch, i])) for ch, i in zip(parent, index)]
        tq.zero_point = [0] * len(parent)
        if opts.bias_correction:  # mean-shift: the expected output error sum_j (w_j - w^_j) E[x_j] moves to the bias
            b = _mean_shift_bias(pipe, nodes[n], inits, tq, rows, parent, n)
            if b is not None:
                biases[n] = b
                lp.notes.append("bias_correction: mean-shift of the multipoint weights added to the bias, max |shift| "
                                f"{np.abs(b - _bias_of(nodes[n], inits, pipe)).max():.3g}")
        c = len(p)
        macs_row = geo.get(n, (c, 0.0))[1]
        e0 = float(E[:, 0].sum()) or 1.0
        tq.multipoint = {"points": [int(x) for x in p], "group": int(group[n]), "rows": len(parent),
                         "macs": c * macs_row, "extra_macs": (len(parent) - c) * macs_row,
                         "error_one_point": float(E[:, 1].sum() / e0),
                         "error": float(E[np.arange(c), p].sum() / e0),
                         "out_scale": None, "out_zero_point": None, "out_dtype": None,
                         "kernel": opts.multipoint_kernel}
        a_pts = points.get(n + ACT_SUFFIX)
        if a_pts is not None and a_pts.max() > 1:  # activation points: second grid on these input channels
            cand, (s2, z2, lo2, hi2, per_in) = act[n + ACT_SUFFIX]
            tq.multipoint.update(act_points=[int(x) for x in a_pts], act_scale2=s2, act_zero_point2=z2,
                                 act_range2=[lo2, hi2], kernel="float")
            tq.multipoint["extra_macs"] += float((a_pts > 1).sum()) * per_in
            lp.simulated = True
            lp.notes.append(f"multipoint activations: {int((a_pts > 1).sum())} of {a_pts.size} input channels get a "
                            f"second {plan.resolve(lp.inputs[0]).bits}-bit point (residual grid s/2^bits); simulated "
                            "(float layer on the two-point input)")
        elif len(parent) > c and opts.multipoint_kernel == "requantize":
            out_tq = plan.activations.get(lp.output) if lp.output else None
            need_range[n] = out_tq.method if out_tq is not None and out_tq.method in (
                "minmax", "percentile", "mse", "entropy") else "mse"
    missing = {nodes[n].output[0]: m for n, m in need_range.items() if (nodes[n].output[0], m) not in pipe._observers}
    if missing:
        obs = collect_tensors(model, missing, pipe.calib, percentile=opts.percentile, threads=opts.threads)
        for t, o in obs.items():
            pipe._observers[(t, missing[t])] = o
    for n, m in need_range.items():
        lp = layers[n]
        dtype = plan.resolve(lp.inputs[0]).dtype
        s, z = pipe._observers[(nodes[n].output[0], m)].compute_qparams(dtype, bits=8, symmetric=False, narrow=False)
        lp.weight.multipoint.update(out_scale=float(s), out_zero_point=int(z), out_dtype=dtype)
    rows_total = sum(lp.weight.multipoint["rows"] for lp in layers.values())
    extra = sum(lp.weight.multipoint["extra_macs"] for lp in layers.values())
    pipe.timings["multipoint"] = pipe.timings.get("multipoint", 0.0) + time.perf_counter() - t0
    summary = {"budget": ("complexity_budget" if by_mac else "multipoint_points"),
               "budget_value": float(opts.complexity_budget if by_mac else opts.multipoint_points),
               "layers": len(layers), "channels": chans, "rows": rows_total,
               "points_per_channel": rows_total / max(chans, 1),
               "extra_macs": extra, "model_macs": total_macs,
               "extra_macs_fraction": extra / total_macs if total_macs else 0.0,
               "widened_layers": sorted(need_range)}
    if biases:
        summary["bias_correction"] = sorted(biases)
    return out, summary, biases


ACT_SUFFIX = "#activation"


def refresh_activation_points(plan) -> None:
    """After the activation ranges moved (clipping='lapq' runs once the points are chosen), the residual grid of
    each activation point follows its input's new scale: s2 = s / 2^bits, centred, clipped to the same bits."""
    from .observers import qrange

    for lp in plan.quantized_layers():
        mp = lp.weight.multipoint if lp.weight is not None else None
        if not mp or not mp.get("act_points") or not lp.inputs:
            continue
        x_tq = plan.resolve(lp.inputs[0])
        qmin, qmax = qrange(x_tq.dtype, x_tq.bits, x_tq.narrow)
        s2, z2 = float(x_tq.scale[0]) / float(2 ** x_tq.bits), (qmin + qmax + 1) // 2
        mp.update(act_scale2=s2, act_zero_point2=z2, act_range2=[(qmin - z2) * s2, (qmax - z2) * s2])


def _activation_candidates(pipe, plan, layers, nodes, inits, greedy, factor, geo) -> Dict[str, Tuple]:
    """complexity_budget with activations narrower than 8 bits: each input channel of an ungrouped multipoint
    layer may get a second activation point (the residual x - DQ(Q(x)) on the grid s / 2^bits, clipped to the
    same bits), which costs the layer's MACs per input channel. Its gain: E[(x_c - x1_c)^2] - E[(x_c - x1_c -
    x2_c)^2] times sum_o |W[o, c, :]|^2 (the output energy of an input error), in the weight candidates' units
    (layer output energy, times the layer's divergence factor). {node#activation: (LayerCandidate, grid)}."""
    from onnx import numpy_helper

    from .calibrate import tensor_pass
    from .observers import qrange

    todo = {}
    for n, lp in layers.items():
        x_tq = plan.resolve(lp.inputs[0]) if lp.inputs and lp.inputs[0] in plan.activations else None
        if x_tq is None or x_tq.mode != "static" or x_tq.scale is None or x_tq.bits >= 8 or not _plain(nodes[n]):
            continue
        todo[n] = x_tq
    if not todo:
        return {}
    stats: Dict[str, list] = {n: [0.0, 0.0, 0] for n in todo}
    grids = {}
    for n, x_tq in todo.items():
        qmin, qmax = qrange(x_tq.dtype, x_tq.bits, x_tq.narrow)
        s1, z1 = float(x_tq.scale[0]), int(x_tq.zero_point[0])
        s2 = s1 / float(2 ** x_tq.bits)
        z2 = (qmin + qmax + 1) // 2
        grids[n] = (s1, z1, qmin, qmax, s2, z2)
    names = sorted({nodes[n].input[0] for n in todo})
    for _, outs in tensor_pass(pipe.prepared, names, pipe.first_batches(COV_SAMPLES, exact=True),
                               threads=pipe.opts.threads):
        for n in todo:
            x = np.asarray(outs[nodes[n].input[0]], np.float64)
            s1, z1, qmin, qmax, s2, z2 = grids[n]
            x1 = (np.clip(np.rint(x / s1) + z1, qmin, qmax) - z1) * s1
            r = x - x1
            x2 = (np.clip(np.rint(r / s2) + z2, qmin, qmax) - z2) * s2
            ax = 1 if nodes[n].op_type in ("Conv", "Gemm") else x.ndim - 1
            red = tuple(i for i in range(x.ndim) if i != ax)
            stats[n][0] = stats[n][0] + (r * r).sum(axis=red)
            stats[n][1] = stats[n][1] + ((r - x2) ** 2).sum(axis=red)
            stats[n][2] += int(np.prod([x.shape[i] for i in red]))
    out = {}
    for n, (e1, e2, cnt) in stats.items():
        if not cnt:
            continue
        tq = layers[n].weight
        w = numpy_helper.to_array(inits[tq.tensor]).astype(np.float64)
        node = nodes[n]
        if node.op_type == "Conv":
            g = (w ** 2).sum(axis=tuple(i for i in range(w.ndim) if i != 1))
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            g = (w ** 2).sum(axis=0)
        else:
            g = (w ** 2).sum(axis=1)
        e1, e2 = np.asarray(e1) / cnt * g, np.asarray(e2) / cnt * g
        if e1.shape != g.shape:
            continue
        E = greedy[n][3]
        err = np.stack([e1, e1, e2], 1) * factor[n] / (float(E[:, 0].sum()) or 1.0)
        total = geo.get(n, (1, 0.0))
        per_in = total[0] * total[1] / max(g.size, 1)  # MACs per input channel
        s1, z1, qmin, qmax, s2, z2 = grids[n]
        out[n + ACT_SUFFIX] = (LayerCandidate(n + ACT_SUFFIX, err, per_in),
                               (s2, z2, (qmin - z2) * s2, (qmax - z2) * s2, per_in))
    return out


def _bias_of(node, inits, pipe) -> np.ndarray:
    from onnx import numpy_helper

    from ..ir.fusion import _consumers
    from .reconstruct import _bias_source

    kind, name = _bias_source(pipe.prepared, node, _consumers(pipe.prepared))
    return None if name is None else numpy_helper.to_array(inits[name]).astype(np.float64).reshape(-1)


def _mean_shift_bias(pipe, node, inits, tq, rows, parent, n) -> Optional[np.ndarray]:
    """The layer's bias plus the mean shift of its multipoint weights (None: no constant bias to correct, or no
    input mean)."""
    from onnx import numpy_helper

    b = _bias_of(node, inits, pipe)
    mean = pipe._nu_means.get(n)
    if b is None or mean is None:
        return None
    wm = channel_major(numpy_helper.to_array(inits[tq.tensor]).astype(np.float64), tq.axis)
    approx = np.zeros_like(wm)
    np.add.at(approx, np.asarray(parent), np.asarray(tq.scale, np.float32).astype(np.float64)[:, None] * rows)
    corr = ((wm - approx) * np.broadcast_to(mean, wm.shape)).sum(axis=1)
    if b.size not in (1, corr.size):
        return None
    return (b + corr).astype(np.float32)


# bias_correction=True: fit and allocate the points by the error of the centred input (the mean error goes to the bias)
CENTRED_WITH_BIAS_CORRECTION = True
FULL_COVARIANCE = True    # allocation by d^T H d (full input covariance) where available, else the diagonal
COV_SAMPLES = 64          # calibration samples of the input-covariance pass
COV_ROWS = 16384          # rows (output positions) per batch kept for a layer's covariance (strided subsample)


def _im2col(x: np.ndarray, node) -> np.ndarray:
    """[rows, Cin * kh * kw] patches of a Conv input (the weight's K order), for an ungrouped 2-D Conv."""
    at = {a.name: a for a in node.attribute}
    kh, kw = list(at["kernel_shape"].ints) if "kernel_shape" in at else (None, None)
    pads = list(at["pads"].ints) if "pads" in at else [0, 0, 0, 0]
    st = list(at["strides"].ints) if "strides" in at else [1, 1]
    dil = list(at["dilations"].ints) if "dilations" in at else [1, 1]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ekh, ekw = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (ekh, ekw), axis=(2, 3))[:, :, ::st[0], ::st[1], ::dil[0], ::dil[1]]
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def _plain(node) -> bool:
    """An ungrouped Conv, a Gemm without transA, or a MatMul: its input channels are the weight's K axis."""
    if node.op_type == "Conv":
        return next((a.i for a in node.attribute if a.name == "group"), 1) == 1
    return not (node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute))


def input_covariance(model, nodes: Sequence[str], batches, *, threads: int = 1,
                     means: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """E[x x^T] over each layer's input rows (im2col patches for a Conv), in the weight's K order: the output
    error of a weight change d is d^T H d, correlations included (the diagonal is nonuniform.input_importance).
    Ungrouped 2-D Conv, Gemm and MatMul; other layers are left out (their error stays diagonal). ``means`` (a
    dict) receives E[x] over the same rows (zero padding included)."""
    from .calibrate import tensor_pass

    by = {n.name: n for n in model.graph.node if n.name in set(nodes)}
    ok = {name: n for name, n in by.items()
          if _plain(n) and (n.op_type != "Conv" or any(a.name == "kernel_shape" for a in n.attribute))}
    if not ok:
        return {}
    acc: Dict[str, np.ndarray] = {}
    acc1: Dict[str, np.ndarray] = {}
    cnt: Dict[str, int] = {}
    names = sorted({n.input[0] for n in ok.values()})
    for _, outs in tensor_pass(model, names, batches, threads=threads):
        for name, n in ok.items():
            x = np.asarray(outs[n.input[0]], np.float32)
            if n.op_type == "Conv":
                if x.ndim != 4:
                    continue
                rows = _im2col(x, n)
            else:
                rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] > COV_ROWS:
                rows = rows[:: -(-rows.shape[0] // COV_ROWS)]
            r = rows.astype(np.float64)
            acc[name] = r.T @ r + acc.get(name, 0.0)
            acc1[name] = r.sum(axis=0) + acc1.get(name, 0.0)
            cnt[name] = cnt.get(name, 0) + r.shape[0]
    if means is not None:
        means.update({n: acc1[n] / max(cnt[n], 1) for n in acc1})
    return {n: acc[n] / max(cnt[n], 1) for n in acc}


def layer_divergence(pipe, layers: Dict[str, Tuple[str, tuple]], plans) -> Dict[str, float]:
    """Per multipoint layer: the divergence of the model's outputs (KL of the class scores, else noise-to-signal;
    quant/hybrid.py) when only that layer's weights are its one-point approximation, all else FP32, over the
    calibration proxy. Relates a layer's own output error to the model's, so points go where they matter
    to the output (a first or last layer's noise counts more than its noise-to-signal ratio says)."""
    from onnx import numpy_helper

    from ..backends.ort import OrtBackend
    from .hybrid import PROXY_INPUT_ELEMS, PROXY_SAMPLES, _divergence, _weights_as_inputs

    tensors = sorted({t for t, _ in layers.values()})
    inits = {t.name: t for t in pipe.prepared.graph.initializer}
    w = {t: numpy_helper.to_array(inits[t]).astype(np.float32) for t in tensors}
    per_sample = sum(int(np.prod(v.shape[1:])) for v in pipe.calib.first_batch().values()) or 1
    batches = pipe.first_batches(int(max(32, min(PROXY_SAMPLES, PROXY_INPUT_ELEMS // per_sample))), exact=True)
    be = OrtBackend(threads=pipe.opts.threads)
    sess = be.compile(_weights_as_inputs(pipe.prepared, tensors))

    def outs(ws):
        res = [be.run(sess, {**b, **ws}) for b in batches]
        return [np.concatenate([r[k] for r in res], 0) for k in range(len(res[0]))]

    ref = outs(w)
    out = {}
    for n, (t, (shape, A, Q, E)) in layers.items():
        div = []
        for k in range(1, min(2, len(A)) + 1):  # one point per channel, and two where the greedy has them
            approx = from_channel_major((A[k - 1][:, :, None] * Q[k - 1]).sum(axis=1), shape, plans[n].weight.axis)
            div.append(_divergence(ref, outs({**w, t: approx.astype(np.float32)}))[0])
        out[n] = tuple(div)
    return out


def divergence_factor(E: np.ndarray, div: Tuple[float, ...]) -> float:
    """Model-output divergence per unit of the layer's relative output error: the measured slope between one and
    two points per channel when both were measured and it is positive (the marginal effect the allocation trades),
    else the one-point ratio."""
    e0 = float(E[:, 0].sum()) or 1.0
    n1 = float(E[:, 1].sum()) / e0
    if len(div) > 1 and E.shape[1] > 2:
        n2 = float(E[:, 2].sum()) / e0
        if div[0] > div[1] and n1 > n2:
            return (div[0] - div[1]) / (n1 - n2)
    return max(div[0], 0.0) / n1 if n1 > 0 else 0.0


def weight_rows(w: np.ndarray, tq) -> np.ndarray:
    """The integer rows of a multipoint weight (``tq``: its TensorQuant). With points chosen (tq.multipoint
    and one scale per row) the rows are rebuilt from the scales; otherwise (realize without the pipeline's
    statistics) every channel gets one greedy point, unweighted, and ``tq`` records it."""
    from .observers import qrange

    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    wm = channel_major(w, tq.axis)
    mp = tq.multipoint
    if mp and tq.scale and len(tq.scale) == mp.get("rows", -1):
        parent, _ = row_layout(mp["points"], int(mp.get("group", 1)))
        rows = rows_from_scales(wm, tq.scale, parent, qmin, qmax)
    else:
        A, Q, E = greedy_points(wm, None, qmin, qmax, 1)
        rows = Q[0][:, 0]
        c = wm.shape[0]
        tq.scale, tq.zero_point = [float(np.float32(a)) for a in A[0][:, 0]], [0] * c
        e0 = float(E[:, 0].sum()) or 1.0
        tq.multipoint = {"points": [1] * c, "group": 1, "rows": c, "macs": None, "extra_macs": 0.0,
                         "error_one_point": float(E[:, 1].sum() / e0), "error": float(E[:, 1].sum() / e0),
                         "out_scale": None, "out_zero_point": None, "out_dtype": None}
    return from_channel_major(rows, w.shape, tq.axis)
