"""The trial runner: what every stage of the search measures through.

``Trials`` is built once per search from the pipeline, the backend and the settings: the reference plan and
the search space, the proxy / sensitivity data, the metric, the latency source (every model runs for accuracy
on the search's backend and is compiled and timed by the latency backend timer.py chose: the same backend and
sessions for ONNX Runtime) and the checkpoint with the run's identity. It runs trials (a recorded trial is
replayed from the checkpoint, a new one is measured, written to it atomically and handed to ``on_trial``),
builds and compiles plans, measures end-to-end plans into points of the state, and holds the caches the
stages share (reference session, reference errors, shapes, cost-model figures).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import onnx

from ..backends.base import Backend
from ..errors import HagoError, OptionError
from ..quant.padding import token_mask_input
from .checkpoint import CHECKPOINT_VERSION, Checkpoint, _clean, stable_hash
from .evaluators import FidelityProxy, FunctionLatency, MeasuredLatency, PredictedLatency, UserMetric, \
    _run_shapes
from .pareto import choose, feasible
from .space import FP32, SearchSpace, build_space, diff_assign
from .state import SearchState, _OutOfTime, _TableTime, _TrialLimit
from .timer import Timer

PROMISING_MARGIN = 0.97          # a candidate plan is measured if its estimate is within 3 % of the best
BUILD_ERRORS = (HagoError, NotImplementedError, ValueError, RuntimeError)


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
    return json.loads(json.dumps(_clean(rec), sort_keys=True, allow_nan=False))


def failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


class Trials:
    def __init__(self, pipe, state: SearchState, backend: Backend, timer: Timer, *, evaluate, checkpoint, resume,
                 measure_latency, latency, roundings, clipping, proxy_samples, sensitivity_samples, include_simulated,
                 on_trial):
        self.state = st = state
        self.pipe, self.opts, self.spec = pipe, pipe.opts, pipe.spec
        self.backend = backend                  # runs every model for accuracy (and shapes, the cost model's input)
        # times every model of a measured search (timer.py); the search's own backend where that is the target's
        self.timer = timer.backend if timer.backend is not None else backend
        self._timed: Dict[str, Any] = {}        # fp32 / reference artifacts of the latency backend
        self.on_trial = on_trial
        self.progress = bool(pipe.progress)
        self.bar = None
        self._ref_sess = None
        self._ctx_err_cache: Dict[str, np.ndarray] = {}

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
        mask = token_mask_input(pipe.prepared, pipe.opts)
        self.sens_proxy = FidelityProxy(self.backend, self.fp_session, self.sens_batches, mask)
        self.proxy = FidelityProxy(self.backend, self.fp_session, self.proxy_batches, mask)
        self._sens_energy = self.proxy.ref_energy(self.sens_proxy.samples)
        self.user = UserMetric(evaluate) if evaluate is not None else None
        self.metric_kind = "user" if self.user else "proxy"
        self.metric_name = self.user.name if self.user else "proxy fidelity"

        # latency source
        self.reachable, self.reach_why = timer.reachable, timer.why
        if latency is None or latency == "auto":
            latency = "measured" if (measure_latency and self.reachable) else "predicted"
        if latency == "measured":
            t = st.timing
            self.lat = MeasuredLatency(self.timer, self.feed, plan_repeats=t["plan_repeats"],
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
            self.fp32_s = self.lat.seconds(None, pipe.proto)
        # cost-model prior for the measured layer table (noisy small effects are shrunk towards it)
        self.prior = None
        if self.lat_kind == "measured":
            self.prior = PredictedLatency(self.spec, pipe.prepared, self.feed, self.backend)
            self.prior_fp32_s = self.prior.seconds(None)

        identity = {
            "version": CHECKPOINT_VERSION, "model": pipe.digest, "target": self.spec.name,
            "spec": stable_hash(self.spec.to_dict()), "options": self.opts.to_dict(),
            "calibration": _digest_batches(self.proxy_batches),
            "metric": self.metric_name if self.user else "proxy",
            "latency": self.lat.describe(),
            "space": stable_hash(self.space.describe()),
            "settings": {"proxy_samples": int(proxy_samples), "sensitivity_samples": int(sensitivity_samples),
                         "variant_layers": st.variant_layers, "timing": st.timing},
        }
        self.ckpt = Checkpoint(checkpoint, identity, resume=resume)
        if self.ckpt.resumed:
            self.log("resume", f"resuming from {checkpoint}: {self.ckpt.resumed} recorded trials will be replayed")

    # ------------------------------------------------------------------------------------------ plumbing
    def log(self, stage: str, msg: str) -> None:
        self.state.log_lines.append({"t": round(self.state.elapsed(), 2), "stage": stage, "msg": msg})
        if self.progress:
            line = f"[hago search] {msg}"
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def trial(self, kind: str, payload: Dict[str, Any], fn: Callable[[], Dict[str, Any]], *, stage: str,
              table: bool = False) -> Dict[str, Any]:
        st = self.state
        key = stable_hash({"kind": kind, **payload})
        rec = self.ckpt.get(key)
        if rec is not None:
            st.n_replayed += 1
            self._tick(stage)
            return rec
        if stage != "reference" and st.out_of_time():   # FP32 and the reference always run
            st.stopped_early = True
            raise _OutOfTime()
        if table and st.out_of_time(table=True):
            st.stopped_early = True
            raise _TableTime()
        t = time.perf_counter()
        rec = fn()
        rec = _roundtrip(dict(rec, kind=kind, stage=stage, seconds=round(time.perf_counter() - t, 4),
                              index=len(self.ckpt.order)))
        self.ckpt.add(key, rec)
        rec = _roundtrip(self.ckpt.get(key))       # exactly what a resumed run reads back
        st.n_new += 1
        self._tick(stage)
        if self.on_trial is not None:
            self.on_trial(rec)
        return rec

    def _tick(self, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"search: {stage}")
            self.bar.update(1)

    def build(self, assign: Mapping[str, str]):
        return self.pipe.build(self.space.config(assign), sanity=False)

    def session(self, model: onnx.ModelProto):
        return self.backend.compile(model)

    def timed(self, model: onnx.ModelProto, session=None):
        """``model`` as the latency backend times it: the accuracy session itself where the search's backend
        times too (``session``, or a new one), else the latency backend's compile of the model."""
        if self.timer is self.backend and session is not None:
            return session
        return self.timer.compile(model)

    def fp_timed(self):
        if "fp32" not in self._timed:
            self._timed["fp32"] = self.timed(self.pipe.reference, self.fp_session)
        return self._timed["fp32"]

    def ref_timed(self):
        if "ref" not in self._timed:
            self._timed["ref"] = (self.ref_session() if self.timer is self.backend
                                  else self.timer.compile(self.build(self.ref_assign).model))
        return self._timed["ref"]

    def point_key(self, assign: Mapping[str, str]) -> str:
        return stable_hash({n: assign.get(n, k) for n, k in self.ref_assign.items()})

    # ------------------------------------------------------------------------------------------ end-to-end plans
    def _plan_latency(self, built, sess) -> Dict[str, Any]:
        if self.lat_kind == "measured":
            r = self.lat.compare({"fp32": self.fp_timed(), "plan": self.timed(built.model, sess)})
            p = r["plan"]
            return {"speedup": p["ratio"], "se": p["se"], "paired_median": p["paired_median"], "p10": p["p10"],
                    "p90": p["p90"], "ms": p["median_ms"], "fp32_ms": r["fp32"]["median_ms"], "repeats": p["repeats"]}
        s = self.lat.seconds(built.plan, built.model)
        return {"speedup": self.fp32_s / s, "ms": s * 1e3, "fp32_ms": self.fp32_s * 1e3}

    def fp32_trial(self) -> Dict[str, Any]:
        def run():
            m = self.user.score(self.pipe.reference) if self.user else 1.0
            return {"metric": m, "speedup": 1.0, "latency": self.lat_kind}

        return self.trial("fp32", {}, run, stage="reference")

    def eval_plan(self, assign: Mapping[str, str], stage: str, note: str = "") -> Dict[str, Any]:
        st = self.state
        full = {n: assign.get(n, k) for n, k in self.ref_assign.items()}
        pkey = self.point_key(full)
        if pkey in st.points:
            return st.points[pkey]
        if st.n_plan_trials >= st.max_plan_trials and stage != "reference":
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
        st.n_plan_trials += 1
        p = self._point(rec, full, stage, note)
        fe = "feasible" if self.feasible(p) else "infeasible" if p["quantized"] else "no layer quantized"
        self.log(stage, f"plan {pkey[:8]} ({note or stage}): {self.metric_name} {p['metric']:.6g} "
                        f"(drop {p['drop']:+.4g}), {p['speedup']:.3f}x {p['latency']}, {p['n_fp32']} FP32 layers, {fe}")
        return p

    def _point(self, rec, full, stage, note) -> Dict[str, Any]:
        st = self.state
        pkey = self.point_key(full)
        n_fp32 = sum(1 for n, k in full.items() if k == FP32)
        p = {"id": pkey, "stage": stage, "note": note, "metric": rec["metric"], "drop": st.fp32_metric - rec["metric"],
             "speedup": rec["speedup"], "latency": rec["latency"], "metric_kind": self.metric_kind,
             "fp32_metric": st.fp32_metric, "assign": diff_assign(full, self.space),
             "plan": self.space.config(full), "n_fp32": n_fp32, "n_layers": len(full),
             "quantized": rec.get("n_quantized", 1) > 0, "seconds": rec.get("seconds"),
             "proxy_fidelity": (rec.get("proxy") or {}).get("fidelity"), "sens_nmse": rec.get("sens_nmse")}
        if st.table is not None:
            p["est_err"] = st.table.err(full)
            p["est_speedup"] = st.table.speedup(full)
        st.points[pkey] = p
        st.full[pkey] = full
        return p

    def feasible(self, p) -> bool:
        return bool(p.get("quantized", True)) and feasible(p, self.state.acc_b, self.state.latency_budget)

    def best(self, tie: float = 0.0) -> Optional[Dict[str, Any]]:
        st = self.state
        return choose([p for p in st.points.values() if self.feasible(p)], st.acc_b, st.latency_budget,
                      st.objective, tie=tie)

    def promising(self, assign: Mapping[str, str]) -> bool:
        """Could this plan beat the best feasible plan measured so far (by the estimates, with a margin)?"""
        best = self.best()
        if best is None:
            return True
        if self.state.objective == "speed":
            return self.state.table.speedup(assign) >= PROMISING_MARGIN * best["speedup"]
        return self.state.table.err(assign) <= best.get("est_err", float("inf")) / PROMISING_MARGIN

    # ------------------------------------------------------------------------------------------ shared caches
    def ref_session(self):
        if self._ref_sess is None:
            self._ref_sess = self.session(self.build(self.ref_assign).model)
        return self._ref_sess

    def ctx_errors(self, ctx: Mapping[str, str]) -> np.ndarray:
        k = self.point_key(ctx)
        if k not in self._ctx_err_cache:
            self._ctx_err_cache[k] = self.sens_proxy.errors(self.session(self.build(ctx).model))[0]
        return self._ctx_err_cache[k]

    def ref_errors(self) -> np.ndarray:
        return self.ctx_errors(self.ref_assign)

    def paired_group(self, node: str, cands: Mapping[str, Any], ctx: Mapping[str, str]) -> Dict[str, Any]:
        res = {}
        for key in cands:
            try:
                sess = self.session(self.build(dict(ctx, **{node: key})).model)
            except BUILD_ERRORS as e:
                res[key] = {"failed": failure(e)}
                continue
            res[key] = self.sens_proxy.paired(sess, self.ctx_errors(ctx))
        return res

    def shapes(self) -> Dict[str, List[int]]:
        """Tensor shapes of the prepared model at the timing feed: the cost models ran it already, else once."""
        if not hasattr(self, "_shapes_cache"):
            src = self.prior if self.prior is not None else self.lat
            self._shapes_cache = src.shapes if isinstance(src, PredictedLatency) else \
                _run_shapes(self.pipe.prepared, self.feed, self.backend)
        return self._shapes_cache

    def prior_ref_s(self) -> float:
        if not hasattr(self, "_prior_ref"):
            self._prior_ref = self.prior.seconds(self.build(self.ref_assign).plan)
        return self._prior_ref

    def ref_seconds(self) -> float:
        if not hasattr(self, "_ref_s"):
            built = self.build(self.ref_assign)
            self._ref_s = self.lat.seconds(built.plan, built.model)
        return self._ref_s

    def ref_latency(self) -> float:
        """The reference plan's latency as a fraction of FP32's."""
        return 1.0 / max(self.state.ref_point["speedup"], 1e-9)

    def measured_dlat(self, r: Mapping[str, Any]) -> Optional[float]:
        """Latency change of an in-place trial vs the reference, as a fraction of the FP32 latency."""
        if "ratio" in r:
            return self.ref_latency() * (1.0 / max(r["ratio"], 1e-9) - 1.0)
        return r.get("dlat")

    def blend(self, r: Dict[str, Any], ref_lat: float) -> float:
        """Measured latency change of one candidate (fraction of FP32 latency), shrunk towards the calibrated
        cost-model prediction by their uncertainties: effects below the timing noise follow the model,
        clear effects follow the measurement."""
        ratio = max(r["ratio"], 1e-9)
        dl = ref_lat * (1.0 / ratio - 1.0)
        se = r.get("se")
        if self.prior is None or "prior_s" not in r or not isinstance(se, float) or not math.isfinite(se) or se <= 0:
            return dl
        se_dl = ref_lat * se / ratio ** 2
        ref_pred = self.prior_ref_s()
        gain_pred = 1.0 - ref_pred / self.prior_fp32_s
        k = 1.0
        if gain_pred > 1e-6 and 1.0 - ref_lat > 0:
            k = min(2.0, max(0.1, (1.0 - ref_lat) / gain_pred))
        prior = k * (r["prior_s"] - ref_pred) / self.prior_fp32_s
        tau = max(0.5 * abs(prior), 0.003)
        w_m, w_p = 1.0 / se_dl ** 2, 1.0 / tau ** 2
        return (dl * w_m + prior * w_p) / (w_m + w_p)
