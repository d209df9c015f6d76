"""The hardware-aware search driver: per-layer configurations chosen by measured accuracy and latency.

Cheap per-layer estimates, expensive end-to-end truth. The stages, each a module with explicit inputs and
outputs around one plain-data state (state.py) and one trial runner (trials.py) that holds the backend:

1. *Reference* (trials.py): the pipeline's plan for the user's options (every layer the spec allows, INT8),
   with the saturation remedy fixed per layer. FP32 and the reference are the first two end-to-end trials.
2. *Layer table* (layer_table.py): for each layer, every structural candidate of the space (FP32, other
   dtypes / granularities / activation modes) is built into the reference plan alone, scored by a fast proxy
   (output fidelity on a few calibration samples) and timed in place: the reference and the layer's
   candidates in one round-robin, so each candidate's latency change is a paired ratio against the
   reference (measured), or the cost model's figure (predicted). The most sensitive layers then get their
   accuracy-only variants (clipping method, saturation remedy, rounding) scored.
   *Boundaries* (pairs.py, boundaries.py): the edges where the int8 region can be left (layer to layer,
   model input / output); the most promising adjacent pairs are timed in float together, which fits the
   boundary cost per element, so the latency model lets adjacent float layers share a boundary (float islands).
3. *Strategies* (modes.py) over the estimates (errors additive, latency additive plus the boundary terms):
   the greedy path (HAGO-style, sensitivity per latency order), measured by bisection on the user's metric
   (or on the measured speed-up under a latency budget); the integer program (scipy milp) at the budgets
   around the boundary the bisection found; float islands at the model's I/O (islands.py); refinement by
   single-layer moves from the best plan (refinement.py) and a joint re-timing of the top candidates (retime.py).
4. *Choice* (report.py): the fastest plan within the accuracy budget (or the most accurate within the latency
   budget), re-timed end to end by hago_py.result.finish through the same backend; the Pareto front of every
   measured plan; the log; a SearchError naming the closest point when no quantized plan meets the budgets.

Where latency is measured (timer.py): models run for accuracy on the search's backend (ONNX Runtime) and are timed
on the latency backend hago_py.backends.select picks for the spec and ``pipe.rpc`` — ONNX Runtime here for the
x86 specs (the same sessions), TVM on this host, TVM over RPC on a device — or predicted by the cost model; the
report's ``latency_source.measured_on`` names it.

Every trial (configuration, metric, latency ratio, measured | predicted, seconds) is recorded in the log and
in the checkpoint, written atomically after each one; ``resume`` replays the recorded trials and continues.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import onnx

from ..backends.base import Backend
from ..backends.ort import OrtBackend
from ..errors import OptionError
from .islands import ISLAND_DEPTH, ISLAND_MARGIN, io_islands  # noqa: F401 - the search's constants, here too
from .layer_table import DOMINANT_SHARE, RACE_LAYERS, RACE_MIN_GAIN, SIGNIFICANCE  # noqa: F401
from .layer_table import context_pass, layer_table, make_table, variants
from .modes import accuracy_mode, latency_mode
from .pairs import PAIR_TRIALS, boundary_pass  # noqa: F401
from .report import finish
from .retime import retime
from .state import DEFAULT_TIMING, TABLE_SHARE, SearchState, _OutOfTime, _TrialLimit
from .timer import Timer, choose_timer
from .trials import PROMISING_MARGIN, Trials  # noqa: F401

DEFAULT_RELATIVE_BUDGET = 0.01   # no budget given: 1 % of the FP32 metric (proxy: fidelity 0.99, ~20 dB SQNR)
RESERVED_PLAN_TRIALS = 8         # end-to-end trials time_budget keeps room for after the layer table


def _check_settings(values: Mapping[str, Any]) -> None:
    """The search settings' types and ranges, by the same declarative rules as the quantization options."""
    from ..quant.options import Rule, _show

    rules = {"proxy_samples": Rule(int, 1), "sensitivity_samples": Rule(int, 1), "variant_layers": Rule(int, 0),
             "max_plan_trials": Rule(int, 1), "refine_moves": Rule(int, 0), "include_simulated": Rule(bool),
             "roundings": Rule("str_list", nullable=True), "clipping": Rule("str_list", nullable=True),
             "timing": Rule("dict", nullable=True), "resume": Rule(bool)}
    for name, v in values.items():
        if not rules[name].accepts(v):
            raise OptionError(f"search setting {name}={_show(v)} is invalid; use {rules[name].describe()}")
    for k, v in (values.get("timing") or {}).items():
        if k not in DEFAULT_TIMING:
            raise OptionError(f"search setting timing has unknown key {k!r}; valid: {', '.join(DEFAULT_TIMING)}")
        if not Rule(float, 0.0).accepts(v):
            raise OptionError(f"search setting timing[{k!r}]={_show(v)} is invalid; use a number >= 0")


class _Search:
    """The driver: one SearchState, one Trials runner (holding the backends), the stages in order."""

    def __init__(self, pipe, backend, timer: Timer, *, evaluate, accuracy_budget, latency_budget, time_budget,
                 checkpoint, resume, measure_latency, latency, roundings, clipping, proxy_samples, sensitivity_samples,
                 include_simulated, variant_layers, max_plan_trials, refine_moves, timing, peers, on_trial):
        self.state = SearchState(
            accuracy_budget=_budget(accuracy_budget, "accuracy_budget"),
            latency_budget=_budget(latency_budget, "latency_budget", positive=True),
            time_budget=_budget(time_budget, "time_budget", positive=True),
            max_plan_trials=int(max_plan_trials), refine_moves=int(refine_moves), variant_layers=int(variant_layers),
            timing=dict(DEFAULT_TIMING, **(timing or {})), peers=peers)
        if backend is None:
            backend = OrtBackend(threads=pipe.opts.threads)
        self.tr = Trials(pipe, self.state, backend, timer, evaluate=evaluate, checkpoint=checkpoint, resume=resume,
                         measure_latency=measure_latency, latency=latency, roundings=roundings, clipping=clipping,
                         proxy_samples=proxy_samples, sensitivity_samples=sensitivity_samples,
                         include_simulated=include_simulated, on_trial=on_trial)
        self.space = self.tr.space

    @property
    def edge_objs(self):
        return self.state.edge_objs

    def _io_islands(self):
        """islands.io_islands on ``self.edge_objs`` and ``self.space`` (a test calls it on a stand-in object)."""
        return io_islands(self.edge_objs, self.space.layers)

    def run(self):
        from tqdm import tqdm

        tr, st = self.tr, self.state
        n_groups = sum(1 for ls in tr.space.layers.values() if len(ls.structural()) > 1)
        total = 2 + n_groups + st.variant_layers + st.max_plan_trials
        tr.bar = tqdm(total=total, disable=not tr.progress, desc="search", unit="trial", leave=False)
        try:
            tr.log("space", f"search space from spec {tr.spec.name}: {len(tr.space.layers)} layers, "
                            f"{sum(len(ls.active()) for ls in tr.space.layers.values())} active candidates "
                            f"(~{tr.space.size():.3g} plans); latency {tr.lat.describe()}; metric "
                            f"{tr.user.describe() if tr.user else tr.proxy.describe()}")
            st.fp32_metric = tr.fp32_trial()["metric"]
            st.acc_b, st.budget_note = self._accuracy_budget()
            st.objective = "speed" if st.acc_b is not None else "metric"
            try:
                st.ref_point = tr.eval_plan(tr.ref_assign, "reference", "all layers at the reference config")
                if tr.opts.granularity == "hybrid":   # issue 14: the hybrid plan is one measured end-to-end point
                    from ..quant.hybrid import hybrid_assign

                    # hybrid's own latency gains are timed with ONNX Runtime: predicted where ORT does not time
                    ort_times = tr.lat_kind == "measured" and tr.timer is tr.backend
                    h_assign, st.hybrid_info = hybrid_assign(tr.pipe, tr.space, tr.ref_assign,
                                                             evaluate=tr.user.fn if tr.user else None,
                                                             measure_latency=ort_times)
                    tr.eval_plan(h_assign, "hybrid", f"hybrid granularity ({st.hybrid_info.get('per_tensor', 0)}"
                                                     " layers per-tensor, quant/hybrid.py)")
                self._plan_table_deadline()
                st.group_results, st.pruned_kinds = layer_table(tr)
                st.ctx_assign, st.ctx_results = context_pass(tr)
                st.variant_results = variants(tr)
                b = boundary_pass(tr)
                st.edges, st.edge_cost, st.edge_info, st.edge_objs = b.edges, b.cost, b.info, b.objs
                st.table, st.table_details = make_table(tr)
                for p in st.points.values():   # estimates for the points measured before the table existed
                    p["est_err"] = st.table.err(st.full[p["id"]])
                    p["est_speedup"] = st.table.speedup(st.full[p["id"]])
                try:
                    if st.objective == "speed":
                        accuracy_mode(tr)
                    else:
                        latency_mode(tr)
                except _TrialLimit:
                    tr.log("limit", f"max_plan_trials={st.max_plan_trials} reached: no more end-to-end trials")
                if tr.lat_kind == "measured":
                    retime(tr)
            except _OutOfTime:
                tr.log("time", f"time_budget {st.time_budget:g} s reached after {st.elapsed():.0f} s: "
                               "returning the best plan measured so far")
            if st.table is None and st.points:
                st.table, st.table_details = make_table(tr)
            return finish(tr)
        finally:
            tr.bar.close()
            tr.bar = None

    def _plan_table_deadline(self) -> None:
        """Split time_budget: the layer table stops early enough to leave time for RESERVED_PLAN_TRIALS
        end-to-end trials (each estimated by the reference's trial time), and at most TABLE_SHARE of it."""
        st = self.state
        if st.time_budget is None:
            return
        per_trial = float(st.ref_point.get("seconds") or 0.0)
        reserve = max((1.0 - TABLE_SHARE) * st.time_budget, RESERVED_PLAN_TRIALS * per_trial)
        st.table_deadline = st.t0 + max(0.0, st.time_budget - reserve)
        self.tr.log("time", f"time_budget {st.time_budget:g} s: layer table until {st.table_deadline - st.t0:.0f} s, "
                            f"then end-to-end trials (~{per_trial:.0f} s each)")

    def _accuracy_budget(self):
        st = self.state
        if st.accuracy_budget is not None:
            return st.accuracy_budget, "given"
        if st.latency_budget is not None:
            return None, "none (latency budget only: the most accurate plan at that speed)"
        if abs(st.fp32_metric) < 1e-9:
            raise OptionError(f"no accuracy_budget or latency_budget given and the FP32 score of {self.tr.metric_name} "
                              "is 0, so no default budget (1 % of it) exists: pass accuracy_budget (max drop, in the "
                              "metric's units) or latency_budget (min speed-up)")
        b = DEFAULT_RELATIVE_BUDGET * abs(st.fp32_metric)
        return b, f"default: {DEFAULT_RELATIVE_BUDGET:.0%} of the FP32 metric ({b:.4g})"


def _budget(v, name: str, positive: bool = False) -> Optional[float]:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{name}={v!r} must be a number") from e
    if not math.isfinite(f) or (positive and f <= 0):
        raise OptionError(f"{name}={v!r} must be a finite {'positive ' if positive else ''}number")
    return f


def run_search(pipe, *, evaluate: Optional[Callable[[onnx.ModelProto], float]] = None,
               accuracy_budget: Optional[float] = None, latency_budget: Optional[float] = None,
               time_budget: Optional[float] = None, checkpoint=None, resume: bool = False,
               measure_latency: bool = True, latency=None, roundings: Optional[Sequence[str]] = None,
               clipping: Optional[Sequence[str]] = None, proxy_samples: int = 64, sensitivity_samples: int = 16,
               include_simulated: bool = False, variant_layers: int = 12, max_plan_trials: int = 24,
               refine_moves: int = 3, timing: Optional[Mapping[str, float]] = None, peers=None,
               on_trial: Optional[Callable[[Dict[str, Any]], None]] = None, backend: Optional[Backend] = None,
               latency_backend: Optional[Backend] = None):
    """Search per-layer configurations for ``pipe`` (a hago_py.pipeline.Pipeline); returns an api.Result.

    evaluate: ``evaluate(model: onnx.ModelProto) -> float``, higher is better (the user's validation loop);
        None: the calibration-set proxy (output fidelity vs FP32), named as a proxy in the report.
    accuracy_budget: max drop of that metric vs FP32, in its units. latency_budget: min speed-up vs FP32
        (1.5 = at least 1.5x faster). Neither: a default accuracy budget of 1 % of the FP32 metric.
    time_budget: seconds of wall clock; the best plan measured so far is returned when it runs out.
    checkpoint: JSON state file, written after every trial; resume=True continues it.
    latency: 'auto' (measured when measure_latency and the latency backend can measure the target: ONNX Runtime
        when the target is this machine, TVM here or over ``pipe.rpc``; else predicted by the spec's cost model),
        'measured', 'predicted', or fn(model, plan) -> seconds.
    roundings / clipping: weight rounding schemes and output-range methods to search (default: the user's
        rounding only; all four calibration methods).
    peers: a list of {"name", "speedup", "drop"} dicts or a benchmarks/results/*.json path, for the report.
    on_trial: called with each new trial record (progress hooks, tests).
    backend: what compiles and runs every model of the search for accuracy, and times them where the spec's
        runtime is ONNX Runtime on this machine, the chosen plan's final latency included
        (hago_py.backends.base.Backend; the search also passes time(..., min_time_s=) and compile(...,
        optimization=) as OrtBackend takes them); default OrtBackend(threads=pipe.opts.threads).
    latency_backend: what times every model instead (compile + time of the Backend protocol, e.g. a TvmBackend
        with rpc=); default: hago_py.backends.select's choice for the spec and ``pipe.rpc`` (timer.py), closed
        when the search ends (a given one is the caller's to close).
    Raises SearchError (with ``.closest``) when no quantized plan meets the budgets.
    """
    _check_settings(dict(proxy_samples=proxy_samples, sensitivity_samples=sensitivity_samples,
                         variant_layers=variant_layers, max_plan_trials=max_plan_trials, refine_moves=refine_moves,
                         include_simulated=include_simulated, roundings=roundings, clipping=clipping,
                         timing=timing, resume=resume))
    timer = choose_timer(pipe, latency_backend)
    try:
        return _Search(pipe, backend, timer, evaluate=evaluate, accuracy_budget=accuracy_budget,
                       latency_budget=latency_budget, time_budget=time_budget, checkpoint=checkpoint, resume=resume,
                       measure_latency=measure_latency, latency=latency, roundings=roundings, clipping=clipping,
                       proxy_samples=proxy_samples, sensitivity_samples=sensitivity_samples,
                       include_simulated=include_simulated, variant_layers=variant_layers,
                       max_plan_trials=max_plan_trials, refine_moves=refine_moves, timing=timing, peers=peers,
                       on_trial=on_trial).run()
    finally:
        timer.close()
