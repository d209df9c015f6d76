"""TVM RPC measurement (hago_py/backends/tvm/rpc.py): a tracker and a server on 127.0.0.1 (subprocesses, killed in
the fixture's finalizer), a tiny QDQ model and its FP32 twin compiled here for the host, uploaded, run and timed
on the remote through the tracker; outputs equal the local TVM build's bit for bit. quantize(search=True, rpc=...)
times every search trial there (accuracy measured here)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from models import calib, small_cnn

tvm = pytest.importorskip("tvm")

import hago_py  # noqa: E402
from hago_py.backends.tvm import TvmBackend  # noqa: E402
from hago_py.backends.tvm.rpc import parse_rpc  # noqa: E402
from hago_py.errors import BackendError  # noqa: E402

KEY = "hago-test"
TARGET = {"kind": "llvm"}   # the host's generic llvm target: same code here and on the (local) remote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One subprocess hosts TVM's own tracker and server (tvm.rpc.tracker / tvm.rpc.server, as `python -m
# tvm.exec.rpc_tracker` / `rpc_server` start them, minus their extra worker process each: one `import tvm` instead
# of four). It exits when this process dies or after LIFETIME_S; the finalizer kills its process group (the server
# forks one process per session). Its main thread must not block in a read of stdin: the server's forked session
# process closes stdin and would deadlock on the buffer lock held across the fork.
LIFETIME_S = 300
_HOST = f"""
import os, sys, time
from tvm.rpc.tracker import PopenTrackerServerState
from tvm.rpc.server import PopenRPCServerState
tport, sport, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
parent, t_end = os.getppid(), time.time() + {LIFETIME_S}
PopenTrackerServerState("127.0.0.1", tport, tport + 1, silent=True)
PopenRPCServerState("127.0.0.1", sport, sport + 1, False, ("127.0.0.1", tport), key, None, None, True, True, None)
while os.getppid() == parent and time.time() < t_end:
    time.sleep(0.2)
os._exit(0)
"""


def _start_rpc_host(tport: int, sport: int):
    return subprocess.Popen([sys.executable, "-c", _HOST, str(tport), str(sport), KEY], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill(p) -> None:
    """SIGTERM, then SIGKILL, to the host's process group (its forked session processes included)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(timeout=3)
            if sig == signal.SIGTERM:
                continue   # the group may still hold session processes: SIGKILL them too
        except subprocess.TimeoutExpired:
            continue
    if p.poll() is None:   # pragma: no cover
        p.kill()
        p.wait(timeout=3)


def _wait_registered(port: int, proc, timeout: float) -> None:
    from tvm import rpc

    t_end = time.time() + timeout
    while time.time() < t_end:   # the host prints "ready" once tracker and server are up
        if proc.poll() is not None:
            raise RuntimeError(f"RPC host process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    ts = rpc.connect_tracker("127.0.0.1", port)
    try:
        while time.time() < t_end:
            if any(s.get("key", "").endswith(":" + KEY) for s in ts.summary().get("server_info", [])):
                return
            time.sleep(0.1)
    finally:
        ts.close()
    raise RuntimeError(f"no server registered key {KEY} at the tracker within {timeout} s")


@pytest.fixture(scope="module")
def remote(request):
    """(tracker port, quantized model, fp32 model): the RPC host starts while this process quantizes."""
    tport, sport = _free_port(), _free_port()
    proc = _start_rpc_host(tport, sport)
    request.addfinalizer(lambda: _kill(proc))
    r = hago_py.quantize(small_cnn(), calib(n=8), "x86_avx2", measure_latency=False, check_artifact=False)
    _wait_registered(tport, proc, 40)
    return tport, r.model, r.fp32_model


def test_remote_outputs_equal_local_and_timings(remote):
    tport, qmodel, fmodel = remote
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    feed = {qmodel.graph.input[0].name: x}

    be = TvmBackend(target=TARGET, rpc={"tracker": f"127.0.0.1:{tport}", "key": KEY, "request_timeout": 20})
    try:
        arts = {"fp32": be.compile(fmodel), "int8": be.compile(qmodel)}
        loc = TvmBackend(target=TARGET)
        for k, model in (("fp32", fmodel), ("int8", qmodel)):
            got = be.run(arts[k], feed)
            ref = loc.run(loc.compile(model), feed)
            assert len(got) == len(ref)
            for g, e in zip(got, ref):
                assert g.dtype == e.dtype and g.shape == e.shape
                np.testing.assert_array_equal(g, e)
        tr = be.time(arts, feed, repeats=12, warmup=2)
    finally:
        be.close()
    assert [t.label for t in tr.timings] == ["fp32", "int8"]
    for t in tr.timings:
        assert len(t.samples) == 12 and all(s > 0 for s in t.samples)
    assert tr.meta["backend"] == "tvm" and tr.measured
    assert tr.meta["rpc"] == {"kind": "tracker", "address": f"127.0.0.1:{tport}", "key": KEY}
    assert f"127.0.0.1:{tport}" in tr.meta["rpc_endpoint"] and KEY in tr.meta["rpc_endpoint"]
    assert "cpu(0)" in tr.meta["remote_device"] and KEY in tr.meta["remote_device"]
    assert np.isfinite(tr.speedup("int8")) and tr.speedup("int8") > 0
    print("remote", {t.label: t.summary() for t in tr.timings}, "speedup", tr.speedup("int8"))


def test_direct_server_and_string_form(remote):
    tport, qmodel, _ = remote
    ep = parse_rpc(f"127.0.0.1:{tport}:{KEY}")
    assert ep.via_tracker and ep.key == KEY and ep.port == tport
    ep = parse_rpc("10.0.0.5:9090")
    assert not ep.via_tracker and ep.address == "10.0.0.5:9090"
    with pytest.raises(BackendError, match="no 'key'"):
        parse_rpc({"tracker": "127.0.0.1:9190"})


def test_unknown_key_names_registered_keys(remote):
    tport, qmodel, _ = remote
    be = TvmBackend(target=TARGET, rpc={"tracker": f"127.0.0.1:{tport}", "key": "nosuchdevice"})
    t0 = time.time()
    with pytest.raises(BackendError) as ei:
        be.compile(qmodel)
    assert time.time() - t0 < 15
    msg = str(ei.value)
    assert "nosuchdevice" in msg and KEY in msg and f"127.0.0.1:{tport}" in msg and "rpc_server" in msg


def test_wrong_tracker_address_fails_fast():
    port = _free_port()   # nothing listens there
    be = TvmBackend(target=TARGET, rpc={"tracker": f"127.0.0.1:{port}", "key": KEY, "connect_timeout": 2})
    t0 = time.time()
    with pytest.raises(BackendError) as ei:
        be.compile(small_cnn())
    assert time.time() - t0 < 10
    msg = str(ei.value)
    assert f"127.0.0.1:{port}" in msg and "tracker" in msg
    assert "rpc_tracker" in msg and "rpc_server" in msg   # how to fix it


# ------------------------------------------------------------------------------------- backend choice + quantize
def _spec_with_runtime(name: str, runtime: str):
    import copy

    from hago_py.hw import load_spec

    d = copy.deepcopy(load_spec(name).raw)
    d["backend"]["name"] = runtime
    d["name"] = f"{name}_{runtime}"
    return load_spec(d)


def test_backend_for():
    from hago_py.backends.ort import OrtBackend
    from hago_py.backends.select import backend_for, host_arch, select_backend

    if host_arch() != "x86_64":
        pytest.skip("the choices below are written for an x86-64 host")
    sel = select_backend("x86_avx2")
    if sel.kind == "ort":   # the default, unchanged (an x86 host without AVX2 gets "predicted", as the search does)
        assert isinstance(sel.backend, OrtBackend)
    else:
        assert sel.backend is None and "predicted" in sel.why
    sel = select_backend("arm_cortex_a72")
    assert sel.backend is None and sel.kind == "predicted" and "rpc=" in sel.why
    be = backend_for(_spec_with_runtime("x86_avx2", "tvm"))
    assert isinstance(be, TvmBackend) and be.rpc is None and be.target.get("kind") == "llvm"
    assert "mcpu" not in be.target or be.target["mcpu"] != "znver3" or "sse4a" in open("/proc/cpuinfo").read()
    assert backend_for(_spec_with_runtime("arm_cortex_a72", "tvm")) is None
    be = backend_for("arm_cortex_a72", rpc={"tracker": "10.0.0.9:9190", "key": "rasp4",
                                            "cc": "aarch64-linux-gnu-g++"})   # nothing connects before compile
    assert isinstance(be, TvmBackend) and be.rpc.key == "rasp4" and be.target["mtriple"] == "aarch64-linux-gnu"
    assert be.rpc.cc == "aarch64-linux-gnu-g++"
    be = backend_for("x86_avx2", rpc={"tracker": "10.0.0.9:9190", "key": "k", "target": "host"})
    assert be.target.get("mcpu") != "znver3" or "sse4a" in open("/proc/cpuinfo").read()


def test_search_timer_per_spec():
    """search/timer.py: the search's latency backend for each case (nothing connects before a compile)."""
    from types import SimpleNamespace

    from hago_py.backends.select import host_arch
    from hago_py.hw import load_spec
    from hago_py.search.timer import choose_timer

    if host_arch() != "x86_64":
        pytest.skip("the choices below are written for an x86-64 host")

    def pipe(spec, rpc=None):
        return SimpleNamespace(spec=load_spec(spec) if isinstance(spec, str) else spec, rpc=rpc,
                               opts=SimpleNamespace(threads=1))

    t = choose_timer(pipe(_spec_with_runtime("x86_avx2", "tvm")))        # TVM runtime on this host's arch
    assert isinstance(t.backend, TvmBackend) and t.backend.rpc is None and t.owned and t.reachable
    assert t.backend.describe().startswith("TVM local (")
    t = choose_timer(pipe("arm_cortex_a72", rpc={"tracker": "10.0.0.9:9190", "key": "rasp4"}))
    assert isinstance(t.backend, TvmBackend) and t.owned and t.reachable
    assert t.backend.describe().startswith("TVM RPC rasp4@10.0.0.9:9190") and "aarch64" in t.backend.describe()
    t = choose_timer(pipe("arm_cortex_a72"))                                 # not measurable here: predicted
    assert t.backend is None and not t.reachable and "rpc=" in t.why
    given = TvmBackend(target=TARGET)
    t = choose_timer(pipe("x86_avx2"), given)
    assert t.backend is given and not t.owned and "latency_backend passed in" in t.why


def test_quantize_measures_on_the_remote(remote):
    tport, _, _ = remote
    r = hago_py.quantize(small_cnn(), calib(n=8), "x86_avx2", check_artifact=False, timing_repeats=10,
                         rpc={"tracker": f"127.0.0.1:{tport}", "key": KEY, "target": "host"})
    lat = r.report["latency"]
    assert lat["measured"] and lat["meta"]["backend"] == "tvm" and KEY in lat["where"]
    assert lat["meta"]["rpc"]["address"] == f"127.0.0.1:{tport}"
    assert all(m["repeats"] == 10 for m in lat["models"].values()) and lat["speedup"] > 0


def test_search_times_every_trial_on_the_remote(remote, monkeypatch):
    """quantize(search=True, rpc=...): accuracy here (ORT), every latency trial timed on the RPC device."""
    from hago_py.backends.ort import OrtBackend
    from hago_py.backends.tvm import rpc as rpc_mod

    from test_search import mlp3, mlp_calib

    tport, _, _ = remote
    remote_rounds, ort_timed = [], []
    rpc_time, ort_time = rpc_mod.time, OrtBackend.time

    def counting_rpc_time(arts, *a, **kw):
        remote_rounds.append(sorted(arts))
        return rpc_time(arts, *a, **kw)

    def counting_ort_time(self, artifacts, *a, **kw):
        ort_timed.append(sorted(artifacts))
        return ort_time(self, artifacts, *a, **kw)

    monkeypatch.setattr(rpc_mod, "time", counting_rpc_time)
    monkeypatch.setattr(OrtBackend, "time", counting_ort_time)
    fast = {"plan_min_time_s": 0.0, "layer_min_time_s": 0.0, "plan_repeats": 3, "layer_repeats": 3,
            "retime_min_time_s": 0.0}
    t0 = time.time()
    res = hago_py.quantize(mlp3(), mlp_calib(), "x86_avx2", search=True, accuracy_budget=0.05, check_artifact=False,
                           timing_repeats=4, rpc={"tracker": f"127.0.0.1:{tport}", "key": KEY, "target": "host"},
                           search_options=dict(proxy_samples=8, sensitivity_samples=4, max_plan_trials=5,
                                               variant_layers=0, refine_moves=0, timing=fast))
    seconds = time.time() - t0
    src = res.report["search"]["latency_source"]
    assert src["kind"] == "measured" and src["target_reachable"]
    where = f"{KEY}@127.0.0.1:{tport}"
    assert src["measured_on"].startswith("TVM RPC " + where) and where in src["description"]
    assert "rpc= given" in src["why"]
    assert any("fp32" in r and "plan" in r for r in remote_rounds)                 # end-to-end plan trials
    assert any("ref" in r and "fp32" in r and len(r) > 2 for r in remote_rounds)   # the layer table, in place
    assert ["fp32", "int8"] in remote_rounds                                        # the chosen plan's latency
    assert not ort_timed, ort_timed                                                 # nothing timed on ORT here
    lat = res.report["latency"]
    assert lat["measured"] and lat["meta"]["backend"] == "tvm" and KEY in lat["where"]
    assert lat["measured_on"] == src["measured_on"]
    trials = res.report["search"]["trials"]
    assert all(t["latency"] == "measured" for t in trials if t["kind"] in ("plan", "layer"))
    layer = [c for t in trials if t["kind"] == "layer" for c in t["candidates"].values() if "failed" not in c]
    assert layer and all(c["ratio"] > 0 for c in layer)
    # the result is a valid quantized model: it runs in ORT and stays close to FP32 on the calibration data
    assert res.plan.quantized_layers() and res.chosen is not None and res.chosen["drop"] <= 0.05
    x = mlp_calib()["x"][:16]
    sess = OrtBackend().compile(res.model)
    y_q = OrtBackend().run(sess, {"x": x})[0]
    y_f = OrtBackend().run(OrtBackend().compile(mlp3()), {"x": x})[0]
    assert np.all(np.isfinite(y_q)) and np.sum((y_q - y_f) ** 2) / np.sum(y_f ** 2) < 0.05
    print(f"search over RPC: {seconds:.1f} s, {len(trials)} trials, {len(remote_rounds)} remote timings, chosen "
          f"{res.chosen['speedup']:.3f}x")


def test_quantize_rpc_errors():
    from hago_py.errors import OptionError, RemoteError

    with pytest.raises(OptionError, match="measure_latency"):
        hago_py.quantize(small_cnn(), calib(n=8), "x86_avx2", search=True, measure_latency=False,
                         rpc="127.0.0.1:1:k")
    with pytest.raises(OptionError, match="latency_backend"):
        hago_py.quantize(small_cnn(), calib(n=8), "x86_avx2", search=True, rpc="127.0.0.1:1:k",
                         search_options={"latency_backend": TvmBackend()})
    port = _free_port()
    t0 = time.time()
    with pytest.raises(RemoteError, match=f"127.0.0.1:{port}"):   # before any calibration work
        hago_py.quantize(small_cnn(), calib(n=8), "x86_avx2", rpc={"tracker": f"127.0.0.1:{port}", "key": KEY,
                                                                    "connect_timeout": 2})
    assert time.time() - t0 < 10
