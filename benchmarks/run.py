"""Run the PTQ benchmark: FP32 vs peer recipes vs hago_py on the real-model corpus.

    python -m benchmarks.run [--models resnet20,lite0,minilm] [--recipes a,b,...] [--repeats N]
                             [--threads 1] [--quick]

Per model: the FP32 metric; for every recipe (each quantized in its own child process) the metric and
its difference from FP32 on the same data in the same run, quantize time and peak memory; then the
batch-1 latency of FP32 and all quantized models, interleaved round-robin in this one process.
Writes ``benchmarks/results/<model>.json`` and ``benchmarks/results/RESULTS.md`` (``--quick`` writes to
``benchmarks/results/quick/``). Skips with a message and exit code 0 when the corpus is absent.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .corpus import MODEL_CLASSES, BenchModel, get_models, locate
from .peers import RECIPES, RESULTS_DIR, recipe_names, run_recipe


# ------------------------------------------------------------------------------------ environment
def machine_info(threads: int) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem_gb": mem_gb, "platform": platform.platform(),
            "timing_threads": threads, "int8_isa": int8_isa()}


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_isa() -> list:
    """The CPU flags that decide which int8 kernels ORT's MLAS runs (AVX2 vpmaddubsw, AVX-512 / AVX VNNI
    vpdpbusd, AMX): hosts that share a model name ("AMD EPYC") differ here, and ratios differ with them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in INT8_FLAGS if f in have]
    except OSError:
        pass
    return []


def versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "onnx", "onnxruntime", "scipy", "pillow", "nncf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["hago_py"] = metadata.version("hago_py")
    except metadata.PackageNotFoundError:
        out["hago_py"] = "source tree"
    return out


def atomic_write(path: Path, text: str) -> None:
    from hago_py.ir.io import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# ------------------------------------------------------------------------------------ timing
def _time_models(artifacts: Dict[str, Any], feed, threads: int, repeats: int, warmup: int,
                 min_time_s: float):
    """hago_py's OrtBackend round-robin timer (falls back to an identical local loop if the package
    cannot be imported while it is being edited)."""
    try:
        from hago_py.backends.ort import OrtBackend
    except Exception as e:  # noqa: BLE001
        print(f"  (hago_py.backends.ort unavailable: {e}; using the local round-robin timer)")
        return _local_time(artifacts, feed, threads, repeats, warmup, min_time_s), "benchmarks local"
    return OrtBackend(threads=threads).time(artifacts, feed, repeats=repeats, warmup=warmup,
                                            min_time_s=min_time_s), "hago_py.backends.ort.OrtBackend"


def _local_time(artifacts, feed, threads, repeats, warmup, min_time_s):
    import numpy as np

    from .corpus import make_session

    class _R:  # minimal TimingResult stand-in
        def __init__(self, samples):
            self.samples = samples

        def speedup(self, k):
            return self.speedup_spread(k)["median"]

        def ratio_of_medians(self, k):
            return float(np.median(self.samples["fp32"]) / np.median(self.samples[k]))

        def speedup_spread(self, k):
            r = np.asarray(self.samples["fp32"]) / np.asarray(self.samples[k])
            return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
                    "p90": float(np.percentile(r, 90))}

        def to_dict(self):
            return {"threads": threads, "models": {k: {"median_ms": float(np.median(v)) * 1e3,
                                                      "p10_ms": float(np.percentile(v, 10)) * 1e3,
                                                      "p90_ms": float(np.percentile(v, 90)) * 1e3,
                                                      "repeats": len(v)} for k, v in self.samples.items()}}

    labels = list(artifacts)
    sess = {k: make_session(v, threads) for k, v in artifacts.items()}
    for _ in range(warmup):
        for k in labels:
            sess[k].run(None, feed)
    samples = {k: [] for k in labels}
    t_start, r = time.perf_counter(), 0
    while r < repeats or time.perf_counter() - t_start < min_time_s:
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            t0 = time.perf_counter()
            sess[k].run(None, feed)
            samples[k].append(time.perf_counter() - t0)
        r += 1
    return _R(samples)


# ------------------------------------------------------------------------------------ one model
def bench_model(model: BenchModel, recipes: List[str], args) -> Dict[str, Any]:
    t_model = time.perf_counter()
    limit = model.quick_limit if args.quick else None
    calib_n = args.calib or (min(64, model.default_calib) if args.quick else model.default_calib)
    out_dir = Path(args.out) / "models" / model.name
    result: Dict[str, Any] = {
        "model": model.name, "title": model.title, "model_path": str(model.model_path),
        "metric_name": model.metric_name, "fp32_reference": model.fp32_reference,
        "quick": bool(args.quick), "eval_samples": limit or model.eval_size(), "calib_samples": calib_n,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(args.threads), "versions": versions(), "eval_threads": args.eval_threads,
    }
    print(f"== {model.title}: {result['eval_samples']} eval samples, {calib_n} calibration samples")

    t0 = time.perf_counter()
    fp32 = model.evaluate(model.model_path, limit=limit, threads=args.eval_threads)
    result["fp32"] = {"metric": fp32, "eval_s": time.perf_counter() - t0,
                      "model_bytes": Path(model.model_path).stat().st_size}
    print(f"  fp32            {model.format_metric(fp32)}  (eval {result['fp32']['eval_s']:.1f} s)")

    rows: List[Dict[str, Any]] = []
    for name in recipes:
        row = run_recipe(name, model, out_dir, calib_n=calib_n, timeout_s=args.timeout,
                         mem_reserve_mb=args.mem_reserve)
        if not row.get("error"):
            row["model_bytes"] = Path(row["model_path"]).stat().st_size  # the artifact's file size
            t0 = time.perf_counter()
            try:
                row["metric"] = model.evaluate(row["model_path"], limit=limit, threads=args.eval_threads)
                row["drop"] = row["metric"] - fp32
            except Exception as e:  # noqa: BLE001
                row["error"] = f"evaluation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            row["eval_s"] = time.perf_counter() - t0
        rows.append(row)
        if row.get("error"):
            print(f"  {name:<15} ERROR {row['error'][:200]}")
        else:
            print(f"  {name:<15} {model.format_metric(row['metric'])}  drop {model.format_delta(row['drop'])}"
                  f"  quantize {row['quantize_s']:.1f} s  peak {row['peak_rss_mb']:.0f} MB")
    result["rows"] = rows

    # latency: FP32 first (the baseline), then every quantized model that evaluated
    artifacts = {"fp32": str(model.model_path)}
    artifacts.update({r["recipe"]: r["model_path"] for r in rows if not r.get("error")})
    if args.no_timing:
        result["timing"] = None
    else:
        try:
            feed = model.timing_feed()
            tr, timer = _time_models(artifacts, feed, args.threads, args.repeats, args.warmup, args.min_time)
            td = tr.to_dict()
            result["timing"] = {"timer": timer, "batch": 1, "threads": args.threads, "repeats": args.repeats,
                                "warmup": args.warmup, "min_time_s": args.min_time, **td}
            result["fp32"]["ms"] = _ms(td["models"]["fp32"])
            for r in rows:
                if r["recipe"] in artifacts:
                    r["ms"] = _ms(td["models"][r["recipe"]])
                    sp = tr.speedup_spread(r["recipe"])
                    m_fp, m_r = td["models"]["fp32"], td["models"][r["recipe"]]
                    r["speedup"] = {"median": sp["median"], "p10": sp["p10"], "p90": sp["p90"],
                                    "ratio_of_medians": tr.ratio_of_medians(r["recipe"]),
                                    "clean": (m_fp["p10_ms"] / m_r["p10_ms"]
                                              if m_fp.get("p10_ms") and m_r.get("p10_ms") else None)}
            print(f"  timing ({timer}, {args.threads} thread(s), batch 1): fp32 "
                  f"{result['fp32']['ms']['median']:.3f} ms; "
                  + ", ".join(f"{r['recipe']} {r['speedup']['median']:.2f}x" for r in rows if "speedup" in r))
        except Exception as e:  # noqa: BLE001
            result["timing"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  timing failed: {result['timing']['error']}")
    for r in rows:
        if r.get("search") and "speedup" in r:
            try:
                result.setdefault("plots", {})[r["recipe"]] = _search_plot(model, result, r, Path(args.out))
            except Exception as e:  # noqa: BLE001 - a plot never fails the benchmark
                print(f"  pareto plot failed: {type(e).__name__}: {e}")
    if not args.keep_tracebacks:
        for r in rows:
            r.pop("traceback", None)
    result["run_s"] = time.perf_counter() - t_model
    print(f"  {model.name} done in {result['run_s']:.0f} s")
    return result


def _search_plot(model: BenchModel, result: Dict[str, Any], row: Dict[str, Any], out: Path) -> str:
    """Pareto plot of a search row: its measured plans and front (search-time latency), the chosen model
    as re-timed here, FP32 and every other row of this run (same eval set, same timing run)."""
    from hago_py.ir.io import atomic_write_bytes
    from hago_py.report.plot import pareto_png

    fp = result["fp32"]["metric"]
    s = dict(row["search"])
    s["chosen"] = {"speedup": row["speedup"]["median"], "metric": row["metric"]}
    s["target"] = "x86_avx2"
    peers = [{"name": r["recipe"], "family": r.get("family"), "speedup": r["speedup"]["median"],
              "delta": r["metric"] - fp} for r in result["rows"]
             if r is not row and "speedup" in r and r.get("metric") is not None]
    path = out / f"{model.name}_{row['recipe']}_pareto.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = pareto_png(s, peers)
    atomic_write_bytes(path, data)
    return str(path.relative_to(out))


def _ms(d: Dict[str, float]) -> Dict[str, float]:
    return {"median": d["median_ms"], "p10": d["p10_ms"], "p90": d["p90_ms"], "repeats": d.get("repeats")}


# ------------------------------------------------------------------------------------ table
def _fmt_metric(metric_name: str, v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} %" if "%" in metric_name else f"{v:.4f}"


def _fmt_drop(metric_name: str, d) -> str:
    if d is None:
        return "-"
    return f"{d:+.2f} pp" if "%" in metric_name else f"{d:+.4f}"


def _fmt_speedup(sp) -> str:
    if not sp:
        return "-"
    clean = f"; clean {sp['clean']:.2f}x" if sp.get("clean") else ""
    return f"{sp['median']:.2f}x ({sp['p10']:.2f}-{sp['p90']:.2f}{clean})"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def format_table(results: List[Dict[str, Any]]) -> str:
    """Markdown table: model | recipe | metric | drop | speedup (p10-p90) | quantize s | peak MB | notes."""
    lines = ["| model | recipe | metric | drop | speedup (p10-p90) | quantize s | peak MB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        mn = res.get("metric_name", "")
        fp = res.get("fp32", {})
        fp_ms = fp.get("ms", {}).get("median")
        notes = f"{fp_ms:.3f} ms" if fp_ms is not None else ""
        lines.append(f"| {_cell(res['model'])} | fp32 | {_fmt_metric(mn, fp.get('metric'))} | - | 1.00x | - | - | "
                     f"{_cell(notes)} |")
        for r in res.get("rows", []):
            if r.get("error"):
                note = "ERROR: " + r["error"]
                note = note if len(note) <= 160 else note[:157] + "..."
            else:
                bits = list(r.get("notes", []))
                if r.get("ms"):
                    bits.insert(0, f"{r['ms']['median']:.3f} ms")
                note = "; ".join(bits)
            qs = f"{r['quantize_s']:.1f}" if r.get("quantize_s") is not None else "-"
            pk = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
            lines.append(f"| {_cell(res['model'])} | {_cell(r['recipe'])} | {_fmt_metric(mn, r.get('metric'))} | "
                         f"{_fmt_drop(mn, r.get('drop'))} | {_fmt_speedup(r.get('speedup'))} | {qs} | {pk} | "
                         f"{_cell(note)} |")
    return "\n".join(lines) + "\n"


_ROUNDING_ROW = re.compile(r"^hago_w(\d+)a(\d+)(e8)?_(.+)$")


def format_rounding_pivot(results: List[Dict[str, Any]]) -> str:
    """Method x (model, bits) table of the rounding rows (hago_w<W>a<A>[e8]_<method>): drop and quantize s.
    Empty when the results hold no such rows."""
    cols: Dict[tuple, Dict[str, str]] = {}
    methods: List[str] = []
    for res in results:
        mn = res.get("metric_name", "")
        for r in res.get("rows", []):
            m = _ROUNDING_ROW.match(r.get("recipe", ""))
            if not m:
                continue
            w, a, e8, method = m.groups()
            key = (res["model"], f"W{w}A{a}" + (" (first/last W8)" if e8 else ""))
            if method not in methods:
                methods.append(method)
            cols.setdefault(key, {})[method] = ("error" if r.get("error") or r.get("drop") is None else
                                                f"{_fmt_drop(mn, r['drop'])}, {r.get('quantize_s', 0):.0f} s")
    if not cols:
        return ""
    keys = list(cols)
    lines = ["| method | " + " | ".join(f"{m} {b}" for m, b in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cols[k].get(method, "") for k in keys) + " |")
    return "\n".join(lines)


def format_report(results: List[Dict[str, Any]]) -> str:
    out = ["# hago_py PTQ benchmark results", ""]
    if results:
        r0 = results[0]
        m = r0.get("machine", {})
        v = r0.get("versions", {})
        out += [f"Machine: {m.get('cpu')} ({', '.join(m.get('int8_isa') or ['int8 ISA not recorded'])}), "
                f"{m.get('logical_cpus')} logical CPUs; latency at batch 1 with "
                f"{m.get('timing_threads')} intra-op thread(s), all models of one network interleaved "
                f"round-robin in one process; speedup = median over rounds of FP32 time / model time (rounds "
                f"are paired, so drift cancels), spread = p10-p90 of the same per-round ratios; clean = FP32's "
                f"p10 time / the model's p10 time (the rounds no other tenant slowed down: on a loaded host the "
                f"paired median drops while this stays; the search ranks plans by it).",
                "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    pivot = format_rounding_pivot(results)
    if pivot:
        out += ["Rounding methods (drop vs FP32 in the same run, time to quantize):", "", pivot, ""]
    out.append(format_table(results))
    out.append("")
    out.append("drop = quantized metric - FP32 metric on the same data in the same run (negative = worse). "
               "peak MB = peak RSS of the child process that quantized (interpreter + framework + "
               "calibration data included).")
    out.append("")
    for res in results:
        t = res.get("timing") or {}
        reps = t.get("models", {}).get("fp32", {}).get("repeats")
        out.append(f"- {res.get('title', res['model'])}: {res.get('eval_samples')} eval samples, "
                   f"{res.get('calib_samples')} calibration samples, FP32 reference {res.get('fp32_reference')}, "
                   f"{reps} timing rounds, run {res.get('run_s', 0):.0f} s, {res.get('date')}"
                   + (" (quick)" if res.get("quick") else ""))
    for res in results:
        for recipe, png in sorted((res.get("plots") or {}).items()):
            out += ["", f"![{res['model']} {recipe}: Pareto front, chosen point and the peers of this run]({png})"]
    return "\n".join(out) + "\n"


def write_report(out_dir: Path) -> Path:
    results = []
    order = list(MODEL_CLASSES)
    for p in sorted(Path(out_dir).glob("*.json"), key=lambda p: (order.index(p.stem) if p.stem in order else 99,
                                                                 p.stem)):
        try:
            results.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    path = Path(out_dir) / "RESULTS.md"
    atomic_write(path, format_report(results))
    return path


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODEL_CLASSES), help="comma list of " + ",".join(MODEL_CLASSES))
    ap.add_argument("--recipes", default=None, help="comma list; default all: " + ",".join(RECIPES))
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (default 100, quick 20)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=None, help="minimum timing seconds (default 30, quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    ap.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads for accuracy evaluation (default: all CPUs)")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default per model)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per recipe before it is killed")
    ap.add_argument("--mem-reserve", type=float, default=1500,
                    help="kill a recipe when the machine's MemAvailable falls below this many MB")
    ap.add_argument("--suite", default="default", choices=("default", "rounding", "search", "datafree", "hybrid", "nonuniform", "multipoint", "sparq",
                                                          "embeddings", "tvm"),
                    help="which registered rows run when --recipes is not given (default: the foundation table); "
                         "tvm: ORT vs TVM, FP32 vs int8 per model (benchmarks/tvm_suite.py and its options)")
    ap.add_argument("--quick", action="store_true", help="subset of eval data, fewer timing rounds (smoke run)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--keep-tracebacks", action="store_true", help="keep child tracebacks in the JSON")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results[/quick])")
    ap.add_argument("--data", default=None, help="corpus folder (default $HAGO_BENCH_DATA or ../shared/bench)")
    a = ap.parse_args(argv)
    if a.repeats is None:
        a.repeats = 20 if a.quick else 100
    if a.min_time is None:
        a.min_time = 3.0 if a.quick else 30.0
    if a.out is None:
        base = RESULTS_DIR if a.suite == "default" else RESULTS_DIR / a.suite
        a.out = str(base / "quick") if a.quick else str(base)
    return a


def _tvm_suite_args(argv):
    """The arguments after ``--suite tvm`` / ``--suite=tvm`` for benchmarks.tvm_suite (``--no-timing``: no
    timing rounds), or None when another suite is asked for."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--suite=tvm" or (a == "--suite" and i + 1 < len(argv) and argv[i + 1] == "tvm"):
            rest = argv[:i] + argv[i + (1 if "=" in a else 2):]
            return [x for x in rest if x != "--no-timing"] + (["--repeats", "0"] if "--no-timing" in rest else [])
    return None


def main(argv=None) -> int:
    tvm_args = _tvm_suite_args(sys.argv[1:] if argv is None else argv)
    if tvm_args is not None:   # the compiled side (ORT vs TVM, FP32 vs int8): its own options, see tvm_suite.py
        from .tvm_suite import main as tvm_main

        return tvm_main(tvm_args)
    args = parse_args(argv)
    root, why = locate(args.data)
    if root is None:
        print(f"SKIP: {why}. Set {'$HAGO_BENCH_DATA'} to the corpus folder to run the benchmarks.")
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    models, why = get_models(names, root)
    if why:
        print(f"note: {why}")
    if not models:
        print("SKIP: no benchmark model available.")
        return 0
    selected = [n.strip() for n in args.recipes.split(",")] if args.recipes else None
    out_dir = Path(args.out)
    for name, model in models.items():
        try:
            recipes = recipe_names(name, selected, args.suite)
        except KeyError as e:
            print(f"error: {e}")
            return 2
        res = bench_model(model, recipes, args)
        atomic_write(out_dir / f"{name}.json", json.dumps(res, indent=1, default=str))
        report = write_report(out_dir)
        print(f"  wrote {out_dir / (name + '.json')} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
