"""`hago bench`: latency benchmarks for CI, with a regression gate against a stored baseline JSON.

    hago bench fp32=model.onnx int8=model_int8.onnx build/ --target host --json bench.json \\
        [--baseline bench_main.json --max-regression 5%]

Every model (an ONNX file, run by ONNX Runtime; or a TVM build folder written by `hago build`, loaded with
``relax.VirtualMachine(tvm.runtime.load_module(model.so), tvm.cpu())``) is loaded in ``--sessions`` sessions,
and all sessions of all models are timed in the same round-robin rounds (:meth:`OrtBackend.time`), so drift and
other tenants hit every model alike. A model's speedup is the first model's (normally FP32) p10 time over its own
p10 time, all its sessions pooled (>1 = faster than the first model), with bootstrap p10 / p90 bounds; the
per-round paired speedups (median, p10, p90 over rounds: TimingResult.speedup_spread) are recorded beside it. The
JSON also records latencies, per-session medians, the host (CPU model, int8 flags) and the settings.

Regression gate: the speedup is a ratio against the first model measured in the same rounds, so the host's speed
cancels. A model regresses when even the favourable side of its speedup (the bootstrap p90) is below the baseline
JSON's speedup by more than the tolerance: ``speedup_p90 * (1 + tol) < baseline speedup``. The first model's own
absolute latency is not gated (it differs between hosts).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import BackendError, ModelError, OptionError

FORMAT = 1
DEFAULT_TOLERANCE = 0.05


# ---------------------------------------------------------------- models
@dataclass
class BenchModel:
    """One model on the command line: a label, what it is, and how to feed it."""

    label: str
    path: Path
    kind: str                                     # "onnx" (ONNX Runtime) or "tvm" (a `hago build` folder)
    inputs: List[Tuple[str, List[Any], Any]]      # (name, dims (int / str / None), numpy dtype)
    library: Optional[Path] = None                # tvm: model.so
    manifest: Dict[str, Any] = field(default_factory=dict)


def _split_label(arg: str) -> Tuple[Optional[str], str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path -> (None, path)."""
    name, sep, rest = arg.partition("=")
    if sep and name and rest and "/" not in name and os.sep not in name and not Path(arg).exists():
        return name, rest
    return None, arg


def _onnx_inputs(path: Path) -> List[Tuple[str, List[Any], Any]]:
    import onnx
    from onnx import helper

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"'{path}' is not a readable ONNX model ({type(e).__name__}); pass an .onnx file or a "
                         "`hago build` folder", details=str(e)) from e
    inits = {i.name for i in m.graph.initializer}
    out = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception as e:
            raise ModelError(f"input '{vi.name}' of '{path}' has no tensor type bench can feed (elem_type "
                             f"{tt.elem_type})") from e
        out.append((vi.name, dims, dtype))
    return out


def _find_manifest(path: Path, target: str) -> Optional[Path]:
    """manifest.json of a build folder: ``path`` itself, ``path/<target>/`` or the folder of a ``model.so``."""
    if path.is_file():
        cand = path.parent / "manifest.json"
        return cand if path.suffix in (".so", ".tar", ".o") and cand.is_file() else None
    for cand in (path / "manifest.json", path / target / "manifest.json"):
        if cand.is_file():
            return cand
    return None


def resolve_model(arg: str, target: str) -> BenchModel:
    """A command-line MODEL (``[NAME=]PATH``) as a BenchModel; ModelError / OptionError naming the fix."""
    label, raw = _split_label(arg)
    path = Path(raw)
    if not path.exists():
        raise ModelError(f"model file '{raw}' does not exist; check the path (models are .onnx files or `hago build` "
                         "folders)")
    manifest_path = _find_manifest(path, target)
    if manifest_path is not None:
        return _tvm_model(label or raw, manifest_path, target)
    if path.is_dir():
        raise ModelError(f"'{raw}' is a folder without manifest.json (nor {target}/manifest.json); pass an .onnx file "
                         f"or the folder `hago build --target {target}` wrote")
    return BenchModel(label or raw, path, "onnx", _onnx_inputs(path))


def _tvm_model(label: str, manifest_path: Path, target: str) -> BenchModel:
    folder = manifest_path.parent
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"'{manifest_path}' is not a readable build manifest ({type(e).__name__}); rebuild with "
                         "`hago build`") from e
    built_for = manifest.get("target")
    if built_for != target:
        raise OptionError(f"'{folder}' was built for target '{built_for}' (manifest.json field 'target'), this "
                          f"benchmark is for --target {target}; pass --target {built_for} or the build for {target}")
    lib = manifest.get("library") or {}
    if not lib.get("file") or not (folder / lib["file"]).is_file():
        raise ModelError(f"'{folder}' has no library file (manifest.json field 'library.file': "
                         f"{lib.get('file')!r}); rebuild with `hago build`")
    if lib.get("loadable_here") is False:
        raise OptionError(f"the library of '{folder}' ({lib['file']}) cannot be loaded on this host "
                          f"(manifest.json 'library.loadable_here' is false); benchmark it on its board")
    qdq = folder / "model_qdq.onnx"
    if not qdq.is_file():
        raise ModelError(f"'{folder}' lacks model_qdq.onnx (needed for the input shapes); rebuild with `hago build`")
    inputs = _onnx_inputs(qdq)
    order = manifest.get("inputs")
    if order:
        by = {i[0]: i for i in inputs}
        inputs = [by[n] for n in order if n in by]
    return BenchModel(label, folder, "tvm", inputs, library=folder / lib["file"], manifest=manifest)


def unique_labels(models: Sequence[BenchModel]) -> None:
    """Same label twice (the same file given twice): the later ones get '#2', '#3'."""
    seen: Dict[str, int] = {}
    for m in models:
        n = seen.get(m.label, 0) + 1
        seen[m.label] = n
        if n > 1:
            m.label = f"{m.label}#{n}"


# ---------------------------------------------------------------- feeds
def parse_shapes(items: Sequence[str]) -> Dict[str, List[int]]:
    """``--shape name=1x3x32x32`` (repeatable) -> {name: [1, 3, 32, 32]}."""
    out = {}
    for it in items or ():
        name, sep, dims = it.partition("=")
        try:
            shape = [int(d) for d in dims.lower().split("x")] if sep and name and dims else None
        except ValueError:
            shape = None
        if not shape or any(d < 0 for d in shape):
            raise OptionError(f"--shape {it!r}: write NAME=DIMS with DIMS like 1x3x32x32 (the input's name and its "
                              "dimensions joined by 'x')")
        out[name] = shape
    return out


def _resolve_shape(m: BenchModel, name: str, dims: List[Any], shapes: Mapping[str, List[int]]) -> List[int]:
    if name in shapes:
        given = shapes[name]
        if len(given) != len(dims) or any(isinstance(d, int) and d > 0 and d != g for d, g in zip(dims, given)):
            raise OptionError(f"--shape {name}={'x'.join(map(str, given))} does not fit input '{name}' of "
                              f"'{m.path}' (shape {[d if isinstance(d, int) and d > 0 else '?' for d in dims]})")
        return list(given)
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]   # dynamic dims -> 1


def make_feeds(models: Sequence[BenchModel], shapes: Mapping[str, List[int]], seed: int = 0
               ) -> Dict[str, np.ndarray]:
    """One seeded random array per input name, shared by every model that has the input: floats N(0, 1),
    integers in {0, 1} (valid indices for any embedding table), bools random."""
    specs: Dict[str, Tuple[List[int], Any, str]] = {}
    for m in models:
        for name, dims, dtype in m.inputs:
            spec = (_resolve_shape(m, name, dims, shapes), dtype)
            if name in specs and specs[name][:2] != spec:
                prev = specs[name]
                raise OptionError(f"input '{name}' is {prev[1]} {prev[0]} in '{prev[2]}' but {dtype} {spec[0]} in "
                                  f"'{m.path}'; give models with the same inputs, or fix the size with --shape")
            specs.setdefault(name, (*spec, str(m.path)))
    known = {n for m in models for n, _, _ in m.inputs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise OptionError(f"--shape names {', '.join(unknown)}, not an input of the models (inputs: "
                          f"{', '.join(sorted(known)) or 'none'})")
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in sorted(specs):
        shape, dtype, _ = specs[name]
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            feeds[name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            raise OptionError(f"input '{name}' has dtype {dtype}, which bench cannot generate; benchmark a model "
                              "with numeric inputs")
    return feeds


# ---------------------------------------------------------------- sessions
class _OrtRunner:
    """An ORT session that takes the shared feed and passes on only its own inputs."""

    def __init__(self, sess, names: Sequence[str], label: str):
        self.sess, self.names, self._hago_label = sess, list(names), label

    def run(self, output_names, feed):
        return self.sess.run(output_names, {n: feed[n] for n in self.names})


class _TvmRunner:
    """A Relax VM over a `hago build` library, with the ``run(output_names, feed)`` of an ORT session; the inputs are
    converted to TVM tensors once per feed (not timed)."""

    def __init__(self, library: Path, names: Sequence[str], label: str):
        import tvm
        from tvm import relax

        self._tvm = tvm
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
            self.main = self.vm["main"]
        except Exception as e:
            raise BackendError(f"TVM could not load '{library}' ({type(e).__name__}); rebuild it with `hago build` "
                               "on this TVM version", details=str(e)) from e
        self.names, self._hago_label = list(names), label
        self._feed, self._args = None, None

    def run(self, output_names, feed):
        if self._feed is not feed:
            self._args = [self._tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in self.names]
            self._feed = feed
        return self.main(*self._args)


def open_sessions(models: Sequence[BenchModel], sessions: int, threads: int,
                  feeds: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """{"<label>#s<i>": runner} for every model and session (ORT models through OrtBackend.compile); each model
    runs once on ``feeds`` here, so a model that cannot run is named before the timing starts."""
    from .backends.ort import OrtBackend

    backend = OrtBackend(threads=threads)
    out = {}
    for m in models:
        names = [n for n, _, _ in m.inputs]
        for s in range(sessions):
            key = f"{m.label}#s{s}"
            if m.kind == "tvm":
                os.environ.setdefault("TVM_NUM_THREADS", str(threads))   # read when TVM's thread pool starts
                out[key] = _TvmRunner(m.library, names, f"build '{m.path}'")
            else:
                out[key] = _OrtRunner(backend.compile(str(m.path)), names, f"model file {m.path}")
        try:
            out[f"{m.label}#s0"].run(None, dict(feeds))
        except Exception as e:
            if isinstance(e, BackendError):
                raise
            if m.kind == "onnx":
                from .backends.ort import backend_error

                raise backend_error("run", f"model file {m.path}", e) from e
            raise BackendError(f"TVM could not run build '{m.path}' on inputs "
                               f"{', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())} ({type(e).__name__}); "
                               "check --shape against the shapes the model was built for", details=str(e)) from e
    return out


# ---------------------------------------------------------------- measurement
def measure(models: Sequence[BenchModel], feeds: Mapping[str, np.ndarray], *, sessions: int = 3, threads: int = 1,
            repeats: int = 60, warmup: int = 5, min_time_s: float = 2.0):
    """Time all sessions round-robin; returns (TimingResult of per-round model times, {label: per-session
    samples})."""
    from .backends.base import Timing, TimingResult
    from .backends.ort import OrtBackend

    runners = open_sessions(models, sessions, threads, feeds)
    raw = OrtBackend(threads=threads).time(runners, feeds, repeats=repeats, warmup=warmup, min_time_s=min_time_s)
    per = {t.label: t.samples for t in raw.timings}
    by_model = {m.label: [per[f"{m.label}#s{s}"] for s in range(sessions)] for m in models}
    rounds = [Timing(m.label, list(np.mean(np.asarray(by_model[m.label]), axis=0))) for m in models]
    return TimingResult(rounds, threads=threads, meta=raw.meta), by_model


LOW_QUANTILE = 10    # percentile of each model's times that the speedup compares (set by the clean rounds)
BOOT = 400           # bootstrap resamples of the rounds for the speedup's p10 / p90 bounds


def low_quantile_speedup(base: Sequence[Sequence[float]], other: Sequence[Sequence[float]], *, seed: int = 0,
                         q: float = LOW_QUANTILE, boot: int = BOOT) -> Dict[str, float]:
    """Speedup base / other from the ``q``-th percentile of each model's times, all sessions pooled (arrays
    sessions x rounds), and its bootstrap p10 / p90 (rounds resampled, the same rounds for both models).

    On a shared host a round is either clean or hit by another tenant, and under load int8 and FP32 kernels slow
    down by different factors (memory-bound vs compute-bound), so per-round ratios move with the load (a 15 % drop
    of the median per-round ratio was seen under load on 2 shared cores); each model's low percentile is set by its
    clean rounds and stays within ~2 % run to run."""
    b, o = np.asarray(base, np.float64), np.asarray(other, np.float64)
    ratio = float(np.percentile(b, q) / np.percentile(o, q))
    idx = np.random.default_rng(seed).integers(0, b.shape[1], (boot, b.shape[1]))
    rs = np.array([np.percentile(b[:, i], q) / np.percentile(o[:, i], q) for i in idx])
    return {"speedup": ratio, "speedup_p10": float(np.percentile(rs, 10)), "speedup_p90": float(np.percentile(rs, 90))}


def summarize(models: Sequence[BenchModel], tr, by_model: Mapping[str, List[List[float]]]) -> Dict[str, Any]:
    """Per model: latency over all sessions' samples (median / p10 / p90, ms), per-session medians, the speedup vs
    the first model (low-quantile ratio with bootstrap p10 / p90) and the per-round paired speedups (median / p10 /
    p90 over rounds of first-model time / model time, each a mean over sessions: TimingResult.speedup_spread)."""
    out = {}
    first = models[0].label
    for i, (m, t) in enumerate(zip(models, tr.timings)):
        pooled = np.concatenate([np.asarray(s) for s in by_model[m.label]]) * 1e3
        paired = tr.speedup_spread(t.label)
        out[m.label] = {
            "path": str(m.path), "kind": m.kind,
            "median_ms": float(np.median(pooled)), "p10_ms": float(np.percentile(pooled, 10)),
            "p90_ms": float(np.percentile(pooled, 90)), "rounds": len(t.samples),
            "session_median_ms": [float(np.median(s)) * 1e3 for s in by_model[m.label]],
            **low_quantile_speedup(by_model[first], by_model[m.label], seed=i),
            "paired_speedup": paired,
        }
    return out


def host_info(threads: int) -> Dict[str, Any]:
    """The CPU (model name and the int8 flags that decide the kernels, via hago_py.hw.host) and this platform."""
    from .hw.host import read_host

    cpu = read_host()
    return {"cpu": cpu.model, "arch": cpu.arch, "int8_flags": cpu.deciding(), "logical_cpus": os.cpu_count(),
            "platform": platform.platform(), "threads": threads}


def versions(models: Sequence[BenchModel]) -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "hago_py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed" if pkg != "hago_py" else "source tree"
    if any(m.kind == "tvm" for m in models):
        import tvm

        out["tvm"] = tvm.__version__
    return out


# ---------------------------------------------------------------- baseline / gate
def parse_tolerance(text: str) -> float:
    """``5%`` or ``0.05`` -> 0.05; OptionError for anything else."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        v = None
    if v is None or not (0 <= v < 1) or (not s.endswith("%") and v >= 1):
        raise OptionError(f"--max-regression {text!r}: give a percentage below 100 like 5% (or a fraction like 0.05)")
    return v


def load_baseline(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"baseline file '{path}' does not exist; create it with `hago bench ... --json {path}` on "
                          "the reference build (e.g. the main branch) and store it")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise OptionError(f"baseline file '{path}' is not valid JSON ({type(e).__name__}: {e}); regenerate it with "
                          "`hago bench --json`") from e
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise OptionError(f"baseline file '{path}' has no 'models' field: not a `hago bench --json` output")
    for label, rec in models.items():
        sp = rec.get("speedup") if isinstance(rec, dict) else None
        if not isinstance(sp, (int, float)) or not sp > 0:
            raise OptionError(f"baseline file '{path}': field models.{label}.speedup is {sp!r}, expected a positive "
                              "number; regenerate the baseline with `hago bench --json`")
    return data


def compare(result: Mapping[str, Any], baseline: Mapping[str, Any], tolerance: float, baseline_path: str
            ) -> Dict[str, Any]:
    """Per model of this run: the baseline's speedup, this run's, and the verdict. ``regression``: even the p90 side
    of this run's speedup is below the baseline's speedup by more than ``tolerance``."""
    first, base_first = result["first_model"], baseline.get("first_model") or next(iter(baseline["models"]))
    if first != base_first:
        raise OptionError(f"this run's first model is '{first}' but baseline '{baseline_path}' measured ratios against "
                          f"'{base_first}' (field first_model); give the same first model, or label it "
                          f"{base_first}=PATH")
    if baseline.get("target") not in (None, result["target"]):
        raise OptionError(f"baseline '{baseline_path}' was measured for target '{baseline['target']}' (field "
                          f"target), this run is --target {result['target']}; compare runs of the same target")
    rows, regressions, notes = {}, [], []
    for label, rec in result["models"].items():
        if label == first:
            continue
        b = baseline["models"].get(label)
        if b is None:
            rows[label] = {"verdict": "new"}
            notes.append(f"model '{label}' is not in the baseline: not compared")
            continue
        bs = float(b["speedup"])
        row = {"baseline_speedup": bs, "speedup": rec["speedup"], "speedup_p10": rec["speedup_p10"],
               "speedup_p90": rec["speedup_p90"], "change": rec["speedup"] / bs - 1.0,
               "bound_change": rec["speedup_p90"] / bs - 1.0}
        if rec["speedup_p90"] * (1.0 + tolerance) < bs:
            row["verdict"] = "regression"
            regressions.append(
                f"model '{label}' got slower relative to '{first}': speedup {rec['speedup']:.3f}x (bootstrap p10 "
                f"{rec['speedup_p10']:.3f}, p90 {rec['speedup_p90']:.3f}) vs {bs:.3f}x in baseline "
                f"'{baseline_path}'; even at the p90 side its time relative to '{first}' is "
                f"{100 * (bs / rec['speedup_p90'] - 1):.1f}% above the baseline's (tolerance {100 * tolerance:g}%)")
        elif rec["speedup_p10"] > bs * (1.0 + tolerance):
            row["verdict"] = "faster"
            notes.append(f"model '{label}' is faster than the baseline ({rec['speedup']:.3f}x vs {bs:.3f}x): "
                         "consider storing this run as the new baseline")
        else:
            row["verdict"] = "ok"
        rows[label] = row
    for label in baseline["models"]:
        if label != base_first and label not in result["models"]:
            notes.append(f"baseline model '{label}' was not benchmarked in this run")
    host_b = (baseline.get("host") or {}).get("int8_flags")
    if host_b is not None and host_b != result["host"]["int8_flags"]:
        notes.append(f"the baseline host had int8 flags {host_b}, this one {result['host']['int8_flags']}: int8 "
                     "ratios differ between such hosts")
    return {"baseline": baseline_path, "tolerance": tolerance, "models": rows, "regressions": regressions,
            "notes": notes, "passed": not regressions}


# ---------------------------------------------------------------- the command
def add_arguments(p) -> None:
    """The `hago bench` options (cli.py adds the subcommand)."""
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="[NAME=]PATH: an .onnx file (ONNX Runtime) or a `hago build` folder (TVM); the first is the "
                        "reference the ratios are taken against (normally FP32)")
    p.add_argument("--target", "-t", required=True,
                   help="target name recorded in the JSON; a build folder must have been built for it")
    p.add_argument("--json", help="write the results here (atomic); store it as the next --baseline")
    p.add_argument("--baseline", help="earlier `hago bench --json` output: exit 1 if a model's speedup vs the first "
                   "model dropped beyond --max-regression")
    p.add_argument("--max-regression", default=None,
                   help=f"tolerated drop of a model's speedup vs the baseline, e.g. 5%% (default {DEFAULT_TOLERANCE * 100:g}%%)")
    p.add_argument("--sessions", type=int, default=3, help="sessions per model, all timed in the same rounds (default 3)")
    p.add_argument("--repeats", type=int, default=60, help="minimum round-robin rounds (default 60)")
    p.add_argument("--min-time", type=float, default=2.0, help="minimum seconds of rounds (default 2)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session (default 1)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                   help="input shape, e.g. input=1x3x32x32 (default: the model's, dynamic dims 1); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--quiet", "-q", action="store_true")


def _check_args(a) -> float:
    for flag, v, lo in (("--sessions", a.sessions, 1), ("--repeats", a.repeats, 1), ("--threads", a.threads, 1),
                        ("--warmup", a.warmup, 0)):
        if v < lo:
            raise OptionError(f"{flag} {v}: must be at least {lo}")
    if a.min_time < 0:
        raise OptionError(f"--min-time {a.min_time}: must be 0 or more seconds")
    if a.max_regression is not None and not a.baseline:
        raise OptionError("--max-regression applies to a comparison: add --baseline OLD.json")
    return parse_tolerance(a.max_regression if a.max_regression is not None else f"{DEFAULT_TOLERANCE * 100:g}%")


def run(a) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Check everything, measure, compare, write the JSON. Returns (result, comparison or None)."""
    tolerance = _check_args(a)
    baseline = load_baseline(a.baseline) if a.baseline else None
    if a.json:
        from .ir.io import check_writable

        check_writable(a.json)
    models = [resolve_model(arg, a.target) for arg in a.models]
    unique_labels(models)
    feeds = make_feeds(models, parse_shapes(a.shape), a.seed)
    t0 = time.perf_counter()
    tr, by_model = measure(models, feeds, sessions=a.sessions, threads=a.threads, repeats=a.repeats,
                           warmup=a.warmup, min_time_s=a.min_time)
    result = {
        "format": FORMAT, "tool": "hago bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": a.target, "first_model": models[0].label, "host": host_info(a.threads),
        "versions": versions(models),
        "settings": {"sessions": a.sessions, "repeats": a.repeats, "min_time_s": a.min_time, "warmup": a.warmup,
                     "threads": a.threads, "seed": a.seed,
                     "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
                     "seconds": round(time.perf_counter() - t0, 2)},
        "method": (f"round-robin rounds over every session of every model; speedup = first model's p{LOW_QUANTILE} "
                   f"time / this model's p{LOW_QUANTILE} time (all sessions pooled), speedup_p10 / speedup_p90 its "
                   f"bootstrap bounds ({BOOT} resamples of the rounds); paired_speedup: median / p10 / p90 over rounds "
                   "of first model time / model time (each the mean over sessions); latency: all samples"),
        "models": summarize(models, tr, by_model),
    }
    comparison = compare(result, baseline, tolerance, a.baseline) if baseline is not None else None
    if comparison is not None:
        result["comparison"] = comparison
    if a.json:
        from .ir.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result, comparison


def format_table(result: Mapping[str, Any]) -> List[str]:
    cmp = (result.get("comparison") or {}).get("models", {})
    h = result["host"]
    w = max(12, *(len(k) for k in result["models"]))
    lines = [f"host: {h['cpu']} ({h['arch']}; int8 flags {', '.join(h['int8_flags']) or 'none'}), "
             f"{h['threads']} thread(s), target {result['target']}",
             f"{'model':<{w}} {'median ms':>10} {'p10-p90 ms':>16} {'speedup [p10, p90]':>24}  vs baseline"]
    for label, r in result["models"].items():
        c = cmp.get(label)
        vs = "" if c is None else ("new" if c["verdict"] == "new" else
                                   f"{c['baseline_speedup']:.3f}x -> {c['speedup']:.3f}x ({100 * c['change']:+.1f}%) "
                                   f"{c['verdict']}")
        lines.append(f"{label:<{w}} {r['median_ms']:>10.3f} {r['p10_ms']:>7.3f}-{r['p90_ms']:<8.3f} "
                     f"{r['speedup']:>8.3f}x [{r['speedup_p10']:.3f}, {r['speedup_p90']:.3f}]  {vs}")
    return lines


def cli(a) -> int:
    """`hago bench`: 0 ok, 1 a regression vs --baseline, 2 bad input (raised as HagoError)."""
    import sys

    result, comparison = run(a)
    if not a.quiet:
        for line in format_table(result):
            print(line)
        if a.json:
            print(f"wrote {a.json}")
    if comparison is not None:
        for n in comparison["notes"]:
            print(f"note: {n}")
        for r in comparison["regressions"]:
            print(f"hago: regression: {r}", file=sys.stderr)
        if comparison["regressions"]:
            return 1
        if not a.quiet:
            print(f"no regression beyond {100 * comparison['tolerance']:g}% vs {comparison['baseline']}")
    return 0
