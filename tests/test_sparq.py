"""SPARQ activations: the numpy reference, the integer ONNX subgraph and insert_sparq on tiny QDQ models."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago_py.errors import OptionError
from hago_py.quant.sparq import (
    allowed_shifts,
    build_sparq_subgraph,
    insert_sparq,
    sparq_quantized,
    sparq_reference,
    sparq_stats,
)

LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
NP = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
INT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
             TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL}


def _session(model: onnx.ModelProto, level) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# --- independent per-element definition (python ints, leading one via bit_length) -------------------------


def _shifts_by_hand(n: int, options: int):
    if options == 5:
        return list(range(0, 8 - n + 1))
    if options == 3:
        return sorted({0, int(np.floor((8 - n) / 2 + 0.5)), 8 - n})
    return [0, 8 - n]


def _bsparq_by_hand(m: int, n: int, options: int, rounding: str) -> int:
    if m == 0:
        return 0
    need = max(0, m.bit_length() - n)  # bits below an n-bit window that starts at the leading one
    s = min(x for x in _shifts_by_hand(n, options) if x >= need)
    if s == 0:
        return m
    if rounding == "truncate":
        return (m >> s) << s
    r = ((m + (1 << (s - 1))) >> s) << s
    return min(r, ((1 << n) - 1) << (8 - n))


def _sparq_pairs_by_hand(rows, n, options, rounding, pairs):
    """rows: list of [a, b] signed ints, one pair per row (reduction axis 1)."""
    table = {m: _bsparq_by_hand(m, n, options, rounding) for m in range(256)}
    out = []
    for a, b in rows:
        if pairs and (a == 0 or b == 0):
            out.append((a, b))
            continue
        out.append(tuple((1 if x > 0 else -1) * table[abs(x)] if x else 0 for x in (a, b)))
    return np.array(out, dtype=np.int64)


ALL_PAIRS = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 2)


@pytest.mark.parametrize("options", [5, 3, 2])
@pytest.mark.parametrize("rounding", ["round", "truncate"])
@pytest.mark.parametrize("pairs", [True, False])
def test_reference_matches_definition_exhaustively(options, rounding, pairs):
    got = sparq_reference(ALL_PAIRS, 4, options, pairs, axis=1, rounding=rounding)
    want = _sparq_pairs_by_hand(ALL_PAIRS.tolist(), 4, options, rounding, pairs)
    np.testing.assert_array_equal(got, want)
    # sign-magnitude: negating the input negates the output
    np.testing.assert_array_equal(sparq_reference(-ALL_PAIRS, 4, options, pairs, 1, rounding), -want)


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("options", [5, 3, 2])
def test_reference_other_window_widths(n, options):
    mags = np.arange(256).reshape(-1, 1)
    for rounding in ("round", "truncate"):
        got = sparq_reference(mags, n, options, pairs=False, axis=1, rounding=rounding)[:, 0]
        want = [_bsparq_by_hand(int(m), n, options, rounding) for m in range(256)]
        np.testing.assert_array_equal(got, want)
    assert allowed_shifts(n, options) == tuple(_shifts_by_hand(n, options))


def test_hand_examples():
    def one(m, options=5, rounding="round"):
        return int(sparq_reference(np.array([[m]]), 4, options, pairs=False, axis=1, rounding=rounding)[0, 0])

    assert one(0b10110110) == 176      # s=4: (182 + 8) // 16 * 16
    assert one(0b00010111) == 24       # s=1: (23 + 1) // 2 * 2
    assert one(255) == 240             # top window saturates
    assert one(15) == 15               # fits the window: untouched
    assert one(0) == 0
    assert one(23, 3) == 24            # s=2: (23 + 2) // 4 * 4
    assert one(23, 2) == 16            # s=4: (23 + 8) // 16 * 16
    assert one(31) == 32               # round-up into the next window is kept
    assert one(182, rounding="truncate") == 176 and one(23, rounding="truncate") == 22
    assert allowed_shifts(4, 5) == (0, 1, 2, 3, 4) and allowed_shifts(4, 3) == (0, 2, 4)
    assert allowed_shifts(4, 2) == (0, 4)
    assert int(sparq_reference(np.array([[-182]]), pairs=False)[0, 0]) == -176


def test_pair_rule():
    np.testing.assert_array_equal(sparq_reference(np.array([[0, 183]])), [[0, 183]])
    np.testing.assert_array_equal(sparq_reference(np.array([[5, 183]])), [[5, 176]])
    np.testing.assert_array_equal(sparq_reference(np.array([[183, 0]])), [[183, 0]])
    np.testing.assert_array_equal(sparq_reference(np.array([[5, 183]]), pairs=False), [[5, 176]])
    # pairs run along the given axis; an odd last channel is paired with padding zero and kept
    v = np.array([[183, 200, 0], [17, 0, 183]]).T  # axis 0 has 3 channels
    np.testing.assert_array_equal(sparq_reference(v, axis=0), np.array([[176, 208, 0], [17, 0, 183]]).T)
    x = np.array([[[183, 7, 0, 99, 201]]])
    np.testing.assert_array_equal(sparq_reference(x, axis=-1), [[[176, 7, 0, 99, 201]]])


def test_stats():
    v = np.array([[0, 183, 5, 183, 15, 3, 0, 0]])
    st = sparq_stats(v, 4, 5, True, axis=1)
    assert st["count"] == 8
    assert st["zero"] == pytest.approx(3 / 8)
    assert st["kept_8bit"] == pytest.approx(1 / 8)           # 183 next to a zero
    assert st["trimmed"] == pytest.approx(4 / 8)             # 5, 183, 15, 3
    assert st["trimmed_changed"] == pytest.approx(1 / 8)     # only 183 -> 176
    assert st["mse"] == pytest.approx(49 / 8) and st["mse_trimmed"] == pytest.approx(49 / 4)
    nopair = sparq_stats(v, 4, 5, False, axis=1)
    assert nopair["kept_8bit"] == 0 and nopair["trimmed_changed"] == pytest.approx(2 / 8)


def test_bad_arguments():
    with pytest.raises(OptionError, match="options"):
        sparq_reference(np.array([[1]]), options=4)
    with pytest.raises(OptionError, match="window_bits"):
        sparq_reference(np.array([[1]]), window_bits=8)
    with pytest.raises(OptionError, match="rounding"):
        sparq_reference(np.array([[1]]), rounding="nearest")
    with pytest.raises(OptionError, match="integer"):
        sparq_reference(np.array([[1.0]]))
    with pytest.raises(OptionError, match="255"):
        sparq_reference(np.array([[256]]))


# --- the ONNX subgraph, exhaustively ------------------------------------------------------------------------


def _subgraph_model(elem_type, zp, options, rounding, pairs, channels=2, window_bits=4, axis=1):
    nodes, inits = build_sparq_subgraph("q", "y", zero_point=zp, elem_type=elem_type, axis=axis, channels=channels,
                                        window_bits=window_bits, options=options, pairs=pairs, rounding=rounding)
    g = helper.make_graph(nodes, "sparq", [helper.make_tensor_value_info("q", elem_type, ["N", channels])],
                          [helper.make_tensor_value_info("y", elem_type, ["N", channels])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("options", [5, 3, 2])
@pytest.mark.parametrize("rounding", ["round", "truncate"])
@pytest.mark.parametrize("pairs", [True, False])
def test_subgraph_equals_reference_on_all_pairs(options, rounding, pairs):
    m = _subgraph_model(TensorProto.UINT8, 0, options, rounding, pairs)
    q = ALL_PAIRS.astype(np.uint8)
    want = _sparq_pairs_by_hand(ALL_PAIRS.tolist(), 4, options, rounding, pairs)
    for level in LEVELS:
        got = _session(m, level).run(None, {"q": q})[0]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("elem_type, zp", [(TensorProto.UINT8, 128), (TensorProto.UINT8, 37),
                                           (TensorProto.INT8, 0), (TensorProto.INT8, -20)])
@pytest.mark.parametrize("options, rounding", [(5, "round"), (3, "truncate"), (2, "round")])
def test_subgraph_zero_point_and_int8_on_all_pairs(elem_type, zp, options, rounding):
    m = _subgraph_model(elem_type, zp, options, rounding, True)
    q = ALL_PAIRS.astype(np.uint8).view(NP[elem_type])
    dtype = "uint8" if elem_type == TensorProto.UINT8 else "int8"
    want = sparq_quantized(q, zp, dtype, 4, options, True, 1, rounding)
    # independent check of the sign-magnitude rule via the per-element definition
    v = q.astype(np.int64) - zp
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    by_hand = np.clip(_sparq_pairs_by_hand(v.tolist(), 4, options, rounding, True) + zp, lo, hi)
    np.testing.assert_array_equal(want.astype(np.int64), by_hand)
    for level in LEVELS:
        np.testing.assert_array_equal(_session(m, level).run(None, {"q": q})[0], want)


@pytest.mark.parametrize("channels", [1, 5, 6])
@pytest.mark.parametrize("window_bits", [3, 4, 6])
def test_subgraph_odd_channels_and_widths(channels, window_bits):
    rng = np.random.default_rng(channels * 10 + window_bits)
    q = rng.integers(0, 256, size=(500, channels)).astype(np.uint8)
    q[rng.random(q.shape) < 0.3] = 0
    m = _subgraph_model(TensorProto.UINT8, 0, 3, "round", True, channels=channels, window_bits=window_bits)
    want = sparq_quantized(q, 0, "uint8", window_bits, 3, True, 1, "round")
    for level in LEVELS:
        np.testing.assert_array_equal(_session(m, level).run(None, {"q": q})[0], want)


# --- insert_sparq on tiny QDQ models --------------------------------------------------------------------------


def _conv_qdq_model(c=4, zp=0, elem_type=TensorProto.UINT8, scale=0.25, opset=13, batch="N"):
    rng = np.random.default_rng(c + zp)
    w = rng.integers(-127, 128, size=(3, c, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zp, NP[elem_type]), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w"),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["x_dq", "x_dq"], ["r"], name="residual_add"),
    ]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 5, 5]),
                           helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, c, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m, w.astype(np.float64) * 0.01, numpy_helper.to_array(inits[5]).astype(np.float64)


def _conv_np(x, w, b):  # NCHW, 3x3, pad 1, stride 1
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            y += np.einsum("nchw,mc->nmhw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return y + b[None, :, None, None]


def _q_input(shape, zp, dtype, seed=0):
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    rng = np.random.default_rng(seed)
    q = rng.integers(lo, hi + 1, size=shape)
    q[rng.random(shape) < 0.35] = zp  # plenty of real zeros for the pair rule
    return q


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


@pytest.mark.parametrize("c, zp, elem_type, batch", [
    (4, 0, TensorProto.UINT8, 2),       # post-ReLU style
    (4, 128, TensorProto.UINT8, 1),     # asymmetric: sign-magnitude around z
    (5, 0, TensorProto.UINT8, 3),       # odd channel count
    (3, -3, TensorProto.INT8, 2),       # int8, odd
])
def test_insert_sparq_conv(c, zp, elem_type, batch):
    scale = 0.25
    model, w, b = _conv_qdq_model(c, zp, elem_type, scale)
    before = model.SerializeToString()
    new, info = insert_sparq(model)
    assert model.SerializeToString() == before  # input untouched
    onnx.checker.check_model(new, full_check=True)
    assert list(info) == ["x_dq"]
    dtype = "uint8" if elem_type == TensorProto.UINT8 else "int8"
    it = info["x_dq"]
    assert it["consumers"] == ["conv"] and it["axis"] == 1 and it["zero_point"] == zp and it["dtype"] == dtype
    assert it["window_bits"] == 4 and it["options"] == 5 and it["pairs"] is True
    conv = next(n for n in new.graph.node if n.name == "conv")
    add = next(n for n in new.graph.node if n.name == "residual_add")
    assert conv.input[0] == it["trimmed_output"] != "x_dq"
    assert list(add.input) == ["x_dq", "x_dq"]

    q = _q_input((batch, c, 5, 5), zp, dtype)
    x = ((q - zp) * scale).astype(np.float32)  # exact: QuantizeLinear gives back q
    q_trim = sparq_quantized(q, zp, dtype, axis=1).astype(np.int64)
    assert (q_trim != q).any()  # the test exercises real trimming
    x_trim = (q_trim - zp) * scale
    probe = _with_output(new, it["trimmed_output"])
    for level in LEVELS:
        y, r, xt = _session(probe, level).run(None, {"x": x})
        np.testing.assert_array_equal(xt, x_trim.astype(np.float32))
        np.testing.assert_allclose(y, _conv_np(x_trim, w, b), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(r, 2 * x)  # the residual keeps the untrimmed value
    # without SPARQ the conv output differs (trimming matters for this input)
    y0 = _session(model, LEVELS[0]).run(None, {"x": x})[0]
    assert np.abs(y0 - _conv_np(x_trim, w, b)).max() > 1e-3


def test_insert_sparq_dynamic_batch_and_options():
    model, w, b = _conv_qdq_model(6, 0)
    new, info = insert_sparq(model, window_bits=3, options=2, pairs=False, rounding="truncate")
    onnx.checker.check_model(new, full_check=True)
    sess = {lvl: _session(new, lvl) for lvl in LEVELS}
    for n in (1, 4):
        q = _q_input((n, 6, 5, 5), 0, "uint8", seed=n)
        x = (q * 0.25).astype(np.float32)
        xt = sparq_quantized(q, 0, "uint8", 3, 2, False, 1, "truncate").astype(np.float64) * 0.25
        for s in sess.values():
            np.testing.assert_allclose(s.run(None, {"x": x})[0], _conv_np(xt, w, b), rtol=1e-5, atol=1e-4)


def test_inserted_ops_are_integer_only():
    model, _, _ = _conv_qdq_model(5, 128)
    new, info = insert_sparq(model)
    old_names = {n.name for n in model.graph.node}
    added = [n for n in new.graph.node if n.name not in old_names]
    trimmed = info["x_dq"]["trimmed_output"]
    sub = [n for n in added if trimmed not in n.output]
    assert len(added) == len(sub) + 1 and len(sub) > 10
    inferred = onnx.shape_inference.infer_shapes(new, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for n in sub:
        assert n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Round", "Floor", "Ceil")
        for o in n.output:
            assert types[o] in INT_TYPES, (n.op_type, o, types[o])
        for a in n.attribute:
            if a.name == "to":
                assert a.i in INT_TYPES
    new_inits = {i.name for i in new.graph.initializer} - {i.name for i in model.graph.initializer}
    for i in new.graph.initializer:
        if i.name in new_inits:
            assert i.data_type in INT_TYPES
    # the subgraph starts at the Q output and ends in the new DQ
    new_dq = next(n for n in added if trimmed in n.output)
    assert new_dq.op_type == "DequantizeLinear" and list(new_dq.input[1:]) == ["x_scale", "x_zp"]
    assert any(n.input and n.input[0] == "x_q" for n in sub)


def test_layers_filter_and_fresh_names():
    model, _, _ = _conv_qdq_model(4, 0)
    same, info = insert_sparq(model, layers={"some_other_layer"})
    assert info == {} and len(same.graph.node) == len(model.graph.node)
    # names the inserter would like are taken already
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int32), "x_dq_sparq"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int32), "x_dq_sparq_zp"))
    new, info = insert_sparq(model, layers=["conv"])
    onnx.checker.check_model(new, full_check=True)
    assert info["x_dq"]["trimmed_output"] not in ("x_dq_sparq",)
    outs = [o for n in new.graph.node for o in n.output]
    names = [n.name for n in new.graph.node]
    assert len(outs) == len(set(outs)) and len(names) == len(set(names))
    assert not set(outs) & {i.name for i in new.graph.initializer}
    for level in LEVELS:
        _session(new, level).run(None, {"x": np.zeros((1, 4, 5, 5), np.float32)})


def _matmul_model(k, transA=False, gemm=False):
    rng = np.random.default_rng(k)
    w = rng.integers(-127, 128, size=(k, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z"),
             numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.array(0.02, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dqw")]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["y"], name="fc", transA=int(transA)))
        shape = [k, "M"] if transA else ["M", k]
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"))
        shape = ["B", "T", k]
    yshape = ["M", 3] if gemm else ["B", "T", 3]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, yshape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), w.astype(np.float64) * 0.02


@pytest.mark.parametrize("k", [5, 8])
def test_insert_sparq_matmul_last_axis(k):
    model, w = _matmul_model(k)
    new, info = insert_sparq(model)
    onnx.checker.check_model(new, full_check=True)
    assert info["xd"]["consumers"] == ["mm"] and info["xd"]["axis"] in (-1, 2)
    q = _q_input((2, 7, k), 0, "uint8", seed=k)
    x = (q * 0.5).astype(np.float32)
    xt = sparq_quantized(q, 0, "uint8", axis=-1).astype(np.float64) * 0.5
    assert not np.array_equal(xt, sparq_quantized(q, 0, "uint8", axis=1).astype(np.float64) * 0.5)
    for level in LEVELS:
        np.testing.assert_allclose(_session(new, level).run(None, {"x": x})[0], xt @ w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("transA", [False, True])
def test_insert_sparq_gemm_axis(transA):
    model, w = _matmul_model(7, transA=transA, gemm=True)
    new, info = insert_sparq(model)
    onnx.checker.check_model(new, full_check=True)
    assert info["xd"]["axis"] == (0 if transA else 1) and info["xd"]["channels"] == 7
    q = _q_input((7, 9) if transA else (9, 7), 0, "uint8", seed=3)
    x = (q * 0.5).astype(np.float32)
    xt = sparq_quantized(q, 0, "uint8", axis=0 if transA else 1).astype(np.float64) * 0.5
    want = (xt.T if transA else xt) @ w
    for level in LEVELS:
        np.testing.assert_allclose(_session(new, level).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-4)


def test_insert_sparq_upgrades_old_opset_only_when_needed():
    model, w, b = _conv_qdq_model(4, 0, opset=17)
    new, _ = insert_sparq(model)
    assert [o.version for o in new.opset_import if o.domain in ("", "ai.onnx")] == [17]
    old, w, b = _conv_qdq_model(4, 0, opset=11)
    new, info = insert_sparq(old)
    assert [o.version for o in new.opset_import if o.domain in ("", "ai.onnx")] == [13]
    onnx.checker.check_model(new, full_check=True)
    q = _q_input((2, 4, 5, 5), 0, "uint8", seed=5)
    xt = sparq_quantized(q, 0, "uint8").astype(np.float64) * 0.25
    got = _session(new, LEVELS[0]).run(None, {"x": (q * 0.25).astype(np.float32)})[0]
    np.testing.assert_allclose(got, _conv_np(xt, w, b), rtol=1e-5, atol=1e-4)


def test_weightless_or_float_weight_consumers_are_skipped():
    model, _, _ = _conv_qdq_model(4, 0)
    # the Conv weight is now a float initializer, not a DequantizeLinear of a constant
    for n in model.graph.node:
        if n.name == "conv":
            n.input[1] = "w_float"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((3, 4, 3, 3), np.float32), "w_float"))
    new, info = insert_sparq(model)
    assert info == {}


def test_shared_activation_two_convs_one_subgraph():
    model, w, b = _conv_qdq_model(4, 0)
    conv2 = helper.make_node("Conv", ["x_dq", "w_dq"], ["y2"], name="conv2", pads=[1, 1, 1, 1])
    model.graph.node.append(conv2)
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3, 5, 5]))
    new, info = insert_sparq(model)
    onnx.checker.check_model(new, full_check=True)
    assert list(info) == ["x_dq"] and sorted(info["x_dq"]["consumers"]) == ["conv", "conv2"]
    assert sum(n.op_type == "DequantizeLinear" for n in new.graph.node) == 3  # x, w and the one new DQ
    q = _q_input((2, 4, 5, 5), 0, "uint8", seed=9)
    xt = sparq_quantized(q, 0, "uint8").astype(np.float64) * 0.25
    for level in LEVELS:
        y, _, y2 = _session(new, level).run(None, {"x": (q * 0.25).astype(np.float32)})
        np.testing.assert_allclose(y2, _conv_np(xt, w, 0 * b), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(y, _conv_np(xt, w, b), rtol=1e-5, atol=1e-4)


def test_quantize_with_sparq_option_trims_weighted_inputs_and_reports():
    import hago_py
    from hago_py.errors import OptionError
    from hago_py.quant.artifact import optimized_graph
    from models import calib as _calib, run as _run, small_cnn

    data = _calib()
    base = hago_py.quantize(small_cnn(), data, measure_latency=False)
    res = hago_py.quantize(small_cnn(), data, activation_scheme="sparq", sparq_edges=True, measure_latency=False)
    info = res.report["sparq"]
    consumers = sorted(c for t in info["tensors"].values() for c in t["consumers"])
    assert consumers == ["conv1", "conv2", "fc"] and info["simulated"]
    inner = hago_py.quantize(small_cnn(), data, activation_scheme="sparq", measure_latency=False).report["sparq"]
    assert [c for t in inner["tensors"].values() for c in t["consumers"]] == ["conv2"]  # the paper's edges stay 8-bit
    assert inner["kept_8bit_layers"] == ["conv1", "fc"]
    assert any("SPARQ input" in n for n in res.plan.layers["conv2"].notes)
    ops = {n.op_type for n in optimized_graph(res.model).graph.node}
    assert "QLinearConv" in ops and "Where" in ops                   # still the int8 kernel, after the trimming
    ref = _run(small_cnn(), data)[0]
    q8, qs = _run(base.model, data)[0], _run(res.model, data)[0]
    assert not np.allclose(q8, qs)                                    # the windows really change the values
    assert np.corrcoef(qs.ravel(), ref.ravel())[0, 1] > 0.98
    with pytest.raises(OptionError, match="activation_bits=8"):
        hago_py.quantize(small_cnn(), data, activation_scheme="sparq", activation_bits=4, simulate=True,
                         measure_latency=False)
