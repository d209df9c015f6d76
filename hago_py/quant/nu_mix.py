"""Mixed 3 / 4-bit non-uniform weights under a size budget (weight_scheme="nonuniform", nonuniform_size=...).

A 4-bit non-uniform layer is stored as 4-bit indices plus a 16-entry int8 codebook per output channel
(quant/codebook.py); at 3 bits, 3-bit indices (2-bit + 1-bit planes) plus 8 entries. ``nonuniform_size`` bounds the
stored bytes of all non-uniform layers (indices + codebooks, or int8 where that is smaller) as a fraction of their
INT8 bytes; layers go to 3 bits, cheapest first, until the bound holds. The order is the hybrid granularity's test
(same paper, quant/hybrid.py) applied to the bit width: each candidate's *sensitivity* is the extra output
divergence (KL of class scores, noise-to-signal otherwise; the metric's drop with the user's ``evaluate``) when only
that layer's weights are 3-bit, over a weight-only background of every non-uniform layer at 4 bits, on the
calibration proxy; the layers are switched in order of sensitivity per byte saved. Both level sets are the ones the
build uses (Pipeline._nonuniform_weights, cached), so the selection costs one extra level fit per layer and one ORT
pass per candidate.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from .plan import QuantPlan
from .weights import dequantize

LOW, HIGH = 3, 4   # the bit widths mixed


def stored_bytes(shape, axis: int, bits: int) -> int:
    """Bytes a non-uniform weight of ``shape`` (channels on ``axis``) takes in the file at ``bits``: the
    codebook form where it pays for its chain (codebook.codebook_pays), else plain int8."""
    from .codebook import codebook_bytes, codebook_pays

    cb, plain = codebook_bytes(shape, axis, bits)
    return cb if codebook_pays(shape, axis, bits) else plain


def _levels(pipe, layers: Optional[Mapping[str, Mapping[str, Any]]]) -> Tuple[QuantPlan, Dict[str, np.ndarray]]:
    """The plan under these per-layer overrides and its non-uniform integer weights (the build's cache)."""
    plan = pipe.annotate(pipe.options(layers), allow_empty=True)
    q, _ = pipe._nonuniform_weights(plan, None)
    return plan, q


def select_bits(pipe, size: float, *, evaluate: Optional[Callable] = None) -> Tuple[Dict[str, int], Dict[str, Any]]:
    """{node: 3} for the layers switched to 3 bits under ``size`` (stored bytes / INT8 bytes of the non-uniform
    layers), and the report section."""
    from onnx import numpy_helper

    from .hybrid import weight_sensitivities

    t0 = time.perf_counter()
    plan4, q4 = _levels(pipe, None)
    inits = {t.name: t for t in pipe.prepared.graph.initializer}
    nu = {lp.node: lp for lp in plan4.quantized_layers()
          if lp.node in q4 and lp.weight is not None and lp.weight.levels_bits is not None}
    user = {n for n, ov in pipe.opts.layers.items() if "weight_bits" in ov}
    shape = {n: list(inits[lp.weight.tensor].dims) for n, lp in nu.items()}
    bytes_at = {n: {b: stored_bytes(shape[n], lp.weight.axis or 0, b) for b in (LOW, HIGH)} for n, lp in nu.items()}
    int8 = sum(int(np.prod(s)) for s in shape.values())
    cands = [n for n, lp in nu.items() if lp.weight.levels_bits == HIGH and n not in user
             and bytes_at[n][LOW] < bytes_at[n][HIGH]]
    total = sum(bytes_at[n][lp.weight.levels_bits if lp.weight.levels_bits in (LOW, HIGH) else HIGH]
                for n, lp in nu.items())
    info: Dict[str, Any] = {"size": size, "int8_bytes": int8, "bytes_start": total, "candidates": len(cands),
                            "layers": []}
    if not cands or total <= size * int8:
        info.update(bytes_final=total, reached=total <= size * int8, low_bits=0, seconds=time.perf_counter() - t0,
                    note="the budget holds with every layer at its own bits" if total <= size * int8 else
                    "no layer can be stored smaller at 3 bits")
        return {}, info
    plan3, q3 = _levels(pipe, {n: {"weight_bits": LOW} for n in cands})
    w_ref = {nu[n].weight.tensor: numpy_helper.to_array(inits[nu[n].weight.tensor]).astype(np.float32) for n in nu}
    base = {nu[n].weight.tensor: dequantize(q4[n], nu[n].weight) for n in nu}
    alt = {n: (nu[n].weight.tensor, dequantize(q3[n], plan3.layers[n].weight)) for n in cands}
    sens = weight_sensitivities(pipe, w_ref, base, alt, evaluate=evaluate)
    s = sens["sensitivity"]
    saved = {n: bytes_at[n][HIGH] - bytes_at[n][LOW] for n in cands}
    order = sorted(cands, key=lambda n: (max(s[n], 0.0) / saved[n], n))
    choice: Dict[str, int] = {}
    for n in order:
        if total <= size * int8:
            break
        choice[n] = LOW
        total -= saved[n]
    for n in nu:
        lp = nu[n]
        bits = choice.get(n, lp.weight.levels_bits)
        why = ("3-bit: among the least sensitive per byte saved" if n in choice else
               "set by the user" if n in user else "not a candidate (3 bits saves nothing)" if n not in cands else
               "4-bit: the budget held without it")
        info["layers"].append({"node": n, "op": lp.op_type, "weights": int(np.prod(shape[n])), "bits": bits,
                               "bytes": bytes_at[n].get(bits, bytes_at[n][HIGH]),
                               "bytes_saved_at_3": saved.get(n, 0), "sensitivity": s.get(n), "why": why})
    kind = sens["metric"]
    label = {"evaluate": "drop of the user's evaluate(model)", "kl": "KL(softmax FP32 || softmax quantized), nats",
             "nsr": "noise-to-signal ratio of the outputs"}[kind]
    sens_info = {k: v for k, v in sens.items() if k != "sensitivity"}
    sens_info["definition"] = (f"extra {label} when only this layer's weights are 3-bit (weights only, over an "
                               "all-4-bit non-uniform background"
                               + (f", {sens['samples']} calibration samples)" if sens.get("samples") else ")"))
    info.update(sensitivity=sens_info, bytes_final=total, reached=total <= size * int8, low_bits=len(choice),
                seconds=time.perf_counter() - t0)
    if not info["reached"]:
        info["note"] = (f"every candidate at 3 bits still stores {total / int8:.3f} of the INT8 bytes, above "
                        f"nonuniform_size={size}")
    return choice, info


def annotate_plan(plan: QuantPlan, info: Mapping[str, Any]) -> None:
    """Each non-uniform layer's notes say why it has its bits."""
    for r in info.get("layers", []):
        lp = plan.layers.get(r["node"])
        if lp is None or not lp.quantize:
            continue
        sens = "" if r["sensitivity"] is None else f", sensitivity {r['sensitivity']:.3g}"
        lp.notes.append(f"nonuniform_size: {r['why']} ({r['bytes']} B stored{sens})")


def build_mixed(pipe, *, evaluate: Optional[Callable] = None):
    """weight_scheme="nonuniform" with nonuniform_size: select the 3-bit layers, then build with them as per-layer
    defaults (Pipeline.nonuniform_bits; a user's per-layer weight_bits wins). built.info["nonuniform_mix"]
    becomes report["nonuniform_mix"]."""
    from ..pipeline import _progress

    choice, info = select_bits(pipe, pipe.opts.nonuniform_size, evaluate=evaluate)
    _progress(pipe.progress, f"non-uniform size budget {pipe.opts.nonuniform_size}: {len(choice)} layer(s) at 3 bits, "
                             f"{info['bytes_final'] / max(info['int8_bytes'], 1):.3f} of the INT8 bytes, chosen in "
                             f"{info['seconds']:.1f} s")
    pipe.nonuniform_bits = dict(choice)
    built = pipe.build()
    annotate_plan(built.plan, info)
    built.info["nonuniform_mix"] = info
    return built
