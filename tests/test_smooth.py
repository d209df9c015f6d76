"""Activation smoothing (SmoothQuant, hago_py/ir/passes/smooth.py): function preserved, outliers moved into
the weights, folded into LayerNorm where nothing else reads its output, a Mul otherwise, and a quantized
model that is closer to FP32 than without it."""
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import hago_py
from hago_py.errors import OptionError
from hago_py.ir.io import to_ir, to_proto
from hago_py.ir.passes.smooth import SmoothActivationsPass, smoothable
from hago_py.quant.calibrate import channel_absmax, with_outputs

from models import run, sqnr, token_model

D, H = 32, 64


def ln_mlp(residual: bool, seed: int = 0) -> onnx.ModelProto:
    """x [B,S,D] -> LayerNorm (gamma with two outlier channels) -> MatMul+Add -> Relu -> MatMul [+ LN output]."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(D, np.float32)
    gamma[[3, 17]] = 25.0
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("gamma", gamma), ("beta", rng.normal(0, 0.1, D).astype(np.float32)),
        ("w1", rng.normal(0, 0.2, (D, H)).astype(np.float32)), ("b1", rng.normal(0, 0.1, H).astype(np.float32)),
        ("w2", rng.normal(0, 0.2, (H, D)).astype(np.float32))]]
    N = helper.make_node
    nodes = [N("LayerNormalization", ["input", "gamma", "beta"], ["ln"], name="ln", axis=-1),
             N("MatMul", ["ln", "w1"], ["m1"], name="fc1"), N("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             N("Relu", ["a1"], ["r1"], name="relu"),
             N("MatMul", ["r1", "w2"], ["m2" if residual else "output"], name="fc2")]
    if residual:
        nodes.append(N("Add", ["m2", "ln"], ["output"], name="residual"))
    return token_model(nodes, inits, "ln_mlp", D)


def data(n=16, seed=1):
    return {"input": np.random.default_rng(seed).normal(0, 1, (n, 6, D)).astype(np.float32)}


def _smoothed(model, alpha=0.5):
    amax = channel_absmax(model, ["ln"], [data()])
    m = to_ir(model)
    p = SmoothActivationsPass(amax, alpha)
    assert p(m).modified
    return to_proto(m), p.smoothed, amax


@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_preserves_the_function_and_flattens_the_outliers(residual):
    model = ln_mlp(residual)
    assert smoothable(to_ir(model)) == {"ln": ["fc1"]}
    sm, info, amax = _smoothed(model)
    x = data(4, seed=7)
    np.testing.assert_allclose(run(sm, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-4)
    (e,) = info
    assert e["layers"] == ["fc1"] and e["outlier_ratio_before"] > 10 and e["outlier_ratio_after"] < 0.5 * e["outlier_ratio_before"]
    ops = Counter(n.op_type for n in sm.graph.node)
    if residual:   # the LN output also feeds the residual Add: a Mul feeds fc1 only
        assert e["how"] == "Mul" and ops["Mul"] == 1
        mul = next(n for n in sm.graph.node if n.op_type == "Mul")
        fc1 = next(n for n in sm.graph.node if n.name == "fc1")
        assert fc1.input[0] == mul.output[0]
        assert next(n for n in sm.graph.node if n.name == "residual").input[1] == "ln"
    else:          # pre-LN: folded into gamma / beta, no extra op
        assert e["how"].startswith("folded") and ops["Mul"] == 0
    # the scale is the paper's s_k = max|X_k|^a / max|W_k|^(1-a), and the smoothed input's range is max|X_k| / s_k
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    s = amax["ln"] ** 0.5 / np.abs(w1).max(1) ** 0.5
    w1s = numpy_helper.to_array(next(i for i in sm.graph.initializer if i.name.startswith("w1_smooth")))
    np.testing.assert_allclose(w1s, w1 * s[:, None], rtol=1e-5)


def test_smoothing_makes_the_quantized_model_closer_to_fp32():
    model = ln_mlp(residual=True)
    cal, x = data(64), data(32, seed=5)
    on = hago_py.quantize(model, cal, "x86_avx2", check_artifact=False, measure_latency=False)
    off = hago_py.quantize(model, cal, "x86_avx2", smooth=False, check_artifact=False, measure_latency=False)
    assert on.report["smoothing"] and not off.report["smoothing"]
    assert any(p.startswith("smooth_activations") for p in on.report["prepare_passes"])
    ref = run(model, x)[0]
    assert sqnr(ref, run(on.model, x)[0]) > sqnr(ref, run(off.model, x)[0]) + 3


def test_padding_rows_are_left_out_of_the_statistics():
    model = ln_mlp(residual=False)
    x = data(2)
    mask = np.ones((2, 6), np.int64)
    mask[:, 4:] = 0
    x["input"][:, 4:, 5] = 1e4          # huge values only on padding rows
    m = with_outputs(model, ["ln"])
    masked = channel_absmax(model, ["ln"], [{**x, "attention_mask": mask}], mask_input="attention_mask")["ln"]
    allrows = channel_absmax(model, ["ln"], [x])["ln"]
    ln = run(m, x)[1]
    np.testing.assert_allclose(masked, np.abs(ln[:, :4]).reshape(-1, D).max(0), rtol=1e-6)
    assert allrows[5] > 2 * masked[5]


def test_smooth_alpha_and_timing_repeats_are_validated():
    with pytest.raises(OptionError, match="smooth_alpha"):
        hago_py.quantize(ln_mlp(False), data(), "x86_avx2", smooth_alpha=1.5)
    with pytest.raises(OptionError, match="timing_repeats=0"):
        hago_py.quantize(ln_mlp(False), data(), "x86_avx2", timing_repeats=0)
