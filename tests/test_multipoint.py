"""weight_scheme="multipoint": each output channel a sum of low-bit points (greedy), the point count per channel
from its output error under a budget, realized as extra rows of the integer kernel summed after it."""
from collections import Counter

import numpy as np
import pytest
from onnx import helper, numpy_helper

import hago_py
from hago_py.errors import OptionError
from hago_py.quant.artifact import optimized_graph
from hago_py.quant import multipoint as mpmod
from hago_py.quant.multipoint import (LayerCandidate, allocate, channel_major, combine_plan, from_channel_major,
                                      greedy_points, refit_coefficients, row_layout, rows_from_scales)

from models import calib, checked_model, run, small_cnn, sqnr

FAST = dict(measure_latency=False)


def _i(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_greedy_error_never_grows_and_rows_rebuild_from_scales(bits):
    rng = np.random.default_rng(bits)
    w = rng.laplace(0, 0.2, (12, 40))
    imp = rng.uniform(0.1, 2.0, (1, 40))
    qmin, qmax = -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    A, Q, E = greedy_points(w, imp, qmin, qmax, 4)
    assert np.all(np.diff(E, axis=1) <= 1e-12 * E[:, :1])           # monotone in the point count
    assert np.all(E[:, 2] < E[:, 1])                                  # a second point really helps
    for k in range(1, 5):
        approx = (A[k - 1][:, :, None] * Q[k - 1]).sum(axis=1)
        assert np.allclose(((w - approx) ** 2 * imp).sum(1), E[:, k])  # E is the error of (A, Q)
        assert Q[k - 1].min() >= qmin and Q[k - 1].max() <= qmax
        parent = [c for c in range(12) for _ in range(k)]
        scales = [float(np.float32(A[k - 1][c, i])) for c in range(12) for i in range(k)]
        rows = rows_from_scales(w, scales, parent, qmin, qmax)
        assert np.array_equal(rows.reshape(12, k, 40), Q[k - 1])      # the plan's scales reproduce the points


def test_allocation_respects_budget_and_groups():
    rng = np.random.default_rng(0)
    def cand(node, c, grouped=False, cost=1.0):
        e = np.sort(rng.uniform(0, 1, (c, 4)), axis=1)[:, ::-1]
        return LayerCandidate(node, np.concatenate([e[:, :1] * 2, e], 1), cost, grouped)
    cands = [cand("a", 16), cand("b", 32), cand("dw", 8, grouped=True)]
    pts = allocate(cands, budget=0.25 * 56, max_points=3)
    assert sum(int(p.sum()) for p in pts.values()) <= 56 * 1.25
    assert len(set(pts["dw"].tolist())) == 1                         # grouped: one count for the layer
    assert all(p.min() >= 1 and p.max() <= 3 for p in pts.values())
    # greedy by gain per cost: the largest single gain is taken first
    best = max((c.err[i, 1] - c.err[i, 2], c.node, i) for c in cands[:2] for i in range(c.err.shape[0]))
    assert pts[best[1]][best[2]] >= 2


def test_row_layout_and_combine_cover_every_point():
    points = [1, 3, 2, 1]
    parent, index = row_layout(points)
    assert parent[:4] == [0, 1, 2, 3] and sorted(zip(parent, index)) == sorted(
        (c, i) for c, p in enumerate(points) for i in range(p))
    comb = combine_plan(points)
    assert comb["mask"][0] is None and comb["mask"][1] == [0, 1, 1, 0] and comb["mask"][2] == [0, 1, 0, 0]
    gparent, gindex = row_layout([2] * 6, group=3)                    # grouped: each group's rows together
    assert gparent == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]


def _single(op: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if op == "Conv":
        w, b = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.1, 8).astype(np.float32)
        node = helper.make_node("Conv", ["input", "w", "b"], ["output"], name="layer", pads=[1, 1, 1, 1])
        return checked_model([node], [_i("w", w), _i("b", b)], "one_conv", ["N", 3, 8, 8], ["N", 8, 8, 8])
    w, b = rng.normal(0, 0.3, (6, 24)).astype(np.float32), rng.normal(0, 0.1, 6).astype(np.float32)
    node = helper.make_node("Gemm", ["input", "w", "b"], ["output"], name="layer", transB=1)
    return checked_model([node], [_i("w", w), _i("b", b)], "one_gemm", ["N", 24], ["N", 6])


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
@pytest.mark.parametrize("kernel", ["accumulate", "requantize"])
def test_widened_layer_equals_the_multipoint_sum(op, kernel):
    model = _single(op)
    shape = (3, 8, 8) if op == "Conv" else (24,)
    res = hago_py.quantize(model, calib(shape=shape), weight_scheme="multipoint", weight_bits=4,
                           multipoint_points=1.6, max_points=3, multipoint_kernel=kernel, **FAST)
    lp = res.plan.layers["layer"]
    mp = lp.weight.multipoint
    assert len(lp.weight.scale) == mp["rows"] > len(mp["points"])     # really widened
    assert mp["rows"] <= 1.6 * len(mp["points"]) and max(mp["points"]) <= 3
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w")).astype(np.float64)
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    parent, _ = row_layout(mp["points"])
    rows = rows_from_scales(channel_major(w, 0), lp.weight.scale, parent, -7, 7)
    w_eff = np.zeros_like(channel_major(w, 0))
    for r, c in enumerate(parent):
        w_eff[c] += np.float32(lp.weight.scale[r]) * rows[r]
    w_eff = from_channel_major(w_eff, w.shape, 0).astype(np.float32)
    x = calib(seed=5, n=4, shape=shape)["input"]
    xt = res.plan.resolve("input")
    s, z = xt.scale[0], xt.zero_point[0]
    xdq = ((np.clip(np.rint(x / s) + z, 0, 255) - z) * s).astype(np.float32)
    ref_model = _single(op)
    for t in ref_model.graph.initializer:
        if t.name == "w":
            t.CopyFrom(_i("w", w_eff))
    ref = run(ref_model, {"input": xdq})[0]
    got = run(res.model, {"input": x})[0]
    if kernel == "accumulate":
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    else:  # each of a channel's rows is rounded once to the widened output's grid
        assert np.abs(got - ref).max() <= max(mp["points"]) * mp["out_scale"] / 2 + 1e-5


def test_widened_layers_run_on_integer_kernels():
    data = calib()
    q = hago_py.quantize(small_cnn(), data, weight_scheme="multipoint", weight_bits=8, multipoint_points=1.5,
                         multipoint_kernel="requantize", **FAST)
    assert any(lp.weight.multipoint["rows"] > len(lp.weight.multipoint["points"])
               for lp in q.plan.quantized_layers() if lp.op_type == "Conv")
    ops = Counter(n.op_type for n in optimized_graph(q.model).graph.node)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0 and ops["FusedConv"] == 0
    bias_dqs = [n for n in q.model.graph.node if n.name.endswith("/bias_dq")]
    assert bias_dqs and all(len(n.input) == 2 for n in bias_dqs)  # widened rows too: no all-zero int32 zero point
    a = hago_py.quantize(small_cnn(), data, weight_scheme="multipoint", weight_bits=4, multipoint_points=1.5, **FAST)
    ops = Counter(n.op_type for n in optimized_graph(a.model).graph.node)
    widened = sum(lp.weight.multipoint["rows"] > len(lp.weight.multipoint["points"])
                  for lp in a.plan.quantized_layers() if lp.op_type == "Conv")
    assert widened and ops["ConvInteger"] == widened and ops["Conv"] + ops["FusedConv"] == 0
    ref = run(small_cnn(), data)[0]
    assert np.corrcoef(run(a.model, data)[0].ravel(), ref.ravel())[0, 1] > 0.98


def test_points_follow_the_budget_and_report():
    res = hago_py.quantize(small_cnn(), calib(), weight_scheme="multipoint", weight_bits=4, **FAST)
    mps = [lp.weight.multipoint for lp in res.plan.quantized_layers() if lp.weight is not None]
    rows, chans = sum(m["rows"] for m in mps), sum(len(m["points"]) for m in mps)
    assert chans < rows <= 1.25 * chans
    few = hago_py.quantize(small_cnn(), calib(), weight_scheme="multipoint", weight_bits=4, complexity_budget=0.0,
                           **FAST)
    assert all(max(lp.weight.multipoint["points"]) == 1 for lp in few.plan.quantized_layers() if lp.weight)
    cells = [l["weight"] for l in res.report["layers"] if l["weight"]]
    assert all("multipoint W4" in c and "points/ch" in c for c in cells)
    assert res.report["multipoint"]["points_per_channel"] == pytest.approx(rows / chans)
    assert res.report["multipoint"]["extra_macs_fraction"] > 0


def test_multipoint_option_errors():
    with pytest.raises(OptionError, match="rounding='nearest'"):
        hago_py.quantize(small_cnn(), calib(), weight_scheme="multipoint", weight_bits=4, rounding="adaround", **FAST)
    with pytest.raises(OptionError, match="weight_bits=16"):
        hago_py.quantize(small_cnn(), calib(), weight_scheme="multipoint", weight_bits=16, **FAST)
    with pytest.raises(OptionError, match="multipoint_kernel"):
        hago_py.quantize(small_cnn(), calib(), weight_scheme="multipoint", multipoint_kernel="fast", **FAST)


def test_greedy_with_covariance_reports_the_true_output_error():
    rng = np.random.default_rng(3)
    w = rng.laplace(0, 0.2, (6, 20))
    x = rng.normal(0, 1, (500, 20)) @ rng.normal(0, 0.5, (20, 20))   # correlated inputs
    H = x.T @ x / len(x)
    A, Q, E = greedy_points(w, np.diag(H)[None], -7, 7, 3, H=H)
    for k in range(1, 4):
        d = w - (A[k - 1][:, :, None] * Q[k - 1]).sum(axis=1)
        assert np.allclose(np.einsum("ck,kl,cl->c", d, H, d), E[:, k])
    assert np.all(E[:, 2] < E[:, 1]) and np.all(E[:, 1] < E[:, 0])


def test_activation_points_spend_the_mac_budget_and_help():
    data = calib()
    ref = run(small_cnn(), data)[0]
    kw = dict(weight_scheme="multipoint", weight_bits=4, activation_bits=4, simulate=True, **FAST)
    none = hago_py.quantize(small_cnn(), data, complexity_budget=0.0, **kw)
    big = hago_py.quantize(small_cnn(), data, complexity_budget=2.0, **kw)
    acts = [lp.weight.multipoint.get("act_points") for lp in big.plan.quantized_layers() if lp.weight is not None]
    assert any(a and max(a) == 2 for a in acts)
    assert not any(lp.weight.multipoint.get("act_points") for lp in none.plan.quantized_layers() if lp.weight)
    assert big.report["multipoint"]["extra_macs_fraction"] <= 2.0 + 1e-9
    assert sqnr(ref, run(big.model, data)[0]) > sqnr(ref, run(none.model, data)[0]) + 3.0
    lp = next(lp for lp in big.plan.quantized_layers() if lp.weight is not None and lp.weight.multipoint.get("act_points"))
    assert lp.simulated and any("multipoint activations" in n for n in lp.notes)


def test_front_is_non_dominated_and_plotted(tmp_path):
    data = calib()
    res = hago_py.multipoint_front(small_cnn(), data, budgets=[0.0, 0.5, 2.0], weight_bits=4, activation_bits=4,
                                   simulate=True, plot=tmp_path / "front.png")
    pts = res["points"]
    assert [p["complexity_budget"] for p in pts] == [0.0, 0.5, 2.0] and len(res["models"]) == 3
    assert all(p["extra_macs_fraction"] <= p["complexity_budget"] + 1e-9 for p in pts)
    front = [pts[i] for i in res["front"]]
    for p in pts:  # nothing on the front is beaten on both axes by another point
        for f in front:
            assert not (p["extra_macs_fraction"] < f["extra_macs_fraction"] - 1e-12 and p["metric"] > f["metric"] + 1e-12)
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OptionError, match="budgets"):
        hago_py.multipoint_front(small_cnn(), data, budgets=[-1.0])


def test_lapq_fits_ranges_to_the_multipoint_model():
    """clipping='lapq' with multipoint runs once the points are chosen (on the widened model, two-point inputs fed
    with the candidate qparams), and the residual grid of each activation point follows its input's new scale."""
    from test_lapq import batches, outlier_cnn

    data = {"input": np.concatenate([b["input"] for b in batches(n=64)])}
    ref = run(outlier_cnn(), data)[0]
    kw = dict(weight_scheme="multipoint", weight_bits=4, activation_bits=4, simulate=True, complexity_budget=0.5,
              **FAST)
    mse = hago_py.quantize(outlier_cnn(), data, **kw)
    lq = hago_py.quantize(outlier_cnn(), data, clipping="lapq", **kw)
    info = lq.report["lapq"]
    assert info["chosen"] != "plan" and info["final_loss"] < info["initial_loss"]
    with_points = [lp for lp in lq.plan.quantized_layers() if lp.weight.multipoint.get("act_points")]
    assert with_points
    for lp in with_points:
        mp, s = lp.weight.multipoint, lq.plan.resolve(lp.inputs[0]).scale[0]
        assert mp["act_scale2"] == pytest.approx(s / 16)
        assert mp["act_range2"][1] - mp["act_range2"][0] == pytest.approx(15 * s / 16)
    assert sqnr(ref, run(lq.model, data)[0]) > sqnr(ref, run(mse.model, data)[0])


@pytest.mark.parametrize("full", [False, True])
def test_joint_refit_never_increases_the_error_and_rows_rebuild_from_scales(full):
    """refit_coefficients: the k coefficients of a channel refitted jointly (least squares under the input
    covariance), the points re-derived by the sequential residual rounding: per channel never a larger weighted
    error than the greedy's, the error it reports is that of (A, Q), and the plan's scales still rebuild the rows."""
    rng = np.random.default_rng(7)
    c, k = 16, 36
    w = rng.laplace(0, 0.2, (c, k))
    x = np.maximum(rng.normal(0, 1, (800, k)) @ rng.normal(0, 0.4, (k, k)), 0)   # correlated, non-zero mean
    H = x.T @ x / len(x)
    imp = np.diag(H)[None]

    def err(d):
        return np.einsum("ck,kl,cl->c", d, H, d) if full else (imp * d * d).sum(1)

    A0, Q0, E0 = greedy_points(w, imp, -7, 7, 3, H=H if full else None, refit=0)
    improved = 0
    for kk in range(1, 4):
        A, Q, E = refit_coefficients(w, A0[kk - 1], Q0[kk - 1], E0[:, kk], -7, 7, imp=imp, H=H if full else None)
        assert np.all(E <= E0[:, kk])                                     # never worse, channel by channel
        improved += int(np.sum(E < E0[:, kk] * (1 - 1e-9)))
        assert np.allclose(err(w - (A[:, :, None] * Q).sum(1)), E)        # E is the error of (A, Q)
        assert np.all(A > 0) and np.array_equal(A, A.astype(np.float32).astype(np.float64))
        assert Q.min() >= -7 and Q.max() <= 7
        parent = [ch for ch in range(c) for _ in range(kk)]
        rows = rows_from_scales(w, [float(a) for a in A.ravel()], parent, -7, 7)
        assert np.array_equal(rows.reshape(c, kk, k), Q)                  # the scales rebuild the points
    assert improved > 0                                                   # and it does find better coefficients
    A, Q, E = greedy_points(w, imp, -7, 7, 3, H=H if full else None)    # greedy_points refits by default
    assert np.all(E[:, 1] <= E0[:, 1]) and np.all(E[:, 1:].sum(0) <= E0[:, 1:].sum(0))
    if not full:
        assert np.all(np.diff(E, axis=1) <= 1e-12 * E[:, :1])           # still monotone in the point count


def _offset_gemm():
    rng = np.random.default_rng(2)
    w, b = rng.normal(0, 0.3, (16, 32)).astype(np.float32), rng.normal(0, 0.1, 16).astype(np.float32)
    node = helper.make_node("Gemm", ["input", "w", "b"], ["output"], name="layer", transB=1)
    return checked_model([node], [_i("w", w), _i("b", b)], "offset_gemm", ["N", 32], ["N", 16])


def test_bias_correction_fits_points_to_the_centred_input(monkeypatch):
    """With bias_correction=True the mean output error goes to the bias, so the points are fitted under the centred
    covariance H - m m^T: on inputs with a large mean that beats fitting them under E[x x^T] with the same bias
    correction, and the widened layer still equals the float layer with the multipoint weights and that bias."""
    rng = np.random.default_rng(4)
    data = {"input": (rng.normal(0, 1, (256, 32)) @ rng.normal(0, 0.3, (32, 32)) + 3.0).astype(np.float32)}
    ref = run(_offset_gemm(), data)[0]
    kw = dict(weight_scheme="multipoint", weight_bits=3, multipoint_points=1.25, bias_correction=True, **FAST)
    centred = hago_py.quantize(_offset_gemm(), data, **kw)
    monkeypatch.setattr(mpmod, "CENTRED_WITH_BIAS_CORRECTION", False)
    plain = hago_py.quantize(_offset_gemm(), data, **kw)
    assert sqnr(ref, run(centred.model, data)[0]) > sqnr(ref, run(plain.model, data)[0]) + 0.2
    lp = centred.plan.layers["layer"]
    w = numpy_helper.to_array(next(t for t in _offset_gemm().graph.initializer if t.name == "w")).astype(np.float64)
    parent, _ = row_layout(lp.weight.multipoint["points"])
    rows = rows_from_scales(w, lp.weight.scale, parent, -3, 3)
    w_eff = np.zeros_like(w)
    np.add.at(w_eff, np.asarray(parent), np.asarray(lp.weight.scale, np.float32).astype(np.float64)[:, None] * rows)
    b_eff = next(numpy_helper.to_array(t) for t in centred.model.graph.initializer if t.name.endswith("_bias"))
    xt = centred.plan.resolve("input")
    s, z = xt.scale[0], xt.zero_point[0]
    xdq = (np.clip(np.rint(data["input"] / s) + z, 0, 255) - z) * s
    np.testing.assert_allclose(run(centred.model, data)[0], xdq @ w_eff.T + b_eff.reshape(-1), rtol=1e-4, atol=1e-4)
