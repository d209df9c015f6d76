"""Hardware-aware search on tiny generated models where the right answer is known.

Latency is injected (a deterministic cost per layer configuration) wherever the test asserts on a choice;
one test checks the structure of a really measured table without asserting on any timing.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago_py
from hago_py.errors import OptionError, SearchError
from hago_py.pipeline import Pipeline
from hago_py.quant.options import QuantOptions
from hago_py.search import run_search
from hago_py.search.space import build_space
from hago_py.search.strategies import Table, greedy_path, milp_solve

from models import calib, small_cnn

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ models
def mlp3(seed: int = 0, fragile: bool = True) -> onnx.ModelProto:
    """x[N,16] -> fc_a -> Relu -> fc_c -> Relu -> fc_b -> y[N,8] (Gemms, each with its own int8 input).

    fragile=True: input feature 0 spans +-1000 while fc_a ignores it, so quantizing fc_a's input wipes the
    other features (fc_a must stay FP32); fc_b has 4 rows with one weight of 1.0 and 4 rows of small weights
    (~0.03), so a per-tensor weight scale destroys the small rows (fc_b needs per-channel or FP32)."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.3, (32, 16)).astype(np.float32)
    wc = rng.normal(0, 0.2, (32, 32)).astype(np.float32)
    wb = rng.normal(0, 0.2, (8, 32)).astype(np.float32)
    if fragile:
        wa[:, 0] = 1e-5
        wb[:4] = 0.0
        for i in range(4):
            wb[i, i] = 1.0
        wb[4:] = rng.normal(0, 0.03, (4, 32))
    inits = [numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (wc, "wc"), (wb, "wb"))]
    inits += [numpy_helper.from_array(np.zeros(k, np.float32), f"b{n}") for n, k in (("a", 32), ("c", 32), ("b", 8))]
    nodes = [helper.make_node("Gemm", ["x", "wa", "ba"], ["ha"], name="fc_a", transB=1),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu_a"),
             helper.make_node("Gemm", ["ra", "wc", "bc"], ["hc"], name="fc_c", transB=1),
             helper.make_node("Relu", ["hc"], ["rc"], name="relu_c"),
             helper.make_node("Gemm", ["rc", "wb", "bb"], ["y"], name="fc_b", transB=1)]
    g = helper.make_graph(nodes, "mlp3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def mlp_calib(n: int = 64, seed: int = 1, fragile: bool = True) -> dict:
    x = np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)
    if fragile:
        x[:, 0] *= 300.0
    return {"x": x}


SLOW_LAYER = {"name": None}


def injected_latency(model, plan):
    """Deterministic latency: FP32 layer 1.0, INT8 per-channel 0.40, per-tensor 0.38 (tempting), dynamic
    +0.05; the layer named in SLOW_LAYER costs 1.5 when quantized (its INT8 kernel is slower than FP32)."""
    if plan is None:
        return 3.0
    t = 0.0
    for lp in plan.layers.values():
        if not lp.quantize:
            t += 1.0
        elif lp.node == SLOW_LAYER["name"]:
            t += 1.5
        else:
            t += 0.38 if lp.weight.granularity == "per_tensor" else 0.40
            t += 0.05 if plan.activations[lp.inputs[0]].mode == "dynamic" else 0.0
    return t


def search(model, data, **kw):
    pipe = Pipeline(model, data, "x86_avx2", QuantOptions(check_artifact=False))
    kw.setdefault("latency", injected_latency)
    return run_search(pipe, **kw)


# ------------------------------------------------------------------------------------------------ choices
def test_fragile_layers_stay_fp_or_per_channel():
    res = search(mlp3(), mlp_calib(), accuracy_budget=3e-4)
    plan = res.plan
    assert not plan.layers["fc_a"].quantize                      # activation-fragile: FP32
    b = plan.layers["fc_b"]
    assert (not b.quantize) or b.weight.granularity == "per_channel"   # weight-fragile: never per-tensor
    assert plan.layers["fc_c"].quantize                          # the robust layer is quantized
    s = res.report["search"]
    assert s["metric"]["kind"] == "proxy" and "proxy" in s["metric"]["definition"].lower()
    assert res.chosen["drop"] <= 3e-4 and res.chosen["speedup"] > 1.0
    # the per-layer sensitivity ranks the fragile input layer first
    rows = {r["node"]: r for r in s["layers"]}
    assert rows["fc_a"]["sensitivity_rank"] == 1 and "FP32" in rows["fc_a"]["why"]
    # per-tensor fc_b was measured and is worse than per-channel
    tab = s["table"]["fc_b"]
    assert tab["int8/pt"]["err"] > 3 * tab["int8/pc"]["err"]


def test_slower_int8_layer_not_chosen_under_latency_budget():
    SLOW_LAYER["name"] = "fc_b"
    try:
        res = search(mlp3(fragile=False), mlp_calib(fragile=False), latency_budget=1.5)
        assert not res.plan.layers["fc_b"].quantize
        assert res.plan.layers["fc_a"].quantize and res.plan.layers["fc_c"].quantize
        assert res.chosen["speedup"] >= 1.5 and res.chosen["latency"] == "predicted"
        assert res.report["search"]["objective"].startswith("most accurate")
        # accuracy budget: the fastest plan also leaves the slow layer in FP32
        res = search(mlp3(fragile=False), mlp_calib(fragile=False), accuracy_budget=0.05)
        assert not res.plan.layers["fc_b"].quantize
        assert res.chosen["speedup"] == pytest.approx(3.0 / (0.38 + 0.38 + 1.0))
        why = {r["node"]: r["why"] for r in res.report["search"]["layers"]}
        assert "slower" in why["fc_b"]
    finally:
        SLOW_LAYER["name"] = None


def test_impossible_budget_names_the_closest_point():
    with pytest.raises(SearchError) as ei:
        search(mlp3(), mlp_calib(), latency_budget=10.0)
    e = ei.value
    msg = str(e)
    assert "latency_budget=10" in msg and "closest point" in msg and "relax latency_budget" in msg
    assert e.closest is not None and e.closest["speedup"] < 10 and "metric" in e.closest
    with pytest.raises(SearchError, match="relax accuracy_budget") as ei:
        search(mlp3(), mlp_calib(), accuracy_budget=-0.5)
    assert ei.value.closest["drop"] > -0.5


def test_user_metric_and_result_api():
    x = mlp_calib(seed=5, n=32)

    def neg_mse(model):   # the user's "validation loop": higher is better
        import onnxruntime as ort

        ref = ort.InferenceSession(mlp3().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
        return -float(np.mean((out - ref) ** 2))

    res = hago_py.quantize(mlp3(), mlp_calib(), "x86_avx2", search=True, evaluate=neg_mse, accuracy_budget=1e-3,
                           measure_latency=False, check_artifact=False)
    s = res.report["search"]
    assert s["metric"]["kind"] == "user" and s["metric"]["fp32"] == 0.0
    assert s["latency_source"]["kind"] == "predicted"            # measure_latency=False: the cost model
    assert res.chosen["drop"] <= 1e-3 and res.chosen["metric_kind"] == "user"
    assert res.pareto and any(p["id"] == "fp32" and p["speedup"] == 1.0 for p in res.pareto)
    assert all(p["latency"] in ("measured", "predicted") for p in res.pareto)
    sp = [p["speedup"] for p in res.pareto]
    assert sp == sorted(sp)
    assert hago_py.quantize(mlp3(), mlp_calib(), "x86_avx2", layers=res.chosen["plan"], measure_latency=False,
                            check_artifact=False).plan.to_json() == res.plan.to_json()
    c = s["counts"]
    assert c["trials"] == c["measured_this_run"] > 0 and c["plan_trials"] >= 2 and c["layer_candidates"] > 0
    for row in s["layers"]:
        assert {"op", "output_shape", "config", "sensitivity", "latency_share", "why"} <= set(row)


# ------------------------------------------------------------------------------------------------ space
def test_space_comes_from_the_spec():
    pipe = Pipeline(small_cnn(), calib(), "x86_avx2", QuantOptions(check_artifact=False))
    space = build_space(pipe, pipe.build().plan)
    conv = space.layers["conv1"].active()
    assert {"fp32", "int8/pc", "int8/pt", "uint8/pc", "uint8/pt"} <= set(conv)
    int4 = space.layers["conv1"].candidates["int4/pc"]
    assert int4.simulated and int4.pruned and "simulated" in int4.label
    assert set(space.layers["add"].structural()) == {"int8", "fp32"}
    assert "int8/pc/dyn" in space.layers["fc"].active()          # Gemm: dynamic activations allowed
    # a spec that only allows per-channel Conv weights gives no per-tensor candidate
    spec = hago_py.load_spec("x86_avx2").to_dict()
    for s in spec["ops"]["Conv"]["schemes"]:
        s["granularity"] = ["per_channel"]
    pipe2 = Pipeline(small_cnn(), calib(), spec, QuantOptions(check_artifact=False))
    assert not any(k.endswith("/pt") for k in build_space(pipe2, pipe2.build().plan).layers["conv1"].candidates)
    # T4: INT8 only, int4 simulated; latency predicted (the target is not this machine)
    res = hago_py.quantize(small_cnn(), calib(), "cuda_t4", search=True, accuracy_budget=0.05,
                           check_artifact=False, max_calib_samples=32)
    s = res.report["search"]
    assert s["latency_source"]["kind"] == "predicted" and not s["latency_source"]["target_reachable"]
    assert res.report["latency"]["measured"] is False
    keys = {c["key"] for c in s["space"]["layers"]["conv1"]["candidates"]}
    assert {"int8/pc", "int8/pt", "fp32"} <= keys and not any(k.startswith(("uint8", "int4")) for k in keys)
    assert any("W4A4" in n and "not searched" in n for n in s["space"]["notes"])   # T4's int4 is W4A4


def test_greedy_and_milp_on_a_known_table():
    # layer x: INT8 saves 0.3 for error 1; layer y: INT8 saves 0.1 for error 1; FP32 costs nothing
    t = Table(rows={"x": {"q": (1.0, 0.0), "fp32": (0.0, 0.3)}, "y": {"q": (1.0, 0.0), "fp32": (0.0, 0.1)}},
              ref={"x": "q", "y": "q"}, ref_latency=0.5)
    path = greedy_path(t)
    assert path[0] == {"x": "q", "y": "q"} and path[1] == {"x": "q", "y": "fp32"} and path[-1]["x"] == "fp32"
    assert milp_solve(t, objective="latency", max_err=1.0) == {"x": "q", "y": "fp32"}
    assert milp_solve(t, objective="error", max_latency=0.65) == {"x": "q", "y": "fp32"}
    assert milp_solve(t, objective="latency", max_err=-1.0) is None


# ------------------------------------------------------------------------------------------------ measured
def test_measured_latency_table_structure():
    fast = {"layer_min_time_s": 0.0, "layer_repeats": 5, "plan_min_time_s": 0.0, "plan_repeats": 5,
            "retime_min_time_s": 0.0}
    pipe = Pipeline(small_cnn(), calib(), "x86_avx2", QuantOptions(check_artifact=False, timing_repeats=3))
    res = run_search(pipe, accuracy_budget=1.0, timing=fast, max_plan_trials=3, variant_layers=0)
    s = res.report["search"]
    assert s["latency_source"]["kind"] == "measured" and s["latency_source"]["target_reachable"]
    layer_trials = [t for t in s["trials"] if t["kind"] == "layer"]
    assert {t["node"] for t in layer_trials} == {"conv1", "conv2", "add", "gap", "fc"}
    for t in layer_trials:
        assert "fp32" in t["candidates"]
        for c in t["candidates"].values():
            assert c["ratio"] > 0 and c["se"] >= 0 and "nmse" in c
    assert all(p["latency"] == "measured" for p in s["points"])
    assert res.report["latency"]["measured"]
    assert set(s["table"]["conv1"]) >= {"int8/pc", "fp32"}


# ------------------------------------------------------------------------------------------------ anytime / resume
def test_time_budget_returns_best_so_far():
    res = search(mlp3(), mlp_calib(), accuracy_budget=1.0, time_budget=1e-3)
    s = res.report["search"]
    assert s["stopped_early"] and res.chosen["stage"] == "reference"
    assert "time_budget" in " ".join(line["msg"] for line in s["log"])


def test_checkpoint_guards(tmp_path):
    ck = tmp_path / "s.json"
    a = search(mlp3(), mlp_calib(), accuracy_budget=3e-4, checkpoint=ck)
    data = json.loads(ck.read_text())
    assert data["done"] and len(data["trials"]) == a.report["search"]["counts"]["trials"]
    with pytest.raises(OptionError, match="already exists"):
        search(mlp3(), mlp_calib(), accuracy_budget=3e-4, checkpoint=ck)
    with pytest.raises(OptionError, match="another search"):
        search(mlp3(seed=3), mlp_calib(), accuracy_budget=3e-4, checkpoint=ck, resume=True)
    with pytest.raises(OptionError, match="does not exist"):
        search(mlp3(), mlp_calib(), checkpoint=tmp_path / "none.json", resume=True)
    # a finished search resumes by replaying every trial: same plan, nothing measured
    b = search(mlp3(), mlp_calib(), accuracy_budget=3e-4, checkpoint=ck, resume=True)
    assert b.plan.to_json() == a.plan.to_json()
    assert b.report["search"]["counts"]["measured_this_run"] == 0


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import test_search as t
from hago_py.search import run_search
from hago_py.pipeline import Pipeline
from hago_py.quant.options import QuantOptions
pipe = Pipeline(t.mlp3(), t.mlp_calib(), "x86_avx2", QuantOptions(check_artifact=False))
print("started", flush=True)
run_search(pipe, accuracy_budget=3e-4, latency=t.injected_latency, checkpoint={ck!r},
           on_trial=lambda rec: time.sleep(0.4))
print("finished", flush=True)
"""


def test_resume_after_kill_9_gives_the_same_plan(tmp_path):
    full = search(mlp3(), mlp_calib(), accuracy_budget=3e-4)
    n_total = full.report["search"]["counts"]["trials"]
    ck = tmp_path / "search.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(HERE), ck=str(ck))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    recorded = 0
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if ck.exists():
                try:
                    recorded = len(json.loads(ck.read_text())["trials"])
                except (ValueError, KeyError):
                    recorded = 0          # never happens with atomic writes; tolerate and retry
                if recorded >= 6:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    data = json.loads(ck.read_text())          # the file is whole after kill -9
    assert 6 <= len(data["trials"]) < n_total and not data.get("done")
    resumed = search(mlp3(), mlp_calib(), accuracy_budget=3e-4, checkpoint=ck, resume=True)
    c = resumed.report["search"]["counts"]
    assert c["replayed"] == len(data["trials"])                 # no recorded trial lost or re-measured
    assert c["trials"] == n_total and c["measured_this_run"] == n_total - len(data["trials"])
    assert resumed.plan.to_json() == full.plan.to_json()
    assert resumed.chosen["id"] == full.chosen["id"]


def test_search_options_pass_through_the_api():
    import hago_py
    from hago_py.errors import OptionError
    from models import calib, small_cnn

    with pytest.raises(OptionError, match="search_options only apply to a search"):
        hago_py.quantize(small_cnn(), calib(), "x86_avx2", search_options={"latency": "predicted"},
                         measure_latency=False)
    r = hago_py.quantize(small_cnn(), calib(), "x86_avx2", search=True, search_options={"latency": "predicted"},
                         measure_latency=False)
    assert r.chosen["latency"] == "predicted" and r.chosen["speedup"] > 1.0


def test_user_metric_name_from_attribute_or_function_name():
    from hago_py.search.evaluators import UserMetric

    def top1(m):
        return 1.0

    assert UserMetric(top1).name == "top1"
    assert UserMetric(lambda m: 1.0).name == "<lambda>"
    top1.metric_name = "top-1 %"
    assert UserMetric(top1).name == "top-1 %"


def test_speed_ties_go_to_the_more_accurate_plan():
    from hago_py.search.pareto import choose

    pts = [{"id": "a", "speedup": 1.755, "metric": 0.8177, "drop": 0.0026},
           {"id": "b", "speedup": 1.739, "metric": 0.8198, "drop": 0.0006},
           {"id": "c", "speedup": 1.60, "metric": 0.8203, "drop": 0.0},
           {"id": "d", "speedup": 1.90, "metric": 0.8100, "drop": 0.0103}]   # over the budget
    assert choose(pts, 0.003, None, "speed")["id"] == "a"                 # no tie margin: the fastest
    assert choose(pts, 0.003, None, "speed", tie=0.02)["id"] == "b"       # 0.9 % slower counts as equal
    assert choose(pts, 0.003, None, "speed", tie=0.005)["id"] == "a"      # beyond the margin speed wins
    assert choose(pts, 0.003, None, "metric", tie=0.02)["id"] == "c"


# ------------------------------------------------------------------------------------------------ islands
def mlp4(seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> Relu -> fc4 -> y[N,8], hidden width 32."""
    rng = np.random.default_rng(seed)
    dims = [(32, 16), (32, 32), (32, 32), (8, 32)]
    inits, nodes, x = [], [], "x"
    for i, (o, k) in enumerate(dims, 1):
        inits += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(k), (o, k)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(o, np.float32), f"b{i}")]
        out = "y" if i == len(dims) else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if i < len(dims):
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    g = helper.make_graph(nodes, "mlp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


ISLAND_COST = {"fc1": (2.0, 0.5), "fc2": (0.4, 0.9), "fc3": (0.4, 0.9), "fc4": (2.0, 0.5)}   # (float, int8)
ISLAND_WIDTH = [16, 32, 32, 32, 8]        # tensor widths at the 5 boundaries in / fc1..fc4 / out


def island_latency(model, plan):
    """Chain latency with int8-region boundaries: layer costs from ISLAND_COST, plus 0.4 * width / 32 at
    every precision change along x -> fc1 -> fc2 -> fc3 -> fc4 -> y (the model's input and output are
    float). fc2 and fc3 are faster in float, but each alone pays two boundaries (+0.3 slower than int8);
    together they share one and the island is the fastest plan: 2.9 vs 3.1 (all int8) and 4.8 (FP32)."""
    if plan is None:
        return sum(f for f, _ in ISLAND_COST.values())
    fl = [True] + [not plan.layers[n].quantize for n in ("fc1", "fc2", "fc3", "fc4")] + [True]
    t = sum(ISLAND_COST[n][0 if f else 1] for n, f in zip(("fc1", "fc2", "fc3", "fc4"), fl[1:-1]))
    return t + sum(0.4 * w / 32 for w, a, b in zip(ISLAND_WIDTH, fl, fl[1:]) if a != b)


def test_float_island_found_through_the_boundary_model():
    x = np.random.default_rng(3).normal(0, 1, (64, 16)).astype(np.float32)
    pipe = Pipeline(mlp4(), {"x": x}, "x86_avx2", QuantOptions(check_artifact=False))
    res = run_search(pipe, accuracy_budget=0.05, latency=island_latency)
    q = {n: res.plan.layers[n].quantize for n in ("fc1", "fc2", "fc3", "fc4")}
    assert q == {"fc1": True, "fc2": False, "fc3": False, "fc4": True}
    assert res.chosen["speedup"] == pytest.approx(4.8 / 2.9)
    b = res.report["search"]["boundaries"]
    assert {(e["u"], e["v"]) for e in b["edges"]} == {(None, "fc1"), ("fc1", "fc2"), ("fc2", "fc3"),
                                                        ("fc3", "fc4"), ("fc4", None)}
    # the pair fc2+fc3 was timed together, and it shares the one boundary between them (0.4 of 4.8)
    pair = next(p for p in b["pairs"] if (p["u"], p["v"]) == ("fc2", "fc3"))
    assert pair["shared_boundary"] == pytest.approx(0.4 / 4.8)
    assert b["cost_per_element"] * 32 == pytest.approx(0.4 / 4.8, rel=0.1)      # 3 pairs + a weak prior
    from hago_py.report.write import render_search_markdown
    md = "\n".join(render_search_markdown(res.report["search"]))
    assert "int8-region boundaries: 5 edges" in md and "3 adjacent pairs timed" in md


def test_table_latency_and_milp_with_boundaries():
    # in-place: a and b each 0.04 slower in float (compute -0.05, boundaries -0.01 + 0.1); together -0.12
    rows = {"a": {"q": (1.0, 0.0), "fp32": (0.0, 0.04)}, "b": {"q": (1.0, 0.0), "fp32": (0.0, 0.04)}}
    edges = [(None, "a", 0.01), ("a", "b", 0.1), ("b", None, 0.01)]
    t = Table(rows=rows, ref={"a": "q", "b": "q"}, ref_latency=0.6, edges=edges)
    assert t.latency({"a": "fp32"}) == pytest.approx(0.64) and t.latency({"b": "fp32"}) == pytest.approx(0.64)
    assert t.latency({"a": "fp32", "b": "fp32"}) == pytest.approx(0.48)
    assert milp_solve(t, objective="latency") == {"a": "fp32", "b": "fp32"}
    assert milp_solve(t, objective="error", max_latency=0.5) == {"a": "fp32", "b": "fp32"}
    assert milp_solve(t, objective="error", max_latency=0.47) is None          # the island (0.48) is the fastest
    # without the boundary model the same rows are additive: float never pays
    plain = Table(rows=rows, ref={"a": "q", "b": "q"}, ref_latency=0.6)
    assert milp_solve(plain, objective="latency") == {"a": "q", "b": "q"}
    from hago_py.search.strategies import faster_moves
    assert faster_moves(t, {"a": "q", "b": "q"}) == [{"a": "fp32", "b": "fp32"}]
    assert faster_moves(plain, {"a": "q", "b": "q"}) == []


def test_layer_edges_and_cost_fit():
    from hago_py.search.boundaries import fit_cost, layer_edges

    m = mlp4()
    shapes = {"x": [1, 16], "r1": [1, 32], "r2": [1, 32], "r3": [1, 32], "y": [1, 8], "h1": [1, 32]}
    edges = {(e.u, e.v): e.numel for e in layer_edges(m, ["fc1", "fc2", "fc4"], shapes)}
    # fc3 is not a search layer: fc2 -> fc3 and fc3 -> fc4 carry no edge; fc3's output is unknown to fc4
    assert edges == {(None, "fc1"): 16, ("fc1", "fc2"): 32, ("fc4", None): 8}
    assert fit_cost([(2 * 0.5 * 10, 10), (2 * 0.5 * 30, 30)], prior=0.0, prior_weight=0.0) == pytest.approx(0.5)
    assert fit_cost([], prior=0.25) == 0.25 and fit_cost([(-5.0, 10)], prior=0.0, prior_weight=0.0) == 0.0


def test_io_islands_follow_single_edge_chains():
    from types import SimpleNamespace

    from hago_py.search.boundaries import layer_edges
    from hago_py.search.search import _Search

    class Space:
        def __init__(self, fp32=True):
            self.fp32 = fp32

        def active(self):
            return {"fp32": None, "int8/pc": None} if self.fp32 else {"int8/pc": None}

    shapes = {t: [1, 32] for t in ("r1", "r2", "r3")}
    shapes.update(x=[1, 16], y=[1, 8])
    names = ("fc1", "fc2", "fc3", "fc4")
    fake = SimpleNamespace(edge_objs=layer_edges(mlp4(), names, shapes),
                           space=SimpleNamespace(layers={n: Space() for n in names}))
    assert _Search._io_islands(fake) == [("input", ["fc1"]), ("input", ["fc1", "fc2"]),
                                         ("input", ["fc1", "fc2", "fc3"]), ("output", ["fc4"]),
                                         ("output", ["fc4", "fc3"]), ("output", ["fc4", "fc3", "fc2"])]
    fake.space.layers["fc2"] = Space(fp32=False)      # a layer that cannot be float ends the chain
    assert ("input", ["fc1", "fc2"]) not in _Search._io_islands(fake)
    assert ("output", ["fc4", "fc3"]) in _Search._io_islands(fake)
