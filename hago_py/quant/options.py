"""User-facing quantization options, validated once, recorded in the plan."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

from ..errors import OptionError

CALIBRATION_METHODS = ("minmax", "percentile", "mse", "entropy")
CLIPPING = CALIBRATION_METHODS + ("lapq", "auto")  # lapq: joint loss-aware refinement from the MSE ranges
ACTIVATION_MODES = ("static", "dynamic", "auto")
REMEDIES = ("auto", "none", "reduce_range", "u8u8", "reduce_range@saturating", "u8u8@saturating")
ROUNDING = ("nearest", "adaround", "adaquant", "flexround", "gptq", "brecq")
# per-layer overrides (QuantOptions.layers[node] = {...}): what a search or a user may set per layer
LAYER_KEYS = {"quantize": bool, "weight_bits": int, "per_channel": bool, "rounding": str, "activation_mode": str,
              "weight_dtype": str, "remedy": str, "clipping": str}
LAYER_REMEDIES = ("none", "reduce_range", "u8u8")


@dataclass
class QuantOptions:
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    clipping: str = "auto"              # activation range method: minmax | percentile | mse | entropy | lapq (auto = mse)
    percentile: float = 99.999
    activation_mode: str = "auto"       # auto: static for conv nets, dynamic for MatMul-heavy (transformer) nets
    rounding: str = "nearest"
    saturation_remedy: str = "auto"     # how to handle the spec's saturation hazard
    quantize_outputs: bool = False      # quantize tensors that are graph outputs
    op_types: Optional[List[str]] = None  # restrict quantization to these op types
    exclude: List[str] = field(default_factory=list)  # node names kept FP32
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per-layer overrides, keys LAYER_KEYS
    edge_weight_bits: Optional[int] = None  # weight bits of the first and last weighted layer (AdaRound/BRECQ keep 8)
    simulate: bool = False              # allow schemes the target has no kernel for (fake-quant)
    equalize: bool = False              # cross-layer equalization before calibration (Relu-separated pairs)
    # SmoothQuant: per-channel scales move activation outliers of LayerNorm-fed MatMul inputs into the
    # weights (hago_py/ir/passes/smooth.py); smooth_alpha is the migration strength (the paper's 0.5)
    smooth: bool = True
    smooth_alpha: float = 0.5
    # empirical bias correction (the loss-optimal bias from the layer statistics): True every quantized
    # weighted layer, False none, None (auto) the layers rounded by adaround / flexround / gptq
    bias_correction: Optional[bool] = None
    bn_reestimate: bool = False         # per-channel mean + variance re-matched after rounding (folded BN)
    recon_samples: int = 256            # calibration samples used by data-driven rounding (adaround, gptq, ...)
    # graph input [batch, seq] whose zeros mark padding tokens: their rows are left out of the reconstruction
    # statistics of token-wise layers ("auto": an input named attention_mask; None: use every row)
    token_mask: Optional[str] = "auto"
    rounding_iters: Optional[int] = None  # iterations of iterative rounding methods (None: method default)
    # per-method solver settings, e.g. {"brecq": {"lr": 1e-2, "fisher": False}, "adaround": {"iterations": 500}}
    rounding_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)
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
        if self.clipping not in CLIPPING:
            bad("clipping", self.clipping, CLIPPING)
        if self.activation_mode not in ACTIVATION_MODES:
            bad("activation_mode", self.activation_mode, ACTIVATION_MODES)
        if self.saturation_remedy not in REMEDIES:
            bad("saturation_remedy", self.saturation_remedy, REMEDIES)
        if self.rounding not in ROUNDING:
            bad("rounding", self.rounding, ROUNDING)
        for node, ov in self.layers.items():
            if not isinstance(ov, dict):
                raise OptionError(f"option layers[{node!r}] must be a dict of per-layer settings "
                                  f"({', '.join(LAYER_KEYS)}), got {type(ov).__name__}")
            for k, v in ov.items():
                if k not in LAYER_KEYS:
                    raise OptionError(f"option layers[{node!r}] has unknown key {k!r}; valid: {', '.join(LAYER_KEYS)}")
                if not isinstance(v, LAYER_KEYS[k]) or (LAYER_KEYS[k] is int and isinstance(v, bool)):
                    raise OptionError(f"option layers[{node!r}][{k!r}]={v!r} must be {LAYER_KEYS[k].__name__}")
            checks = {"rounding": ROUNDING, "activation_mode": ACTIVATION_MODES, "remedy": LAYER_REMEDIES,
                      "clipping": CALIBRATION_METHODS, "weight_dtype": ("int8", "uint8", "int4", "uint4")}
            for k, allowed in checks.items():
                if k in ov and ov[k] not in allowed:
                    bad(f"layers[{node!r}][{k!r}]", ov[k], allowed)
            if "weight_bits" in ov and not 2 <= ov["weight_bits"] <= 16:
                raise OptionError(f"option layers[{node!r}]['weight_bits']={ov['weight_bits']} must be 2..16")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise OptionError(f"option percentile={self.percentile!r} is invalid; use a value in (50, 100]")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0.0 <= float(self.smooth_alpha) <= 1.0:
            raise OptionError(f"option smooth_alpha={self.smooth_alpha!r} is invalid; use a number in [0, 1] "
                              "(0.5 balances activation and weight ranges; smooth=False turns smoothing off)")
        if isinstance(self.timing_repeats, bool) or not isinstance(self.timing_repeats, int) or self.timing_repeats < 1:
            raise OptionError(f"option timing_repeats={self.timing_repeats!r} is invalid; use an integer >= 1 "
                              "(or measure_latency=False to skip timing)")
        if self.calib_batch_size < 1:
            raise OptionError("option calib_batch_size must be >= 1")
        if self.max_calib_samples is not None and self.max_calib_samples < 1:
            raise OptionError("option max_calib_samples must be >= 1 or None")
        if self.edge_weight_bits is not None and (isinstance(self.edge_weight_bits, bool) or not isinstance(
                self.edge_weight_bits, int) or not 2 <= self.edge_weight_bits <= 16):
            raise OptionError(f"option edge_weight_bits={self.edge_weight_bits!r} must be None or 2..16")
        if self.recon_samples < 1:
            raise OptionError("option recon_samples must be >= 1")
        if not isinstance(self.rounding_params, dict):
            raise OptionError(f"option rounding_params={self.rounding_params!r} must be a dict "
                              "{method: {setting: value}}, e.g. {'brecq': {'lr': 0.01}}")
        for m, prm in self.rounding_params.items():
            if m not in ROUNDING or m == "nearest":
                bad("rounding_params key", m, [r for r in ROUNDING if r != "nearest"])
            if not isinstance(prm, dict):
                raise OptionError(f"option rounding_params[{m!r}]={prm!r} must be a dict of that method's settings")
        if self.threads < 1:
            raise OptionError("option threads must be >= 1")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def solver_params(self, method: str) -> Dict[str, Any]:
        """Settings for rounding ``method``: rounding_params[method], with rounding_iters as 'iterations'."""
        prm = dict(self.rounding_params.get(method, {}))
        if self.rounding_iters is not None:
            prm.setdefault("iterations", int(self.rounding_iters))
        return prm

    def layer(self, node: str, key: str, default=None):
        """Per-layer override ``key`` of ``node``, else ``default``."""
        return self.layers.get(node, {}).get(key, default)
