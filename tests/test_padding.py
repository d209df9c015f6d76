"""Dynamic activation ranges from real tokens only (mask_padding, hago_py/quant/padding.py)."""
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hago_py
from hago_py.backends.ort import OrtBackend
from hago_py.quant.padding import maskable, real_rows
from hago_py.search.evaluators import FidelityProxy

from models import _init, run

FAST = dict(measure_latency=False, smooth=False, activation_mode="dynamic")
K, N = 16, 8


def _masked_mlp(mask_type=TensorProto.INT64, other_dim="S", seed=0) -> onnx.ModelProto:
    """input [B, S, K], attention_mask [B, S] -> MatMul -> Relu -> MatMul -> output [B, S, N]; the mask only
    zeroes the output rows (as pooling over the mask would), so padding rows never reach a real row."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (K, K)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
             helper.make_node("Cast", ["attention_mask"], ["mf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["m3"], name="unsq"),
             helper.make_node("Mul", ["y", "m3"], ["output"], name="pool_mask")]
    if other_dim != "S":  # input [B, T, K]: nothing ties T to the mask's S (the pooling Mul would)
        nodes = nodes[:3]
        nodes[2].output[0] = "output"
    g = helper.make_graph(nodes, "masked_mlp",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", other_dim, K]),
                           helper.make_tensor_value_info("attention_mask", mask_type, ["B", "S"])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", other_dim, N])],
                          [_init("w1", w1), _init("w2", w2), _init("axes", np.asarray([-1], np.int64))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _feed(n=24, s=12, pad_scale=8.0, seed=1, mask_dtype=np.int64):
    """Real rows N(0, 1), padding rows N(0, pad_scale); sample i has 2 + i % (s - 2) real tokens (trailing pad)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, s, K)).astype(np.float32)
    mask = np.zeros((n, s), mask_dtype)
    for i in range(n):
        mask[i, :2 + i % (s - 2)] = 1
    x[mask == 0] *= pad_scale
    return {"input": x, "attention_mask": mask}


def _mul_on_mask(model) -> int:
    """Mul nodes that zero an activation's padding rows (named by realize: <tensor>/zero_padding)."""
    return sum(1 for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("/zero_padding"))


def test_padding_rows_no_longer_set_the_dynamic_range():
    cal = _feed()
    res = hago_py.quantize(_masked_mlp(), cal, "x86_avx2", **FAST)
    masked = res.report["padding_mask"]
    assert set(masked) == {"input", "r"} and all(w > 5 for w in masked.values())  # padding rows are 8x wider
    assert _mul_on_mask(res.model) == 2
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 2
    assert res.report["artifact_check"]["ok"] and "sanity_fallback" not in res.report
    assert any("padding rows" in note for note in res.plan.layers["mm1"].notes)
    # real rows are independent of the padding's values: the same real rows, padding zeroed or 8x noise
    a = cal
    b = {"input": np.where(cal["attention_mask"][..., None] != 0, cal["input"], 0).astype(np.float32),
         "attention_mask": cal["attention_mask"]}
    real = cal["attention_mask"] != 0
    ya, yb = run(res.model, a)[0], run(res.model, b)[0]
    assert np.array_equal(ya[real], yb[real])
    # ... and equal to the sample run alone without its padding (the range of its own real rows)
    for i in (0, 5, 9):
        n_real = int(real[i].sum())
        alone = run(res.model, {"input": cal["input"][i:i + 1, :n_real],
                                "attention_mask": cal["attention_mask"][i:i + 1, :n_real]})[0]
        assert np.array_equal(run(res.model, {k: v[i:i + 1] for k, v in cal.items()})[0][0, :n_real], alone[0])
    # without the mask the padding's values reach the real rows through the range
    plain = hago_py.quantize(_masked_mlp(), cal, "x86_avx2", mask_padding=False, **FAST)
    assert "padding_mask" not in plain.report and _mul_on_mask(plain.model) == 0
    pa, pb = run(plain.model, a)[0], run(plain.model, b)[0]
    assert not np.array_equal(pa[real], pb[real])
    # and the masked model is closer to FP32 on the real rows
    fp = run(_masked_mlp(), a)[0]
    assert np.abs(ya - fp)[real].mean() < 0.5 * np.abs(pa - fp)[real].mean()


def test_no_mask_where_padding_does_not_widen_the_range_or_no_token_mask():
    res = hago_py.quantize(_masked_mlp(), _feed(pad_scale=0.5), "x86_avx2", **FAST)
    assert "padding_mask" not in res.report and _mul_on_mask(res.model) == 0
    res = hago_py.quantize(_masked_mlp(), _feed(), "x86_avx2", token_mask=None, **FAST)
    assert "padding_mask" not in res.report and _mul_on_mask(res.model) == 0


@pytest.mark.parametrize("mask_type,dtype", [(TensorProto.BOOL, np.bool_), (TensorProto.FLOAT, np.float32)])
def test_mask_input_of_other_types(mask_type, dtype):
    cal = _feed(mask_dtype=dtype)
    res = hago_py.quantize(_masked_mlp(mask_type), cal, "x86_avx2", **FAST)
    assert _mul_on_mask(res.model) == 2
    real = cal["attention_mask"] != 0
    zeroed = dict(cal, input=np.where(real[..., None], cal["input"], 0).astype(np.float32))
    assert np.array_equal(run(res.model, cal)[0][real], run(res.model, zeroed)[0][real])


def test_only_tensors_shaped_like_the_mask_are_maskable():
    """A [B, T, K] input (T not the mask's S) is not token-wise for this mask, even if T == S on the data."""
    m = _masked_mlp(other_dim="T")
    assert maskable(m, ["input"], "attention_mask") == []
    assert maskable(_masked_mlp(), ["input"], "attention_mask") == ["input"]
    assert maskable(_masked_mlp(), ["input"], "no_such_input") == []
    res = hago_py.quantize(m, _feed(), "x86_avx2", **FAST)
    assert "input" not in res.report.get("padding_mask", {})


def test_real_rows_and_the_search_proxy_ignore_padding_rows():
    o = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got = real_rows(o, mask)
    assert np.array_equal(got[mask != 0], o[mask != 0]) and not got[mask == 0].any()
    assert real_rows(o, None) is o and real_rows(o[:, :2], mask) is not None  # shape mismatch: unchanged
    assert np.array_equal(real_rows(o[:, :2], mask), o[:, :2])
    # a model that differs from FP32 only at padding rows (7 there instead of 0) scores FP32's fidelity with the
    # mask, much less without it
    fp = _masked_mlp()
    other = onnx.ModelProto()
    other.CopyFrom(fp)
    del other.graph.node[:]
    other.graph.node.extend([n for n in fp.graph.node if n.name != "pool_mask"] + [
        helper.make_node("Mul", ["y", "m3"], ["ym"], name="ym"),
        helper.make_node("Sub", ["one", "m3"], ["pad"], name="pad"),
        helper.make_node("Mul", ["pad", "seven"], ["pad7"], name="pad7"),
        helper.make_node("Add", ["ym", "pad7"], ["output"], name="out")])
    other.graph.initializer.extend([_init("one", np.float32(1)), _init("seven", np.float32(7))])
    be = OrtBackend()
    batches = [{k: v[:8] for k, v in _feed().items()}]
    fp_sess, o_sess = be.compile(fp), be.compile(other)
    assert FidelityProxy(be, fp_sess, batches, "attention_mask").score(o_sess) == pytest.approx(1.0)
    assert FidelityProxy(be, fp_sess, batches).score(o_sess) < 0.5


def test_static_ranges_are_calibrated_on_real_rows():
    """Static activations (calibrated ranges) of token-wise tensors see the real rows only: the 8x wider padding
    rows no longer set the scale; mask_padding=False observes every row as before."""
    cal = _feed()
    kw = dict(measure_latency=False, smooth=False, activation_mode="static")
    on = hago_py.quantize(_masked_mlp(), cal, "x86_avx2", **kw)
    off = hago_py.quantize(_masked_mlp(), cal, "x86_avx2", mask_padding=False, **kw)
    real = cal["input"][cal["attention_mask"] != 0]
    s_on, s_off = on.plan.activations["input"].scale[0], off.plan.activations["input"].scale[0]
    assert s_on <= 1.0001 * (real.max() - min(real.min(), 0)) / 255
    assert s_off > 4 * s_on
    fp = run(_masked_mlp(), cal)[0]
    mask = cal["attention_mask"] != 0
    err = lambda r: np.abs(run(r.model, cal)[0] - fp)[mask].mean()  # noqa: E731
    assert err(on) < 0.5 * err(off)


def test_no_mask_where_padding_reaches_real_rows():
    """A graph that mixes positions without masking the padding (h @ h^T, as unmasked attention would): zeroing the
    padding rows of its input would change the real rows, so that input keeps every row in its range (found by
    fuzz: graphs:50000471 lost 25 dB); the tensors after the mixing, whose padding rows reach no real row, are
    masked."""
    s = 12
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, (K, K)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (s, N)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (N, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="mm1"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["mix"], name="mix"),       # [B, S, S]: every position
             helper.make_node("MatMul", ["mix", "w2"], ["y"], name="mm2"),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w3"], ["output"], name="mm3")]
    g = helper.make_graph(nodes, "mixing",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", s, K]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", s])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", s, N])],
                          [_init("w1", w1), _init("w2", w2), _init("w3", w3)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    cal = _feed(s=s)
    res = hago_py.quantize(m, cal, "x86_avx2", **FAST)
    masked = res.report.get("padding_mask", {})
    assert "input" not in masked and {"mix", "r"} <= set(masked)  # mix's padding *rows* reach no real row
    assert any("mixes positions" in note for note in res.plan.layers["mm1"].notes)
    real = cal["attention_mask"] != 0
    fp, q = run(m, cal)[0][real], run(res.model, cal)[0][real]
    assert 10 * np.log10((fp ** 2).sum() / ((fp - q) ** 2).sum()) > 25
    # static ranges: the input is calibrated on every row too
    st = hago_py.quantize(m, cal, "x86_avx2", measure_latency=False, smooth=False, activation_mode="static")
    st_off = hago_py.quantize(m, cal, "x86_avx2", measure_latency=False, smooth=False, activation_mode="static",
                              mask_padding=False)
    assert st.plan.activations["input"].scale == st_off.plan.activations["input"].scale
