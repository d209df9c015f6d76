"""MetaSchedule tuning of a hago Relax module (``tvm.s_tir.meta_schedule`` in TVM 0.27), resumable.

The gotcha this module exists for: ``tune_relax`` extracts tasks from the ``call_tir`` PrimFuncs of the module
it is given, so it must get the *legalized + fused* module (:func:`fused_module`, the same passes
``compile_relax`` runs before ``MetaScheduleApplyDatabase``, so the workload keys match), while
``compile_relax`` must get the *raw* module plus the database. Swapping them builds silently untuned.

The database is a MetaSchedule JSON database in one folder (``database_workload.json``,
``database_tuning_record.json``): tuning again with the same folder adds to it and starts from its best records.
Needs the ``tvm-tune`` extra (xgboost-cpu, cloudpickle, tornado) and psutil.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ...errors import BackendError, OptionError

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def fused_module(mod, target):
    """``mod`` after library dispatch, LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR:
    exactly what compile_relax keys its database look-ups on."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as rp

    try:
        dispatch = list(rp.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    seq = tvm.transform.Sequential([*dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])
    with target, tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def with_num_cores(target):
    """MetaSchedule's CPU rules need ``num-cores`` on an llvm target: add this machine's physical cores (a cross
    target keeps the count it was given). Tuning and compiling use the same target so database keys match."""
    import json

    import tvm

    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    d = json.loads(str(target))
    d["num-cores"] = int(cores)
    return tvm.target.Target(d)


def has_database(db_dir) -> bool:
    return db_dir is not None and all((Path(db_dir) / f).is_file() for f in DB_FILES)


def open_database(db_dir):
    """The JSON database in ``db_dir`` (created if missing)."""
    from tvm.s_tir import meta_schedule as ms

    Path(db_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=True)


def kernel_status(mod, target, db_dir=None) -> Dict[str, str]:
    """{kernel (fused PrimFunc task): "tuned: <best us> (db)" | "untuned"} for the raw Relax ``mod``."""
    from tvm.s_tir import meta_schedule as ms

    target = with_num_cores(target)
    tasks = ms.relax_integration.extract_tasks(fused_module(mod, target), target)
    db = open_database(db_dir) if has_database(db_dir) else None
    out: Dict[str, str] = {}
    for t in tasks:
        status = "untuned"
        if db is not None:
            for m in t.dispatched:
                if db.has_workload(m):
                    recs = db.get_top_k(db.commit_workload(m), 1)
                    if recs:
                        secs = [float(x) for x in (recs[0].run_secs or [])]
                        status = f"tuned: best {1e6 * min(secs):.1f} us" if secs else "tuned"
                    break
        out[t.task_name] = status
    return out


def compile_module(mod, target, db_dir=None):
    """relax.build of ``mod``; with a database in ``db_dir``: compile_relax(raw mod + database)."""
    import tvm
    from tvm import relax

    if has_database(db_dir):
        from tvm.s_tir import meta_schedule as ms

        return ms.relax_integration.compile_relax(open_database(db_dir), mod, with_num_cores(target), params=None)
    with tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target)


def build_candidate(mod, target, _params=None):
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``.

    That import parses ~500 TVMScript intrinsics: 60-140 s of CPU on a 2-core AMD EPYC (2026-12-04), and
    ``LocalBuilder`` starts fresh worker processes for every batch of candidates, so each batch of builds took
    about a minute even for a 64-element add (in-process ``tvm.compile`` of the same candidate: 0.03-0.3 s).
    The builder gets the already scheduled (and, where a rule tensorized it, already tensorized) PrimFunc, so
    the intrinsic registry is not needed to build it."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _progress_callback(say: Callable[[str], None], total: int):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    state = {"n": 0, "t0": time.perf_counter(), "best": {}}

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            state["n"] += len(runner_results)
            errs = [r.error_msg for r in builder_results if getattr(r, "error_msg", None)]
            if errs:       # MetaSchedule only logs "Build errors: N": say why
                first = str(errs[0]).strip().splitlines()
                say(f"task {task_id}: {len(errs)} candidate build(s) failed: {(first[-1] if first else '')[:300]}")
                state.setdefault("build_errors", []).append(str(errs[0])[-2000:])
            secs = [min(float(s) for s in r.run_secs) for r in runner_results if r.run_secs]
            if secs:
                state["best"][task_id] = min(state["best"].get(task_id, 1e30), min(secs))
            best = state["best"].get(task_id)
            say(f"task {task_id}: {state['n']}/{total} trials, {time.perf_counter() - state['t0']:.0f} s"
                + (f", task best {1e6 * best:.1f} us" if best else ""))

    return _Progress()


def tune_module(mod, target, db_dir, trials: int, *, progress: bool = True, per_iter: int = 16,
                max_trials_per_task: Optional[int] = None, seed: Optional[int] = None,
                strategy: Any = "evolutionary", build_timeout_s: float = 120.0) -> Dict[str, Any]:
    """Tune the raw Relax ``mod`` for ``target`` with ``trials`` measured trials into ``db_dir`` (reused).
    ``build_timeout_s``: per-candidate build limit (a task whose candidates all time out gets no record).
    Candidates are built by :func:`build_candidate` (MetaSchedule's own builder spends a minute per batch
    importing the tensor-intrinsic registry)."""
    if not isinstance(trials, int) or trials < 1:
        raise OptionError(f"trials={trials!r} is invalid; pass a positive number of measured trials (e.g. 64)")
    try:
        from tvm.s_tir import meta_schedule as ms
        import xgboost  # noqa: F401  (the default cost model)
    except ImportError as e:
        raise BackendError(f"tuning needs {e.name}: pip install 'hago_py[tvm-tune]' (xgboost-cpu, cloudpickle, "
                           "tornado)") from e
    say = (lambda m: print(f"[tune] {m}", flush=True)) if progress else (lambda m: None)
    db_dir = Path(db_dir)
    target = with_num_cores(target)
    before = len(open_database(db_dir)) if has_database(db_dir) else 0
    fused = fused_module(mod, target)
    n_tasks = len(ms.relax_integration.extract_tasks(fused, target))
    say(f"{n_tasks} kernels, {trials} trials, database {db_dir} ({before} records before)")
    callbacks = list(ms.MeasureCallback.create("default")) + [_progress_callback(say, trials)]
    t0 = time.perf_counter()
    try:
        ms.relax_integration.tune_relax(fused, None, target, str(db_dir), max_trials_global=trials,
                                        max_trials_per_task=max_trials_per_task,
                                        num_trials_per_iter=min(per_iter, trials), database=open_database(db_dir),
                                        measure_callbacks=callbacks, seed=seed, strategy=strategy,
                                        builder=ms.builder.LocalBuilder(timeout_sec=float(build_timeout_s),
                                                                        f_build=build_candidate))
    except Exception as e:
        raise BackendError(f"MetaSchedule tuning for {target.kind.name} failed ({type(e).__name__}); the database "
                           f"'{db_dir}' keeps every record measured so far: rerun to resume",
                           details=str(e)) from e
    after = len(open_database(db_dir))
    say(f"done in {time.perf_counter() - t0:.0f} s: {after} records in {db_dir}")
    return {"kernels": n_tasks, "trials": trials, "records_before": before, "records_after": after,
            "seconds": time.perf_counter() - t0, "database": str(db_dir), "cpus": os.cpu_count()}
