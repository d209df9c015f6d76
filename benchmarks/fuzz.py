"""Seeded fuzz run of hago_py against its reliability contract.

    python -m benchmarks.fuzz --n 5000 --seed 0 [--families graphs,calib] [--jobs 2] [--json out.json]
    python -m benchmarks.fuzz --repro graphs:123 [--keep DIR]     # one case, in-process, with its traceback

Contract checked per case (cases come from benchmarks/fuzzgen.py; each runs in a fresh temp folder):

(a) success -> the written model passes onnx.checker, loads in an ORT InferenceSession, runs on the probe
    feed, its outputs are finite wherever the FP32 model's are, it keeps no unused initializer, and for W8A8
    cases on all-quantizable graphs it stays within ``MIN_SQNR_DB`` of FP32;
(b) failure -> a HagoError subclass whose str() is one non-empty line that names the thing at fault (one of
    the case's ``blame`` words) and a fix; the CLI exits 2 (1 only for InternalError) with one stderr line;
(c) after a failure no file in the case folder is new or changed; after a success no temp file is left;
(d) never another exception type (crash), never longer than ``--timeout`` seconds (hang).

It also counts *wrong outcomes* (a rejection of a case the generator knows is valid, a success on a case it
knows is invalid), InternalError (a clean exit, but a hago_py bug by definition) and mutated inputs.

Cases run in worker processes (``--jobs``): a soft ``signal.alarm`` in the worker turns a hang into a
reported timeout with the stack it was stuck in; a hard deadline in the parent kills a worker that does not
come back, and a worker that dies (segfault, abort) is counted as a crash.

SQNR floor: W8A8 rounding noise on these <= 8-layer random graphs is 25-45 dB; 15 dB (an RMS error of 18 % of
the signal) is far below that, so falling under it means broken quantization (wrong scale, saturation, int32
bias overflow, a mis-wired tensor), not rounding noise.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .fuzzgen import FAMILIES, Case, ExportCache, Rel, make_case, ort_run

MIN_SQNR_DB = 15.0
DEFAULT_TIMEOUT_S = 60.0
HARD_GRACE_S = 30.0
MAX_MESSAGE_CHARS = 1000
RECYCLE_AFTER = 200
FIX_WORDS = ("use ", "pass ", "check", "give ", "re-export", "export", "remove", "rename", "set ", "add ", "choose",
             "create", "fix", "try ", "convert", "install", "provide", "drop ", "make ", "list ", "specify",
             "supply", "must", "expected", "should", "instead", "e.g.", "valid", "one of", "allowed", "need",
             "only ", "supported", "did you mean", "keep ", "move ", "write", "save", "see ", "change", "turn ",
             "increase", "reduce", "lower ", "raise ", "enable", "disable", "report it", "rerun", "re-run")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger")
LISTS_CHOICES = re.compile(r":\s*[\w.'\"-]+(,\s*[\w.'\"-]+){2,}")  # 'valid ...: a, b, c' names the fix
PROBLEM_COLUMNS = ("crash", "hang", "invalid_output", "files_left", "bad_message", "not_close", "wrong_outcome",
                   "internal_error", "unused_initializers", "input_mutated", "harness_error")


class CaseTimeout(BaseException):
    """Raised by the soft per-case alarm (a BaseException so that `except Exception` cannot swallow it)."""


@dataclass
class Outcome:
    """What one case did and which parts of the contract it broke."""

    family: str
    seed: int
    mode: str = "api"
    note: str = ""
    status: str = "ok"                    # ok | rejected | internal (InternalError) | crash | hang | skip
    problems: List[str] = field(default_factory=list)   # PROBLEM_COLUMNS entries
    details: List[str] = field(default_factory=list)    # one line per problem
    exc_type: str = ""
    message: str = ""
    location: str = ""                    # deepest hago_py frame of the traceback (file:line in function)
    qdq_nodes: int = -1                   # QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear in the output
    min_sqnr_db: Optional[float] = None   # worst output SQNR vs FP32 on the probe (successes only)
    traceback: str = ""
    seconds: float = 0.0

    def add(self, problem: str, detail: str) -> None:
        """Record one contract violation."""
        if problem not in self.problems:
            self.problems.append(problem)
        self.details.append(f"{problem}: {detail}")

    def repro(self) -> str:
        """The command that reruns this case alone (and writes a standalone repro.py)."""
        return f"python -m benchmarks.fuzz --repro {self.family}:{self.seed} --keep /tmp/hago-case"


# ------------------------------------------------------------------------------------------- case folder


def materialize(case: Case, workdir: Path) -> None:
    """Create the case's folders and files in ``workdir``."""
    for d in case.dirs:
        (workdir / d).mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        p = workdir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def snapshot(workdir: Path) -> Dict[str, str]:
    """relative path -> sha1 (files) or 'dir' (folders), for everything under ``workdir``."""
    out: Dict[str, str] = {}
    for p in sorted(workdir.rglob("*")):
        rel = str(p.relative_to(workdir))
        out[rel] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def resolve(value: Any, workdir: Path) -> Any:
    """Rel -> absolute path string; anything else unchanged."""
    return str(workdir / value.path) if isinstance(value, Rel) else value


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout after ``seconds`` (main thread only; a no-op elsewhere)."""
    import threading

    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):  # noqa: ARG001
        raise CaseTimeout(f"case ran longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _frame(line: str) -> Tuple[str, str, str]:
    """(path, line number, function) of a traceback 'File "...", line N, in f' line."""
    try:
        path = line.split('"')[1]
        rest = line.split('"', 2)[2]
        return path, rest.split("line")[1].split(",")[0].strip(), rest.split(" in ")[-1].strip()
    except IndexError:
        return line, "?", "?"


def _short(path: str) -> str:
    """A path from 'hago_py/' on (else the base name)."""
    return path[path.rfind("hago_py"):] if "hago_py" in path else os.path.basename(path)


def hago_location(tb: str) -> str:
    """The deepest hago_py frame of a traceback ('hago_py/x.py:12 in f'), followed by its nearest caller in
    another hago_py file ('<- hago_py/api.py:98 in quantize') so that a failure inside a shared helper (the
    ORT backend, the model loader) still says who called it. Falls back to the deepest frame."""
    frames = [_frame(ln.strip()) for ln in tb.splitlines() if ln.strip().startswith('File "')]
    ours = [f for f in frames if "hago_py" in f[0] and "/benchmarks/" not in f[0] and "contextlib" not in f[0]]
    if not ours:
        return f"{_short(frames[-1][0])}:{frames[-1][1]} in {frames[-1][2]}" if frames else ""
    path, line, func = ours[-1]
    loc = f"{_short(path)}:{line} in {func}"
    caller = next((f for f in reversed(ours[:-1]) if f[0] != path), None)
    if caller is not None and ("backends" in path or "errors.py" in path or "/ir/" in path):
        loc += f" <- {_short(caller[0])}:{caller[1]} in {caller[2]}"
    return loc


# ----------------------------------------------------------------------------------------------- running


def run_api(case: Case, workdir: Path) -> Tuple[str, Any]:
    """Run the case through hago_py.quantize + Result.save. ('ok', out path) or ('error', exception)."""
    import hago_py

    model = resolve(case.model, workdir)
    calib = resolve(case.calibration, workdir)
    if callable(calib) and not isinstance(calib, (dict, list)):
        calib = calib()
    target = resolve(case.target, workdir)
    out = Path(resolve(case.out, workdir))
    report = resolve(case.report, workdir) if case.report else None
    try:
        res = hago_py.quantize(model, calib, target, measure_latency=case.measure_latency, **case.kwargs)
        res.save(out, report_dir=report)
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 - classified by the caller
        return "error", e
    return "ok", out


def run_cli(case: Case, workdir: Path, debug: bool = False) -> Tuple[int, str, str]:
    """Run ``hago quantize`` in-process. (exit code, stdout, stderr); argparse exits become exit codes."""
    from hago_py import cli

    argv = ["quantize"] + [resolve(a, workdir) for a in case.argv]
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("HAGO_DEBUG")
    if debug:
        os.environ["HAGO_DEBUG"] = "1"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        if debug:
            if old is None:
                os.environ.pop("HAGO_DEBUG", None)
            else:
                os.environ["HAGO_DEBUG"] = old
    return int(rc if rc is not None else 0), out.getvalue(), err.getvalue()


def message_problems(msg: str, blame: Sequence[str]) -> List[str]:
    """What is wrong with a rejection message (empty list: it is one clear line naming the fault and a fix)."""
    probs = []
    if not msg.strip():
        return ["empty message"]
    if "\n" in msg.strip():
        probs.append("spans several lines")
    if len(msg) > MAX_MESSAGE_CHARS:
        probs.append(f"{len(msg)} characters long")
    low = msg.lower()
    if blame and not any(b and b.lower() in low for b in blame):
        probs.append(f"names none of {list(blame)[:6]}")
    if not any(w in low for w in FIX_WORDS) and not LISTS_CHOICES.search(msg):
        probs.append("gives no fix")
    return probs


def describe_exception(exc: BaseException) -> Tuple[str, str, str]:
    """(type name, full traceback text, location) of ``exc``; for an InternalError wrapping another exception,
    the type reads 'InternalError(Cause)' and the location is the cause's deepest hago_py frame."""
    from hago_py.errors import InternalError

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, InternalError) and cause is not None:
        name = f"InternalError({type(cause).__name__})"
        loc = hago_location("".join(traceback.format_exception(type(cause), cause, cause.__traceback__)))
        return name, tb, loc or hago_location(tb)
    if isinstance(exc, InternalError) and getattr(exc, "details", None):
        return name, tb + "\n" + str(exc.details), hago_location(str(exc.details)) or hago_location(tb)
    return name, tb, hago_location(tb)


def classify_exception(case: Case, exc: BaseException, o: Outcome) -> None:
    """Fill ``o`` from an exception raised by the API."""
    from hago_py.errors import HagoError, InternalError

    o.exc_type, o.traceback, o.location = describe_exception(exc)
    o.message = str(exc)
    if not isinstance(exc, HagoError):
        o.status = "crash"
        o.add("crash", f"{o.exc_type}: {o.message[:200]} at {o.location}")
        return
    if isinstance(exc, InternalError):
        o.status = "internal"
        o.add("internal_error", f"{o.message[:200]} at {o.location}")
        bad = [b for b in message_problems(o.message, ()) if b != "gives no fix"]
    else:
        o.status = "rejected"
        bad = message_problems(o.message, case.blame)
    if bad:
        o.add("bad_message", f"{'; '.join(bad)}: {o.message[:200]!r}")


def terminal_lines(text: str) -> List[str]:
    """Non-empty lines as a terminal shows them: a carriage return (progress bar) overwrites its line."""
    return [ln.split("\r")[-1] for ln in text.split("\n") if ln.split("\r")[-1].strip()]


def classify_cli(case: Case, rc: int, stderr: str, o: Outcome) -> None:
    """Fill ``o`` from a failed CLI run (exit code and stderr)."""
    lines = terminal_lines(stderr)
    last = lines[-1] if lines else ""
    o.message = last
    if rc == 1 and last.startswith("hago: internal error: "):
        # an InternalError or an uncaught exception: run_case reruns the case to tell which
        o.status = "internal"
        o.exc_type = "InternalError(cli)"
        o.add("internal_error", last[:300])
        if len(lines) != 1:
            o.add("bad_message", f"stderr has {len(lines)} lines: {stderr.strip()[:200]!r}")
        return
    if rc != 2:
        o.status = "crash"
        o.exc_type = f"exit {rc}"
        o.add("crash", f"exit code {rc}, stderr {stderr[-300:]!r}")
        return
    o.status = "rejected"
    o.exc_type = "HagoError(cli)" if last.startswith("hago: error:") else "argparse"
    bad = []
    if len(lines) != 1:
        bad.append(f"stderr has {len(lines)} lines")
    if not last.startswith("hago: error: "):
        bad.append("stderr line does not start with 'hago: error: '")
    msg = last.split("hago: error: ", 1)[-1]
    bad += [b for b in message_problems(msg, case.blame) if b != "spans several lines"]
    if bad:
        o.add("bad_message", f"{'; '.join(bad)}: {stderr.strip()[:200]!r}")


def cast_feed(sess: Any, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The probe cast to the session's input dtypes (inputs the session lacks are dropped)."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    out = {}
    for i in sess.get_inputs():
        if i.name in feed:
            out[i.name] = np.ascontiguousarray(feed[i.name].astype(types.get(i.type, np.float32)))
    return out


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(np.sum((ref - test) ** 2))
    signal_ = float(np.sum(ref ** 2))
    if signal_ < 1e-20:
        return float("inf") if noise < 1e-12 else float("-inf")
    return 10.0 * np.log10(signal_ / max(noise, 1e-30))


def unused_initializers(model: Any) -> List[str]:
    """Initializers no node (or subgraph) reads and no graph output names."""
    used = {o.name for o in model.graph.output}

    def visit(g: Any) -> None:
        for n in g.node:
            used.update(n.input)
            for a in n.attribute:
                if a.g is not None and a.g.node:
                    visit(a.g)
                for sg in a.graphs:
                    visit(sg)

    visit(model.graph)
    return [t.name for t in model.graph.initializer if t.name not in used]


def check_output(case: Case, path: Path, o: Outcome) -> None:
    """Contract (a) on a written model file."""
    import onnx
    import onnxruntime as ort

    if not path.is_file():
        o.add("invalid_output", f"success reported but {path.name} was not written")
        return
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        o.add("invalid_output", f"onnx.load / checker: {type(e).__name__}: {str(e)[:200]}")
        return
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        o.add("invalid_output", f"ORT cannot load it: {str(e)[:200]}")
        return
    o.qdq_nodes = sum(1 for n in model.graph.node if n.op_type in QDQ_OPS)
    unused = unused_initializers(model)
    if unused:
        o.add("unused_initializers", f"{len(unused)} unused initializer(s), e.g. {unused[:3]}")
    if case.probe is None:
        return
    feed = cast_feed(sess, case.probe)
    try:
        outs = sess.run(None, feed)
    except Exception as e:  # noqa: BLE001
        o.add("invalid_output", f"ORT cannot run it on the probe: {str(e)[:200]}")
        return
    missing = target_isa_missing(case.target)
    if missing:
        # this CPU lacks the target's int8 instructions: ORT's fused kernels here are not the target's (AVX2
        # saturates u8 x s8 int16 pairs where VNNI / AMX accumulate exactly), so closeness is checked on the
        # model's defined QDQ semantics (graph optimizations off), which is what the target computes
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feed)
    compare_outputs(case, sess, outs, o)


def target_isa_missing(target: Any) -> List[str]:
    """The int8 instructions the x86 target's spec relies on that this CPU lacks (empty when it has them, for a
    non-x86 or unknown target, or when the spec cannot be loaded)."""
    try:
        from hago_py.hw import load_spec
        from hago_py.hw.host import read_host

        spec = load_spec(target)
        host = read_host()
    except Exception:  # noqa: BLE001 - a rejected target has no closeness to check anyway
        return []
    int8 = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw")
    if not str(getattr(spec, "name", "")).startswith("x86") or not host.arch.startswith(("x86", "amd64")):
        return []
    return [f for f in getattr(spec, "isa", []) if f in int8 and f not in set(host.flags)]


def compare_outputs(case: Case, sess: Any, outs: List[np.ndarray], o: Outcome) -> None:
    """Finite where FP32 is finite; SQNR >= MIN_SQNR_DB for W8A8 all-quantizable cases."""
    if case.fp32 is None:
        return
    ref = ort_run(case.fp32, case.probe)
    import onnx

    ref_names = [x.name for x in onnx.load_from_string(case.fp32).graph.output]
    names = [x.name for x in sess.get_outputs()]
    by_name = dict(zip(names, outs))
    pairs = ([(n, r, by_name[n]) for n, r in zip(ref_names, ref)] if set(ref_names) <= set(by_name)
             else [(f"#{i}", r, t) for i, (r, t) in enumerate(zip(ref, outs))])
    if len(outs) != len(ref):
        o.add("invalid_output", f"{len(outs)} outputs, the FP32 model has {len(ref)}")
    from hago_py.quant.padding import real_rows

    mask = case.probe.get("attention_mask") if isinstance(case.probe, dict) else None
    for name, r, t in pairs:
        if np.shape(r) != np.shape(t):
            o.add("invalid_output", f"output {name} has shape {np.shape(t)}, FP32 {np.shape(r)}")
            continue
        if np.all(np.isfinite(r)) and not np.all(np.isfinite(t)):
            o.add("invalid_output", f"output {name} is not finite")
            continue
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(t))):
            continue
        db = sqnr_db(real_rows(r, mask), real_rows(t, mask))  # padding outputs are not kept (mask_padding)
        o.min_sqnr_db = db if o.min_sqnr_db is None else min(o.min_sqnr_db, db)
        if case.quantizable and db < MIN_SQNR_DB:
            o.add("not_close", f"output {name}: SQNR {db:.1f} dB < {MIN_SQNR_DB} dB vs FP32")


def check_files(before: Dict[str, str], after: Dict[str, str], failed: bool, o: Outcome) -> None:
    """Contract (c): nothing new / changed after a failure; no temp file left after a success."""
    if failed:
        new = sorted(set(after) - set(before))
        changed = sorted(k for k in before if k in after and after[k] != before[k])
        gone = sorted(set(before) - set(after))
        if new or changed or gone:
            o.add("files_left", f"after a failure: new {new[:5]}, changed {changed[:5]}, removed {gone[:5]}")
        return
    temps = sorted(k for k in set(after) - set(before) if k.endswith(".tmp") or "/." in f"/{k}")
    if temps:
        o.add("files_left", f"temp files left after a success: {temps[:5]}")


def check_expectation(case: Case, o: Outcome) -> None:
    """Count a rejection of a known-valid case, or a success on a known-invalid one."""
    if case.expect == "ok" and o.status == "rejected" and "internal_error" not in o.problems:
        o.add("wrong_outcome", f"valid case rejected: {o.exc_type}: {o.message[:200]}")
    if case.expect == "reject" and o.status == "ok":
        o.add("wrong_outcome", "invalid input accepted (expected a HagoError)")


def model_digest(model: Any) -> Optional[str]:
    """sha1 of a ModelProto / bytes input (to detect mutation by the library), else None."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return hashlib.sha1(model.SerializeToString()).hexdigest()
    return None


def execute(case: Case, workdir: Path, timeout: float, o: Outcome) -> None:
    """Run the case in ``workdir`` and check the contract into ``o``."""
    materialize(case, workdir)
    before = snapshot(workdir)
    digest = model_digest(case.model)
    with time_limit(timeout):
        if case.mode == "api":
            kind, val = run_api(case, workdir)
            if kind == "error":
                classify_exception(case, val, o)
            else:
                check_output(case, val, o)
        else:
            rc, _, err = run_cli(case, workdir)
            if rc == 0:
                check_output(case, Path(resolve(case.out, workdir)), o)
            else:
                classify_cli(case, rc, err, o)
    if digest is not None and model_digest(case.model) != digest:
        o.add("input_mutated", "the ModelProto passed in was modified")
    check_files(before, snapshot(workdir), o.status not in ("ok", "hang"), o)
    check_expectation(case, o)


def check_cwd(before: set, o: Outcome) -> None:
    """Count (and remove) files a case wrote into the current directory instead of where it was told."""
    new = sorted(set(os.listdir(".")) - before)
    if new:
        o.add("files_left", f"written to the current directory: {new[:5]}")
        for name in new:
            with contextlib.suppress(OSError):
                shutil.rmtree(name) if os.path.isdir(name) else os.unlink(name)


def cli_exception(family: str, seed: int, root: Path, cache: Optional[ExportCache]) -> Optional[BaseException]:
    """Rerun a CLI case that exited 1 through the CLI's own command function, without its catch-all, and
    return the exception it raises (None if it raises none or the CLI has no such function)."""
    from hago_py import cli

    case = make_case(family, seed, cache)
    workdir = Path(tempfile.mkdtemp(prefix="repro-", dir=root))
    try:
        materialize(case, workdir)
        args = cli._parser().parse_args(["quantize"] + [resolve(a, workdir) for a in case.argv])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli._cmd_quantize(args)
    except CaseTimeout:
        raise
    except BaseException as e:  # noqa: BLE001
        return e
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return None


def refine_cli_failure(o: Outcome, root: Path, timeout: float, cache: Optional[ExportCache]) -> None:
    """For a CLI exit 1: find the exception behind it; not an InternalError -> a crash."""
    from hago_py.errors import HagoError, InternalError

    try:
        with time_limit(timeout):
            exc = cli_exception(o.family, o.seed, root, cache)
    except (CaseTimeout, AttributeError):
        return
    if exc is None:
        return
    o.exc_type, o.traceback, o.location = describe_exception(exc)
    if isinstance(exc, InternalError):
        o.exc_type += " (cli)"
        return
    if not isinstance(exc, HagoError):
        o.status = "crash"
        o.problems = [p for p in o.problems if p != "internal_error"]
        o.details = [d for d in o.details if not d.startswith("internal_error")]
        o.add("crash", f"{o.exc_type}: {str(exc)[:200]} at {o.location} (CLI exit 1)")


def run_case(family: str, seed: int, root: Path, timeout: float = DEFAULT_TIMEOUT_S,
             cache: Optional[ExportCache] = None, watch_cwd: bool = False) -> Outcome:
    """Generate and run one case in a fresh folder under ``root``; the folder is removed afterwards.
    ``watch_cwd``: also count files the case leaves in the current directory (then removed)."""
    t0 = time.perf_counter()
    o = Outcome(family, seed)
    try:
        case = make_case(family, seed, cache)
    except Exception as e:  # noqa: BLE001 - a generator bug is reported, not fatal
        o.status, o.note = "skip", f"generator failed: {type(e).__name__}: {str(e)[:200]}"
        return o
    o.mode, o.note = case.mode, case.note
    if case.model is None and case.note.startswith("SKIP"):
        o.status = "skip"
        return o
    workdir = Path(tempfile.mkdtemp(prefix=f"{family}-{seed}-", dir=root))
    cwd_before = set(os.listdir(".")) if watch_cwd else set()
    try:
        execute(case, workdir, timeout, o)
    except CaseTimeout:
        o.status = "hang"
        o.traceback = traceback.format_exc()
        o.location = hago_location(o.traceback)
        o.add("hang", f"no result after {timeout:.0f} s (stuck at {o.location})")
    except Exception as e:  # noqa: BLE001 - a failure of the checker itself is reported as such
        o.add("harness_error", f"{type(e).__name__}: {str(e)[:200]}")
        o.traceback = traceback.format_exc()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if watch_cwd:
            check_cwd(cwd_before, o)
    if o.status == "internal" and o.mode == "cli":
        refine_cli_failure(o, root, timeout, cache)
    o.seconds = time.perf_counter() - t0
    return o


# ------------------------------------------------------------------------------------------------ workers


def worker_main(conn: Any, root: str, timeout: float) -> None:
    """Worker loop: import hago_py, say 'ready', then receive (family, seed) and send back the Outcome as a
    dict; None ends the loop."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import hago_py  # noqa: F401 - a broken import is reported to the parent, not counted against a case
        import hago_py.api  # noqa: F401
        import hago_py.cli  # noqa: F401
    except BaseException as e:  # noqa: BLE001
        conn.send(("import failed", f"{type(e).__name__}: {e}"))
        return
    scratch = Path(root) / f"cwd-{os.getpid()}"  # the worker's own current directory, watched per case
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    conn.send(("ready", ""))
    cache = ExportCache()
    while True:
        task = conn.recv()
        if task is None:
            return
        family, seed = task
        if family.startswith("_selftest"):
            selftest_task(family)
        conn.send(asdict(run_case(family, seed, Path(root), timeout, cache, watch_cwd=True)))


def selftest_task(family: str) -> None:
    """Harness self-test tasks: '_selftest_die' kills the worker, '_selftest_hang' blocks past every alarm."""
    if family == "_selftest_die":
        os._exit(3)
    if family == "_selftest_hang":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            time.sleep(1)


class WorkerStartError(RuntimeError):
    """A worker process could not import hago_py (e.g. a source file is mid-edit)."""


@dataclass
class Worker:
    """A worker process, its pipe, its current task and when that task started."""

    proc: Any
    conn: Any
    task: Optional[Tuple[str, int]] = None
    started: float = 0.0
    done: int = 0


def spawn_worker(ctx: Any, root: Path, timeout: float) -> Worker:
    """Spawn a worker and wait for its 'ready' (WorkerStartError if it fails to import hago_py)."""
    parent, child = ctx.Pipe()
    p = ctx.Process(target=worker_main, args=(child, str(root), timeout), daemon=True)
    p.start()
    child.close()
    w = Worker(p, parent)
    try:
        if not parent.poll(300):
            raise WorkerStartError("worker did not start within 300 s")
        status, why = parent.recv()
    except (EOFError, OSError) as e:
        stop_worker(w)
        raise WorkerStartError(f"worker died while starting (exit code {p.exitcode}): {e}") from e
    if status != "ready":
        stop_worker(w)
        raise WorkerStartError(why)
    return w


def start_worker(ctx: Any, root: Path, timeout: float, attempts: int = 6) -> Worker:
    """Spawn a ready worker, retrying a failed start a few times (sources may be mid-edit); raise after that."""
    last = ""
    for i in range(attempts):
        try:
            return spawn_worker(ctx, root, timeout)
        except WorkerStartError as e:
            last = str(e)
            print(f"  worker start failed ({last[:200]}); retrying in {5 * (i + 1)} s", file=sys.stderr, flush=True)
            time.sleep(5 * (i + 1))
    raise WorkerStartError(f"no worker could start after {attempts} attempts: {last}")


def stop_worker(w: Worker, graceful: bool = False) -> None:
    """Stop a worker (asking it to end first when ``graceful``, else killing it) and reap it."""
    if graceful:
        with contextlib.suppress(Exception):
            w.conn.send(None)
        w.proc.join(10)
    with contextlib.suppress(Exception):
        w.proc.kill()
    w.proc.join(5)
    with contextlib.suppress(Exception):
        w.conn.close()


def dead_outcome(task: Tuple[str, int], status: str, detail: str, seconds: float) -> Outcome:
    """Outcome of a case whose worker hung past the hard deadline or died."""
    o = Outcome(task[0], task[1], status=status, seconds=seconds)
    o.add(status, detail)
    o.exc_type = "worker " + status
    o.message = detail
    return o


class Pool:
    """Worker processes that run cases with a hard per-case deadline; see :func:`run_pool`."""

    def __init__(self, jobs: int, timeout: float, root: Path, grace: float = HARD_GRACE_S) -> None:
        self.ctx = mp.get_context("spawn")
        self.timeout, self.root, self.hard = timeout, root, timeout + grace
        self.workers = [start_worker(self.ctx, root, timeout) for _ in range(jobs)]

    def replace(self, i: int, graceful: bool = False) -> None:
        """Stop worker ``i`` and start a fresh one in its place."""
        stop_worker(self.workers[i], graceful)
        self.workers[i] = start_worker(self.ctx, self.root, self.timeout)

    def dispatch(self, queue: List[Tuple[str, int]]) -> None:
        """Give every idle worker the next task (a worker that cannot take it is replaced, the task kept)."""
        for i in range(len(self.workers)):
            if self.workers[i].task is not None or not queue:
                continue
            if self.workers[i].done >= RECYCLE_AFTER:
                self.replace(i, graceful=True)
            w = self.workers[i]
            try:
                w.conn.send(queue[-1])
            except (BrokenPipeError, OSError):
                self.replace(i)
                continue
            w.task, w.started = queue.pop(), time.perf_counter()

    def collect(self) -> List[Tuple[Tuple[str, int], Outcome]]:
        """Wait for the next finished (or dead / overdue) tasks and return (task, outcome) pairs."""
        busy = [w for w in self.workers if w.task is not None]
        if not busy:
            return []
        wait_s = max(0.05, min(w.started + self.hard - time.perf_counter() for w in busy))
        ready = wait([w.conn for w in busy], timeout=wait_s)
        done = []
        for i, w in enumerate(self.workers):
            if w.task is None:
                continue
            elapsed = time.perf_counter() - w.started
            if w.conn in ready:
                try:
                    o = Outcome(**w.conn.recv())
                    w.done += 1
                    done.append((w.task, o))
                    w.task = None
                except (EOFError, OSError):
                    w.proc.join(5)
                    done.append((w.task, dead_outcome(w.task, "crash", f"worker died (exit code {w.proc.exitcode})",
                                                      elapsed)))
                    self.replace(i)
            elif elapsed > self.hard:
                done.append((w.task, dead_outcome(w.task, "hang", f"killed after {self.hard:.0f} s", elapsed)))
                self.replace(i)
        return done

    def close(self) -> None:
        """Stop all workers."""
        for w in self.workers:
            stop_worker(w, graceful=w.task is None)


def run_pool(tasks: List[Tuple[str, int]], jobs: int, timeout: float, root: Path,
             progress: bool = True, grace: float = HARD_GRACE_S) -> List[Outcome]:
    """Run ``tasks`` on ``jobs`` worker processes with per-case hang detection; outcomes in task order.
    A case that does not report back ``grace`` seconds after its soft ``timeout`` is killed (a hang)."""
    results: Dict[int, Outcome] = {}
    order = {t: i for i, t in enumerate(tasks)}
    queue = list(tasks)[::-1]
    pool = Pool(max(1, min(jobs, len(tasks))), timeout, root, grace)
    t_start, last_print = time.perf_counter(), 0
    try:
        while len(results) < len(tasks):
            pool.dispatch(queue)
            for task, o in pool.collect():
                results[order[task]] = o
            if progress and len(results) - last_print >= 100:
                last_print = len(results)
                bad = sum(1 for r in results.values() if r.problems)
                print(f"  {len(results)}/{len(tasks)} cases, {bad} with problems, "
                      f"{time.perf_counter() - t_start:.0f} s", flush=True)
    finally:
        pool.close()
    return [results[i] for i in range(len(tasks))]


# ------------------------------------------------------------------------------------------------ summary


def make_tasks(n: int, seed: int, families: Sequence[str]) -> List[Tuple[str, int]]:
    """``n`` (family, seed) pairs: families interleaved, case seeds derived from the run seed."""
    return [(families[i % len(families)], seed * 1_000_000 + i) for i in range(n)]


def family_table(outcomes: Sequence[Outcome], families: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Per-family counts: cases, ok, rejected, skipped and one column per contract problem."""
    table: Dict[str, Dict[str, int]] = {}
    for fam in list(families) + ["TOTAL"]:
        rows = [o for o in outcomes if fam == "TOTAL" or o.family == fam]
        c = Counter(o.status for o in rows)
        row = {"cases": len(rows), "ok": c["ok"], "rejected": c["rejected"], "internal": c["internal"],
               "skipped": c["skip"]}
        for p in PROBLEM_COLUMNS:
            row[p] = sum(1 for o in rows if p in o.problems)
        row["no_qdq"] = sum(1 for o in rows if o.status == "ok" and o.qdq_nodes == 0)
        sq = sorted(o.min_sqnr_db for o in rows if o.status == "ok" and o.min_sqnr_db is not None)
        row["sqnr_min_db"] = round(sq[0], 1) if sq else None  # type: ignore[assignment]
        row["sqnr_median_db"] = round(sq[len(sq) // 2], 1) if sq else None  # type: ignore[assignment]
        row["api"] = sum(1 for o in rows if o.mode == "api")
        row["cli"] = sum(1 for o in rows if o.mode == "cli")
        table[fam] = row
    return table


def format_table(table: Dict[str, Dict[str, int]]) -> str:
    """The per-family table as fixed-width text."""
    short = {"invalid_output": "invalid", "files_left": "files", "bad_message": "bad_msg", "not_close": "not_close",
             "wrong_outcome": "wrong", "internal_error": "internal", "unused_initializers": "unused_init",
             "input_mutated": "mutated", "harness_error": "harness"}
    cols = ["cases", "api", "cli", "ok", "no_qdq", "rejected", "skipped"] + [c for c in PROBLEM_COLUMNS]
    head = f"{'family':<10}" + "".join(f"{short.get(c, c):>{max(9, len(short.get(c, c)) + 1)}}" for c in cols)
    lines = [head, "-" * len(head)]
    for fam, row in table.items():
        lines.append(f"{fam:<10}" + "".join(f"{row[c]:>{max(9, len(short.get(c, c)) + 1)}}" for c in cols))
    return "\n".join(lines)


def failure_classes(outcomes: Sequence[Outcome]) -> List[Dict[str, Any]]:
    """Failures grouped by (problem, exception type, location), most frequent first."""
    groups: Dict[Tuple[str, str, str], List[Outcome]] = {}
    for o in outcomes:
        for p in o.problems:
            detail = next((d for d in o.details if d.startswith(p + ":")), p)
            key_detail = o.location or detail.split(":", 2)[1][:60]
            groups.setdefault((p, o.exc_type, key_detail), []).append(o)
    out = []
    for (p, et, loc), rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ex = rows[0]
        out.append({"problem": p, "exc_type": et, "location": loc, "count": len(rows),
                    "families": dict(Counter(r.family for r in rows)),
                    "example": {"family": ex.family, "seed": ex.seed, "mode": ex.mode, "note": ex.note[:300],
                                "message": ex.message[:300],
                                "detail": next((d for d in ex.details if d.startswith(p + ":")), "")[:300],
                                "repro": ex.repro()},
                    "seeds": [f"{r.family}:{r.seed}" for r in rows[:10]]})
    return out


def write_json(path: Path, args: Any, outcomes: Sequence[Outcome], table: Dict[str, Any], wall: float) -> None:
    """Write the run's results (table, classes, every failing case) as JSON."""
    fails = [{"family": o.family, "seed": o.seed, "mode": o.mode, "status": o.status, "problems": o.problems,
              "details": [d[:300] for d in o.details], "exc_type": o.exc_type, "message": o.message[:300],
              "location": o.location, "note": o.note[:300], "repro": o.repro()} for o in outcomes if o.problems]
    slow = sorted(outcomes, key=lambda o: -o.seconds)[:10]
    data = {"config": {"n": args.n, "seed": args.seed, "families": args.families, "timeout_s": args.timeout,
                       "jobs": args.jobs, "wall_s": round(wall, 1), "min_sqnr_db": MIN_SQNR_DB},
            "table": table, "classes": failure_classes(outcomes), "failures": fails,
            "skipped": sorted({o.note[:200] for o in outcomes if o.status == "skip"}),
            "low_sqnr_successes": [{"case": f"{o.family}:{o.seed}", "min_sqnr_db": round(o.min_sqnr_db, 1),
                                    "note": o.note[:200]} for o in outcomes
                                   if o.status == "ok" and o.min_sqnr_db is not None and o.min_sqnr_db < 25.0],
            "slowest": [{"case": f"{o.family}:{o.seed}", "seconds": round(o.seconds, 2)} for o in slow]}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------------------- main


def write_repro(case: Case, folder: Path) -> Path:
    """Write the case's files, its in-memory inputs (model_input.onnx / .bin, calib_input.npz or .pkl,
    spec_input.json) and ``repro.py``, a script that makes the same call without the fuzz harness."""
    import pickle

    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    materialize(case, folder)
    if case.fp32:
        (folder / "fp32_reference.onnx").write_bytes(case.fp32)
    if case.mode == "cli":
        argv = ["quantize"] + [str(folder / a.path) if isinstance(a, Rel) else str(a) for a in case.argv]
        body = f"from hago_py import cli\nraise SystemExit(cli.main({argv!r}))\n"
    else:
        body = "import pickle\nimport numpy as np\nimport onnx\nimport hago_py\n\n"
        body += f"model = {_repro_value(case.model, folder, 'model', onnx, pickle)}\n"
        body += f"calibration = {_repro_value(case.calibration, folder, 'calib', onnx, pickle)}\n"
        body += f"target = {_repro_value(case.target, folder, 'spec', onnx, pickle)}\n"
        body += f"kwargs = pickle.loads({pickle.dumps(case.kwargs)!r})\n"
        body += ("res = hago_py.quantize(model, calibration, target, "
                 f"measure_latency={case.measure_latency}, **kwargs)\n"
                 f"res.save({str(folder / case.out.path) if case.out else str(folder / 'out.onnx')!r}, "
                 f"report_dir={str(folder / case.report.path) if case.report else None!r})\nprint('quantized')\n")
    path = folder / "repro.py"
    path.write_text(f"# {case.family}:{case.seed} ({case.mode}): {case.note}\n" + body, encoding="utf-8")
    return path


def _repro_value(value: Any, folder: Path, stem: str, onnx: Any, pickle: Any) -> str:
    """Python source that recreates ``value`` in repro.py (writing it to ``folder`` when it is data)."""
    if isinstance(value, Rel):
        return repr(str(folder / value.path))
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    if isinstance(value, onnx.ModelProto):
        (folder / f"{stem}_input.onnx").write_bytes(value.SerializeToString())
        return f"onnx.load_model({str(folder / (stem + '_input.onnx'))!r}, load_external_data=False)"
    if isinstance(value, (bytes, bytearray)):
        (folder / f"{stem}_input.bin").write_bytes(bytes(value))
        return f"open({str(folder / (stem + '_input.bin'))!r}, 'rb').read()"
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) and v.dtype != object
                                                 for v in value.values()) and stem == "calib":
        np.savez(folder / "calib_input.npz", **value)
        return f"dict(np.load({str(folder / 'calib_input.npz')!r}))"
    if stem == "spec" and isinstance(value, dict):
        (folder / "spec_input.json").write_text(json.dumps(value), encoding="utf-8")
        return f"__import__('json').load(open({str(folder / 'spec_input.json')!r}))"
    if hasattr(value, "__next__"):
        value = list(value)
        (folder / f"{stem}_input.pkl").write_bytes(pickle.dumps(value))
        return f"iter(pickle.load(open({str(folder / (stem + '_input.pkl'))!r}, 'rb')))"
    try:
        blob = pickle.dumps(value)
    except Exception:  # noqa: BLE001
        return repr(value)
    (folder / f"{stem}_input.pkl").write_bytes(blob)
    return f"pickle.load(open({str(folder / (stem + '_input.pkl'))!r}, 'rb'))"


def repro(spec: str, keep: Optional[str], timeout: float) -> int:
    """Run one case in-process and print everything about it."""
    family, seed = spec.split(":")
    case = make_case(family, int(seed))
    print(f"case {family}:{seed} ({case.mode}): {case.note}")
    print(f"  expect={case.expect} quantizable={case.quantizable} blame={list(case.blame)[:8]}")
    if case.mode == "cli":
        print("  argv: hago quantize " + " ".join(str(a.path if isinstance(a, Rel) else a) for a in case.argv))
    else:
        print(f"  model={type(case.model).__name__} calibration={type(case.calibration).__name__} "
              f"target={case.target if not isinstance(case.target, dict) else 'dict'} kwargs={case.kwargs}")
    if keep:
        write_repro(case, Path(keep))
        print(f"  case files and a standalone repro script written to {keep} (run: python {Path(keep) / 'repro.py'})")
    with tempfile.TemporaryDirectory() as root:
        o = run_case(family, int(seed), Path(root), timeout)
    print(f"status: {o.status}; problems: {o.problems}")
    for d in o.details:
        print(f"  {d}")
    if o.message:
        print(f"message: {o.message}")
    if o.traceback:
        print(o.traceback)
    return 1 if o.problems else 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=600, help="number of cases (families interleaved)")
    p.add_argument("--seed", type=int, default=0, help="run seed (case seeds derive from it)")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a case is a hang")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--repro", help="FAMILY:SEED: run one case in-process and print its traceback")
    p.add_argument("--keep", help="with --repro: write the case's files (and fp32_reference.onnx) here")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the fuzz campaign; exit 1 when any case broke the contract."""
    args = parse_args(argv)
    if args.repro:
        return repro(args.repro, args.keep, args.timeout)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"unknown families {unknown}; use {','.join(FAMILIES)}", file=sys.stderr)
        return 2
    tasks = make_tasks(args.n, args.seed, families)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hago-fuzz-") as root:
        outcomes = run_pool(tasks, args.jobs, args.timeout, Path(root))
    wall = time.perf_counter() - t0
    table = family_table(outcomes, families)
    print(format_table(table))
    print(f"{len(outcomes)} cases in {wall:.0f} s ({args.jobs} jobs, seed {args.seed})")
    for s in sorted({o.note for o in outcomes if o.status == "skip"})[:5]:
        print(f"skipped: {s[:200]}")
    for c in failure_classes(outcomes)[:25]:
        ex = c["example"]
        print(f"{c['count']:>5} x {c['problem']:<20} {c['exc_type']:<22} {c['location'][:70]}  e.g. "
              f"{ex['family']}:{ex['seed']}")
    if args.json:
        write_json(Path(args.json), args, outcomes, table, wall)
        print(f"wrote {args.json}")
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
