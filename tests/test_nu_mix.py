"""nonuniform_size (quant/nu_mix.py): 3- / 4-bit non-uniform layers chosen by sensitivity per byte under a bound on
their stored bytes."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago_py
from hago_py.errors import OptionError
from hago_py.quant.nu_mix import stored_bytes
from hago_py.quant.plan import TensorQuant
from hago_py.quant.weights import dequantize
from hago_py.report.write import render_markdown

from models import checked_model

FAST = dict(measure_latency=False, check_artifact=False)


def twin_cnn(seed: int = 0, ratio: float = 100.0) -> onnx.ModelProto:
    """input [N,16,8,8] -> two 3x3 convs 16->32 of the same shape on the same input, summed. ``big``'s weights are
    ``ratio`` times ``small``'s: small's quantization error is ~1/ratio of big's in the output, so it is the
    insensitive one."""
    rng = np.random.default_rng(seed)
    wb = rng.laplace(0, 0.1, (32, 16, 3, 3)).astype(np.float32)
    ws = (rng.laplace(0, 0.1, (32, 16, 3, 3)) / ratio).astype(np.float32)
    N = helper.make_node
    nodes = [N("Conv", ["input", "wb"], ["cb"], name="big", pads=[1, 1, 1, 1]),
             N("Conv", ["input", "ws"], ["cs"], name="small", pads=[1, 1, 1, 1]),
             N("Add", ["cb", "cs"], ["output"], name="sum")]
    inits = [numpy_helper.from_array(wb, "wb"), numpy_helper.from_array(ws, "ws")]
    return checked_model(nodes, inits, "twin_cnn", ["N", 16, 8, 8], ["N", 32, 8, 8])


def calib(n=32, seed=1):
    return {"input": np.random.default_rng(seed).normal(0, 1, (n, 16, 8, 8)).astype(np.float32)}


def _weight_levels(model, tensor):
    """Distinct int8 values per output channel of the weight DequantizeLinear reads for ``tensor`` (the codebook
    expansion run in ORT with the optimizations off)."""
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(tensor))
    probe = copy.deepcopy(model)
    probe.graph.output.append(helper.make_tensor_value_info(dq.input[0], TensorProto.INT8, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    w = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        [dq.input[0]], calib(n=1))[0]
    return max(np.unique(w[c]).size for c in range(w.shape[0]))


def _mix(size, **kw):
    return hago_py.quantize(twin_cnn(), calib(), "x86_avx2", weight_scheme="nonuniform", weight_bits=4,
                            nonuniform_size=size, **FAST, **kw)


def test_insensitive_layer_goes_to_3_bits_first():
    b4, b3 = stored_bytes([32, 16, 3, 3], 0, 4), stored_bytes([32, 16, 3, 3], 0, 3)
    assert b3 < b4
    int8 = 2 * 32 * 144
    # room for exactly one 3-bit layer
    res = _mix((b4 + b3 + (b4 - b3) // 2) / int8)
    mix = res.report["nonuniform_mix"]
    rows = {r["node"]: r for r in mix["layers"]}
    assert rows["small"]["bits"] == 3 and rows["big"]["bits"] == 4, rows
    assert rows["small"]["sensitivity"] < rows["big"]["sensitivity"] / 100
    assert mix["reached"] and mix["low_bits"] == 1 and mix["bytes_final"] == b4 + b3
    assert res.plan.layers["small"].weight.levels_bits == 3 and res.plan.layers["big"].weight.levels_bits == 4
    assert _weight_levels(res.model, "ws") <= 8 and 8 < _weight_levels(res.model, "wb") <= 16
    assert any("nonuniform_size" in n for n in res.plan.layers["small"].notes)
    md = render_markdown(res.report)
    assert "Non-uniform weights under a size budget" in md and "| `small` | Conv |" in md


def test_budget_that_holds_changes_nothing_and_unreachable_one_says_so():
    loose = _mix(0.99)
    assert loose.report["nonuniform_mix"]["low_bits"] == 0
    assert all(lp.weight.levels_bits == 4 for lp in loose.plan.quantized_layers() if lp.weight is not None)
    tight = _mix(0.05).report["nonuniform_mix"]
    assert tight["low_bits"] == 2 and not tight["reached"] and "above nonuniform_size" in tight["note"]


def test_user_layer_bits_win():
    res = _mix(0.05, layers={"big": {"weight_bits": 4}})
    rows = {r["node"]: r for r in res.report["nonuniform_mix"]["layers"]}
    assert rows["big"]["bits"] == 4 and rows["big"]["why"] == "set by the user" and rows["small"]["bits"] == 3


@pytest.mark.parametrize("kw,text", [
    (dict(weight_scheme="uniform", weight_bits=8, nonuniform_size=0.5), "nonuniform_size"),
    (dict(weight_scheme="nonuniform", weight_bits=3, nonuniform_size=0.5), "weight_bits=4"),
    (dict(weight_scheme="nonuniform", weight_bits=4, nonuniform_size=2.0), "nonuniform_size"),
])
def test_option_errors(kw, text):
    with pytest.raises(OptionError, match=text):
        hago_py.quantize(twin_cnn(), calib(), "x86_avx2", **FAST, **kw)


def test_not_with_a_search_or_hybrid():
    with pytest.raises(OptionError, match="search=True"):
        hago_py.quantize(twin_cnn(), calib(), "x86_avx2", weight_scheme="nonuniform", weight_bits=4,
                         nonuniform_size=0.5, search=True, measure_latency=False)
    with pytest.raises(OptionError, match="granularity=hybrid"):
        _mix(0.5, granularity="hybrid")


def test_dequantize_per_channel_axis():
    q = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    tq = TensorQuant(tensor="w", scale=[0.5, 2.0, 1.0, 4.0], zero_point=[0, 1, 0, 0], granularity="per_channel", axis=1)
    assert np.array_equal(dequantize(q, tq), (q - np.array([0, 1, 0, 0])) * np.array([0.5, 2.0, 1.0, 4.0]))
