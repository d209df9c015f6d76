"""Calibration observers: qparams exactness, streaming equivalence, robustness, MSE / KL searches."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from hago_py.errors import DataError, OptionError
from hago_py.quant.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    _kl_divergences,
    make_observer,
    qparams_from_range,
    qrange,
)

HIST_METHODS = ["percentile", "mse", "entropy"]


def _fake_quant(x, scale, zp, qmin, qmax):
    q = np.clip(np.round(x.astype(np.float64) / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _quant_mse(x, obs, dtype="int8", bits=None, symmetric=False):
    scale, zp = obs.compute_qparams(dtype, bits, symmetric)
    qmin, qmax = qrange(dtype, bits)
    return float(np.mean((_fake_quant(x, scale, zp, qmin, qmax) - x) ** 2))


def _fed(method, x, chunks=1, **opts):
    obs = make_observer(method, "t", **opts)
    for b in np.array_split(x, chunks):
        obs.update(b)
    return obs


# ------------------------------------------------------------------ qrange / qparams
@pytest.mark.parametrize("args,expected", [
    (("uint8",), (0, 255)), (("int8",), (-128, 127)), (("int8", None, True), (-127, 127)),
    (("int4",), (-8, 7)), (("uint4",), (0, 15)), (("int8", 7), (-64, 63)), (("uint8", 7), (0, 127)),
    (("int8", 7, True), (-63, 63)), (("int16",), (-32768, 32767)), (("uint8", None, True), (0, 255)),
])
def test_qrange(args, expected):
    assert qrange(*args) == expected


@pytest.mark.parametrize("args", [("int8", 9), ("int4", 8), ("float16",), ("int8", 1)])
def test_qrange_rejects_bad_requests(args):
    with pytest.raises(OptionError):
        qrange(*args)


def test_qparams_exact_cases():
    assert qparams_from_range(0.0, 255.0, "uint8") == (1.0, 0)
    assert qparams_from_range(-127.0, 127.0, "int8", symmetric=True) == (1.0, 0)
    assert qparams_from_range(-3.0, 127.0, "int8", symmetric=True, narrow=True) == (1.0, 0)
    assert qparams_from_range(0.0, 63.0, "int8", bits=7, symmetric=True) == (1.0, 0)
    assert qparams_from_range(0.0, 127.0, "uint8", bits=7) == (1.0, 0)
    assert qparams_from_range(-127.0, 127.0, "uint8", symmetric=True) == (1.0, 128)
    assert qparams_from_range(-7.0, 7.0, "int4", symmetric=True) == (1.0, 0)
    # asymmetric int8 over [-128, 127] -> scale 1, zp 0; all-negative range -> zp at qmax
    assert qparams_from_range(-128.0, 127.0, "int8") == (1.0, 0)
    assert qparams_from_range(-255.0, -3.0, "uint8") == (1.0, 255)
    # range not containing zero is widened to contain it
    assert qparams_from_range(10.0, 255.0, "uint8") == (1.0, 0)


def test_qparams_degenerate_range():
    assert qparams_from_range(0.0, 0.0, "uint8") == (1.0, 0)
    assert qparams_from_range(0.0, 0.0, "int8", symmetric=True) == (1.0, 0)
    assert qparams_from_range(0.0, 0.0, "uint8", symmetric=True) == (1.0, 128)
    s, zp = qparams_from_range(0.0, 1e-42, "uint8")  # would underflow float32
    assert s > 0 and np.float32(s) == s and np.isfinite(np.float32(s)) and zp == 0


@pytest.mark.parametrize("dtype,bits,symmetric,narrow", [
    ("uint8", None, False, False), ("int8", None, False, False), ("int8", None, True, False),
    ("int8", 7, True, False), ("uint8", 7, False, False), ("int8", None, True, True),
    ("uint8", None, True, False), ("int4", None, False, False), ("uint4", None, False, False),
])
def test_qparams_zero_exact_and_range_covered(dtype, bits, symmetric, narrow):
    rng = np.random.default_rng(1)
    qmin, qmax = qrange(dtype, bits, narrow)
    for _ in range(200):
        lo, hi = sorted(rng.normal(scale=rng.uniform(0.01, 100), size=2))
        scale, zp = qparams_from_range(lo, hi, dtype, bits, symmetric, narrow)
        assert isinstance(scale, float) and isinstance(zp, int)
        assert scale > 0 and float(np.float32(scale)) == scale
        assert qmin <= zp <= qmax
        # zero quantizes to zp and dequantizes to exactly 0
        assert _fake_quant(np.zeros(1), scale, zp, qmin, qmax)[0] == 0.0
        # the representable interval covers the (zero-widened) range up to half a step
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        assert scale * (qmin - zp) <= lo0 + 0.5 * scale + 1e-9 * abs(lo0)
        assert scale * (qmax - zp) >= hi0 - 0.5 * scale - 1e-9 * abs(hi0)
        if symmetric:
            assert zp == (0 if dtype.startswith("int") else (qmin + qmax + 1) // 2)


def test_qparams_rejects_bad_range():
    with pytest.raises(OptionError):
        qparams_from_range(2.0, -1.0, "int8")
    with pytest.raises(OptionError):
        qparams_from_range(0.0, float("nan"), "int8")


# ------------------------------------------------------------------ MinMax
def test_minmax_global_over_batches_any_order():
    rng = np.random.default_rng(2)
    batches = [rng.normal(loc=rng.uniform(-3, 3), scale=rng.uniform(0.1, 4), size=(4, 7, 5))
               .astype(np.float32) for _ in range(30)]
    gmin = min(float(b.min()) for b in batches)
    gmax = max(float(b.max()) for b in batches)
    for order in (range(30), reversed(range(30)), rng.permutation(30)):
        obs = MinMaxObserver("t")
        for i in order:
            obs.update(batches[i])
        assert (obs.min, obs.max) == (gmin, gmax)
        assert obs.compute_range("int8") == (min(gmin, 0.0), max(gmax, 0.0))
        assert obs.count == 30 * 140


def test_minmax_ema():
    obs = MinMaxObserver("t", averaging="ema")
    obs.update(np.array([-1.0, 1.0], np.float32))
    obs.update(np.array([-11.0, 11.0], np.float32))
    lo, hi = obs.compute_range("int8")
    assert lo == pytest.approx(-2.0) and hi == pytest.approx(2.0)  # 0.9 * 1 + 0.1 * 11
    assert (obs.min, obs.max) == (-11.0, 11.0)
    with pytest.raises(OptionError):
        MinMaxObserver("t", averaging="median")


# ------------------------------------------------------------------ streaming, memory
@pytest.mark.parametrize("method", HIST_METHODS)
def test_streaming_equivalence(method):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_t(4, size=60000), rng.normal(2, 0.5, 20000)]).astype(np.float32)
    one = _fed(method, x, 1)
    ten = _fed(method, x, 10)
    shuffled = _fed(method, rng.permutation(x), 7)
    for symmetric in (False, True):
        r1 = one.compute_range("int8", symmetric=symmetric)
        for other in (ten, shuffled):
            r2 = other.compute_range("int8", symmetric=symmetric)
            tol = max(one.bin_width, other.bin_width)
            assert abs(r1[0] - r2[0]) <= tol and abs(r1[1] - r2[1]) <= tol
    # the power-of-two, zero-anchored grid makes the merged histogram identical, not just close
    e1, c1 = one.histogram()
    for other in (ten, shuffled):
        e2, c2 = other.histogram()
        np.testing.assert_array_equal(e1, e2)
        np.testing.assert_array_equal(c1, c2)
    assert int(c1.sum()) == x.size


@pytest.mark.parametrize("method", HIST_METHODS)
def test_memory_bounded(method):
    rng = np.random.default_rng(4)
    obs = make_observer(method, "t")
    obs.update(rng.normal(size=1000).astype(np.float32))
    size0, nbytes0 = obs.histogram()[1].size, obs.nbytes()
    for i in range(100):  # ever-growing range forces many re-binnings
        obs.update((rng.normal(size=500) * (1 + i) + i).astype(np.float32))
    counts = obs.histogram()[1]
    assert counts.size == size0 and obs.nbytes() == nbytes0
    assert int(counts.sum()) == obs.count == 1000 + 100 * 500
    edges = obs.histogram()[0]
    assert edges[0] <= obs.min and edges[-1] > obs.max


def test_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(5)
    x = rng.gamma(2.0, size=100000).astype(np.float32) - 1.0
    obs = _fed("percentile", x, 5, percentile=99.0)
    lo, hi = obs.compute_range("int8")
    assert abs(hi - np.percentile(x, 99.0)) <= obs.bin_width
    assert abs(lo - np.percentile(x, 1.0)) <= obs.bin_width
    t = obs.compute_range("int8", symmetric=True)[1]
    assert abs(t - np.percentile(np.abs(x), 99.0)) <= obs.bin_width


# ------------------------------------------------------------------ robustness to outliers
def test_percentile_ignores_outliers_minmax_does_not():
    rng = np.random.default_rng(6)
    x = rng.normal(size=100000).astype(np.float32)
    x[rng.choice(x.size, 5, replace=False)] = [500.0, -400.0, 450.0, 300.0, 350.0]
    p = _fed("percentile", x, 10)
    m = _fed("minmax", x, 10)
    lo, hi = p.compute_range("int8")
    assert 3.0 < hi < 10.0 and -10.0 < lo < -3.0
    assert m.compute_range("int8") == (-400.0, 500.0)
    assert p.compute_range("int8", symmetric=True)[1] < 10.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_beats_minmax_on_laplacian_with_outliers(symmetric):
    rng = np.random.default_rng(7)
    x = rng.laplace(size=100000).astype(np.float32)
    x[:20] = rng.uniform(30, 60, 20) * rng.choice([-1, 1], 20)
    mse, mm = _fed("mse", x, 10), _fed("minmax", x, 10)
    e_mse = _quant_mse(x, mse, symmetric=symmetric)
    e_mm = _quant_mse(x, mm, symmetric=symmetric)
    assert e_mse <= e_mm
    lo, hi = mse.compute_range("int8", symmetric=symmetric)
    assert hi < x.max()  # it did clip
    # and the chosen range is (near) optimal among scaled versions of itself
    for f in (0.7, 0.85, 1.2, 1.4):
        s, zp = qparams_from_range(lo * f, hi * f, "int8", symmetric=symmetric)
        e = float(np.mean((_fake_quant(x, s, zp, -128, 127) - x) ** 2))
        assert e_mse <= e * 1.05


def test_mse_on_heavy_tail_without_outliers_clips_well():
    rng = np.random.default_rng(8)
    x = rng.laplace(size=100000).astype(np.float32)
    mse, mm = _fed("mse", x), _fed("minmax", x)
    for bits in (8, 4):
        dt = "int8" if bits == 8 else "int4"
        assert _quant_mse(x, mse, dt, symmetric=True) < 0.9 * _quant_mse(x, mm, dt, symmetric=True)


def test_mse_uniform_keeps_full_range():
    rng = np.random.default_rng(9)
    x = rng.uniform(-1.0, 1.0, size=100000).astype(np.float32)
    obs = _fed("mse", x, 4)
    lo, hi = obs.compute_range("int8")
    assert lo <= 0.97 * x.min() and hi >= 0.97 * x.max()
    t = obs.compute_range("int8", symmetric=True)[1]
    assert t >= 0.97 * np.abs(x).max()
    u = _fed("mse", (x + 1.0) * 3.0)
    lo, hi = u.compute_range("uint8")
    assert lo == 0.0 and hi >= 0.97 * 6.0


def test_mse_search_is_fast():
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.laplace(size=50000), rng.normal(3, 1, 50000)]).astype(np.float32)
    obs = _fed("mse", x)
    assert obs.hist.bins == 2048
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        obs.compute_range("int8")  # two-sided asymmetric: the 2-D search, the slowest case
        best = min(best, time.perf_counter() - t0)
    assert best < 0.05


# ------------------------------------------------------------------ entropy
def _kl_reference(hist, m, eps=1e-4):
    """Straightforward per-threshold TensorRT/MXNet-style KL (loop, exact smoothing)."""
    from scipy.stats import entropy

    def smooth(p):
        p = p.astype(np.float64).copy()
        zeros = p == 0
        nz = p.size - zeros.sum()
        if nz == 0:
            return None
        eps1 = eps * zeros.sum() / nz
        p[zeros] += eps
        p[~zeros] -= eps1
        return p if (p > 0).all() else None

    out = []
    for i in range(m, hist.size + 1):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        nzmask = p != 0
        q = np.zeros(i)
        bnd = [(j * i + m - 1) // m for j in range(m + 1)]
        for j in range(m):
            a, b = bnd[j], bnd[j + 1]
            norm = nzmask[a:b].sum()
            if norm:
                q[a:b][nzmask[a:b]] = hist[a:b].sum() / norm
        ps, qs = smooth(p), smooth(q)
        out.append(np.inf if ps is None or qs is None else entropy(ps, qs))
    return np.array(out)


def test_kl_vectorised_matches_reference_loop():
    rng = np.random.default_rng(11)
    h = np.bincount(np.minimum(np.abs(rng.laplace(size=3000)) * 25, 299).astype(int), minlength=300)
    h[150:170] = 0  # gaps make smoothing matter
    h[-1] += 5
    for m in (16, 37):
        I, kl = _kl_divergences(h, m)
        ref = _kl_reference(h, m)
        np.testing.assert_array_equal(I, np.arange(m, h.size + 1))
        np.testing.assert_allclose(kl, ref, rtol=1e-6, atol=1e-9)
        assert int(np.argmin(kl)) == int(np.argmin(ref))


def test_entropy_clips_heavy_tail_and_stays_in_range():
    rng = np.random.default_rng(12)
    x = rng.standard_t(3, size=200000).astype(np.float32)
    ent = _fed("entropy", x, 8)
    lo, hi = ent.compute_range("int8", symmetric=True)
    amax = float(np.abs(x).max())
    assert 0.0 < hi < 0.5 * amax and lo == -hi
    lo, hi = ent.compute_range("int8")
    assert x.min() <= lo < 0.0 < hi <= x.max()
    relu = np.maximum(x, 0)
    er = _fed("entropy", relu, 3)
    lo, hi = er.compute_range("uint8")
    assert lo == 0.0 and 0.0 < hi <= relu.max()
    # fewer levels -> coarser rounding -> the divergence is minimised with more clipping
    t8 = ent.compute_range("int8", symmetric=True)[1]
    t4 = ent.compute_range("int4", symmetric=True)[1]
    assert t4 < t8
    # exact zeros (half of a Relu output) do not drag the threshold down: Relu(N(0,1)) at 8 bits
    # is clipped near the top of the positive half, like N(0,1) itself
    g = rng.normal(size=100000).astype(np.float32)
    tg = _fed("entropy", g).compute_range("int8", symmetric=True)[1]
    tr = _fed("entropy", np.maximum(g, 0)).compute_range("int8", symmetric=True)[1]
    assert tr > 0.8 * tg > 2.5


# ------------------------------------------------------------------ sign conventions
@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_non_negative_tensor_gets_exact_zero_lo(method):
    rng = np.random.default_rng(13)
    x = np.maximum(rng.normal(0.5, 1.0, size=50000), 0).astype(np.float32)
    obs = _fed(method, x, 5)
    for dtype, symmetric in (("uint8", False), ("int8", False), ("int8", True), ("uint8", True)):
        lo, hi = obs.compute_range(dtype, symmetric=symmetric)
        assert lo == 0.0 and 0.0 < hi <= x.max()
    assert obs.compute_qparams("uint8")[1] == 0
    # strictly positive data too (range widened to contain zero)
    pos = _fed(method, x + 2.0)
    assert pos.compute_range("uint8")[0] == 0.0


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_all_zero_and_non_positive_tensors(method):
    z = _fed(method, np.zeros((3, 4), np.float32))
    assert z.compute_range("int8") == (0.0, 0.0)
    assert z.compute_qparams("uint8") == (1.0, 0)
    neg = _fed(method, -np.abs(np.random.default_rng(14).normal(size=5000)).astype(np.float32))
    lo, hi = neg.compute_range("int8")
    assert hi == 0.0 and lo < 0.0
    assert neg.compute_qparams("uint8")[1] == 255


# ------------------------------------------------------------------ errors, state
@pytest.mark.parametrize("method", sorted(OBSERVERS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_raises_data_error(method, bad):
    obs = make_observer(method, "conv1_out")
    obs.update(np.ones(4, np.float32))
    x = np.ones((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(DataError) as ei:
        obs.update(x)
    msg = str(ei.value)
    assert "conv1_out" in msg and "check the calibration data / model" in msg
    assert obs.count == 4  # the bad batch was not absorbed


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_compute_before_update_raises(method):
    obs = make_observer(method, "relu_7")
    with pytest.raises(DataError, match="relu_7"):
        obs.compute_range("int8")
    obs.update(np.zeros(0, np.float32))  # an empty batch is not data
    with pytest.raises(DataError, match="no calibration data"):
        obs.compute_qparams("uint8")


def test_unknown_method_and_option():
    with pytest.raises(OptionError) as ei:
        make_observer("kl", "t")
    for name in ("minmax", "percentile", "mse", "entropy"):
        assert name in str(ei.value)
    with pytest.raises(OptionError, match="percentile"):
        make_observer("mse", "t", percentile=99.9)
    with pytest.raises(OptionError):
        PercentileObserver("t", percentile=120.0)
    with pytest.raises(DataError):
        MinMaxObserver("t").update(np.array(["a", "b"]))
    assert isinstance(make_observer("MSE", "t"), MSEObserver)
    assert isinstance(make_observer("entropy", "t"), EntropyObserver)
    assert OBSERVERS["percentile"] is PercentileObserver


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_state_is_json_and_records_the_choice(method):
    obs = make_observer(method, "t")
    assert json.loads(json.dumps(obs.state()))["min"] is None
    obs.update(np.linspace(-1, 3, 1000, dtype=np.float32))
    lo, hi = obs.compute_range("int8", bits=7, symmetric=True)
    st = json.loads(json.dumps(obs.state()))
    assert st["method"] == method and st["count"] == 1000 and st["min"] == -1.0 and st["max"] == 3.0
    assert st["range"]["lo"] == lo and st["range"]["hi"] == hi and st["range"]["bits"] == 7
