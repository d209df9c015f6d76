"""Analytic roofline cost model: predicted latency when the target cannot be measured from here.

Each layer is modeled independently as ``max(compute time, memory time)``:

* compute time = ops / peak rate, with 2 ops per multiply-accumulate; quantized layers run at the spec's
  int8 rate (int4 rate when both operands have at most 4 bits and the spec gives one), FP32 layers at the
  FP32 rate;
* memory time = bytes moved / memory bandwidth, where a quantized layer moves its weights and activations
  at their quantized widths (FP32 bytes x bits / 32);
* SPARQ (:func:`predict_sparq_speedup`, hypothetical hardware): a quantized layer with 8-bit activations
  whose activations are SPARQ-trimmed runs its compute at the int8 rate x the SPARQ array's ``mac_speedup``;
  its memory time is unchanged (activations are still stored and moved as 8-bit values), so a memory-bound
  layer gains nothing.

Layers run one after another, so a model's latency is the sum over its layers. The figures are upper bounds
(peaks, no launch or requantization overhead, perfect overlap of compute and memory), so treat predicted
speed-ups as optimistic; reports must label them as predicted, not measured.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import OptionError
from .spec import CostModel, HardwareSpec

__all__ = ["predict_latency", "predict_layer_latency", "predict_model_latency", "predict_speedup",
           "predict_sparq_speedup"]

CostLike = Union[CostModel, HardwareSpec]


def _cost(cost: CostLike) -> CostModel:
    if isinstance(cost, HardwareSpec):
        if cost.cost_model is None:  # pragma: no cover - the schema requires cost_model
            raise OptionError(f"hardware spec {cost.name!r} has no cost_model; add one to predict latency")
        return cost.cost_model
    if not isinstance(cost, CostModel):
        raise OptionError(f"cost must be a CostModel or HardwareSpec, got {type(cost).__name__}")
    _check_figures(cost)
    return cost


def _check_figures(cm: CostModel) -> None:
    """A CostModel built by hand (load_spec checks spec files) must still have finite, positive rates."""
    for name in ("peak_int8_ops_per_s", "peak_fp32_flops_per_s", "memory_bandwidth_bytes_per_s",
                 "peak_fp16_flops_per_s", "peak_int4_ops_per_s"):
        v = getattr(cm, name)
        if v is None and name in ("peak_fp16_flops_per_s", "peak_int4_ops_per_s"):
            continue
        try:
            ok = not isinstance(v, bool) and math.isfinite(float(v)) and float(v) > 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise OptionError(f"cost model field {name} is {v!r}; it must be a finite number > 0 (a rate per "
                              f"second)")


def predict_latency(flops: float, bytes_moved: float, cost: CostLike, int8: bool) -> float:
    """Roofline latency in seconds: ``max(flops / peak, bytes_moved / bandwidth)``.

    ``flops``: arithmetic operations (2 per multiply-accumulate); ``int8`` selects the int8 peak instead of
    the FP32 one.
    """
    cm = _cost(cost)
    if flops < 0 or bytes_moved < 0:
        raise OptionError(f"flops and bytes_moved must be >= 0 (got {flops}, {bytes_moved})")
    peak = cm.peak_int8_ops_per_s if int8 else cm.peak_fp32_flops_per_s
    return max(flops / peak, bytes_moved / cm.memory_bandwidth_bytes_per_s)


def _layer_field(layer: Mapping[str, Any], key: str, i: int) -> int:
    if key not in layer:
        raise OptionError(f"layer {i} has no {key!r}; each layer needs macs, weight_bytes_fp32, act_bytes_fp32 "
                          f"and quantized")
    v = layer[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise OptionError(f"layer {i}: {key} must be a non-negative number (got {v!r})")
    return v


def _mac_speedup(sparq: Optional[Mapping[str, Any]]) -> float:
    if sparq is None:
        return 1.0
    if not isinstance(sparq, Mapping) or "mac_speedup" not in sparq:
        raise OptionError(f"sparq must be a mapping with a 'mac_speedup' (a spec's 'sparq' object), got {sparq!r}")
    v = sparq["mac_speedup"]
    try:
        ok = not isinstance(v, bool) and math.isfinite(float(v)) and float(v) >= 1.0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise OptionError(f"sparq.mac_speedup is {v!r}; it must be a finite number >= 1")
    return float(v)


def predict_layer_latency(layer: Mapping[str, Any], cost: CostLike, *, index: int = 0,
                          sparq: Optional[Mapping[str, Any]] = None) -> float:
    """Latency (s) of one layer dict ``{"macs", "weight_bytes_fp32", "act_bytes_fp32", "quantized"}``.

    Optional keys for quantized layers: ``weight_bits`` and ``activation_bits`` (default 8), and ``sparq``
    (default True): with a ``sparq`` mapping given (a spec's ``sparq`` object), a quantized layer with 8-bit
    activations, at most 8-bit weights and ``layer["sparq"]`` true has its compute time divided by
    ``sparq["mac_speedup"]``. ``act_bytes_fp32`` counts the layer's input and output activations at FP32 width.
    """
    speed = _mac_speedup(sparq)
    cm = _cost(cost)
    macs = _layer_field(layer, "macs", index)
    wb = _layer_field(layer, "weight_bytes_fp32", index)
    ab = _layer_field(layer, "act_bytes_fp32", index)
    flops = 2.0 * macs
    if not layer.get("quantized", False):
        return max(flops / cm.peak_fp32_flops_per_s, (wb + ab) / cm.memory_bandwidth_bytes_per_s)
    w_bits = layer.get("weight_bits", 8)
    a_bits = layer.get("activation_bits", 8)
    for k, b in (("weight_bits", w_bits), ("activation_bits", a_bits)):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 32:
            raise OptionError(f"layer {index}: {k} must be an integer in 1..32 (got {b!r})")
    peak = cm.peak_int8_ops_per_s
    if w_bits <= 4 and a_bits <= 4 and cm.peak_int4_ops_per_s:
        peak = cm.peak_int4_ops_per_s
    elif w_bits > 8 or a_bits > 8:
        peak = cm.peak_fp32_flops_per_s  # no wider-integer rate in the spec: assume no compute gain
    elif speed > 1.0 and a_bits == 8 and layer.get("sparq", True):
        peak = peak * speed  # SPARQ array: n-bit activation windows at mac_speedup x the int8 MAC rate
    bytes_moved = wb * w_bits / 32.0 + ab * a_bits / 32.0
    return max(flops / peak, bytes_moved / cm.memory_bandwidth_bytes_per_s)


def predict_model_latency(layers: Sequence[Mapping[str, Any]], cost: CostLike) -> float:
    """Sum of :func:`predict_layer_latency` over ``layers`` (seconds)."""
    return sum(predict_layer_latency(l, cost, index=i) for i, l in enumerate(layers))


def predict_speedup(layers: Iterable[Mapping[str, Any]], cost: CostLike) -> float:
    """Predicted FP32 latency / quantized latency for a model given as a list of layer dicts.

    Each layer: ``{"macs": int, "weight_bytes_fp32": int, "act_bytes_fp32": int, "quantized": bool}``
    (optionally ``weight_bits`` / ``activation_bits``). The FP32 baseline runs every layer unquantized;
    the quantized model runs the layers marked ``quantized`` at their quantized rate and widths.
    """
    layers = list(layers)
    if not layers:
        raise OptionError("predict_speedup needs at least one layer")
    fp32 = predict_model_latency([{**l, "quantized": False} for l in layers], cost)
    quant = predict_model_latency(layers, cost)
    if quant <= 0:
        return 1.0  # nothing to do in either model
    return fp32 / quant


def predict_sparq_speedup(layers: Iterable[Mapping[str, Any]], cost: CostLike,
                          sparq: Optional[Mapping[str, Any]] = None) -> float:
    """Predicted FP32 latency / latency on a target with a SPARQ MAC array (hypothetical hardware).

    Like :func:`predict_speedup`, but quantized layers with 8-bit activations (and ``layer.get("sparq",
    True)``) run their compute ``sparq["mac_speedup"]`` times faster than at the int8 rate. ``sparq``: the
    spec's ``sparq`` object (``{"mac_speedup": 2.0, ...}``); None takes it from ``cost`` when that is a
    :class:`HardwareSpec` with one. Memory-bound layers gain nothing over :func:`predict_speedup`.
    """
    layers = list(layers)
    if not layers:
        raise OptionError("predict_sparq_speedup needs at least one layer")
    if sparq is None:
        sparq = cost.sparq if isinstance(cost, HardwareSpec) else None
        if sparq is None:
            raise OptionError("predict_sparq_speedup needs a sparq mapping ({'mac_speedup': ...}) or a hardware "
                              "spec with a 'sparq' object; no built-in spec has one")
    fp32 = predict_model_latency([{**l, "quantized": False} for l in layers], cost)
    quant = sum(predict_layer_latency(l, cost, index=i, sparq=sparq) for i, l in enumerate(layers))
    if quant <= 0:
        return 1.0
    return fp32 / quant
