import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import hago_py
from hago_py.cli import main as cli_main
from hago_py.errors import DataError, ModelError, OptionError, SpecError
from hago_py.quant.artifact import optimized_graph
from hago_py.quant.plan import QuantPlan

from models import calib, residual_layernorm, run, small_cnn, small_transformer_mlp, sqnr, with_bias_zero_points

FAST = dict(measure_latency=False)


@pytest.fixture(scope="module")
def cnn_result():
    return hago_py.quantize(small_cnn(), calib(), "x86_avx2", **FAST)


def test_quantized_output_close_to_fp32(cnn_result):
    x = calib(seed=7, n=16)
    ref = run(small_cnn(), x)[0]
    q = run(cnn_result.model, x)[0]
    assert sqnr(ref, q) > 25.0


def test_every_planned_layer_runs_as_integer_kernel(cnn_result):
    chk = cnn_result.report["artifact_check"]
    assert chk["ok"], chk["fallbacks"]
    ops = Counter(n.op_type for n in optimized_graph(cnn_result.model).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0


def test_int32_bias_dequantize_has_no_zero_point(cnn_result):
    m = cnn_result.model
    inits = {i.name: i for i in m.graph.initializer}
    bias_dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"
                and inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert sorted(n.name for n in bias_dqs) == ["conv1/bias_dq", "conv2/bias_dq", "fc/bias_dq"]
    assert all(len(n.input) == 2 for n in bias_dqs)  # the optional zero point (0) is left out
    zero_int32 = [i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT32
                  and not numpy_helper.to_array(i).any()]
    assert zero_int32 == []
    # ORT still fuses the integer kernels, and the outputs equal the old explicit-zero-point form's bit for bit
    old = with_bias_zero_points(m)
    assert len(old.SerializeToString()) > len(m.SerializeToString())
    for model in (m, old):
        ops = Counter(n.op_type for n in optimized_graph(model).graph.node)
        assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1 and ops["Conv"] == ops["Gemm"] == 0
    x = calib(seed=7, n=16)
    for opt in ("all", "basic"):
        np.testing.assert_array_equal(run(m, x, opt)[0], run(old, x, opt)[0])


def test_weight_scales_exact_per_channel(cnn_result):
    m = cnn_result.model
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    lp = cnn_result.plan.layers["conv1"]
    w = numpy_helper.to_array({i.name: i for i in small_cnn().graph.initializer}["w1"])
    qmax = 2 ** (lp.weight.bits - 1) - 1
    expected = np.abs(w).reshape(8, -1).max(axis=1) / qmax
    np.testing.assert_allclose(inits["w1_scale"], expected.astype(np.float32), rtol=1e-6)
    q = inits["w1_quantized"].astype(np.int64)
    assert np.abs(q).max() <= qmax
    # dequantized weights within half a step of the FP32 weights
    deq = q * inits["w1_scale"].reshape(-1, 1, 1, 1)
    assert np.all(np.abs(deq - w) <= inits["w1_scale"].reshape(-1, 1, 1, 1) / 2 + 1e-7)


def test_relu_outputs_use_zero_point_zero(cnn_result):
    plan = cnn_result.plan
    assert plan.activations["r1"].zero_point == [0]          # Conv+Relu fused: quantized after the Relu
    assert "c1" not in plan.activations                     # no Q/DQ between Conv and Relu
    assert plan.activations["f"].shared_with == "g1"        # Flatten reuses the pool's qparams


def test_plan_json_round_trip(cnn_result, tmp_path):
    plan = cnn_result.plan
    again = QuantPlan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert again.diff(plan) == []
    p = tmp_path / "plan.json"
    plan.save(p)
    assert QuantPlan.load(p).to_json() == plan.to_json()


def test_same_inputs_same_bytes():
    a = hago_py.quantize(small_cnn(), calib(), "x86_avx2", **FAST)
    b = hago_py.quantize(small_cnn(), calib(), "x86_avx2", **FAST)
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
    assert a.plan.to_json() == b.plan.to_json()


def test_spec_rules_obeyed_op_missing_from_spec_stays_fp(tmp_path):
    spec = hago_py.load_spec("x86_avx2").to_dict()
    del spec["ops"]["Add"]
    spec["fusion_patterns"] = [p for p in spec["fusion_patterns"] if "Add" not in p]
    res = hago_py.quantize(small_cnn(), calib(), spec, **FAST)
    add = res.plan.layers.get("add")
    assert add is None or not add.quantize
    ops = Counter(n.op_type for n in optimized_graph(res.model).graph.node)
    assert ops["QLinearAdd"] == 0 and ops["QLinearConv"] == 2


def test_spec_without_bit_pair_is_an_error_unless_simulated():
    with pytest.raises(OptionError, match=r"x86_avx2 has no W6A8 scheme for Conv, Gemm .*W8A8.*simulate=True"):
        hago_py.quantize(small_cnn(), calib(), "x86_avx2", weight_bits=6, **FAST)
    with pytest.raises(OptionError, match="no W4A4 scheme"):
        hago_py.quantize(small_cnn(), calib(), "x86_avx2", weight_bits=4, activation_bits=4, **FAST)
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", weight_bits=6, simulate=True, **FAST)
    assert all(lp.simulated for lp in res.plan.quantized_layers() if lp.weight is not None)
    assert res.report["artifact_check"]["ok"]


def test_w4_weights_stored_as_int4_and_model_shrinks():
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", weight_bits=4, simulate=True, **FAST)
    m = res.model
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int4 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT4 and t.name.endswith("_quantized")]
    assert len(int4) == 3  # conv1, conv2, fc
    from onnx import numpy_helper
    for t in int4:
        q = numpy_helper.to_array(t).astype(np.int8)
        assert q.min() >= -7 and q.max() <= 7  # symmetric narrow int4
    fp_bytes = sum(t.ByteSize() for t in small_cnn().graph.initializer)
    q_bytes = sum(t.ByteSize() for t in int4)
    assert q_bytes < fp_bytes / 6
    x = calib(seed=7, n=16)
    assert sqnr(run(small_cnn(), x)[0], run(m, x)[0]) > 8.0


def test_saturation_hazard_drives_remedy(cnn_result):
    rem = cnn_result.report["remedy"]
    assert rem["hazards"] == ["avx2_u8s8_int16_pair"]
    cands = rem["candidates"]["avx2_u8s8_int16_pair"]
    assert "none" in cands and "reduce_range" in cands and "u8u8" in cands
    assert all(np.isfinite(v["sqnr_fused_db"]) for v in cands.values())
    # no hazard on VNNI: weights keep 8 bits and int8
    vnni = hago_py.quantize(small_cnn(), calib(), "x86_avx512_vnni", check_artifact=False, **FAST)
    assert vnni.report["remedy"]["chosen"] == "none"
    assert all(lp.weight.bits == 8 for lp in vnni.plan.quantized_layers() if lp.weight is not None)


def test_forced_reduce_range_gives_7_bit_weights():
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", saturation_remedy="reduce_range", **FAST)
    w = numpy_helper.to_array({i.name: i for i in res.model.graph.initializer}["w2_quantized"])
    assert np.abs(w.astype(np.int64)).max() <= 63


def test_dynamic_matmul_for_token_activations():
    m = small_transformer_mlp()
    x = {"input": np.random.default_rng(0).normal(0, 1, (8, 5, 16)).astype(np.float32)}
    res = hago_py.quantize(m, x, "x86_avx2", **FAST)
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 2 and ops["MatMul"] == 0
    assert res.report["artifact_check"]["ok"]
    assert sqnr(run(m, x)[0], run(res.model, x)[0]) > 25


def test_ort_fuses_the_quantized_model_like_the_fp32_model():
    """No shape annotations in the artifact: ORT must not fuse the residual Add + LayerNorm of the quantized
    model into SkipLayerNormalization when it does not do so for the FP32 model (slower on AVX2, measured)."""
    m = residual_layernorm()
    x = {"input": np.random.default_rng(0).normal(0, 1, (8, 5, 32)).astype(np.float32)}
    res = hago_py.quantize(m, x, "x86_avx2", **FAST)
    assert not res.model.graph.value_info
    sln = lambda model: Counter(n.op_type for n in optimized_graph(model).graph.node)["SkipLayerNormalization"]
    assert sln(m) == sln(res.model) == 0
    # the same artifact with its shapes inferred is fused: the check above is sensitive to the annotations
    assert sln(onnx.shape_inference.infer_shapes(res.model, data_prop=True)) == 1
    assert sqnr(run(m, x)[0], run(res.model, x)[0]) > 25
    # the FP32 side of every timing is the model as deployed too (no inferred shapes)
    from hago_py.pipeline import Pipeline

    pipe = Pipeline(m, x, "x86_avx2")
    assert pipe.proto.graph.value_info and not pipe.reference.graph.value_info
    assert sln(pipe.reference) == 0 and sln(pipe.proto) == 1


def test_unknown_target_and_bad_options():
    with pytest.raises(SpecError, match="x86_avx2"):
        hago_py.quantize(small_cnn(), calib(), "x86_avx3", **FAST)
    with pytest.raises(OptionError, match="weight_bitz"):
        hago_py.quantize(small_cnn(), calib(), "x86_avx2", weight_bitz=8, **FAST)


@pytest.mark.parametrize("data,match", [
    ({"input": np.zeros((0, 3, 8, 8), np.float32)}, "empty"),
    ({"inputs": np.zeros((4, 3, 8, 8), np.float32)}, "input"),
    ({"input": np.zeros((4, 3, 9, 8), np.float32)}, "axis"),
    ({"input": np.full((4, 3, 8, 8), np.nan, np.float32)}, "NaN"),
])
def test_bad_calibration_is_data_error(data, match):
    with pytest.raises(DataError, match=match):
        hago_py.quantize(small_cnn(), data, "x86_avx2", **FAST)


def test_cli_quantize_and_exit_codes(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(model))
    np.savez(tmp_path / "calib.npz", **calib())
    out = tmp_path / "q.onnx"
    rc = cli_main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out", str(out),
                   "--report", str(tmp_path / "rep"), "--no-latency", "-q"])
    assert rc == 0 and out.exists()
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "plan.json").exists()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["artifact_check"]["ok"]
    # bad input: one line, exit 2, nothing written
    out2 = tmp_path / "q2.onnx"
    rc = cli_main(["quantize", str(tmp_path / "missing.onnx"), "--calib", str(tmp_path / "calib.npz"),
                   "--out", str(out2)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.onnx" in err[0] and not out2.exists()
    rc = cli_main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out",
                   str(tmp_path / "no_dir" / "q.onnx")])
    assert rc == 2 and not (tmp_path / "no_dir").exists()
    rc = cli_main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out", str(out2),
                   "--target", "nope"])
    assert rc == 2 and not out2.exists()


def test_cli_w4_rounding(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(model))
    np.savez(tmp_path / "calib.npz", **calib())
    out = tmp_path / "q.onnx"
    rc = cli_main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out", str(out),
                   "--report", str(tmp_path / "rep"), "--weight-bits", "4", "--simulate", "--rounding", "gptq",
                   "--no-latency", "-q"])
    assert rc == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["options"]["rounding"] == "gptq" and rep["rounding"]["layers"]["conv1"]["bias_correction"]
    w4 = [t for t in onnx.load(str(out)).graph.initializer
          if t.data_type == onnx.TensorProto.INT4 and t.name.endswith("_quantized")]
    assert len(w4) == 3
    rc = cli_main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out", str(out),
                   "--weight-bits", "4", "--activation-bits", "4", "--rounding", "gptq", "--no-latency", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "no W4A4 scheme" in err and "simulate" in err


def test_cli_targets(capsys):
    assert cli_main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("x86_avx2", "x86_avx512_vnni", "cuda_t4", "arm_cortex_a72", "arm_cortex_a76"):
        assert name in out


def test_latency_is_measured_against_fp32_in_same_run():
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", check_artifact=False, timing_repeats=5)
    lat = res.report["latency"]
    assert lat["measured"] and set(lat["models"]) == {"fp32", "int8"} and lat["speedup"] > 0


def test_exclude_keeps_layer_fp_with_reason():
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", exclude=["conv2"], **FAST)
    lp = res.plan.layers["conv2"]
    assert not lp.quantize and "exclude" in lp.reason
    ops = Counter(n.op_type for n in optimized_graph(res.model).graph.node)
    assert ops["QLinearConv"] == 1


def test_op_types_unknown_to_spec_is_an_error():
    with pytest.raises(OptionError, match="LSTM"):
        hago_py.quantize(small_cnn(), calib(), "x86_avx2", op_types=["Conv", "LSTM"], **FAST)
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", op_types=["Conv"], **FAST)
    assert {lp.op_type for lp in res.plan.quantized_layers()} == {"Conv"}


def test_simulated_a4_activations_saturate_at_four_bits():
    """A4 in a uint8 container: values past the calibrated range saturate at code 15, as a 4-bit activation
    does (QuantizeLinear alone would keep them up to code 255)."""
    import onnx
    from models import calib, run, small_cnn

    res = hago_py.quantize(small_cnn(), calib(), activation_bits=4, simulate=True, measure_latency=False)
    tq = res.plan.resolve("input")
    assert tq.bits == 4 and tq.dtype == "uint8"
    s, z = tq.scale[0], tq.zero_point[0]
    m = onnx.ModelProto()
    m.CopyFrom(res.model)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "input_quantized")
    m.graph.output.append(onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    x = calib(n=2)["input"] * 50.0                                   # far past the calibrated range
    got = run(m, {"input": x}, optimization="basic")[-1]
    assert got.max() <= (15 - z) * s + 1e-6 and got.min() >= (0 - z) * s - 1e-6
    assert np.isclose(got.max(), (15 - z) * s, atol=1e-6)
