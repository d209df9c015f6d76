"""Seeded generator of fuzz cases for hago_py (models, calibration sets, specs, options, files, exporters).

Every family is a function ``seed -> Case`` (``gen_graphs(seed)``, ``gen_calib(seed)``, ...; ``make_case(family,
seed)`` dispatches). A case is fully determined by ``(family, seed)``: all randomness comes from a numpy
``Generator`` seeded with ``SeedSequence([family index, seed])``; no global state is read or written (the
exporter family takes an optional :class:`ExportCache` so that torch exports are done once per config).

A :class:`Case` says *how* to run (API or CLI), *what* to pass (model, calibration, target, options, files to
create in a fresh case folder), *what a success must look like* (``probe`` feed, FP32 reference bytes,
``quantizable``: every layer is quantizable at W8A8, so the output must stay close to FP32) and *what is
expected* (``expect``: ``ok`` / ``reject`` / ``either``; ``blame``: words of which a rejection message should
name at least one). Paths inside a case folder are given as :class:`Rel` and resolved by the runner
(benchmarks/fuzz.py).

Every model the ``graphs`` family emits passes ``onnx.checker`` (full check) and runs in ONNX Runtime in
FP32 on its probe feed; a draw that does not is redrawn from a derived seed.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FAMILIES: Tuple[str, ...] = ("graphs", "calib", "specs", "options", "files", "exporters")
SPEC_DIR = Path(__file__).resolve().parents[1] / "hw_specs"
BUILTIN_TARGETS: Tuple[str, ...] = tuple(sorted(p.stem for p in SPEC_DIR.glob("*.json") if p.stem != "schema"))
CLI_SHARE = 0.35       # share of cases run through the CLI (where the case can be expressed there)
LATENCY_SHARE = 0.06   # share of cases that keep measure_latency=True
COLLIDE_SUFFIXES = ("_scale", "_zero_point", "_quantized", "_dequantized")
MAX_REDRAWS = 40


# --------------------------------------------------------------------------------------------- case types


@dataclass(frozen=True)
class Rel:
    """A path relative to the case folder (resolved to an absolute path by the runner)."""

    path: str


@dataclass
class Case:
    """One fuzz case: inputs, how to run it and what the contract expects of it."""

    family: str
    seed: int
    mode: str                                   # "api" | "cli"
    note: str                                   # human-readable description (the repro hint)
    files: Dict[str, bytes] = field(default_factory=dict)  # created in the case folder before running
    dirs: List[str] = field(default_factory=list)          # folders created in the case folder
    model: Any = None                           # API: ModelProto | bytes | Rel | other
    calibration: Any = None                     # API: dict | list | iterator factory | Rel | other
    target: Any = "x86_avx2"                    # API: name | dict | Rel | other
    kwargs: Dict[str, Any] = field(default_factory=dict)   # API keyword arguments (options, search, ...)
    argv: List[Any] = field(default_factory=list)          # CLI argv (Rel items resolved), after "quantize"
    out: Optional[Rel] = None                   # where the model is written (API: Result.save)
    report: Optional[Rel] = None                # report folder (API: Result.save(report_dir=...))
    measure_latency: bool = False
    fp32: Optional[bytes] = None                # the FP32 model (reference for the success checks)
    probe: Optional[Dict[str, np.ndarray]] = None  # clean feed the output must run on
    quantizable: bool = False                   # W8A8 on an all-quantizable graph: assert closeness to FP32
    expect: str = "either"                      # "ok" | "reject" | "either"
    blame: Tuple[str, ...] = ()                 # a rejection should name one of these (case-insensitive)


class ExportCache:
    """In-memory cache of torch-exported model bytes, keyed by export config (torch export is slow)."""

    def __init__(self) -> None:
        self._data: Dict[Tuple, Any] = {}

    def get(self, key: Tuple, make: Callable[[], Any]) -> Any:
        """Return the cached value for ``key``, computing it with ``make()`` once (exceptions are cached too)."""
        if key not in self._data:
            try:
                self._data[key] = ("ok", make())
            except Exception as e:  # noqa: BLE001 - cached so a failing export is not retried per case
                self._data[key] = ("err", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return self._data[key]


def family_rng(family: str, seed: int, salt: int = 0) -> np.random.Generator:
    """The case's random generator: a function of (family, seed, salt) only."""
    return np.random.default_rng(np.random.SeedSequence([FAMILIES.index(family), int(seed) & 0xFFFFFFFF,
                                                         int(seed) >> 32, salt]))


def make_case(family: str, seed: int, cache: Optional[ExportCache] = None) -> Case:
    """Generate the case ``(family, seed)``."""
    gens: Dict[str, Callable[..., Case]] = {"graphs": gen_graphs, "calib": gen_calib, "specs": gen_specs,
                                            "options": gen_options, "files": gen_files,
                                            "exporters": gen_exporters}
    if family not in gens:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if family == "exporters":
        return gen_exporters(seed, cache)
    return gens[family](seed)


# ------------------------------------------------------------------------------------------- small helpers


def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    """A uniformly drawn element of ``seq``."""
    return seq[int(rng.integers(len(seq)))]


def chance(rng: np.random.Generator, p: float) -> bool:
    """True with probability ``p``."""
    return bool(rng.random() < p)


def ir_opset_pairs() -> Dict[int, Tuple[int, int]]:
    """IR version -> (lowest, highest) default-domain opset it can carry, from onnx.helper.VERSION_TABLE."""
    hi: Dict[int, int] = {}
    for row in helper.VERSION_TABLE:
        ir, opset = int(row[1]), int(row[2])
        hi[ir] = max(hi.get(ir, 0), opset)
    running, out = 0, {}
    for ir in sorted(hi):
        running = max(running, hi[ir])
        out[ir] = (7, running)
    return out


def draw_ir_opset(rng: np.random.Generator) -> Tuple[int, int]:
    """A consistent (ir_version, opset) pair: IR 3..10; opset 13..22 where the IR allows, else 7..max."""
    pairs = ir_opset_pairs()
    ir = int(pick(rng, [i for i in range(3, 11) if i in pairs]))
    lo, hi = pairs[ir]
    hi = min(hi, 22)
    if hi >= 13:
        return ir, int(rng.integers(13, hi + 1))
    return ir, int(rng.integers(max(lo, 7), hi + 1))


def ort_run(model_bytes: bytes, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """Run a serialized model in ONNX Runtime (CPU, 1 thread) and return its outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def save_npz(arrays: Dict[str, Any]) -> bytes:
    """Bytes of an .npz file holding ``arrays``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ graph builder


@dataclass
class GraphKnobs:
    """What a drawn graph contains (drawn once per graph, recorded in the case note)."""

    ir: int
    opset: int
    kind: str                     # "image" | "tokens" | "flat"
    batch: int                    # concrete batch of the probe (the static batch when static_batch)
    static_batch: bool
    n_layers: int
    features: Tuple[str, ...]     # oddities switched on


ODD_FEATURES = ("unnamed", "dup_names", "odd_names", "collide", "weights_as_inputs", "shared", "tiny_channels",
                "gemm_alpha_beta", "bias1", "sym_dims", "second_input", "multi_output", "zero_size",
                "sparse_init", "scaled_input", "dyn_matmul")
# "attention_mask" (token graphs only): an int64 [batch, seq] padding-mask input that zeroes the output rows of the
# padding (as pooling over the mask would), with padding rows 5x wider in the data (mask_padding, quant/padding.py)


class GraphBuilder:
    """Builds a random valid ONNX graph op by op, tracking concrete shapes (index 0 = batch)."""

    def __init__(self, rng: np.random.Generator, knobs: GraphKnobs) -> None:
        self.rng, self.k = rng, knobs
        self.nodes: List[onnx.NodeProto] = []
        self.inits: Dict[str, np.ndarray] = {}
        self.shape: Dict[str, Tuple[int, ...]] = {}
        self.weights_by_shape: Dict[Tuple, List[Tuple[str, Optional[str]]]] = {}
        self.counter = 0
        self.inputs: List[str] = []
        self.extra_outputs: List[str] = []
        self.n_weighted = 0  # layers with a constant weight (Conv / Gemm / MatMul)
        self.has_feature = set(knobs.features).__contains__

    # ---- names and tensors

    def fresh(self, prefix: str) -> str:
        """A new unique tensor name."""
        self.counter += 1
        return f"{prefix}{self.counter}"

    def init(self, prefix: str, arr: np.ndarray) -> str:
        """Add an initializer and return its name."""
        name = self.fresh(prefix)
        self.inits[name] = arr
        return name

    def node(self, op: str, inputs: List[str], out_shape: Tuple[int, ...], **attrs: Any) -> str:
        """Append a node with one output of concrete shape ``out_shape``; return the output name."""
        out = self.fresh(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(self.nodes)}", **attrs))
        self.shape[out] = tuple(int(d) for d in out_shape)
        return out

    def weight(self, shape: Tuple[int, ...], fan_in: int, bias: Optional[int], prefix: str = "w"
               ) -> Tuple[str, Optional[str]]:
        """A weight (and bias of length ``bias``) initializer; shared with an earlier layer when 'shared'."""
        self.n_weighted += 1
        key = (prefix, tuple(shape), bias)
        pool = self.weights_by_shape.get(key, [])
        if pool and self.has_feature("shared") and chance(self.rng, 0.7):
            return pool[0]
        w = self.rng.normal(0, 1.0 / math.sqrt(max(fan_in, 1)), shape).astype(np.float32)
        b = None if bias is None else self.rng.normal(0, 0.1, bias).astype(np.float32)
        if self.has_feature("tiny_channels") and shape[0] > 1 and chance(self.rng, 0.6):
            ch = int(self.rng.integers(shape[0])) if prefix != "mm" else None
            if ch is not None:
                w[ch] = w[ch] * pick(self.rng, [0.0, 1e-9, 1e-12])
                if b is not None and b.shape[0] == shape[0]:
                    b[ch] = pick(self.rng, [0.5, 3.0, -2.0])
        wn = self.init(prefix, w)
        bn = None if b is None else self.init("b", b)
        self.weights_by_shape.setdefault(key, []).append((wn, bn))
        return wn, bn

    # ---- ops on rank-4 [B, C, H, W]

    def conv(self, x: str, cout: Optional[int] = None, same: bool = False, keep_hw: bool = False) -> str:
        """Conv (1x1 or 3x3, stride 1/2, maybe depthwise, maybe no bias); ``keep_hw``: output H, W = input's."""
        _, c, h, w = self.shape[x]
        k = 1 if (min(h, w) < 3 or chance(self.rng, 0.3)) else 3
        fixed = same or keep_hw
        stride = 2 if (not fixed and min(h, w) >= 4 and chance(self.rng, 0.25)) else 1
        dil = 2 if (k == 3 and stride == 1 and min(h, w) >= 5 and chance(self.rng, 0.15)) else 1
        pad = (k // 2) * dil if (fixed or chance(self.rng, 0.7)) else 0
        group = c if (not same and cout is None and c > 1 and chance(self.rng, 0.15)) else 1
        co = c if (group > 1 or same) else (cout or int(self.rng.integers(2, 9)))
        has_bias = chance(self.rng, 0.8)
        wn, bn = self.weight((co, c // group, k, k), (c // group) * k * k, co if has_bias else None, "w")
        ext = dil * (k - 1) + 1
        ho, wo = (h + 2 * pad - ext) // stride + 1, (w + 2 * pad - ext) // stride + 1
        ins = [x, wn] + ([bn] if bn else [])
        attrs: Dict[str, Any] = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)
        if dil > 1:
            attrs["dilations"] = [dil, dil]
        return self.node("Conv", ins, (self.shape[x][0], co, ho, wo), **attrs)

    def pool(self, x: str) -> str:
        """MaxPool / AveragePool / GlobalAveragePool."""
        b, c, h, w = self.shape[x]
        kind = pick(self.rng, ["max", "avg", "gap"])
        if kind == "gap" or min(h, w) < 2:
            return self.node("GlobalAveragePool", [x], (b, c, 1, 1))
        op = "MaxPool" if kind == "max" else "AveragePool"
        if chance(self.rng, 0.5):
            attrs: Dict[str, Any] = dict(kernel_shape=[2, 2], strides=[2, 2])
            shape = (b, c, h // 2, w // 2)
        else:
            attrs = dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
            shape = (b, c, h, w)
        if op == "AveragePool":
            attrs["count_include_pad"] = int(chance(self.rng, 0.5))
        return self.node(op, [x], shape, **attrs)

    def pad(self, x: str) -> str:
        """Pad H and W by 1 (constant / reflect / edge; attribute form before opset 11)."""
        b, c, h, w = self.shape[x]
        mode = pick(self.rng, ["constant", "reflect", "edge"]) if min(h, w) > 1 else "constant"
        pads = [0, 0, 1, 1, 0, 0, 1, 1]
        shape = (b, c, h + 2, w + 2)
        if self.k.opset < 11:
            return self.node("Pad", [x], shape, pads=pads, mode=mode)
        pn = self.init("pads", np.array(pads, np.int64))
        return self.node("Pad", [x, pn], shape, mode=mode)

    def nhwc_matmul(self, x: str) -> str:
        """Transpose to NHWC, MatMul over channels (+Add bias), transpose back."""
        b, c, h, w = self.shape[x]
        t = self.node("Transpose", [x], (b, h, w, c), perm=[0, 2, 3, 1])
        co = int(self.rng.integers(2, 9))
        y = self.matmul(t, co)
        return self.node("Transpose", [y], (b, co, h, w), perm=[0, 3, 1, 2])

    def to_rank2(self, x: str) -> str:
        """Flatten / Reshape [0,-1] / GlobalAveragePool+Flatten to [B, features]."""
        b, c, h, w = self.shape[x]
        how = pick(self.rng, ["flatten", "reshape", "gap"]) if c * h * w <= 512 else "gap"
        if how == "gap":
            x = self.node("GlobalAveragePool", [x], (b, c, 1, 1))
            h = w = 1
        if how == "reshape":
            sn = self.init("shape", np.array([0, -1], np.int64))
            return self.node("Reshape", [x, sn], (b, c * h * w))
        return self.node("Flatten", [x], (b, c * h * w), axis=1)

    # ---- ops on rank-2 / rank-3 (features last)

    def gemm(self, x: str, m: Optional[int] = None) -> str:
        """Gemm with transB 0/1, optional alpha/beta, bias [M] / [1] / [1,M] / none (always one before opset 11)."""
        b, k = self.shape[x]
        m = m or int(self.rng.integers(2, 9))
        trans_b = int(chance(self.rng, 0.6))
        bias_kind = pick(self.rng, ["m", "m", "none", "1m"] + (["1"] * 3 if self.has_feature("bias1") else []))
        if self.k.opset < 11 and bias_kind == "none":
            bias_kind = "m"
        wn, bn = self.weight((m, k) if trans_b else (k, m), k, m if bias_kind == "m" else None, "g")
        ins = [x, wn]
        if bias_kind == "1":
            ins.append(self.init("b", self.rng.normal(0, 0.3, 1).astype(np.float32)))
        elif bias_kind == "1m":
            ins.append(self.init("b", self.rng.normal(0, 0.1, (1, m)).astype(np.float32)))
        elif bn:
            ins.append(bn)
        attrs: Dict[str, Any] = {"transB": trans_b}
        if self.has_feature("gemm_alpha_beta") and chance(self.rng, 0.7):
            attrs["alpha"] = float(pick(self.rng, [0.5, 2.0, 0.25, -1.0]))
            if len(ins) == 3:
                attrs["beta"] = float(pick(self.rng, [0.0, 0.5, 2.0]))
        return self.node("Gemm", ins, (b, m), **attrs)

    def matmul(self, x: str, m: Optional[int] = None) -> str:
        """MatMul with a [D, M] weight over the last axis, maybe + Add bias."""
        shp = self.shape[x]
        m = m or int(self.rng.integers(2, 9))
        wn, bn = self.weight((shp[-1], m), shp[-1], m if chance(self.rng, 0.7) else None, "mm")
        y = self.node("MatMul", [x, wn], shp[:-1] + (m,))
        if bn:
            ins = [y, bn] if chance(self.rng, 0.7) else [bn, y]
            y = self.node("Add", ins, shp[:-1] + (m,))
        return y

    def dyn_matmul(self, x: str) -> str:
        """MatMul of two activations: x @ x^T over the last two axes (attention-like, rank 3)."""
        b, s, d = self.shape[x]
        t = self.node("Transpose", [x], (b, d, s), perm=[0, 2, 1])
        return self.node("MatMul", [x, t], (b, s, s))

    # ---- any rank

    def act(self, x: str) -> str:
        """Relu or Clip (input form from opset 11, attribute form before)."""
        if chance(self.rng, 0.6):
            return self.node("Relu", [x], self.shape[x])
        lo, hi = 0.0, float(pick(self.rng, [6.0, 1.0, 3.0]))
        if self.k.opset < 11:
            return self.node("Clip", [x], self.shape[x], min=lo, max=hi)
        ins = [x, self.init("clip_min", np.array(lo, np.float32))]
        if chance(self.rng, 0.8):
            ins.append(self.init("clip_max", np.array(hi, np.float32)))
        return self.node("Clip", ins, self.shape[x])

    def silu(self, x: str) -> str:
        """x * Sigmoid(x) (SiLU / Swish, as exporters write it)."""
        sg = self.node("Sigmoid", [x], self.shape[x])
        ins = [x, sg] if chance(self.rng, 0.5) else [sg, x]
        return self.node("Mul", ins, self.shape[x])

    def softmax(self, x: str) -> str:
        """Softmax over the last axis."""
        return self.node("Softmax", [x], self.shape[x], axis=len(self.shape[x]) - 1)

    def norm(self, x: str) -> str:
        """BatchNormalization (rank 4) or LayerNormalization over the last axis (opset >= 17, else Softmax)."""
        shp = self.shape[x]
        if len(shp) == 4:
            c = shp[1]
            ins = [x] + [self.init(n, a) for n, a in (
                ("bn_scale", self.rng.uniform(0.5, 1.5, c)), ("bn_bias", self.rng.normal(0, 0.1, c)),
                ("bn_mean", self.rng.normal(0, 0.1, c)), ("bn_var", self.rng.uniform(0.5, 2.0, c)))]
            for n in ins[1:]:
                self.inits[n] = self.inits[n].astype(np.float32)
            return self.node("BatchNormalization", ins, shp, epsilon=1e-5)
        if self.k.opset < 17:
            return self.softmax(x)
        d = shp[-1]
        g = self.init("ln_g", (1 + self.rng.normal(0, 0.1, d)).astype(np.float32))
        b = self.init("ln_b", self.rng.normal(0, 0.1, d).astype(np.float32))
        return self.node("LayerNormalization", [x, g, b], shp, axis=-1)

    def layer(self, x: str, same: bool = False, keep_hw: bool = False) -> str:
        """One weighted layer suited to the rank of ``x`` (output shape == input shape when ``same``)."""
        shp = self.shape[x]
        if len(shp) == 4:
            return self.conv(x, same=same, keep_hw=keep_hw)
        if len(shp) == 2 and chance(self.rng, 0.6):
            return self.gemm(x, shp[-1] if same else None)
        return self.matmul(x, shp[-1] if same else None)

    def residual(self, x: str) -> str:
        """y = layer(x) (+ act); Add(y, x) in either order."""
        y = self.layer(x, same=True)
        if chance(self.rng, 0.5):
            y = self.act(y)
        ins = [y, x] if chance(self.rng, 0.5) else [x, y]
        return self.node("Add", ins, self.shape[x])

    def concat(self, x: str) -> str:
        """Two branches from ``x`` concatenated on the channel / feature axis."""
        a, b = self.layer(x, keep_hw=True), self.layer(x, keep_hw=True)
        sa, sb = self.shape[a], self.shape[b]
        axis = 1 if len(sa) == 4 else len(sa) - 1
        out = list(sa)
        out[axis] = sa[axis] + sb[axis]
        return self.node("Concat", [a, b], tuple(out), axis=axis if chance(self.rng, 0.5) or len(sa) == 4 else -1)

    def zero_concat(self, x: str) -> str:
        """Concat with a zero-size constant ([B, 0, H, W]; needs a static batch)."""
        shp = self.shape[x]
        empty = np.zeros((shp[0], 0) + shp[2:], np.float32)
        return self.node("Concat", [x, self.init("empty", empty)], shp, axis=1)

    def to_tokens(self, x: str) -> str:
        """Reshape [B, D] -> [B, a, D/a] when D factorizes."""
        b, d = self.shape[x]
        for a in (2, 3, 4):
            if d % a == 0 and d // a >= 2:
                sn = self.init("shape", np.array([0, a, d // a], np.int64))
                return self.node("Reshape", [x, sn], (b, a, d // a))
        return x

    def tokens_to_rank2(self, x: str) -> str:
        """Reshape [B, S, D] -> [B, S*D]."""
        b, s, d = self.shape[x]
        sn = self.init("shape", np.array([0, -1], np.int64))
        return self.node("Reshape", [x, sn], (b, s * d))

    def step(self, x: str) -> str:
        """One random op applicable to ``x``."""
        rank = len(self.shape[x])
        choices: List[Callable[[str], str]] = [self.layer, self.act, self.residual, self.concat, self.silu,
                                               self.norm] + ([self.softmax] if rank != 4 else [])
        if rank == 4:
            choices += [self.pool, self.pad, self.to_rank2]
            if self.shape[x][1] <= 16:
                choices.append(self.nhwc_matmul)
            if self.has_feature("zero_size") and self.k.static_batch:
                choices.append(self.zero_concat)
        elif rank == 2:
            choices.append(self.to_tokens)
        elif rank == 3:
            choices.append(self.tokens_to_rank2)
            if self.has_feature("dyn_matmul") and self.shape[x][1] <= 16:
                choices += [self.dyn_matmul] * 2
        return pick(self.rng, choices)(x)


def _input_shape(rng: np.random.Generator, kind: str) -> Tuple[int, ...]:
    """Concrete per-sample shape of the first input."""
    if kind == "image":
        return (int(rng.integers(1, 5)), int(rng.integers(3, 11)), int(rng.integers(3, 11)))
    if kind == "tokens":
        return (int(rng.integers(2, 7)), int(rng.integers(2, 17)))
    return (int(rng.integers(2, 33)),)


def _declared_dims(rng: np.random.Generator, shape: Tuple[int, ...], static_batch: bool, batch: int,
                   sym: bool) -> List[Any]:
    """Declared input dims: batch static or symbolic (named or unnamed); other dims maybe symbolic."""
    first: Any = batch if static_batch else pick(rng, ["N", "batch", "batch_size", ""])
    rest: List[Any] = [pick(rng, [d, f"d{i}"]) if sym else d for i, d in enumerate(shape)]
    return [first] + rest


def _make_value_info(name: str, dims: List[Any]) -> onnx.ValueInfoProto:
    """A float tensor value info; '' dims become unnamed dynamic dims."""
    vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, [d if d != "" else None for d in dims])
    return vi


def _output_info(rng: np.random.Generator, name: str, shape: Tuple[int, ...], batch: Any) -> onnx.ValueInfoProto:
    """Graph output info: rank only (unnamed dims) or the declared batch and the concrete other dims."""
    if chance(rng, 0.5):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * len(shape))
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch if batch != "" else None] + list(shape[1:]))


def draw_knobs(rng: np.random.Generator, plain: bool) -> GraphKnobs:
    """Graph knobs; ``plain`` graphs have no oddities (for the calib / specs / options / files families)."""
    if plain:
        ir, opset = int(pick(rng, [7, 8, 9, 10])), int(pick(rng, [13, 15, 17]))
        feats: Tuple[str, ...] = tuple(f for f in ("second_input", "multi_output") if chance(rng, 0.15))
    else:
        ir, opset = draw_ir_opset(rng)
        n = int(rng.integers(0, 5))
        feats = tuple(sorted(set(rng.choice(ODD_FEATURES, size=n, replace=False).tolist())))
        if ir < 4:
            feats = tuple(sorted(set(feats) | {"weights_as_inputs"}))
    static = chance(rng, 0.25)
    kind = pick(rng, ["image", "image", "tokens", "flat"])
    if not plain and kind == "tokens" and chance(rng, 0.4):
        feats = tuple(sorted(set(feats) | {"attention_mask"}))
    return GraphKnobs(ir=ir, opset=opset, kind=kind,
                      batch=int(pick(rng, [1, 2, 4])) if static else int(rng.integers(2, 9)), static_batch=static,
                      n_layers=int(rng.integers(1, 8)), features=feats)


def _rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in the (flat) graph."""
    g = model.graph
    for n in g.node:
        for i, v in enumerate(n.input):
            if v == old:
                n.input[i] = new
        for i, v in enumerate(n.output):
            if v == old:
                n.output[i] = new
    for coll in (g.input, g.output, g.value_info):
        for vi in coll:
            if vi.name == old:
                vi.name = new
    for t in g.initializer:
        if t.name == old:
            t.name = new


def _collide_names(rng: np.random.Generator, model: onnx.ModelProto) -> None:
    """Rename intermediate tensors / biases to names hago_py generates: '<w>_scale', '<x>_quantized', ..."""
    g = model.graph
    outs = {o.name for o in g.output}
    weights = [t.name for t in g.initializer if len(t.dims) >= 2]
    acts = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}] + \
        [o for n in g.node for o in n.output]
    inter = [o for n in g.node for o in n.output if o not in outs]
    taken = set(weights) | set(acts) | {t.name for t in g.initializer}
    for _ in range(int(rng.integers(1, 4))):
        if not inter:
            return
        victim = pick(rng, inter)
        base = pick(rng, weights + acts) if weights or acts else victim
        new = f"{base}{pick(rng, COLLIDE_SUFFIXES)}"
        if new in taken or victim == base:
            continue
        _rename_tensor(model, victim, new)
        inter = [new if v == victim else v for v in inter]
        taken.add(new)
    biases = [t.name for t in g.initializer if len(t.dims) == 1]
    if weights and biases and chance(rng, 0.5):
        new = f"{pick(rng, weights)}{pick(rng, COLLIDE_SUFFIXES)}"
        if new not in taken:
            _rename_tensor(model, pick(rng, biases), new)


def _name_nodes(rng: np.random.Generator, model: onnx.ModelProto, feats: Sequence[str]) -> None:
    """Node names: unnamed / duplicate / odd characters, as the features ask."""
    for i, n in enumerate(model.graph.node):
        if "unnamed" in feats and chance(rng, 0.6):
            n.name = ""
        elif "dup_names" in feats and chance(rng, 0.5):
            n.name = pick(rng, ["layer", "node", n.op_type])
        elif "odd_names" in feats and chance(rng, 0.5):
            n.name = pick(rng, [f"/blocks.{i}/conv/Conv", f"卷积_{i}", f"a b:{i}", f"n{i}'\"", f"{i}"])


def _sparsify(rng: np.random.Generator, model: onnx.ModelProto) -> bool:
    """Move one 2-D weight into graph.sparse_initializer (half its entries zeroed). True if done."""
    g = model.graph
    cands = [t for t in g.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT]
    input_names = {i.name for i in g.input}
    cands = [t for t in cands if t.name not in input_names]
    if not cands:
        return False
    t = pick(rng, cands)
    arr = numpy_helper.to_array(t).copy()
    arr[rng.random(arr.shape) < 0.5] = 0.0
    flat = arr.reshape(-1)
    idx = np.nonzero(flat)[0].astype(np.int64)
    values = numpy_helper.from_array(flat[idx].astype(np.float32), t.name)
    indices = numpy_helper.from_array(idx, t.name + "_idx")
    sp = helper.make_sparse_tensor(values, indices, list(arr.shape))
    g.initializer.remove(t)
    g.sparse_initializer.append(sp)
    return True


def build_graph(rng: np.random.Generator, knobs: GraphKnobs) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray]]:
    """Build one model from ``knobs``; returns (model, calibration arrays with leading sample axis)."""
    b = GraphBuilder(rng, knobs)
    per_sample = _input_shape(rng, knobs.kind)
    x = "input"
    b.shape[x] = (knobs.batch,) + per_sample
    b.inputs.append(x)
    if "second_input" in knobs.features:
        b.shape["input_2"] = b.shape[x]
        b.inputs.append("input_2")
        if chance(rng, 0.6):
            x = b.node("Add", [x, "input_2"], b.shape[x])
        else:
            axis = len(b.shape[x]) - 1 if len(b.shape[x]) != 4 else 1
            out = list(b.shape[x])
            out[axis] *= 2
            x = b.node("Concat", [x, "input_2"], tuple(out), axis=axis)
    for i in range(knobs.n_layers):
        x = b.step(x)
        if "multi_output" in knobs.features and i == 0 and knobs.n_layers > 1:
            b.extra_outputs.append(x)
    if b.n_weighted == 0:
        x = b.layer(x)
    in_shape = b.shape["input"]
    masked = ("attention_mask" in knobs.features and len(b.shape[x]) == 3 and b.shape[x][:2] == in_shape[:2])
    if masked:  # zero the padding rows of the output, as pooling over the mask would
        mf = b.node("Cast", ["attention_mask"], in_shape[:2], to=TensorProto.FLOAT)
        if knobs.opset >= 13:
            m3 = b.node("Unsqueeze", [mf, b.init("axes", np.asarray([-1], np.int64))], in_shape[:2] + (1,))
        else:
            m3 = b.node("Unsqueeze", [mf], in_shape[:2] + (1,), axes=[2])
        x = b.node("Mul", [x, m3], b.shape[x])
    sym = "sym_dims" in knobs.features
    dims = _declared_dims(rng, per_sample, knobs.static_batch, knobs.batch, sym)
    graph_inputs = [_make_value_info(n, dims) for n in b.inputs]
    if masked:
        graph_inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                          [d if d != "" else None for d in dims[:2]]))
    outputs = [_output_info(rng, o, b.shape[o], dims[0]) for o in [x] + b.extra_outputs]
    inits = [numpy_helper.from_array(a, n) for n, a in b.inits.items()]
    if "weights_as_inputs" in knobs.features:
        graph_inputs += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                         for n, a in b.inits.items()]
    g = helper.make_graph(b.nodes, f"fuzz_{knobs.kind}", graph_inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", knobs.opset)], producer_name="hago-fuzz")
    model.ir_version = knobs.ir
    _name_nodes(rng, model, knobs.features)
    if "collide" in knobs.features:
        _collide_names(rng, model)
    if "sparse_init" in knobs.features and knobs.ir >= 6:
        _sparsify(rng, model)
    n_samples = knobs.batch * int(rng.integers(1, 4)) if knobs.static_batch else int(rng.integers(2, 17))
    scale = float(pick(rng, [0.01, 10.0, 100.0])) if "scaled_input" in knobs.features else 1.0
    calib = {n: (rng.normal(0, 1, (n_samples,) + per_sample) * scale).astype(np.float32) for n in b.inputs}
    if masked:  # trailing padding, at least one real token; padding rows 5x wider
        seq = per_sample[0]
        real = np.arange(seq)[None, :] < rng.integers(1, seq + 1, n_samples)[:, None]
        calib["attention_mask"] = real.astype(np.int64)
        for n in b.inputs:
            calib[n] = np.where(real[..., None], calib[n], 5 * calib[n]).astype(np.float32)
    return model, calib


def probe_of(calib: Dict[str, np.ndarray], knobs: GraphKnobs) -> Dict[str, np.ndarray]:
    """The feed a success is checked on: the first calibration samples (exactly the static batch)."""
    n = knobs.batch if knobs.static_batch else min(8, len(next(iter(calib.values()))))
    return {k: np.ascontiguousarray(v[:n]) for k, v in calib.items()}


def unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose duplicate node names get a suffix (ORT refuses duplicates; ONNX allows them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    seen: Dict[str, int] = {}
    for n in m.graph.node:
        if n.name:
            seen[n.name] = seen.get(n.name, 0) + 1
            if seen[n.name] > 1:
                n.name = f"{n.name}__dup{seen[n.name]}"
    return m


def valid_model(model: onnx.ModelProto, probe: Dict[str, np.ndarray]) -> Optional[str]:
    """None if ``model`` passes onnx.checker (full check, unless it has sparse initializers, which onnx shape
    inference does not support) and its de-duplicated-names copy runs finitely in ORT on ``probe``."""
    try:
        onnx.checker.check_model(model, full_check=not model.graph.sparse_initializer)
        outs = ort_run(unique_node_names(model).SerializeToString(), probe)
    except Exception as e:  # noqa: BLE001 - any failure means: redraw
        return f"{type(e).__name__}: {str(e)[:200]}"
    if not all(np.all(np.isfinite(o)) for o in outs):
        return "non-finite FP32 output"
    return None


def draw_model(family: str, seed: int, plain: bool
               ) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray], Dict[str, np.ndarray], GraphKnobs]:
    """A valid random model with calibration arrays and probe; redrawn from derived seeds until valid."""
    last = ""
    for attempt in range(MAX_REDRAWS):
        rng = family_rng(family, seed, salt=1000 + attempt)
        knobs = draw_knobs(rng, plain)
        model, calib = build_graph(rng, knobs)
        probe = probe_of(calib, knobs)
        why = valid_model(model, probe)
        if why is None:
            return model, calib, probe, knobs
        last = why
    raise RuntimeError(f"fuzzgen: no valid graph for {family}:{seed} after {MAX_REDRAWS} draws ({last})")


def fp32_bytes(model: onnx.ModelProto) -> bytes:
    """The FP32 reference the success checks run: ``model`` with unique node names (ORT refuses duplicates)."""
    return unique_node_names(model).SerializeToString()


def knobs_note(knobs: GraphKnobs) -> str:
    """One-line description of a drawn graph."""
    batch = f"static batch {knobs.batch}" if knobs.static_batch else "dynamic batch"
    feats = ",".join(knobs.features) or "plain"
    return f"{knobs.kind} graph, {knobs.n_layers} steps, IR {knobs.ir} opset {knobs.opset}, {batch}, [{feats}]"


def node_names(model: onnx.ModelProto) -> List[str]:
    """Non-empty node names of a model."""
    return [n.name for n in model.graph.node if n.name]


def input_names(model: onnx.ModelProto) -> List[str]:
    """Graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


# ------------------------------------------------------------------------------------------ API / CLI forms


CLI_FLAGS: Dict[str, str] = {"weight_bits": "--weight-bits", "activation_bits": "--activation-bits",
                             "clipping": "--clipping", "activation_mode": "--activation-mode",
                             "rounding": "--rounding", "smooth_alpha": "--smooth-alpha",
                             "recon_samples": "--recon-samples", "saturation_remedy": "--saturation-remedy",
                             "threads": "--threads", "max_calib_samples": "--max-calib-samples"}
CLI_SWITCHES: Dict[str, Tuple[Any, str]] = {"per_channel": (False, "--per-tensor"), "equalize": (True, "--equalize"),
                                            "smooth": (False, "--no-smooth"), "simulate": (True, "--simulate")}


def cli_option_args(opts: Dict[str, Any]) -> Optional[List[str]]:
    """CLI flags for ``opts``, or None when some option has no CLI form."""
    args: List[str] = []
    for k, v in opts.items():
        if k in CLI_FLAGS:
            args += [CLI_FLAGS[k], str(v)]
        elif k in CLI_SWITCHES and isinstance(v, bool):
            on_value, flag = CLI_SWITCHES[k]
            if v == on_value:
                args.append(flag)
        elif k == "bias_correction" and v in (None, True, False):
            args += ["--bias-correction", {None: "auto", True: "on", False: "off"}[v]]
        elif k == "exclude" and isinstance(v, list) and all(isinstance(s, str) for s in v):
            for s in v:
                args += ["--exclude", s]
        else:
            return None
    return args


def finish_case(case: Case, rng: np.random.Generator, model: Any, calib: Any, target: Any,
                opts: Dict[str, Any], allow_cli: bool = True, cli_share: float = CLI_SHARE) -> Case:
    """Fill the API and (when expressible and drawn) CLI forms of a case.

    ``model`` / ``calib`` / ``target`` are the API values; the CLI form writes model.onnx / calib.npz /
    spec.json into the case folder when they are in memory and expressible."""
    case.measure_latency = chance(rng, LATENCY_SHARE)
    case.model, case.calibration, case.target, case.kwargs = model, calib, target, dict(opts)
    case.out = case.out or Rel(pick(rng, ["out.onnx", "q/model_int8.onnx"]) if not case.dirs else "q/model_int8.onnx")
    if case.out.path.startswith("q/") and "q" not in case.dirs:
        case.dirs.append("q")
    if case.report is None and chance(rng, 0.1):
        case.report = Rel("report")
    flags = cli_option_args(opts)
    if not allow_cli or flags is None or not chance(rng, cli_share):
        case.mode = "api"
        return case
    m_arg = _cli_path(case, model, "model.onnx", _model_bytes)
    c_arg = _cli_path(case, calib, "calib.npz", _calib_bytes)
    t_arg = target if isinstance(target, str) else _cli_path(case, target, "spec.json", _spec_bytes)
    if m_arg is None or c_arg is None or t_arg is None:
        case.mode = "api"
        return case
    case.mode = "cli"
    case.argv = [m_arg, "--calib", c_arg, "--out", case.out, "--target", t_arg] + flags
    if case.report is not None:
        case.argv += ["--report", case.report]
    if not case.measure_latency:
        case.argv.append("--no-latency")
    if chance(rng, 0.7):
        case.argv.append("--quiet")
    return case


def _model_bytes(model: Any) -> Optional[bytes]:
    """Serialized model, or None when it has no file form."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return bytes(model) if isinstance(model, (bytes, bytearray)) else None


def _calib_bytes(calib: Any) -> Optional[bytes]:
    """An .npz of a dict calibration (arrays only), or None."""
    if isinstance(calib, dict) and calib and all(isinstance(v, np.ndarray) and v.dtype != object
                                                 for v in calib.values()):
        return save_npz(calib)
    return None


def _spec_bytes(spec: Any) -> Optional[bytes]:
    """JSON of a dict spec, or None."""
    if isinstance(spec, dict):
        try:
            return json.dumps(spec).encode("utf-8")
        except (TypeError, ValueError, RecursionError):
            return None
    return None


def _cli_path(case: Case, value: Any, name: str, to_bytes: Callable[[Any], Optional[bytes]]) -> Optional[Rel]:
    """A Rel path for ``value`` (written into the case folder when it is in memory)."""
    if isinstance(value, Rel):
        return value
    data = to_bytes(value)
    if data is None:
        return None
    case.files[name] = data
    return Rel(name)


def calib_forms(rng: np.random.Generator, case: Case, calib: Dict[str, np.ndarray], batch: int) -> Any:
    """The calibration as a dict, a list of feed dicts (one per batch) or an .npz path, drawn."""
    form = pick(rng, ["dict", "dict", "list", "npz"])
    if form == "list":
        n = len(next(iter(calib.values())))
        return [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)]
    if form == "npz":
        case.files["calib.npz"] = save_npz(calib)
        return Rel("calib.npz")
    return calib


def model_forms(rng: np.random.Generator, case: Case, model: onnx.ModelProto) -> Any:
    """The model as a ModelProto, bytes or a path in the case folder, drawn."""
    form = pick(rng, ["proto", "proto", "bytes", "path"])
    if form == "bytes":
        return model.SerializeToString()
    if form == "path":
        case.files["model.onnx"] = model.SerializeToString()
        return Rel("model.onnx")
    return model


# ------------------------------------------------------------------------------------------------ families


def gen_graphs(seed: int) -> Case:
    """Random valid graphs with oddities (names, shared weights, weights as inputs, IR/opset, ...) and a plain
    calibration set; default W8A8 options (sometimes per-tensor / another built-in target)."""
    model, calib, probe, knobs = draw_model("graphs", seed, plain=False)
    rng = family_rng("graphs", seed, salt=1)
    case = Case("graphs", seed, "api", knobs_note(knobs), fp32=fp32_bytes(model), probe=probe)
    opts: Dict[str, Any] = {}
    if chance(rng, 0.25):
        opts["per_channel"] = False
    if chance(rng, 0.3 if knobs.static_batch else 0.1):
        opts["calib_batch_size"] = int(pick(rng, [16, 3, 1]))
    # W8A8 variations that must stay close to FP32 on any graph
    for key, values, p in (("activation_mode", ["static", "dynamic"], 0.2), ("quantize_outputs", [True], 0.1),
                           ("saturation_remedy", ["none", "reduce_range", "u8u8"], 0.15),
                           ("rounding", ["adaround", "gptq"], 0.08), ("equalize", [True], 0.08)):
        if chance(rng, p):
            opts[key] = pick(rng, values)
    if opts.get("rounding") in ("adaround", "gptq"):
        opts["rounding_iters"] = 5
    low_bits = chance(rng, 0.1)
    if low_bits:  # sub-8-bit weights the target has no kernel for: simulated (fake-quant) layers
        opts.update(weight_bits=int(pick(rng, [2, 3, 4])), simulate=True)
    target = pick(rng, ["x86_avx2"] * 3 + list(BUILTIN_TARGETS))
    case.note += f"; target {target}; options {opts}"
    case.quantizable = not low_bits
    # ORT itself refuses duplicate node names: a clear rejection of those is acceptable
    case.expect = "either" if "dup_names" in knobs.features else "ok"
    case.blame = tuple(node_names(model)) + ("model", "node", "input")
    cal = calib_forms(rng, case, calib, knobs.batch if knobs.static_batch else 4)
    return finish_case(case, rng, model_forms(rng, case, model), cal, target, opts)


CALIB_KINDS = ("one_sample", "fewer_than_batch", "not_multiple_of_batch", "big_endian", "float64", "float16",
               "nan", "inf", "all_nan", "wrong_shape", "missing_batch_axis", "wrong_name", "extra_name",
               "missing_name", "empty_dict", "zero_samples", "const_zero", "huge", "int_data", "list_of_feeds",
               "ragged_feeds", "generator", "single_array", "python_lists", "object_array", "non_contiguous",
               "npz_pickled", "npz_corrupt", "npz_missing", "scalar", "string_data", "transposed")


def gen_calib(seed: int) -> Case:
    """Odd calibration sets for a valid plain model."""
    model, calib, probe, knobs = draw_model("calib", seed, plain=True)
    rng = family_rng("calib", seed, salt=1)
    kind = pick(rng, CALIB_KINDS)
    if kind in ("fewer_than_batch", "not_multiple_of_batch") and not knobs.static_batch:
        kind = "one_sample"
    case = Case("calib", seed, "api", f"calib '{kind}' on a {knobs_note(knobs)}", fp32=fp32_bytes(model),
                probe=probe)
    names = list(calib)
    case.blame = tuple(names) + ("calibration", "calib", "sample", "input")
    data, expect, close = odd_calibration(rng, case, kind, calib, knobs)
    case.expect, case.quantizable = expect, close
    if close and kind in ("one_sample", "fewer_than_batch"):
        case.probe = {k: np.ascontiguousarray(np.asarray(v, np.float32)[:knobs.batch]) for k, v in calib.items()} \
            if knobs.static_batch else {k: v[:1] for k, v in calib.items()}
    return finish_case(case, rng, model, data, "x86_avx2", {})


def odd_calibration(rng: np.random.Generator, case: Case, kind: str, calib: Dict[str, np.ndarray],
                    knobs: GraphKnobs) -> Tuple[Any, str, bool]:
    """(calibration value, expected outcome, closeness asserted) for calibration ``kind``."""
    c = {k: v.copy() for k, v in calib.items()}
    first = next(iter(c))
    n = len(c[first])
    if kind == "one_sample":  # fewer samples than a static batch > 1 may be refused
        return {k: v[:1] for k, v in c.items()}, ("either" if knobs.static_batch and knobs.batch > 1 else "ok"), \
            not (knobs.static_batch and knobs.batch > 1)
    if kind == "fewer_than_batch":
        return {k: v[:max(1, knobs.batch // 2)] for k, v in c.items()}, "either", False
    if kind == "not_multiple_of_batch":
        extra = {k: np.concatenate([v, v[:1]]) for k, v in c.items()}
        return extra, "ok", True
    if kind == "big_endian":
        return {k: v.astype(">f4") for k, v in c.items()}, "ok", True
    if kind == "float64":
        return {k: v.astype(np.float64) for k, v in c.items()}, "ok", True
    if kind == "float16":
        return {k: v.astype(np.float16) for k, v in c.items()}, "either", False
    if kind in ("nan", "inf", "all_nan"):
        bad = {"nan": np.nan, "inf": np.inf, "all_nan": np.nan}[kind]
        if kind == "all_nan":
            c[first][:] = bad
        else:
            c[first].reshape(-1)[int(rng.integers(c[first].size))] = bad
        return c, "either", False
    if kind == "wrong_shape":
        v = c[first]
        return dict(c, **{first: np.concatenate([v, v], axis=-1)}), "reject", False
    if kind == "missing_batch_axis":
        return dict(c, **{first: c[first][0]}), "either", False
    if kind == "transposed":
        v = c[first]
        if v.ndim >= 3 and v.shape[-1] != v.shape[-2]:
            return dict(c, **{first: np.swapaxes(v, -1, -2).copy()}), "reject", False
        return dict(c, **{first: v[..., :1] if v.shape[-1] > 1 else np.concatenate([v, v], -1)}), "reject", False
    if kind == "wrong_name":
        return {(k + "_typo" if k == first else k): v for k, v in c.items()}, "reject", False
    if kind == "extra_name":
        return dict(c, extra_input=c[first]), "either", False
    if kind == "missing_name":
        return ({k: v for k, v in c.items() if k != first} if len(c) > 1 else {}), "reject", False
    if kind == "empty_dict":
        return {}, "reject", False
    if kind == "zero_samples":
        return {k: v[:0] for k, v in c.items()}, "reject", False
    if kind == "const_zero":
        return {k: np.zeros_like(v) for k, v in c.items()}, "either", False
    if kind == "huge":
        return {k: v * np.float32(1e30) for k, v in c.items()}, "either", False
    if kind == "int_data":
        return {k: np.round(v * 3).astype(pick(rng, [np.int32, np.int64, np.uint8])) for k, v in c.items()}, \
            "either", False
    if kind == "list_of_feeds":
        b = knobs.batch if knobs.static_batch else int(rng.integers(1, 5))
        return [{k: v[i:i + b] for k, v in c.items()} for i in range(0, n - n % b if knobs.static_batch else n, b)], \
            "ok", True
    if kind == "ragged_feeds":
        cuts = sorted(set(int(x) for x in rng.integers(1, max(n, 2), size=2)))
        edges = [0] + [x for x in cuts if 0 < x < n] + [n]
        feeds = [{k: v[a:b] for k, v in c.items()} for a, b in zip(edges[:-1], edges[1:]) if b > a]
        return feeds, ("either" if knobs.static_batch else "ok"), not knobs.static_batch
    if kind == "generator":
        feeds = [{k: v[i:i + 1] for k, v in c.items()} for i in range(n)]
        return (f for f in feeds), "either", False
    if kind == "single_array":
        if len(c) == 1:
            return c[first], "ok", True
        return list(c.values()), "reject", False
    if kind == "python_lists":
        return {k: v.tolist() for k, v in c.items()}, "either", False
    if kind == "object_array":
        obj = np.empty(n, dtype=object)
        for i in range(n):
            obj[i] = c[first][i]
        return dict(c, **{first: obj}), "either", False
    if kind == "non_contiguous":
        return {k: np.asfortranarray(v) if v.ndim > 1 else v[::-1] for k, v in c.items()}, "ok", True
    if kind == "npz_pickled":
        buf = io.BytesIO()
        obj = np.empty(1, dtype=object)
        obj[0] = {"x": 1}
        np.savez(buf, **{first: obj})
        case.files["calib.npz"] = buf.getvalue()
        case.blame += ("calib.npz",)
        return Rel("calib.npz"), "reject", False
    if kind == "npz_corrupt":
        data = save_npz(c)
        case.files["calib.npz"] = data[: len(data) // 2]
        case.blame += ("calib.npz",)
        return Rel("calib.npz"), "reject", False
    if kind == "npz_missing":
        case.blame += ("missing.npz",)
        return Rel("missing.npz"), "reject", False
    if kind == "scalar":
        return {k: np.float32(1.0) for k in c}, "reject", False
    if kind == "string_data":
        return {k: np.array(["a"] * n) for k in c}, "reject", False
    raise ValueError(kind)


def builtin_spec(name: str) -> Dict[str, Any]:
    """A built-in spec as a dict (read from hw_specs/<name>.json)."""
    return json.loads((SPEC_DIR / f"{name}.json").read_text(encoding="utf-8"))


SPEC_MUTATIONS = ("remove_field", "wrong_type", "lowercase_op", "unknown_op", "nan_cost", "negative_cost",
                  "zero_cost", "inf_cost", "deep_nesting", "w16a16", "w8a16", "invalid_utf8", "bom", "empty_ops",
                  "extra_field", "bad_name", "name_mismatch", "fixed_point_no_mult", "power_of_two",
                  "unknown_builtin", "target_none", "target_int", "target_dir", "target_missing_file",
                  "valid_other", "not_object", "truncated_json", "schemes_empty", "hazard_no_remedy",
                  "dynamic_not_listed", "bits_too_wide", "float8_scheme", "dup_keys")


def _spec_set(d: Dict[str, Any], path: Sequence[Any], value: Any) -> None:
    """d[path...] = value."""
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def _spec_del(d: Dict[str, Any], path: Sequence[Any]) -> None:
    """del d[path...]."""
    for p in path[:-1]:
        d = d[p]
    del d[path[-1]]


def mutate_spec(rng: np.random.Generator, kind: str, spec: Dict[str, Any]
                ) -> Tuple[Any, str, Tuple[str, ...], Dict[str, Any], Optional[bytes]]:
    """(spec value for the API, expected outcome, blame words, options, raw file bytes or None)."""
    s = json.loads(json.dumps(spec))
    conv_scheme = ["ops", "Conv", "schemes", 0]
    if kind == "remove_field":
        path = pick(rng, [["name"], ["backend"], ["ops"], ["cost_model"], ["accumulator"], ["requantize"],
                          ["cost_model", "cores"], ["backend", "tvm_target"], conv_scheme + ["activation_dtype"],
                          conv_scheme + ["native"], ["accumulator", "bits"], ["fusion_patterns"]])
        _spec_del(s, path)
        return s, "reject", (str(path[-1]),), {}, None
    if kind == "wrong_type":
        path, val = pick(rng, [(["name"], 123), (["ops"], []), (["accumulator", "bits"], "32"),
                               (["cost_model", "cores"], 1.5), (conv_scheme[:3], {}),
                               (conv_scheme + ["weight_symmetric"], True), (["fusion_patterns"], "Conv"),
                               (conv_scheme + ["weight_bits"], "8"), (["backend"], "ort"),
                               (["cost_model", "sources"], "datasheet"),
                               (conv_scheme + ["granularity"], "per_channel")])
        _spec_set(s, path, val)
        return s, "reject", tuple(str(p) for p in path if isinstance(p, str)), {}, None
    if kind == "lowercase_op":
        where = pick(rng, ["ops", "fusion", "passthrough"])
        if where == "ops":
            s["ops"]["conv"] = s["ops"].pop("Conv")
        elif where == "fusion":
            s["fusion_patterns"].append(["conv", "relu"])
        else:
            s["passthrough_ops"] = list(s.get("passthrough_ops", [])) + ["reshape"]
        return s, "either", ("conv", "relu", "reshape"), {}, None
    if kind == "unknown_op":
        s["ops"]["FancyConv"] = {"schemes": [dict(s["ops"]["Conv"]["schemes"][0])]}
        if chance(rng, 0.5):
            s["fusion_patterns"].append(["FancyConv", "Relu"])
        return s, "either", ("FancyConv",), {}, None
    if kind in ("nan_cost", "negative_cost", "zero_cost", "inf_cost"):
        val = {"nan_cost": float("nan"), "negative_cost": -1.0e9, "zero_cost": 0.0, "inf_cost": float("inf")}[kind]
        fld = pick(rng, ["peak_int8_ops_per_s", "peak_fp32_flops_per_s", "memory_bandwidth_bytes_per_s"])
        s["cost_model"][fld] = val
        raw = json.dumps(s).encode("utf-8") if kind in ("nan_cost", "inf_cost") else None
        return s, "reject", (fld, "cost_model"), {}, raw
    if kind == "deep_nesting":
        depth = int(pick(rng, [2000, 100000]))
        raw = b'{"name": "deep", "notes": ' + b"[" * depth + b"]" * depth + b"}"
        return None, "reject", ("spec", "json", "nest", "deep"), {}, raw
    if kind in ("w16a16", "w8a16"):
        wb = 16 if kind == "w16a16" else 8
        for op in ("Conv", "MatMul", "Gemm"):
            if op in s["ops"]:
                sch = dict(s["ops"][op]["schemes"][0])
                sch.update(weight_bits=wb, activation_bits=16, weight_dtype="int16" if wb == 16 else "int8",
                           activation_dtype="uint16", activation_mode=["static"])
                s["ops"][op]["schemes"].insert(0, sch)
        return s, "either", ("16", "weight_bits", "activation_bits"), {"weight_bits": wb, "activation_bits": 16}, None
    if kind == "invalid_utf8":
        raw = json.dumps(s).encode("utf-8").replace(b'"description": "', b'"description": "\xff\xfe', 1)
        return None, "reject", ("utf", "encod", "spec"), {}, raw
    if kind == "bom":
        return None, "either", ("spec", "bom", "utf"), {}, b"\xef\xbb\xbf" + json.dumps(s).encode("utf-8")
    if kind == "empty_ops":
        s["ops"] = {}
        return s, "reject", ("ops",), {}, None
    if kind == "extra_field":
        s["frobnicate"] = 1
        return s, "reject", ("frobnicate",), {}, None
    if kind == "bad_name":
        s["name"] = "bad name/with slash"
        return s, "reject", ("name",), {}, None
    if kind == "name_mismatch":
        s["name"] = "renamed_target"
        return s, "ok", (), {}, None
    if kind == "fixed_point_no_mult":
        s["requantize"] = {"style": "fixed_point"}
        return s, "reject", ("multiplier_bits", "requantize"), {}, None
    if kind == "power_of_two":
        s["requantize"] = {"style": "power_of_two"}
        return s, "either", ("power_of_two", "requantize"), {}, None
    if kind == "schemes_empty":
        s["ops"]["Conv"]["schemes"] = []
        return s, "reject", ("schemes", "Conv"), {}, None
    if kind == "hazard_no_remedy":
        hz = s["accumulator"].get("saturation_hazards") or []
        if not hz:
            s["accumulator"]["saturation_hazards"] = hz = [{"name": "h", "instruction": "i",
                                                            "activation_dtype": "uint8", "weight_dtype": "int8",
                                                            "intermediate_bits": 16, "description": "d",
                                                            "max_safe_weight_bits": 7, "remedies": []}]
        hz[0]["remedies"] = []
        return s, "reject", ("remedies", "saturation_hazards"), {}, None
    if kind == "dynamic_not_listed":
        s["dynamic_activations"] = {"granularity": ["per_tensor"], "ops": []}
        uses = any("dynamic" in sc.get("activation_mode", ()) for r in s["ops"].values() for sc in r["schemes"])
        return s, "reject" if uses else "either", ("dynamic", "activation_mode"), {}, None
    if kind == "bits_too_wide":
        s["ops"]["Conv"]["schemes"][0]["weight_bits"] = 12
        return s, "reject", ("weight_bits", "Conv"), {}, None
    if kind == "float8_scheme":
        sch = dict(s["ops"]["Conv"]["schemes"][0])
        sch.update(weight_bits=8, weight_dtype="float8e4m3")
        s["ops"]["Conv"]["schemes"].insert(0, sch)
        return s, "either", ("float8", "Conv"), {}, None
    if kind == "dup_keys":
        raw = json.dumps(s).encode("utf-8")
        raw = raw[:-1] + b', "name": "dup_name"}'
        return None, "either", ("name", "dup"), {}, raw
    if kind == "not_object":
        return pick(rng, [[s], "[1, 2]", 42]), "reject", ("spec", "target", "object"), {}, None
    if kind == "truncated_json":
        raw = json.dumps(s).encode("utf-8")
        return None, "reject", ("json", "spec"), {}, raw[: len(raw) * 2 // 3]
    raise ValueError(kind)


def gen_specs(seed: int) -> Case:
    """Mutations of a built-in spec, given as a dict or a JSON file; odd target values."""
    model, calib, probe, knobs = draw_model("specs", seed, plain=True)
    rng = family_rng("specs", seed, salt=1)
    kind = pick(rng, SPEC_MUTATIONS)
    base = pick(rng, list(BUILTIN_TARGETS))
    case = Case("specs", seed, "api", f"spec mutation '{kind}' of {base} on a {knobs_note(knobs)}",
                fp32=fp32_bytes(model), probe=probe)
    opts: Dict[str, Any] = {}
    if kind == "unknown_builtin":
        target, case.expect = pick(rng, ["x86-avx2", "X86_AVX2", "x86_avx3", "avx2", ""]), "reject"
        case.blame = ("target", "spec", str(target) or "empty")
    elif kind in ("target_none", "target_int"):
        target, case.expect = (None if kind == "target_none" else 7), "reject"
        case.blame = ("target", "spec")
    elif kind == "target_dir":
        case.dirs.append("specdir")
        target, case.expect, case.blame = Rel("specdir"), "reject", ("specdir",)
    elif kind == "target_missing_file":
        target, case.expect, case.blame = Rel("nope/spec.json"), "reject", ("spec.json",)
    elif kind == "valid_other":
        target, case.expect, case.quantizable = builtin_spec(base), "ok", True
    else:
        target, case.expect, blame, opts, raw = mutate_spec(rng, kind, builtin_spec(base))
        case.blame = blame + ("spec", "target")
        if raw is not None or chance(rng, 0.4):
            case.files["spec.json"] = raw if raw is not None else json.dumps(target).encode("utf-8")
            target = Rel("spec.json")
            case.blame += ("spec.json",)
    cal = calib_forms(rng, case, calib, knobs.batch if knobs.static_batch else 4)
    return finish_case(case, rng, model, cal, target, opts)


OPTION_VALUES: Dict[str, Tuple[List[Any], List[Any]]] = {
    # name: (valid values, invalid values)
    "weight_bits": ([8, 8, 4, 6, 7, 16, 2], [1, 17, "8", 8.0, None, True, -8]),
    "activation_bits": ([8, 8, 16], [0, "8", 8.5, None, 32]),
    "per_channel": ([True, False], ["yes", 1, None, "no"]),
    "clipping": (["auto", "minmax", "percentile", "mse", "entropy", "lapq"], ["max", "", None, 3, "MSE"]),
    "percentile": ([99.999, 99.9, 100.0, 99.0], [None, 50.0, 101.0, "99", float("nan"), -1.0]),
    "activation_mode": (["auto", "static", "dynamic"], ["Dynamic", None, 1]),
    "rounding": (["nearest", "adaround", "gptq", "adaquant", "flexround"], ["round", None, "ADAROUND", 0]),
    "saturation_remedy": (["auto", "none", "reduce_range", "u8u8"], ["fix", None, True]),
    "quantize_outputs": ([True, False], ["true", None]),
    "exclude": ([[], ["__NODE__"], ["not_a_node"]], [None, "__NODE__", [1, 2], {"a": 1}]),
    "layers": ([{}, {"__NODE__": {"quantize": False}}, {"__NODE__": {"weight_bits": 8, "per_channel": False}},
                {"__NODE__": {"activation_granularity": "per_token"}}],
               [[], None, {"__NODE__": {"weight_bits": "8"}}, {"__NODE__": {"nope": 1}}, {"__NODE__": []},
                {"__NODE__": {"activation_granularity": "per_row"}},
                {"__NODE__": {"weight_bits": 99}}, {"no_such_node": {"quantize": False}}, {3: {}}]),
    "simulate": ([True, False], ["no"]),
    "equalize": ([True, False], ["off", None]),
    "smooth": ([True, False], ["on"]),
    "smooth_alpha": ([0.5, 0.0, 1.0], [1.5, "0.5", None, float("nan")]),
    "bias_correction": ([None, True, False], ["auto", 2]),
    "recon_samples": ([256, 4, 1], ["2", 0, 2.5, None, -1]),
    "threads": ([1, 2], ["2", 0, 1.5, None, -1, True]),
    "calib_batch_size": ([16, 1, 3, 64], ["16", 0, 2.0, None, -4]),
    "max_calib_samples": ([512, 1, 4, None], ["10", 0, 1.5, -1]),
    "seed": ([0, 1, 12345], ["x", None, 1.5]),
    "check_artifact": ([True, False], ["no", None, 0]),
    "timing_repeats": ([30, 1], [0, "30"]),
    "edge_weight_bits": ([None, 8], [1, "8", 17]),
    "op_types": ([None, ["Conv"], ["MatMul", "Gemm"]], ["Conv", [3], ["conv"]]),
    "rounding_iters": ([None, 5], [-1, "5", 2.5]),
    "rounding_params": ([{}, {"adaround": {"iterations": 5}}], [[], {"nearest": {}}, {"adaround": 5}, None]),
    "token_mask": (["auto", None], [3]),
    "bn_reestimate": ([False, True], ["yes"]),
    "weight_scheme": (["uniform", "nonuniform", "multipoint"], ["NU", None, 4]),
    "nonuniform_size": ([None, 0.5, 0.99], [0.0, 2.0, "0.5"]),
    "activation_granularity": (["per_tensor", "per_token"], ["token", None, 1]),
}
CLOSE_UNSAFE = {"weight_scheme", "nonuniform_size", "weight_bits", "activation_bits", "simulate", "clipping",
                "percentile", "layers", "edge_weight_bits", "rounding", "rounding_iters", "rounding_params",
                "quantize_outputs", "smooth_alpha", "op_types",
                "equalize", "bias_correction", "bn_reestimate", "saturation_remedy"}


def _subst_node(v: Any, node: str) -> Any:
    """Replace '__NODE__' in an option value by a real node name."""
    if isinstance(v, str):
        return node if v == "__NODE__" else v
    if isinstance(v, list):
        return [_subst_node(x, node) for x in v]
    if isinstance(v, dict):
        return {_subst_node(k, node): _subst_node(x, node) for k, x in v.items()}
    return v


# the CLI form of options: argparse has already converted the types, so only values are wrong
CLI_OPTION_VALUES: Dict[str, Tuple[List[Any], List[Any]]] = {
    "weight_bits": ([8, 4, 7, 16], [1, 17, 0, -8]),
    "activation_bits": ([8, 16], [0, 32, 1]),
    "per_channel": ([True, False], []),
    "clipping": (["auto", "minmax", "percentile", "mse", "entropy"], ["max", "", "MSE"]),
    "activation_mode": (["auto", "static", "dynamic"], ["Dynamic", "none"]),
    "rounding": (["nearest", "adaround", "gptq"], ["round", "ADAROUND"]),
    "saturation_remedy": (["auto", "none", "reduce_range", "u8u8"], ["fix", ""]),
    "exclude": ([[], ["__NODE__"], ["not_a_node"]], []),
    "simulate": ([True, False], []),
    "equalize": ([True, False], []),
    "smooth": ([True, False], []),
    "smooth_alpha": ([0.5, 0.0, 1.0], [1.5, -0.1, float("nan")]),
    "bias_correction": ([None, True, False], []),
    "recon_samples": ([256, 4, 1], [0, -1]),
    "threads": ([1, 2], [0, -1]),
    "max_calib_samples": ([512, 1, 4], [0, -1]),
}


def gen_options(seed: int) -> Case:
    """Random option dicts: mostly valid values, sometimes one or two invalid ones or unknown keys."""
    model, calib, probe, knobs = draw_model("options", seed, plain=True)
    rng = family_rng("options", seed, salt=1)
    cli = chance(rng, CLI_SHARE)
    table = CLI_OPTION_VALUES if cli else OPTION_VALUES
    names = list(table)
    chosen = sorted(set(rng.choice(names, size=int(rng.integers(1, 5)), replace=False).tolist()))
    n_bad = int(pick(rng, [0, 0, 1, 1, 2]))
    bad = set(rng.choice(chosen, size=min(n_bad, len(chosen)), replace=False).tolist())
    bad = {k for k in bad if table[k][1]}
    weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    node = pick(rng, weighted) if weighted else "x"
    opts: Dict[str, Any] = {}
    for k in chosen:
        valid, invalid = table[k]
        opts[k] = _subst_node(pick(rng, invalid if k in bad else valid), node)
    extra: Dict[str, Any] = {}
    if not cli and chance(rng, 0.08):
        extra[pick(rng, ["weight_bit", "perchannel", "calibration_method", "n_threads"])] = 8
        bad.add(next(iter(extra)))
    if not cli and chance(rng, 0.04):
        key = pick(rng, ["nonsense_key", "proxy_samples"])
        extra.update(search=True, time_budget=2.0, search_options={key: 2})
        if key == "nonsense_key":
            bad.add("nonsense_key")
    if not cli and chance(rng, 0.03):
        extra["accuracy_budget"] = 0.01
        if not extra.get("search"):
            bad.add("accuracy_budget")
    if opts.get("rounding") in ("adaround", "gptq", "adaquant", "flexround") and "rounding_iters" not in opts:
        opts["rounding_iters"] = 5
    if cli and opts.get("rounding") in ("adaround", "gptq"):
        opts["rounding"] = "nearest"  # the CLI has no --rounding-iters: keep the case cheap
    # values valid alone but not together: keep the combination valid (a case's rejection must name its bad key)
    if "nonuniform_size" not in bad and opts.get("nonuniform_size") is not None and "weight_scheme" not in bad:
        opts["weight_scheme"] = "nonuniform"
        if "weight_bits" not in bad:
            opts["weight_bits"] = 4
    elif "weight_scheme" not in bad and opts.get("weight_scheme") == "nonuniform" and "weight_bits" not in bad:
        opts["weight_bits"] = pick(rng, [4, 3])
    if opts.get("weight_scheme") in ("nonuniform", "multipoint") and "weight_scheme" not in bad:
        # both assign weights by nearest and are computed for their own grid (QuantOptions._validate_nonuniform /
        # _validate_multipoint): no solver rounding, no BN re-estimation; multipoint points are 2-8 bits
        for k, v in (("rounding", "nearest"), ("bn_reestimate", False)):
            if k in opts and k not in bad:
                opts[k] = v
        if opts["weight_scheme"] == "multipoint" and "weight_bits" not in bad and opts.get("weight_bits", 8) > 8:
            opts["weight_bits"] = 8
    if "activation_granularity" not in bad and opts.get("activation_granularity") == "per_token" \
            and opts.get("activation_mode") == "static" and "activation_mode" not in bad:
        opts["activation_mode"] = "auto"
    if opts.get("weight_bits") in (2, 4, 6, 7) and "simulate" not in opts and chance(rng, 0.5):
        opts["simulate"] = True
    case = Case("options", seed, "api", f"options {dict(opts, **extra)!r} on a {knobs_note(knobs)}",
                fp32=fp32_bytes(model), probe=probe)
    case.expect = "reject" if bad else "either"
    # a valid option set can still ask for what the target lacks (e.g. W7A8): then the target / scheme is named
    case.blame = tuple(sorted(bad)) if bad else tuple(opts) + ("option", "target", "scheme", "simulate")
    if not bad and extra.get("search"):  # a search may find no plan within its (default) accuracy budget
        case.blame += ("accuracy_budget", "time_budget")
    # a 1- or 4-sample calibration cannot give ranges that cover unseen probe data (hago says so in the report's
    # calibration_notes); closeness on the calibrated samples themselves is the calib family's one_sample check
    few = opts.get("max_calib_samples") in (1, 4)
    case.quantizable = not bad and not (set(opts) & CLOSE_UNSAFE) and not extra and not few
    cal = calib_forms(rng, case, calib, knobs.batch if knobs.static_batch else 4)
    case = finish_case(case, rng, model, cal, "x86_avx2", dict(opts, **extra), allow_cli=cli, cli_share=1.0)
    if case.mode == "cli" and chance(rng, 0.1):
        case.argv += pick(rng, [["--threads", "two"], ["--weight-bits", "8.5"], ["--smooth-alpha", "half"]])
        case.expect, case.blame, case.quantizable = "reject", ("--threads", "--weight-bits", "--smooth-alpha"), False
        case.note += f"; argv {case.argv[-2:]}"
    return case


FILE_KINDS = ("truncated", "random_bytes", "empty_file", "bad_utf8_node_name", "bad_utf8_doc", "bad_utf8_tensor_name",
              "model_is_dir", "model_missing", "npz_as_model", "external_in_memory", "external_in_memory_bytes",
              "external_by_path", "out_missing_folder", "out_is_dir", "out_existing_file", "report_is_file",
              "peers_missing", "peers_malformed", "peers_without_search", "calib_is_dir_empty", "json_as_model",
              "text_model", "model_no_nodes", "checker_fail", "out_no_suffix", "report_inside_out_missing")


def _with_placeholder(model: onnx.ModelProto, where: str, placeholder: str) -> onnx.ModelProto:
    """Copy of ``model`` with ``placeholder`` put in a string field (node name / doc / tensor name)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if where == "node":
        m.graph.node[0].name = placeholder
    elif where == "doc":
        m.graph.doc_string = placeholder
        m.producer_name = placeholder
    else:
        old = m.graph.node[0].output[0]
        _rename_tensor(m, old, placeholder)
    return m


def bad_utf8_bytes(model: onnx.ModelProto, where: str) -> bytes:
    """Serialized ``model`` whose string field holds invalid UTF-8 (same-length byte replacement)."""
    ph = "QQFUZZQQ"
    data = _with_placeholder(model, where, ph).SerializeToString()
    return data.replace(ph.encode(), b"\xff\xfe" + b"Q" * (len(ph) - 2))


def external_data_files(model: onnx.ModelProto) -> Tuple[Dict[str, bytes], onnx.ModelProto]:
    """(files of ``model`` saved with external data, the ModelProto without its data loaded)."""
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "ext.onnx"
        onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="ext.onnx.data", size_threshold=0)
        files = {f.name: f.read_bytes() for f in Path(td).iterdir()}
        shell = onnx.load(str(p), load_external_data=False)
    return files, shell


def gen_files(seed: int) -> Case:
    """Broken model bytes, odd paths, external data, output / report / peers paths."""
    model, calib, probe, knobs = draw_model("files", seed, plain=True)
    rng = family_rng("files", seed, salt=1)
    kind = pick(rng, FILE_KINDS)
    case = Case("files", seed, "api", f"file case '{kind}' on a {knobs_note(knobs)}", fp32=fp32_bytes(model),
                probe=probe)
    data = model.SerializeToString()
    m_val: Any = model
    case.expect, case.blame = "reject", ("model",)
    flags: List[Any] = []
    api_extra: Dict[str, Any] = {}
    if kind == "truncated":
        case.files["model.onnx"] = data[: int(len(data) * float(rng.uniform(0.1, 0.95)))]
        m_val, case.blame = pick(rng, [Rel("model.onnx"), case.files["model.onnx"]]), ("model.onnx", "bytes", "model")
        case.expect = "either"  # a truncation may still parse into a (different) valid model
    elif kind in ("random_bytes", "empty_file", "json_as_model", "text_model", "npz_as_model"):
        blob = {"random_bytes": rng.bytes(int(rng.integers(1, 400))), "empty_file": b"",
                "json_as_model": b'{"graph": {}}', "text_model": "módel\n".encode("utf-8") * 5,
                "npz_as_model": save_npz(calib)}[kind]
        case.files["model.onnx"] = blob
        m_val, case.blame = pick(rng, [Rel("model.onnx"), blob]), ("model.onnx", "bytes", "model")
        case.expect = "either" if kind == "random_bytes" else "reject"
    elif kind.startswith("bad_utf8"):
        blob = bad_utf8_bytes(model, {"bad_utf8_node_name": "node", "bad_utf8_doc": "doc",
                                      "bad_utf8_tensor_name": "tensor"}[kind])
        case.files["model.onnx"] = blob
        m_val, case.blame = pick(rng, [Rel("model.onnx"), blob]), ("model.onnx", "utf", "bytes", "model")
        case.expect = "either"
    elif kind == "model_is_dir":
        case.dirs.append("model.onnx")
        m_val, case.blame = Rel("model.onnx"), ("model.onnx",)
    elif kind == "model_missing":
        m_val, case.blame = Rel("missing/model.onnx"), ("model.onnx",)
    elif kind in ("external_in_memory", "external_in_memory_bytes", "external_by_path"):
        files, shell = external_data_files(model)
        case.files.update(files)
        if kind == "external_by_path":
            m_val, case.expect, case.quantizable = Rel("ext.onnx"), "ok", True
        else:
            m_val = shell if kind == "external_in_memory" else shell.SerializeToString()
            case.expect, case.blame = "reject", ("external", "ext.onnx.data", "data")
            return finish_case(case, rng, m_val, calib, "x86_avx2", {}, allow_cli=False)
    elif kind == "model_no_nodes":
        m2 = onnx.ModelProto()
        m2.CopyFrom(model)
        del m2.graph.node[:]
        m_val = m2
    elif kind == "checker_fail":
        m2 = onnx.ModelProto()
        m2.CopyFrom(model)
        m2.graph.node[0].input[0] = "undefined_tensor"
        m_val, case.blame = m2, ("undefined_tensor", "checker", "model")
    elif kind == "out_missing_folder":
        case.out, case.blame = Rel("no/such/dir/out.onnx"), ("no/such/dir", "out.onnx", "folder")
    elif kind == "out_is_dir":
        case.dirs.append("out.onnx")
        case.out, case.blame = Rel("out.onnx"), ("out.onnx", "directory")
    elif kind == "out_existing_file":
        case.files["out.onnx"] = b"old content"
        case.out, case.expect, case.quantizable = Rel("out.onnx"), "ok", True
    elif kind == "out_no_suffix":
        case.out, case.expect = Rel("quantized"), "either"
    elif kind == "report_is_file":
        case.files["report"] = b"not a folder"
        case.report, case.blame = Rel("report"), ("report",)
    elif kind == "report_inside_out_missing":
        case.report, case.blame = Rel("a/b/report"), ("report",)
        case.expect = "either"
    elif kind in ("peers_missing", "peers_malformed", "peers_without_search"):
        if kind == "peers_malformed":
            case.files["peers.json"] = pick(rng, [b"{not json", b"[1, 2]", b'{"rows": 3}',
                                                  b'{"rows": [{"speedup": "x", "drop": 1}]}'])
        flags = ["--peers", Rel("peers.json")]
        if kind != "peers_without_search":
            flags = ["--search", "--time-budget", "2"] + flags
        case.blame = ("peers", "peers.json", "--search")
    elif kind == "calib_is_dir_empty":
        case.dirs.append("calib")
        case.blame = ("calib",)
        return finish_case(case, rng, m_val, Rel("calib"), "x86_avx2", {})
    else:
        raise ValueError(kind)
    cal: Any = calib
    if flags:
        case = finish_case(case, rng, m_val, cal, "x86_avx2", {}, allow_cli=False)
        m_arg = _cli_path(case, model, "model.onnx", _model_bytes)
        c_arg = _cli_path(case, calib, "calib.npz", _calib_bytes)
        case.mode = "cli"
        case.argv = [m_arg, "--calib", c_arg, "--out", case.out, "--no-latency", "--quiet"] + flags
        return case
    return finish_case(case, rng, m_val, cal, "x86_avx2", {})


# ---------------------------------------------------------------------------------------------- exporters


EXPORT_MODULES = ("convnet", "mlp_tied", "block")


def torch_module(kind: str, seed: int) -> Tuple[Any, Tuple[int, ...]]:
    """A tiny torch module of ``kind`` (weights from ``seed``) and its per-sample input shape."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "convnet":
        class ConvNet(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
                self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
                self.bn.eval()

            def forward(self, x):
                y = torch.relu(self.bn(self.c1(x)))
                y = torch.relu(self.c2(y) + y)
                y = nn.functional.max_pool2d(y, 2)
                return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

        return ConvNet().eval(), (3, 8, 8)
    if kind == "mlp_tied":
        class MLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.l1, self.l2, self.l3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
                self.l2.weight = self.l1.weight  # tied weights: one initializer, two layers

            def forward(self, x):
                return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))

        return MLP().eval(), (16,)

    class Block(nn.Module):
        def __init__(self, d: int = 16) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.d = d

        def forward(self, x):
            q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, dim=-1)
            x = x + self.proj(att @ v)
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    return Block().eval(), (6, 16)


DYNAMO_OPSET = 21  # the TorchScript exporter stops at opset 20: opset 21 comes from the dynamo exporter


def torch_export(kind: str, opset: int, keep_inits: bool, dynamic: bool, wseed: int) -> bytes:
    """Export ``kind``: opsets up to 20 with the TorchScript exporter (dynamo=False), opset 21 with the dynamo
    exporter (needs onnxscript, in the test extra). The dynamo exporter has no keep_initializers_as_inputs: for
    keep_inits the initializers are added to the graph inputs afterwards, as that flag does."""
    import warnings

    import torch

    mod, shape = torch_module(kind, wseed)
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(wseed))
    if opset >= DYNAMO_OPSET:
        import logging

        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic else None
            prog = torch.onnx.export(mod, (x,), None, opset_version=opset, dynamo=True, input_names=["input"],
                                     output_names=["output"], dynamic_shapes=dyn, verbose=False)
        m = prog.model_proto
        if keep_inits:
            have = {i.name for i in m.graph.input}
            m.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in m.graph.initializer if t.name not in have)
        return m.SerializeToString()
    buf = io.BytesIO()
    dyn = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, (x,), buf, opset_version=opset, dynamo=False, input_names=["input"],
                          output_names=["output"], keep_initializers_as_inputs=keep_inits, dynamic_axes=dyn,
                          do_constant_folding=True)
    return buf.getvalue()


def torch_available() -> Optional[str]:
    """None when torch imports, else the reason."""
    try:
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"torch not importable: {type(e).__name__}: {e}"
    return None


def gen_exporters(seed: int, cache: Optional[ExportCache] = None) -> Case:
    """Tiny torch modules exported at opset 13 / 17 / 20 (TorchScript exporter) and 21 (dynamo), initializers as
    inputs or not,
    dynamic or static batch; a normal calibration set and default options. A family whose export fails
    yields a case with ``model=None`` and the reason in ``note`` (the runner counts it as skipped)."""
    cache = cache if cache is not None else ExportCache()
    rng = family_rng("exporters", seed, salt=1)
    kind = pick(rng, EXPORT_MODULES)
    opset = int(pick(rng, [13, 17, 20, DYNAMO_OPSET]))
    keep, dynamic = chance(rng, 0.5), chance(rng, 0.6)
    wseed = int(rng.integers(0, 3))
    note = f"torch {kind} opset {opset} keep_initializers_as_inputs={keep} dynamic_batch={dynamic} wseed={wseed}"
    case = Case("exporters", seed, "api", note)
    why = torch_available()
    if why:
        case.note = f"SKIP: {why}"
        return case
    status, blob = cache.get((kind, opset, keep, dynamic, wseed),
                             lambda: torch_export(kind, opset, keep, dynamic, wseed))
    if status != "ok":
        case.note = f"SKIP: torch export failed for {note}: {blob}"
        return case
    model = onnx.load_from_string(blob)
    _, shape = torch_module_shape(kind)
    n = 2 if not dynamic else int(rng.integers(2, 9))
    calib = {"input": rng.normal(0, 1, (n,) + shape).astype(np.float32)}
    case.fp32, case.probe = blob, {"input": calib["input"][:2] if not dynamic else calib["input"][: min(n, 8)]}
    case.expect, case.quantizable, case.blame = "ok", True, ("model", "node")
    cal = calib_forms(rng, case, calib, 2 if not dynamic else 4)
    opts: Dict[str, Any] = {"per_channel": False} if chance(rng, 0.2) else {}
    return finish_case(case, rng, model_forms(rng, case, model), cal, "x86_avx2", opts)


def torch_module_shape(kind: str) -> Tuple[str, Tuple[int, ...]]:
    """Per-sample input shape of an export module kind (without building it)."""
    return kind, {"convnet": (3, 8, 8), "mlp_tied": (16,), "block": (6, 16)}[kind]
