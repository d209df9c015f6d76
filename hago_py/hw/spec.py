"""Hardware specs: what a quantization target runs natively, as validated, immutable data.

A spec is a JSON file (format: ``hw_specs/schema.json``, reference: ``hw_specs/x86_avx2.json``). It records
per-op allowed quantization schemes (bits, dtype, symmetry, granularity, static / dynamic activations),
the accumulator width and the narrow intermediates that can saturate before it, the requantization style,
the backend and TVM compile target, fusion patterns, and throughput figures for the roofline cost model;
optionally a SPARQ activation MAC array (``sparq``, which no built-in spec has).

``load_spec`` accepts a built-in name (``"x86_avx2"``), a path to a ``.json`` file or a dict; it checks the
JSON schema and then semantic rules the schema cannot express, and raises ``SpecError`` naming the file,
the field (as a JSON path like ``ops.Conv.schemes[0].weight_bits``) and what to do.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..errors import SpecError

__all__ = [
    "BUILTIN_DIR",
    "SCHEMA_PATH",
    "Scheme",
    "OpRule",
    "SaturationHazard",
    "CostModel",
    "HardwareSpec",
    "list_specs",
    "load_spec",
    "builtin_names",
    "DTYPE_BITS",
]

#: The repo's ``hw_specs/`` folder (supported install: ``pip install -e .``).
BUILTIN_DIR: Path = Path(__file__).resolve().parents[2] / "hw_specs"
SCHEMA_PATH: Path = BUILTIN_DIR / "schema.json"

#: Storage width of each dtype a spec may name; integer dtypes may carry fewer bits than this.
DTYPE_BITS: Dict[str, int] = {
    "int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "int16": 16, "uint16": 16,
    "float16": 16, "float8e4m3": 8,
}
_FLOAT_DTYPES = {"float16", "float8e4m3"}

#: Ops a fusion pattern may name even when the spec lists them neither in ``ops`` nor ``passthrough_ops``
#: (activations and elementwise ops that a backend folds into the producing kernel's epilogue).
FUSABLE_EXTRA_OPS = frozenset({
    "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu",
    "BatchNormalization", "Add", "Sub", "Mul", "Div",
})

SpecSource = Union[str, "os.PathLike[str]", Mapping[str, Any], "HardwareSpec"]


# ---------------------------------------------------------------------------------------------------------
# Dataclasses
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme an op can run: a (weight_bits, activation_bits) pair and its constraints.

    ``weight_*`` fields are ``None`` / empty for weightless ops (Add, pools, ...). ``weight_symmetric`` lists
    the allowed values (``(True,)``: zero point must be 0; ``(True, False)``: either); ``granularity`` lists the
    allowed weight granularities, preferred first. ``native`` is True when the spec's backend has a real
    integer kernel for the scheme (False: representable, but simulated / no integer speed-up).
    """

    weight_bits: Optional[int]
    activation_bits: int
    weight_dtype: Optional[str]
    activation_dtype: str
    weight_symmetric: Tuple[bool, ...]
    activation_symmetric: Tuple[bool, ...]
    granularity: Tuple[str, ...]
    activation_mode: Tuple[str, ...]
    kernel: Optional[str]
    native: bool

    @property
    def has_weights(self) -> bool:
        return self.weight_bits is not None

    @property
    def weight_signed(self) -> Optional[bool]:
        return None if self.weight_dtype is None else not self.weight_dtype.startswith("uint")

    @property
    def activation_signed(self) -> bool:
        return not self.activation_dtype.startswith("uint")

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        if self.weight_bits is not None:
            d["weight_bits"] = self.weight_bits
        d["activation_bits"] = self.activation_bits
        if self.weight_dtype is not None:
            d["weight_dtype"] = self.weight_dtype
        d["activation_dtype"] = self.activation_dtype
        if self.weight_symmetric:
            d["weight_symmetric"] = list(self.weight_symmetric)
        d["activation_symmetric"] = list(self.activation_symmetric)
        if self.granularity:
            d["granularity"] = list(self.granularity)
        d["activation_mode"] = list(self.activation_mode)
        d["kernel"] = self.kernel
        d["native"] = self.native
        return d


@dataclass(frozen=True)
class OpRule:
    """The schemes one ONNX op_type may run on the target, preferred first."""

    op_type: str
    schemes: Tuple[Scheme, ...]


@dataclass(frozen=True)
class SaturationHazard:
    """A narrow intermediate in the integer dot-product path that can saturate / wrap before the accumulator."""

    name: str
    instruction: str
    activation_dtype: str
    weight_dtype: str
    intermediate_bits: int
    description: str
    max_safe_weight_bits: int
    remedies: Tuple[str, ...]


@dataclass(frozen=True)
class CostModel:
    """Throughput figures for the roofline model, for ``cores`` cores (CPU cores or GPU SMs).

    Ops are counted as 2 per multiply-accumulate for both int8 and FP32.
    """

    peak_int8_ops_per_s: float
    peak_fp32_flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    cores: int
    sources: Tuple[str, ...]
    peak_fp16_flops_per_s: Optional[float] = None
    peak_int4_ops_per_s: Optional[float] = None


@dataclass(frozen=True)
class HardwareSpec:
    """A validated hardware spec. Build it with :func:`load_spec`; ``raw`` is the (validated) JSON dict."""

    name: str
    description: str
    isa: Tuple[str, ...]
    backend: Dict[str, Any] = field(hash=False)
    tvm_target: Dict[str, Any] = field(hash=False)
    accumulator_bits: int = 32
    saturation_hazards: Tuple[SaturationHazard, ...] = ()
    requantize: Dict[str, Any] = field(default_factory=dict, hash=False)
    dynamic_activations: Dict[str, Any] = field(default_factory=dict, hash=False)
    ops: Dict[str, OpRule] = field(default_factory=dict, hash=False)
    passthrough_ops: Tuple[str, ...] = ()
    fusion_patterns: Tuple[Tuple[str, ...], ...] = ()
    cost_model: Optional[CostModel] = None
    source_path: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    host_match: Optional[str] = field(default=None, compare=False, repr=False)  # target="host": why this spec
    #: Optional SPARQ MAC array ({"window_bits", "window_options", "pairs", "mac_speedup", "source"}); no
    #: built-in spec has one (see hago_py.quant.sparq and hago_py.hw.cost.predict_sparq_speedup).
    sparq: Optional[Dict[str, Any]] = field(default=None, hash=False)

    # -- queries --------------------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return str(self.backend.get("name", ""))

    @property
    def execution_provider(self) -> Optional[str]:
        return self.backend.get("execution_provider")

    @property
    def requantize_style(self) -> str:
        return str(self.requantize.get("style", "float_scale"))

    def schemes(self, op_type: str) -> Tuple[Scheme, ...]:
        """Schemes allowed for ``op_type`` (preferred first); empty if the target cannot quantize it."""
        rule = self.ops.get(op_type)
        return rule.schemes if rule is not None else ()

    def quantizable_ops(self) -> Tuple[str, ...]:
        return tuple(self.ops)

    def is_passthrough(self, op_type: str) -> bool:
        return op_type in self.passthrough_ops

    def _matching(self, op_type: str, weight_bits: Optional[int], activation_bits: Optional[int],
                  weight_dtype: Optional[str], activation_dtype: Optional[str]) -> List[Scheme]:
        out = []
        for s in self.schemes(op_type):
            if weight_bits is not None and s.weight_bits != weight_bits:
                continue
            if activation_bits is not None and s.activation_bits != activation_bits:
                continue
            if weight_dtype is not None and s.weight_dtype != weight_dtype:
                continue
            if activation_dtype is not None and s.activation_dtype != activation_dtype:
                continue
            out.append(s)
        return out

    def supports(self, op_type: str, weight_bits: Optional[int] = None, activation_bits: Optional[int] = 8,
                 weight_dtype: Optional[str] = None, activation_dtype: Optional[str] = None) -> bool:
        """True if some scheme of ``op_type`` matches every argument that is not None (None = any)."""
        return bool(self._matching(op_type, weight_bits, activation_bits, weight_dtype, activation_dtype))

    def find_scheme(self, op_type: str, weight_bits: Optional[int], activation_bits: Optional[int],
                    weight_dtype: Optional[str] = None, activation_dtype: Optional[str] = None
                    ) -> Optional[Scheme]:
        """The preferred matching scheme (None arguments match anything): the first native match in spec
        order, else the first non-native one, else None."""
        found = self._matching(op_type, weight_bits, activation_bits, weight_dtype, activation_dtype)
        for s in found:
            if s.native:
                return s
        return found[0] if found else None

    def hazard_for(self, activation_dtype: str, weight_dtype: str,
                   weight_bits: Optional[int] = None) -> Optional[SaturationHazard]:
        """The saturation hazard hit by this (activation, weight) dtype pair, or None.

        With ``weight_bits`` given, a hazard whose ``max_safe_weight_bits`` covers it is not reported.
        """
        for h in self.saturation_hazards:
            if h.activation_dtype == activation_dtype and h.weight_dtype == weight_dtype:
                if weight_bits is not None and weight_bits <= h.max_safe_weight_bits:
                    continue
                return h
        return None

    def supports_dynamic(self, op_type: str) -> bool:
        """True if the backend can quantize ``op_type``'s activations at run time."""
        if op_type not in self.dynamic_activations.get("ops", ()):
            return False
        return any("dynamic" in s.activation_mode for s in self.schemes(op_type))

    def is_fusable(self, chain: Iterable[str]) -> bool:
        return tuple(chain) in self.fusion_patterns

    def to_dict(self) -> Dict[str, Any]:
        """The spec as a JSON-ready dict (a deep copy of the validated input)."""
        return copy.deepcopy(self.raw)

    def __repr__(self) -> str:  # keep it one line: specs end up in logs and reports
        src = f", source_path={self.source_path!r}" if self.source_path else ""
        return f"HardwareSpec(name={self.name!r}, backend={self.backend_name!r}, ops={len(self.ops)}{src})"


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _builtin_dir() -> Path:
    if not BUILTIN_DIR.is_dir():
        raise SpecError(
            f"built-in hardware specs folder {BUILTIN_DIR} is missing; hago_py must be installed from a source "
            f"checkout with `pip install -e .` (the specs ship in the repo's hw_specs/), or pass a path to a "
            f"spec .json file")
    return BUILTIN_DIR


def builtin_names() -> List[str]:
    """Names of the built-in specs (file stems in ``hw_specs/``), sorted."""
    d = _builtin_dir()
    return sorted(p.stem for p in d.glob("*.json") if p.name != "schema.json")


@lru_cache(maxsize=1)
def _validator():
    try:
        import jsonschema
    except ImportError as e:  # pragma: no cover - jsonschema is a hard dependency
        raise SpecError("the jsonschema package is required to validate hardware specs: pip install jsonschema") from e
    path = _builtin_dir() / "schema.json"
    if not path.is_file():
        raise SpecError(f"hardware spec schema {path} is missing; reinstall hago_py from a source checkout")
    schema = json.loads(path.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _fmt_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


#: Deepest nesting a spec may have (the built-in specs nest 6 levels); deeper input is rejected before any
#: recursive processing (copying, schema validation) can exhaust the interpreter stack.
MAX_SPEC_DEPTH = 32


def _structure_problems(data: Any) -> List[str]:
    """Non-finite or out-of-range numbers and excessive nesting, found without recursion.

    ``json.loads`` accepts ``NaN`` / ``Infinity`` (and turns ``1e400`` into inf); a JSON schema cannot reject
    them (NaN fails every comparison, inf passes ``exclusiveMinimum``), so they are caught here, with the
    JSON path of each, before the schema check.
    """
    problems: List[str] = []
    stack: List[Tuple[Any, Tuple[Any, ...]]] = [(data, ())]
    while stack:
        obj, path = stack.pop()
        if len(path) > MAX_SPEC_DEPTH:
            return [f"{_fmt_path(path[:MAX_SPEC_DEPTH])}: nested more than {MAX_SPEC_DEPTH} levels deep; a spec "
                    f"nests at most a few levels (see {BUILTIN_DIR / 'x86_avx2.json'})"]
        if isinstance(obj, dict):
            stack.extend((v, path + (k,)) for k, v in reversed(list(obj.items())))
        elif isinstance(obj, list):
            stack.extend((v, path + (i,)) for i, v in reversed(list(enumerate(obj))))
        elif isinstance(obj, bool) or obj is None or isinstance(obj, str):
            continue
        elif isinstance(obj, float):
            if obj != obj:
                problems.append(f"{_fmt_path(path)}: NaN is not a number; give a finite positive figure")
            elif obj in (float("inf"), float("-inf")):
                problems.append(f"{_fmt_path(path)}: {obj} (Infinity, or a number too large for a double) is not "
                                f"finite; give a finite figure")
        elif isinstance(obj, int):
            try:
                float(obj)
            except OverflowError:
                problems.append(f"{_fmt_path(path)}: integer with {len(str(abs(obj)))} digits is too large; "
                                f"give a realistic figure")
    return problems


@lru_cache(maxsize=1)
def onnx_op_types() -> Dict[str, str]:
    """Op types of ONNX's default domain (``ai.onnx``), keyed by their lower-case spelling."""
    try:
        import onnx.defs
    except ImportError:  # pragma: no cover - onnx is a hard dependency
        return {}
    return {sch.name.lower(): sch.name for sch in onnx.defs.get_all_schemas() if sch.domain in ("", "ai.onnx")}


def _op_name_problem(op: Any, path: str) -> Optional[str]:
    """A 'path: problem' string when ``op`` is not an op type of ONNX's default domain, else None."""
    valid = onnx_op_types()
    if not valid or not isinstance(op, str) or op in valid.values():
        return None
    low = op.lower()
    if low in valid:
        close: Optional[str] = valid[low]
    else:
        m = difflib.get_close_matches(low, sorted(valid), n=1, cutoff=0.6)
        close = valid[m[0]] if m else None
    hint = f" (did you mean {close!r}?)" if close else ""
    domain = (" (ops of other domains, such as com.microsoft, cannot be listed)" if "." in op else "")
    return (f"{path}: unknown op {op!r}{hint}; it is not an op type of ONNX's default domain{domain}: spell it "
            f"exactly as in the ONNX operator list (case-sensitive)")


def _schema_error_message(err) -> str:
    msg = err.message
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list((err.schema.get("properties") or {}).keys())
        extra = [k for k in err.instance if k not in allowed]
        hints = []
        for k in extra:
            close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]!r} instead of {k!r}?")
        if hints:
            msg += " (" + " ".join(hints) + ")"
    elif err.validator in ("oneOf", "anyOf") and err.context:
        best = min(err.context, key=lambda e: len(e.relative_path))
        msg = f"{msg} ({best.message})"
    return msg


def _schema_check(data: Any, where: str) -> None:
    v = _validator()
    errors = sorted(v.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not errors:
        return
    shown = [f"{_fmt_path(e.absolute_path)}: {_schema_error_message(e)}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    raise SpecError(
        f"hardware spec {where} violates the spec schema: " + "; ".join(shown) + more +
        f". Fix the field(s) named above (format: {SCHEMA_PATH}, example: {BUILTIN_DIR / 'x86_avx2.json'})")


def _semantic_problems(data: Mapping[str, Any]) -> List[str]:
    """Rules a JSON schema cannot express. Returns one 'path: problem' string per violation."""
    problems: List[str] = []
    ops: Mapping[str, Any] = data.get("ops", {})

    # op names must be ONNX op types of the default domain: a misspelt one would silently never match a node
    bad_names = set()
    for op in ops:
        pr = _op_name_problem(op, f"ops.{op}")
        if pr:
            problems.append(pr)
            bad_names.add(op)
    for i, op in enumerate(data.get("passthrough_ops", ())):
        pr = _op_name_problem(op, f"passthrough_ops[{i}]")
        if pr:
            problems.append(pr)
            bad_names.add(op)
    for i, op in enumerate(data.get("dynamic_activations", {}).get("ops", ())):
        pr = _op_name_problem(op, f"dynamic_activations.ops[{i}]")
        if pr:
            problems.append(pr)
            bad_names.add(op)

    for op, rule in ops.items():
        for i, s in enumerate(rule.get("schemes", [])):
            p = f"ops.{op}.schemes[{i}]"
            has_w = "weight_bits" in s
            if has_w:
                for need in ("weight_dtype", "weight_symmetric", "granularity"):
                    if need not in s:
                        problems.append(f"{p}: has weight_bits but no {need}; add it (or drop weight_bits for a "
                                        f"weightless op)")
            else:
                for extra in ("weight_dtype", "weight_symmetric", "granularity"):
                    if extra in s:
                        problems.append(f"{p}: has {extra} but no weight_bits; add weight_bits or drop {extra}")
            for role in ("weight", "activation"):
                bits, dt = s.get(f"{role}_bits"), s.get(f"{role}_dtype")
                if bits is None or dt is None:
                    continue
                width = DTYPE_BITS[dt]
                if dt in _FLOAT_DTYPES and bits != width:
                    problems.append(f"{p}.{role}_bits: {bits} bits but {role}_dtype {dt} is a {width}-bit float; "
                                    f"set {role}_bits to {width}")
                elif bits > width:
                    problems.append(f"{p}.{role}_bits: {bits} bits do not fit {role}_dtype {dt} ({width} bits); "
                                    f"use a wider dtype or fewer bits")
            if "dynamic" in s.get("activation_mode", ()) and op not in data.get("dynamic_activations", {}).get("ops", ()):
                problems.append(f"{p}.activation_mode: allows 'dynamic' but {op!r} is not in dynamic_activations.ops; "
                                f"add it there or drop 'dynamic'")

    dyn = data.get("dynamic_activations", {})
    for i, op in enumerate(dyn.get("ops", ())):
        if op in bad_names:
            continue
        if op not in ops:
            problems.append(f"dynamic_activations.ops[{i}]: {op!r} is not in ops; add an ops entry for it or remove it")
        elif not any("dynamic" in s.get("activation_mode", ()) for s in ops[op].get("schemes", [])):
            problems.append(f"dynamic_activations.ops[{i}]: no scheme of {op!r} has activation_mode 'dynamic'; "
                            f"add it to a scheme or remove {op!r} here")
    if dyn.get("ops") and not dyn.get("granularity"):
        problems.append("dynamic_activations.granularity: empty while dynamic_activations.ops is not; "
                        "list at least one granularity (e.g. per_tensor)")

    known = (set(ops) | set(data.get("passthrough_ops", ())) | FUSABLE_EXTRA_OPS) - bad_names
    for i, pat in enumerate(data.get("fusion_patterns", ())):
        for j, op in enumerate(pat):
            pr = None if op in bad_names else _op_name_problem(op, f"fusion_patterns[{i}][{j}]")
            if pr:
                problems.append(pr)
                bad_names.add(op)
            elif op not in known and op not in bad_names:
                close = difflib.get_close_matches(op, sorted(known), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"fusion_patterns[{i}][{j}]: unknown op {op!r}{hint}; it must appear in ops or "
                                f"passthrough_ops (or be a common activation such as Relu / Clip)")

    for i, h in enumerate(data.get("accumulator", {}).get("saturation_hazards", ())):
        p = f"accumulator.saturation_hazards[{i}]"
        if not h.get("remedies"):
            problems.append(f"{p}.remedies: empty; list at least one remedy (reduce_range, u8u8, s8s8 or none)")
        if h.get("intermediate_bits", 0) >= data.get("accumulator", {}).get("bits", 64):
            problems.append(f"{p}.intermediate_bits: {h.get('intermediate_bits')} is not narrower than the "
                            f"{data['accumulator']['bits']}-bit accumulator, so it is not a hazard; remove it")

    sparq = data.get("sparq")
    if isinstance(sparq, Mapping) and isinstance(sparq.get("window_bits"), int):
        positions = 9 - sparq["window_bits"]  # window shifts 0..8-n: at most this many placements
        for i, opt in enumerate(sparq.get("window_options", ())):
            if isinstance(opt, int) and opt > positions:
                problems.append(f"sparq.window_options[{i}]: {opt} window placements but a "
                                f"{sparq['window_bits']}-bit window of an 8-bit value has only {positions} "
                                f"(shifts 0..{8 - sparq['window_bits']}); drop {opt} or use a narrower window")

    req = data.get("requantize", {})
    if req.get("style") == "fixed_point" and "multiplier_bits" not in req:
        problems.append("requantize.multiplier_bits: required when style is fixed_point (e.g. 32)")
    return problems


def _build(data: Dict[str, Any], source_path: Optional[str]) -> HardwareSpec:
    def scheme(s: Mapping[str, Any]) -> Scheme:
        return Scheme(
            weight_bits=s.get("weight_bits"),
            activation_bits=int(s["activation_bits"]),
            weight_dtype=s.get("weight_dtype"),
            activation_dtype=s["activation_dtype"],
            weight_symmetric=tuple(s.get("weight_symmetric", ())),
            activation_symmetric=tuple(s["activation_symmetric"]),
            granularity=tuple(s.get("granularity", ())),
            activation_mode=tuple(s["activation_mode"]),
            kernel=s.get("kernel"),
            native=bool(s["native"]),
        )

    ops = {op: OpRule(op, tuple(scheme(s) for s in rule["schemes"])) for op, rule in data["ops"].items()}
    hazards = tuple(
        SaturationHazard(
            name=h["name"], instruction=h["instruction"], activation_dtype=h["activation_dtype"],
            weight_dtype=h["weight_dtype"], intermediate_bits=int(h["intermediate_bits"]),
            description=h["description"], max_safe_weight_bits=int(h["max_safe_weight_bits"]),
            remedies=tuple(h["remedies"]))
        for h in data["accumulator"]["saturation_hazards"])
    cm = data["cost_model"]
    cost = CostModel(
        peak_int8_ops_per_s=float(cm["peak_int8_ops_per_s"]),
        peak_fp32_flops_per_s=float(cm["peak_fp32_flops_per_s"]),
        memory_bandwidth_bytes_per_s=float(cm["memory_bandwidth_bytes_per_s"]),
        cores=int(cm["cores"]),
        sources=tuple(cm["sources"]),
        peak_fp16_flops_per_s=float(cm["peak_fp16_flops_per_s"]) if "peak_fp16_flops_per_s" in cm else None,
        peak_int4_ops_per_s=float(cm["peak_int4_ops_per_s"]) if "peak_int4_ops_per_s" in cm else None,
    )
    dyn = data.get("dynamic_activations", {})
    return HardwareSpec(
        name=data["name"],
        description=data["description"],
        isa=tuple(data.get("isa", ())),
        backend=copy.deepcopy(data["backend"]),
        tvm_target=copy.deepcopy(data["backend"]["tvm_target"]),
        accumulator_bits=int(data["accumulator"]["bits"]),
        saturation_hazards=hazards,
        requantize=copy.deepcopy(data["requantize"]),
        dynamic_activations={"granularity": list(dyn.get("granularity", [])), "ops": list(dyn.get("ops", []))},
        ops=ops,
        passthrough_ops=tuple(data.get("passthrough_ops", ())),
        fusion_patterns=tuple(tuple(p) for p in data["fusion_patterns"]),
        cost_model=cost,
        source_path=source_path,
        raw=copy.deepcopy(data),
        sparq=copy.deepcopy(data["sparq"]) if "sparq" in data else None,
    )


#: Largest spec file read (the built-in specs are a few KiB): a bigger file is not a spec.
MAX_SPEC_BYTES = 16 * 1024 * 1024


def _problem_error(where: str, what: str, problems: List[str]) -> SpecError:
    shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    return SpecError(f"hardware spec {where} {what}: {shown}", details="\n".join(problems))


def _from_dict(data: Any, where: str, source_path: Optional[str]) -> HardwareSpec:
    if not isinstance(data, dict):
        raise SpecError(f"hardware spec {where} must be a JSON object (got {type(data).__name__}); "
                        f"see {BUILTIN_DIR / 'x86_avx2.json'} for the format")
    problems = _structure_problems(data)
    if problems:
        raise _problem_error(where, "has invalid values", problems)
    try:
        _schema_check(data, where)
        problems = _semantic_problems(data)
        if problems:
            raise _problem_error(where, "is inconsistent", problems)
        return _build(data, source_path)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(f"hardware spec {where} is nested too deeply to check; a spec nests at most a few "
                        f"levels (see {BUILTIN_DIR / 'x86_avx2.json'})") from None
    except Exception as e:  # a case the schema and semantic checks missed: still the spec's fault, say so
        import traceback

        raise SpecError(f"hardware spec {where} could not be interpreted ({type(e).__name__}: {e}); check it "
                        f"against {SCHEMA_PATH} and {BUILTIN_DIR / 'x86_avx2.json'} (if it follows them, this is "
                        f"a hago_py bug: please report it with the spec)",
                        details=traceback.format_exc()) from e


def _from_mapping(source: Mapping[str, Any]) -> HardwareSpec:
    """A dict source goes through JSON like a file: that copies it (the caller's dict is never shared or
    mutated), turns tuples into lists and rejects values JSON cannot hold (objects, cycles, non-str keys)."""
    where = "<dict>"
    try:
        text = json.dumps(dict(source), allow_nan=True)
    except RecursionError:
        raise SpecError(f"hardware spec {where} is nested too deeply; a spec nests at most a few levels "
                        f"(see {BUILTIN_DIR / 'x86_avx2.json'})") from None
    except (TypeError, ValueError) as e:
        raise SpecError(f"hardware spec {where} holds a value that is not plain JSON ({e}); use only dict "
                        f"(with str keys), list, str, int, float, bool and None values") from None
    try:
        data = json.loads(text)
    except RecursionError:  # pragma: no cover - json.dumps fails first
        raise SpecError(f"hardware spec {where} is nested too deeply") from None
    return _from_dict(data, where, None)


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark (some Windows editors write one)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = (" (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
        bad = raw[e.start:e.start + 1]
        line = raw[:e.start].count(b"\n") + 1
        raise SpecError(f"hardware spec file {path} is not UTF-8 text{hint}: invalid byte 0x{bad.hex()} at "
                        f"line {line} (byte offset {e.start}); save the file as UTF-8") from None


def _load_file(path: Path) -> HardwareSpec:
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as e:  # name too long, embedded NUL, ...
        raise SpecError(f"hardware spec path {str(path)[:200]!r} cannot be used ({e}); pass a built-in name "
                        f"({', '.join(_safe_builtin_names())}) or an existing .json path") from None
    if not exists:
        raise SpecError(f"hardware spec file {path} not found; pass a built-in name "
                        f"({', '.join(_safe_builtin_names())}) or an existing .json path")
    if not is_file:
        raise SpecError(f"hardware spec path {path} is not a file; pass a .json spec file")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"hardware spec file {path} is {size} bytes, more than any spec "
                            f"({MAX_SPEC_BYTES} bytes at most); pass the right .json file")
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"hardware spec file {path} cannot be read ({e.strerror or e}); check that it exists "
                        f"and is readable") from e
    text = _decode(raw, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"hardware spec file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                        f"fix the syntax there") from e
    except RecursionError:
        raise SpecError(f"hardware spec file {path} is nested too deeply to parse (more than Python's recursion "
                        f"limit of brackets); a spec nests at most a few levels (see "
                        f"{BUILTIN_DIR / 'x86_avx2.json'})") from None
    return _from_dict(data, str(path), str(path))


def _safe_builtin_names() -> List[str]:
    try:
        return builtin_names()
    except SpecError:
        return []


def _unknown_name(name: str) -> SpecError:
    names = _safe_builtin_names()
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.4)
    if not close:
        close = [n for n in lowered if name.lower() in n][:1]
    hint = f"; did you mean {lowered[close[0]]!r}?" if close else "."
    return SpecError(f"unknown hardware spec {name!r}: built-in specs are {', '.join(names) or '(none found)'}{hint} "
                     f"Pass one of those names or a path to a .json spec file")


def _looks_like_path(s: str) -> bool:
    return s.endswith(".json") or os.sep in s or (os.altsep is not None and os.altsep in s) or s.startswith(".")


def load_spec(source: SpecSource) -> HardwareSpec:
    """Load and validate a hardware spec.

    ``source``: a built-in name (``"x86_avx2"``, see :func:`list_specs`), a path (str or PathLike) to a
    ``.json`` spec, a dict in the spec format, or an already loaded :class:`HardwareSpec` (returned as is).
    Raises :class:`SpecError` for an unknown name, a missing / unreadable file, invalid JSON, a schema
    violation or a semantic inconsistency.
    """
    if isinstance(source, HardwareSpec):
        return source
    if isinstance(source, Mapping):
        return _from_mapping(source)
    if isinstance(source, os.PathLike):
        return _load_file(Path(os.fspath(source)))
    if not isinstance(source, str):
        raise SpecError(f"cannot load a hardware spec from a {type(source).__name__}; pass a built-in name, "
                        f"a path to a .json file or a dict")
    s = source.strip()
    if not s:
        raise SpecError("empty hardware spec name; pass a built-in name "
                        f"({', '.join(_safe_builtin_names())}) or a path to a .json file")
    if "\x00" in s:
        raise SpecError(f"hardware spec name {s[:80]!r} contains a NUL character; pass a built-in name or a path")
    if s.lower() == "host":  # the built-in spec that matches this CPU's flags (hw/host.py), and why
        from .host import match_host

        name, why = match_host()
        return dataclasses.replace(load_spec(name), host_match=why)
    if _looks_like_path(s):
        path = Path(s).expanduser()
        if path.name == s and s.endswith(".json") and _is_file(_builtin_dir() / s) and not _is_file(path):
            path = _builtin_dir() / s  # "x86_avx2.json" given as a bare file name: the built-in one
        return _load_file(path)
    builtin = _builtin_dir() / f"{s}.json"
    if s != "schema" and _is_file(builtin):
        spec = _load_file(builtin)
        if spec.name != s:
            raise SpecError(f"built-in hardware spec {builtin} is named {spec.name!r} but its file is {s}.json; "
                            f"make the name field match the file name")
        return spec
    if _is_file(Path(s)):
        return _load_file(Path(s))
    raise _unknown_name(s)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def list_specs() -> List[Dict[str, Any]]:
    """Every built-in spec, sorted by name: ``{"name", "description", "backend" (backend name), "path"}``."""
    out = []
    for n in builtin_names():
        spec = _load_file(_builtin_dir() / f"{n}.json")
        out.append({"name": spec.name, "description": spec.description, "backend": spec.backend_name,
                    "path": spec.source_path})
    return sorted(out, key=lambda d: d["name"])
