"""The search goes through the backend it is given: every timing, and no backend made by the search itself
(the pipeline's own passes, calibration, remedy choice and the deployability gate, run models on their own)."""
import traceback

import hago_py.backends.ort as ort_mod
from hago_py.backends.ort import OrtBackend
from hago_py.pipeline import Pipeline
from hago_py.quant.options import QuantOptions
from hago_py.search import run_search

from test_search import mlp3, mlp_calib

FAST = {"plan_min_time_s": 0.02, "layer_min_time_s": 0.01, "plan_repeats": 3, "layer_repeats": 3,
        "retime_min_time_s": 0.02}


class CountingBackend:
    """OrtBackend's interface, delegating to one OrtBackend made before the search, counting the calls."""

    def __init__(self):
        self.inner = OrtBackend(threads=1)
        self.threads = self.inner.threads
        self.compiles = 0
        self.timed = []

    def compile(self, model, *a, **kw):
        self.compiles += 1
        return self.inner.compile(model, *a, **kw)

    def run(self, *a, **kw):
        return self.inner.run(*a, **kw)

    def time(self, artifacts, feed, **kw):
        self.timed.append(sorted(artifacts))
        return self.inner.time(artifacts, feed, **kw)

    def predict(self, *a, **kw):
        return self.inner.predict(*a, **kw)


def test_search_uses_the_backend_passed_in(monkeypatch):
    fake = CountingBackend()
    pipe = Pipeline(mlp3(), mlp_calib(), "x86_avx2", QuantOptions(check_artifact=False))
    made, timers = [], []
    init, time_ = OrtBackend.__init__, OrtBackend.time

    def counting_init(self, *a, **kw):
        caller = traceback.extract_stack()[-2].filename.replace("\\", "/")
        made.append(caller)
        init(self, *a, **kw)

    def counting_time(self, *a, **kw):
        timers.append(self)
        return time_(self, *a, **kw)

    monkeypatch.setattr(ort_mod.OrtBackend, "__init__", counting_init)
    monkeypatch.setattr(ort_mod.OrtBackend, "time", counting_time)
    res = run_search(pipe, latency="measured", accuracy_budget=0.01, proxy_samples=8, sensitivity_samples=4,
                     max_plan_trials=4, variant_layers=1, refine_moves=0, timing=FAST, backend=fake)
    assert not [c for c in made if "/search/" in c or c.endswith("/result.py")], made
    assert timers and all(t is fake.inner for t in timers)          # every timing through the backend given
    assert fake.compiles > 0
    assert any("fp32" in t and "plan" in t for t in fake.timed)       # end-to-end plan trials
    assert ["fp32", "int8"] in fake.timed                             # the chosen plan's final latency
    assert res.report["latency"]["measured"] is True
    assert res.report["search"]["latency_source"]["kind"] == "measured"


def test_default_x86_search_times_with_ort(monkeypatch, tmp_path):
    """No rpc, an x86 spec this host runs: the search's own ORT backend times every trial (the same sessions as
    for accuracy), no TVM backend is made, and the checkpoint's identity keeps the words of earlier runs."""
    import json

    import pytest

    import hago_py.backends.tvm.backend as tvm_backend   # imports no tvm (only its functions do)
    from hago_py.search.evaluators import target_reachable
    from hago_py.search.timer import choose_timer

    pipe = Pipeline(mlp3(), mlp_calib(), "x86_avx2", QuantOptions(check_artifact=False))
    if not target_reachable(pipe.spec)[0]:
        pytest.skip("this host cannot run the x86_avx2 spec with ORT (the search predicts it)")

    def no_tvm(*a, **kw):
        raise AssertionError("the default x86 path made a TvmBackend")

    monkeypatch.setattr(tvm_backend.TvmBackend, "__init__", no_tvm)
    timer = choose_timer(pipe)
    assert timer.backend is None and timer.reachable and not timer.owned   # None: the search's own backend
    timed = []
    time_ = OrtBackend.time

    def counting_time(self, artifacts, *a, **kw):
        timed.append(sorted(artifacts))
        return time_(self, artifacts, *a, **kw)

    monkeypatch.setattr(ort_mod.OrtBackend, "time", counting_time)
    ckpt = tmp_path / "search.json"
    res = run_search(pipe, accuracy_budget=0.5, proxy_samples=8, sensitivity_samples=4, max_plan_trials=3,
                     variant_layers=0, refine_moves=0, timing=FAST, checkpoint=ckpt)
    assert any("fp32" in t and "plan" in t for t in timed) and ["fp32", "int8"] in timed
    assert any("ref" in t and len(t) > 1 for t in timed)                          # the layer table, in place
    src = res.report["search"]["latency_source"]
    assert src["kind"] == "measured" and src["measured_on"] == "ORT local (CPUExecutionProvider)"
    assert src["why"] == target_reachable(pipe.spec)[1]
    assert res.report["latency"]["measured_on"] == src["measured_on"]
    assert res.report["latency"]["meta"]["backend"] == "onnxruntime"
    identity = json.loads(ckpt.read_text())["identity"]
    assert identity["latency"] == ("measured: ONNX Runtime CPU, 1 thread(s), batch 1, round-robin interleaved; "
                                   "ratios of each model's p10 round time (robust on a shared machine), per-round "
                                   "paired medians recorded beside them")
