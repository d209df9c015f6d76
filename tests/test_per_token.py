"""activation_granularity="per_token": dynamic activations with one symmetric int8 scale per token
(hago_py/quant/per_token.py)."""
from collections import Counter

import numpy as np
import pytest
from onnx import helper, numpy_helper

import hago_py
from hago_py.cli import main as cli_main
from hago_py.errors import OptionError
from hago_py.quant.per_token import TINY, fake_quant

from models import _init, calib, checked_model, run, small_cnn, small_transformer_mlp, sqnr

FAST = dict(measure_latency=False, smooth=False)


def _one_matmul(opset: int, k: int = 16, n: int = 12, seed: int = 0):
    """input [B, S, k] -> MatMul(W [k, n]) -> output."""
    w = np.random.default_rng(seed).normal(0, 0.3, (k, n)).astype(np.float32)
    return checked_model([helper.make_node("MatMul", ["input", "w"], ["output"], name="mm")], [_init("w", w)],
                         "one_matmul", ["B", "S", k], ["B", "S", n], opset)


def _x(shape, seed=0, scale=1.0):
    return {"input": (scale * np.random.default_rng(seed).normal(0, 1, shape)).astype(np.float32)}


def _with_output(model, name):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return m


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_per_token_matches_numpy_reference(opset):
    """The deployed graph (ORT full optimization) computes exactly the documented arithmetic."""
    m = _one_matmul(opset)
    res = hago_py.quantize(m, _x((8, 5, 16)), "x86_avx2", activation_granularity="per_token", **FAST)
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["MatMulInteger"] == 1 and ops["DynamicQuantizeLinear"] == 0 and ops["MatMul"] == 0
    assert res.report["artifact_check"]["ok"]
    rmax = next(n for n in res.model.graph.node if n.op_type == "ReduceMax")
    assert (len(rmax.input) == 2) == (opset >= 18)  # axes: an input from opset 18, an attribute before
    mmi = next(n for n in res.model.graph.node if n.op_type == "MatMulInteger")
    inits = _inits(res.model)
    wq, wz, xz = inits[mmi.input[1]], inits[mmi.input[3]], inits[mmi.input[2]]
    assert wq.dtype == np.int8 and not wz.any()  # symmetric int8 weights, as with per-tensor activations
    assert xz.dtype == np.uint8 and xz.shape == () and xz == 128  # the int8 grid carried as uint8 - 128
    mul = next(n for n in res.model.graph.node if n.op_type == "Mul" and n.output[0] == "output")
    ws = inits[mul.input[1]]
    assert ws.shape == (12,)  # per-channel weight scale, as with per_tensor activations
    x = _x((3, 7, 16), seed=5)["input"]
    x[1, 2] = 0.0  # an all-zero token: scale TINY / 127, quantizes to 0
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), TINY) / np.float32(127)
    xq = np.clip(np.rint(x / s), -127, 127).astype(np.int32)
    x_u8 = run(_with_output(res.model, mmi.input[0]), {"input": x})[1]
    assert x_u8.dtype == np.uint8 and np.array_equal(x_u8.astype(np.int32) - 128, xq)
    acc = xq @ (wq.astype(np.int32) - wz.astype(np.int32))
    ref = acc.astype(np.float32) * s * ws
    got = run(res.model, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert not got[1, 2].any()
    assert sqnr(run(m, {"input": x})[0], got) > 30


def test_batch_invariance_and_per_tensor_is_not():
    """A token's output does not depend on the rest of its batch (a 100x larger row); the per-tensor default
    does, so the test can fail."""
    m = small_transformer_mlp()
    cal = _x((8, 5, 16))
    row = _x((1, 5, 16), seed=3)["input"]
    big = _x((1, 5, 16), seed=4, scale=100.0)["input"]
    batch = {"input": np.concatenate([row, big])}
    outs = {}
    for g in ("per_tensor", "per_token"):
        q = hago_py.quantize(m, cal, "x86_avx2", activation_granularity=g, **FAST).model
        outs[g] = (run(q, {"input": row})[0][0], run(q, batch)[0][0])
    alone, in_batch = outs["per_token"]
    assert np.array_equal(alone, in_batch)
    assert sqnr(run(m, {"input": row})[0][0], alone) > 30
    alone, in_batch = outs["per_tensor"]
    assert not np.array_equal(alone, in_batch) and sqnr(alone, in_batch) < 30


def test_default_output_unchanged():
    m, cal = small_transformer_mlp(), _x((8, 5, 16))
    a = hago_py.quantize(m, cal, "x86_avx2", measure_latency=False)
    b = hago_py.quantize(m, cal, "x86_avx2", measure_latency=False, activation_granularity="per_tensor")
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
    assert a.plan.to_json() == b.plan.to_json()
    ops = Counter(n.op_type for n in a.model.graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["ReduceMax"] == 0
    assert all(t.granularity == "per_tensor" and t.dtype == "uint8" for t in a.plan.activations.values())


def _two_readers():
    """mm1 and mm2 both read the graph input (one tensor, quantized once), summed."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["input", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["output"], name="add")]
    return checked_model(nodes, [_init("w1", rng.normal(0, 0.3, (16, 8)).astype(np.float32)),
                                 _init("w2", rng.normal(0, 0.3, (16, 8)).astype(np.float32))],
                         "two", ["B", "S", 16], ["B", "S", 8])


def test_plan_records_per_token_and_shares_the_quantization():
    """Two MatMuls reading one tensor share one quantize chain; the plan says per_token, int8, symmetric."""
    m = _two_readers()
    res = hago_py.quantize(m, _x((8, 5, 16)), "x86_avx2", activation_granularity="per_token", **FAST)
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["ReduceMax"] == 1 and ops["MatMulInteger"] == 2
    tq = res.plan.activations["input"]
    assert (tq.granularity, tq.dtype, tq.symmetric, tq.mode, tq.axis) == ("per_token", "uint8", True, "dynamic", -1)
    assert res.plan.options["activation_granularity"] == "per_token"


def test_option_errors_and_static_layers():
    m, cal = small_transformer_mlp(), _x((8, 5, 16))
    with pytest.raises(OptionError, match="activation_mode='dynamic'"):
        hago_py.quantize(m, cal, "x86_avx2", activation_granularity="per_token", activation_mode="static", **FAST)
    with pytest.raises(OptionError, match="activation_granularity"):
        hago_py.quantize(m, cal, "x86_avx2", activation_granularity="per_channel", **FAST)
    # auto: a static layer (here by a per-layer override) keeps per-tensor activations, with a note
    res = hago_py.quantize(m, cal, "x86_avx2", activation_granularity="per_token",
                           layers={"mm1": {"activation_mode": "static"}}, **FAST)
    assert any("per_token: not applied" in n for n in res.plan.layers["mm1"].notes)
    assert not any("per_token" in n for n in res.plan.layers["mm2"].notes)
    assert res.plan.activations["r1"].granularity == "per_token"
    # a conv net under auto: every layer static, nothing per token, no error
    cnn = hago_py.quantize(small_cnn(), calib(), "x86_avx2", activation_granularity="per_token", **FAST)
    assert all(t.mode == "static" for t in cnn.plan.activations.values())
    assert all(any("per_token" in n for n in lp.notes) for lp in cnn.plan.quantized_layers() if lp.weight)


def test_fake_quant_matches_graph():
    x = _x((2, 3, 16), seed=7)["input"]
    s = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    assert np.abs(fake_quant(x) - x).max() <= 0.5 * s.max() * (1 + 1e-6)
    assert np.array_equal(fake_quant(np.zeros((2, 4), np.float32)), np.zeros((2, 4), np.float32))


def test_cli_flag(tmp_path, capsys):
    m = small_transformer_mlp()
    mp, cp, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    mp.write_bytes(m.SerializeToString())
    np.savez(cp, **_x((8, 5, 16)))
    rc = cli_main(["quantize", str(mp), "--calib", str(cp), "--out", str(out), "--no-latency", "-q",
                   "--activation-granularity", "per_token"])
    assert rc == 0
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["ReduceMax"] == 2 and ops["DynamicQuantizeLinear"] == 0


def test_brecq_simulation_and_reconstruction_use_per_token_inputs():
    """BRECQ's torch simulation and the reconstruction statistics (bias correction) quantize per-token inputs per
    token, as the realized graph does."""
    torch = pytest.importorskip("torch")
    from hago_py.hw import load_spec
    from hago_py.ir import prepare
    from hago_py.quant.annotate import annotate
    from hago_py.quant.brecq import brecq, simulate
    from hago_py.quant.calibrate import apply_observers, collect
    from hago_py.quant.options import QuantOptions
    from hago_py.quant.realize import realize

    import test_blocks as tb

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = _x((8, 6, 16), seed=9)
        p, _ = prepare(tb.tiny_transformer())
        opts = QuantOptions.from_kwargs(weight_bits=8, activation_granularity="per_token")
        plan = annotate(p, load_spec("x86_avx2"), opts)
        apply_observers(plan, collect(p, plan, [x]))
        grans = {plan.activations[lp.inputs[0]].granularity for lp in plan.quantized_layers() if lp.weight}
        assert grans == {"per_token"}
        q, _ = brecq(p, plan, [x], iterations=10, lr=1e-2, batch_size=4)
        out = run(realize(p, plan, weights=q), x, optimization="basic")[0]
        ref = np.asarray(simulate(p, plan, x, q)[0], np.float64)
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    finally:
        torch.set_num_threads(prev)
    m = small_transformer_mlp()
    res = hago_py.quantize(m, _x((16, 5, 16)), "x86_avx2", activation_granularity="per_token",
                           bias_correction=True, **FAST)
    assert sqnr(run(m, _x((4, 5, 16), seed=2))[0], run(res.model, _x((4, 5, 16), seed=2))[0]) > 30


def test_report_names_per_token():
    from hago_py.report.write import render_markdown

    res = hago_py.quantize(small_transformer_mlp(), _x((8, 5, 16)), "x86_avx2", activation_granularity="per_token",
                           **FAST)
    assert "dynamic activations per token" in render_markdown(res.report)


def test_per_layer_granularity_and_conflicting_readers():
    """layers={node: {"activation_granularity": ...}} sets one layer's dynamic input per token, the rest stay
    per tensor; two layers reading one tensor with different values is an OptionError naming both and the tensor."""
    m, cal = small_transformer_mlp(), _x((8, 5, 16))
    res = hago_py.quantize(m, cal, "x86_avx2", layers={"mm2": {"activation_granularity": "per_token"}}, **FAST)
    acts = res.plan.activations
    assert acts["r1"].granularity == "per_token" and acts["input"].granularity == "per_tensor"
    ops = Counter(n.op_type for n in res.model.graph.node)
    assert ops["ReduceMax"] == 1 and ops["DynamicQuantizeLinear"] == 1
    assert sqnr(run(m, cal)[0], run(res.model, cal)[0]) > 30
    two = _two_readers()
    with pytest.raises(OptionError, match=r"'mm1' and 'mm2' both read tensor 'input'.*'per_tensor' and 'per_token'"):
        hago_py.quantize(two, _x((8, 5, 16)), "x86_avx2", layers={"mm2": {"activation_granularity": "per_token"}},
                         **FAST)
    both = {"mm1": {"activation_granularity": "per_token"}, "mm2": {"activation_granularity": "per_token"}}
    assert hago_py.quantize(two, _x((8, 5, 16)), "x86_avx2", layers=both, **FAST).plan.activations[
        "input"].granularity == "per_token"
    with pytest.raises(OptionError, match="activation_granularity"):
        hago_py.quantize(m, cal, "x86_avx2", layers={"mm2": {"activation_granularity": "per_row"}}, **FAST)
