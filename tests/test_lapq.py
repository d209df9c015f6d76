"""LAPQ: loss-aware joint optimisation of the activation clipping ranges."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago_py.errors import DataError, OptionError
from hago_py.hw import load_spec
from hago_py.ir import load_model, prepare
from hago_py.quant import lapq as lapq_mod
from hago_py.quant.annotate import annotate
from hago_py.quant.calibrate import apply_observers, collect
from hago_py.quant.lapq import lapq
from hago_py.quant.observers import qrange
from hago_py.quant.options import QuantOptions
from hago_py.quant.realize import realize

from models import run


def outlier_cnn(seed=0):
    """input [N,3,8,8] -> Conv(8)+Relu -> Conv(8)+Relu -> GAP -> Flatten -> Gemm(4).

    Channel 0 of the first conv has a 30x gain and the second conv barely listens to it, so the first
    activation's range is set by values that hardly matter for the output: the per-tensor choices keep
    them, a loss-aware choice can clip them.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w1[0] *= 30.0
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    w2[:, 0] *= 0.01
    b2 = rng.normal(0, 0.1, 8).astype(np.float32)
    wf = rng.normal(0, 0.3, (4, 8)).astype(np.float32)
    bf = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g1"], name="gap"),
        helper.make_node("Flatten", ["g1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "wf": wf, "bf": bf}.items()]
    g = helper.make_graph(nodes, "outlier_cnn",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def batches(seed=1, n=48, bs=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32)
    x[rng.random(x.shape) < 0.002] *= 8.0  # a few input outliers as well
    return [{"input": x[i:i + bs]} for i in range(0, n, bs)]


@pytest.fixture(scope="module")
def prepared():
    out, _ = prepare(load_model(outlier_cnn()))
    return out


def make_plan(prepared, method, data):
    spec = load_spec("x86_avx2")
    plan = annotate(prepared, spec, QuantOptions.from_kwargs(clipping=method), target_name=spec.name,
                    model_digest="test")
    return apply_observers(plan, collect(prepared, plan, data))


def network_loss(prepared, plan, data):
    q = realize(prepared, plan)
    num = den = 0.0
    for b in data:
        ref = run(prepared, b, "basic")[0].astype(np.float64)
        out = run(q, b, "basic")[0].astype(np.float64)
        num += float(np.sum((ref - out) ** 2))
        den += float(np.sum(ref ** 2))
    return num / den


@pytest.fixture(scope="module")
def result(prepared):
    data = batches()
    plan = make_plan(prepared, "mse", data)
    info = lapq(prepared, plan, data, seed=0)
    return plan, info, data


def test_lapq_beats_mse_start_and_minmax(prepared, result):
    plan, info, data = result
    mse_loss = network_loss(prepared, make_plan(prepared, "mse", data), data)
    minmax_loss = network_loss(prepared, make_plan(prepared, "minmax", data), data)
    final = network_loss(prepared, plan, data)
    held = batches(seed=7)
    held_mse = network_loss(prepared, make_plan(prepared, "mse", data), held)
    held_lapq = network_loss(prepared, plan, held)
    print(f"\nLAPQ (mse loss, {info['evaluations']} evaluations, {info['seconds']:.2f} s, p={info['p']:.3g}): "
          f"minmax {minmax_loss:.3e}, mse start {mse_loss:.3e} (lapq initial {info['initial_loss']:.3e}), "
          f"best Lp {min(info['p_losses'].values()):.3e}, final {final:.3e}; held-out batches: "
          f"mse {held_mse:.3e} -> lapq {held_lapq:.3e}")
    r1 = info["tensors"]["r1"]
    print(f"   r1 range {r1['old_range']} -> {r1['new_range']}")
    assert info["initial_loss"] == pytest.approx(mse_loss, rel=1e-9)
    assert final <= mse_loss and final <= minmax_loss
    assert final < 0.5 * mse_loss                  # the loss-aware clipping of r1 pays off here
    assert held_lapq < held_mse                    # and not only on the batches it was fitted on
    assert info["evaluations"] <= 200


def test_simulation_equals_realized_model(prepared, result):
    plan, info, data = result
    # the fed-qparams simulation (with in-graph int32 bias requantization) is the realized model exactly
    assert info["simulation"] == "fed-qparams"
    assert network_loss(prepared, plan, data) == pytest.approx(info["final_loss"], rel=1e-9, abs=1e-15)


def test_plan_stays_valid(prepared, result):
    plan, info, _ = result
    for name, tq in plan.activations.items():
        if tq.mode != "static":
            continue
        qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
        assert tq.scale[0] > 0 and np.isfinite(tq.scale[0]) and qmin <= tq.zero_point[0] <= qmax
    assert plan.activations["f"].scale == plan.activations["g1"].scale           # shared tensor follows
    assert plan.activations["f"].zero_point == plan.activations["g1"].zero_point
    assert plan.history[-1] == "lapq"
    assert set(info["tensors"]) == {"input", "r1", "r2", "g1"}
    assert "lapq" in plan.activations["r1"].stats
    again = type(plan).from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    onnx.checker.check_model(realize(prepared, plan))
    json.dumps({k: v for k, v in info.items()})                                 # info is plain data


def test_deterministic(prepared):
    data = batches()
    a, b = make_plan(prepared, "mse", data), make_plan(prepared, "mse", data)
    ia = lapq(prepared, a, data, seed=3, max_evals=60)
    ib = lapq(prepared, b, data, seed=3, max_evals=60)
    assert a.to_json() == b.to_json()
    assert ia["final_loss"] == ib["final_loss"] and ia["evaluations"] == ib["evaluations"]


def test_budget_and_never_worse(prepared):
    data = batches()
    plan = make_plan(prepared, "mse", data)
    info = lapq(prepared, plan, data, max_evals=3)
    assert info["evaluations"] <= 3 and info["final_loss"] <= info["initial_loss"]
    # a loss for which the given plan is already the best: the plan is left as it was
    plan = make_plan(prepared, "mse", data)
    before = plan.to_json()
    calls = []

    def given_is_best(fp, q):
        calls.append(1)
        return 0.0 if len(calls) == 1 else 1.0

    info = lapq(prepared, plan, data, loss=given_is_best, max_evals=10)
    assert info["chosen"] == "plan" and info["final_loss"] == 0.0
    after = type(plan).from_json(plan.to_json())
    for t, tq in type(plan).from_json(before).activations.items():
        assert after.activations[t].scale == tq.scale and after.activations[t].zero_point == tq.zero_point


def test_fallback_simulation_matches_fast_path(prepared, monkeypatch):
    data = batches(n=16)
    fast = make_plan(prepared, "mse", data)
    i_fast = lapq(prepared, fast, data, max_evals=12, p_values=(2.0, 3.0))
    monkeypatch.setattr(lapq_mod, "_FEEDABLE", {})  # as for int4 activations: realize every evaluation
    slow = make_plan(prepared, "mse", data)
    i_slow = lapq(prepared, slow, data, max_evals=12, p_values=(2.0, 3.0))
    assert i_slow["simulation"] == "realize-per-evaluation"
    assert i_slow["final_loss"] == pytest.approx(i_fast["final_loss"], rel=1e-9)
    assert slow.to_json() == fast.to_json()


def test_other_losses(prepared):
    data = batches(n=16)
    info = lapq(prepared, make_plan(prepared, "mse", data), data, loss="kl", max_evals=20)
    assert info["loss"] == "kl" and info["final_loss"] <= info["initial_loss"]

    def max_abs(fp, q):
        return max(float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(fp, q))

    info = lapq(prepared, make_plan(prepared, "mse", data), data, loss=max_abs, max_evals=20)
    assert info["loss"] == "max_abs" and info["final_loss"] <= info["initial_loss"]


def test_bad_arguments(prepared):
    data = batches(n=16)
    plan = make_plan(prepared, "mse", data)
    with pytest.raises(OptionError, match="unknown loss 'mae'"):
        lapq(prepared, plan, data, loss="mae")
    with pytest.raises(OptionError, match="p_values"):
        lapq(prepared, plan, data, p_values=(2.0, -1.0))
    with pytest.raises(OptionError, match="max_evals"):
        lapq(prepared, plan, data, max_evals=0)
    with pytest.raises(DataError, match="batches"):
        lapq(prepared, plan, [])
    spec = load_spec("x86_avx2")
    raw = annotate(prepared, spec, QuantOptions.from_kwargs(), target_name=spec.name, model_digest="test")
    with pytest.raises(OptionError, match="run calibrate"):
        lapq(prepared, raw, data)


def test_narrow_activations_are_optimised_and_simulated_exactly(prepared):
    """A4 in a uint8 container: realize clips to the 4-bit range before QuantizeLinear; the fed-qparams simulation
    must move that clip with the fed scale (it once dropped these tensors and LAPQ silently did nothing)."""
    data = batches()
    spec = load_spec("x86_avx2")
    plan = annotate(prepared, spec, QuantOptions.from_kwargs(clipping="mse", activation_bits=4, simulate=True),
                    target_name=spec.name, model_digest="test")
    plan = apply_observers(plan, collect(prepared, plan, data))
    start = network_loss(prepared, plan, data)
    info = lapq(prepared, plan, data, seed=0, max_evals=60)
    assert info["simulation"] == "fed-qparams"
    assert {"input", "r1", "r2"} <= set(info["tensors"])
    assert info["initial_loss"] == pytest.approx(start, rel=1e-9)
    assert len(set(info["p_losses"].values())) > 1              # the fed qparams reach the loss
    final = network_loss(prepared, plan, data)
    assert final == pytest.approx(info["final_loss"], rel=1e-9, abs=1e-15)
    assert final < start
    for name, tq in plan.activations.items():
        if tq.mode == "static":
            assert qrange(tq.dtype, tq.bits, tq.narrow)[1] - qrange(tq.dtype, tq.bits, tq.narrow)[0] == 15


@pytest.mark.parametrize("legacy", [False, True])
def test_simulation_handles_bias_dequantize_with_and_without_zero_point(prepared, monkeypatch, legacy):
    # realize writes the int32 bias DequantizeLinear without its (optional, all-zero) zero point; a model in the
    # old form with an explicit one must simulate the same
    from models import with_bias_zero_points

    data = batches()
    plan = make_plan(prepared, "mse", data)
    if legacy:
        monkeypatch.setattr(lapq_mod, "realize", lambda *a, **k: with_bias_zero_points(realize(*a, **k)))
    built = []
    make = lapq_mod._Simulator._simulation_model
    monkeypatch.setattr(lapq_mod._Simulator, "_simulation_model", lambda self, *a: built.append(make(self, *a))
                        or built[-1])
    sim = lapq_mod._Simulator(prepared, plan, data, lapq_mod._loss_fn("mse")[1], threads=1)
    assert sim.fast and len(built) == 1
    bias_dqs = [n for n in built[0].graph.node if n.name.endswith("/bias_dq")]
    assert len(bias_dqs) == 3 and all(n.input[0].startswith("lapq/") for n in bias_dqs)
    assert {len(n.input) for n in bias_dqs} == {3 if legacy else 2}
    qp = {plan.resolve(t).tensor: (float(plan.resolve(t).scale[0]), int(plan.resolve(t).zero_point[0]))
          for t in sim.static}
    assert sim.loss(qp) == pytest.approx(network_loss(prepared, plan, data), rel=1e-9, abs=1e-15)
