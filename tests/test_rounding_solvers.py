"""Layer-wise rounding solvers (AdaRound, AdaQuant, FlexRound, GPTQ) on small checkable problems."""
from __future__ import annotations

import numpy as np
import pytest

from hago_py.errors import DataError, OptionError
from hago_py.quant.rounding import ROUNDERS, SOLVERS, get_rounder, get_solver
from hago_py.quant.rounding.adaquant import bias_correction, bn_reestimate
from hago_py.quant.rounding.problem import LayerProblem, dequant, loss, nearest, row_losses

ITERATIVE = ("adaround", "adaquant", "flexround")
METHODS = ("nearest",) + ITERATIVE + ("gptq",)
FAST = {"adaround": {"iterations": 300}, "adaquant": {"iterations": 200}, "flexround": {"iterations": 200},
        "gptq": {}, "nearest": {}}


def _data(g=1, k=24, n=400, corr=0.9, seed=0, xq_bits=6):
    """Correlated, ReLU-like inputs x and their quantized version x~, shape (G, n, K)."""
    rng = np.random.default_rng(seed)
    idx = np.arange(k)
    cov = corr ** np.abs(idx[:, None] - idx[None, :])
    x = rng.standard_normal((g, n, k)) @ np.linalg.cholesky(cov).T
    x = np.maximum(x + 0.3, 0.0)
    if xq_bits:
        step = x.max() / (2 ** xq_bits - 1)
        xt = np.clip(np.rint(x / step), 0, 2 ** xq_bits - 1) * step
    else:
        xt = x.copy()
    return x, xt


def _problem(g=1, nout=12, k=24, n=400, bits=4, per_channel=True, bias=True, seed=0, corr=0.9, xq_bits=6,
             signed=True, name="conv1"):
    rng = np.random.default_rng(seed + 100)
    x, xt = _data(g, k, n, corr, seed, xq_bits)
    w = (rng.standard_normal((g, nout, k)) / np.sqrt(k)).astype(np.float32)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = np.abs(w).max(axis=2) if per_channel else np.full((g, nout), np.abs(w).max())
        scale = (amax / qmax).astype(np.float32)
        zp = np.zeros((g, nout), np.int64)
    else:                                   # asymmetric unsigned, non-zero zero point
        qmin, qmax = 0, 2 ** bits - 1
        lo = np.minimum(w.min(axis=2), 0) if per_channel else np.full((g, nout), min(w.min(), 0))
        hi = np.maximum(w.max(axis=2), 0) if per_channel else np.full((g, nout), max(w.max(), 0))
        scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)
    b = (rng.standard_normal((g, nout)) * 0.1).astype(np.float32) if bias else None
    prob = LayerProblem(w=w, h=np.einsum("gri,grj->gij", xt, xt), c=np.einsum("gri,grj->gij", xt, x),
                        g=np.einsum("gri,grj->gij", x, x), m_q=xt.sum(1), m=x.sum(1), n=n, scale=scale,
                        zero_point=zp, qmin=qmin, qmax=qmax, per_channel=per_channel, bias=b, name=name)
    return prob, x, xt


def _direct_loss(p, x, xt, w_hat, b_hat=None):
    b = np.zeros(p.scale.shape) if p.bias is None else p.bias.astype(np.float64)
    bh = b if b_hat is None else np.asarray(b_hat, np.float64)
    y = np.einsum("gnk,grk->grn", p.w.astype(np.float64), x) + b[:, None, :]
    yq = np.einsum("gnk,grk->grn", np.asarray(w_hat, np.float64), xt) + bh[:, None, :]
    return float(((yq - y) ** 2).sum())


# ------------------------------------------------------------------------------------------------
# the loss from statistics
# ------------------------------------------------------------------------------------------------
def test_loss_from_statistics_matches_direct_computation():
    p, x, xt = _problem(g=2, nout=5, k=7, n=60, bits=4)
    w_hat = dequant(nearest(p), p.scale, p.zero_point)
    b_hat = p.bias + np.float32(0.05)
    for bh in (None, b_hat):
        direct = _direct_loss(p, x, xt, w_hat, bh)
        assert loss(p, w_hat, bh) == pytest.approx(direct, rel=1e-9)
        assert row_losses(p, w_hat, bh).sum() == pytest.approx(direct, rel=1e-9)
    energy = float((np.einsum("gnk,grk->grn", p.w.astype(np.float64), x) ** 2).sum())
    assert loss(p, w_hat, relative=True) == pytest.approx(_direct_loss(p, x, xt, w_hat) / energy, rel=1e-9)


def test_nearest_solver_matches_nearest_rounder():
    p, _, _ = _problem(per_channel=True)
    res = get_solver("nearest")(p)
    w2 = p.w[0]
    q = ROUNDERS["nearest"](w2, p.scale[0], p.zero_point[0], p.qmin, p.qmax, axis=0)
    np.testing.assert_array_equal(res.q[0], q)
    assert res.info["loss"] == res.info["loss_nearest"]
    assert get_rounder("nearest") is ROUNDERS["nearest"]


# ------------------------------------------------------------------------------------------------
# every solver: valid, never worse than nearest, deterministic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits,per_channel,signed", [(4, True, True), (8, False, True), (4, False, False)])
def test_never_worse_than_nearest_and_in_range(method, bits, per_channel, signed):
    p, x, xt = _problem(bits=bits, per_channel=per_channel, signed=signed, seed=bits)
    res = SOLVERS[method](p, **FAST[method])
    assert res.q.dtype == np.int64 and res.q.shape == p.w.shape
    assert res.q.min() >= p.qmin and res.q.max() <= p.qmax
    assert res.scale.dtype == np.float32 and res.scale.shape == p.scale.shape and np.all(res.scale > 0)
    assert res.bias is not None and res.bias.shape == p.scale.shape
    info = res.info
    for key in ("method", "loss_nearest", "loss", "iterations", "seconds"):
        assert key in info
    assert info["method"] == method
    assert info["loss"] <= info["loss_nearest"]
    # the reported relative loss is the exact loss of what is returned
    w_hat = dequant(res.q, res.scale, p.zero_point)
    energy = float((np.einsum("gnk,grk->grn", p.w.astype(np.float64), x) ** 2).sum())
    assert info["loss"] == pytest.approx(_direct_loss(p, x, xt, w_hat, res.bias) / energy, rel=1e-6, abs=1e-12)
    if not per_channel:
        assert np.all(res.scale == res.scale.reshape(-1)[0])


@pytest.mark.parametrize("method", ITERATIVE + ("gptq",))
def test_improves_on_correlated_inputs(method):
    p, _, _ = _problem(nout=16, k=32, bits=4, seed=3)
    info = SOLVERS[method](p, **FAST[method]).info
    assert info["loss"] < 0.7 * info["loss_nearest"], info


def test_adaround_4bit_clearly_better_than_nearest():
    p, _, _ = _problem(nout=16, k=32, bits=4, seed=5, corr=0.95)
    res = SOLVERS["adaround"](p, iterations=400)
    assert res.info["loss"] < 0.5 * res.info["loss_nearest"], res.info
    assert res.info["saturated_fraction"] > 0.95
    np.testing.assert_array_equal(res.scale, p.scale)      # AdaRound never changes the scale
    np.testing.assert_array_equal(res.bias, p.bias)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_bytes(method):
    p, _, _ = _problem(seed=7)
    a = SOLVERS[method](p, seed=3, **FAST[method])
    b = SOLVERS[method](p, seed=3, **FAST[method])
    assert a.q.tobytes() == b.q.tobytes()
    assert a.scale.tobytes() == b.scale.tobytes()
    assert a.bias.tobytes() == b.bias.tobytes()
    assert a.info["loss"] == b.info["loss"]


@pytest.mark.parametrize("method", METHODS)
def test_grouped_problem(method):
    p, _, _ = _problem(g=6, nout=2, k=9, n=120, bits=4, seed=11)
    res = SOLVERS[method](p, **FAST[method])
    assert res.q.shape == (6, 2, 9) and res.scale.shape == (6, 2)
    assert res.q.min() >= p.qmin and res.q.max() <= p.qmax
    assert res.info["loss"] <= res.info["loss_nearest"]


@pytest.mark.parametrize("method", ["adaquant", "flexround"])
def test_per_tensor_learned_scale_stays_shared(method):
    p, _, _ = _problem(g=2, nout=6, k=16, bits=4, per_channel=False, seed=2)
    res = SOLVERS[method](p, **FAST[method])
    assert np.unique(res.scale).size == 1
    assert res.info["fallback"] in ("none", "nearest")       # a shared scale is never mixed row by row


def test_per_channel_scales_are_learned_per_channel():
    p, _, _ = _problem(nout=8, k=16, bits=4, per_channel=True, seed=4)
    res = SOLVERS["flexround"](p, iterations=200)
    assert np.unique(res.scale).size > 1


@pytest.mark.parametrize("method,params", [("flexround", {"use_s4": True}), ("adaquant", {"learn_scale": False}),
                                           ("gptq", {"act_order": False, "asymmetric": False})])
def test_solver_options(method, params):
    p, _, _ = _problem(g=2, nout=6, k=12, seed=13)
    res = SOLVERS[method](p, **params, **({"iterations": 100} if method != "gptq" else {}))
    assert res.info["loss"] <= res.info["loss_nearest"]
    if params.get("learn_scale") is False:
        np.testing.assert_array_equal(res.scale, p.scale)


def test_adaquant_without_bias_keeps_no_bias():
    p, _, _ = _problem(bias=False, seed=9)
    res = SOLVERS["adaquant"](p, iterations=100)
    assert res.bias is None
    res2 = SOLVERS["adaquant"](p, iterations=100, tune_bias=True)
    assert res2.bias is not None and res2.info["loss"] <= res.info["loss_nearest"]


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_equals_nearest_for_isotropic_inputs(act_order):
    rng = np.random.default_rng(0)
    g, nout, k = 2, 10, 16
    w = (rng.standard_normal((g, nout, k)) * 0.3).astype(np.float32)
    scale = (np.abs(w).max(axis=2) / 7).astype(np.float32)
    w[0, 0, :4] = scale[0, 0] * np.array([0.5, 1.5, -2.5, 3.5], np.float32)   # exact ties
    h = np.broadcast_to(np.eye(k) * 37.0, (g, k, k)).copy()
    p = LayerProblem(w=w, h=h, c=h.copy(), g=h.copy(), m_q=np.zeros((g, k)), m=np.zeros((g, k)), n=100,
                     scale=scale, zero_point=np.zeros((g, nout), np.int64), qmin=-8, qmax=7, per_channel=True,
                     name="fc")
    res = SOLVERS["gptq"](p, act_order=act_order)
    np.testing.assert_array_equal(res.q, nearest(p))
    assert res.info["fallback"] == "none"


def test_gptq_handles_dead_inputs_and_singular_h():
    p, x, xt = _problem(nout=8, k=12, n=200, seed=1)
    xt[..., 3] = 0.0                                  # a dead quantized input
    xt[..., 5] = xt[..., 4]                           # two identical inputs: H singular
    x[..., 5] = x[..., 4]
    p.h = np.einsum("gri,grj->gij", xt, xt)
    p.c = np.einsum("gri,grj->gij", xt, x)
    p.g = np.einsum("gri,grj->gij", x, x)
    p.m_q, p.m = xt.sum(1), x.sum(1)
    res = SOLVERS["gptq"](p)
    assert res.info["dead_inputs"] == 1
    assert res.info["loss"] <= res.info["loss_nearest"]
    np.testing.assert_array_equal(res.q[..., 3], nearest(p)[..., 3])


# ------------------------------------------------------------------------------------------------
# fallback
# ------------------------------------------------------------------------------------------------
def test_fallback_to_nearest_is_reported():
    from hago_py.quant.rounding.problem import finish

    p, _, _ = _problem(seed=6)
    bad = np.clip(nearest(p) + 1, p.qmin, p.qmax)
    res = finish(p, "test", bad, p.scale, p.bias, {"iterations": 0}, 0.0)
    assert res.info["fallback"] in ("rows", "nearest") and res.info["fallback_rows"] > 0
    assert "nearest" in res.info["note"]
    assert res.info["loss"] <= res.info["loss_nearest"]
    # a shared learned scale can only fall back as a whole
    p2, _, _ = _problem(seed=6, per_channel=False)
    res2 = finish(p2, "test", nearest(p2), p2.scale * np.float32(3.0), p2.bias, {}, 0.0, separable=False)
    assert res2.info["fallback"] == "nearest"
    np.testing.assert_array_equal(res2.q, nearest(p2))
    np.testing.assert_array_equal(res2.scale, p2.scale)


# ------------------------------------------------------------------------------------------------
# bias correction and BN re-estimation
# ------------------------------------------------------------------------------------------------
def test_bias_correction_removes_mean_error():
    p, x, xt = _problem(g=2, nout=6, k=10, n=300, seed=8)
    q = nearest(p)
    b = bias_correction(p, q, p.scale)
    w_hat = dequant(q, p.scale, p.zero_point).astype(np.float64)
    y = np.einsum("gnk,grk->grn", p.w.astype(np.float64), x) + p.bias[:, None, :]
    yq = np.einsum("gnk,grk->grn", w_hat, xt) + b[:, None, :].astype(np.float64)
    err = (yq - y).mean(axis=1)
    before = (np.einsum("gnk,grk->grn", w_hat, xt) + p.bias[:, None, :] - y).mean(axis=1)
    assert np.abs(before).max() > 1e-3
    assert np.abs(err).max() < 1e-6 * max(1.0, np.abs(y).max())
    # it is the loss-optimal bias: never worse
    assert loss(p, w_hat, b) <= loss(p, w_hat) + 1e-9


@pytest.mark.parametrize("per_channel", [True, False])
def test_bn_reestimate_matches_mean_and_variance(per_channel):
    p, x, xt = _problem(nout=6, k=10, n=300, seed=12, per_channel=per_channel, bits=3)
    q = nearest(p)
    s, b = bn_reestimate(p, q, p.scale, p.bias)
    assert s.dtype == np.float32 and b.dtype == np.float32
    y = np.einsum("gnk,grk->grn", p.w.astype(np.float64), x) + p.bias[:, None, :]
    w_hat = dequant(q, s, p.zero_point).astype(np.float64)
    yq = np.einsum("gnk,grk->grn", w_hat, xt) + b[:, None, :].astype(np.float64)
    tol = 1e-5 * np.abs(y).max()
    np.testing.assert_allclose(yq.mean(axis=1), y.mean(axis=1), atol=tol)
    if per_channel:
        np.testing.assert_allclose(yq.std(axis=1), y.std(axis=1), rtol=1e-5)
        assert not np.array_equal(s, p.scale)
    else:
        np.testing.assert_array_equal(s, p.scale)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_too_few_rows_is_a_data_error_naming_the_layer():
    p, _, _ = _problem(k=24, n=10, name="block3.conv2")
    for method in ITERATIVE + ("gptq",):
        with pytest.raises(DataError, match=r"block3\.conv2.*K=24.*n=10.*at least K rows"):
            SOLVERS[method](p)
    # nearest rounding, bias correction and BN re-estimation only need the means / second moments
    res = SOLVERS["nearest"](p, iterations=5)
    bias_correction(p, res.q, res.scale)
    bn_reestimate(p, res.q, res.scale, p.bias)


@pytest.mark.parametrize("field", ["h", "c", "m_q"])
def test_non_finite_statistics(field):
    p, _, _ = _problem(name="fc7")
    arr = getattr(p, field).copy()
    arr.reshape(-1)[0] = np.nan
    setattr(p, field, arr)
    with pytest.raises(DataError, match=rf"fc7.*'{field}'.*NaN"):
        SOLVERS["gptq"](p)


def test_bad_qparams_and_options():
    p, _, _ = _problem(name="fc8")
    p.scale = p.scale.copy()
    p.scale[0, 0] = 0.0
    with pytest.raises(OptionError, match="fc8.*scales"):
        SOLVERS["flexround"](p)
    p2, _, _ = _problem(name="fc9", per_channel=True)
    p2.per_channel = False
    with pytest.raises(OptionError, match="fc9.*per-tensor"):
        SOLVERS["adaquant"](p2)
    p3, _, _ = _problem(name="fc10")
    with pytest.raises(OptionError, match="fc10.*unknown adaround parameter.*bogus.*valid:"):
        SOLVERS["adaround"](p3, bogus=1)
    with pytest.raises(OptionError, match="fc10.*iterations"):
        SOLVERS["adaround"](p3, iterations=0)
    with pytest.raises(OptionError, match="adaround.*flexround.*gptq"):
        get_solver("brecq")
    p4, _, _ = _problem(name="fc11")
    p4.h = p4.h[:, :-1]
    with pytest.raises(DataError, match="fc11.*'h'"):
        SOLVERS["gptq"](p4)
