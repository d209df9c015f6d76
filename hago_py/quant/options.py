"""User-facing quantization options, validated once, recorded in the plan."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

from ..errors import OptionError

CALIBRATION_METHODS = ("minmax", "percentile", "mse", "entropy")
ACTIVATION_MODES = ("static", "dynamic", "auto")
REMEDIES = ("auto", "none", "reduce_range", "u8u8", "reduce_range@saturating", "u8u8@saturating")
ROUNDING = ("nearest",)


@dataclass
class QuantOptions:
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    clipping: str = "auto"              # activation range method: minmax | percentile | mse | entropy (auto = mse)
    percentile: float = 99.999
    activation_mode: str = "auto"       # auto: static for conv nets, dynamic for MatMul-heavy (transformer) nets
    rounding: str = "nearest"
    saturation_remedy: str = "auto"     # how to handle the spec's saturation hazard
    quantize_outputs: bool = False      # quantize tensors that are graph outputs
    op_types: Optional[List[str]] = None  # restrict quantization to these op types
    exclude: List[str] = field(default_factory=list)  # node names kept FP32
    simulate: bool = False              # allow schemes the target has no kernel for (fake-quant)
    calib_batch_size: int = 16
    max_calib_samples: Optional[int] = 512
    threads: int = 1
    seed: int = 0
    check_artifact: bool = True
    timing_repeats: int = 30

    @classmethod
    def from_kwargs(cls, **kwargs) -> "QuantOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            import difflib

            hints = [f"{u} (did you mean {difflib.get_close_matches(u, names, 1)[0]}?)"
                     if difflib.get_close_matches(u, names, 1) else u for u in unknown]
            raise OptionError(f"unknown option(s): {', '.join(hints)}; valid options: {', '.join(sorted(names))}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(name, value, allowed):
            raise OptionError(f"option {name}={value!r} is invalid; use one of: {', '.join(map(str, allowed))}")

        for name in ("weight_bits", "activation_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise OptionError(f"option {name}={v!r} is invalid; use an integer between 2 and 16")
        if self.clipping not in CALIBRATION_METHODS + ("auto",):
            bad("clipping", self.clipping, CALIBRATION_METHODS + ("auto",))
        if self.activation_mode not in ACTIVATION_MODES:
            bad("activation_mode", self.activation_mode, ACTIVATION_MODES)
        if self.saturation_remedy not in REMEDIES:
            bad("saturation_remedy", self.saturation_remedy, REMEDIES)
        if self.rounding not in ROUNDING:
            bad("rounding", self.rounding, ROUNDING)
        if not 50.0 < float(self.percentile) <= 100.0:
            raise OptionError(f"option percentile={self.percentile!r} is invalid; use a value in (50, 100]")
        if self.calib_batch_size < 1:
            raise OptionError("option calib_batch_size must be >= 1")
        if self.max_calib_samples is not None and self.max_calib_samples < 1:
            raise OptionError("option max_calib_samples must be >= 1 or None")
        if self.threads < 1:
            raise OptionError("option threads must be >= 1")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
