"""QuantPlan: the plain-data contract between annotate, calibrate, rounding, realize, search and report.

A plan says, per layer, whether it is quantized and why, with which scheme; and per tensor the bits,
dtype, symmetry, granularity, mode (static / dynamic / constant weight), method (calibration method or
rounding scheme) and the computed scale / zero point. It round-trips through JSON exactly, so a run can
be reproduced, resumed, diffed and reported.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

PLAN_VERSION = 1


@dataclass
class TensorQuant:
    tensor: str
    role: str = "activation"            # activation | weight | bias
    dtype: str = "uint8"                # storage type: uint8, int8, int4, uint4, int32
    bits: int = 8                       # effective bits (7 in an int8 container = reduce_range)
    symmetric: bool = False
    narrow: bool = False                # symmetric signed range without the most negative value
    granularity: str = "per_tensor"     # per_tensor | per_channel | per_token
    axis: Optional[int] = None
    mode: str = "static"                # static (calibrated) | dynamic (computed at run time) | constant
    method: str = "minmax"              # calibration method (activations) or rounding scheme (weights)
    scale: Optional[List[float]] = None
    zero_point: Optional[List[int]] = None
    shared_with: Optional[str] = None   # passthrough tensors reuse the qparams of another tensor
    stats: Dict[str, Any] = field(default_factory=dict)
    # weight grid (weights only): "uniform", or "nonuniform" (at most 2**levels_bits values of the int8 grid per
    # output channel, quant/nonuniform.py); storage: how realize wrote it ("int8" initializer, or "codebook4" / "codebook3":
    # packed 4- or 3-bit indices + an int8 codebook, quant/codebook.py); levels: per-channel levels-used summary
    scheme: str = "uniform"
    levels_bits: Optional[int] = None
    storage: Optional[str] = None
    levels: Optional[Dict[str, Any]] = None
    # weight_scheme="multipoint" (quant/multipoint.py): scale holds one coefficient per ROW of the widened layer;
    # {"points": [per channel], "group": int, "out_scale", "out_zero_point", "out_dtype" (the widened output's
    # qparams, None when no channel has a second point), "extra_macs", "macs", "error": {...}}
    multipoint: Optional[Dict[str, Any]] = None
    # dynamic per-tensor activations: the token-mask input whose padding rows are zeroed before the quantizer
    # (quant/padding.py; None: every row sets the range)
    pad_mask: Optional[str] = None

    @property
    def calibrated(self) -> bool:
        return self.mode != "static" or self.scale is not None


@dataclass
class LayerPlan:
    node: str
    op_type: str
    quantize: bool
    reason: str
    fused: List[str] = field(default_factory=list)      # node names fused with this one (anchor first)
    scheme: Optional[Dict[str, Any]] = None             # the spec scheme chosen (bits, dtypes, kernel, native)
    weight: Optional[TensorQuant] = None
    inputs: List[str] = field(default_factory=list)     # activation tensors quantized at this layer's inputs
    output: Optional[str] = None                        # tensor quantized at the group output (None: float)
    simulated: bool = False                             # no integer kernel on the target: fake-quant only
    remedy: Optional[str] = None                        # saturation remedy applied (reduce_range, u8u8)
    notes: List[str] = field(default_factory=list)


@dataclass
class QuantPlan:
    target: str
    model_digest: str
    options: Dict[str, Any] = field(default_factory=dict)
    layers: Dict[str, LayerPlan] = field(default_factory=dict)
    activations: Dict[str, TensorQuant] = field(default_factory=dict)
    version: int = PLAN_VERSION
    history: List[str] = field(default_factory=list)    # stages that produced / changed the plan
    embeddings: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # Gather node -> table record (embedding.py)

    # -- queries ----------------------------------------------------------------------------
    def quantized_layers(self) -> List[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.quantize]

    def fp_layers(self) -> List[LayerPlan]:
        return [lp for lp in self.layers.values() if not lp.quantize]

    def nearest_copy(self, solved=()) -> "QuantPlan":
        """Deep copy in which every quantized weight not in ``solved`` (node names) uses nearest rounding:
        the plan realize can build before (or while) the data-driven rounding has run."""
        import copy

        cur = copy.deepcopy(self)
        for lp in cur.quantized_layers():
            if lp.weight is not None and lp.node not in solved:
                lp.weight.method = "nearest"
        return cur

    def resolve(self, tensor: str) -> TensorQuant:
        """The TensorQuant holding the qparams of ``tensor`` (following shared_with links)."""
        tq = self.activations[tensor]
        seen = {tensor}
        while tq.shared_with is not None:
            if tq.shared_with in seen:
                raise ValueError(f"cycle in shared_with at tensor {tensor}")
            seen.add(tq.shared_with)
            tq = self.activations[tq.shared_with]
        return tq

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": self.version,
            "target": self.target,
            "model_digest": self.model_digest,
            "options": self.options,
            "history": list(self.history),
            "layers": [asdict(lp) for lp in self.layers.values()],
            "activations": [asdict(t) for t in self.activations.values()],
            "embeddings": self.embeddings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantPlan":
        from ..errors import OptionError

        if d.get("version") != PLAN_VERSION:
            raise OptionError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION}); "
                              "re-create the plan with this hago_py version")

        def tq(x):
            return None if x is None else TensorQuant(**_known(TensorQuant, x))

        layers = {}
        for x in d.get("layers", []):
            x = dict(x)
            x["weight"] = tq(x.get("weight"))
            layers[x["node"]] = LayerPlan(**_known(LayerPlan, x))
        acts = {x["tensor"]: tq(x) for x in d.get("activations", [])}
        return cls(target=d["target"], model_digest=d["model_digest"], options=d.get("options", {}),
                   layers=layers, activations=acts, version=d["version"], history=d.get("history", []),
                   embeddings=d.get("embeddings", {}))

    @classmethod
    def from_json(cls, text: str) -> "QuantPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        from ..ir.io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "QuantPlan":
        from pathlib import Path

        return cls.from_json(Path(path).read_text())

    def diff(self, other: "QuantPlan") -> List[str]:
        """Human-readable differences, one line per changed layer field / tensor qparam."""
        out = []
        for name in sorted(set(self.layers) | set(other.layers)):
            a, b = self.layers.get(name), other.layers.get(name)
            if a is None or b is None:
                out.append(f"layer {name}: {'added' if a is None else 'removed'}")
                continue
            for f in ("quantize", "scheme", "remedy", "simulated", "output", "inputs"):
                if getattr(a, f) != getattr(b, f):
                    out.append(f"layer {name}.{f}: {getattr(a, f)!r} -> {getattr(b, f)!r}")
            wa, wb = a.weight, b.weight
            if (wa is None) != (wb is None) or (wa and wb and asdict(wa) != asdict(wb)):
                out.append(f"layer {name}.weight changed")
        for name in sorted(set(self.activations) | set(other.activations)):
            a, b = self.activations.get(name), other.activations.get(name)
            if a is None or b is None or asdict(a) != asdict(b):
                out.append(f"tensor {name}: qparams changed")
        return out


def _known(cls, d: Dict[str, Any]) -> Dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}
