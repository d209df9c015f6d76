"""The shared requantize emitter: int32 accumulators -> rounded int32, as the hardware spec's ``requantize`` says.

A requantize takes one or more integer *terms* ``t_i`` (an int32 accumulator, or ``a - z_a`` for an Add) with real
multipliers ``M_i`` (``s_x*s_w/s_y`` per output channel, or ``s_a/s_y``) and computes ``round(sum_i t_i * M_i)``:

* ``float_scale`` (what ORT / MLAS do): ``float32(t_i) * float32(M_i)`` summed in float32, then rounded;
  ``M_i`` is computed in float32 like ORT (``s_x * s_w / s_y``).
* ``fixed_point``: ``M_i ~= m_i * 2**-S`` with one shift ``S`` per channel shared by the terms, ``m_i`` a
  Q(multiplier_bits-1) integer (the largest ``M_i`` uses all ``multiplier_bits - 1`` bits); the sum of the int64
  products is shifted right by ``S`` with rounding. ``multiplier_bits`` above 32 is capped at 32 (the int32 x
  multiplier product must fit int64).
* ``power_of_two``: ``M_i ~= 2**-s_i`` (nearest power of two); shifts only.

``rounding`` (half_to_even | half_away_from_zero | half_up | toward_zero) applies to the float round or to the
rounding right shift. :func:`plan` computes the constants (pure numpy, shared with ``reference.py``); :func:`emit`
writes the Relax arithmetic; :func:`apply_np` is the numpy twin used as the bit-exact reference.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

STYLES = ("float_scale", "fixed_point", "power_of_two")
ROUNDINGS = ("half_to_even", "half_away_from_zero", "half_up", "toward_zero")
DEFAULT = {"style": "float_scale", "multiplier_bits": 32, "rounding": "half_to_even"}
_MAX_SHIFT = 62


def spec_requantize(spec=None) -> Dict[str, Any]:
    """The ``requantize`` section of ``spec`` (name, path, dict with a ``requantize`` key, HardwareSpec, or the
    section itself), completed with the defaults; ``None`` -> float_scale / half_to_even (ORT's arithmetic)."""
    if spec is None:
        rq: Mapping[str, Any] = {}
    elif isinstance(spec, Mapping) and "style" in spec and "requantize" not in spec:
        rq = spec
    else:
        from ...hw import load_spec

        rq = load_spec(spec).requantize
    out = dict(DEFAULT, **dict(rq))
    if out["style"] not in STYLES or out["rounding"] not in ROUNDINGS:
        from ...errors import SpecError

        raise SpecError(f"requantize style '{out['style']}' / rounding '{out['rounding']}' unknown: use a style "
                        f"of {STYLES} and a rounding of {ROUNDINGS}")
    out["multiplier_bits"] = int(out.get("multiplier_bits") or 32)
    return out


def plan(multipliers: Sequence[np.ndarray], rq: Mapping[str, Any]) -> Dict[str, Any]:
    """Constants for ``round(sum_i t_i * M_i)``. ``multipliers``: one float32 array per term (broadcastable
    against its term). Returns ``{"style", "rounding", "M": [float32 arrays]}`` for float_scale, else
    ``{"style", "rounding", "m": [int64 arrays], "shift": int64 array, "bits"}``."""
    style, rounding = rq["style"], rq["rounding"]
    Ms = [np.asarray(m, np.float32) for m in multipliers]
    if style == "float_scale":
        return {"style": style, "rounding": rounding, "M": Ms}
    M64 = [np.abs(m.astype(np.float64)) for m in Ms]
    if any(np.any(m.astype(np.float64) < 0) for m in Ms):
        raise ValueError("negative requantize multiplier (a negative scale)")
    big = np.maximum.reduce([np.broadcast_to(m, np.broadcast(*M64).shape) for m in M64])
    big = np.where(big > 0, big, 1.0)
    if style == "fixed_point":
        bits = min(int(rq["multiplier_bits"]), 32)
        _, e = np.frexp(big)                                   # big = f * 2**e, f in [0.5, 1)
        shift = (bits - 1) - e.astype(np.int64)
        shift = np.clip(shift, 1, _MAX_SHIFT)
        ms = [np.round(m * np.exp2(shift.astype(np.float64))).astype(np.int64) for m in M64]
        # a multiplier just below a power of two rounds up to 2**(bits-1), one past the Q(bits-1) range: use one
        # bit less of shift there (exact for that term, half a step coarser for the others)
        over = np.maximum.reduce([np.broadcast_to(x, big.shape) for x in ms]) >= 2 ** (bits - 1)
        if np.any(over):
            shift = np.where(over, np.maximum(shift - 1, 1), shift)
            ms = [np.round(m * np.exp2(shift.astype(np.float64))).astype(np.int64) for m in M64]
        return {"style": style, "rounding": rounding, "m": ms, "shift": shift.astype(np.int64), "bits": bits}
    # power_of_two: M_i ~= 2**-s_i; one shift S = max s_i (>= 1), m_i = 2**(S - s_i)
    s = [np.round(-np.log2(np.where(m > 0, m, 1.0))).astype(np.int64) for m in M64]
    S = np.clip(np.maximum.reduce([np.broadcast_to(x, big.shape) for x in s]), 1, _MAX_SHIFT)
    ms = [np.where(m > 0, np.left_shift(np.int64(1), np.clip(S - si, 0, 40)), 0).astype(np.int64)
          for m, si in zip(M64, s)]
    return {"style": style, "rounding": rounding, "m": ms, "shift": S.astype(np.int64), "bits": None}


def describe(p: Mapping[str, Any]) -> str:
    if p["style"] == "float_scale":
        return f"float_scale/{p['rounding']}"
    return f"{p['style']}/{p['rounding']}" + (f"/Q{p['bits'] - 1}" if p.get("bits") else "")


# ------------------------------------------------------------------------------------------------ numpy twin
def _round_float_np(v: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half_to_even":
        return np.rint(v)
    if rounding == "half_away_from_zero":
        return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    if rounding == "half_up":
        return np.floor(v + np.float32(0.5))
    return np.trunc(v)


def _round_shift_np(v: np.ndarray, s: np.ndarray, rounding: str) -> np.ndarray:
    half = np.left_shift(np.int64(1), s - 1)
    if rounding == "half_up":
        return np.right_shift(v + half, s)
    if rounding == "toward_zero":
        return np.where(v < 0, -np.right_shift(-v, s), np.right_shift(v, s))
    if rounding == "half_away_from_zero":
        r = np.right_shift(np.abs(v) + half, s)
        return np.where(v < 0, -r, r)
    q = np.right_shift(v + half, s)                                # half_to_even
    tie = np.bitwise_and(v, np.left_shift(np.int64(1), s) - 1) == half
    return np.where(tie & (np.bitwise_and(q, 1) == 1), q - 1, q)


def apply_np(terms: Sequence[np.ndarray], p: Mapping[str, Any]) -> np.ndarray:
    """numpy ``round(sum t_i M_i)`` as int64, with exactly the arithmetic :func:`emit` writes."""
    if p["style"] == "float_scale":
        acc = None
        for t, M in zip(terms, p["M"]):
            v = np.asarray(t).astype(np.float32) * M
            acc = v if acc is None else (acc + v).astype(np.float32)
        return _round_float_np(acc, p["rounding"]).astype(np.int64)
    acc = sum(np.asarray(t).astype(np.int64) * m for t, m in zip(terms, p["m"]))
    return _round_shift_np(acc, p["shift"], p["rounding"])


# ------------------------------------------------------------------------------------------------ Relax
def _const(arr, dtype, shape, keep_shape: bool = False):
    """A Relax constant of ``arr`` as ``dtype`` and ``shape``; a one-element broadcast operand becomes a scalar
    unless ``keep_shape`` (an operand whose rank the op checks: a 1x1x1x1 conv weight, a [1, 1] matmul weight)."""
    from tvm import relax

    a = np.asarray(arr).astype(dtype)
    return relax.const(a.reshape(shape) if a.size > 1 or keep_shape else a.reshape(()), dtype)


def _round_float(v, rounding):
    from tvm.relax import op

    if rounding == "half_to_even":
        return op.round(v)                                         # lowers to nearbyint (half to even)
    half = _const(0.5, "float32", ())
    if rounding == "half_away_from_zero":
        return op.multiply(op.sign(v), op.floor(op.add(op.abs(v), half)))
    if rounding == "half_up":
        return op.floor(op.add(v, half))
    return op.trunc(v)


def _round_shift(v, s, rounding):
    from tvm.relax import op

    one = _const(1, "int64", ())
    half = op.left_shift(one, op.subtract(s, one))
    if rounding == "half_up":
        return op.right_shift(op.add(v, half), s)
    zero = _const(0, "int64", ())
    neg = op.less(v, zero)
    if rounding == "toward_zero":
        return op.where(neg, op.negative(op.right_shift(op.negative(v), s)), op.right_shift(v, s))
    if rounding == "half_away_from_zero":
        r = op.right_shift(op.add(op.abs(v), half), s)
        return op.where(neg, op.negative(r), r)
    q = op.right_shift(op.add(v, half), s)
    tie = op.equal(op.bitwise_and(v, op.subtract(op.left_shift(one, s), one)), half)
    odd = op.equal(op.bitwise_and(q, one), one)
    return op.where(op.logical_and(tie, odd), op.subtract(q, one), q)


def emit(terms: Sequence[Any], p: Mapping[str, Any], shape: Sequence[int]):
    """Relax expression ``round(sum t_i M_i)`` as int32. ``terms``: int32 Relax expressions; ``shape``: the
    broadcast shape of the per-channel constants (e.g. ``(1, C, 1, 1)`` for NCHW, ``(C,)`` for a matmul)."""
    from tvm.relax import op

    if p["style"] == "float_scale":
        acc = None
        for t, M in zip(terms, p["M"]):
            v = op.multiply(op.astype(t, "float32"), _const(M, "float32", shape))
            acc = v if acc is None else op.add(acc, v)
        return op.astype(_round_float(acc, p["rounding"]), "int32")
    acc = None
    for t, m in zip(terms, p["m"]):
        v = op.multiply(op.astype(t, "int64"), _const(m, "int64", shape))
        acc = v if acc is None else op.add(acc, v)
    return op.astype(_round_shift(acc, _const(p["shift"], "int64", shape), p["rounding"]), "int32")


def finish(r, zero_point: int, lo: int, hi: int, out_dtype: str):
    """``clamp(r + zero_point, lo, hi)`` cast to ``out_dtype`` (r: int32 Relax expression)."""
    from tvm.relax import op

    v = op.add(r, _const(int(zero_point), "int32", ())) if zero_point else r
    v = op.minimum(op.maximum(v, _const(int(lo), "int32", ())), _const(int(hi), "int32", ()))
    return op.astype(v, out_dtype)


def finish_np(r: np.ndarray, zero_point: int, lo: int, hi: int, out_dtype: str) -> np.ndarray:
    return np.clip(r + int(zero_point), int(lo), int(hi)).astype(out_dtype)


# ------------------------------------------------------------------------------------------------ shared matching
QRANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767), "uint16": (0, 65535)}


def dtype_of(expr) -> str:
    """dtype of a Relax tensor expression ("" when unknown); TVM 0.27 calls the type ``ty`` (was struct_info)."""
    t = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    return str(getattr(t, "dtype", "") or "")


def const_np(expr) -> Optional[np.ndarray]:
    """numpy value of a relax.Constant (None for anything else)."""
    import tvm

    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    data = getattr(expr, "value", None)
    data = data if hasattr(data, "numpy") else getattr(expr, "data", None)
    return data.numpy() if hasattr(data, "numpy") else None


def scalar(expr) -> Optional[float]:
    """A per-tensor (single value) constant's value, else None."""
    a = const_np(expr)
    return None if a is None or a.size != 1 else a.reshape(()).item()


def activation_bounds(matches: Mapping[Any, Any], relu, clip, y_scale: float, y_zp: int, out_dtype: str):
    """(lo, hi, name) of the clamp that folds the matched activation into the quantized output range:
    quantize is monotonic, so ``quantize(relu(v)) = max(quantize(v), zp)`` and likewise for clip."""
    lo, hi = QRANGE[out_dtype]
    if relu is not None and relu in matches:
        return max(lo, y_zp), hi, "relu"
    if clip is not None and clip in matches:
        call = matches[clip]
        mn, mx = (_prim(a) for a in call.args[1:3])
        if mn is None or mx is None:
            return None
        q = lambda v: int(np.clip(np.rint(np.float32(v) / np.float32(y_scale)) + y_zp, lo, hi))  # noqa: E731
        return max(lo, q(mn)), min(hi, q(mx)), "clip"
    return lo, hi, None


def _prim(e) -> Optional[float]:
    """A clip bound: a scalar constant or a primitive value (IntImm / FloatImm)."""
    v = getattr(e, "value", None)
    if isinstance(v, (int, float)):
        return float(v)
    if v is not None and isinstance(getattr(v, "value", None), (int, float)):
        return float(v.value)
    return scalar(e)


# ------------------------------------------------------------------------------------------------ ORT's Add
# MLAS's QLinearAdd (qladd_avx2.cpp; the NEON / SSE kernels do the same) folds both zero points into one float
# constant and uses fused multiply-adds: c = fma(a, rA, fma(b, rB, z_y - (rA*z_a + rB*z_b))), rounded half to
# even. Summing (a - z_a)*rA + (b - z_b)*rB instead differs by one step on ~1 % of elements, which compounds over
# a residual network. An FMA is emulated exactly: the int8 x float32 product is exact in float64 and the sum
# rounds once to float32.
def mlas_add_constants(sa: float, sb: float, sy: float, za: int, zb: int, zy: int):
    f32 = np.float32
    ra, rb = f32(f32(sa) / f32(sy)), f32(f32(sb) / f32(sy))
    # as ORT's build compiles `zc - (rA * za + rB * zb)`: contracted to zc - fma(rA, za, rB * zb) (checked
    # against onnxruntime in tests/test_tvm_backend.py)
    inner = np.float64(f32(rb * f32(zb)))
    fixed = f32(np.float64(f32(zy)) - np.float64(f32(np.float64(ra) * np.float64(za) + inner)))
    return ra, rb, fixed


def mlas_add_np(qa, qb, consts) -> np.ndarray:
    ra, rb, fixed = consts
    c1 = (np.asarray(qb).astype(np.float64) * np.float64(rb) + np.float64(fixed)).astype(np.float32)
    c = (np.asarray(qa).astype(np.float64) * np.float64(ra) + c1.astype(np.float64)).astype(np.float32)
    return np.rint(c).astype(np.int64)


def emit_mlas_add(a, b, consts):
    """Relax twin of :func:`mlas_add_np` (int32 result, zero point included; clamp with :func:`finish`, zp 0)."""
    from tvm.relax import op

    ra, rb, fixed = consts
    c1 = op.astype(op.add(op.multiply(op.astype(b, "float64"), _const(np.float64(rb), "float64", ())),
                          _const(np.float64(fixed), "float64", ())), "float32")
    c = op.astype(op.add(op.multiply(op.astype(a, "float64"), _const(np.float64(ra), "float64", ())),
                         op.astype(c1, "float64")), "float32")
    return op.astype(op.round(c), "int32")
