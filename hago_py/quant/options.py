"""User-facing quantization options, validated once, recorded in the plan."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import OptionError

CALIBRATION_METHODS = ("minmax", "percentile", "mse", "entropy")
CLIPPING = CALIBRATION_METHODS + ("lapq", "auto")  # lapq: joint loss-aware refinement from the MSE ranges
ACTIVATION_MODES = ("static", "dynamic", "auto")
# dynamic activations: per_tensor (DynamicQuantizeLinear, one uint8 scale per run) | per_token (one symmetric int8
# scale per row of the last axis: a token's result no longer depends on the rest of its batch; quant/per_token.py)
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
REMEDIES = ("auto", "none", "reduce_range", "u8u8", "reduce_range@saturating", "u8u8@saturating")
ROUNDING = ("nearest", "adaround", "adaquant", "flexround", "gptq", "brecq")
# per-layer overrides (QuantOptions.layers[node] = {...}): what a search or a user may set per layer
LAYER_REMEDIES = ("none", "reduce_range", "u8u8")
# weight grids: uniform (one step per tensor / channel) | nonuniform (clustered levels snapped onto the INT8 grid,
# stored as packed 3- or 4-bit indices + an int8 codebook, weight_bits 3-4)
# | multipoint (each channel a sum of weight_bits points, the count per channel by its output error, realized as
# extra rows of the same integer kernel: quant/multipoint.py)
WEIGHT_SCHEMES = ("uniform", "nonuniform", "multipoint")
# weight granularity: auto (per_channel decides) | per_channel | per_tensor | hybrid (per layer, by sensitivity
# to per-tensor quantization and the measured latency gain)
GRANULARITIES = ("auto", "per_channel", "per_tensor", "hybrid")
# calibration="synthetic": how the data-free calibration set is made
SYNTHETIC_METHODS = ("retro", "zeroq", "gaussian")


@dataclass(frozen=True)
class Rule:
    """What one option accepts: a type (``int``, ``float``, ``bool``, ``str``, ``"str_list"``, ``"dict"``),
    an inclusive range, a set of allowed values, and whether None is allowed (and what None means)."""
    kind: Any
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Optional[Sequence[Any]] = None
    nullable: bool = False
    hint: str = ""
    lo_open: bool = False  # the range excludes lo

    def describe(self) -> str:
        if self.choices is not None:
            what = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind is bool:
            what = "True or False"
        elif self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            if self.lo is not None and self.hi is not None:
                what = f"{noun} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
            elif self.lo is not None:
                what = f"{noun} >= {_num(self.lo)}"
            else:
                what = noun
        elif self.kind == "str_list":
            what = "a list of strings"
        elif self.kind == "dict":
            what = "a dict"
        else:
            what = "a string"
        return what + (" or None" if self.nullable else "") + (f" ({self.hint})" if self.hint else "")

    def accepts(self, v) -> bool:
        if v is None:
            return self.nullable
        if self.kind is bool:
            ok = isinstance(v, (bool, np.bool_))
        elif self.kind is int:
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
        elif self.kind is float:
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
                and math.isfinite(float(v))
        elif self.kind is str:
            ok = isinstance(v, str)
        elif self.kind == "str_list":
            ok = isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
        elif self.kind == "dict":
            ok = isinstance(v, dict)
        else:  # pragma: no cover - a Rule with an unknown kind is a programming error
            raise TypeError(self.kind)
        if not ok:
            return False
        if self.choices is not None and v not in self.choices:
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or v <= self.hi


def _opt(default, rule: Rule, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class QuantOptions:
    """Every option with its rule (``Rule``): one declarative table, checked in one place (``validate``)."""
    weight_bits: int = _opt(8, Rule(int, 2, 16))
    activation_bits: int = _opt(8, Rule(int, 2, 16))
    per_channel: bool = _opt(True, Rule(bool))
    granularity: str = _opt("auto", Rule(str, choices=GRANULARITIES, hint="auto: per_channel decides"))
    weight_scheme: str = _opt("uniform", Rule(str, choices=WEIGHT_SCHEMES))
    # weight_scheme="multipoint": the point budget, as an average point count per channel of the multipoint
    # layers, or (complexity_budget, when set) as extra multiply-accumulates relative to the model's weighted layers
    multipoint_points: float = _opt(1.25, Rule(float, 1.0, 8.0, hint="average points per channel"))
    max_points: int = _opt(4, Rule(int, 1, 8, hint="points one channel may get"))
    # how a widened layer runs: accumulate (ConvInteger / MatMulInteger int32 rows scaled and summed, exact) or
    # requantize (QLinearConv / QGemm rows re-quantized to 8 bits, then summed; quant/widen.py)
    multipoint_kernel: str = _opt("accumulate", Rule(str, choices=("accumulate", "requantize")))
    complexity_budget: Optional[float] = _opt(None, Rule(float, 0.0, 8.0, nullable=True,
                                                         hint="extra MACs / model MACs; None: multipoint_points decides"))
    # activation_scheme="sparq" (quant/sparq.py): 8-bit activations of weighted layers trimmed to a window of
    # sparq_window_bits at their leading one (sparq_options placements), pairs with a zero keep 8 bits; simulated
    activation_scheme: str = _opt("uniform", Rule(str, choices=("uniform", "sparq")))
    sparq_window_bits: int = _opt(4, Rule(int, 2, 7))
    sparq_options: int = _opt(5, Rule(int, choices=(2, 3, 5), hint="window placements: 5opt, 3opt, 2opt"))
    sparq_pairs: bool = _opt(True, Rule(bool))
    sparq_rounding: str = _opt("round", Rule(str, choices=("round", "truncate")))
    # the first and last weighted layers too (the paper keeps them at plain 8 bits: its code never trims them)
    sparq_edges: bool = _opt(False, Rule(bool))
    # weight_scheme="nonuniform", weight_bits=4: bound on the stored bytes (indices + codebooks) of the non-uniform
    # layers as a fraction of their INT8 bytes; the least sensitive layers per byte go to 3 bits until it holds
    # (quant/nu_mix.py). None: every layer at weight_bits
    nonuniform_size: Optional[float] = _opt(None, Rule(float, 0.05, 1.0, nullable=True,
                                                       hint="e.g. 0.5; None: every layer at weight_bits"))
    # granularity="hybrid": the summed sensitivity the per-tensor layers may use (None: 2e-3 nats of KL for class
    # scores, 2e-3 noise-to-signal otherwise, 1e-3 relative metric drop with evaluate=; quant/hybrid.py)
    hybrid_budget: Optional[float] = _opt(None, Rule(float, 0.0, None, nullable=True, hint="None: the default budget"))
    # embedding tables (Gather from a constant [rows, dim] table; quant/embedding.py): none | rowwise | codebook
    embedding_scheme: str = _opt("none", Rule(str, choices=("none", "rowwise", "codebook")))
    embedding_bits: int = _opt(4, Rule(int, 4, 8, hint="4 (rowwise or codebook) or 8 (rowwise)"))
    embedding_codebook: str = _opt("row", Rule(str, choices=("row", "table"), hint="one codebook per row or per table"))
    embedding_small_rows: int = _opt(1024, Rule(int, 0, hint="tables with at most this many rows stay 8-bit; 0: none"))
    # rowwise: centre each table on its column mean first, where that lowers its error (quant/embedding.py)
    embedding_center: bool = _opt(True, Rule(bool))
    # rowwise: one grid per this many consecutive values of a row (0: one per row, the paper's row-wise). 128 gives
    # MiniLM's 384-wide rows 3 grids for 16 more bytes per row: relative error 10.1 % -> 9.1 % (word table), 11.5 %
    # -> 9.3 % (position), but no measurable STS-B gain (benchmarks/embedding_spread.py): not the default
    embedding_block: int = _opt(0, Rule(int, 0, hint="0 (one grid per row) or a block length such as 128"))
    # the rows the calibration data reads most (tables indexed by a model input) are restored exactly (residual)
    embedding_hot_rows: int = _opt(0, Rule(int, 0, hint="0 (off) or a row count such as 8"))
    # activation range method: minmax | percentile | mse | entropy | lapq (auto = mse)
    clipping: str = _opt("auto", Rule(str, choices=CLIPPING))
    percentile: float = _opt(99.999, Rule(float, 50.0, 100.0, lo_open=True, hint="used by clipping='percentile'"))
    # auto: static for conv nets, dynamic for MatMul-heavy (transformer) nets
    activation_mode: str = _opt("auto", Rule(str, choices=ACTIVATION_MODES))
    # granularity of the dynamic activations; static ones stay per tensor (the layer gets a note), and
    # activation_mode="static" with per_token is an OptionError
    activation_granularity: str = _opt("per_tensor", Rule(str, choices=ACTIVATION_GRANULARITIES,
                                                          hint="per_token: dynamic activations only"))
    rounding: str = _opt("nearest", Rule(str, choices=ROUNDING))
    saturation_remedy: str = _opt("auto", Rule(str, choices=REMEDIES))  # how to handle the spec's saturation hazard
    quantize_outputs: bool = _opt(False, Rule(bool))    # quantize tensors that are graph outputs
    op_types: Optional[List[str]] = _opt(None, Rule("str_list", nullable=True, hint="None: every op type"))
    exclude: List[str] = _opt(None, Rule("str_list", hint="node names kept FP32"), list)
    layers: Dict[str, Dict[str, Any]] = _opt(None, Rule("dict", hint="{node: {setting: value}}"), dict)
    # weight bits of the first and last weighted layer (AdaRound/BRECQ keep 8)
    edge_weight_bits: Optional[int] = _opt(None, Rule(int, 2, 16, nullable=True))
    simulate: bool = _opt(False, Rule(bool))            # allow schemes the target has no kernel for (fake-quant)
    equalize: bool = _opt(False, Rule(bool))            # cross-layer equalization before calibration
    # SmoothQuant: per-channel scales move activation outliers of LayerNorm-fed MatMul inputs into the
    # weights (hago_py/ir/passes/smooth.py); smooth_alpha is the migration strength (the paper's 0.5)
    smooth: bool = _opt(True, Rule(bool))
    smooth_alpha: float = _opt(0.5, Rule(float, 0.0, 1.0, hint="0.5 balances activation and weight ranges; "
                                                               "smooth=False turns smoothing off"))
    # empirical bias correction (the loss-optimal bias from the layer statistics): True every quantized
    # weighted layer, False none, None (auto) the layers rounded by adaround / flexround / gptq
    bias_correction: Optional[bool] = _opt(None, Rule(bool, nullable=True, hint="None: auto"))
    bn_reestimate: bool = _opt(False, Rule(bool))       # per-channel mean + variance re-matched after rounding
    # calibration samples used by data-driven rounding (adaround, gptq, ...)
    recon_samples: int = _opt(256, Rule(int, 1))
    # graph input [batch, seq] whose zeros mark padding tokens: their rows are left out of the reconstruction
    # statistics of token-wise layers ("auto": an input named attention_mask; None: use every row)
    token_mask: Optional[str] = _opt("auto", Rule(str, nullable=True))
    # dynamic per-tensor activation ranges from real tokens only: where the padding rows (token_mask zeros) widen
    # a MatMul input's range on the calibration samples, they are zeroed before its DynamicQuantizeLinear
    # (quant/padding.py); the outputs at padding positions are then not the FP32 model's
    mask_padding: bool = _opt(True, Rule(bool))
    # iterations of iterative rounding methods (None: method default)
    rounding_iters: Optional[int] = _opt(None, Rule(int, 1, nullable=True))
    # per-method solver settings, e.g. {"brecq": {"lr": 1e-2, "fisher": False}, "adaround": {"iterations": 500}}
    rounding_params: Dict[str, Dict[str, Any]] = _opt(None, Rule("dict", hint="{method: {setting: value}}"), dict)
    calib_batch_size: int = _opt(16, Rule(int, 1))
    # data-free calibration (quantize(model, calibration="synthetic")): set size and generator
    synthetic_samples: int = _opt(256, Rule(int, 1, 100000, hint="used by calibration='synthetic'"))
    synthetic_method: str = _opt("retro", Rule(str, choices=SYNTHETIC_METHODS, hint="used by calibration='synthetic'"))
    max_calib_samples: Optional[int] = _opt(512, Rule(int, 1, nullable=True, hint="None: all samples"))
    threads: int = _opt(1, Rule(int, 1, 1024))
    seed: int = _opt(0, Rule(int, 0, 2**32 - 1))
    check_artifact: bool = _opt(True, Rule(bool))
    timing_repeats: int = _opt(30, Rule(int, 1, hint="or measure_latency=False to skip timing"))

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
        """Check every option against its Rule, then the per-layer settings; OptionError names the option."""
        for f in fields(self):
            rule: Rule = f.metadata["rule"]
            v = getattr(self, f.name)
            if not rule.accepts(v):
                raise OptionError(f"option {f.name}={_show(v)} is invalid; use {rule.describe()}")
        for node, ov in self.layers.items():
            if not isinstance(node, str):
                raise OptionError(f"option layers has key {_show(node)}, which is not a node name; use node names "
                                  "(strings) from the report's per-layer table as keys")
            if not isinstance(ov, dict):
                raise OptionError(f"option layers[{node!r}] must be a dict of per-layer settings "
                                  f"({', '.join(LAYER_KEYS)}), got {type(ov).__name__}")
            for k, v in ov.items():
                if k not in LAYER_KEYS:
                    raise OptionError(f"option layers[{node!r}] has unknown key {k!r}; valid: {', '.join(LAYER_KEYS)}")
                if not LAYER_KEYS[k].accepts(v):
                    raise OptionError(f"option layers[{node!r}][{k!r}]={_show(v)} is invalid; use "
                                      f"{LAYER_KEYS[k].describe()}")
        self._validate_nonuniform()
        self._validate_multipoint()
        if self.activation_granularity == "per_token" and self.activation_mode == "static":
            raise OptionError("option activation_granularity='per_token' is invalid with activation_mode='static' "
                              "(per-token scales are computed at run time); use activation_mode='dynamic' or 'auto', "
                              "or activation_granularity='per_tensor'")
        if self.activation_scheme == "sparq" and self.activation_bits != 8:
            raise OptionError(f"option activation_bits={_show(self.activation_bits)} is invalid with activation_scheme="
                              "'sparq'; use activation_bits=8 (SPARQ trims 8-bit activations to sparq_window_bits)")
        for m, prm in self.rounding_params.items():
            if m not in ROUNDING or m == "nearest":
                raise OptionError(f"option rounding_params key={m!r} is invalid; use one of: "
                                  f"{', '.join(r for r in ROUNDING if r != 'nearest')}")
            if not isinstance(prm, dict):
                raise OptionError(f"option rounding_params[{m!r}]={_show(prm)} must be a dict of that method's "
                                  "settings, e.g. {'lr': 0.01}")

    def _validate_nonuniform(self) -> None:
        """weight_scheme="nonuniform" (quant/nonuniform.py): 3-4 level bits on the int8 kernel, nearest rounding
        only, no BN re-estimation (it assumes the uniform grid); bias_correction=True gives the non-uniform layers
        the cheap mean-shift correction (Pipeline._nonuniform_weights), not the reconstruction one."""
        fix = "or use weight_scheme='uniform'"
        if self.weight_scheme == "nonuniform" and self.weight_bits not in (3, 4):
            raise OptionError(f"option weight_bits={_show(self.weight_bits)} is invalid with weight_scheme='nonuniform'"
                              f"; use weight_bits=3 or 4 (non-uniform levels run on the int8 kernel), {fix}")
        if self.nonuniform_size is not None and (self.weight_scheme != "nonuniform" or self.weight_bits != 4):
            raise OptionError(f"option nonuniform_size={_show(self.nonuniform_size)} mixes 3- and 4-bit non-uniform "
                              "layers; use it with weight_scheme='nonuniform' and weight_bits=4, or drop it")
        nu_layers = [n for n, ov in self.layers.items() if ov.get("weight_scheme") == "nonuniform"]
        for node in nu_layers:
            b = self.layers[node].get("weight_bits")
            if b is not None and b not in (3, 4):
                raise OptionError(f"option layers[{node!r}]['weight_bits']={_show(b)} is invalid with weight_scheme "
                                  f"'nonuniform'; use 3 or 4, {fix} for that layer")
        if self.weight_scheme != "nonuniform" and not nu_layers:
            return
        for node, ov in self.layers.items():
            r = ov.get("rounding")
            if r not in (None, "nearest") and ov.get("weight_scheme", self.weight_scheme) == "nonuniform":
                raise OptionError(f"option layers[{node!r}]['rounding']={r!r} is not supported with weight_scheme "
                                  f"'nonuniform'; use rounding='nearest' (the levels are assigned by nearest), {fix}")
        if self.rounding != "nearest":  # data-driven solvers round every layer on the uniform grid
            raise OptionError(f"option rounding={self.rounding!r} is not supported with weight_scheme 'nonuniform'; "
                              f"use rounding='nearest' (weights are assigned to the nearest non-uniform level), {fix}")
        if self.bn_reestimate:  # bias_correction=True: the non-uniform layers get the mean-shift correction
            raise OptionError("option bn_reestimate=True is not supported with weight_scheme 'nonuniform' (it is "
                              f"computed for the uniform grid); leave bn_reestimate unset, {fix}")

    def _validate_multipoint(self) -> None:
        """weight_scheme="multipoint": nearest rounding (the points are the greedy construction) and weight bits
        2-8 (the points run on the 8-bit kernel)."""
        mp = [n for n, ov in self.layers.items() if ov.get("weight_scheme") == "multipoint"]
        if self.weight_scheme != "multipoint" and not mp:
            return
        fix = "or use weight_scheme='uniform'"
        if self.weight_scheme == "multipoint" and self.weight_bits > 8:
            raise OptionError(f"option weight_bits={_show(self.weight_bits)} is invalid with weight_scheme='multipoint'"
                              f"; use 2-8 (the points run on the 8-bit integer kernel), {fix}")
        if self.rounding != "nearest" or any(self.layers[n].get("rounding", "nearest") != "nearest" for n in mp):
            raise OptionError(f"option rounding={self.rounding!r} is not supported with weight_scheme 'multipoint'; "
                              f"use rounding='nearest' (each point is the nearest grid value of the residual), {fix}")
        if self.bn_reestimate:
            raise OptionError("option bn_reestimate=True is not supported with weight_scheme 'multipoint'; leave it "
                              f"unset, {fix}")

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


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# per-layer overrides (QuantOptions.layers[node] = {...}): what a search or a user may set per layer
LAYER_KEYS = {
    "quantize": Rule(bool),
    "weight_bits": Rule(int, 2, 16),
    "per_channel": Rule(bool),
    "rounding": Rule(str, choices=ROUNDING),
    "activation_mode": Rule(str, choices=ACTIVATION_MODES),
    "weight_dtype": Rule(str, choices=("int8", "uint8", "int4", "uint4")),
    "remedy": Rule(str, choices=LAYER_REMEDIES),
    "clipping": Rule(str, choices=CALIBRATION_METHODS),
    "weight_scheme": Rule(str, choices=WEIGHT_SCHEMES),
    "activation_granularity": Rule(str, choices=ACTIVATION_GRANULARITIES),  # of a dynamic input; all its readers
}
