"""BRECQ block reconstruction and the torch interpreter behind it (torch is the optional extra; CI installs it)."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago_py.errors import DataError, OptionError
from hago_py.hw import load_spec
from hago_py.ir import prepare
from hago_py.quant.annotate import annotate
from hago_py.quant.calibrate import apply_observers, collect
from hago_py.quant.observers import qrange
from hago_py.quant.options import QuantOptions
from hago_py.quant.realize import realize
from hago_py.quant.remedy import choose_remedy

import test_blocks as tb
from models import calib, run, small_cnn, small_transformer_mlp, sqnr


@pytest.fixture(scope="module")
def torch():
    t = pytest.importorskip("torch")
    prev = t.get_num_threads()
    t.set_num_threads(1)
    yield t
    t.set_num_threads(prev)


def _i(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "zoo", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_zoo(seed=0):
    """Conv with groups / dilations / strides / asymmetric and SAME pads, Pad(reflect), Clip, pools, Gemm."""
    rng = np.random.default_rng(seed)
    N = helper.make_node
    f32 = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    inits = [_i("pads", np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64)), _i("w1", f32(6, 4, 3, 3)), _i("b1", f32(6)),
             _i("w2", f32(6, 1, 3, 3)), _i("lo", np.array(0.0, np.float32)), _i("hi", np.array(1.5, np.float32)),
             _i("wg", f32(6, 5)), _i("cg", f32(5)), _i("w3", f32(6, 3, 2, 2)), _i("two", np.array(2.0, np.float32))]
    nodes = [
        N("Pad", ["input", "pads"], ["xp"], name="pad", mode="reflect"),
        N("Conv", ["xp", "w1", "b1"], ["c1"], name="conv_asym", strides=[2, 1], pads=[1, 0, 2, 1]),
        N("Conv", ["c1", "w2"], ["c2"], name="conv_dw", group=6, dilations=[2, 2], pads=[2, 2, 2, 2]),
        N("Clip", ["c2", "lo", "hi"], ["c3"], name="clip"),
        N("Conv", ["c3", "w3"], ["c4"], name="conv_grouped", group=2, strides=[2, 2], auto_pad="SAME_UPPER"),
        N("MaxPool", ["c3"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
        N("AveragePool", ["c3"], ["ap"], name="avgpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        N("Sigmoid", ["ap"], ["sg"], name="sigmoid"),
        N("Mul", ["ap", "sg"], ["sw"], name="swish"),
        N("GlobalAveragePool", ["sw"], ["gp"], name="gap"),
        N("ReduceMean", ["mp"], ["rm"], name="reduce_mean", axes=[2, 3], keepdims=1),
        N("GlobalAveragePool", ["c4"], ["g4"], name="gap4"),
        N("Add", ["gp", "rm"], ["s"], name="add"),
        N("Sub", ["s", "g4"], ["s2"], name="sub"),
        N("Flatten", ["s2"], ["fl"], name="flatten"),
        N("Gemm", ["fl", "wg", "cg"], ["gm"], name="gemm", alpha=0.5, beta=2.0),
        N("Tanh", ["gm"], ["th"], name="tanh"),
        N("Pow", ["th", "two"], ["pw"], name="pow"),
        N("Div", ["gm", "two"], ["dv"], name="div"),
        N("Add", ["pw", "dv"], ["lg"], name="add2"),
        N("Softmax", ["lg"], ["output"], name="softmax", axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 9, 8])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5]),
                   helper.make_tensor_value_info("c4", TensorProto.FLOAT, ["N", 3, "h", "w"])], inits)


def seq_zoo(seed=0):
    """Attention-like graph: Shape/Gather/Unsqueeze/Concat/Reshape, Transpose, Softmax, a mask with
    Cast/Equal/Where/Expand, Erf GELU, Sqrt, LayerNormalization, Slice (negative step), Squeeze, Gather."""
    rng = np.random.default_rng(seed)
    N = helper.make_node
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = [_i("wq", rng.normal(0, 0.4, (8, 8)).astype(np.float32)), _i("g", np.ones(8, np.float32)),
             _i("b", np.zeros(8, np.float32)), _i("zero", np.array(0, np.int64)), _i("one_i", np.array(1, np.int64)),
             _i("ax0", i64(0)),
             _i("heads", i64(2)), _i("hd", i64(4)), _i("perm_c", i64(8)), _i("neg", np.array(-1e4, np.float32)),
             _i("zf", np.array(0.0, np.float32)), _i("sqrt2", np.array(1.4142135, np.float32)),
             _i("half", np.array(0.5, np.float32)), _i("onef", np.array(1.0, np.float32)),
             _i("ax12", i64(1, 2)), _i("s_st", i64(-1)), _i("s_en", i64(-(2 ** 62))), _i("s_ax", i64(2)),
             _i("s_sp", i64(-1)), _i("t_st", i64(1)), _i("t_en", i64(2 ** 62)), _i("t_ax", i64(1)),
             _i("gidx", i64(0, 2)), _i("ax1", i64(1))]
    nodes = [
        N("Shape", ["x"], ["sh"], name="shape"),
        N("Gather", ["sh", "zero"], ["bsz"], name="g_b", axis=0),
        N("Gather", ["sh", "one_i"], ["slen"], name="g_s", axis=0),
        N("Unsqueeze", ["bsz", "ax0"], ["bu"], name="u_b"),
        N("Unsqueeze", ["slen", "ax0"], ["su"], name="u_s"),
        N("Concat", ["bu", "su", "heads", "hd"], ["shp4"], name="cat4", axis=0),
        N("Concat", ["bu", "su", "perm_c"], ["shp3"], name="cat3", axis=0),
        N("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1, epsilon=1e-5),
        N("MatMul", ["ln", "wq"], ["q"], name="mm_q"),
        N("Reshape", ["q", "shp4"], ["q4"], name="reshape4"),
        N("Transpose", ["q4"], ["qh"], name="tr", perm=[0, 2, 1, 3]),
        N("Transpose", ["qh"], ["kt"], name="tr_k", perm=[0, 1, 3, 2]),
        N("MatMul", ["qh", "kt"], ["sc"], name="scores"),
        N("Div", ["sc", "sqrt2"], ["scd"], name="scale"),
        N("Unsqueeze", ["mask", "ax12"], ["mu"], name="mask_u"),
        N("Cast", ["mu"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
        N("Equal", ["mf", "zf"], ["meq"], name="mask_eq"),
        N("Shape", ["sc"], ["ssh"], name="scores_shape"),
        N("Expand", ["meq", "ssh"], ["mexp"], name="mask_expand"),
        N("Where", ["mexp", "neg", "scd"], ["scm"], name="where"),
        N("Softmax", ["scm"], ["pr"], name="softmax", axis=-1),
        N("MatMul", ["pr", "qh"], ["ctx"], name="ctx"),
        N("Transpose", ["ctx"], ["ctxt"], name="tr_back", perm=[0, 2, 1, 3]),
        N("Reshape", ["ctxt", "shp3"], ["c3"], name="reshape3"),
        N("Div", ["c3", "sqrt2"], ["e0"], name="gelu_div"),
        N("Erf", ["e0"], ["e1"], name="erf"),
        N("Add", ["e1", "onef"], ["e2"], name="gelu_add"),
        N("Mul", ["c3", "e2"], ["e3"], name="gelu_mul"),
        N("Mul", ["e3", "half"], ["ge"], name="gelu_half"),
        N("Sqrt", ["pr"], ["prs"], name="sqrt"),
        N("ReduceMean", ["prs"], ["prm"], name="rmean", axes=[-1], keepdims=0),
        N("Slice", ["ge", "s_st", "s_en", "s_ax", "s_sp"], ["rev"], name="slice_rev"),
        N("Slice", ["rev", "t_st", "t_en", "t_ax"], ["tail"], name="slice_tail"),
        N("Gather", ["tail", "gidx"], ["gth"], name="gather_axis2", axis=2),
        N("Unsqueeze", ["gth", "ax1"], ["gu"], name="unsq"),
        N("Squeeze", ["gu", "ax1"], ["y"], name="squeeze"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8]),
                          helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S1", 2]),
                   helper.make_tensor_value_info("prm", TensorProto.FLOAT, ["B", 2, "S"])], inits)


def _close(ref, out, tol=1e-4):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    assert ref.shape == out.shape
    assert np.abs(out - ref).max() <= tol * max(np.abs(ref).max(), 1e-6)


# -- torch interpreter ----------------------------------------------------------------------------------

def test_interpreter_matches_ort(torch):
    from hago_py.quant.torch_lower import run_numpy

    rng = np.random.default_rng(3)
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0
    cases = [
        (small_cnn(), calib(n=4)),
        (small_cnn(with_bn=True, with_pad=True), calib(n=4)),
        (prepare(small_cnn(with_bn=True, with_pad=True))[0], calib(n=4)),
        (small_transformer_mlp(), {"input": rng.normal(0, 1, (2, 5, 16)).astype(np.float32)}),
        (tb.tiny_transformer(mask=True), {"input": rng.normal(0, 1, (3, 7, 16)).astype(np.float32), "mask": mask}),
        (conv_zoo(), {"input": rng.normal(0, 1, (2, 4, 9, 8)).astype(np.float32)}),
        (seq_zoo(), {"x": rng.normal(0, 1, (3, 7, 8)).astype(np.float32), "mask": mask}),
    ]
    for model, feeds in cases:
        for ref, out in zip(run(model, feeds, optimization="basic"), run_numpy(model, feeds)):
            _close(ref, out)


def test_interpreter_subgraph_is_differentiable(torch):
    from hago_py.quant.torch_lower import TorchGraph

    p, _ = prepare(small_cnn())
    g = TorchGraph(p)
    x = calib(n=2)
    with torch.no_grad():
        r1 = g.run(x, ["r1"])["r1"]
    sub = g.subgraph(["conv2", "add", "relu2"])
    assert sub.external_inputs() == ["r1"] and sub.default_outputs() == ["r2"]
    leaf = r1.clone().requires_grad_(True)
    out = sub.run({"r1": leaf})["r2"]
    out.sum().backward()
    assert leaf.grad is not None and float(leaf.grad.abs().sum()) > 0
    ref = run(p, x, optimization="basic")
    with torch.no_grad():
        _close(ref[0], g.run(x)["output"].numpy())
    with pytest.raises(DataError, match="r1"):
        sub.run({})


def test_unsupported_op_names_node_and_op(torch):
    from hago_py.quant.torch_lower import TorchGraph

    m = small_transformer_mlp()
    m.graph.node[2].op_type = "Selu"     # relu -> Selu: valid ONNX, not in the interpreter
    with pytest.raises(OptionError, match=r"node 'relu'.*Selu"):
        TorchGraph(m)


# -- BRECQ ----------------------------------------------------------------------------------------------

def calibrated(model, data, remedy=False, **opts):
    """Prepared model and calibrated plan, as hago_py.quantize builds them (W4 simulated by default)."""
    p, _ = prepare(model)
    opts = QuantOptions.from_kwargs(**{"weight_bits": 4, "simulate": True, **opts})
    spec = load_spec("x86_avx2")
    plan = annotate(p, spec, opts)
    apply_observers(plan, collect(p, plan, [data]))
    if remedy:   # the u8s8 int16-pair saturation remedy of the AVX2 target (reduce_range / u8u8)
        choose_remedy(p, plan, spec, opts, [data])
    return p, plan


FAST = dict(iterations=150, lr=1e-2, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def cnn(torch):
    from hago_py.quant.brecq import brecq

    p, plan = calibrated(small_cnn(), calib(n=96))
    out = {}
    for fisher in (False, True):
        pl = copy.deepcopy(plan)
        q, info = brecq(p, pl, [calib(n=96)], fisher=fisher, **FAST)
        out[fisher] = (pl, q, info)
    return p, plan, out


@pytest.fixture(scope="module")
def transformer(torch):
    from hago_py.quant.brecq import brecq

    data = {"input": np.random.default_rng(1).normal(0, 1, (96, 6, 16)).astype(np.float32)}
    p, plan = calibrated(tb.tiny_transformer(), data)
    pl = copy.deepcopy(plan)
    q, info = brecq(p, pl, [{"input": data["input"][:48]}, {"input": data["input"][48:]}], **FAST)
    return p, plan, pl, q, info


def test_block_error_not_above_nearest(cnn):
    p, _, runs = cnn
    for fisher, (_, _, info) in runs.items():
        assert [b["layers"] for b in info["blocks"]] == [["conv1"], ["conv2"], ["fc"]]
        for b in info["blocks"]:
            assert b["loss_after"] <= b["loss_before"] + 1e-12, (fisher, b)
            assert b["seconds"] >= 0
        # the residual block really is reconstructed, not just kept at nearest
        res = info["blocks"][1]
        assert not res["fallback"] and res["loss_after"] < 0.95 * res["loss_before"] and res["changed_vs_nearest"] > 0
        assert info["seconds"] > 0 and info["samples"] == 96


def test_weights_in_range_original_layout_and_realize_runs_on_ort(cnn):
    p, _, runs = cnn
    pl, q, _ = runs[True]
    inits = {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}
    nodes = {n.name: n for n in p.graph.node}
    weighted = [lp for lp in pl.quantized_layers() if lp.weight is not None]
    assert sorted(q) == sorted(lp.node for lp in weighted)
    for lp in weighted:
        w = inits[nodes[lp.node].input[1]]
        qmin, qmax = qrange(lp.weight.dtype, lp.weight.bits, lp.weight.narrow)
        assert q[lp.node].shape == w.shape and q[lp.node].dtype == np.int64
        assert q[lp.node].min() >= qmin and q[lp.node].max() <= qmax
        assert lp.weight.scale is not None and len(lp.weight.scale) == w.shape[lp.weight.axis]
        # BRECQ only moves weights between floor and ceil of w / s
        s = np.asarray(lp.weight.scale, np.float32).reshape([-1 if k == lp.weight.axis else 1 for k in range(w.ndim)])
        assert np.all(np.abs(q[lp.node] - w / s) < 1.0 + 1e-4)
    x = calib(seed=7, n=16)
    out = run(realize(p, pl, weights=q), x)[0]
    assert np.isfinite(out).all() and sqnr(run(p, x)[0], out) > 15


def test_simulation_matches_realized_model_on_ort(cnn, transformer):
    from hago_py.quant.brecq import brecq, simulate

    p, _, runs = cnn
    pl, q, _ = runs[True]
    x = calib(seed=5, n=16)
    _close(run(realize(p, pl, weights=q), x, optimization="basic")[0], simulate(p, pl, x, q)[0], 1e-5)
    p, _, pl, q, _ = transformer
    x = {"input": np.random.default_rng(9).normal(0, 1, (8, 6, 16)).astype(np.float32)}
    _close(run(realize(p, pl, weights=q), x, optimization="basic")[0], simulate(p, pl, x, q)[0], 1e-5)
    # W8 on x86_avx2: token MatMuls get dynamic (per-batch) activations
    p, plan = calibrated(tb.tiny_transformer(), x, remedy=True, weight_bits=8, simulate=False)
    modes = {plan.activations[lp.inputs[0]].mode for lp in plan.quantized_layers() if lp.weight is not None}
    assert modes == {"dynamic"}
    q, info = brecq(p, plan, [x], iterations=20, lr=1e-2, batch_size=4)
    assert all(b["loss_after"] <= b["loss_before"] for b in info["blocks"])
    _close(run(realize(p, plan, weights=q), x, optimization="basic")[0], simulate(p, plan, x, q)[0], 1e-5)


def test_realized_brecq_model_closer_to_fp32_than_nearest(transformer):
    p, plan, pl, q, info = transformer
    assert all(b["loss_after"] <= b["loss_before"] for b in info["blocks"])
    x = {"input": np.random.default_rng(7).normal(0, 1, (128, 6, 16)).astype(np.float32)}
    ref = run(p, x)[0]
    nearest = sqnr(ref, run(realize(p, copy.deepcopy(plan)), x)[0])
    learned = sqnr(ref, run(realize(p, pl, weights=q), x)[0])
    assert learned > nearest + 1.0, (learned, nearest)


def test_same_seed_same_weights(torch, transformer):
    from hago_py.quant.brecq import brecq

    p, plan, pl, q, _ = transformer
    data = {"input": np.random.default_rng(1).normal(0, 1, (96, 6, 16)).astype(np.float32)}
    pl2 = copy.deepcopy(plan)
    q2, _ = brecq(p, pl2, [{"input": data["input"][:48]}, {"input": data["input"][48:]}], **FAST)
    assert sorted(q2) == sorted(q) and all(q2[k].tobytes() == q[k].tobytes() for k in q)
    assert pl2.to_json() == pl.to_json()
    a = realize(p, pl, weights=q).SerializeToString(deterministic=True)
    assert a == realize(p, pl2, weights=q2).SerializeToString(deterministic=True)


def test_bad_inputs(torch):
    from hago_py.quant.brecq import brecq

    p, plan = calibrated(small_cnn(), calib(n=8))
    with pytest.raises(DataError, match="no calibration"):
        brecq(p, copy.deepcopy(plan), [], iterations=1)
    with pytest.raises(DataError, match="'input'"):
        brecq(p, copy.deepcopy(plan), [{"x": calib(n=8)["input"]}], iterations=1)
    with pytest.raises(OptionError, match="iterations"):
        brecq(p, copy.deepcopy(plan), [calib(n=8)], iterations=-1)
    bad = copy.deepcopy(plan)
    next(iter(t for t in bad.activations.values() if t.mode == "static" and t.shared_with is None)).scale = None
    with pytest.raises(OptionError, match="calibrate"):
        brecq(p, bad, [calib(n=8)], iterations=1)
    m = copy.deepcopy(p)
    next(n for n in m.graph.node if n.op_type == "Relu").op_type = "Selu"
    with pytest.raises(OptionError, match="Selu"):
        brecq(m, copy.deepcopy(plan), [calib(n=8)], iterations=1)


def test_missing_torch_is_option_error(monkeypatch):
    from hago_py.quant.brecq import brecq

    p, plan = calibrated(small_cnn(), calib(n=8))
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` now raises ImportError
    with pytest.raises(OptionError) as err:
        brecq(p, plan, [calib(n=8)], iterations=1)
    assert str(err.value) == "rounding='brecq' needs PyTorch: pip install -e .[torch] (torch==2.13.0)"


def test_hago_py_does_not_import_torch():
    code = ("import sys, hago_py, hago_py.api, hago_py.ir.blocks, hago_py.quant.brecq, hago_py.quant.torch_lower; "
            "assert 'torch' not in sys.modules, 'torch imported at module import time'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
