"""Public entry points: quantize, evaluate, benchmark.

quantize() runs the pipeline of DESIGN.md in one direction:
load -> prepare -> annotate(spec) -> calibrate -> round weights -> realize -> artifact check (+ timing)
and returns a Result holding the QDQ model, the QuantPlan and the report data.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from .backends.ort import OrtBackend
from .errors import BackendError, HagoError, InternalError, OptionError, RemoteError
from .ir import load_model
from .ir.io import write_all
from .pipeline import Pipeline
from .quant.options import QuantOptions
from .result import Result, check_outputs, finish, layer_rows  # noqa: F401 - public here (api.finish, api.Result)


def quantize(model, calibration, target: str | Mapping | Path = "x86_avx2", *, progress: bool = False,
             measure_latency: bool = True, search: bool = False, evaluate: Optional[Callable] = None,
             accuracy_budget: Optional[float] = None, latency_budget: Optional[float] = None,
             time_budget: Optional[float] = None, checkpoint=None, resume: bool = False,
             search_options: Optional[Mapping[str, Any]] = None, base_dir=None, rpc=None, **options) -> Result:
    """Quantize ``model`` for ``target``.

    model: path / ModelProto. calibration: .npz path, folder of .npy, dict of arrays or iterable of feed
    dicts (leading batch axis). target: built-in spec name, path to a spec JSON, or a dict.
    options: see QuantOptions (weight_bits, activation_bits, per_channel, clipping, rounding, layers, ...).
    search=True: per-layer configurations chosen by measured accuracy (``evaluate(model) -> float``, higher is
    better, or a calibration-set proxy) and measured latency, within ``accuracy_budget`` (max drop, in the
    metric's units), ``latency_budget`` (min speedup vs FP32) and ``time_budget`` (seconds); ``checkpoint``
    names the state file, ``resume=True`` continues it; ``search_options`` passes further settings to
    hago_py.search.run_search (latency source, roundings, proxy_samples, ...).
    base_dir: the folder holding the external-data files of an in-memory model (a path finds its own).
    rpc: measure the latency ON THE DEVICE over TVM RPC: ``{"tracker": "host:port", "key": "KEY"}``,
    ``{"host": ..., "port": ...}`` or ``"host:port:key"`` (hago_py/backends/tvm/rpc.py; optional "target": a TVM
    target dict or "host", default the spec's tvm_target; "cc": the cross compiler for a foreign target). The
    FP32 and quantized models are compiled here with TVM and timed interleaved on the remote
    (hago_py/backends/select.py); with search=True every trial is timed there too (hago_py/search/timer.py) while
    accuracy is measured here, and the report's ``latency.measured_on`` / ``search.latency_source.measured_on``
    name the device.
    """
    t0 = time.perf_counter()
    opts = QuantOptions.from_kwargs(**options)
    _check_call(search, search_options, measure_latency, progress, evaluate)
    # hybrid granularity and the non-uniform size budget judge their layers' sensitivity with evaluate too
    mixed = opts.nonuniform_size is not None
    own_eval = None if opts.granularity == "hybrid" or mixed else evaluate
    if mixed and (search or opts.granularity == "hybrid"):
        raise OptionError("option nonuniform_size chooses 3- / 4-bit layers without a search and cannot be combined "
                          f"with {'search=True' if search else 'granularity=hybrid'}; drop one of them")
    if not search and (any(x is not None for x in (own_eval, accuracy_budget, latency_budget, time_budget,
                                                     checkpoint, search_options)) or resume):
        raise OptionError("evaluate / accuracy_budget / latency_budget / time_budget / checkpoint / resume / "
                          "search_options only apply to a search: pass search=True")
    latency_backend = _remote_backend(rpc, target, opts.threads, measure_latency, search_options)
    try:
        with internal_errors("quantize"):
            pipe = Pipeline(model, calibration, target, opts, progress=progress, base_dir=base_dir)
            pipe.rpc = rpc   # where latency is measured (backends/select.backend_for(pipe.spec, pipe.rpc, ...))
            if search:
                from .search import run_search

                extra = dict(search_options or {})
                if latency_backend is not None:   # the one session to the device, for every trial
                    extra["latency_backend"] = latency_backend
                return run_search(pipe, evaluate=evaluate, accuracy_budget=accuracy_budget,
                                  latency_budget=latency_budget, time_budget=time_budget, checkpoint=checkpoint,
                                  resume=resume, measure_latency=measure_latency, **extra)
            if opts.granularity == "hybrid":  # per-layer granularity by sensitivity and latency gain (quant/hybrid.py)
                from .quant.hybrid import build_hybrid

                built = build_hybrid(pipe, evaluate=evaluate, measure_latency=measure_latency)
            elif mixed:  # 3- / 4-bit non-uniform layers under a size budget (quant/nu_mix.py)
                from .quant.nu_mix import build_mixed

                built = build_mixed(pipe, evaluate=evaluate)
            else:
                built = pipe.build()
            result = finish(pipe, built, measure_latency=measure_latency, backend=latency_backend)
    finally:
        if latency_backend is not None:
            latency_backend.close()
    result.report["timings_s"]["total"] = time.perf_counter() - t0
    return result


def _remote_backend(rpc, target, threads: int, measure_latency: bool, search_options):
    """quantize(rpc=...): the TVM RPC latency backend, its device reached now (before calibration); else None."""
    if rpc is None:
        return None
    if not measure_latency:
        raise OptionError("rpc= only measures latency on the device; drop measure_latency=False or rpc")
    if search_options and search_options.get("latency_backend") is not None:
        raise OptionError("rpc= and search_options['latency_backend'] both say where latency is measured; pass "
                          "one of them")
    from .backends.select import select_backend
    from .hw import load_spec

    backend = select_backend(load_spec(target), rpc=rpc, threads=threads).backend
    backend.remote_session()   # an unreachable device fails now, before calibration
    return backend


@contextlib.contextmanager
def internal_errors(stage: str):
    """Inside: a BackendError is about a model hago_py made (the user's model was checked to run on load), and
    any exception that is not a HagoError is a bug; both leave as one-line InternalErrors (CLI exit 1), with
    the traceback in ``details``. The fuzz harness counts every InternalError as a failure of hago_py."""
    import traceback

    try:
        yield
    except (InternalError, RemoteError, KeyboardInterrupt, MemoryError):   # RemoteError: the device setup, not a bug
        raise
    except BackendError as e:
        raise InternalError(f"a model made by hago_py failed in the backend during {stage} ({e}); this is a "
                            "bug in hago_py: please report it with the output of HAGO_DEBUG=1",
                            details=e.details) from e
    except HagoError:
        raise
    except RecursionError as e:
        raise InternalError(f"{stage} ran out of recursion depth (a very deep graph or input structure); please "
                            "report it", details=traceback.format_exc()) from e
    except Exception as e:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise InternalError(f"internal error during {stage}: {type(e).__name__}: {text}; this is a bug in "
                            "hago_py: please report it with the output of HAGO_DEBUG=1",
                            details=traceback.format_exc()) from e


def _check_call(search, search_options, measure_latency, progress, evaluate) -> None:
    """The call's own arguments (options have their Rule table): types, and search_options' keys."""
    from .quant.options import Rule, _show

    for name, v in (("search", search), ("measure_latency", measure_latency), ("progress", progress)):
        if not Rule(bool).accepts(v):
            raise OptionError(f"argument {name}={_show(v)} is invalid; use {Rule(bool).describe()}")
    if evaluate is not None and not callable(evaluate):
        raise OptionError(f"argument evaluate={evaluate!r} is invalid; pass a function model -> float")
    if search_options is None:
        return
    if not isinstance(search_options, Mapping):
        raise OptionError(f"argument search_options={search_options!r} is invalid; pass a dict of "
                          "hago_py.search.run_search settings")
    import inspect

    from .search import run_search

    own = {"evaluate", "accuracy_budget", "latency_budget", "time_budget", "checkpoint", "resume", "measure_latency"}
    valid = [p for p in inspect.signature(run_search).parameters if p not in own and p != "pipe"]
    unknown = sorted(set(search_options) - set(valid))
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], valid, 1)
        raise OptionError(f"unknown search_options key(s) {', '.join(map(str, unknown))}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; use one of: {', '.join(valid)}")


def evaluate(model, data: Iterable[Mapping[str, np.ndarray]], metric: Callable[[List[List[np.ndarray]]], float],
             *, threads: int = 1, optimization: str = "all") -> float:
    """Run ``model`` on ``data`` (iterable of feed dicts) with ORT and return ``metric(outputs)``."""
    outs = OrtBackend(threads=threads).predict(model if not isinstance(model, str) else load_model(model),
                                               data, optimization=optimization)
    return float(metric(outs))


def benchmark(models: Mapping[str, Any], feed: Mapping[str, np.ndarray], *, threads: int = 1,
              repeats: int = 50, warmup: int = 5) -> Dict[str, Any]:
    """Time models interleaved in one process; the first is the baseline. Returns medians, spreads, ratios."""
    return OrtBackend(threads=threads).time(dict(models), feed, repeats=repeats, warmup=warmup).to_dict()


def multipoint_front(model, calibration, target: str | Mapping | Path = "x86_avx2", *, budgets=None,
                     evaluate: Optional[Callable] = None, plot=None, progress: bool = False, base_dir=None,
                     **options) -> Dict[str, Any]:
    """The quality-vs-complexity front of multipoint quantization (quant/tradeoff.py): one plan per extra-MAC
    budget in ``budgets`` (default 0, 5, 10, 15, 30 %), scored by ``evaluate(model)`` (higher is better) or the
    calibration proxy. ``plot``: a .png path for the front. Returns {"points", "front", "metric", "models"}."""
    from .quant.tradeoff import DEFAULT_BUDGETS, front_png

    options.setdefault("weight_scheme", "multipoint")
    opts = QuantOptions.from_kwargs(**options)
    with internal_errors("multipoint_front"):
        pipe = Pipeline(model, calibration, target, opts, progress=progress, base_dir=base_dir)
        from .quant.tradeoff import multipoint_front as front

        res = front(pipe, budgets if budgets is not None else DEFAULT_BUDGETS, evaluate=evaluate, keep_models=True)
    if plot is not None:
        write_all({Path(plot): front_png(res, metric_label="evaluate(model)" if evaluate else
                                         "- output divergence from FP32 (proxy)")})
    return res
