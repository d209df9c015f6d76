"""Evaluators: accuracy (the user's metric or a calibration-set proxy) and latency (measured or predicted).

Accuracy
    ``UserMetric(evaluate)``: ``evaluate(model: onnx.ModelProto) -> float``, higher is better, in the user's
    units; the accuracy budget is a maximum drop in those units.
    ``FidelityProxy``: when no metric is given. ``fidelity = 1 - sum ||y - y_fp32||^2 / sum ||y_fp32||^2`` over
    all float outputs of the deployed (ORT, fully optimised) model on calibration samples; FP32 scores 1.0,
    so a drop of ``d`` means an output SQNR of ``-10 log10(d)`` dB. The calibration samples also set the
    ranges, so the proxy is optimistic; reports name it as a proxy. For 2-D logits the top-1 agreement with
    FP32 is recorded beside it.

Latency (every figure carries ``"measured"`` or ``"predicted"``)
    ``MeasuredLatency``: the latency backend (ONNX Runtime on this machine, TVM here or over TVM RPC on the
    device: hago_py.backends.select), batch 1, round-robin interleaved timing; speed-ups are medians of per-round
    paired ratios, so drift and other tenants hit both sides alike.
    ``PredictedLatency``: the spec's roofline cost model (hago_py.hw.cost) per node of the plan, plus the
    memory traffic of the quantize / dequantize conversions at the int8 region's boundaries; for targets this
    machine cannot run (T4, ARM) and for deterministic runs.
    ``FunctionLatency``: a user function ``fn(model, plan) -> seconds`` (plan None for FP32), labelled
    predicted: injected cost models, deterministic tests.
"""
from __future__ import annotations

import math
import platform
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..backends.base import measured_on
from ..backends.ort import OrtBackend
from ..errors import OptionError, SearchError
from ..hw.cost import predict_layer_latency
from ..quant.padding import real_rows
from ..quant.plan import QuantPlan

# --------------------------------------------------------------------------------------------- accuracy


def _float_outputs(outs: Sequence[np.ndarray]) -> List[np.ndarray]:
    return [np.asarray(o, np.float64) for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating)]


class FidelityProxy:
    kind = "proxy"
    name = "output fidelity vs FP32 (proxy)"
    definition = ("1 - normalised MSE of the model outputs vs FP32: 1 - sum||y - y_fp32||^2 / sum||y_fp32||^2 over "
                  "all float outputs, on {n} calibration samples, deployed with ONNX Runtime; FP32 = 1.0; a drop d "
                  "is an output SQNR of -10*log10(d) dB. Proxy: the calibration samples also set the ranges.")

    def __init__(self, backend: OrtBackend, fp_session, batches: Sequence[Mapping[str, np.ndarray]],
                 mask_input: Optional[str] = None):
        self.backend = backend
        self.batches = list(batches)
        if not self.batches:
            raise OptionError("the search proxy needs calibration samples; give at least one")
        # a token mask input: padding rows of token-wise outputs are left out (their values are not preserved
        # where dynamic ranges exclude padding, quant/padding.py, and mean nothing to the user anyway)
        self.masks = [b.get(mask_input) if mask_input else None for b in self.batches]
        self.ref = [self._outputs(fp_session, b, m) for b, m in zip(self.batches, self.masks)]
        self.energy = sum(float(np.sum(o ** 2)) for outs in self.ref for o in outs)
        self.samples = sum(len(next(iter(b.values()))) for b in self.batches)
        self.classifier = all(len(outs) == 1 and outs[0].ndim == 2 and outs[0].shape[1] > 1 for outs in self.ref)

    def describe(self) -> str:
        return self.definition.format(n=self.samples)

    def _outputs(self, session, batch, mask) -> List[np.ndarray]:
        return [real_rows(o, mask) for o in _float_outputs(self.backend.run(session, batch))]

    def errors(self, session) -> Tuple[np.ndarray, int]:
        """Per-sample squared output errors normalised so that their mean is the normalised MSE (paired
        comparisons between candidates use them), and the number of top-1 agreements (classifiers)."""
        per, agree = self.raw_errors(session)
        return per * (len(per) / max(self.energy, 1e-30)), agree

    def ref_energy(self, n: int) -> float:
        """Output energy of the first ``n`` samples (to normalise a prefix of raw_errors)."""
        e, seen = 0.0, 0
        for b, ref in zip(self.batches, self.ref):
            k = min(len(next(iter(b.values()))), n - seen)
            if k <= 0:
                break
            for r in ref:
                e += float(np.sum(r[:k] ** 2)) if r.ndim >= 1 and r.shape[0] == len(next(iter(b.values()))) \
                    else float(np.sum(r ** 2)) * k / len(next(iter(b.values())))
            seen += k
        return e

    def raw_errors(self, session) -> Tuple[np.ndarray, int]:
        per, agree = [], 0
        for b, ref, mask in zip(self.batches, self.ref, self.masks):
            n = len(next(iter(b.values())))
            outs = self._outputs(session, b, mask)
            e = np.zeros(n)
            for r, o in zip(ref, outs):
                sq = (o - r) ** 2
                if sq.ndim >= 1 and sq.shape[0] == n:
                    e += sq.reshape(n, -1).sum(axis=1)
                else:
                    e += float(sq.sum()) / n
            per.append(e)
            if self.classifier:
                agree += int(np.sum(np.argmax(outs[0], axis=1) == np.argmax(ref[0], axis=1)))
        return np.concatenate(per), agree

    def details(self, session, raw: Optional[Tuple[np.ndarray, int]] = None) -> Dict[str, float]:
        per, agree = raw if raw is not None else self.raw_errors(session)
        nmse = float(per.sum() / max(self.energy, 1e-30))
        d = {"fidelity": 1.0 - nmse, "nmse": nmse,
             "sqnr_db": float("inf") if nmse == 0 else -10.0 * math.log10(max(nmse, 1e-30))}
        if self.classifier:
            d["top1_agreement"] = agree / max(self.samples, 1)
        return d

    def paired(self, session, ref_errors: np.ndarray) -> Dict[str, float]:
        """Normalised MSE of ``session`` and its paired difference to a reference's per-sample errors."""
        per, _ = self.errors(session)
        d = per - ref_errors
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")
        return {"nmse": float(per.mean()), "dnmse": float(d.mean()), "dnmse_se": se}

    def score(self, session) -> float:
        return self.details(session)["fidelity"]


class UserMetric:
    kind = "user"

    def __init__(self, evaluate: Callable[[onnx.ModelProto], float]):
        if not callable(evaluate):
            raise OptionError(f"evaluate must be a callable evaluate(model: onnx.ModelProto) -> float, "
                              f"got {type(evaluate).__name__}")
        self.fn = evaluate
        # a ``metric_name`` attribute names the metric in the report; else the function's own name
        self.name = str(getattr(evaluate, "metric_name", None) or getattr(
            evaluate, "__qualname__", getattr(evaluate, "__name__", type(evaluate).__name__)).split("<locals>.")[-1])

    def describe(self) -> str:
        return f"user metric {self.name}(model) (higher is better)"

    def score(self, model: onnx.ModelProto) -> float:
        v = self.fn(model)
        try:
            v = float(v)
        except (TypeError, ValueError) as e:
            raise OptionError(f"evaluate({self.name}) must return a float (higher is better), got "
                              f"{type(v).__name__}") from e
        if not math.isfinite(v):
            raise SearchError(f"evaluate({self.name}) returned {v} for a candidate model; the metric must be finite "
                              "(check the validation loop on quantized models)")
        return v


# --------------------------------------------------------------------------------------------- latency


def target_reachable(spec) -> Tuple[bool, str]:
    """Can latency for ``spec`` be measured on this machine (same backend, execution provider and ISA)?"""
    backend = spec.backend_name
    if backend != "ort":
        return False, f"target backend {backend!r} is not available here (only ONNX Runtime is measured)"
    try:
        import onnxruntime as ort

        eps = ort.get_available_providers()
    except Exception as e:  # pragma: no cover - ORT is a hard dependency
        return False, f"ONNX Runtime unavailable ({e})"
    ep = spec.execution_provider or "CPUExecutionProvider"
    if ep not in eps:
        return False, f"execution provider {ep} of target {spec.name} is not available here ({', '.join(eps)})"
    isa = [i.lower() for i in spec.isa]
    machine = platform.machine().lower()
    arm_host = machine in ("aarch64", "arm64")
    arm_target = any(i.startswith("armv") or i in ("neon", "dotprod") for i in isa)
    if arm_target != arm_host:
        return False, f"target {spec.name} is {'ARM' if arm_target else 'x86'}, this machine is {machine}"
    if not arm_host:
        flags = _cpu_flags()
        missing = [i for i in isa if i not in flags]
        if flags and missing:
            return False, f"this CPU lacks {', '.join(missing)} required by target {spec.name}"
    return True, f"ONNX Runtime {ep} on this machine ({machine})"


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


LOW_QUANTILE = 10   # percentile of each model's round times used for ratios (robust to other tenants)


def ratio_stats(base: Sequence[float], other: Sequence[float], *, seed: int = 0, boot: int = 200) -> Dict[str, float]:
    """Speed ratio base / other from interleaved rounds.

    ``ratio``: ratio of the two models' low quantiles (p10) — on a shared machine a round is either clean or
    hit by another tenant, and the low quantile of each model is set by its clean rounds, so it is far more
    stable than medians under load (std ~1 % vs up to 10 % measured on 2 busy cores). ``paired_median``,
    ``p10``/``p90``: per-round paired ratios (the figures api.finish and the benchmarks report).
    ``se``: bootstrap standard error of ``ratio`` (rounds resampled in pairs)."""
    b, o = np.asarray(base, np.float64), np.asarray(other, np.float64)
    r = b / o
    out = {"ratio": float(np.percentile(b, LOW_QUANTILE) / np.percentile(o, LOW_QUANTILE)),
           "paired_median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
           "p90": float(np.percentile(r, 90))}
    if len(b) >= 4 and boot > 0:
        idx = np.random.default_rng(seed).integers(0, len(b), (boot, len(b)))
        rs = np.percentile(b[idx], LOW_QUANTILE, axis=1) / np.percentile(o[idx], LOW_QUANTILE, axis=1)
        out["se"] = float(np.std(rs))
    else:
        out["se"] = float("nan")
    return out


class MeasuredLatency:
    kind = "measured"

    def __init__(self, backend: OrtBackend, feed: Mapping[str, np.ndarray], *, plan_repeats: int = 30,
                 plan_min_time_s: float = 1.5, layer_repeats: int = 15, layer_min_time_s: float = 0.4,
                 warmup: int = 3):
        self.backend, self.feed = backend, dict(feed)
        self.plan_repeats, self.plan_min_time_s = plan_repeats, plan_min_time_s
        self.layer_repeats, self.layer_min_time_s = layer_repeats, layer_min_time_s
        self.warmup = warmup

    def describe(self) -> str:
        # ORT keeps the words its checkpoints were written with (a run's identity includes this text)
        on = "ONNX Runtime CPU" if getattr(self.backend, "name", "ort") == "ort" else measured_on(self.backend)
        return (f"measured: {on}, {self.backend.threads} thread(s), batch 1, round-robin interleaved; "
                f"ratios of each model's p{LOW_QUANTILE} round time (robust on a shared machine), per-round paired "
                "medians recorded beside them")

    def where(self) -> str:
        return measured_on(self.backend)

    def compare(self, sessions: Mapping[str, Any], *, layer: bool = False) -> Dict[str, Dict[str, float]]:
        """Time ``sessions`` interleaved; the first is the baseline. Returns per label: ratio (baseline / label,
        >1 = faster), spread p10/p90, median_ms, repeats."""
        reps, tmin = (self.layer_repeats, self.layer_min_time_s) if layer else (self.plan_repeats, self.plan_min_time_s)
        tr = self.backend.time(dict(sessions), self.feed, repeats=reps, warmup=self.warmup, min_time_s=tmin)
        base = tr.baseline
        out = {}
        for i, t in enumerate(tr.timings):
            p = ratio_stats(base.samples, t.samples, seed=i)
            out[t.label] = dict(p, median_ms=t.median * 1e3, low_ms=float(np.percentile(t.samples, LOW_QUANTILE)) * 1e3,
                                repeats=len(t.samples))
        return out


class PredictedLatency:
    """Roofline latency of a plan, node by node, from the spec's cost model."""

    kind = "predicted"

    def __init__(self, spec, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], backend: OrtBackend):
        self.spec = spec
        self.model = model
        self.shapes = _run_shapes(model, feed, backend)
        self.inits = {i.name: list(i.dims) for i in model.graph.initializer}
        self.nodes = [n for n in model.graph.node if n.op_type not in ("Constant",)]
        self.producer = {o: n.name for n in self.nodes for o in n.output}
        self.consumers: Dict[str, List[str]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n.name)
        self.by_name = {n.name: n for n in self.nodes}
        self.cm = spec.cost_model
        self.bw = self.cm.memory_bandwidth_bytes_per_s

    def describe(self) -> str:
        return (f"predicted: roofline cost model of spec {self.spec.name} (int8 peak "
                f"{self.cm.peak_int8_ops_per_s:.3g} op/s, FP32 peak {self.cm.peak_fp32_flops_per_s:.3g} FLOP/s, "
                f"{self.bw:.3g} B/s) per node, plus Q/DQ traffic at the int8 region's boundaries")

    def where(self) -> str:
        return f"predicted by the cost model of spec {self.spec.name}"

    def _numel(self, t: str) -> int:
        s = self.shapes.get(t)
        if s is None:
            s = self.inits.get(t)
        return int(np.prod(s)) if s is not None else 0

    def _features(self, node) -> Dict[str, float]:
        ins = [i for i in node.input if i and i not in self.inits]
        act = 4.0 * (sum(self._numel(i) for i in ins) + sum(self._numel(o) for o in node.output if o))
        wbytes, macs = 0.0, 0.0
        out = self._numel(node.output[0]) if node.output else 0
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in self.inits:
            w = self.inits[node.input[1]]
            wbytes = 4.0 * float(np.prod(w))
            if node.op_type == "Conv":
                macs = float(out) * float(np.prod(w[1:]))
            else:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                k = w[1] if (node.op_type == "Gemm" and trans_b) else w[0]
                macs = float(out) * float(k)
        else:
            macs = float(out)
        return {"macs": macs, "weight_bytes_fp32": wbytes, "act_bytes_fp32": act}

    def seconds(self, plan: Optional[QuantPlan], model: Optional[onnx.ModelProto] = None) -> float:
        int_nodes: Dict[str, Any] = {}    # node -> LayerPlan of a quantized anchor (or 'fused' / 'pass')
        q_inputs: Dict[str, set] = {}     # tensor -> nodes consuming it as int8
        if plan is not None:
            for lp in plan.quantized_layers():
                int_nodes[lp.node] = lp
                for f in lp.fused[1:]:
                    int_nodes[f] = "fused"
                for i in lp.inputs:
                    q_inputs.setdefault(i, set()).add(lp.node)
            for t, tq in plan.activations.items():
                if tq.shared_with is not None and t in self.producer:
                    int_nodes.setdefault(self.producer[t], "pass")
                    q_inputs.setdefault(tq.shared_with, set()).add(self.producer[t])
        total = 0.0
        for node in self.nodes:
            feats = self._features(node)
            st = int_nodes.get(node.name)
            if st == "fused":
                continue
            if st == "pass":
                total += feats["act_bytes_fp32"] / 4.0 / self.bw
                continue
            if st is None or getattr(st, "simulated", False):
                total += predict_layer_latency({**feats, "quantized": False}, self.cm)
                continue
            lp = st
            wb = (lp.scheme or {}).get("weight_bits") or (lp.weight.bits if lp.weight else 8)
            ab = (lp.scheme or {}).get("activation_bits", 8)
            total += predict_layer_latency({**feats, "quantized": True, "weight_bits": int(wb),
                                            "activation_bits": int(ab)}, self.cm)
        if plan is not None:
            for t, tq in plan.activations.items():
                if tq.shared_with is not None:
                    continue
                nbytes = float(self._numel(t))
                p = int_nodes.get(self.producer.get(t, ""))
                produced_int = p in ("pass", "fused") or (
                    p is not None and not isinstance(p, str) and p.output == t and not p.simulated)
                if tq.mode == "dynamic":
                    total += nbytes * 9.0 / self.bw     # two float reads (range, quantize) + one int8 write
                    continue
                if not produced_int:
                    total += nbytes * 5.0 / self.bw     # QuantizeLinear: float read + int8 write
                for c in self.consumers.get(t, []):
                    if c not in q_inputs.get(t, set()):
                        total += nbytes * 5.0 / self.bw  # DequantizeLinear for a float consumer
        return total


def _run_shapes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], backend: OrtBackend) -> Dict[str, List[int]]:
    from ..quant.calibrate import with_outputs

    names = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o]
    aug = with_outputs(model, names)
    sess = backend.compile(aug, optimization="basic")
    outs = backend.run(sess, feed)
    shapes = {o.name: list(np.asarray(v).shape) for o, v in zip(sess.get_outputs(), outs)}
    for k, v in feed.items():
        shapes[k] = list(np.asarray(v).shape)
    return shapes


class FunctionLatency:
    kind = "predicted"

    def __init__(self, fn: Callable[[onnx.ModelProto, Optional[QuantPlan]], float]):
        if not callable(fn):
            raise OptionError("latency must be 'auto', 'measured', 'predicted' or a callable fn(model, plan) -> seconds")
        self.fn = fn
        self.name = getattr(fn, "__qualname__", type(fn).__name__)

    def describe(self) -> str:
        return f"predicted: user latency function {self.name}(model, plan)"

    def where(self) -> str:
        return f"predicted by the user latency function {self.name}"

    def seconds(self, plan: Optional[QuantPlan], model: Optional[onnx.ModelProto] = None) -> float:
        v = float(self.fn(model, plan))
        if not (math.isfinite(v) and v > 0):
            raise SearchError(f"latency function {self.name} returned {v}; it must return a positive number of seconds")
        return v
