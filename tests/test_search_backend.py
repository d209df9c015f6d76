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
