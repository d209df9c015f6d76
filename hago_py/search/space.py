"""The search space, derived from the hardware spec (never hard-coded per target).

For every layer the reference plan quantizes, the candidates are:

* ``fp32``: keep the layer in float (always allowed; annotate recomputes the int8 region around it);
* one *structural* candidate per (weight bits, weight dtype) pair the spec lists for the op, per weight
  granularity the scheme allows and per activation mode it allows (static, and dynamic where the spec
  runs the op on run-time scales). Schemes without an integer kernel on the target (``native: false``)
  are labelled *simulated*: they run as float with fake-quant and are listed but not searched unless
  ``include_simulated`` (they cost at least the FP32 time and lose accuracy, so FP32 dominates them);
* *accuracy-only* variants of the reference configuration that leave the executed graph unchanged:
  the calibration / clipping method of the layer's output tensor, the saturation remedy where the spec
  lists a hazard for the layer's dtypes, and the weight rounding schemes the caller lists. They inherit
  the latency of their parent and are only scored for accuracy.

Weight symmetry and activation signedness are listed per scheme for the report; the plan's per-layer
settings (``QuantOptions.LAYER_KEYS``) do not express them yet, so the search takes the spec's preferred
value (symmetric weights where allowed, the scheme's activation dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import OptionError
from ..quant.annotate import is_depthwise
from ..quant.options import CALIBRATION_METHODS, LAYER_REMEDIES, ROUNDING
from ..quant.plan import LayerPlan, QuantPlan

FP32 = "fp32"
_WEIGHTED = ("Conv", "MatMul", "Gemm")


@dataclass
class Candidate:
    key: str                          # stable id within the layer: fp32, int8/pc, uint8/pt, int8/pc/dyn, ...
    config: Dict[str, Any]            # the layer's full per-layer settings (QuantOptions.layers[node])
    label: str                        # human-readable
    structural: bool = True           # changes the executed graph (timed) vs accuracy-only (latency of parent)
    parent: Optional[str] = None      # accuracy-only: the structural candidate whose latency it shares
    simulated: bool = False           # no integer kernel on the target: fake-quant in float
    kernel: Optional[str] = None
    pruned: Optional[str] = None      # listed but not searched, and why

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "config": dict(self.config), "label": self.label, "structural": self.structural,
                "parent": self.parent, "simulated": self.simulated, "kernel": self.kernel, "pruned": self.pruned}


@dataclass
class LayerSpace:
    node: str
    op: str
    ref: str                                   # key of the reference configuration
    candidates: Dict[str, Candidate] = field(default_factory=dict)
    weight_shape: Optional[List[int]] = None
    output: Optional[str] = None               # tensor whose clipping method the layer's 'clipping' sets
    hazard: Optional[str] = None               # saturation hazard the reference config hits
    fixed_by_user: List[str] = field(default_factory=list)   # per-layer keys the user set (not searched)

    def active(self) -> Dict[str, Candidate]:
        return {k: c for k, c in self.candidates.items() if c.pruned is None}

    def structural(self) -> Dict[str, Candidate]:
        return {k: c for k, c in self.active().items() if c.structural}


@dataclass
class SearchSpace:
    layers: Dict[str, LayerSpace]
    schemes: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)   # op -> spec schemes (for the report)
    notes: List[str] = field(default_factory=list)
    roundings: Tuple[str, ...] = ("nearest",)

    def ref_assign(self) -> Dict[str, str]:
        return {n: ls.ref for n, ls in self.layers.items()}

    def config(self, assign: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
        """Per-layer settings (for ``Pipeline.build(layers=...)``) of an assignment node -> candidate key;
        layers not named take their reference configuration."""
        out = {}
        for n, ls in self.layers.items():
            key = assign.get(n, ls.ref)
            out[n] = dict(ls.candidates[key].config)
        return out

    def label(self, node: str, key: str) -> str:
        return self.layers[node].candidates[key].label

    def size(self) -> int:
        """Number of distinct plans in the (active) space."""
        total = 1
        for ls in self.layers.values():
            total *= max(1, len(ls.active()))
        return total

    def describe(self) -> Dict[str, Any]:
        return {
            "layers": {n: {"op": ls.op, "ref": ls.ref, "weight_shape": ls.weight_shape, "hazard": ls.hazard,
                           "fixed_by_user": ls.fixed_by_user,
                           "candidates": [c.to_dict() for c in ls.candidates.values()]}
                       for n, ls in self.layers.items()},
            "schemes": self.schemes,
            "roundings": list(self.roundings),
            "notes": list(self.notes),
            "size": self.size(),
        }


def _mode_of(plan: QuantPlan, lp: LayerPlan) -> str:
    for i in lp.inputs:
        tq = plan.activations.get(i)
        if tq is not None:
            return "dynamic" if tq.mode == "dynamic" else "static"
    return "static"


def reference_config(plan: QuantPlan, lp: LayerPlan) -> Dict[str, Any]:
    """The explicit per-layer settings that rebuild ``lp`` as the reference plan has it.

    The saturation remedy is always explicit, so that a search build never re-runs the automatic remedy
    choice (which realizes several candidate models)."""
    if not lp.quantize:
        return {"quantize": False}
    if lp.weight is None:
        return {"quantize": True}
    scheme = lp.scheme or {}
    dtype = scheme.get("weight_dtype") or lp.weight.dtype
    remedy = lp.remedy or "none"
    if remedy == "u8u8":        # the u8u8 remedy is the uint8-weight scheme
        dtype, remedy = "uint8", "none"
    return {"quantize": True, "weight_bits": int(scheme.get("weight_bits") or lp.weight.bits),
            "weight_dtype": dtype, "per_channel": lp.weight.granularity == "per_channel",
            "activation_mode": _mode_of(plan, lp), "rounding": lp.weight.method, "remedy": remedy}


def _struct_key(dtype: str, bits: int, per_channel: bool, mode: str) -> str:
    k = dtype if (bits == {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4}.get(dtype)) else f"{dtype}w{bits}"
    k += "/pc" if per_channel else "/pt"
    if mode == "dynamic":
        k += "/dyn"
    return k


def _struct_label(dtype: str, bits: int, per_channel: bool, mode: str, kernel: Optional[str], simulated: bool) -> str:
    s = f"W{bits} {dtype} {'per-channel' if per_channel else 'per-tensor'}"
    s += ", dynamic act." if mode == "dynamic" else ""
    if simulated:
        s += " (simulated: no integer kernel)"
    elif kernel:
        s += f" ({kernel.split(' ')[0]})"
    return s


def build_space(pipe, ref_plan: QuantPlan, *, roundings: Optional[Sequence[str]] = None,
                clipping: Optional[Sequence[str]] = None, include_simulated: bool = False) -> SearchSpace:
    """Candidates for every layer ``ref_plan`` quantizes, from ``pipe.spec``.

    roundings: weight rounding schemes to search (default: the user's global ``rounding`` only).
    clipping: calibration methods of layer outputs to search as accuracy-only variants (default all four).
    """
    spec, opts = pipe.spec, pipe.opts
    roundings = tuple(roundings) if roundings else (opts.rounding,)
    bad = [r for r in roundings if r not in ROUNDING]
    if bad:
        raise OptionError(f"search roundings {bad} are unknown; use values of {', '.join(ROUNDING)}")
    clipping = tuple(CALIBRATION_METHODS if clipping is None else clipping)
    bad = [c for c in clipping if c not in CALIBRATION_METHODS]
    if bad:
        raise OptionError(f"search clipping methods {bad} are unknown; use values of {', '.join(CALIBRATION_METHODS)}")
    nodes = {n.name: n for n in pipe.prepared.graph.node}
    inits = {i.name: list(i.dims) for i in pipe.prepared.graph.initializer}
    a_bits = opts.activation_bits
    space = SearchSpace(layers={}, roundings=roundings)
    space.notes.append("weight symmetry / activation signedness: the spec's preferred value per scheme "
                       "(per-layer plan settings do not express them yet)")
    for op in sorted({lp.op_type for lp in ref_plan.layers.values() if lp.quantize}):
        if spec.schemes(op):
            space.schemes[op] = [s.to_dict() for s in spec.schemes(op)]
        for s in spec.schemes(op):
            if s.activation_bits != a_bits:
                space.notes.append(f"{op} W{s.weight_bits or '-'}A{s.activation_bits} ({s.kernel or 'no kernel'}) "
                                   f"not searched: activations are A{a_bits} (option activation_bits)")

    for name, lp in ref_plan.layers.items():
        if not lp.quantize:
            continue
        user = dict(opts.layers.get(name, {}))
        ref_cfg = reference_config(ref_plan, lp)
        ls = LayerSpace(node=name, op=lp.op_type, ref="", output=lp.output,
                        fixed_by_user=sorted(k for k in user if k != "quantize"))
        cands: Dict[str, Candidate] = {}
        if lp.weight is None:
            sch = (lp.scheme or {})
            cands["int8"] = Candidate("int8", {"quantize": True}, f"A{a_bits} {sch.get('kernel') or 'int8'}",
                                      kernel=sch.get("kernel"))
            ls.ref = "int8"
        else:
            node = nodes.get(name)
            ls.weight_shape = inits.get(lp.weight.tensor)
            dw = node is not None and is_depthwise(node, ls.weight_shape or [0, 0])
            pairs: List[Tuple[int, str]] = []
            for s in spec.schemes(lp.op_type):
                if s.has_weights and s.activation_bits == a_bits and (s.weight_bits, s.weight_dtype) not in pairs:
                    pairs.append((s.weight_bits, s.weight_dtype))
            for bits, dtype in pairs:
                sch = spec.find_scheme(lp.op_type, bits, a_bits, weight_dtype=dtype)
                if sch is None:
                    continue
                modes = ["static"] if "static" in sch.activation_mode else []
                if ("dynamic" in sch.activation_mode and lp.op_type in ("MatMul", "Gemm")
                        and spec.supports_dynamic(lp.op_type)):
                    modes.append("dynamic")
                hazard = None if dw else spec.hazard_for(sch.activation_dtype, dtype)
                for gran in sch.granularity:
                    pc = gran == "per_channel"
                    for mode in modes:
                        remedy = "none"
                        if hazard is not None and ref_cfg.get("weight_dtype") == dtype:
                            remedy = ref_cfg.get("remedy", "none")
                        cfg = {"quantize": True, "weight_bits": bits, "weight_dtype": dtype, "per_channel": pc,
                               "activation_mode": mode, "rounding": ref_cfg["rounding"], "remedy": remedy}
                        key = _struct_key(dtype, bits, pc, mode)
                        c = Candidate(key, cfg, _struct_label(dtype, bits, pc, mode, sch.kernel, not sch.native),
                                      simulated=not sch.native, kernel=sch.kernel)
                        if c.simulated and not include_simulated:
                            c.pruned = ("simulated (no integer kernel on the target): runs as float plus fake-quant, "
                                        "so FP32 is at least as fast and more accurate")
                        cands[key] = c
            ref_key = _struct_key(ref_cfg["weight_dtype"], ref_cfg["weight_bits"], ref_cfg["per_channel"],
                                  ref_cfg["activation_mode"])
            if ref_key not in cands:   # the reference is whatever annotate built: always a candidate
                cands[ref_key] = Candidate(ref_key, dict(ref_cfg), _struct_label(
                    ref_cfg["weight_dtype"], ref_cfg["weight_bits"], ref_cfg["per_channel"],
                    ref_cfg["activation_mode"], (lp.scheme or {}).get("kernel"), lp.simulated),
                    simulated=lp.simulated, kernel=(lp.scheme or {}).get("kernel"))
            cands[ref_key].config = dict(ref_cfg)
            cands[ref_key].pruned = None
            ls.ref = ref_key
            h = None if dw else spec.hazard_for((lp.scheme or {}).get("activation_dtype", "uint8"),
                                                ref_cfg["weight_dtype"])
            ls.hazard = h.name if h is not None else None
            # accuracy-only variants of the reference configuration
            if h is not None:
                for rem in h.remedies:
                    if rem in LAYER_REMEDIES and rem != "u8u8" and rem != ref_cfg["remedy"]:
                        k = f"{ref_key}+remedy={rem}"
                        cands[k] = Candidate(k, dict(ref_cfg, remedy=rem), f"{cands[ref_key].label}, remedy {rem}",
                                             structural=False, parent=ref_key, kernel=cands[ref_key].kernel)
            for r in roundings:
                if r != ref_cfg["rounding"]:
                    k = f"{ref_key}+round={r}"
                    cands[k] = Candidate(k, dict(ref_cfg, rounding=r), f"{cands[ref_key].label}, {r} rounding",
                                         structural=False, parent=ref_key, kernel=cands[ref_key].kernel)
        # clipping of the layer's output tensor (static outputs only)
        out_tq = ref_plan.activations.get(lp.output) if lp.output else None
        if out_tq is not None and out_tq.mode == "static" and out_tq.shared_with is None:
            ref_c = cands[ls.ref]
            for m in clipping:
                if m != out_tq.method:
                    k = f"{ls.ref}+clip={m}"
                    cands[k] = Candidate(k, dict(ref_c.config, clipping=m), f"{ref_c.label}, {m} output range",
                                         structural=False, parent=ls.ref, kernel=ref_c.kernel)
        cands[FP32] = Candidate(FP32, {"quantize": False}, "FP32 (kept float)")
        # the user's own per-layer settings are constraints, not search dimensions
        for k, c in cands.items():
            if k == ls.ref or c.pruned:
                continue
            if user.get("quantize") is True and k == FP32:
                c.pruned = "the user set quantize=True for this layer"
            for uk, uv in user.items():
                if uk != "quantize" and c.config.get("quantize", True) and uk in c.config and c.config[uk] != uv:
                    c.pruned = f"the user fixed {uk}={uv!r} for this layer"
        ls.candidates = cands
        space.layers[name] = ls
    if not space.layers:
        raise OptionError(f"nothing to search: the reference plan for target {spec.name} quantizes no layer "
                          "(check op_types / exclude / weight_bits)")
    return space


def assign_key(assign: Mapping[str, str], space: SearchSpace) -> Dict[str, str]:
    """Canonical assignment: every layer named, in the space's order."""
    return {n: assign.get(n, ls.ref) for n, ls in space.layers.items()}


def diff_assign(assign: Mapping[str, str], space: SearchSpace) -> Dict[str, str]:
    """Only the layers whose candidate differs from the reference."""
    return {n: k for n, k in assign.items() if n in space.layers and k != space.layers[n].ref}


def iter_active(space: SearchSpace) -> Iterable[Tuple[str, LayerSpace]]:
    for n, ls in space.layers.items():
        if len(ls.active()) > 1:
            yield n, ls
