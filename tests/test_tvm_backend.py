"""Integer Relax rewrites (hago_py/backends/tvm/rewrite_*.py): every pattern bit-exact against an integer numpy
reference (int64 convolution / matmul written here, then requantize.apply_np with the constants of
requantize.plan — the plan's constants are shared, the arithmetic is not: the Relax code is compared with numpy),
and, for ORT's arithmetic (float_scale / half_to_even), equal to ONNX Runtime's fused QLinear kernels on the same
QDQ model. The plan's constants are checked on their own below (multiplier accuracy, exact rational rounding).

The QDQ models are written by hand so that zero points, dtypes, granularity, pads and groups are chosen exactly.
Inputs are exact multiples of a power-of-two scale, so input quantization is exact everywhere and any difference
is the layer's integer arithmetic.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from hago_py.backends.ort import OrtBackend  # noqa: E402
from hago_py.backends.tvm import TvmBackend  # noqa: E402
from hago_py.backends.tvm import requantize as rq  # noqa: E402
from models import conv_int  # noqa: E402

QR = {"uint8": (0, 255), "int8": (-128, 127)}
NP = {"uint8": np.uint8, "int8": np.int8}
ORT_RQ = {"style": "float_scale", "multiplier_bits": 32, "rounding": "half_to_even"}


# ----------------------------------------------------------------------------------------------- model writers
class _G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, arr, name=None):
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, ins, **attrs):
        self.n += 1
        out = f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def q(self, x, s, z, dtype):
        return self.node("QuantizeLinear", [x, self.const(np.float32(s)), self.const(NP[dtype](z))])

    def dq(self, x, s, z, axis=None):
        kw = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [x, self.const(np.asarray(s, np.float32)), self.const(z)], **kw)

    def qdq(self, x, s, z, dtype):
        return self.dq(self.q(x, s, z, dtype), np.float32(s), NP[dtype](z))

    def model(self, inputs, out):
        g = helper.make_graph(self.nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                                for n, s in inputs],
                              [onnx.ValueInfoProto(name=out)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m)
        onnx.checker.check_model(m)
        return m


def _act(g, y, act, sy, zy, dtype):
    if act == "relu":
        return g.node("Relu", [y])
    if act == "clip":
        return g.node("Clip", [y, g.const(np.float32(0.0)), g.const(np.float32(6.0))])
    return y


def _weights(rng, shape, per_channel, axis=0, wmax=127):
    w = rng.integers(-wmax, wmax + 1, size=shape).astype(np.int8)
    n = shape[axis]
    ws = (rng.uniform(0.5, 2.0, n) * 2.0 ** -7).astype(np.float32) if per_channel else np.float32(0.011)
    return w, ws


def _exact_input(rng, shape, s, z, dtype):
    lo, hi = QR[dtype]
    q = rng.integers(lo, hi + 1, size=shape)
    return ((q - z) * s).astype(np.float32), q.astype(np.int64)


def _requant(acc, M, rqs, zy, lo, hi):
    p = rq.plan([np.asarray(M, np.float32)], rqs)
    return np.clip(rq.apply_np([acc], p) + zy, lo, hi)


def _clamp_of(act, sy, zy, dtype):
    lo, hi = QR[dtype]
    if act == "relu":
        return max(lo, zy), hi
    if act == "clip":
        top = int(np.clip(np.rint(np.float32(6.0) / np.float32(sy)) + zy, lo, hi))
        return max(lo, zy), min(hi, top)
    return lo, hi


# ----------------------------------------------------------------------------------------------- references


def _y_int(y, sy, zy):
    return np.rint(y / np.float32(sy)).astype(np.int64) + zy


def _run_tvm(model, x_feeds, rqs):
    be = TvmBackend(spec=rqs)
    art = be.compile(model)
    return be.run(art, x_feeds)[0], art.info


def _run_ort(model, feeds):
    be = OrtBackend(threads=1)
    return be.run(be.compile(model, optimization="all"), feeds)[0]


# ----------------------------------------------------------------------------------------------- conv
CONV_CASES = {
    # name: (x dtype, zx, per-channel, groups, pads, strides, act, y dtype, zy)
    "int8_sym_perchannel_relu": ("int8", 0, True, 1, (1, 1, 1, 1), (1, 1), "relu", "int8", -5),
    "uint8_asym_pertensor_pads": ("uint8", 131, False, 1, (1, 1, 1, 1), (1, 1), None, "uint8", 120),
    "uint8_depthwise_stride2_asympads": ("uint8", 97, True, 4, (0, 0, 1, 1), (2, 2), "clip", "uint8", 3),
    "int8_grouped_relu6": ("int8", -7, True, 2, (1, 0, 1, 2), (1, 2), "clip", "int8", -128),
}


def _conv_model(rng, case, wmax=127):
    xdt, zx, pc, groups, pads, strides, act, ydt, zy = case
    cin, cout, k = 4, 4 if groups == 4 else 6, 3
    sx, sy = 2.0 ** -5, 0.043
    w, ws = _weights(rng, (cout, cin // groups, k, k), pc, wmax=wmax)
    bias = rng.integers(-3000, 3000, cout).astype(np.int32)
    g = _G()
    xin = g.qdq("x", sx, zx, xdt)
    wd = g.dq(g.const(w), ws, np.zeros(cout, np.int8) if pc else np.int8(0), axis=0 if pc else None)
    bd = g.dq(g.const(bias), (np.float32(sx) * ws).astype(np.float32), np.zeros(cout, np.int32) if pc else np.int32(0),
              axis=0 if pc else None)
    y = g.node("Conv", [xin, wd, bd], pads=list(pads), strides=list(strides), group=groups,
               kernel_shape=[k, k])
    y = _act(g, y, act, sy, zy, ydt)
    out = g.qdq(y, sy, zy, ydt)
    model = g.model([("x", [2, cin, 7, 8])], out)
    x, xq = _exact_input(rng, (2, cin, 7, 8), sx, zx, xdt)
    acc = conv_int(xq, w, zx, pads, strides, groups) + bias.reshape(1, -1, 1, 1)
    M = (np.float32(sx) * np.broadcast_to(ws, (cout,)).astype(np.float32) / np.float32(sy)).reshape(1, -1, 1, 1)
    lo, hi = _clamp_of(act, sy, zy, ydt)
    return model, x, acc, M, (sy, zy, lo, hi)


RQ_STYLES = [ORT_RQ,
             {"style": "fixed_point", "multiplier_bits": 32, "rounding": "half_away_from_zero"},
             {"style": "fixed_point", "multiplier_bits": 16, "rounding": "half_to_even"},
             {"style": "power_of_two", "multiplier_bits": 32, "rounding": "half_up"}]


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_bit_exact_against_numpy_and_ort(name):
    rng = np.random.default_rng(sorted(CONV_CASES).index(name))
    model, x, acc, M, (sy, zy, lo, hi) = _conv_model(rng, CONV_CASES[name])
    for rqs in RQ_STYLES[:2] if name != "int8_grouped_relu6" else RQ_STYLES:
        y, info = _run_tvm(model, {"x": x}, rqs)
        assert info["counts"].get("conv2d") == 1 and info["left_float"] == [], info
        rec = info["layers"][0]
        assert rec["status"] == "integer" and rec["requantize"].startswith(rqs["style"])
        ref = _requant(acc, M, rqs, zy, lo, hi)
        np.testing.assert_array_equal(_y_int(y, sy, zy), ref, err_msg=f"{name} {rqs}")
    # ORT's QLinearConv uses float_scale / half_to_even: the default integer code must equal it exactly. With
    # 7-bit weights (what hago emits for AVX2 specs): on AVX2 without VNNI, MLAS's vpmaddubsw saturates int16
    # pairs of u8 x s8 products, so full-range weights legitimately differ there.
    model, x, *_ = _conv_model(np.random.default_rng(99), CONV_CASES[name], wmax=63)
    y_tvm, _ = _run_tvm(model, {"x": x}, ORT_RQ)
    np.testing.assert_array_equal(_y_int(y_tvm, sy, zy), _y_int(_run_ort(model, {"x": x}), sy, zy))


def test_fixed_point_differs_from_float_scale_where_it_should():
    """The spec's requantize section reaches the compiled arithmetic: a 4-bit multiplier changes results."""
    rng = np.random.default_rng(7)
    model, x, acc, M, (sy, zy, lo, hi) = _conv_model(rng, CONV_CASES["int8_sym_perchannel_relu"])
    coarse = {"style": "fixed_point", "multiplier_bits": 4, "rounding": "half_to_even"}
    y4, _ = _run_tvm(model, {"x": x}, coarse)
    y32, _ = _run_tvm(model, {"x": x}, ORT_RQ)
    np.testing.assert_array_equal(_y_int(y4, sy, zy), _requant(acc, M, coarse, zy, lo, hi))
    assert np.any(_y_int(y4, sy, zy) != _y_int(y32, sy, zy))


def _without_bias_zero_point(model):
    """``model`` with its int32 bias DequantizeLinear written as hago's realize writes it: no zero point (0)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    int32 = {i.name for i in m.graph.initializer if i.data_type == TensorProto.INT32}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32]
    assert len(dqs) == 1 and len(dqs[0].input) == 3
    del dqs[0].input[2:]
    return m


@pytest.mark.parametrize("name", ["int8_sym_perchannel_relu", "uint8_asym_pertensor_pads"])
def test_conv_bias_without_zero_point_is_the_same_integer_layer(name):
    model, x, acc, M, (sy, zy, lo, hi) = _conv_model(np.random.default_rng(5), CONV_CASES[name])
    y3, _ = _run_tvm(model, {"x": x}, ORT_RQ)
    y2, info = _run_tvm(_without_bias_zero_point(model), {"x": x}, ORT_RQ)
    rec = info["layers"][0]
    assert rec["status"] == "integer" and info["left_float"] == [], info
    assert "+bias" in rec["pattern"] and not any("bias rescaled" in n for n in rec["notes"]), rec
    np.testing.assert_array_equal(y2, y3)
    np.testing.assert_array_equal(_y_int(y2, sy, zy), _requant(acc, M, ORT_RQ, zy, lo, hi))


# ----------------------------------------------------------------------------------------------- gemm / matmul
@pytest.mark.parametrize("form", ["gemm_transB_int32bias_q", "matmul_rank3_floatbias_q", "gemm_float_output"])
def test_matmul_bit_exact(form):
    rng = np.random.default_rng(11)
    K, N = 24, 10
    sx, sy, zx, zy = 2.0 ** -4, 0.07, 121, 7
    g = _G()
    xin = g.qdq("x", sx, zx, "uint8")
    if form.startswith("gemm"):
        w, ws = _weights(rng, (N, K), True, axis=0, wmax=63)   # 7-bit: ORT on AVX2 saturates u8 x s8 pairs
        bias = rng.integers(-2000, 2000, N).astype(np.int32)
        wd = g.dq(g.const(w), ws, np.zeros(N, np.int8), axis=0)
        bd = g.dq(g.const(bias), (np.float32(sx) * ws).astype(np.float32), np.zeros(N, np.int32), axis=0)
        y = g.node("Gemm", [xin, wd, bd], transB=1)
        wkn, shape = w.T, [3, K]
    else:
        w, ws = _weights(rng, (K, N), True, axis=1)
        wd = g.dq(g.const(w), ws, np.zeros(N, np.int8), axis=1)
        fb = rng.uniform(-1, 1, N).astype(np.float32)
        y = g.node("Add", [g.node("MatMul", [xin, wd]), g.const(fb)])
        acc_scale = np.float64(np.float32(sx)) * ws.astype(np.float64)
        bias = np.round(fb.astype(np.float64) / acc_scale).astype(np.int64)
        wkn, shape = w, [2, 3, K]
    quantized = not form.endswith("float_output")
    out = g.qdq(y, sy, zy, "uint8") if quantized else y
    model = g.model([("x", shape)], out)
    x, xq = _exact_input(rng, shape, sx, zx, "uint8")
    acc = (xq - zx) @ wkn.astype(np.int64) + bias
    yt, info = _run_tvm(model, {"x": x}, ORT_RQ)
    assert info["counts"].get("matmul") == 1 and info["left_float"] == [], info
    if quantized:
        M = np.float32(sx) * ws.astype(np.float32) / np.float32(sy)
        np.testing.assert_array_equal(_y_int(yt, sy, zy), _requant(acc, M, ORT_RQ, zy, 0, 255))
        if form.startswith("gemm"):
            np.testing.assert_array_equal(_y_int(yt, sy, zy), _y_int(_run_ort(model, {"x": x}), sy, zy))
    else:
        ref = acc.astype(np.float32) * (np.float64(np.float32(sx)) * ws.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(yt, ref)
        np.testing.assert_allclose(yt, _run_ort(model, {"x": x}), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- add
@pytest.mark.parametrize("dtypes,act", [(("uint8", "uint8", "uint8"), "relu"), (("int8", "uint8", "int8"), None)])
def test_requantizing_add_bit_exact(dtypes, act):
    rng = np.random.default_rng(3)
    (da, db, dy) = dtypes
    sa, sb, sy = 2.0 ** -4, 2.0 ** -3, 0.11
    za, zb, zy = (0 if da == "int8" else 100), 37, (-3 if dy == "int8" else 9)
    g = _G()
    a = g.qdq("a", sa, za, da)
    b = g.qdq("b", sb, zb, db)
    y = _act(g, g.node("Add", [a, b]), act, sy, zy, dy)
    model = g.model([("a", [2, 16, 9, 9]), ("b", [2, 16, 9, 9])], g.qdq(y, sy, zy, dy))
    xa, qa = _exact_input(rng, (2, 16, 9, 9), sa, za, da)
    xb, qb = _exact_input(rng, (2, 16, 9, 9), sb, zb, db)
    for rqs in RQ_STYLES:
        yt, info = _run_tvm(model, {"a": xa, "b": xb}, rqs)
        assert info["counts"].get("add") == 1 and info["left_float"] == [], info
        lo, hi = _clamp_of(act, sy, zy, dy)
        if rqs == ORT_RQ:      # MLAS QLinearAdd's form (zero points folded into a float constant, FMAs)
            ref = np.clip(rq.mlas_add_np(qa, qb, rq.mlas_add_constants(sa, sb, sy, za, zb, zy)), lo, hi)
        else:
            p = rq.plan([np.float32(sa) / np.float32(sy), np.float32(sb) / np.float32(sy)], rqs)
            ref = np.clip(rq.apply_np([qa - za, qb - zb], p) + zy, lo, hi)
        np.testing.assert_array_equal(_y_int(yt, sy, zy), ref, err_msg=str(rqs))
    if da == db and act is None:   # ORT fuses QLinearAdd only for one input type and without a Relu it cannot
        # drop (zero point above the type's minimum); otherwise it runs the float Add
        yt, _ = _run_tvm(model, {"a": xa, "b": xb}, ORT_RQ)
        np.testing.assert_array_equal(_y_int(yt, sy, zy), _y_int(_run_ort(model, {"a": xa, "b": xb}), sy, zy))


def test_mlas_add_form_equals_ort_qlinearadd_over_random_scales():
    """The numpy twin of ORT's QLinearAdd equals ONNX Runtime on random scales / zero points (vector lengths
    with a tail), so the float_scale Add is ORT's arithmetic, not an approximation of it."""
    rng = np.random.default_rng(0)
    be = OrtBackend(threads=1)
    for _ in range(6):
        sa, sb, sy = (float(rng.uniform(0.005, 0.2)) for _ in range(3))
        za, zb, zy = (int(rng.integers(0, 256)) for _ in range(3))
        g = _G()
        y = g.node("Add", [g.qdq("a", sa, za, "uint8"), g.qdq("b", sb, zb, "uint8")])
        model = g.model([("a", [1, 2051]), ("b", [1, 2051])], g.qdq(y, sy, zy, "uint8"))
        qa, qb = rng.integers(0, 256, (2, 1, 2051))
        xa, xb = ((qa - za) * np.float32(sa)).astype(np.float32), ((qb - zb) * np.float32(sb)).astype(np.float32)
        got = _y_int(be.run(be.compile(model, optimization="all"), {"a": xa, "b": xb})[0], sy, zy)
        want = np.clip(rq.mlas_add_np(qa, qb, rq.mlas_add_constants(sa, sb, sy, za, zb, zy)), 0, 255)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------- requantize twin
@pytest.mark.parametrize("rounding", rq.ROUNDINGS)
def test_rounding_shift_matches_exact_rational_rounding(rounding):
    """The numpy twin's rounding right shift equals the exact rational rounding of v / 2**s (Python ints)."""
    from fractions import Fraction

    v = np.array([-13, -12, -11, -10, -9, -8, -7, -6, -5, -3, -2, -1, 0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13],
                 np.int64)
    s = np.int64(2)
    got = rq._round_shift_np(v, s, rounding)
    for vi, gi in zip(v.tolist(), got.tolist()):
        f = Fraction(vi, 4)
        fl = f.numerator // f.denominator
        frac = f - fl
        if rounding == "toward_zero":
            want = int(f) if f >= 0 else -int(-f)
        elif frac != Fraction(1, 2):
            want = fl + (1 if frac > Fraction(1, 2) else 0)
        elif rounding == "half_up":
            want = fl + 1
        elif rounding == "half_away_from_zero":
            want = fl + 1 if f > 0 else fl
        else:
            want = fl if fl % 2 == 0 else fl + 1
        assert gi == want, (vi, rounding, gi, want)


def test_unsupported_layer_is_listed_float_with_reason():
    """Asymmetric int8 weights (zero point != 0) are not integerized: the layer stays float and says why."""
    rng = np.random.default_rng(5)
    g = _G()
    xin = g.qdq("x", 2.0 ** -5, 0, "int8")
    w = rng.integers(-100, 100, (3, 2, 1, 1)).astype(np.int8)
    wd = g.dq(g.const(w), np.float32(0.01), np.int8(3))
    y = g.node("Conv", [xin, wd], kernel_shape=[1, 1])
    model = g.model([("x", [1, 2, 4, 4])], g.qdq(y, 0.05, 0, "int8"))
    x, _ = _exact_input(rng, (1, 2, 4, 4), 2.0 ** -5, 0, "int8")
    yt, info = _run_tvm(model, {"x": x}, ORT_RQ)
    assert info["counts"].get("rewritten", 0) == 0
    assert any("zero point 0" in (r.get("reason") or "") for r in info["left_float"]), info["left_float"]
    np.testing.assert_allclose(yt, _run_ort(model, {"x": x}), atol=0.05 + 1e-6)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_fixed_point_multiplier_accuracy(bits):
    """m * 2**-S approximates every M to the multiplier's precision, and m fits the declared bits."""
    M = np.array([1e-4, 3.7e-3, 0.0421, 0.5, 0.9999, 1.7, 13.0], np.float32)
    p = rq.plan([M], {"style": "fixed_point", "multiplier_bits": bits, "rounding": "half_to_even"})
    m, S = p["m"][0], p["shift"]
    assert np.all(np.abs(m) < 2 ** (bits - 1))
    approx = m.astype(np.float64) * np.exp2(-S.astype(np.float64))
    assert np.all(np.abs(approx - M) / M <= 2.0 ** -(bits - 2)), (approx, M)


def test_dynamic_matmulinteger_imports_integer_and_counts():
    """hago's dynamic-activation form (DynamicQuantizeLinear + MatMulInteger) arrives integer: counted as
    imported_integer, equal to ORT; a float MatMul without quantized inputs is counted as float in the plan."""
    rng = np.random.default_rng(2)
    K, N = 32, 8
    w = rng.integers(-63, 64, (K, N)).astype(np.int8)     # 7-bit: ORT on AVX2 saturates u8 x s8 int16 pairs
    g = _G()
    dq = helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql")
    g.nodes.append(dq)
    acc = g.node("MatMulInteger", ["xq", g.const(w), "xz", g.const(np.int8(0))])
    y = g.node("Mul", [g.node("Cast", [acc], to=TensorProto.FLOAT), g.node("Mul", ["xs", g.const(np.float32(0.02))])])
    y = g.node("MatMul", [y, g.const(rng.normal(size=(N, 3)).astype(np.float32))])
    model = g.model([("x", [4, K])], y)
    x = rng.normal(size=(4, K)).astype(np.float32)
    yt, info = _run_tvm(model, {"x": x}, ORT_RQ)
    assert info["counts"]["imported_integer"] == 1 and info["counts"]["float_in_plan"] == 1, info["counts"]
    assert info["left_float"] == []
    np.testing.assert_allclose(yt, _run_ort(model, {"x": x}), rtol=1e-5, atol=1e-5)
