"""The hardware-aware search driver: per-layer configurations chosen by measured accuracy and latency.

Cheap per-layer estimates, expensive end-to-end truth:

1. *Reference*: the pipeline's plan for the user's options (every layer the spec allows, INT8), with the
   saturation remedy fixed per layer. FP32 and the reference are the first two end-to-end trials.
2. *Layer table*: for each layer, every structural candidate of the space (FP32, other dtypes /
   granularities / activation modes) is built into the reference plan alone, scored by a fast proxy
   (output fidelity on a few calibration samples) and timed in place: the reference and the layer's
   candidates in one round-robin, so each candidate's latency change is a paired ratio against the
   reference (measured), or the cost model's figure (predicted). The most sensitive layers then get their
   accuracy-only variants (clipping method, saturation remedy, rounding) scored.
   *Boundaries* (boundaries.py): the edges where the int8 region can be left (layer to layer, model input /
   output); the most promising adjacent pairs are timed in float together, which fits the boundary cost
   per element, so the latency model lets adjacent float layers share a boundary (float islands).
3. *Strategies* over the estimates (errors additive, latency additive plus the boundary terms): the greedy path (HAGO-style, sensitivity per latency order),
   measured by bisection on the user's metric (or on the measured speed-up under a latency budget); the
   integer program (scipy milp) at the budgets around the boundary the bisection found; refinement by
   single-layer moves from the best plan and a joint re-timing of the top candidates.
4. *Choice*: the fastest plan within the accuracy budget (or the most accurate within the latency budget),
   re-timed end to end by api.finish; the Pareto front of every measured plan; the log; a SearchError
   naming the closest point when no quantized plan meets the budgets.

Every trial (configuration, metric, latency ratio, measured | predicted, seconds) is recorded in the log and
in the checkpoint, written atomically after each one; ``resume`` replays the recorded trials and continues.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..backends.ort import OrtBackend
from ..errors import HagoError, OptionError
from ..quant.plan import QuantPlan
from .checkpoint import CHECKPOINT_VERSION, Checkpoint, stable_hash
from .boundaries import fit_cost, layer_edges
from .evaluators import (FidelityProxy, FunctionLatency, MeasuredLatency, PredictedLatency, UserMetric,
                         _run_shapes, ratio_stats, target_reachable)
from .pareto import budget_error, choose, feasible, pareto_front
from .space import FP32, SearchSpace, build_space, diff_assign
from .strategies import Table, accurate_moves, faster_moves, greedy_path, milp_solve, top_candidates

DEFAULT_RELATIVE_BUDGET = 0.01   # no budget given: 1 % of the FP32 metric (proxy: fidelity 0.99, ~20 dB SQNR)
RACE_LAYERS = 6                  # candidate kinds that never help on this many layers of an op are pruned
RACE_MIN_GAIN = 0.002            # "faster" means saving more than 0.2 % of the FP32 latency
PROMISING_MARGIN = 0.97          # a candidate plan is measured if its estimate is within 3 % of the best
DOMINANT_SHARE = 0.4             # layers carrying >= 40 % of the reference's error set the accuracy context
SIGNIFICANCE = 2.0               # paired proxy changes within 2 standard errors are treated as noise
ISLAND_DEPTH = 3                 # float islands at the model's inputs / outputs: up to this many layers deep
ISLAND_MARGIN = 0.9              # ... measured unless estimated > 10 % slower than the best plan (estimates are noisy)
PAIR_TRIALS = 4                  # adjacent layer pairs timed in float together to fit the boundary cost
RESERVED_PLAN_TRIALS = 8         # end-to-end trials time_budget keeps room for after the layer table
TABLE_SHARE = 0.6                # share of time_budget the layer table may use before strategies start
# speed_tie: speed-ups within this relative margin of the fastest feasible plan count as equal, and the most
# accurate of them is chosen (two ORT sessions of one identical model time up to ~4 % apart on a shared VM)
DEFAULT_TIMING = {"plan_repeats": 30, "plan_min_time_s": 1.5, "layer_repeats": 15, "layer_min_time_s": 0.4,
                  "retime_min_time_s": 3.0, "speed_tie": 0.02}


class _OutOfTime(Exception):
    pass


class _TableTime(_OutOfTime):
    """The layer table's share of time_budget is spent: the strategies go on with a partial table."""


class _TrialLimit(Exception):
    pass


def _digest_batches(batches) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            a = np.ascontiguousarray(b[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:20]


def _roundtrip(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The record exactly as a resumed run will read it back (same key order, same float values)."""
    from .checkpoint import _clean

    return json.loads(json.dumps(_clean(rec), sort_keys=True, allow_nan=False))


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
    def __init__(self, pipe, *, evaluate, accuracy_budget, latency_budget, time_budget, checkpoint, resume,
                 measure_latency, latency, roundings, clipping, proxy_samples, sensitivity_samples,
                 include_simulated, variant_layers, max_plan_trials, refine_moves, timing, peers, on_trial):
        self.t0 = time.perf_counter()
        self.pipe, self.opts, self.spec = pipe, pipe.opts, pipe.spec
        self.accuracy_budget, self.latency_budget = _budget(accuracy_budget, "accuracy_budget"), \
            _budget(latency_budget, "latency_budget", positive=True)
        self.time_budget = _budget(time_budget, "time_budget", positive=True)
        self.deadline = None if self.time_budget is None else self.t0 + self.time_budget
        self.table_deadline = None if self.time_budget is None else self.t0 + TABLE_SHARE * self.time_budget
        self.max_plan_trials = int(max_plan_trials)
        self.refine_moves = int(refine_moves)
        self.variant_layers = int(variant_layers)
        self.on_trial = on_trial
        self.peers = peers
        self.timing = dict(DEFAULT_TIMING, **(timing or {}))
        self.progress = bool(pipe.progress)
        self.log_lines: List[Dict[str, Any]] = []
        self.n_new = self.n_replayed = 0
        self.n_plan_trials = 0
        self.stopped_early = False
        self.points: Dict[str, Dict[str, Any]] = {}
        self._bar = None
        self.backend = OrtBackend(threads=self.opts.threads)

        # reference plan (automatic remedy choice runs once here), space, explicit reference configuration
        ref0 = pipe.build(sanity=False)  # the search decides per layer itself
        self.space: SearchSpace = build_space(pipe, ref0.plan, roundings=roundings, clipping=clipping,
                                              include_simulated=include_simulated)
        self.ref_assign = self.space.ref_assign()
        self.remedy_info = ref0.info.get("remedy", {})

        # data: proxy set (end-to-end proxy metric) and the smaller sensitivity set (layer table)
        self.proxy_batches = pipe.first_batches(int(proxy_samples), exact=True)
        self.sens_batches = pipe.first_batches(int(min(sensitivity_samples, proxy_samples)), exact=True)
        self.feed = pipe.timing_feed()
        self.fp_session = self.backend.compile(pipe.reference)
        self.sens_proxy = FidelityProxy(self.backend, self.fp_session, self.sens_batches)
        self.proxy = FidelityProxy(self.backend, self.fp_session, self.proxy_batches)
        self._sens_energy = self.proxy.ref_energy(self.sens_proxy.samples)
        self.user = UserMetric(evaluate) if evaluate is not None else None
        self.metric_kind = "user" if self.user else "proxy"
        self.metric_name = self.user.name if self.user else "proxy fidelity"

        # latency source
        self.reachable, self.reach_why = target_reachable(self.spec)
        if latency is None or latency == "auto":
            latency = "measured" if (measure_latency and self.reachable) else "predicted"
        if latency == "measured":
            t = self.timing
            self.lat = MeasuredLatency(self.backend, self.feed, plan_repeats=t["plan_repeats"],
                                       plan_min_time_s=t["plan_min_time_s"], layer_repeats=t["layer_repeats"],
                                       layer_min_time_s=t["layer_min_time_s"])
        elif latency == "predicted":
            self.lat = PredictedLatency(self.spec, pipe.prepared, self.feed, self.backend)
        elif callable(latency):
            self.lat = FunctionLatency(latency)
        else:
            raise OptionError(f"latency={latency!r} is invalid; use 'auto', 'measured', 'predicted' or a callable "
                              "fn(model, plan) -> seconds")
        self.lat_kind = self.lat.kind
        if self.lat_kind == "predicted":
            self._fp32_s = self.lat.seconds(None, pipe.proto)
        # cost-model prior for the measured layer table (noisy small effects are shrunk towards it)
        self.prior = None
        if self.lat_kind == "measured":
            self.prior = PredictedLatency(self.spec, pipe.prepared, self.feed, self.backend)
            self._prior_fp32_s = self.prior.seconds(None)

        identity = {
            "version": CHECKPOINT_VERSION, "model": pipe.digest, "target": self.spec.name,
            "spec": stable_hash(self.spec.to_dict()), "options": self.opts.to_dict(),
            "calibration": _digest_batches(self.proxy_batches),
            "metric": self.metric_name if self.user else "proxy",
            "latency": self.lat.describe(),
            "space": stable_hash(self.space.describe()),
            "settings": {"proxy_samples": int(proxy_samples), "sensitivity_samples": int(sensitivity_samples),
                         "variant_layers": self.variant_layers, "timing": self.timing},
        }
        self.ckpt = Checkpoint(checkpoint, identity, resume=resume)
        if self.ckpt.resumed:
            self.log("resume", f"resuming from {checkpoint}: {self.ckpt.resumed} recorded trials will be replayed")

    # ------------------------------------------------------------------------------------------ plumbing
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, stage: str, msg: str) -> None:
        self.log_lines.append({"t": round(self.elapsed(), 2), "stage": stage, "msg": msg})
        if self.progress:
            line = f"[hago search] {msg}"
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def _out_of_time(self, table: bool = False) -> bool:
        d = self.table_deadline if table else self.deadline
        return d is not None and time.perf_counter() > d

    def trial(self, kind: str, payload: Dict[str, Any], fn: Callable[[], Dict[str, Any]], *, stage: str,
              table: bool = False) -> Dict[str, Any]:
        key = stable_hash({"kind": kind, **payload})
        rec = self.ckpt.get(key)
        if rec is not None:
            self.n_replayed += 1
            self._tick(stage)
            return rec
        if stage != "reference" and self._out_of_time():   # FP32 and the reference always run
            self.stopped_early = True
            raise _OutOfTime()
        if table and self._out_of_time(table=True):
            self.stopped_early = True
            raise _TableTime()
        t = time.perf_counter()
        rec = fn()
        rec = _roundtrip(dict(rec, kind=kind, stage=stage, seconds=round(time.perf_counter() - t, 4),
                              index=len(self.ckpt.order)))
        self.ckpt.add(key, rec)
        rec = _roundtrip(self.ckpt.get(key))       # exactly what a resumed run reads back
        self.n_new += 1
        self._tick(stage)
        if self.on_trial is not None:
            self.on_trial(rec)
        return rec

    def _tick(self, stage: str) -> None:
        if self._bar is not None:
            self._bar.set_description(f"search: {stage}")
            self._bar.update(1)

    def build(self, assign: Mapping[str, str]):
        return self.pipe.build(self.space.config(assign), sanity=False)

    def session(self, model: onnx.ModelProto):
        return self.backend.compile(model)

    def point_key(self, assign: Mapping[str, str]) -> str:
        return stable_hash({n: assign.get(n, k) for n, k in self.ref_assign.items()})

    # ------------------------------------------------------------------------------------------ trials
    def _plan_latency(self, built, sess) -> Dict[str, Any]:
        if self.lat_kind == "measured":
            r = self.lat.compare({"fp32": self.fp_session, "plan": sess})
            p = r["plan"]
            return {"speedup": p["ratio"], "se": p["se"], "paired_median": p["paired_median"], "p10": p["p10"],
                    "p90": p["p90"], "ms": p["median_ms"], "fp32_ms": r["fp32"]["median_ms"], "repeats": p["repeats"]}
        s = self.lat.seconds(built.plan, built.model)
        return {"speedup": self._fp32_s / s, "ms": s * 1e3, "fp32_ms": self._fp32_s * 1e3}

    def fp32_trial(self) -> Dict[str, Any]:
        def run():
            m = self.user.score(self.pipe.reference) if self.user else 1.0
            return {"metric": m, "speedup": 1.0, "latency": self.lat_kind}

        return self.trial("fp32", {}, run, stage="reference")

    def eval_plan(self, assign: Mapping[str, str], stage: str, note: str = "") -> Dict[str, Any]:
        full = {n: assign.get(n, k) for n, k in self.ref_assign.items()}
        pkey = self.point_key(full)
        if pkey in self.points:
            return self.points[pkey]
        if self.n_plan_trials >= self.max_plan_trials and stage != "reference":
            raise _TrialLimit()

        def run():
            built = self.build(full)
            sess = self.session(built.model)
            raw = self.proxy.raw_errors(sess)         # the sensitivity samples are a prefix of the proxy's
            prox = self.proxy.details(sess, raw)
            n_s = self.sens_proxy.samples
            sens = {"nmse": float(raw[0][:n_s].sum() / max(self._sens_energy, 1e-30))}
            metric = self.user.score(built.model) if self.user else prox["fidelity"]
            lat = self._plan_latency(built, sess)
            return {"assign": diff_assign(full, self.space), "metric": metric, "speedup": lat["speedup"],
                    "latency": self.lat_kind, "timing": lat, "proxy": prox, "sens_nmse": sens["nmse"],
                    "n_quantized": len(built.plan.quantized_layers())}

        rec = self.trial("plan", {"assign": full}, run, stage=stage)
        self.n_plan_trials += 1
        p = self._point(rec, full, stage, note)
        fe = "feasible" if self._feasible(p) else "infeasible" if p["quantized"] else "no layer quantized"
        self.log(stage, f"plan {pkey[:8]} ({note or stage}): {self.metric_name} {p['metric']:.6g} "
                        f"(drop {p['drop']:+.4g}), {p['speedup']:.3f}x {p['latency']}, {p['n_fp32']} FP32 layers, {fe}")
        return p

    def _point(self, rec, full, stage, note) -> Dict[str, Any]:
        pkey = self.point_key(full)
        n_fp32 = sum(1 for n, k in full.items() if k == FP32)
        p = {"id": pkey, "stage": stage, "note": note, "metric": rec["metric"], "drop": self.fp32_metric - rec["metric"],
             "speedup": rec["speedup"], "latency": rec["latency"], "metric_kind": self.metric_kind,
             "fp32_metric": self.fp32_metric, "assign": diff_assign(full, self.space),
             "plan": self.space.config(full), "n_fp32": n_fp32, "n_layers": len(full),
             "quantized": rec.get("n_quantized", 1) > 0, "seconds": rec.get("seconds"),
             "proxy_fidelity": (rec.get("proxy") or {}).get("fidelity"), "sens_nmse": rec.get("sens_nmse")}
        if getattr(self, "table", None) is not None:
            p["est_err"] = self.table.err(full)
            p["est_speedup"] = self.table.speedup(full)
        self.points[pkey] = p
        self._full[pkey] = full
        return p

    # ------------------------------------------------------------------------------------------ stages
    def run(self):
        from tqdm import tqdm

        n_groups = sum(1 for ls in self.space.layers.values() if len(ls.structural()) > 1)
        total = 2 + n_groups + self.variant_layers + self.max_plan_trials
        self._bar = tqdm(total=total, disable=not self.progress, desc="search", unit="trial", leave=False)
        self._full: Dict[str, Dict[str, str]] = {}
        self.table: Optional[Table] = None
        try:
            self.log("space", f"search space from spec {self.spec.name}: {len(self.space.layers)} layers, "
                              f"{sum(len(ls.active()) for ls in self.space.layers.values())} active candidates "
                              f"(~{self.space.size():.3g} plans); latency {self.lat.describe()}; metric "
                              f"{self.user.describe() if self.user else self.proxy.describe()}")
            fp = self.fp32_trial()
            self.fp32_metric = fp["metric"]
            self.acc_b, self.budget_note = self._accuracy_budget()
            self.objective = "speed" if self.acc_b is not None else "metric"
            try:
                self.ref_point = self.eval_plan(self.ref_assign, "reference", "all layers at the reference config")
                if self.opts.granularity == "hybrid":   # issue 14: the hybrid plan is one measured end-to-end point
                    from ..quant.hybrid import hybrid_assign

                    h_assign, self.hybrid_info = hybrid_assign(self.pipe, self.space, self.ref_assign,
                                                               evaluate=self.user.fn if self.user else None,
                                                               measure_latency=self.lat_kind == "measured")
                    self.eval_plan(h_assign, "hybrid", f"hybrid granularity ({self.hybrid_info.get('per_tensor', 0)}"
                                                       " layers per-tensor, quant/hybrid.py)")
                self._plan_table_deadline()
                self.layer_table()
                self.context_pass()
                self.variants()
                self.boundary_pass()
                self.table = self.make_table()
                for p in self.points.values():   # estimates for the points measured before the table existed
                    p["est_err"] = self.table.err(self._full[p["id"]])
                    p["est_speedup"] = self.table.speedup(self._full[p["id"]])
                try:
                    if self.objective == "speed":
                        self.accuracy_mode()
                    else:
                        self.latency_mode()
                except _TrialLimit:
                    self.log("limit", f"max_plan_trials={self.max_plan_trials} reached: no more end-to-end trials")
                if self.lat_kind == "measured":
                    self.retime()
            except _OutOfTime:
                self.log("time", f"time_budget {self.time_budget:g} s reached after {self.elapsed():.0f} s: "
                                 "returning the best plan measured so far")
            if self.table is None and self.points:
                self.table = self.make_table()
            return self.finish()
        finally:
            self._bar.close()
            self._bar = None

    def _plan_table_deadline(self) -> None:
        """Split time_budget: the layer table stops early enough to leave time for RESERVED_PLAN_TRIALS
        end-to-end trials (each estimated by the reference's trial time), and at most TABLE_SHARE of it."""
        if self.time_budget is None:
            return
        per_trial = float(self.ref_point.get("seconds") or 0.0)
        reserve = max((1.0 - TABLE_SHARE) * self.time_budget, RESERVED_PLAN_TRIALS * per_trial)
        self.table_deadline = self.t0 + max(0.0, self.time_budget - reserve)
        self.log("time", f"time_budget {self.time_budget:g} s: layer table until {self.table_deadline - self.t0:.0f} s, "
                         f"then end-to-end trials (~{per_trial:.0f} s each)")

    def _accuracy_budget(self):
        if self.accuracy_budget is not None:
            return self.accuracy_budget, "given"
        if self.latency_budget is not None:
            return None, "none (latency budget only: the most accurate plan at that speed)"
        if abs(self.fp32_metric) < 1e-9:
            raise OptionError(f"no accuracy_budget or latency_budget given and the FP32 score of {self.metric_name} is "
                              "0, so no default budget (1 % of it) exists: pass accuracy_budget (max drop, in the "
                              "metric's units) or latency_budget (min speed-up)")
        b = DEFAULT_RELATIVE_BUDGET * abs(self.fp32_metric)
        return b, f"default: {DEFAULT_RELATIVE_BUDGET:.0%} of the FP32 metric ({b:.4g})"

    def layer_table(self) -> None:
        ref_cfg = self.space.config(self.ref_assign)
        self.group_results: Dict[str, Dict[str, Any]] = {}
        groups = [(n, ls) for n, ls in self.space.layers.items() if len(ls.structural()) > 1]
        self.log("table", f"layer table: {len(groups)} layers, "
                          f"{sum(len(ls.structural()) - 1 for _, ls in groups)} structural candidates, each built "
                          "into the reference plan alone, proxy-scored and timed in place against the reference")
        self.pruned_kinds: Dict[Tuple[str, str], str] = {}
        stats: Dict[Tuple[str, str], List[int]] = {}      # (op, key) -> [layers measured, layers where it helped]
        for node, ls in groups:
            cands = {k: c.config for k, c in ls.structural().items()
                     if k != ls.ref and (ls.op, k) not in self.pruned_kinds}
            payload = {"node": node, "cands": cands, "ref": stable_hash(ref_cfg)}

            def run(node=node, cands=cands):
                if getattr(self, "_ref_sess", None) is None:
                    self._prime_structural(groups)
                sessions, res = {"ref": self._ref_session()}, {}
                for key in cands:
                    try:
                        built = self.build(dict(self.ref_assign, **{node: key}))
                        sess = self.session(built.model)
                    except (HagoError, NotImplementedError, ValueError, RuntimeError) as e:
                        res[key] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                        continue
                    res[key] = dict(self.sens_proxy.paired(sess, self._ref_errors()),
                                    n_quantized=len(built.plan.quantized_layers()))
                    if self.lat_kind == "measured":
                        sessions[key] = sess
                        res[key]["prior_s"] = self.prior.seconds(built.plan)
                    else:
                        s = self.lat.seconds(built.plan, built.model)
                        res[key].update(seconds=s, dlat=(s - self._ref_seconds()) / self._fp32_s)
                if self.lat_kind == "measured" and len(sessions) > 1:
                    r = self.lat.compare(sessions, layer=True)
                    for key in sessions:
                        if key != "ref":
                            res[key].update(ratio=r[key]["ratio"], se=r[key]["se"],
                                            paired_median=r[key]["paired_median"], ms=r[key]["low_ms"])
                    res["_ref"] = {"ms": r["ref"]["low_ms"], "repeats": r["ref"]["repeats"]}
                return {"node": node, "results": res, "latency": self.lat_kind}

            try:
                rec = self.trial("layer", payload, run, stage="layer table", table=True)
            except _TableTime:
                self.log("table", f"layer table stopped after {len(self.group_results)} of {len(groups)} layers: "
                                  "its share of time_budget is spent (the rest is kept for end-to-end trials); the "
                                  "other layers stay at the reference configuration")
                return
            self.group_results[node] = rec["results"]
            self._race(ls, rec["results"], stats)
        self.log("table", "layer table complete")

    def _ref_session(self):
        if getattr(self, "_ref_sess", None) is None:
            self._ref_sess = self.session(self.build(self.ref_assign).model)
        return self._ref_sess

    def _race(self, ls, results: Mapping[str, Any], stats: Dict[Tuple[str, str], List[int]]) -> None:
        """Adaptive pruning: a candidate kind (e.g. uint8 per-channel Conv) that after RACE_LAYERS layers of an
        op type was never faster nor more accurate than the reference configuration is not measured on the
        remaining layers of that op type (deterministic given the recorded trials, so resume agrees)."""
        ref_lat = 1.0 / max(self.ref_point["speedup"], 1e-9)
        for key, r in results.items():
            if key.startswith("_") or key == FP32 or "failed" in r:
                continue
            st = stats.setdefault((ls.op, key), [0, 0])
            st[0] += 1
            faster = ("ratio" in r and self._blend(r, ref_lat) < -RACE_MIN_GAIN) or r.get("dlat", 0.0) < -RACE_MIN_GAIN
            se = r.get("dnmse_se")
            better = isinstance(se, float) and math.isfinite(se) and r.get("dnmse", 0.0) < -SIGNIFICANCE * se
            st[1] += int(bool(faster or better))
            if st[0] >= RACE_LAYERS and st[1] == 0 and (ls.op, key) not in self.pruned_kinds:
                why = (f"{key} on {ls.op}: neither faster nor more accurate than the reference on the first "
                       f"{st[0]} layers; not measured on the others")
                self.pruned_kinds[(ls.op, key)] = why
                self.log("table", "pruned " + why)

    def _ref_errors(self) -> np.ndarray:
        return self._ctx_errors(self.ref_assign)

    def _dominant(self) -> List[str]:
        return [n for n, k in getattr(self, "ctx_assign", self.ref_assign).items() if k != self.ref_assign[n]]

    def _acc_results(self, node: str) -> Dict[str, Any]:
        """Accuracy results of a layer's structural candidates: measured in the context (see context_pass)
        when the layer was re-measured there, else in the reference."""
        return getattr(self, "ctx_results", {}).get(node) or self.group_results.get(node, {})

    def _sensitivity(self) -> Dict[str, float]:
        """Error each layer's reference configuration contributes: the paired proxy change when the layer
        alone goes back to FP32 (all the others as in the reference / the context)."""
        out = {}
        for node in self.group_results:
            fp = self._acc_results(node).get(FP32, {})
            if "dnmse" in fp:
                out[node] = max(0.0, -fp["dnmse"])
        return out

    def context_pass(self) -> None:
        """When a few layers dominate the reference's error, the other layers' small effects drown in it
        (their paired changes are mostly cross terms with the dominant error). Re-measure the accuracy of the
        other layers' candidates with the dominant layers restored to FP32 — the context every plan within
        a tight budget will have. Latency stays from the reference's in-place timing."""
        self.ctx_assign, self.ctx_results = dict(self.ref_assign), {}
        sens = self._sensitivity()
        # shares of the reference's measured error (the per-layer sums can fall short of it: interactions)
        total = max(sum(sens.values()), self.ref_point.get("sens_nmse") or 0.0)
        if total <= 0:
            return
        dominant = [n for n in sorted(sens, key=lambda n: -sens[n]) if sens[n] >= DOMINANT_SHARE * total]
        dominant = [n for n in dominant if FP32 in self.space.layers[n].active()]
        if not dominant or len(dominant) == len(sens):
            return
        self.ctx_assign = dict(self.ref_assign, **{n: FP32 for n in dominant})
        self.log("context", f"{', '.join(dominant)} carr{'y' if len(dominant) > 1 else 'ies'} "
                            f"{100 * sum(sens[n] for n in dominant) / total:.0f} % of the reference's error: the "
                            "other layers' accuracy is re-measured with them in FP32")
        ctx_hash = stable_hash(self.space.config(self.ctx_assign))
        for node in self.group_results:
            if node in dominant:
                continue
            ls = self.space.layers[node]
            cands = {k: c.config for k, c in ls.structural().items() if k != ls.ref}
            payload = {"node": node, "cands": cands, "ctx": ctx_hash}

            def run(node=node, cands=cands):
                return {"node": node, "results": self._paired_group(node, cands, self.ctx_assign)}

            try:
                rec = self.trial("layer-context", payload, run, stage="layer table", table=True)
            except _TableTime:
                return
            self.ctx_results[node] = rec["results"]

    def _paired_group(self, node: str, cands: Mapping[str, Any], ctx: Mapping[str, str]) -> Dict[str, Any]:
        res = {}
        for key in cands:
            try:
                sess = self.session(self.build(dict(ctx, **{node: key})).model)
            except (HagoError, NotImplementedError, ValueError, RuntimeError) as e:
                res[key] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                continue
            res[key] = self.sens_proxy.paired(sess, self._ctx_errors(ctx))
        return res

    def _ctx_errors(self, ctx: Mapping[str, str]) -> np.ndarray:
        k = self.point_key(ctx)
        cache = self.__dict__.setdefault("_ctx_err_cache", {})
        if k not in cache:
            cache[k] = self.sens_proxy.errors(self.session(self.build(ctx).model))[0]
        return cache[k]

    def variants(self) -> None:
        sens = self._sensitivity()
        total = sum(sens.values())
        chosen = [n for n in sorted(sens, key=lambda n: -sens[n]) if sens[n] > 0][: self.variant_layers]
        chosen = [n for n in chosen if any(not c.structural for c in self.space.layers[n].active().values())]
        self.variant_results: Dict[str, Dict[str, Any]] = {}
        if not chosen:
            return
        self.log("variants", f"accuracy-only variants (clipping / remedy / rounding) for the {len(chosen)} most "
                             f"sensitive layers ({100 * sum(sens[n] for n in chosen) / max(total, 1e-30):.0f} % of "
                             "the estimated error)")
        primed = False
        for node in chosen:
            ls = self.space.layers[node]
            cands = {k: c.config for k, c in ls.active().items() if not c.structural}
            ctx = self.ctx_assign if node not in self._dominant() else self.ref_assign
            payload = {"node": node, "variants": cands, "ref": stable_hash(self.space.config(ctx))}

            def run(node=node, cands=cands, ctx=ctx):
                nonlocal primed
                if not primed:
                    self._prime_observers(chosen)
                    primed = True
                return {"node": node, "results": self._paired_group(node, cands, ctx)}

            try:
                rec = self.trial("variants", payload, run, stage="variants", table=True)
            except _TableTime:
                return
            self.variant_results[node] = rec["results"]

    def _prime_structural(self, groups) -> None:
        """Calibrate, in one pass per candidate kind, every activation range the layer table's candidates
        need (e.g. static ranges for layers the reference runs with dynamic activations), instead of one
        calibration pass per candidate build."""
        kinds = sorted({k for _, ls in groups for k in ls.structural() if k not in (ls.ref, FP32)})
        for kind in kinds:
            layers = self.space.config(self.ref_assign)
            for n, ls in groups:
                if kind in ls.structural():
                    layers[n] = dict(ls.candidates[kind].config)
            try:
                opts = self.pipe.options(layers)
                self.pipe.calibrate(self.pipe.annotate(opts), opts)
            except (HagoError, ValueError, RuntimeError):
                continue    # the candidates' own builds will report the problem

    def _prime_observers(self, nodes: Sequence[str]) -> None:
        """Calibrate every clipping method the variants need in one pass per method (not one per layer)."""
        methods = sorted({c.config["clipping"] for n in nodes for c in self.space.layers[n].active().values()
                          if "clipping" in c.config})
        for m in methods:
            layers = self.space.config(self.ref_assign)
            for n in nodes:
                if any(c.config.get("clipping") == m for c in self.space.layers[n].active().values()):
                    layers[n] = dict(layers[n], clipping=m)
            opts = self.pipe.options(layers)
            self.pipe.calibrate(self.pipe.annotate(opts), opts)

    def _edge_prior(self) -> float:
        """Cost model's boundary cost per element, as a fraction of the FP32 latency: a QuantizeLinear and a
        DequantizeLinear (float read + int8 write, int8 read + float write), scaled in measured mode by how
        far the measured reference speed-up is from the predicted one."""
        cm = getattr(self.spec, "cost_model", None)
        if cm is None:
            return 0.0
        per_elem_s = 10.0 / cm.memory_bandwidth_bytes_per_s
        if self.prior is None:
            return per_elem_s / self._fp32_s
        gain_pred = 1.0 - self._prior_ref_s() / self._prior_fp32_s
        ref_lat = 1.0 / max(self.ref_point["speedup"], 1e-9)
        k = min(2.0, max(0.1, (1.0 - ref_lat) / gain_pred)) if gain_pred > 1e-6 and ref_lat < 1 else 1.0
        return k * per_elem_s / self._prior_fp32_s

    def _shapes(self) -> Dict[str, List[int]]:
        """Tensor shapes of the prepared model at the timing feed: the cost models ran it already, else once."""
        if not hasattr(self, "_shapes_cache"):
            src = self.prior if self.prior is not None else self.lat
            self._shapes_cache = src.shapes if isinstance(src, PredictedLatency) else \
                _run_shapes(self.pipe.prepared, self.feed, self.backend)
        return self._shapes_cache

    def _measured_dlat(self, r: Mapping[str, Any]) -> Optional[float]:
        """Latency change of an in-place trial vs the reference, as a fraction of the FP32 latency."""
        ref_lat = 1.0 / max(self.ref_point["speedup"], 1e-9)
        if "ratio" in r:
            return ref_lat * (1.0 / max(r["ratio"], 1e-9) - 1.0)
        return r.get("dlat")

    def boundary_pass(self) -> None:
        """Int8-region boundaries (search/boundaries.py): find the edges, time the most promising pairs of
        adjacent layers in float together (in place, against the reference, like the layer table) and fit the
        boundary cost per element from them, so that the table's latency model lets float islands share
        their boundaries."""
        self.edges, self.edge_cost, self.edge_info, self.edge_objs = [], 0.0, {}, []
        groups = getattr(self, "group_results", {})
        if not groups:
            return
        try:
            shapes = self._shapes()
        except Exception as e:  # noqa: BLE001 - the boundary model is an estimate: the search goes on without it
            self.log("boundaries", f"no int8-region boundary model (shapes unavailable: {type(e).__name__})")
            return
        edges = layer_edges(self.pipe.prepared, self.space.layers, shapes)
        self.edge_objs = edges
        if not edges:
            return
        prior = self._edge_prior()
        single = {n: self._measured_dlat(res[FP32]) for n, res in groups.items()
                  if FP32 in res and "failed" not in res[FP32]}
        single = {n: d for n, d in single.items() if d is not None}
        cands = [e for e in edges if e.u in single and e.v in single
                 and self.ref_assign[e.u] != FP32 and self.ref_assign[e.v] != FP32]
        cands.sort(key=lambda e: (single[e.u] + single[e.v] - 2 * prior * e.numel, e.u, e.v))
        ref_hash = stable_hash(self.space.config(self.ref_assign))
        pairs, measured = [], []
        for e in cands[:PAIR_TRIALS]:
            payload = {"pair": [e.u, e.v], "ref": ref_hash}

            def run(e=e):
                try:
                    built = self.build(dict(self.ref_assign, **{e.u: FP32, e.v: FP32}))
                    sess = self.session(built.model)
                except (HagoError, NotImplementedError, ValueError, RuntimeError) as err:
                    return {"pair": [e.u, e.v], "failed": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                if self.lat_kind == "measured":
                    r = self.lat.compare({"ref": self._ref_session(), "pair": sess}, layer=True)["pair"]
                    return {"pair": [e.u, e.v], "ratio": r["ratio"], "se": r["se"]}
                s = self.lat.seconds(built.plan, built.model)
                return {"pair": [e.u, e.v], "dlat": (s - self._ref_seconds()) / self._fp32_s}

            try:
                rec = self.trial("pair", payload, run, stage="boundaries", table=True)
            except _TableTime:
                break
            d_uv = None if "failed" in rec else self._measured_dlat(rec)
            if d_uv is None:
                continue
            y = single[e.u] + single[e.v] - d_uv
            pairs.append((y, e.numel))
            measured.append({"u": e.u, "v": e.v, "numel": e.numel, "dlat_u": single[e.u], "dlat_v": single[e.v],
                             "dlat_pair": d_uv, "shared_boundary": y / 2})
        self.edge_cost = fit_cost(pairs, prior)
        self.edges = [(e.u, e.v, self.edge_cost * e.numel) for e in edges]
        self.edge_info = {"edges": [e.to_dict() for e in edges], "cost_per_element": self.edge_cost,
                          "prior_per_element": prior, "pairs": measured}
        self.log("boundaries", f"int8-region boundaries: {len(edges)} edges; {len(pairs)} adjacent pairs timed in "
                               f"float together; boundary cost {self.edge_cost * 1e6:.3g} ppm of the FP32 latency per "
                               f"element (cost model: {prior * 1e6:.3g})")

    def make_table(self) -> Table:
        m_ref = self.ref_point["sens_nmse"] if getattr(self, "ref_point", None) else 0.0
        ref_lat = 1.0 / max(self.ref_point["speedup"], 1e-9) if getattr(self, "ref_point", None) else 1.0
        rows, notes = {}, {}
        self.table_details: Dict[str, Dict[str, Any]] = {}
        e_ref = self._sensitivity() if hasattr(self, "group_results") else {}
        for node, res in getattr(self, "group_results", {}).items():
            ls = self.space.layers[node]
            er = e_ref.get(node, 0.0)
            row = {ls.ref: (er, 0.0)}
            acc = self._acc_results(node)
            for key, r in res.items():
                if key.startswith("_") or "failed" in r or key not in ls.candidates:
                    continue
                a = acc.get(key, r)
                if "failed" in a:
                    continue
                e = 0.0 if key == FP32 else self._cand_err(er, a)
                if "ratio" in r:
                    dl = self._blend(r, ref_lat)
                    self.table_details.setdefault(node, {})[key] = {
                        "dlat": dl, "dlat_measured": self._measured_dlat(r),
                        "se": r.get("se"), "nmse": r["nmse"]}
                elif "dlat" in r:
                    dl = r["dlat"]
                else:
                    continue
                row[key] = (e, dl)
            for key, r in getattr(self, "variant_results", {}).get(node, {}).items():
                if "failed" in r or key not in ls.candidates:
                    continue
                parent = ls.candidates[key].parent or ls.ref
                if parent in row:
                    row[key] = (self._cand_err(er, r), row[parent][1])
            if len(row) > 1:
                rows[node] = row
        total = sum(rows[n][self.ref_assign[n]][0] for n in rows)
        k = 1.0
        if total > 0 and m_ref > 0:
            k = min(2.0, max(0.5, m_ref / total))
            notes["scale"] = f"per-layer errors scaled by {k:.3f} so that the reference's estimate matches its measure"
        rows = {n: {key: (e * k, dl) for key, (e, dl) in row.items()} for n, row in rows.items()}
        fixed = max(0.0, m_ref - k * total)
        ref = {n: self.ref_assign[n] for n in rows}
        edges = list(getattr(self, "edges", []))
        if edges:
            notes["boundaries"] = (f"{len(edges)} int8-region boundary edges at "
                                   f"{self.edge_cost * 1e6:.3g} ppm of the FP32 latency per element")
        fixed_float = {n: self.ref_assign[n] == FP32 for n in self.space.layers if n not in rows}
        return Table(rows=rows, ref=ref, ref_latency=ref_lat, fixed_err=fixed, notes=notes, edges=edges,
                     fixed_float=fixed_float)

    @staticmethod
    def _cand_err(e_ref: float, r: Dict[str, Any]) -> float:
        """Error contribution of a candidate: the layer's reference contribution plus the candidate's paired
        change on the sensitivity samples. A change within two standard errors is noise: the candidate then
        counts as marginally worse than the reference, so it is only taken for a latency gain."""
        d, se = r.get("dnmse"), r.get("dnmse_se")
        if d is None:
            return e_ref
        if isinstance(se, float) and math.isfinite(se) and abs(d) <= SIGNIFICANCE * se:
            return e_ref * (1 + 1e-6) + 1e-15
        return max(0.0, e_ref + d)

    def _blend(self, r: Dict[str, Any], ref_lat: float) -> float:
        """Measured latency change of one candidate (fraction of FP32 latency), shrunk towards the calibrated
        cost-model prediction by their uncertainties: effects below the timing noise follow the model,
        clear effects follow the measurement."""
        ratio = max(r["ratio"], 1e-9)
        dl = ref_lat * (1.0 / ratio - 1.0)
        se = r.get("se")
        if self.prior is None or "prior_s" not in r or not isinstance(se, float) or not math.isfinite(se) or se <= 0:
            return dl
        se_dl = ref_lat * se / ratio ** 2
        ref_pred = self._prior_ref_s()
        gain_pred = 1.0 - ref_pred / self._prior_fp32_s
        k = 1.0
        if gain_pred > 1e-6 and 1.0 - ref_lat > 0:
            k = min(2.0, max(0.1, (1.0 - ref_lat) / gain_pred))
        prior = k * (r["prior_s"] - ref_pred) / self._prior_fp32_s
        tau = max(0.5 * abs(prior), 0.003)
        w_m, w_p = 1.0 / se_dl ** 2, 1.0 / tau ** 2
        return (dl * w_m + prior * w_p) / (w_m + w_p)

    def _prior_ref_s(self) -> float:
        if not hasattr(self, "_prior_ref"):
            self._prior_ref = self.prior.seconds(self.build(self.ref_assign).plan)
        return self._prior_ref

    def _ref_seconds(self) -> float:
        if not hasattr(self, "_ref_s"):
            built = self.build(self.ref_assign)
            self._ref_s = self.lat.seconds(built.plan, built.model)
        return self._ref_s

    # ------------------------------------------------------------------------------------------ strategies
    def _full_path(self) -> List[Dict[str, str]]:
        return [dict(self.ref_assign, **a) for a in greedy_path(self.table)]

    def _feasible(self, p) -> bool:
        return bool(p.get("quantized", True)) and feasible(p, self.acc_b, self.latency_budget)

    def accuracy_mode(self) -> None:
        """Fastest plan with drop <= accuracy budget (and speed-up >= latency budget when given)."""
        acc_ok = lambda p: p["drop"] <= self.acc_b + 1e-12  # noqa: E731
        # 1. HAGO's greedy from the sensitivity order: restore layers from the reference, most sensitive per
        #    latency first, until the metric fits (bisection). Plans near the measured reference first.
        if not acc_ok(self.ref_point):
            path = [dict(self.ref_assign, **a) for a in greedy_path(self.table, start=self.ref_assign)]
            self.log("greedy", f"restore path from the reference: {len(path)} plans, est. error "
                               f"{self.table.err(path[0]):.3g} -> {self.table.err(path[-1]):.3g}, est. "
                               f"{self.table.speedup(path[0]):.2f}x -> {self.table.speedup(path[-1]):.2f}x")
            self._bisect(path, acc_ok, "restore path", first=1)
        # 2. the fastest -> most accurate path (latency first): bisection for the fastest plan that fits,
        #    among the plans estimated faster than the best feasible one measured so far
        path = self._full_path()
        self.log("greedy", f"greedy path: {len(path)} plans from est. {self.table.speedup(path[0]):.2f}x / error "
                           f"{self.table.err(path[0]):.3g} to {self.table.speedup(path[-1]):.2f}x / error "
                           f"{self.table.err(path[-1]):.3g}")
        keep = [a for a in path if self._promising(a)]
        if len(keep) < len(path):
            self.log("greedy", f"{len(path) - len(keep)} slower plans of the path cannot beat the best feasible "
                               f"plan measured so far ({self._best()['speedup']:.2f}x): not measured")
        path = keep or path[:1]
        errs = [self.table.err(a) for a in path]
        ref_err = max(self.table.err(self.ref_assign), 1e-12)
        feas = [p for p in self.points.values() if self._feasible(p)]
        if feas:     # start at the first plan estimated no worse than a plan measured feasible
            target = max(self.table.err(self._full[p["id"]]) for p in feas)
        elif self.ref_point["drop"] > 0:
            slope = self.ref_point["drop"] / ref_err          # metric drop per unit of estimated error
            target = 0.8 * self.acc_b / slope
        else:
            target = float("inf")
        guess = next((i for i, e in enumerate(errs) if e <= target), len(path) - 1)
        lo, hi = self._bisect(path, acc_ok, "greedy path", first=guess)
        # 3. the integer program at the estimated errors around the boundary the measurements found
        feas = [p for p in self.points.values() if self._feasible(p)]
        levels = [self.table.err(path[hi])]
        if lo >= 0:
            levels += [0.5 * (self.table.err(path[hi]) + self.table.err(path[lo])), self.table.err(path[lo])]
        if feas:       # the slack the measured feasible plans show
            levels.append(max(p.get("est_err", levels[0]) for p in feas))
        levels = sorted(set(round(e, 15) for e in levels))
        self.log("milp", f"integer program (min latency s.t. est. error <= E) at E = "
                         f"{', '.join(f'{e:.3g}' for e in levels)}")
        for e in levels:
            a = milp_solve(self.table, objective="latency", max_err=e)
            if a is not None and self._promising(dict(self.ref_assign, **a)):
                self.eval_plan(dict(self.ref_assign, **a), "milp", f"MILP min latency, est. error <= {e:.3g}")
        self.island_trials()
        self.refine(faster=True)

    def _best(self, tie: float = 0.0) -> Optional[Dict[str, Any]]:
        return choose([p for p in self.points.values() if self._feasible(p)], self.acc_b, self.latency_budget,
                      self.objective, tie=tie)

    def _promising(self, assign: Mapping[str, str]) -> bool:
        """Could this plan beat the best feasible plan measured so far (by the estimates, with a margin)?"""
        best = self._best()
        if best is None:
            return True
        if self.objective == "speed":
            return self.table.speedup(assign) >= PROMISING_MARGIN * best["speedup"]
        return self.table.err(assign) <= best.get("est_err", float("inf")) / PROMISING_MARGIN

    def _bisect(self, path, ok, name: str, first: int = 0):
        """Smallest index of ``path`` whose measured plan satisfies ``ok`` (path assumed monotone). Returns
        (lo, hi): path[lo] failed (-1: none measured), path[hi] passed (len-1 if never measured)."""
        lo, hi = -1, len(path) - 1
        guess = first
        while hi - lo > 1:
            mid = guess if lo < guess < hi else (lo + hi) // 2
            guess = -1
            p = self.eval_plan(path[mid], "greedy", f"{name} step {mid}/{len(path) - 1}")
            if ok(p):     # accuracy only: a plan with no layer left quantized still bounds the path
                hi = mid
            else:
                lo = mid
        return lo, hi

    def latency_mode(self) -> None:
        """Most accurate plan with speed-up >= latency budget."""
        S = self.latency_budget
        path = self._full_path()
        speeds = [self.table.speedup(a) for a in path]
        self.log("greedy", f"greedy path: {len(path)} plans, est. speed-up {speeds[0]:.2f}x .. {speeds[-1]:.2f}x")
        fast_ok = lambda p: p["speedup"] >= S - 1e-12  # noqa: E731
        lo, hi = -1, len(path)             # path[lo] meets S (virtual -1: unknown), path[hi] misses it (virtual)
        first = self.eval_plan(path[0], "greedy", "greedy path: fastest plan")
        if not fast_ok(first):
            a = milp_solve(self.table, objective="latency")
            if a is not None:
                self.eval_plan(dict(self.ref_assign, **a), "milp", "MILP minimum latency")
            return
        lo = 0
        guess = max([i for i, s in enumerate(speeds) if s >= S] or [0])
        while hi - lo > 1:
            mid = guess if lo < guess < hi else (lo + hi) // 2
            guess = -1
            p = self.eval_plan(path[mid], "greedy", f"greedy path step {mid}/{len(path) - 1}")
            if fast_ok(p):
                lo = mid
            else:
                hi = mid
        for margin in (1.0, 1.03, 1.06):
            a = milp_solve(self.table, objective="error", max_latency=1.0 / (S * margin))
            if a is not None:
                self.eval_plan(dict(self.ref_assign, **a), "milp", f"MILP min error, est. speed-up >= "
                                                                   f"{S * margin:.2f}x")
        self.island_trials()
        self.refine(faster=False)

    def _io_islands(self) -> List[Tuple[str, List[str]]]:
        """Chains of the first / last 1..ISLAND_DEPTH layers from each model input / output along single-edge
        paths: a float island there pays a boundary on one side only (the model's I/O is float), and the first
        layers (few channels, large maps) are where the INT8 kernels gain least."""
        succ: Dict[str, List[str]] = {}
        pred: Dict[str, List[str]] = {}
        edges = getattr(self, "edge_objs", [])
        for e in edges:
            if e.u is not None and e.v is not None:
                succ.setdefault(e.u, []).append(e.v)
                pred.setdefault(e.v, []).append(e.u)
        out: List[Tuple[str, List[str]]] = []
        for e in edges:
            start, nxt, side = (e.v, succ, "input") if e.u is None else (e.u, pred, "output") if e.v is None \
                else (None, None, "")
            if start is None or FP32 not in self.space.layers[start].active():
                continue
            chain = [start]
            while len(chain) < ISLAND_DEPTH and len(nxt.get(chain[-1], [])) == 1:
                n = nxt[chain[-1]][0]
                if FP32 not in self.space.layers[n].active() or n in chain:
                    break
                chain.append(n)
            out += [(side, chain[:k]) for k in range(1, len(chain) + 1)]
        return out

    def island_trials(self) -> None:
        """Measure float islands at the model's inputs / outputs end to end from the best feasible plan unless the
        estimates put them clearly (ISLAND_MARGIN) slower: single-layer in-place timings resolve a 2-4 % island
        poorly (on EfficientNet-Lite0 the stem + first block in float measured 2-4 % faster in multi-session A/B
        runs, while the estimate from the layers' own timings put it > 3 % slower). At most 2 * ISLAND_DEPTH
        plans per model input / output."""
        best = self._best(self.timing["speed_tie"])
        base = self._full[best["id"]] if best is not None else dict(self.ref_assign)
        floor = ISLAND_MARGIN * (best["speedup"] if best is not None else self.ref_point["speedup"])
        for side, chain in self._io_islands():
            a = dict(base, **{n: FP32 for n in chain})
            if a == base or self.point_key(a) in self.points:
                continue
            if self.objective == "speed" and self.table.speedup(a) < floor:
                continue        # clearly slower even by the noisy estimates
            self.eval_plan(a, "islands", f"float island at the model {side}: {', '.join(chain)}")

    def refine(self, faster: bool) -> None:
        best = self._best(self.timing["speed_tie"])
        if best is None:
            return
        tried = 0
        while tried < self.refine_moves:
            full = self._full[best["id"]]
            moves = faster_moves(self.table, full, self.refine_moves) if faster else \
                accurate_moves(self.table, full, self.refine_moves)
            moves = [m for m in moves if self.point_key(m) not in self.points]
            if not moves:
                break
            improved = False
            for m in moves:
                if tried >= self.refine_moves:
                    break
                changed = [n for n in m if m[n] != full[n]]
                p = self.eval_plan(m, "refine", "refine: " + ", ".join(
                    f"{n} -> {self.space.label(n, m[n])}" for n in changed))
                tried += 1
                if self._feasible(p) and choose([p, best], self.acc_b, self.latency_budget, self.objective) is p:
                    best, improved = p, True
                    break
            if not improved:
                break

    def retime(self) -> None:
        pts = [p for p in self.points.values() if self._feasible(p)]
        top = top_candidates(pts, self.objective, k=4)
        if len(top) < 2:
            return
        keys = sorted(p["id"] for p in top)

        def run():
            sessions = {"fp32": self.fp_session}
            for k in keys:
                sessions[k] = self.session(self.build(self._full[k]).model)
            reps = max(self.timing["plan_repeats"], 20)
            tr = self.backend.time(sessions, self.feed, repeats=reps, warmup=3,
                                   min_time_s=self.timing["retime_min_time_s"])
            base = tr.baseline.samples
            out = {}
            for i, t in enumerate(tr.timings[1:]):
                st = ratio_stats(base, t.samples, seed=i)
                out[t.label] = {"speedup": st["ratio"], "se": st["se"], "paired_median": st["paired_median"],
                                "p10": st["p10"], "p90": st["p90"], "ms": t.median * 1e3}
            return {"plans": keys, "results": out}

        rec = self.trial("retime", {"plans": keys}, run, stage="retime")
        for k, r in rec["results"].items():
            p = self.points[k]
            p.setdefault("speedup_first", p["speedup"])
            p["speedup"] = r["speedup"]
            p["retimed"] = True
        self.log("retime", "re-timed the top candidates together with FP32: " + ", ".join(
            f"{k[:8]} {rec['results'][k]['speedup']:.3f}x" for k in keys))

    # ------------------------------------------------------------------------------------------ result
    def finish(self):
        from ..api import finish

        points = list(self.points.values())
        chosen = choose(points, self.acc_b, self.latency_budget, self.objective,
                        tie=self.timing["speed_tie"]) if hasattr(self, "acc_b") else None
        fp32_point = {"id": "fp32", "stage": "reference", "note": "FP32 model", "metric": getattr(self, "fp32_metric", 1.0),
                      "drop": 0.0, "speedup": 1.0, "latency": self.lat_kind, "metric_kind": self.metric_kind,
                      "assign": {n: FP32 for n in self.space.layers}, "plan": None, "n_fp32": len(self.space.layers),
                      "n_layers": len(self.space.layers), "quantized": False}
        front = pareto_front(points + [fp32_point])
        if chosen is None:
            err = budget_error(points, self.acc_b if hasattr(self, "acc_b") else self.accuracy_budget,
                               self.latency_budget, self.metric_name, getattr(self, "fp32_metric", float("nan")),
                               stopped_early=self.stopped_early)
            self.ckpt.save({"done": True, "error": str(err)})
            err.pareto = front
            raise err
        full = self._full[chosen["id"]]
        built = self.build(full)
        measured = self.lat_kind == "measured"
        result = finish(self.pipe, built, measure_latency=measured)
        if not measured:
            s = chosen["speedup"]
            result.report["latency"] = {"measured": False, "speedup": s, "threads": self.opts.threads,
                                        "speedup_spread": {"median": s, "p10": s, "p90": s},
                                        "source": self.lat.describe()}
        for p in front:
            p["on_front"] = True
        chosen = dict(chosen, chosen=True)
        result.pareto = front
        result.chosen = chosen
        result.report["search"] = self.search_report(chosen, front, built.plan)
        result.report["timings_s"]["search"] = self.elapsed()
        if getattr(self, "hybrid_info", None):   # the hybrid selection that gave the stage "hybrid" point
            result.report["hybrid"] = self.hybrid_info
        self.ckpt.save({"done": True, "chosen": chosen["id"]})
        self.log("done", f"chosen plan {chosen['id'][:8]}: {self.metric_name} {chosen['metric']:.6g} (drop "
                         f"{chosen['drop']:+.4g}) at {chosen['speedup']:.3f}x ({chosen['latency']}); "
                         f"{self.n_new} trials measured, {self.n_replayed} replayed, {self.elapsed():.0f} s")
        result.report["search"]["log"] = list(self.log_lines)
        return result

    def search_report(self, chosen, front, plan: QuantPlan) -> Dict[str, Any]:
        trials = []
        for rec in self.ckpt.records():
            t = {k: rec.get(k) for k in ("index", "kind", "stage", "metric", "speedup", "latency", "seconds", "key")
                 if rec.get(k) is not None}
            if rec.get("kind") == "plan":
                t["assign"] = rec.get("assign")
                t["proxy_fidelity"] = (rec.get("proxy") or {}).get("fidelity")
            elif rec.get("kind") in ("layer", "variants"):
                t["node"] = rec.get("node")
                t["candidates"] = {k: {kk: v[kk] for kk in ("nmse", "ratio", "se", "dlat", "failed") if kk in v}
                                   for k, v in (rec.get("results") or {}).items() if not k.startswith("_")}
            trials.append(t)
        n_layer_cands = sum(len(t.get("candidates") or {}) for t in trials if t["kind"] in ("layer", "variants"))
        peers = None
        if self.peers is not None:
            from ..report.plot import load_peers

            peers = load_peers(self.peers)
        return {
            "metric": {"kind": self.metric_kind, "name": self.metric_name, "fp32": self.fp32_metric,
                       "definition": self.user.describe() if self.user else self.proxy.describe(),
                       "higher_is_better": True},
            "budgets": {"accuracy": self.acc_b, "accuracy_note": self.budget_note, "latency": self.latency_budget,
                        "time_s": self.time_budget},
            "objective": ("fastest plan within the accuracy budget" if self.objective == "speed"
                          else "most accurate plan within the latency budget"),
            "latency_source": {"kind": self.lat_kind, "description": self.lat.describe(),
                               "target_reachable": self.reachable, "why": self.reach_why},
            "space": self.space.describe(),
            "remedy": self.remedy_info,
            "layers": self.layer_rows(chosen, plan),
            "pareto": [_public(p) for p in front],
            "points": [_public(p) for p in self.points.values()],
            "chosen": _public(chosen),
            "trials": trials,
            "counts": {"trials": len(trials), "measured_this_run": self.n_new, "replayed": self.n_replayed,
                       "plan_trials": sum(1 for t in trials if t["kind"] == "plan"),
                       "layer_candidates": n_layer_cands},
            "search_s": self.elapsed(),
            "stopped_early": self.stopped_early,
            "checkpoint": str(self.ckpt.path) if self.ckpt.path else None,
            "table_notes": dict(self.table.notes) if self.table else {},
            "table": self.table_report(),
            "boundaries": getattr(self, "edge_info", {}),
            "peers": peers,
        }

    def table_report(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        """The per-layer estimates the strategies used: error contribution and latency change (fraction of the
        FP32 latency; measured, shrunk towards the cost model where noisier than the effect, or predicted)."""
        if not self.table:
            return {}
        out = {}
        details = getattr(self, "table_details", {})
        for node, row in self.table.rows.items():
            out[node] = {}
            for key, (e, dl) in row.items():
                d = {"err": e, "dlat": dl, "latency": self.lat_kind}
                extra = details.get(node, {}).get(key)
                if extra:
                    d["dlat_measured"] = extra["dlat_measured"]
                    d["dlat_se"] = extra.get("se")
                out[node][key] = d
        return out

    def layer_rows(self, chosen, plan: QuantPlan) -> List[Dict[str, Any]]:
        full = self._full[chosen["id"]]
        shapes = {}
        try:
            shapes = self._shapes()
        except Exception:  # shapes are decoration for the report: never fail the search on them
            pass
        table = self.table
        sens = {n: table.rows[n][table.ref[n]][0] for n in table.rows} if table else {}
        total = sum(sens.values()) or 1e-30
        rank = {n: i + 1 for i, n in enumerate(sorted(sens, key=lambda n: -sens[n]))}
        nodes = {n.name: n for n in self.pipe.prepared.graph.node}
        rows = []
        for node, ls in self.space.layers.items():
            key = full[node]
            row_t = table.rows.get(node, {}) if table else {}
            dl_fp = row_t.get(FP32, (0, None))[1]
            dl_ch = row_t.get(key, (0, None))[1]
            saving = (dl_fp - dl_ch) if (dl_fp is not None and dl_ch is not None) else None
            out = nodes[node].output[0] if node in nodes and nodes[node].output else None
            lp = plan.layers.get(node)
            rows.append({
                "node": node, "op": ls.op, "weight_shape": ls.weight_shape, "output_shape": shapes.get(out),
                "config": ls.candidates[key].label, "key": key, "reference": ls.candidates[ls.ref].label,
                "quantized": bool(lp.quantize) if lp else key != FP32,
                "sensitivity": sens.get(node), "sensitivity_share": sens.get(node, 0.0) / total if node in sens else None,
                "sensitivity_rank": rank.get(node), "latency_saving": saving,
                "latency_share": saving,
                "dlat_fp32": dl_fp, "why": self._why(node, ls, key, row_t, sens, rank, saving, lp),
            })
        return rows

    def _why(self, node, ls, key, row, sens, rank, saving, lp) -> str:
        n = len(sens)
        r = rank.get(node)
        where = f"sensitivity rank {r}/{n}" if r else "not in the layer table"
        quant_dl = [dl for k, (e, dl) in row.items() if k != FP32 and self.space.layers[node].candidates[k].structural]
        if key == FP32:
            if row and FP32 in row and quant_dl and row[FP32][1] < min(quant_dl):
                return (f"kept FP32: every INT8 variant was {'measured' if self.lat_kind == 'measured' else 'predicted'}"
                        f" slower here (FP32 saves {100 * (min(quant_dl) - row[FP32][1]):.1f} % of the FP32 model time)")
            return f"kept FP32: {where}; quantizing it costs more accuracy than the budget leaves"
        if lp is not None and not lp.quantize:
            return f"FP32 in the plan: {lp.reason}"
        s = f"quantized ({where}"
        if saving is not None:
            s += f", saves {100 * saving:.1f} % of the FP32 model time vs keeping it FP32"
        s += ")"
        if key != ls.ref:
            c = ls.candidates[key]
            if c.structural:
                s += f"; {c.label} instead of the reference {ls.candidates[ls.ref].label}"
                if key in row:
                    s += f" (est. {-100 * row[key][1]:+.1f} % time, error {row[key][0]:.2g} vs {row[ls.ref][0]:.2g})"
            else:
                s += f"; variant {key.split('+', 1)[1]} lowered the layer's error ({row.get(key, (0,))[0]:.2g} vs " \
                     f"{row.get(ls.ref, (0,))[0]:.2g})"
        return s


def _public(p: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in p.items()}


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
               on_trial: Optional[Callable[[Dict[str, Any]], None]] = None):
    """Search per-layer configurations for ``pipe`` (a hago_py.pipeline.Pipeline); returns an api.Result.

    evaluate: ``evaluate(model: onnx.ModelProto) -> float``, higher is better (the user's validation loop);
        None: the calibration-set proxy (output fidelity vs FP32), named as a proxy in the report.
    accuracy_budget: max drop of that metric vs FP32, in its units. latency_budget: min speed-up vs FP32
        (1.5 = at least 1.5x faster). Neither: a default accuracy budget of 1 % of the FP32 metric.
    time_budget: seconds of wall clock; the best plan measured so far is returned when it runs out.
    checkpoint: JSON state file, written after every trial; resume=True continues it.
    latency: 'auto' (measured with ONNX Runtime when the target is this machine and measure_latency, else
        predicted by the spec's cost model), 'measured', 'predicted', or fn(model, plan) -> seconds.
    roundings / clipping: weight rounding schemes and output-range methods to search (default: the user's
        rounding only; all four calibration methods).
    peers: a list of {"name", "speedup", "drop"} dicts or a benchmarks/results/*.json path, for the report.
    on_trial: called with each new trial record (progress hooks, tests).
    Raises SearchError (with ``.closest``) when no quantized plan meets the budgets.
    """
    _check_settings(dict(proxy_samples=proxy_samples, sensitivity_samples=sensitivity_samples,
                         variant_layers=variant_layers, max_plan_trials=max_plan_trials, refine_moves=refine_moves,
                         include_simulated=include_simulated, roundings=roundings, clipping=clipping,
                         timing=timing, resume=resume))
    return _Search(pipe, evaluate=evaluate, accuracy_budget=accuracy_budget, latency_budget=latency_budget,
                   time_budget=time_budget, checkpoint=checkpoint, resume=resume, measure_latency=measure_latency,
                   latency=latency, roundings=roundings, clipping=clipping, proxy_samples=proxy_samples,
                   sensitivity_samples=sensitivity_samples, include_simulated=include_simulated,
                   variant_layers=variant_layers, max_plan_trials=max_plan_trials, refine_moves=refine_moves,
                   timing=timing, peers=peers, on_trial=on_trial).run()
