"""The compiled side, per corpus model, in one run: ORT FP32 / ORT hago int8 / TVM FP32 / TVM hago int8.

    python -m benchmarks.tvm_suite [--models resnet20,lite0,minilm] [--target host] [--limit N]
                                   [--trials N] [--build-targets all|none|a,b] [--repeats 200]
                                   [--tensorize avx2|avx_vnni|avx512_vnni|dotprod] [--quant-options JSON]

Per model: hago_py quantizes it for ``--target`` (the spec's plan; latency not measured, so every run is the
same plan); the ORT and TVM models are scored on the full test set (``--limit`` for a subset); TVM compiles the
FP32 model and the integerized hago model for this host (untuned; ``--trials N`` adds a MetaSchedule-tuned
pair with N trials each — same budget for FP32 and int8), the integer-op counts come from the integerizer;
then the four (or six) models are timed at batch 1, 1 thread, interleaved round-robin in this process, so
the ratios are paired. ``--build-targets`` builds the hago model for the built-in targets with
``hago_py.build`` and records seconds, artifact size and the int8 instructions found in the generated code.
Writes ``benchmarks/results/tvm/<model>.json`` and ``RESULTS.md``; skips cleanly without the corpus.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

from .corpus import get_models, locate
from .peers import RESULTS_DIR
from .run import machine_info

OUT = RESULTS_DIR / "tvm"
POPULATION = 128   # MetaSchedule's default 512 makes each search round several times slower on 2 cores


def _round_robin(calls: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 5) -> Dict[str, List[float]]:
    labels = list(calls)
    for _ in range(warmup):
        for k in labels:
            calls[k]()
    t: Dict[str, List[float]] = {k: [] for k in labels}
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[: r % len(labels)]:
            t0 = time.perf_counter()
            calls[k]()
            t[k].append(time.perf_counter() - t0)
    return t


def _ratios(times: Dict[str, List[float]], base: str) -> Dict[str, Dict[str, float]]:
    out = {}
    b = np.asarray(times[base])
    for k, v in times.items():
        r = b / np.asarray(v)
        out[k] = {"median_ms": float(np.median(v) * 1e3), "speedup_vs_" + base: float(np.median(r)),
                  "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90))}
    return out


def _tvm_compile(be, model, integer: bool):
    t0 = time.perf_counter()
    art = be.compile(model, integer=integer)
    return art, time.perf_counter() - t0


def _tuned_vm(model, integer: bool, target_dict, db: str, shapes):
    """A VM of the model compiled with the tuning database (compile_relax on the raw module)."""
    import tvm
    from tvm import relax
    from hago_py.backends.tvm.importer import import_qdq, static_shapes
    from hago_py.backends.tvm.integerize import integerize
    from hago_py.backends.tvm.tune import compile_module

    mod = import_qdq(static_shapes(model, 1, shapes))
    if integer:
        mod, _ = integerize(mod)
    return relax.VirtualMachine(compile_module(mod, tvm.target.Target(target_dict), db), tvm.cpu())


def _tune(model_q, model_fp, target_dict, trials: int, work: Path, shapes) -> Dict[str, Any]:
    """Tune FP32 and int8 with the same trial budget, for the timing feed's static shapes; returns the
    databases or the error."""
    from hago_py.backends.tvm.importer import import_qdq, static_shapes
    from hago_py.backends.tvm.integerize import integerize
    from hago_py.backends.tvm.tune import tune_module
    import tvm

    out: Dict[str, Any] = {}
    for label, m, integer in (("fp32", model_fp, False), ("int8", model_q, True)):
        mod = import_qdq(static_shapes(m, 1, shapes))
        if integer:
            mod, _ = integerize(mod)
        db = work / f"db_{label}"
        t0 = time.perf_counter()
        try:
            from tvm.s_tir import meta_schedule as ms

            strategy = ms.search_strategy.EvolutionarySearch(population_size=POPULATION)
            r = tune_module(mod, tvm.target.Target(target_dict), str(db), trials, progress=False, per_iter=16,
                            strategy=strategy, seed=0)
            out[label] = {"db": str(db), "seconds": time.perf_counter() - t0, "result": r,
                          "strategy": f"evolutionary, population {POPULATION}, 16 per iteration, seed 0"}
        except Exception as e:   # record exactly why (TVM 0.27 MetaSchedule failures are reported, not hidden)
            msg = str(e).strip().splitlines()
            out[label] = {"error": f"{type(e).__name__}: {(msg[-1] if msg else '')[:400]}",
                          "seconds": time.perf_counter() - t0}
    return out


def _builds(model_q, plan_json: str, targets: List[str], work: Path) -> Dict[str, Any]:
    from hago_py.build import build

    qpath = work / "model_qdq.onnx"
    qpath.write_bytes(model_q.SerializeToString())
    ppath = work / "plan.json"
    ppath.write_text(plan_json)
    out: Dict[str, Any] = {}
    for t in targets:
        try:
            m = build(str(qpath), t, plan=str(ppath), out=str(work / "builds"), check=False)
            lib = m["library"]["file"]
            out[t] = {"seconds": m["seconds"], "library": lib,
                      "bytes": m["files"].get(lib, {}).get("bytes"),
                      "files": {k: v["bytes"] for k, v in m["files"].items()},
                      "instructions": {k: v for k, v in m["instructions"].items() if v},
                      "findings": m["findings"], "integer_counts": (m.get("integerize") or {}).get("counts")}
        except Exception as e:
            out[t] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


class _Batch1Session:
    """ORT-session look-alike over a VM compiled for batch 1: runs a batch one sample at a time."""

    def __init__(self, vm, inputs):
        self.vm, self.inputs = vm, list(inputs)

    def get_inputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self.inputs]

    def run(self, output_names, feeds):
        import tvm

        n = len(next(iter(feeds.values())))
        outs: List[List[np.ndarray]] = []
        for i in range(n):
            r = self.vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feeds[k][i:i + 1])) for k in self.inputs])
            r = list(r) if isinstance(r, (list, tuple)) or hasattr(r, "__len__") and not hasattr(r, "numpy") else [r]
            outs.append([t.numpy() for t in r])
        return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def _tensorized_vm(model_q, target_dict, isa_name: str, feed):
    """(VM or None, record, compile s): the integerized hago model for the timing feed's static shapes (batch 1)
    with its int8 conv2d / matmul replaced by the hand-scheduled kernels of ``isa_name`` (tensorize.py)."""
    import tvm
    from tvm import relax
    from hago_py.backends.tvm.importer import import_qdq, static_shapes
    from hago_py.backends.tvm.integerize import integerize
    from hago_py.backends.tvm.tensorize import ISAS, tensorize_module

    t0 = time.perf_counter()
    mod = import_qdq(static_shapes(model_q, 1, {k: list(v.shape) for k, v in feed.items()}))
    mod, _ = integerize(mod)
    new, recs = tensorize_module(mod, ISAS[isa_name])
    n = sum(r["status"] == "tensorized" for r in recs)
    n_dw = sum(r["status"] == "tensorized" and not r.get("dot_product", True) for r in recs)
    why = sorted({r["why"] for r in recs if r["status"] != "tensorized"})
    rec = {"isa": isa_name, "tensorized": n, "depthwise": n_dw, "kernels": len(recs),
           "why": f"{n} of {len(recs)} int8 kernels hand-scheduled: {n - n_dw} tensorized with "
                  f"{ISAS[isa_name].instruction}" + (f", {n_dw} depthwise with a vectorized int32 multiply-add"
                                                     if n_dw else "") + (f"; others: {'; '.join(why)}" if why else "")}
    if not n:
        return None, rec, time.perf_counter() - t0
    with tvm.transform.PassContext(opt_level=3):
        ex = relax.build(new, target=tvm.target.Target(target_dict))
    return relax.VirtualMachine(ex, tvm.cpu()), rec, time.perf_counter() - t0


def _same_outputs(a, b, bm, n: int) -> bool:
    """Whether two sessions give identical outputs on the first ``n`` calibration samples (one at a time)."""
    feeds = bm.calib_feeds(n, batch=1)
    for f in feeds:
        f = {k: v for k, v in f.items() if k in a.artifact.inputs}
        if not all(np.array_equal(x, y) for x, y in zip(a.run(None, f), b.run(None, f))):
            return False
    return True


def bench_model(bm, args) -> Dict[str, Any]:
    import hago_py
    from hago_py.backends.tvm.backend import TvmBackend, TvmSession
    from hago_py.backends.tvm.targets import host_target
    from hago_py.ir import load_model

    from .corpus import make_session

    res: Dict[str, Any] = {"model": bm.name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine_info(1), "target": args.target, "limit": args.limit}
    t0 = time.perf_counter()
    qopts = json.loads(args.quant_options or "{}")
    res["quant_options"] = qopts
    q = hago_py.quantize(str(bm.model_path), bm.calib_feeds(bm.default_calib), args.target, measure_latency=False,
                         **qopts)
    res["quantize_s"] = time.perf_counter() - t0
    res["spec"] = q.report.get("target") if isinstance(q.report, dict) else None
    fp = load_model(str(bm.model_path))
    tdict = host_target()[0]
    res["tvm_target"] = tdict
    be_eval = TvmBackend(target=tdict, threads=args.eval_threads)
    arts: Dict[str, Any] = {}
    for label, m, integer in (("tvm_fp32", fp, False), ("tvm_int8", q.model, True)):
        arts[label], res[f"{label}_compile_s"] = _tvm_compile(be_eval, m, integer)
    res["integerize"] = {k: arts["tvm_int8"].info.get(k) for k in ("counts", "float_ops", "left_float")}
    sessions: Dict[str, Any] = {"ort_fp32": make_session(fp, args.eval_threads),
                                "ort_int8": make_session(q.model, args.eval_threads),
                                "tvm_fp32": TvmSession(be_eval, arts["tvm_fp32"]),
                                "tvm_int8": TvmSession(be_eval, arts["tvm_int8"])}
    if args.tensorize:
        tz_vm, res["tensorize"], res["tvm_int8_tz_compile_s"] = _tensorized_vm(q.model, tdict, args.tensorize,
                                                                            bm.timing_feed())
        if tz_vm is not None:
            sessions["tvm_int8_tz"] = _Batch1Session(tz_vm, arts["tvm_int8"].inputs)
            res["tensorize"]["equal_to_tvm_int8"] = _same_outputs(sessions["tvm_int8"], sessions["tvm_int8_tz"],
                                                                  bm, args.check_samples)
            print(f"  {bm.name} tensorized: {res['tensorize']['why']}; outputs equal to the default int8 build on "
                  f"{args.check_samples} samples: {res['tensorize']['equal_to_tvm_int8']}", flush=True)
    # accuracy on the same data
    metrics: Dict[str, float] = {}
    wanted = [e for e in args.evals.split(",") if e]
    for label, sess in sessions.items():
        if label not in wanted:
            continue
        t1 = time.perf_counter()
        metrics[label] = bm.evaluate(sess, limit=args.limit, threads=args.eval_threads)
        res[f"{label}_eval_s"] = time.perf_counter() - t1
        print(f"  {bm.name} {label}: {bm.format_metric(metrics[label])} ({res[f'{label}_eval_s']:.0f} s)", flush=True)
    res["metrics"] = metrics
    res["tvm_int8_minus_ort_int8"] = (metrics["tvm_int8"] - metrics["ort_int8"]
                                      if "tvm_int8" in metrics and "ort_int8" in metrics else None)
    work = Path(tempfile.mkdtemp(prefix="hago_tvm_suite_"))
    if args.trials:
        shapes = {k: list(v.shape) for k, v in bm.timing_feed().items()}
        res["tuning"] = _tune(q.model, fp, tdict, args.trials, work, shapes)
    # latency: batch 1, 1 thread, interleaved
    if args.repeats:
        import tvm

        feed = bm.timing_feed()
        s_fp, s_q = make_session(fp, 1), make_session(q.model, 1)
        calls: Dict[str, Callable[[], Any]] = {"ort_fp32": lambda: s_fp.run(None, feed),
                                               "ort_int8": lambda: s_q.run(None, feed)}
        for label in ("tvm_fp32", "tvm_int8"):
            a = arts[label]
            args_t = [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in a.inputs]
            fn = a.vm["main"]
            calls[label] = (lambda fn=fn, args_t=args_t: fn(*args_t))
        if "tvm_int8_tz" in sessions:
            tz = sessions["tvm_int8_tz"]
            args_tz = [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in tz.inputs]
            calls["tvm_int8_tz"] = (lambda fn=tz.vm["main"], args_t=args_tz: fn(*args_t))
        for label, info in (res.get("tuning") or {}).items():
            if "db" in info:
                try:
                    vm = _tuned_vm(fp if label == "fp32" else q.model, label == "int8", tdict, info["db"],
                                   {k: list(v.shape) for k, v in feed.items()})
                except Exception as e:
                    info["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    continue
                a = arts["tvm_" + label]
                args_t = [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in a.inputs]
                calls[f"tvm_{label}_tuned"] = (lambda fn=vm["main"], args_t=args_t: fn(*args_t))
        from hago_py.backends.tvm.backend import _set_threads

        _set_threads(1)
        times = _round_robin(calls, args.repeats)
        res["latency"] = _ratios(times, "ort_fp32")
        res["latency_tvm_int8_vs_tvm_fp32"] = float(np.median(np.asarray(times["tvm_fp32"]) /
                                                              np.asarray(times["tvm_int8"])))
    if args.build_targets != "none":
        from hago_py.hw import list_specs

        targets = [s["name"] for s in list_specs()] if args.build_targets == "all" else args.build_targets.split(",")
        res["builds"] = _builds(q.model, q.plan.to_json(), targets, work)
    return res


def format_report(results: List[Dict[str, Any]]) -> str:
    lines = ["# TVM suite: ORT vs TVM, FP32 vs hago int8", ""]
    for r in results:
        m = r["metrics"]
        mach = r["machine"]
        lines += [f"## {r['model']} ({r['date']}; {mach.get('cpu')}, {', '.join(mach.get('int8_isa') or [])}; "
                  f"target {r['target']}; {'first ' + str(r['limit']) if r['limit'] else 'full test set'})", "",
                  "| model | metric | compile s | batch-1 latency ms | speed vs ORT FP32 (p10-p90) |", "|---|---|---|---|---|"]
        lat = r.get("latency", {})
        for k in ("ort_fp32", "ort_int8", "tvm_fp32", "tvm_int8", "tvm_int8_tz", "tvm_fp32_tuned", "tvm_int8_tuned"):
            L = lat.get(k, {})
            if k not in m and not L:
                continue
            sp = (f"{L['speedup_vs_ort_fp32']:.2f}x ({L['p10']:.2f}-{L['p90']:.2f})" if L else "-")
            lines.append(f"| {k} | {m.get(k, float('nan')):.4f} | {r.get(k + '_compile_s', 0) or 0:.1f} | "
                         f"{L.get('median_ms', float('nan')):.3f} | {sp} |")
        c = r["integerize"]["counts"]
        d = r.get("tvm_int8_minus_ort_int8")
        lines += ["", f"TVM int8 - ORT int8 metric: {'-' if d is None else format(d, '+.4f')}; integer ops: {c}; "
                  f"TVM int8 vs TVM FP32 speed: {r.get('latency_tvm_int8_vs_tvm_fp32', float('nan')):.2f}x"]
        if r.get("quant_options"):
            lines.append(f"quantize options: {r['quant_options']}")
        if r.get("tensorize"):
            lines.append(f"tvm_int8_tz: {r['tensorize']['why']}; outputs identical to tvm_int8: "
                         f"{r['tensorize'].get('equal_to_tvm_int8')}")
        if r.get("tuning"):
            lines.append(f"tuning: { {k: v.get('error') or round(v['seconds']) for k, v in r['tuning'].items()} }")
        for t, b in (r.get("builds") or {}).items():
            lines.append(f"- build {t}: " + (b["error"] if "error" in b else
                                             f"{b['seconds']:.0f} s, {b['library']} {b['bytes']} B, "
                                             f"int8 instructions {b['instructions'] or 'none'}"))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tvm_suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,lite0,minilm")
    ap.add_argument("--target", default="host", help="hago spec the plan is made for (default: this host's)")
    ap.add_argument("--limit", type=int, default=None, help="test samples (default: the full test set)")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per model for the tuned pair")
    ap.add_argument("--repeats", type=int, default=200, help="timing rounds (0: no timing)")
    ap.add_argument("--eval-threads", type=int, default=2)
    ap.add_argument("--evals", default="ort_fp32,ort_int8,tvm_fp32,tvm_int8",
                    help="which models are scored on the test set (untuned TVM FP32 of MiniLM takes about an hour "
                         "on 2 cores; the timing and builds run for all four regardless)")
    ap.add_argument("--build-targets", default="all", help="all | none | comma list of spec names")
    ap.add_argument("--tensorize", default=None, choices=("avx2", "avx_vnni", "avx512_vnni", "dotprod"),
                    help="also a batch-1 build with hand-scheduled int8 kernels of this instruction family "
                         "(tvm_int8_tz: scored with --evals, timed, checked identical to tvm_int8); it must run "
                         "on this host (avx2 here needs 7-bit weights: --quant-options "
                         "'{\"saturation_remedy\": \"reduce_range\"}')")
    ap.add_argument("--check-samples", type=int, default=32, help="samples on which tvm_int8_tz must equal tvm_int8")
    ap.add_argument("--quant-options", default=None, help="JSON of extra hago_py.quantize options")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--data", default=None)
    a = ap.parse_args(argv)
    root, why = locate(a.data)
    if root is None:
        print(f"SKIP: {why}")
        return 0
    models, why = get_models([n for n in a.models.split(",") if n], root)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from hago_py.ir.io import atomic_write_text

    for name, bm in models.items():
        r = bench_model(bm, a)
        atomic_write_text(out / f"{name}.json", json.dumps(r, indent=1, default=str))
        done = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        atomic_write_text(out / "RESULTS.md", format_report(done))
        print(f"wrote {out / (name + '.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
