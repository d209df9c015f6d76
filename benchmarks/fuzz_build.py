"""Seeded fuzz run of the compiled side: random graphs and option sets through ``hago_py.build`` (TVM, host).

    python -m benchmarks.fuzz_build --n 120 --seed 0 [--families graphs,options] [--timeout 240]
                                    [--json benchmarks/results/fuzz_build/run.json]

Cases come from benchmarks/fuzzgen.py: ``graphs`` (a generated graph with its calibration arrays, default
options), ``options`` and ``exporters`` (torch exports; the first valid API case with an in-memory model and
calibration arrays among derived seeds). Each case runs in a fresh child
process (a segfault in a compiled library must not end the run):

1. ``hago_py.quantize`` with the case's options (a HagoError here is the ORT-path fuzzer's business:
   ``quantize_rejected``, not counted against the build);
2. ``hago_py.build(model_qdq, "host", plan=...)``, half of the cases for the probe's static shapes with
   ``tensorize="auto"`` (hand-scheduled int8 kernels on this host's dot-product instruction): a HagoError must
   be one non-empty line (``rejected``); any other exception is a ``crash``;
3. on success the library runs on the case's probe feed and is compared with ORT on the same QDQ model, both as
   float ops (ORT_ENABLE_BASIC, the model's defined semantics) and fused (ORT's integer kernels): ``ok`` when
   every output is within ``STEPS`` quantization steps of either (its output DequantizeLinear's step, else
   ``REL`` of the output's range), else ``mismatch``.

``died`` (the child ended without a result: segfault, abort) and ``timeout`` are failures too. Results: a JSON
list of cases and a table by outcome.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

STEPS = 2.0       # tolerated difference, in output quantization steps (rounding ties, requantize arithmetic)
REL = 2e-3        # for float outputs: tolerated difference relative to the output's range
STATIC_SHARE = 0.5  # cases built for static shapes (the probe's), where tensorize="auto" hand-schedules int8 kernels
OPTION_REDRAWS = 16
SKIP_KEYS = ("search", "time_budget", "accuracy_budget", "latency_budget", "search_options", "checkpoint",
             "resume", "rpc", "progress", "measure_latency")


def _case_inputs(family: str, seed: int):
    """(model, calibration, probe, options, note) of a valid API case, or None to skip it."""
    import onnx

    from .fuzzgen import draw_model, knobs_note, make_case

    if family == "graphs":   # the generated graph itself (the family's cases also vary the model's file form)
        model, calib, probe, knobs = draw_model("graphs", seed, plain=False)
        return model, calib, probe, {}, knobs_note(knobs)
    for k in range(OPTION_REDRAWS):   # the first usable case among derived seeds: a valid API case with the model
        case = make_case(family, seed * OPTION_REDRAWS + k)   # in memory and arrays as calibration
        if case.mode != "api" or case.expect == "reject" or case.probe is None:
            continue
        model = onnx.load_from_string(case.model) if isinstance(case.model, bytes) else case.model
        if not isinstance(model, onnx.ModelProto) or not isinstance(case.calibration, dict):
            continue
        if not all(isinstance(v, np.ndarray) for v in case.calibration.values()):
            continue
        opts = {k: v for k, v in case.kwargs.items() if k not in SKIP_KEYS}
        return model, case.calibration, case.probe, opts, case.note
    return None


def _tolerances(qdq, outs_ref: List[np.ndarray]) -> List[float]:
    from hago_py.build import output_steps

    tols = []
    for step, ref in zip(output_steps(qdq), outs_ref):
        rng = float(np.ptp(ref)) if ref.size else 0.0
        tols.append(STEPS * step * 1.0001 if step else max(REL * rng, 1e-5))
    return tols


def run_one(family: str, seed: int, workdir: str) -> Dict[str, Any]:
    """One case, in this process; the outcome as a dict."""
    import hago_py
    from hago_py.backends.ort import OrtBackend
    from hago_py.build import build, run_library
    from hago_py.errors import HagoError

    t0 = time.perf_counter()
    got = _case_inputs(family, seed)
    if got is None:
        return {"status": "skipped"}
    model, calib, probe, opts, note = got
    row: Dict[str, Any] = {"note": note, "options": {k: repr(v) for k, v in opts.items()}}
    try:
        res = hago_py.quantize(model, calib, "host", measure_latency=False, **opts)
    except HagoError as e:
        return dict(row, status="quantize_rejected", message=str(e)[:300])
    except Exception as e:  # noqa: BLE001 - the ORT-path fuzzer's business; recorded, not counted here
        return dict(row, status="quantize_error", message=f"{type(e).__name__}: {str(e)[:300]}")
    rng = np.random.default_rng(seed)
    static = {}
    if rng.random() < STATIC_SHARE:   # static shapes: the hand-scheduled (tensorized) int8 kernels on this host
        names0 = [i.name for i in res.model.graph.input if i.name in probe]
        static = {"batch": int(len(probe[names0[0]])), "shapes": {n: list(probe[n].shape) for n in names0},
                  "tensorize": "auto"}
    row["build"] = dict(static) if static else "dynamic shapes"
    try:
        man = build(res.model, "host", plan=res.plan, out=workdir, check=False, **static)
    except HagoError as e:
        msg = str(e)
        status = "rejected" if msg.strip() and "\n" not in msg.strip() else "bad_message"
        return dict(row, status=status, message=msg[:400], error=type(e).__name__)
    except Exception as e:  # noqa: BLE001
        return dict(row, status="crash", message=f"{type(e).__name__}: {str(e)[:400]}",
                    traceback=traceback.format_exc()[-2000:])
    qdq = res.model
    names = [i.name for i in qdq.graph.input if i.name not in {t.name for t in qdq.graph.initializer}]
    try:
        outs = run_library(Path(workdir) / "host" / man["library"]["file"], [probe[n] for n in names])
    except Exception as e:  # noqa: BLE001
        return dict(row, status="run_error", message=f"{type(e).__name__}: {str(e)[:400]}")
    be = OrtBackend(threads=1)
    diffs = {}
    for level in ("basic", "all"):
        ref = be.run(be.compile(qdq, optimization=level), dict(probe))
        diffs[level] = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                        if np.asarray(a).size else 0.0 for a, b in zip(outs, ref)]
        if level == "basic":
            tols = _tolerances(qdq, [np.asarray(r, np.float64) for r in ref])
    ok = all(min(diffs["basic"][i], diffs["all"][i]) <= tols[i] for i in range(len(tols)))
    integ = man.get("integerize", {}).get("counts", {})
    tz = sum(r.get("status") == "tensorized" for r in (man.get("tensorize") or {}).get("kernels", []))
    return dict(row, status="ok" if ok else "mismatch", diffs=diffs, tolerances=tols, integer=integ, tensorized=tz,
                seconds=round(time.perf_counter() - t0, 1))


def _child(family: str, seed: int, workdir: str, conn) -> None:
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        conn.send(run_one(family, seed, workdir))
    except BaseException as e:  # noqa: BLE001 - a harness error is a crash of the case
        conn.send({"status": "crash", "message": f"{type(e).__name__}: {str(e)[:400]}",
                   "traceback": traceback.format_exc()[-2000:]})


def run_case(family: str, seed: int, timeout: float) -> Dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hago-fuzz-build-") as d:
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(family, seed, d, send), daemon=True)
        t0 = time.perf_counter()
        p.start()
        send.close()
        out: Optional[Dict[str, Any]] = None
        if recv.poll(timeout):
            try:
                out = recv.recv()
            except EOFError:
                out = None
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
            if out is None:
                out = {"status": "timeout"}
        if out is None:
            out = {"status": "died", "message": f"exit code {p.exitcode}"}
    out.update(family=family, seed=seed, wall_s=round(time.perf_counter() - t0, 1))
    return out


FAILURES = ("crash", "died", "timeout", "mismatch", "bad_message", "run_error")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="graphs,options")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--json", default=None, help="write the cases and the table here")
    ap.add_argument("--repro", default=None, help="FAMILY:SEED: run one case in this process and print it")
    a = ap.parse_args(argv)
    if a.repro:
        fam, seed = a.repro.split(":")
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(run_one(fam, int(seed), d), indent=1, default=str))
        return 0
    fams = [f.strip() for f in a.families.split(",") if f.strip()]
    rows = []
    t0 = time.perf_counter()
    for i in range(a.n):
        fam, seed = fams[i % len(fams)], a.seed * 1_000_000 + i
        r = run_case(fam, seed, a.timeout)
        rows.append(r)
        if r["status"] != "skipped":
            extra = f"static, {r.get('tensorized', 0)} tensorized" if isinstance(r.get("build"), dict) else ""
            print(f"[{i + 1}/{a.n}] {fam}:{seed} {r['status']} {extra} {r.get('message', '')[:160]}", flush=True)
    table = Counter(r["status"] for r in rows)
    static = [r for r in rows if isinstance(r.get("build"), dict)]
    table_static = Counter(r["status"] for r in static)
    n_tz = sum(1 for r in static if r.get("tensorized"))
    print(json.dumps(dict(table)), f"static-shape builds: {dict(table_static)}, {n_tz} with tensorized kernels")
    if a.json:
        from hago_py.ir.io import atomic_write_bytes

        from .run import machine_info

        host = machine_info(1)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(a.json), json.dumps({
            "config": vars(a), "host": host, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": round(time.perf_counter() - t0), "table": dict(table), "static_builds": dict(table_static),
            "static_with_tensorized_kernels": n_tz, "cases": rows}, indent=1,
            default=str).encode())
    return 1 if any(table.get(k) for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
