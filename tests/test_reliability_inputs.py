"""Reliability on odd inputs: MatMul saturation layouts, remedy choice with non-finite SQNR, malformed hardware
specs, odd calibration data, and ONNX Runtime failures reported as one short line."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago_py
from hago_py.backends.ort import OrtBackend
from hago_py.data import InputSpec, load_calibration, model_input_specs
from hago_py.errors import BackendError, DataError, HagoError, SpecError
from hago_py.hw import BUILTIN_DIR, load_spec
from hago_py.quant import remedy
from hago_py.quant.saturation import layer_rows_and_weight, saturation_sqnr_db

from models import calib, run, small_cnn, small_transformer_mlp, sqnr

FAST = dict(measure_latency=False)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def dense_model(w: np.ndarray, rank: int = 2, op: str = "MatMul", trans_b: int = 0) -> onnx.ModelProto:
    """input [N, K] (or [B, S, K]) -> MatMul / Gemm with the constant weight ``w`` -> output."""
    k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
    lead = ["N"] if rank == 2 else ["B", "S"]
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    g = helper.make_graph([helper.make_node(op, ["input", "W"], ["output"], name="mm", **attrs)], "dense",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, lead + [k])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, lead + [n])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def static_batch_cnn(b: int = 4) -> onnx.ModelProto:
    m = small_cnn()
    for vi in (m.graph.input[0], m.graph.output[0]):
        d = vi.type.tensor_type.shape.dim[0]
        d.ClearField("dim_param")
        d.dim_value = b
    onnx.checker.check_model(m)
    return m


def ids_model() -> onnx.ModelProto:
    """ids int64 [N, 4] -> Gather(table) -> ReduceMean -> MatMul: a model with an integer input."""
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (10, 8)).astype(np.float32)
    w = rng.normal(0, 0.3, (8, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("ReduceMean", ["e"], ["r"], name="mean", axes=[1], keepdims=0),
             helper.make_node("MatMul", ["r", "w"], ["output"], name="fc")]
    g = helper.make_graph(nodes, "ids", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# ---------------------------------------------------------------------------------------------------------
# 1. saturation estimate: layouts of MatMul / Gemm, per-tensor and per-channel; remedy choice
# ---------------------------------------------------------------------------------------------------------


def _saturating_weight(k=16, n=8, seed=0):
    # positive activations meet positive weights of similar size: u8 x s8 pair sums exceed int16
    return (np.abs(np.random.default_rng(seed).normal(0, 0.3, (k, n))) + 0.5).astype(np.float32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_matmul_per_tensor_and_per_channel_quantize_with_saturation_estimate(per_channel):
    w = _saturating_weight()
    x = np.random.default_rng(1).uniform(0, 1, (32, 16)).astype(np.float32)
    res = hago_py.quantize(dense_model(w), {"input": x}, "x86_avx2", per_channel=per_channel, **FAST)
    rem = res.report["remedy"]
    est = rem["layer_saturation_sqnr_db"]["mm"]
    assert math.isfinite(est) and est < remedy.SATURATION_THRESHOLD_DB  # the hazard is real here
    assert rem["saturating_layers"] == ["mm"]
    assert res.plan.layers["mm"].weight.granularity == ("per_channel" if per_channel else "per_tensor")
    assert sqnr(run(dense_model(w), {"input": x})[0], run(res.model, {"input": x})[0]) > 20


@pytest.mark.parametrize("per_channel", [False, True])
def test_saturation_estimate_independent_of_weight_layout(per_channel):
    """The same product stored as MatMul [K,N], Gemm transB=0 [K,N] and Gemm transB=1 [N,K] has one estimate
    (a square weight too, where a wrong transpose does not crash but silently mis-estimates)."""
    for k, n in ((16, 8), (16, 16)):
        w = _saturating_weight(k, n, seed=k + n)
        x = np.random.default_rng(2).uniform(0, 1, (24, k)).astype(np.float32)
        models = [dense_model(w), dense_model(w, op="Gemm"), dense_model(np.ascontiguousarray(w.T), op="Gemm",
                                                                          trans_b=1)]
        est = [hago_py.quantize(m, {"input": x}, "x86_avx2", per_channel=per_channel, **FAST)
               .report["remedy"]["layer_saturation_sqnr_db"]["mm"] for m in models]
        assert est[0] == pytest.approx(est[1]) and est[0] == pytest.approx(est[2]), est


def test_rank3_matmul_static_activations_get_an_estimate():
    w = _saturating_weight()
    x = np.random.default_rng(3).uniform(0, 1, (6, 5, 16)).astype(np.float32)
    for pc in (False, True):
        res = hago_py.quantize(dense_model(w, rank=3), {"input": x}, "x86_avx2", per_channel=pc,
                               activation_mode="static", **FAST)
        assert math.isfinite(res.report["remedy"]["layer_saturation_sqnr_db"]["mm"])


@pytest.mark.parametrize("op,trans_b,rank", [("MatMul", 0, 2), ("MatMul", 0, 3), ("Gemm", 0, 2), ("Gemm", 1, 2)])
def test_layer_rows_and_weight_reproduces_the_product(op, trans_b, rank):
    rng = np.random.default_rng(0)
    k, n = 6, 4
    w_math = rng.normal(0, 1, (k, n)).astype(np.float32)            # y = x @ w_math
    stored = np.ascontiguousarray(w_math.T) if trans_b else w_math
    x = rng.normal(0, 1, (3, k) if rank == 2 else (2, 3, k)).astype(np.float32)
    rows, wm = layer_rows_and_weight(op, {"transB": trans_b} if op == "Gemm" else {}, x, stored)
    assert wm.shape == (n, k)
    np.testing.assert_allclose(rows @ wm.T, (x @ w_math).reshape(-1, n), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        layer_rows_and_weight(op, {"transB": trans_b} if op == "Gemm" else {}, x[..., :k - 1], stored)


def test_saturation_sqnr_matches_brute_force():
    rng = np.random.default_rng(5)
    xq = rng.integers(0, 256, (40, 7)).astype(np.int32)
    wq = rng.integers(-127, 128, (3, 7)).astype(np.int32)
    zp = 10
    xp, wp = np.pad(xq, ((0, 0), (0, 1))), np.pad(wq, ((0, 0), (0, 1)))
    err = 0.0
    for r in xp:
        for c in wp:
            p = r[0::2] * c[0::2] + r[1::2] * c[1::2]
            err += float((p - np.clip(p, -32768, 32767)).sum()) ** 2
    signal = float((((xq - zp) @ wq.T).astype(np.float64) ** 2).sum())
    assert saturation_sqnr_db(xq, zp, wq) == pytest.approx(10 * np.log10(signal / err))


@pytest.mark.parametrize("figures,expected", [
    ({"none": float("nan"), "reduce_range": float("nan"), "u8u8": float("nan")}, "none"),
    ({"none": float("nan"), "reduce_range": 30.0, "u8u8": 31.0}, "reduce_range"),
    ({"none": 20.0, "reduce_range": float("inf"), "u8u8": float("inf")}, "reduce_range"),
    ({"none": float("inf"), "reduce_range": float("inf")}, "none"),
    ({"none": float("-inf"), "reduce_range": float("nan"), "u8u8": 12.0}, "u8u8"),
    ({"none": float("-inf"), "reduce_range": float("-inf")}, "none"),
    ({"none": 40.0, "reduce_range": 42.5, "u8u8": 45.0}, "reduce_range"),
])
def test_select_candidate_handles_non_finite(figures, expected):
    choice, why = remedy.select_candidate(figures)
    assert choice == expected and why.startswith(expected)
    assert remedy.select_candidate(dict(figures)) == (choice, why)  # deterministic


def test_remedy_choice_survives_nan_sqnr(monkeypatch):
    import hago_py.quant.artifact as artifact

    monkeypatch.setattr(artifact, "sqnr_db", lambda a, b: float("nan"))
    w = _saturating_weight()
    x = np.random.default_rng(1).uniform(0, 1, (32, 16)).astype(np.float32)
    res = hago_py.quantize(dense_model(w), {"input": x}, "x86_avx2", per_channel=False, check_artifact=False,
                           **FAST)
    rem = res.report["remedy"]
    assert rem["chosen"] == "none" and "NaN" in rem["why"]
    assert all(math.isnan(c["sqnr_fused_db"]) for c in rem["candidates"]["avx2_u8s8_int16_pair"].values())


# ---------------------------------------------------------------------------------------------------------
# 2. hardware specs
# ---------------------------------------------------------------------------------------------------------


def _raw():
    return json.loads((BUILTIN_DIR / "x86_avx2.json").read_text(encoding="utf-8"))


def _write(tmp_path, text, name="spec.json"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("text", ["[" * 100000, '{"a": ' * 100000, "[" * 40 + "]" * 40])
def test_deeply_nested_spec_file(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert str(p) in one_line(ei.value)


def test_deeply_nested_spec_dict():
    deep: list = []
    for _ in range(100000):
        deep = [deep]
    raw = _raw()
    raw["notes"] = deep
    with pytest.raises(SpecError, match="nested too deeply"):
        load_spec(raw)
    cyclic = _raw()
    cyclic["backend"]["options"] = cyclic
    with pytest.raises(SpecError):
        load_spec(cyclic)


def test_spec_file_not_utf8(tmp_path):
    good = json.dumps(_raw()).encode()
    p = _write(tmp_path, good.replace(b"x86-64 CPU", b"x86-64 \xff\xfe CPU"))
    with pytest.raises(SpecError, match="not UTF-8") as ei:
        load_spec(p)
    assert str(p) in one_line(ei.value)
    p16 = _write(tmp_path, json.dumps(_raw()).encode("utf-16"), "spec16.json")
    with pytest.raises(SpecError, match="UTF-16"):
        load_spec(p16)
    # a UTF-8 byte order mark is harmless
    assert load_spec(_write(tmp_path, b"\xef\xbb\xbf" + good, "bom.json")).name == "x86_avx2"


@pytest.mark.parametrize("where,bad,good", [
    ("ops", "conv", "Conv"), ("ops", "Conv2d", "Conv"), ("ops", "Matmul", "MatMul"),
    ("passthrough", "relu", "Relu"), ("passthrough", "Flaten", "Flatten"),
    ("fusion", "conv", "Conv"), ("fusion", "Matmul", "MatMul"), ("dynamic", "Matmul", "MatMul"),
])
def test_op_names_must_be_onnx_op_types(where, bad, good):
    raw = _raw()
    if where == "ops":
        raw["ops"][bad] = raw["ops"]["Add"]
        path = f"ops.{bad}"
    elif where == "passthrough":
        raw["passthrough_ops"].append(bad)
        path = f"passthrough_ops[{len(raw['passthrough_ops']) - 1}]"
    elif where == "fusion":
        raw["fusion_patterns"].append([bad, "Relu"])
        path = f"fusion_patterns[{len(raw['fusion_patterns']) - 1}][0]"
    else:
        raw["dynamic_activations"]["ops"].append(bad)
        path = "dynamic_activations.ops[2]"
    with pytest.raises(SpecError) as ei:
        load_spec(raw)
    msg = one_line(ei.value)
    assert f"{path}: unknown op {bad!r} (did you mean {good!r}?)" in msg


def test_other_domain_op_rejected():
    raw = _raw()
    raw["passthrough_ops"].append("com.microsoft.QGemm")
    with pytest.raises(SpecError, match="default domain"):
        load_spec(raw)


@pytest.mark.parametrize("field", ["peak_int8_ops_per_s", "peak_fp32_flops_per_s", "memory_bandwidth_bytes_per_s",
                                   "peak_fp16_flops_per_s", "peak_int4_ops_per_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1.0, 0, 10 ** 400])
def test_cost_figures_must_be_finite_and_positive(field, value):
    raw = _raw()
    raw["cost_model"][field] = value
    with pytest.raises(SpecError) as ei:
        load_spec(raw)
    assert f"cost_model.{field}" in one_line(ei.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_cost_figures_nan_literal_in_file(tmp_path, literal):
    text = json.dumps(_raw(), indent=1).replace('"peak_int8_ops_per_s": 120000000000.0',
                                                f'"peak_int8_ops_per_s": {literal}')
    assert literal in text
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    msg = one_line(ei.value)
    assert str(p) in msg and "cost_model.peak_int8_ops_per_s" in msg


def _paths(obj, prefix=()):
    """Every key path of a JSON document (of each list, only the first and last element are descended)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i in sorted({0, len(obj) - 1}) if obj else ():
            yield from _paths(obj[i], prefix + (i,))


def test_spec_mutations_never_crash():
    base = _raw()
    crashes = []
    for path in list(_paths(base))[1:]:
        for mutation in ("delete", None, "text", [], 1.5, float("nan")):
            raw = copy.deepcopy(base)
            parent = raw
            for k in path[:-1]:
                parent = parent[k]
            if mutation == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = mutation
            try:
                load_spec(raw)
            except SpecError as e:
                one_line(e)
            except Exception as e:  # noqa: BLE001 - that is what the test looks for
                crashes.append((path, mutation, f"{type(e).__name__}: {e}"))
    assert not crashes, crashes[:5]


def test_spec_odd_sources():
    for src in ("x86_avx2\x00", "a" * 5000 + ".json", "/" + "a" * 5000, b"x86_avx2", 3.5, ["x86_avx2"]):
        with pytest.raises(SpecError):
            load_spec(src)  # type: ignore[arg-type]
    raw = _raw()
    raw["cost_model"]["cores"] = np.int64(1)  # not plain JSON
    with pytest.raises(SpecError, match="not plain JSON"):
        load_spec(raw)
    raw = _raw()
    raw["isa"] = ("avx2", "fma")  # tuples are JSON arrays
    assert load_spec(raw).isa == ("avx2", "fma")


# ---------------------------------------------------------------------------------------------------------
# 3. calibration data
# ---------------------------------------------------------------------------------------------------------


def test_static_batch_model_uses_its_batch_whatever_calib_batch_size():
    m = static_batch_cnn(4)
    specs = model_input_specs(m)
    ds = load_calibration(calib(n=10), specs, batch_size=16, max_samples=512)
    assert [b["input"].shape[0] for b in ds] == [4, 4] and ds.num_samples == 8
    assert any("last 2 of 10 samples" in n for n in ds.notes)
    assert any("calib_batch_size" in n for n in ds.notes)
    res = hago_py.quantize(m, calib(n=10), "x86_avx2", **FAST)   # default calib_batch_size=16
    assert res.report["calibration_samples"] == 8 and res.report["artifact_check"]["ok"]
    x = calib(seed=9, n=4)
    assert sqnr(run(m, x)[0], run(res.model, x)[0]) > 20


def test_static_batch_too_few_samples_says_how_many():
    with pytest.raises(DataError) as ei:
        hago_py.quantize(static_batch_cnn(4), calib(n=3), "x86_avx2", **FAST)
    msg = one_line(ei.value)
    assert "fixed batch size of 4" in msg and "only 3 sample" in msg and "at least 4" in msg
    assert "batch_size=" not in msg
    with pytest.raises(DataError, match="max_calib_samples"):
        hago_py.quantize(static_batch_cnn(4), calib(n=10), "x86_avx2", max_calib_samples=2, **FAST)


def test_no_message_suggests_a_batch_size_argument():
    import inspect

    from hago_py.data import readers

    src = inspect.getsource(readers)
    assert "pass batch_size" not in src
    with pytest.raises(DataError) as ei:
        load_calibration(calib(n=4), model_input_specs(small_cnn()), batch_size=0)
    assert "calib_batch_size" in one_line(ei.value)


@pytest.mark.parametrize("dtype", [">f4", ">f8", "<f4", ">f2"])
def test_big_endian_float_data_is_converted(dtype):
    x = calib(n=6)["input"]
    specs = model_input_specs(small_cnn())
    ds = load_calibration({"input": x.astype(dtype)}, specs, batch_size=16, max_samples=512)
    b = next(iter(ds))
    assert b["input"].dtype == np.dtype(np.float32) and b["input"].dtype.isnative
    np.testing.assert_array_equal(b["input"], x.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("dtype", [">i8", ">i4", "<i8", "u1"])
def test_big_endian_int_data_is_converted(dtype):
    ids = np.random.default_rng(0).integers(0, 10, (5, 4))
    spec = model_input_specs(ids_model())
    b = next(iter(load_calibration({"ids": ids.astype(dtype)}, spec, batch_size=16)))
    assert b["ids"].dtype == np.dtype(np.int64) and b["ids"].dtype.isnative
    np.testing.assert_array_equal(b["ids"], ids)
    res = hago_py.quantize(ids_model(), {"ids": ids.astype(dtype)}, "x86_avx2", **FAST)
    assert res.report["artifact_check"]["ok"]


def test_dtype_names_in_messages_are_unambiguous():
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3))]
    with pytest.raises(DataError) as ei:
        load_calibration({"x": np.zeros((2, 3), ">c8")}, spec)
    msg = one_line(ei.value)
    assert "complex64 (big-endian)" in msg and "expects float32" in msg


def _gen_raises():
    yield {"input": calib(n=4)["input"]}
    raise RuntimeError("disk on fire")


def _gen_non_dicts():
    yield [1, 2, 3]


ODD = {
    "0-d array": lambda: np.array(1.0, np.float32),
    "0-d in dict": lambda: {"input": np.array(1.0, np.float32)},
    "object array": lambda: {"input": np.array([calib(n=1)["input"][0], None], dtype=object)},
    "bool array": lambda: {"input": calib(n=4)["input"] > 0},
    "list of lists": lambda: {"input": calib(n=4)["input"].tolist()},
    "ragged lists": lambda: {"input": [[1.0, 2.0], [3.0]]},
    "generator raises": _gen_raises,
    "generator of non-dicts": _gen_non_dicts,
    "zero-size dim": lambda: {"input": np.zeros((4, 3, 0, 8), np.float32)},
    "zero samples": lambda: {"input": np.zeros((0, 3, 8, 8), np.float32)},
    "float16": lambda: {"input": calib(n=4)["input"].astype(np.float16)},
    "huge 1e30": lambda: {"input": calib(n=4)["input"] * np.float32(1e30)},
    "float64 beyond float32": lambda: {"input": calib(n=4)["input"].astype(np.float64) * 1e39},
    "all zero": lambda: {"input": np.zeros((4, 3, 8, 8), np.float32)},
    "one sample": lambda: {"input": calib(n=1)["input"]},
    "strings": lambda: {"input": np.full((2, 3, 8, 8), "a")},
    "none value": lambda: {"input": None},
    "scalar python": lambda: 3.0,
    "empty list": lambda: [],
    "list of empty dicts": lambda: [{}],
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_calibration_data_quantizes_or_one_line_data_error(case):
    model = small_cnn()
    try:
        ds = load_calibration(ODD[case](), model_input_specs(model), batch_size=16, max_samples=512)
        list(ds)
    except DataError as e:
        one_line(e)
    try:
        res = hago_py.quantize(model, ODD[case](), "x86_avx2", **FAST)
    except DataError as e:
        one_line(e)
        return
    assert res.report["artifact_check"]["ok"], case
    scales = [numpy_helper.to_array(i) for i in res.model.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales), case


def test_odd_data_specific_messages():
    specs = model_input_specs(small_cnn())
    with pytest.raises(DataError, match=r"batch 1 failed: the data source raised RuntimeError: disk on fire") as ei:
        list(load_calibration(_gen_raises(), specs))
    assert "disk on fire" in (ei.value.details or "")
    with pytest.raises(DataError, match="empty axis 2"):
        load_calibration({"input": np.zeros((4, 3, 0, 8), np.float32)}, specs)
    with pytest.raises(DataError, match="beyond the float32 range"):
        load_calibration({"input": calib(n=4)["input"].astype(np.float64) * 1e39}, specs)
    # a dynamic dim given as 0 is an empty sample, not data
    mlp = model_input_specs(small_transformer_mlp())
    with pytest.raises(DataError, match="empty axis 1"):
        load_calibration({"input": np.zeros((4, 0, 16), np.float32)}, mlp)
    with pytest.raises(DataError, match="empty axis 1"):
        hago_py.quantize(small_transformer_mlp(), {"input": np.zeros((4, 0, 16), np.float32)}, "x86_avx2", **FAST)


def test_integer_input_given_as_float():
    ids = np.random.default_rng(0).integers(0, 10, (5, 4))
    with pytest.raises(DataError, match=r"'ids' has dtype float32 but the model expects int64.*astype") as ei:
        hago_py.quantize(ids_model(), {"ids": ids.astype(np.float32)}, "x86_avx2", **FAST)
    one_line(ei.value)
    res = hago_py.quantize(ids_model(), {"ids": ids.astype(np.int32)}, "x86_avx2", **FAST)  # lossless widening
    assert res.report["artifact_check"]["ok"]


def test_all_zero_calibration_gives_nonzero_scales():
    for model, shape in ((small_cnn(), (4, 3, 8, 8)), (small_transformer_mlp(), (4, 5, 16))):
        res = hago_py.quantize(model, {"input": np.zeros(shape, np.float32)}, "x86_avx2", activation_mode="static",
                               **FAST)
        scales = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer if i.name.endswith("_scale")}
        assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales.values()), scales
        out = run(res.model, {"input": np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)})[0]
        assert np.all(np.isfinite(out))


# ---------------------------------------------------------------------------------------------------------
# 4. backend errors
# ---------------------------------------------------------------------------------------------------------


def _reshape_model():
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"], name="my_reshape")], "reshaper",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([4, -1], np.int64), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _check_backend_error(e: BackendError, action: str, must: str):
    msg = one_line(e)
    assert msg.startswith(f"ONNX Runtime could not {action}"), msg
    assert must in msg, msg
    assert len(msg) < 400 and "onnxruntime_src" not in msg and "[ONNXRuntimeError]" not in msg, msg
    assert e.details and ("ONNXRuntimeError" in e.details or "missing" in e.details)


def test_backend_run_error_names_node_and_keeps_details():
    be = OrtBackend()
    sess = be.compile(_reshape_model())
    with pytest.raises(BackendError) as ei:
        be.run(sess, {"x": np.zeros((3, 6), np.float32)})
    _check_backend_error(ei.value, "run", "node 'my_reshape' (Reshape)")
    assert "model 'reshaper'" in str(ei.value)
    assert "reshape_helper.h" in ei.value.details  # ORT's full text, for HAGO_DEBUG=1
    with pytest.raises(BackendError) as ei:
        be.run(sess, {"x": np.zeros((3, 5, 1), np.float32)})
    _check_backend_error(ei.value, "run", "input 'x'")
    with pytest.raises(BackendError) as ei:
        be.run(sess, {"z": np.zeros((4, 6), np.float32)})
    _check_backend_error(ei.value, "run", "['x']")


def test_backend_time_error_is_a_backend_error():
    with pytest.raises(BackendError) as ei:
        OrtBackend().time({"a": _reshape_model()}, {"x": np.zeros((3, 6), np.float32)}, repeats=1, warmup=1)
    _check_backend_error(ei.value, "run", "my_reshape")


def test_backend_load_errors(tmp_path):
    be = OrtBackend()
    g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="bad_add")], "typed",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([4], np.int64), "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(BackendError) as ei:
        be.compile(m)
    _check_backend_error(ei.value, "load", "node 'bad_add'")
    g2 = helper.make_graph([helper.make_node("FooOp", ["x"], ["y"], name="foo")], "custom",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BackendError) as ei:
        be.compile(m2)
    _check_backend_error(ei.value, "load", "node 'foo' (FooOp)")
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BackendError) as ei:
        be.compile(str(bad))
    _check_backend_error(ei.value, "load", str(bad))


def test_all_errors_are_hago_errors():
    for cls in (BackendError, DataError, SpecError):
        assert issubclass(cls, HagoError)


def test_hand_built_cost_model_with_bad_figures_is_an_option_error():
    from hago_py.errors import OptionError
    from hago_py.hw import CostModel, predict_latency

    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        cm = CostModel(peak_int8_ops_per_s=bad, peak_fp32_flops_per_s=1e9, memory_bandwidth_bytes_per_s=1e9,
                       cores=1, sources=("test",))
        with pytest.raises(OptionError, match="peak_int8_ops_per_s"):
            predict_latency(1e9, 1e6, cm, int8=True)
