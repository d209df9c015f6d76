"""granularity="hybrid" (quant/hybrid.py) and the forced granularities."""
import numpy as np
import onnx
import pytest
from onnx import helper

import hago_py
from hago_py.errors import OptionError
from hago_py.quant.hybrid import _divergence, fake_weight
from hago_py.quant.plan import QuantPlan, TensorQuant
from hago_py.report.write import render_markdown

from models import _init, calib, checked_model


def two_conv(seed: int = 0) -> onnx.ModelProto:
    """input -> conv_flat (every output channel the same range: per-tensor == per-channel) -> Relu ->
    conv_wide (output channel ranges spread 100x; the FC undoes the spread, so every channel matters as much)
    -> Relu -> GlobalAveragePool -> Flatten -> fc (4 classes)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, (8, 3, 3, 3))
    w1 = (0.3 * w1 / np.abs(w1).reshape(8, -1).max(1)[:, None, None, None]).astype(np.float32)
    spread = 100.0 ** (-np.arange(8) / 7.0)                       # 1 ... 0.01
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)) * spread[:, None, None, None]
    b2 = rng.uniform(0.0, 0.1, 8) * spread
    wf = rng.normal(0, 3.0, (4, 8)) / spread[None, :]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv_flat", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv_wide", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf"], ["output"], name="fc", transB=1)]
    inits = [_init("w1", w1), _init("w2", w2.astype(np.float32)), _init("b2", b2.astype(np.float32)),
             _init("wf", wf.astype(np.float32))]
    return checked_model(nodes, inits, "two_conv", ["N", 3, 8, 8], ["N", 4])


FAST = dict(measure_latency=False)


@pytest.fixture(scope="module")
def hybrid_result():
    return hago_py.quantize(two_conv(), calib(n=64), "x86_avx2", granularity="hybrid", **FAST)


def _gran(res, node):
    return res.plan.layers[node].weight.granularity


def test_hybrid_per_tensor_for_insensitive_per_channel_for_wide_range(hybrid_result):
    rows = {r["node"]: r for r in hybrid_result.report["hybrid"]["layers"]}
    assert rows["conv_flat"]["choice"] == "per_tensor"
    assert rows["conv_wide"]["choice"] == "per_channel"
    assert rows["conv_wide"]["sensitivity"] > 100 * max(rows["conv_flat"]["sensitivity"], 1e-9)
    assert _gran(hybrid_result, "conv_flat") == "per_tensor"
    assert _gran(hybrid_result, "conv_wide") == "per_channel"


def test_hybrid_decision_recorded_in_plan(hybrid_result):
    plan = QuantPlan.from_json(hybrid_result.plan.to_json())
    for node in ("conv_flat", "conv_wide"):
        lp = plan.layers[node]
        assert any(n.startswith("hybrid granularity") for n in lp.notes)
        assert "hybrid granularity" in lp.reason
    assert "sensitive" in plan.layers["conv_wide"].reason


def test_hybrid_report_rows(hybrid_result):
    h = hybrid_result.report["hybrid"]
    assert h["candidates"] == len(h["layers"]) == 3
    assert h["per_tensor"] + h["per_channel"] == 3
    md = render_markdown(hybrid_result.report)
    assert "## Hybrid weight granularity" in md
    for r in h["layers"]:
        assert f"| `{r['node']}` |" in md.split("## Hybrid weight granularity")[1].split("## Per-layer")[0]


def test_predicted_latency_path_labelled(hybrid_result):
    lat = hybrid_result.report["hybrid"]["latency"]
    assert lat["source"] == "predicted" and "measure_latency=False" in lat["label"]
    assert all(r["latency_gain"] > 0 for r in hybrid_result.report["hybrid"]["layers"])
    assert "**predicted**" in render_markdown(hybrid_result.report)


def test_unmeasurable_target_is_predicted():
    res = hago_py.quantize(two_conv(), calib(n=32), "arm_cortex_a76", granularity="hybrid", measure_latency=True,
                           check_artifact=False)
    lat = res.report["hybrid"]["latency"]
    assert lat["source"] == "predicted" and "ARM" in lat["label"]


def test_forced_granularities():
    m, c = two_conv(), calib(n=32)
    pt = hago_py.quantize(m, c, granularity="per_tensor", **FAST)
    assert _gran(pt, "conv_flat") == "per_tensor"
    assert {lp.weight.granularity for lp in pt.plan.quantized_layers() if lp.weight} == {"per_tensor"}
    # conv_wide per-tensor is catastrophic: the numeric sanity check keeps it FP32 (it was per-tensor)
    assert not pt.plan.layers["conv_wide"].quantize and "conv_wide" in pt.report["sanity_fallback"]
    pc = hago_py.quantize(m, c, granularity="per_channel", per_channel=False, **FAST)
    assert {_gran(pc, n) for n in ("conv_flat", "conv_wide")} == {"per_channel"}
    assert {lp.weight.granularity for lp in pc.plan.quantized_layers() if lp.weight} == {"per_channel"}
    auto = hago_py.quantize(m, c, per_channel=False, **FAST)
    assert _gran(auto, "conv_flat") == "per_tensor"
    # a per-layer setting wins over the forced global granularity
    mixed = hago_py.quantize(m, c, granularity="per_tensor", layers={"conv_wide": {"per_channel": True}}, **FAST)
    assert _gran(mixed, "conv_wide") == "per_channel" and _gran(mixed, "conv_flat") == "per_tensor"


def test_hybrid_respects_user_layer_setting():
    res = hago_py.quantize(two_conv(), calib(n=32), granularity="hybrid", layers={"conv_wide": {"per_channel": False}},
                           **FAST)
    assert _gran(res, "conv_wide") == "per_tensor"
    assert "conv_wide" not in {r["node"] for r in res.report["hybrid"]["layers"]}


def test_hybrid_with_user_evaluate():
    x = calib(seed=5, n=32)
    from models import run

    ref = np.argmax(run(two_conv(), x)[0], 1)

    def agreement(model):
        return float(np.mean(np.argmax(run(model, x)[0], 1) == ref)) + float(np.mean(run(model, x)[0][:, 0])) * 0

    res = hago_py.quantize(two_conv(), calib(n=32), granularity="hybrid", evaluate=agreement, **FAST)
    h = res.report["hybrid"]
    assert h["sensitivity"]["metric"] == "evaluate" and h["sensitivity"]["reference"] == 1.0
    assert {r["node"]: r["choice"] for r in h["layers"]}["conv_flat"] == "per_tensor"


def test_evaluate_without_search_or_hybrid_still_rejected():
    with pytest.raises(OptionError):
        hago_py.quantize(two_conv(), calib(n=32), evaluate=lambda m: 1.0, **FAST)


def test_fake_weight_and_divergence():
    w = np.array([[1.0, -0.5], [0.01, 0.003]], np.float32)
    pc = TensorQuant("w", role="weight", dtype="int8", bits=8, symmetric=True, narrow=True, granularity="per_channel",
                     axis=0, mode="constant", method="nearest")
    pt = TensorQuant("w", role="weight", dtype="int8", bits=8, symmetric=True, narrow=True, granularity="per_tensor",
                     mode="constant", method="nearest")
    assert np.allclose(fake_weight(w, pc), w, rtol=0.01)
    assert fake_weight(w, pt)[1, 1] == 0.0          # the small channel loses its resolution per-tensor
    logits = np.array([[2.0, 0.0, -1.0]])
    assert _divergence([logits], [logits]) == (0.0, "kl")
    assert _divergence([logits], [logits[:, ::-1]])[0] > 0.5
    assert _divergence([np.ones((2, 1))], [np.zeros((2, 1))]) == (1.0, "nsr")


def test_search_measures_the_hybrid_plan():
    """granularity="hybrid" + search=True: the hybrid plan is one of the search's end-to-end points."""
    res = hago_py.quantize(two_conv(), calib(n=32), "x86_avx2", search=True, granularity="hybrid",
                           search_options={"latency": "predicted"}, measure_latency=False, check_artifact=False)
    s = res.report["search"]
    assert any(e["stage"] == "hybrid" and "hybrid granularity" in e["msg"] for e in s["log"])
    assert res.report["hybrid"]["candidates"] == 3
    hybrid_pc = {r["node"]: r["choice"] for r in res.report["hybrid"]["layers"]}
    assert hybrid_pc["conv_wide"] == "per_channel" and hybrid_pc["conv_flat"] == "per_tensor"


@pytest.mark.parametrize("pt_ms,expect", [(0.95, "measured"), (1.05, "slower"), (None, "inconclusive")])
def test_measured_gain_attribution(monkeypatch, pt_ms, expect):
    """The end-to-end timing decides by its paired per-round ratios (fed here, not timed): a conclusive gain is
    attributed per layer by requantization work; a conclusive loss keeps every layer per-channel; a gain whose
    p10..p90 spans 0 falls back to the cost-model prior, labelled so."""
    from hago_py.backends import ort as ort_mod
    from hago_py.backends.base import Timing, TimingResult

    real_time = ort_mod.OrtBackend.time

    def fake_time(self, artifacts, feed, **kw):
        if "per_tensor" not in artifacts:            # the final report's FP32 vs int8 timing
            return real_time(self, artifacts, feed, repeats=2, warmup=0)
        pc = [1e-3] * 20
        pt = [1e-3 * (pt_ms if pt_ms else (0.97 if i % 2 else 1.03)) for i in range(20)]
        return TimingResult([Timing("per_channel", pc), Timing("per_tensor", pt)], threads=1)

    monkeypatch.setattr(ort_mod.OrtBackend, "time", fake_time)
    res = hago_py.quantize(two_conv(), calib(n=32), "x86_avx2", granularity="hybrid", check_artifact=False,
                           measure_latency=True)
    h = res.report["hybrid"]
    lat, rows = h["latency"], {r["node"]: r for r in h["layers"]}
    assert lat["source"] == "measured"
    if expect == "measured":
        assert lat["conclusive"] and lat["gain"] == pytest.approx(0.05)
        assert sum(r["latency_gain"] for r in rows.values()) == pytest.approx(0.05)
        assert rows["conv_flat"]["latency_gain"] > rows["fc"]["latency_gain"]     # more output elements
        assert rows["conv_flat"]["choice"] == "per_tensor"
    elif expect == "slower":
        assert lat["conclusive"] and lat["gain"] < 0
        assert {r["choice"] for r in rows.values()} == {"per_channel"}
        assert "no latency gain" in rows["conv_flat"]["why"] and "sensitive" in rows["conv_wide"]["why"]
    else:
        assert not lat["conclusive"] and "inconclusive" in lat["label"]
        assert rows["conv_flat"]["choice"] == "per_tensor"


def test_hybrid_budget_option():
    """hybrid_budget replaces the default KL budget: a budget large enough admits the 100x-range layer too (the
    budget is the user's call; the numeric sanity check still guards the result); a negative one is an option
    error naming it."""
    res = hago_py.quantize(two_conv(), calib(n=64), "x86_avx2", granularity="hybrid", hybrid_budget=1e6, **FAST)
    h = res.report["hybrid"]
    assert h["sensitivity"]["budget"] == 1e6
    assert {r["node"]: r["choice"] for r in h["layers"]}["conv_wide"] == "per_tensor"
    lp = res.plan.layers["conv_wide"]  # per-tensor, unless the numeric sanity check then keeps it FP32 (100x range)
    assert (lp.weight is not None and lp.weight.granularity == "per_tensor") or "conv_wide" in res.report.get(
        "sanity_fallback", {})
    with pytest.raises(OptionError, match="hybrid_budget"):
        hago_py.quantize(two_conv(), calib(n=64), "x86_avx2", granularity="hybrid", hybrid_budget=-1.0, **FAST)
