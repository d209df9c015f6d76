"""Hybrid weight granularity (granularity="hybrid"): per layer, per-tensor or per-channel weights.

Method: the hybrid quantization of GVSL et al., "Hybrid and Non-Uniform Quantization Methods using Retro
Synthesis Data for Efficient Inference" (arXiv 2012.13716): each layer's *sensitivity* to per-tensor
quantization is the divergence between the model's outputs with that layer's weights quantized per-tensor and
the reference outputs; a layer whose sensitivity is small goes per-tensor (cheaper inference), the others stay
per-channel. Here:

* sensitivity (weight-only, activations in FP32, nearest rounding, the plan's own dtype / symmetry): the
  background is every quantized weight at per-channel; layer i's sensitivity is the *extra* divergence when only
  layer i is switched to per-tensor.  Divergence: KL(softmax(FP32) || softmax(quantized)) for class-score
  outputs (rank 2, more than one class), the noise-to-signal ratio otherwise, averaged over the calibration
  proxy samples.  With the user's ``evaluate(model) -> float`` it is the metric's drop instead.  One ORT
  session serves all variants (the candidate weights are graph inputs), so it takes seconds, not minutes.
* harmless: the layers are admitted in order of increasing sensitivity while the admitted sensitivities add up
  to at most a budget (KL_BUDGET nats, NSR_BUDGET, or METRIC_BUDGET of the metric): the damage of the whole
  hybrid plan is bounded, not only each layer's.
* pays: ORT fuses both granularities into QLinearConv / QGemm; per-tensor only saves requantization work (one
  multiplier per output element instead of one per output channel), a few per cent end to end, below the 1-3 %
  noise of a single-layer timing.  So the gain is measured end to end (all-per-channel vs all-per-tensor,
  interleaved rounds with OrtBackend.time, p10 / p90 of the paired ratios reported) and attributed per layer in
  proportion to its requantization work (output elements).  When the measured gain's p10..p90 spans zero the
  measurement is inconclusive and the cost model's prior (per-tensor requantization is never dearer) decides,
  labelled so; when the target is not measurable here (another ISA / backend, or measure_latency=False) the gain
  is predicted from the spec's memory bandwidth (one float multiplier load per output element saved), labelled
  "predicted".  A layer goes per-tensor only when it is harmless AND its gain is positive.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx

from .observers import qrange
from .plan import QuantPlan, TensorQuant
from .weights import weight_qparams

KL_BUDGET = 2e-3        # nats, summed over the per-tensor layers (class-score outputs)
NSR_BUDGET = 2e-3       # noise-to-signal ratio, summed (other outputs)
METRIC_BUDGET = 1e-3    # relative drop of the user's metric, summed (evaluate given)
PROXY_SAMPLES = 256     # calibration samples the sensitivity is judged on, at most ...
PROXY_INPUT_ELEMS = 1e7  # ... and at most this many input elements in all (ImageNet 224x224: 66 samples), min 32
TIMING_REPEATS = 60     # interleaved rounds of the end-to-end timing


def fake_weight(w: np.ndarray, tq: TensorQuant) -> np.ndarray:
    """Nearest-rounded, dequantized copy of ``w`` under ``tq`` (its granularity, dtype, symmetry)."""
    scale, zp = weight_qparams(w, tq)
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    if tq.granularity == "per_channel":
        shape = [1] * w.ndim
        shape[tq.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    q = np.clip(np.rint(w / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


def candidates(plan_pc: QuantPlan, plan_pt: QuantPlan, inits: Mapping[str, Any]) -> List[str]:
    """Layers whose granularity is a real choice: per-channel in one plan, per-tensor in the other (the spec's
    scheme allows both, no per-layer user setting pins it), with a constant weight."""
    out = []
    for n, lp in plan_pc.layers.items():
        q = plan_pt.layers.get(n)
        if (lp.quantize and q is not None and q.quantize and lp.weight is not None and q.weight is not None
                and lp.weight.granularity == "per_channel" and q.weight.granularity == "per_tensor"
                and lp.weight.tensor in inits):
            out.append(n)
    return out


def _divergence(ref: List[np.ndarray], out: List[np.ndarray]) -> Tuple[float, str]:
    """Sum over outputs: mean KL(softmax(ref) || softmax(out)) for (N, C>1) scores, else noise-to-signal."""
    tot, kinds = 0.0, set()
    for r, o in zip(ref, out):
        r, o = r.astype(np.float64), o.astype(np.float64)
        if r.ndim == 2 and r.shape[1] > 1:
            lr = r - r.max(1, keepdims=True)
            lr -= np.log(np.exp(lr).sum(1, keepdims=True))
            lo = o - o.max(1, keepdims=True)
            lo -= np.log(np.exp(lo).sum(1, keepdims=True))
            tot += float(np.mean(np.sum(np.exp(lr) * (lr - lo), axis=1)))
            kinds.add("kl")
        else:
            tot += float(np.sum((o - r) ** 2) / max(np.sum(r ** 2), 1e-30))
            kinds.add("nsr")
    return tot, ("kl" if kinds == {"kl"} else "nsr")


def _weights_as_inputs(model: onnx.ModelProto, names: List[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose initializers ``names`` are graph inputs (one session serves every variant)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [t for t in m.graph.initializer if t.name not in set(names)]
    moved = {t.name: t for t in m.graph.initializer if t.name in set(names)}
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for n in names:
        t = moved[n]
        m.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
    return m


def weight_sensitivities(pipe, w_ref: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                         alt: Mapping[str, Tuple[str, np.ndarray]], *, evaluate: Optional[Callable] = None,
                         samples: int = PROXY_SAMPLES) -> Dict[str, Any]:
    """Extra damage of each candidate ``alt`` {node: (weight tensor, its alternative weight)} over a weight-only
    ``base`` {tensor: weight} background (every other tensor as in the FP32 model): the drop of ``evaluate``
    when given, else the divergence of the outputs (_divergence) from the FP32 ones (``w_ref``: the FP32 values
    of base's tensors) on the first calibration samples. One ORT session serves every variant (the weights are
    graph inputs). Returns {metric: "evaluate" | "kl" | "nsr", background, sensitivity: {node: extra},
    samples, reference (evaluate only)}."""
    from onnx import numpy_helper

    from ..backends.ort import OrtBackend

    sens: Dict[str, float] = {}
    if evaluate is not None:
        def score(ws):
            m = onnx.ModelProto()
            m.CopyFrom(pipe.prepared)
            for t in m.graph.initializer:
                if t.name in ws:
                    t.CopyFrom(numpy_helper.from_array(ws[t.name], t.name))
            return float(evaluate(m))

        ref = score({})
        s_base = score(base)
        for n, (t, a) in alt.items():
            sens[n] = s_base - score({**base, t: a})
        return {"metric": "evaluate", "reference": ref, "background": ref - s_base, "sensitivity": sens,
                "samples": None}
    per_sample = sum(int(np.prod(v.shape[1:])) for v in pipe.calib.first_batch().values()) or 1
    batches = pipe.first_batches(int(max(32, min(samples, PROXY_INPUT_ELEMS // per_sample))), exact=True)
    model = _weights_as_inputs(pipe.prepared, list(w_ref))
    be = OrtBackend(threads=pipe.opts.threads)
    sess = be.compile(model)

    def outs(ws):
        res = [be.run(sess, {**b, **ws}) for b in batches]
        return [np.concatenate([r[k] for r in res], 0) for k in range(len(res[0]))]

    ref = outs(dict(w_ref))
    d_base, kind = _divergence(ref, outs(dict(base)))
    for n, (t, a) in alt.items():
        d, _ = _divergence(ref, outs({**base, t: a}))
        sens[n] = d - d_base
    n_s = sum(len(next(iter(b.values()))) for b in batches)
    return {"metric": kind, "background": d_base, "sensitivity": sens, "samples": n_s}


def sensitivities(pipe, plan_pc: QuantPlan, plan_pt: QuantPlan, cands: List[str], *,
                  evaluate: Optional[Callable] = None, samples: int = PROXY_SAMPLES) -> Dict[str, Any]:
    """Extra divergence (or metric drop) of each candidate when only it is per-tensor, over an all-per-channel
    weight-only background."""
    from onnx import numpy_helper

    inits = {t.name: t for t in pipe.prepared.graph.initializer}
    wq = {lp.weight.tensor: lp.weight for lp in plan_pc.quantized_layers()
          if lp.weight is not None and lp.weight.tensor in inits}
    w = {t: numpy_helper.to_array(inits[t]).astype(np.float32) for t in wq}
    base = {t: fake_weight(w[t], tq) for t, tq in wq.items()}
    alt = {n: (plan_pc.layers[n].weight.tensor,
               fake_weight(w[plan_pt.layers[n].weight.tensor], plan_pt.layers[n].weight)) for n in cands}
    out = weight_sensitivities(pipe, w, base, alt, evaluate=evaluate, samples=samples)
    if out["metric"] == "evaluate":
        out["definition"] = ("drop of the user's evaluate(model) when only this layer is per-tensor (weights only, "
                             "over an all-per-channel background)")
        out["budget"] = _budget(pipe, METRIC_BUDGET) * max(abs(out["reference"]), 1e-12)
        return out
    label = "KL(softmax FP32 || softmax quantized), nats" if out["metric"] == "kl" else \
        "noise-to-signal ratio of the outputs"
    out["definition"] = (f"extra {label} on {out['samples']} calibration samples when only this layer's weights are "
                         "per-tensor (weights only, over an all-per-channel background)")
    out["budget"] = _budget(pipe, KL_BUDGET if out["metric"] == "kl" else NSR_BUDGET)
    return out


def _budget(pipe, default: float) -> float:
    """QuantOptions.hybrid_budget when set (a relative drop with evaluate=), else the default for the metric."""
    b = pipe.opts.hybrid_budget
    return float(default if b is None else b)


def requant_work(pipe, plan: QuantPlan, cands: List[str]) -> Dict[str, float]:
    """Output elements of each candidate at the timing feed (batch 1): its requantization work."""
    from ..search.evaluators import _run_shapes
    from ..backends.ort import OrtBackend

    shapes = _run_shapes(pipe.prepared, pipe.timing_feed(), OrtBackend(threads=pipe.opts.threads))
    out = {}
    for node in pipe.prepared.graph.node:
        if node.name in cands:
            s = shapes.get(node.output[0])
            out[node.name] = float(np.prod(s)) if s is not None else 0.0
    return out


def latency_gain(pipe, cands: List[str], work: Mapping[str, float], *, measure: bool,
                 build: Optional[Callable[[str], Any]] = None) -> Dict[str, Any]:
    """Fraction of the all-per-channel latency that per-tensor saves, in all and per layer (by requant work)."""
    from ..search.evaluators import target_reachable

    total_work = sum(work.values()) or 1.0
    reachable, why = target_reachable(pipe.spec)
    info: Dict[str, Any] = {}
    if measure and reachable and build is not None:
        from ..backends.ort import OrtBackend

        models = {"per_channel": build("per_channel").model, "per_tensor": build("per_tensor").model}
        tr = OrtBackend(threads=pipe.opts.threads).time(models, pipe.timing_feed(), repeats=TIMING_REPEATS, warmup=3)
        sp = tr.speedup_spread("per_tensor")
        g = {k: 1.0 - 1.0 / v for k, v in sp.items()}      # saved fraction of the per-channel time
        conclusive = g["p10"] > 0 or g["p90"] < 0
        info = {"source": "measured", "gain": g["median"], "gain_p10": g["p10"], "gain_p90": g["p90"],
                "conclusive": conclusive, "repeats": TIMING_REPEATS, "threads": pipe.opts.threads,
                "per_channel_ms": tr.timings[0].median * 1e3, "per_tensor_ms": tr.timings[1].median * 1e3,
                "label": (f"measured end to end on this host (ONNX Runtime, {pipe.opts.threads} thread(s), "
                          f"{TIMING_REPEATS} interleaved rounds), attributed per layer by requantization work")}
        if conclusive:
            info["per_layer"] = {n: g["median"] * work[n] / total_work for n in cands}
            return info
        info["label"] += ("; inconclusive (p10..p90 spans 0): the cost-model prior decides (per-tensor "
                          "requantization is never dearer), per-layer gains below are predicted")
    else:
        info = {"source": "predicted", "label": "predicted from the spec's cost model (target not measured here: "
                + (why if not reachable else "measure_latency=False") + ")"}
    cm = getattr(pipe.spec, "cost_model", None)
    bw = cm.memory_bandwidth_bytes_per_s if cm is not None else 1e10
    per = {n: 4.0 * work[n] / bw for n in cands}                      # seconds saved per layer
    info["per_layer_s"] = per
    fp32_s = max(_fp32_seconds(pipe), 1e-9)
    info["per_layer"] = {n: per[n] / fp32_s for n in cands}
    info.setdefault("gain", sum(info["per_layer"].values()))
    return info


def _fp32_seconds(pipe) -> float:
    """The spec's predicted FP32 latency (roofline), to turn saved seconds into a fraction."""
    from ..backends.ort import OrtBackend
    from ..search.evaluators import PredictedLatency

    return PredictedLatency(pipe.spec, pipe.prepared, pipe.timing_feed(),
                            OrtBackend(threads=pipe.opts.threads)).seconds(None)


def select_granularity(pipe, *, evaluate: Optional[Callable] = None, measure_latency: bool = True,
                       build: Optional[Callable[[str], Any]] = None) -> Tuple[Dict[str, bool], Dict[str, Any]]:
    """Per-layer ``per_channel`` choices for granularity="hybrid" and the report section.

    build(granularity) -> Built is used for the end-to-end timing (default: pipe.build(granularity=...))."""
    t0 = time.perf_counter()
    plan_pc = pipe.annotate(pipe.options(granularity="per_channel"), allow_empty=True)
    plan_pt = pipe.annotate(pipe.options(granularity="per_tensor"), allow_empty=True)
    inits = {t.name for t in pipe.prepared.graph.initializer}
    cands = candidates(plan_pc, plan_pt, inits)
    info: Dict[str, Any] = {"candidates": len(cands), "layers": []}
    if not cands:
        info.update(seconds=time.perf_counter() - t0, note="no layer can take either granularity on this target")
        return {}, info
    sens = sensitivities(pipe, plan_pc, plan_pt, cands, evaluate=evaluate)
    work = requant_work(pipe, plan_pc, cands)
    if build is None:
        def build(g):
            return pipe.build(granularity=g, sanity=False)
    lat = latency_gain(pipe, cands, work, measure=measure_latency, build=build)
    s = sens["sensitivity"]
    order = sorted(cands, key=lambda n: (s[n], -lat["per_layer"][n]))
    used, choice = 0.0, {}
    for n in order:
        harmless = used + max(s[n], 0.0) <= sens["budget"]
        pays = lat["per_layer"][n] > 0
        choice[n] = not (harmless and pays)       # per_channel?
        if not choice[n]:
            used += max(s[n], 0.0)
        why = ("per_tensor: harmless and pays" if not choice[n] else
               "per_channel: " + ("sensitive (would exceed the budget)" if not harmless else "no latency gain"))
        info["layers"].append({"node": n, "op": plan_pc.layers[n].op_type, "sensitivity": s[n],
                               "requant_elements": work[n], "latency_gain": lat["per_layer"][n],
                               "choice": "per_channel" if choice[n] else "per_tensor", "why": why})
    pos = {n: i for i, n in enumerate(cands)}
    info["layers"].sort(key=lambda r: pos[r["node"]])
    info.update(sensitivity={k: v for k, v in sens.items() if k != "sensitivity"}, latency=lat,
                budget_used=used, per_tensor=sum(1 for v in choice.values() if not v),
                per_channel=sum(1 for v in choice.values() if v), seconds=time.perf_counter() - t0)
    return choice, info


def annotate_plan(plan: QuantPlan, info: Mapping[str, Any]) -> None:
    """Each decided layer's reason / notes say why (the plan JSON records it)."""
    kind = info.get("sensitivity", {}).get("metric")
    for r in info.get("layers", []):
        lp = plan.layers.get(r["node"])
        if lp is None or not lp.quantize:
            continue
        note = (f"hybrid granularity: {r['why']} (sensitivity {r['sensitivity']:.3g} {kind}, latency gain "
                f"{100 * r['latency_gain']:.2f} % {info['latency']['source']})")
        lp.notes.append(note)
        lp.reason = f"{lp.reason}; {note}" if lp.reason else note


def build_hybrid(pipe, *, evaluate: Optional[Callable] = None, measure_latency: bool = True):
    """granularity="hybrid" without a search: select, then build with the choices as per-layer ``per_channel``
    defaults (Pipeline.hybrid_per_channel: a user's per-layer setting still wins, and the sanity check still
    judges these layers); built.info["hybrid"] becomes report["hybrid"]."""
    from ..pipeline import _progress

    choice, info = select_granularity(pipe, evaluate=evaluate, measure_latency=measure_latency)
    _progress(pipe.progress, f"hybrid granularity: {info.get('per_tensor', 0)} layer(s) per-tensor, "
                             f"{info.get('per_channel', 0)} per-channel, chosen in {info['seconds']:.1f} s "
                             f"(latency {info.get('latency', {}).get('source', '-')})")
    pipe.hybrid_per_channel = dict(choice)
    built = pipe.build()
    annotate_plan(built.plan, info)
    built.info["hybrid"] = info
    return built


def hybrid_assign(pipe, space, ref_assign: Mapping[str, str], *, evaluate: Optional[Callable] = None,
                  measure_latency: bool = True) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """The hybrid plan as a search assignment (node -> candidate key): each layer's reference candidate with
    its ``per_channel`` set to the hybrid choice, where the search space holds that candidate."""
    choice, info = select_granularity(pipe, evaluate=evaluate, measure_latency=measure_latency)
    assign: Dict[str, str] = {}
    for n, pc in choice.items():
        ls = space.layers.get(n)
        if ls is None:
            continue
        want = dict(ls.candidates[ref_assign[n]].config, per_channel=pc)
        for key, c in ls.active().items():
            if c.config == want:
                assign[n] = key
                break
    return assign, info
