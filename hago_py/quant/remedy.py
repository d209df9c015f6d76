"""Saturation remedies, driven by the spec's saturation hazards and chosen by measurement.

On AVX2 without VNNI, ORT's u8 x s8 kernels use vpmaddubsw, which adds two u8*s8 products into a
saturating int16 (2 * 255 * 127 > 32767). A spec lists such a hazard with the remedies the target offers:
* ``reduce_range``: 7-bit weights in the int8 container (2 * 255 * 63 < 32767: cannot saturate);
* ``u8u8``: unsigned weights with zero point 128, which MLAS runs on a widening u8 x u8 kernel.
With ``saturation_remedy="auto"`` every candidate (none + the spec's remedies) is realized, its fused
integer model is compared with FP32 on calibration batches (SQNR) and the candidates that match the best
accuracy within SQNR_TOLERANCE_DB are kept; the least intrusive of those wins. Every figure is recorded in the report.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Tuple

import onnx

from .annotate import is_depthwise
from .plan import QuantPlan

SATURATION_THRESHOLD_DB = 40.0  # a layer whose saturation error is 40 dB below its output needs no remedy
SQNR_TOLERANCE_DB = 3.0  # measured on Lite0: reduce_range@saturating at -2.3 dB scored +0.5 pp, u8u8 ran 1.25x slower


def affected_layers(model: onnx.ModelProto, plan: QuantPlan, hazard) -> List[str]:
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for lp in plan.quantized_layers():
        if lp.weight is None or lp.scheme is None or lp.simulated:
            continue  # simulated layers run as float fake-quant: no integer kernel to saturate
        if lp.scheme.get("activation_dtype") != hazard.activation_dtype or lp.weight.dtype != hazard.weight_dtype:
            continue
        # dynamic MatMulInteger on AVX2 also uses the u8s8 path: included like static layers
        node = nodes.get(lp.node)
        if node is not None and is_depthwise(node, inits.get(lp.weight.tensor, [0, 0])):
            continue  # depthwise kernels accumulate per tap in int32: no pair-sum hazard
        out.append(lp.node)
    return out


def apply_remedy(plan: QuantPlan, remedy: str, layers: List[str], spec, hazard) -> QuantPlan:
    for name in layers:
        lp = plan.layers[name]
        if remedy == "none":
            continue
        if remedy == "reduce_range":
            lp.weight.bits = min(lp.weight.bits, int(hazard.max_safe_weight_bits or 7))
        elif remedy == "u8u8":
            if spec.find_scheme(lp.op_type, lp.weight.bits, lp.scheme.get("activation_bits", 8),
                                weight_dtype="uint8") is None:
                continue
            lp.weight.dtype = "uint8"
            lp.weight.symmetric = True
            lp.weight.narrow = False
            lp.scheme = dict(lp.scheme, weight_dtype="uint8")
        lp.remedy = remedy
        lp.notes.append(f"saturation hazard {hazard.name} ({hazard.instruction}): remedy {remedy}")
    return plan


def _judging_plan(plan: QuantPlan) -> QuantPlan:
    """The plan the remedy candidates are realized from: nearest rounding, and simulated layers with fewer than
    8 weight bits judged at 8 (int8) — their W4 rounding error would otherwise swamp the fused SQNR and hide the
    saturation of the integer-kernel layers (measured: ResNet-20 W4 with first/last layer W8, FlexRound, scored
    -0.79 pp with the remedy judged on W4 weights ('none' chosen), -0.19 pp with 7-bit weights)."""
    p = plan.nearest_copy()
    for lp in p.quantized_layers():
        if lp.simulated and lp.weight is not None and lp.weight.bits < 8:
            lp.weight.bits, lp.weight.dtype = 8, "int8"
    return p


def select_candidate(sqnr: Dict[str, float], tolerance_db: float = SQNR_TOLERANCE_DB) -> Tuple[str, str]:
    """The least intrusive candidate (first in ``sqnr``'s order) whose fused SQNR is within ``tolerance_db`` of
    the best one; returns (candidate, why).

    Non-finite figures are handled explicitly: +inf means a perfect match (only other +inf candidates are
    within tolerance of it), -inf is the worst possible figure and NaN (no valid measurement) never wins
    unless every candidate is NaN, in which case the first (least intrusive) candidate is kept. The result
    depends only on the figures and their order, so it is deterministic.
    """
    if not sqnr:
        raise ValueError("select_candidate needs at least one candidate")
    names = list(sqnr)
    vals = {c: float(sqnr[c]) if sqnr[c] is not None else float("nan") for c in names}
    valid = [c for c in names if not math.isnan(vals[c])]
    if not valid:
        return names[0], (f"{names[0]}: no candidate gave a valid fused SQNR (all NaN); kept the least "
                          f"intrusive candidate")
    best = max(vals[c] for c in valid)
    if best == math.inf:
        close = [c for c in valid if vals[c] == math.inf]
        best_s = "inf (exact match)"
    elif best == -math.inf:
        close = valid
        best_s = "-inf"
    else:
        close = [c for c in valid if vals[c] >= best - tolerance_db]
        best_s = f"{best:.1f} dB"
    choice = close[0]
    ignored = len(names) - len(valid)
    skipped = f"; {ignored} candidate(s) without a valid SQNR (NaN) ignored" if ignored else ""
    return choice, (f"{choice}: least intrusive candidate within {tolerance_db} dB of the best fused SQNR "
                    f"({best_s}){skipped}")


def choose_remedy(model: onnx.ModelProto, plan: QuantPlan, spec, opts, batches) -> Dict[str, Any]:
    from .artifact import sqnr_db
    from .realize import realize
    from ..backends.ort import OrtBackend

    hazards = [h for h in spec.saturation_hazards]
    forced = {n: opts.layer(n, "remedy") for n in plan.layers if opts.layer(n, "remedy") is not None}
    if not hazards:
        return {"hazard": None, "chosen": "none", "why": f"target {spec.name} lists no saturation hazard"}
    info: Dict[str, Any] = {"hazards": [h.name for h in hazards], "candidates": {}}
    chosen_all = []
    for hazard in hazards:
        layers = affected_layers(model, plan, hazard)
        for n in [n for n in layers if n in forced]:  # per-layer setting (search / user) wins
            apply_remedy(plan, forced[n], [n], spec, hazard)
        if forced:
            info.setdefault("per_layer", {}).update({n: forced[n] for n in layers if n in forced})
        layers = [n for n in layers if n not in forced]
        if not layers:
            info["candidates"][hazard.name] = {}
            continue
        be = OrtBackend(threads=opts.threads)
        sat = layer_saturation(model, plan, layers, hazard, batches, be)
        saturating = [n for n in layers if sat.get(n, float("inf")) < SATURATION_THRESHOLD_DB]
        for n in layers:
            plan.layers[n].notes.append(f"estimated {hazard.instruction} saturation SQNR "
                                        f"{sat.get(n, float('nan')):.1f} dB")
        if opts.saturation_remedy != "auto":
            rem, _, scope = opts.saturation_remedy.partition("@")
            apply_remedy(plan, rem, saturating if scope else layers, spec, hazard)
            chosen_all.append(opts.saturation_remedy)
            info["why"] = "set by option saturation_remedy"
            info["saturating_layers"] = saturating
            continue
        remedies = [r for r in hazard.remedies if r != "none"]
        # candidate name -> (remedy, layers it applies to)
        candidates: Dict[str, tuple] = {"none": ("none", [])}
        for r in remedies:
            if 0 < len(saturating) < len(layers):
                candidates[f"{r}@saturating"] = (r, saturating)
            candidates[r] = (r, layers)
        info["saturating_layers"] = saturating
        info["layer_saturation_sqnr_db"] = {n: sat[n] for n in layers if n in sat}
        out_names = [o.name for o in model.graph.output]
        fp = [o for b in be.predict(model, batches) for o in b]
        results, models = {}, {}
        for cand, (rem, lays) in candidates.items():
            # judged with nearest rounding: data-driven rounding runs after the remedy, on its result
            p = apply_remedy(_judging_plan(plan), rem, lays, spec, hazard)
            q = realize(model, p)
            fused = [o for b in be.predict(q, batches, output_names=out_names) for o in b]
            results[cand] = {"sqnr_fused_db": float(sqnr_db(fp, fused)), "layers": len(lays)}
            models[cand] = q
        # The least intrusive candidate (spec order: none, then each remedy on the saturating layers, then on
        # all) within the tolerance wins. Latency is not used here: per-candidate timings on a shared machine
        # would make the output depend on noise (same inputs must give the same bytes); the search weighs
        # measured latency explicitly.
        choice, why = select_candidate({c: results[c]["sqnr_fused_db"] for c in candidates})
        rem, lays = candidates[choice]
        apply_remedy(plan, rem, lays, spec, hazard)
        info["candidates"][hazard.name] = results
        info["affected_layers"] = len(layers)
        info["why"] = why
        chosen_all.append(choice)
    info["chosen"] = ",".join(chosen_all) if chosen_all else "none"
    plan.history.append(f"remedy:{info['chosen']}")
    return info


def layer_saturation(model: onnx.ModelProto, plan: QuantPlan, layers: List[str], hazard, batches, backend,
                     max_samples: int = 4) -> Dict[str, float]:
    """Estimated saturation SQNR (dB) per affected layer, from its real quantized calibration inputs."""
    import numpy as np
    from onnx import helper, numpy_helper

    from .calibrate import with_outputs
    from .saturation import int_weight, layer_rows_and_weight, quantize_rows, saturation_sqnr_db

    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    wanted = []
    for n in layers:
        x = plan.layers[n].inputs[0]
        if plan.activations.get(x) is not None and plan.activations[x].mode == "static" and x not in wanted:
            wanted.append(x)
    if not wanted:
        return {}
    static_batch = {i.name for i in model.graph.input
                    if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField("dim_value")}
    # a model with a fixed batch dimension only accepts whole batches: never slice those inputs
    feed = {k: (v if k in static_batch else v[:max_samples]) for k, v in batches[0].items()}
    aug = with_outputs(model, wanted)
    sess = backend.compile(aug, optimization="basic")
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, backend.run(sess, feed)))
    res = {}
    for n in layers:
        lp = plan.layers[n]
        x_name = lp.inputs[0]
        if x_name not in outs:
            continue
        node = nodes[n]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = numpy_helper.to_array(inits[lp.weight.tensor])
        try:
            rows, wm = layer_rows_and_weight(lp.op_type, attrs, np.asarray(outs[x_name], np.float32), w)
        except ValueError as e:
            lp.notes.append(f"saturation not estimated: {e}")
            continue
        act = plan.resolve(x_name)
        if not act.scale or not act.zero_point:  # no static qparams on this input (yet): nothing to estimate
            lp.notes.append("saturation not estimated: the input has no calibrated scale")
            continue
        rows_q, zp = quantize_rows(rows, act)
        wq = int_weight(wm, dataclasses.replace(lp.weight, axis=0) if lp.weight.granularity == "per_channel"
                        else lp.weight)
        res[n] = float(saturation_sqnr_db(rows_q, zp, wq, hazard.intermediate_bits or 16))
    return res
