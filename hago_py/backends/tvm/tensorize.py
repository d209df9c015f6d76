"""Tensorized int8 kernels: conv2d / matmul (int8 or uint8 activations x int8 weights -> int32) whose inner
product is one int8 dot-product instruction: ``vpdpbusd`` (x86 AVX-512 VNNI, zmm; AVX-VNNI, ymm), the
``vpmaddubsw + vpmaddwd`` pair (AVX2) or ``sdot`` (AArch64 dot-product extension).

Why hand-scheduled kernels: TVM 0.27's default schedules and MetaSchedule's default rules never emit these
instructions for hago's ``relax.nn.conv2d(int8 NCHW, int8 OIHW, out_dtype=int32)`` (x86 shows ``vpmaddwd`` on
sign-extended int16, AArch64 ``smull`` / ``smlal``): the dot-product intrinsics describe ``C[i] += A[k] * B[i, k]``
with 4 *contiguous* reduction bytes and 16 (8, 4) output lanes, which no loop split of an NCHW / OIHW conv
exposes (the reduction's innermost axis is the kernel width, stride 1 in neither operand's fastest dimension).

So each kernel is a small TE / TensorIR PrimFunc:

* ``a[p, k]`` (im2col, P = N*OH*OW, K = C*KH*KW padded to a multiple of 4) in the instruction's activation type:
  x86 (u8 x s8) takes ``x + 128`` for int8 activations, sdot (s8 x s8) takes ``x - 128`` for uint8;
* ``acc[p, o // L, o % L] = sum_k a[p, k] * w_packed[o // L, k // 4, o % L, k % 4]`` with the weight packed at
  compile time (``L`` = 16 / 8 / 4 lanes, output channels padded to a multiple of ``L`` with zero weights),
  tensorized at the ``(o % L, k % 4)`` loops with the intrinsic;
* ``out = acc - shift * sum_k W[o, k]`` back in NCHW (or [M, N]): the exact int32 result of the original op,
  so the rest of the integerized graph is unchanged.

The intrinsics are registered here under ``hago_*`` names (copies of ``tvm.s_tir.tensor_intrin.x86`` /
``arm_cpu`` plus an AVX2 and an AVX-VNNI ymm variant): importing ``tvm.s_tir.tensor_intrin`` parses ~500
TVMScript intrinsics, 60-140 s of CPU on the 2-core build host.

Depthwise convolutions (groups = channels, multiplier 1) get :func:`depthwise_conv2d_kernel` instead: a
vectorized int32 multiply-add over channel (or output-column) lanes, no dot-product instruction (its record's
``instruction`` says so and ``dot_product`` is false).

Dynamic activation quantization (ONNX ``DynamicQuantizeLinear + MatMulInteger``, MiniLM) imports as
``matmul(astype(xq, int32) - zx, W')`` with a runtime zero point ``zx`` and an int32 weight expression ``W'``
(``astype(W) - zw``, constant-folded or not): :func:`_rewrite_dynamic_matmuls` runs the same matmul kernel on
``xq`` and subtracts ``zx * colsum(W)`` (and ``sum(x - zx, -1) * zw`` when a weight zero point takes W - zw out of
int8) in int32, exactly the original result.

The AVX2 pair saturates: ``vpmaddubsw`` adds two u8 x s8 products into an int16, so a kernel uses it only when
no adjacent weight pair can overflow for any u8 activation (:func:`avx2_exact`, true for 7-bit weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Isa:
    """One int8 dot-product instruction family: ``lanes`` int32 outputs x 4 bytes per instruction."""
    name: str            # key used in options / reports
    intrin: str          # registered TensorIntrin name
    lanes: int
    act_dtype: str       # the instruction's activation operand type
    instruction: str     # what inspect.py counts
    arch: str            # x86_64 / aarch64
    saturates: bool = False


ISAS: Dict[str, Isa] = {
    "avx512_vnni": Isa("avx512_vnni", "hago_dot_16x4_u8i8i32_vnni", 16, "uint8", "vpdpbusd", "x86_64"),
    "avx_vnni": Isa("avx_vnni", "hago_dot_8x4_u8i8i32_avxvnni", 8, "uint8", "vpdpbusd", "x86_64"),
    "avx2": Isa("avx2", "hago_dot_8x4_u8i8i32_avx2", 8, "uint8", "vpmaddubsw", "x86_64", saturates=True),
    "dotprod": Isa("dotprod", "hago_dot_4x4_i8i8i32_sdot", 4, "int8", "sdot", "aarch64"),
}

#: spec isa entries, best first, that select a tensorized kernel family
SPEC_ORDER = ("avx512_vnni", "avx_vnni", "dotprod", "avx2")


def isa_for(spec_isa: Sequence[str], include_avx2: bool = False) -> Optional[Isa]:
    """The best :data:`ISAS` entry a target's spec ``isa`` list declares (AVX2 only with ``include_avx2``)."""
    have = {str(x).lower() for x in spec_isa}
    for name in SPEC_ORDER:
        if name in have and (name != "avx2" or include_avx2):
            return ISAS[name]
    return None


# ------------------------------------------------------------------------------------------------ intrinsics
_REGISTERED = False


def register_intrinsics() -> None:
    """Register the four ``hago_*`` TensorIntrins (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T
    from tvm.target.codegen import llvm_version_major

    def desc(lanes: int, a_dtype: str):
        @T.prim_func(s_tir=True)
        def f(A: T.Buffer((4,), a_dtype, offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
              C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                for i in T.serial(0, lanes):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
        return f

    def vnni(lanes: int):
        llvm = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
        # LLVM >= 21 declares vpdpbusd on byte vectors (<16 x i32>, <64 x i8>, <64 x i8>); LLVM <= 20 (what
        # tvm.s_tir.tensor_intrin.x86 was written for) on <16 x i32> words
        opnd = f"int8x{4 * lanes}" if llvm_version_major() >= 21 else f"int32x{lanes}"

        @T.prim_func(s_tir=True)
        def f(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
              C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                                  dtype=opnd)
                b = T.reinterpret(B.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=opnd)
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm), C.vload([0], dtype=f"int32x{lanes}"), a, b,
                    dtype=f"int32x{lanes}")
        return f

    @T.prim_func(s_tir=True)
    def avx2(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                              dtype="uint8x32")
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a,
                                            B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def sdot(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                              dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], dtype="int32x4"),
                a, B.vload([0, 0], dtype="int8x16"), dtype="int32x4")

    impls = {"avx512_vnni": vnni(16), "avx_vnni": vnni(8), "avx2": avx2, "dotprod": sdot}
    for name, isa in ISAS.items():
        if TensorIntrin.get(isa.intrin, allow_missing=True) is None:
            TensorIntrin.register(isa.intrin, desc(isa.lanes, isa.act_dtype), impls[name])
    _REGISTERED = True


# ------------------------------------------------------------------------------------------------ weights
def _pad_to(n: int, m: int) -> int:
    return -(-n // m) * m


def pack_weight(w2d: np.ndarray, lanes: int) -> np.ndarray:
    """[O, K] int8 -> [O/L, K/4, L, 4] int8 (O, K zero-padded to multiples of L, 4)."""
    o, k = w2d.shape
    op, kp = _pad_to(o, lanes), _pad_to(k, 4)
    w = np.zeros((op, kp), np.int8)
    w[:o, :k] = w2d
    return np.ascontiguousarray(w.reshape(op // lanes, lanes, kp // 4, 4).transpose(0, 2, 1, 3))


def shift_for(x_dtype: str, isa: Isa) -> int:
    """What the kernel adds to each activation to bring it into the instruction's operand type."""
    if x_dtype == isa.act_dtype:
        return 0
    return 128 if isa.act_dtype == "uint8" else -128


def avx2_exact(w2d: np.ndarray) -> bool:
    """``vpmaddubsw`` (u8 x s8 pairs into a saturating int16) cannot saturate for any u8 activation: for every
    adjacent pair of weights along K (as packed: k = 2j, 2j + 1), 255 * (sum of positive weights) <= 32767
    and 255 * (sum of negative weights) >= -32768."""
    o, k = w2d.shape
    w = np.zeros((o, _pad_to(k, 4)), np.int64)
    w[:, :k] = w2d
    pos = np.clip(w, 0, None).reshape(o, -1, 2).sum(-1)
    neg = np.clip(w, None, 0).reshape(o, -1, 2).sum(-1)
    return bool((255 * pos).max(initial=0) <= 32767 and (255 * neg).min(initial=0) >= -32768)


# ------------------------------------------------------------------------------------------------ kernels
@dataclass
class Kernel:
    """A scheduled PrimFunc and the constants it takes after the activation: (w_packed, comp)."""
    func: Any
    w_packed: np.ndarray
    comp: np.ndarray
    isa: Isa
    out_shape: Tuple[int, ...]
    shift: int
    note: str = ""
    instruction: str = ""   # what the kernel's inner product is made of, when not ``isa.instruction``


def _shift_cast(v, x_dtype: str, shift: int, act_dtype: str):
    from tvm import tirx

    if shift == 0:
        return v
    return tirx.Cast(act_dtype, tirx.Cast("int32", v) + tirx.const(shift, "int32"))


def conv2d_kernel(x_shape: Sequence[int], x_dtype: str, w: np.ndarray, strides=(1, 1), padding=(0, 0, 0, 0),
                  dilation=(1, 1), isa: Isa = ISAS["avx512_vnni"], rows: int = 4, tensorize: bool = True) -> Kernel:
    """int32 conv2d(x NCHW ``x_dtype``, w OIHW int8), groups 1; ``padding`` = (top, left, bottom, right), zero
    padding in x's own domain (what relax.nn.conv2d does). ``tensorize=False``: the same schedule with a plain
    loop nest where the instruction would be (what LLVM's auto-vectorizer makes of it)."""
    from tvm import te, tirx

    n, c, h, wd = (int(v) for v in x_shape)
    o, ci, kh, kw = w.shape
    if ci != c:
        raise ValueError(f"grouped conv (x has {c} channels, weight {ci}): not tensorized")
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    L = isa.lanes
    cp, op = _pad_to(c, 4), _pad_to(o, L)
    shift = shift_for(x_dtype, isa)
    x = te.placeholder((n, c, h, wd), x_dtype, "x")
    zero = tirx.const(0, x_dtype)

    def nhwc(b, y, xx, cc):   # padded, shifted, channels last (padded to 4): 4 contiguous reduction bytes
        iy, ix = y - pt, xx - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd, cc < c)
        v = tirx.if_then_else(inside, x[b, tirx.min(cc, c - 1), iy, ix], zero)
        return _shift_cast(v, x_dtype, shift, isa.act_dtype)

    xp = te.compute((n, h + pt + pb, wd + pl + pr, cp), nhwc, name="pack_x")
    wp = te.placeholder((op // L, kh, kw, cp // 4, L, 4), "int8", "w_packed")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    rc, ri = te.reduce_axis((0, cp // 4), "rc"), te.reduce_axis((0, 4), "ri")
    acc = te.compute((n, oh, ow, op // L, L), lambda b, y, xx, oo, oi: te.sum(
        xp[b, y * sh + rh * dh, xx * sw + rw * dw, rc * 4 + ri].astype("int32")
        * wp[oo, rh, rw, rc, oi, ri].astype("int32"), axis=[rh, rw, rc, ri]), name="gemm")
    comp = te.placeholder((o,), "int32", "comp")
    out = te.compute((n, o, oh, ow), lambda b, oc, y, xx: acc[b, y, xx, oc // L, oc % L] - comp[oc], name="out")
    func = te.create_prim_func([x, wp, comp, out])
    wpad = np.zeros((op, cp, kh, kw), np.int8)
    wpad[:o, :c] = w
    w_packed = np.ascontiguousarray(wpad.reshape(op // L, L, cp // 4, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3))
    comp_np = (shift * w.reshape(o, -1).astype(np.int64).sum(1)).astype(np.int32)

    from tvm import s_tir

    register_intrinsics()
    sch = s_tir.Schedule(func)
    g = sch.get_sblock("gemm")
    b, y, xx, oo, oi, r1, r2, r3, r4 = sch.get_loops(g)
    rows = _divisor(ow, rows)
    xo, xi = sch.split(xx, [None, rows])
    sch.reorder(b, y, xo, oo, r1, r2, r3, xi, oi, r4)
    outer = sch.fuse(b, y, xo, oo)
    sch.parallel(outer)
    init = sch.decompose_reduction(g, r1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(xi)
    if tensorize:
        sch.tensorize(oi, isa.intrin)
    pk = sch.get_sblock("pack_x")
    sch.parallel(sch.fuse(*sch.get_loops(pk)[:2]))
    ob = sch.get_sblock("out")
    lb, lo, ly, lx = sch.get_loops(ob)
    loo, loi = sch.split(lo, [None, L])
    sch.reorder(lb, loo, ly, lx, loi)
    sch.parallel(sch.fuse(lb, loo, ly))
    return Kernel(sch.mod["main"].with_attr("tirx.is_scheduled", True), w_packed, comp_np, isa, (n, o, oh, ow),
                  shift)


#: what a depthwise kernel's inner product is (no dot-product instruction: see :func:`depthwise_conv2d_kernel`)
DEPTHWISE_INSTRUCTION = "vectorized int32 multiply-add (no dot-product instruction)"


def depthwise_conv2d_kernel(x_shape: Sequence[int], x_dtype: str, w: np.ndarray, strides=(1, 1),
                            padding=(0, 0, 0, 0), dilation=(1, 1), isa: Isa = ISAS["avx512_vnni"], rows: int = 0,
                            tensorize: bool = True, layout: str = "auto", vec: int = 0) -> Kernel:
    """int32 depthwise conv2d(x NCHW ``x_dtype``, w [C, 1, KH, KW] int8), groups = C, channel multiplier 1;
    ``padding`` = (top, left, bottom, right), zero padding in x's own domain (relax.nn.conv2d with groups=C).

    Not a dot product: each output channel reduces over its own KH*KW taps only, so the ``C[i] += A[k] * B[i, k]``
    intrinsics (one activation broadcast to all lanes) do not fit, and a lane-wise tap-pair / tap-quad layout
    (``vpmaddwd`` / ``vpdpbusd`` on taps interleaved per output) costs more in packing than it saves (tried: the
    interleaved int16 pair layout made LLVM gather with ``vpinsrw``, 10x slower). Two vectorized layouts instead,
    int32 multiply-accumulate of sign/zero-extended bytes (LLVM: ``vpmovzxbd``/``vpmovsxbd`` + ``vpmaddwd`` or
    ``vpmulld`` + ``vpaddd`` on x86, widening multiply-adds on AArch64):

    * ``"nchwc"`` (channels last in blocks of L = ``isa.lanes``): x packed to ``[N, C/L, H + pads, W + pads, L]``
      one channel block at a time (C padded to a multiple of L: the extra lanes repeat channel C - 1 against zero
      weights and are dropped), weight to ``[C/L, KH, KW, L]``, the L channel lanes vectorized, ``rows`` output
      columns unrolled per tap, the result transposed back to NCHW tile by tile. Any stride reads contiguous lanes.
    * ``"nchw"`` (no transpose): each channel plane padded and split into ``stride_w`` column phases, the output
      width vectorized (``vec`` lanes) with the tap's weight broadcast, ``rows`` output rows per tile.
    * ``"auto"``: ``"nchw"`` for stride-1 width, ``"nchwc"`` otherwise (what measured faster on an AVX2 host,
      benchmarks/tvm_depthwise.py: 1.8-2.2x / 2.5-3.1x the untuned default on EfficientNet-Lite0 layers).

    Either way the zero padding is split (``decompose_padding``) into a constant fill and a condition-free copy:
    the per-element ``if_then_else`` it replaces cost as much as the convolution (``"nchw"`` with stride > 1 keeps
    it: TVM does not match the phase-split pattern).

    Activations are used in their own type (no shift), so ``comp`` is zero and nothing saturates: exact for any
    int8 weight on every ISA (no :func:`avx2_exact` guard). ``tensorize`` is accepted for symmetry with the other
    kernels; there is no instruction to substitute."""
    from tvm import s_tir, te, tirx

    del tensorize
    n, c, h, wd = (int(v) for v in x_shape)
    o, cm, kh, kw = w.shape
    if o != c or cm != 1:
        raise ValueError(f"not a depthwise conv (x has {c} channels, weight {tuple(w.shape)}): multiplier 1 only")
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if layout == "auto":
        layout = "nchw" if sw == 1 else "nchwc"
    if layout == "nchw":
        return _depthwise_spatial(n, c, h, wd, x_dtype, w, sh, sw, dh, dw, pt, pl, pb, pr, oh, ow, isa, rows or 2,
                                  vec or isa.lanes)
    if layout != "nchwc":
        raise ValueError(f"layout {layout!r}: 'auto', 'nchwc' or 'nchw'")
    rows = rows or 8
    L = isa.lanes
    cp = _pad_to(c, L)
    x = te.placeholder((n, c, h, wd), x_dtype, "x")
    zero = tirx.const(0, x_dtype)

    def blocked(b, co, y, xx, ci):   # lanes past channel c repeat channel c - 1: zero weights, results dropped
        iy, ix, cc = y - pt, xx - pl, co * L + ci
        if c % L:
            cc = tirx.min(cc, c - 1)
        return tirx.if_then_else(tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd), x[b, cc, iy, ix], zero)

    xp = te.compute((n, cp // L, h + pt + pb, wd + pl + pr, L), blocked, name="pack_x")
    wp = te.placeholder((cp // L, kh, kw, L), "int8", "w_packed")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    acc = te.compute((n, cp // L, oh, ow, L), lambda b, co, y, xx, ci: te.sum(
        xp[b, co, y * sh + rh * dh, xx * sw + rw * dw, ci].astype("int32") * wp[co, rh, rw, ci].astype("int32"),
        axis=[rh, rw]), name="dwconv")
    comp = te.placeholder((c,), "int32", "comp")
    out = te.compute((n, c, oh, ow), lambda b, cc, y, xx: acc[b, cc // L, y, xx, cc % L] - comp[cc], name="out")
    func = te.create_prim_func([x, wp, comp, out])
    wpad = np.zeros((cp, kh, kw), np.int8)
    wpad[:c] = w[:, 0]
    w_packed = np.ascontiguousarray(wpad.reshape(cp // L, L, kh, kw).transpose(0, 2, 3, 1))

    sch = s_tir.Schedule(func)
    g = sch.get_sblock("dwconv")
    b, co, y, xx, ci, r1, r2 = sch.get_loops(g)
    rows = _divisor(ow, rows)
    xo, xi = sch.split(xx, [None, rows])
    sch.reorder(b, co, y, xo, r1, r2, xi, ci)
    outer = sch.fuse(b, co)
    sch.parallel(outer)
    sch.vectorize(ci)     # before decompose_reduction: the update block alone is no complete / reduction block
    sch.unroll(xi)
    init = sch.decompose_reduction(g, r1)
    sch.vectorize(sch.get_loops(init)[-1])
    pk = sch.get_sblock("pack_x")
    sch.compute_at(pk, outer)                            # one channel block's padded slab at a time
    _decompose_padding(sch, pk)
    sch.reverse_compute_at(sch.get_sblock("out"), xo)    # back to NCHW tile by tile
    return Kernel(sch.mod["main"].with_attr("tirx.is_scheduled", True), w_packed, np.zeros((c,), np.int32), isa,
                  (n, c, oh, ow), 0, note="depthwise", instruction=DEPTHWISE_INSTRUCTION)


def _depthwise_spatial(n, c, h, wd, x_dtype, w, sh, sw, dh, dw, pt, pl, pb, pr, oh, ow, isa, rows, vec) -> Kernel:
    """The NCHW variant of :func:`depthwise_conv2d_kernel`: each channel's plane zero-padded and split into
    ``sw`` column phases (``xp[b, c, y, ph, q] = xpad[b, c, y, q * sw + ph]``, so every tap of a strided conv
    reads contiguous bytes), one channel at a time (the slab stays in L1); ``rows`` x ``vec`` output tiles with
    the output width vectorized and each tap's weight broadcast, written straight to the NCHW output."""
    from tvm import s_tir, te, tirx

    kh, kw = w.shape[2:]
    owp = _pad_to(ow, vec)
    hp = h + pt + pb
    qw = owp + ((kw - 1) * dw) // sw            # columns per phase any tap of the padded output width reads
    x = te.placeholder((n, c, h, wd), x_dtype, "x")
    zero = tirx.const(0, x_dtype)

    def padded(b, cc, y, ph, q):
        iy, ix = y - pt, q * sw + ph - pl
        return tirx.if_then_else(tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd), x[b, cc, iy, ix], zero)

    xp = te.compute((n, c, hp, sw, qw), padded, name="pack_x")
    wp = te.placeholder((c, kh, kw), "int8", "w_packed")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    acc = te.compute((n, c, oh, owp), lambda b, cc, y, xx: te.sum(
        xp[b, cc, y * sh + rh * dh, (rw * dw) % sw, xx + (rw * dw) // sw].astype("int32")
        * wp[cc, rh, rw].astype("int32"), axis=[rh, rw]), name="dwconv")
    comp = te.placeholder((c,), "int32", "comp")
    out = te.compute((n, c, oh, ow), lambda b, cc, y, xx: acc[b, cc, y, xx] - comp[cc], name="out")
    func = te.create_prim_func([x, wp, comp, out])
    sch = s_tir.Schedule(func)
    g = sch.get_sblock("dwconv")
    b, cc, y, xx, r1, r2 = sch.get_loops(g)
    rows = _divisor(oh, rows)
    yo, yi = sch.split(y, [None, rows])
    xo, xi = sch.split(xx, [None, vec])
    sch.reorder(b, cc, yo, xo, r1, r2, yi, xi)
    outer = sch.fuse(b, cc)
    sch.parallel(outer)
    sch.vectorize(xi)
    sch.unroll(yi)
    sch.unroll(r2)
    init = sch.decompose_reduction(g, r1)
    sch.vectorize(sch.get_loops(init)[-1])
    pk = sch.get_sblock("pack_x")
    sch.compute_at(pk, outer)
    _decompose_padding(sch, pk)
    ob = sch.get_sblock("out")
    sch.reverse_compute_at(ob, xo)
    return Kernel(sch.mod["main"].with_attr("tirx.is_scheduled", True), np.ascontiguousarray(w[:, 0]),
                  np.zeros((c,), np.int32), isa, (n, c, oh, ow), 0, note="depthwise nchw",
                  instruction=DEPTHWISE_INSTRUCTION)


def _decompose_padding(sch, pk) -> None:
    """Split the (compute_at'ed) zero-padding block ``pk`` into a constant fill of the slab and a condition-free
    copy of the in-bounds part (LLVM vectorizes both; the per-element ``if_then_else`` it replaces cost as much
    as the convolution itself). Left as it is where TVM cannot match the pattern."""
    try:
        loops = sch.get_loops(pk)
        sch.decompose_padding(pk, loops[1] if len(loops) > 1 else loops[0])
    except Exception:  # noqa: BLE001 - an unmatched pattern: keep the (correct, slower) if_then_else
        pass


def _divisor(n: int, want: int) -> int:
    d = max(1, min(want, n))
    while n % d:
        d -= 1
    return d


def matmul_kernel(m: int, x_dtype: str, w_kn: np.ndarray, isa: Isa = ISAS["avx512_vnni"], rows: int = 4,
                  tensorize: bool = True) -> Kernel:
    """int32 matmul(x [M, K] ``x_dtype``, w [K, N] int8)."""
    from tvm import s_tir, te, tirx

    k, nn = w_kn.shape
    L = isa.lanes
    kp, op = _pad_to(k, 4), _pad_to(nn, L)
    shift = shift_for(x_dtype, isa)
    x = te.placeholder((m, k), x_dtype, "x")
    zero = tirx.const(0, x_dtype)
    xp = te.compute((m, kp), lambda i, kk: _shift_cast(
        x[i, kk] if kp == k else tirx.if_then_else(kk < k, x[i, tirx.min(kk, k - 1)], zero), x_dtype, shift,
        isa.act_dtype), name="pack_x")
    wp = te.placeholder((op // L, kp // 4, L, 4), "int8", "w_packed")
    rc, ri = te.reduce_axis((0, kp // 4), "rc"), te.reduce_axis((0, 4), "ri")
    acc = te.compute((m, op // L, L), lambda i, oo, oi: te.sum(
        xp[i, rc * 4 + ri].astype("int32") * wp[oo, rc, oi, ri].astype("int32"), axis=[rc, ri]), name="gemm")
    comp = te.placeholder((nn,), "int32", "comp")
    out = te.compute((m, nn), lambda i, j: acc[i, j // L, j % L] - comp[j], name="out")
    func = te.create_prim_func([x, wp, comp, out])
    w2d = np.ascontiguousarray(w_kn.T)
    comp_np = (shift * w2d.astype(np.int64).sum(1)).astype(np.int32)

    register_intrinsics()
    sch = s_tir.Schedule(func)
    g = sch.get_sblock("gemm")
    i, oo, oi, r1, r2 = sch.get_loops(g)
    rows = _divisor(m, rows)
    io, ii = sch.split(i, [None, rows])
    sch.reorder(io, oo, r1, ii, oi, r2)
    outer = sch.fuse(io, oo)
    sch.parallel(outer)
    init = sch.decompose_reduction(g, r1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ii)
    if tensorize:
        sch.tensorize(oi, isa.intrin)
    sch.parallel(sch.get_loops(sch.get_sblock("pack_x"))[0])
    sch.parallel(sch.get_loops(sch.get_sblock("out"))[0])
    return Kernel(sch.mod["main"].with_attr("tirx.is_scheduled", True), pack_weight(w2d, L), comp_np, isa,
                  (m, nn), shift)


# ------------------------------------------------------------------------------------------------ Relax pass
def _static_shape(expr) -> Optional[Tuple[int, ...]]:
    t = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(v) for v in shape)
    except (TypeError, ValueError):   # symbolic dimension (dynamic batch)
        return None


def _kernel_for(call, isa: Isa, allow_saturating: bool) -> Tuple[Optional[Kernel], str, Dict[str, Any]]:
    """(kernel or None, why not, description) for an int32 conv2d / matmul call."""
    from . import requantize as rq

    x, w_expr = call.args[0], call.args[1]
    x_dtype, shape = rq.dtype_of(x), _static_shape(x)
    w = rq.const_np(w_expr)
    op = call.op.name.split(".")[-1]
    desc: Dict[str, Any] = {"op": op, "x_dtype": x_dtype, "x_shape": list(shape) if shape else None,
                            "weight_shape": list(w.shape) if w is not None else None}
    if str(call.attrs.out_dtype) != "int32" or x_dtype not in ("int8", "uint8"):
        return None, "not an int8 x int8 -> int32 op", desc
    if w is None or w.dtype != np.int8:
        return None, "weight is not an int8 constant", desc
    if shape is None:
        return None, "dynamic input shape: build with a static batch (batch=1) to tensorize", desc
    if op == "conv2d":
        a = call.attrs
        groups = int(a.groups)
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return None, f"layout {a.data_layout}/{a.kernel_layout}/{a.out_layout}: only NCHW/OIHW/NCHW", desc
        depthwise = groups > 1 and len(shape) == 4 and groups == shape[1] == w.shape[0] and w.shape[1] == 1
        if groups != 1 and not depthwise:
            return None, (f"groups {groups} (x {shape[1]} channels, weight {list(w.shape)}): only groups 1 and "
                          "depthwise (groups = in = out channels, multiplier 1) have kernels"), desc
        pad = [int(v) for v in a.padding]
        pad = pad * 2 if len(pad) == 2 else pad
        geo = dict(strides=[int(v) for v in a.strides], padding=pad, dilation=[int(v) for v in a.dilation], isa=isa)
        if depthwise:   # no u8 x s8 pair instruction, no shift: exact for any int8 weight, no avx2_exact guard
            desc["depthwise"] = True
            return depthwise_conv2d_kernel(shape, x_dtype, w, **geo), "", desc
    if isa.saturates and not allow_saturating:
        w2d = w.reshape(w.shape[0], -1) if op == "conv2d" else w.T
        if not avx2_exact(w2d):
            return None, ("weights above 7 bits: vpmaddubsw's int16 pair sums could saturate (not bit-exact); "
                          "re-quantize with reduce_range / 7-bit weights"), desc
    if op == "conv2d":
        return conv2d_kernel(shape, x_dtype, w, **geo), "", desc
    if len(shape) < 2 or w.ndim != 2:
        return None, f"matmul of a {len(shape)}-D input by a {w.ndim}-D weight: only [..., M, K] x [K, N]", desc
    # [..., M, K] x [K, N]: the leading dimensions fold into M (tensorize_module reshapes around the kernel)
    return matmul_kernel(int(np.prod(shape[:-1])), x_dtype, w, isa=isa), "", desc


def tensorize_module(mod, isa: Isa, *, allow_saturating: bool = False) -> Tuple[Any, List[Dict[str, Any]]]:
    """Replace every int8 x int8 -> int32 ``relax.nn.conv2d`` / ``relax.matmul`` with a constant weight and a
    static input shape by a ``call_tir`` of a tensorized kernel for ``isa`` (exact int32 result). Returns
    (module, one record per op: {"op", "kernel", "status": "tensorized" | "default", "why", ...}).

    ``matmul(astype(xq) - zx, W')`` (MatMulInteger with a runtime activation zero point) is rewritten first by
    :func:`_rewrite_dynamic_matmuls` (record ``dynamic_zero_point`` and ``note``).

    The kernels are marked ``tirx.is_scheduled`` (MetaSchedule leaves them alone) and ``op_pattern`` opaque
    (FuseOps does not merge them into the requantize that follows)."""
    from tvm import relax
    from tvm.relax.analysis import get_var2val
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    records: List[Dict[str, Any]] = []
    funcs: Dict[str, Any] = {}
    pats = [is_op("relax.nn.conv2d")(wildcard(), is_const()), is_op("relax.matmul")(wildcard(), is_const())]
    seen: Dict[Any, Any] = {}
    var2val: Dict[Any, Any] = {}

    def rewrite(orig, _m):
        if orig in seen:
            return seen[orig]
        if not isinstance(orig, relax.Call):   # a Var bound to a match (``gv = lv``): its binding is visited too
            return orig
        if _op_name(orig) == "relax.matmul" and _dynamic_activation(orig.args[0], var2val) is not None:
            seen[orig] = orig   # the MatMulInteger form: _rewrite_dynamic_matmuls has recorded it
            return orig
        kernel, why, desc = _kernel_for(orig, isa, allow_saturating)
        if kernel is None:
            records.append({**desc, "status": "default", "why": why, "instruction": None})
            seen[orig] = orig
            return orig
        name = f"hago_{'depthwise_' if desc.get('depthwise') else ''}{desc['op']}_{isa.name}_{len(funcs)}"
        gv = bb.add_func(kernel.func.with_attr("global_symbol", name).with_attr("op_pattern", 8), name)
        funcs[name] = gv
        x = orig.args[0]
        lead = desc["x_shape"][:-1] if desc["op"] == "matmul" and len(desc["x_shape"]) > 2 else None
        if lead is not None:   # [..., M, K] -> [prod, K], and the result back to [..., M, N]
            x = relax.op.reshape(x, (int(np.prod(lead)), desc["x_shape"][-1]))
        new = relax.call_tir(gv, [x, relax.const(kernel.w_packed, "int8"), relax.const(kernel.comp, "int32")],
                             relax.TensorType(list(kernel.out_shape), "int32"))
        if lead is not None:
            new = relax.op.reshape(new, tuple(lead) + (int(kernel.out_shape[-1]),))
        records.append({**desc, "status": "tensorized", "kernel": name,
                        "instruction": kernel.instruction or isa.instruction,
                        "dot_product": not kernel.instruction, "isa": isa.name, "lanes": isa.lanes,
                        "activation_shift": kernel.shift, "why": ""})
        seen[orig] = new
        return new

    bb = relax.BlockBuilder(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            new = _rewrite_dynamic_matmuls(func, bb, isa, allow_saturating, records, funcs)
            var2val = get_var2val(new)
            for pat in pats:
                new = rewrite_call(pat, rewrite, new)
            if not new.same_as(func):
                bb.update_func(gv, new)
    return bb.get(), records


# ------------------------------------------------------------------------------------------------ dynamic zero point
#: what the records of :func:`_rewrite_dynamic_matmuls` say about the activation zero point
DYNAMIC_ZP_NOTE = "dynamic zero point corrected: kernel(xq, W) - zx * colsum(W)"

_FOLDABLE = ("relax.astype", "relax.subtract", "relax.add", "relax.multiply", "relax.expand_dims", "relax.reshape",
             "relax.permute_dims")


def _peel(expr, var2val):
    """The value bound to a (dataflow) Var, through chains of Var = Var; other expressions as they are."""
    from tvm import relax

    seen = 0
    while isinstance(expr, relax.Var) and expr in var2val and seen < 64:
        expr, seen = var2val[expr], seen + 1
    return expr


def _op_name(expr) -> str:
    op = getattr(expr, "op", None)
    return str(getattr(op, "name", "")) if op is not None else ""


def _const_eval(expr, var2val, depth: int = 0) -> Optional[np.ndarray]:
    """numpy value of an expression built only from constants by astype / subtract / add / multiply / expand_dims /
    reshape / permute_dims (the weight side of an imported ``MatMulInteger``, folded or not), else None. Integer
    arithmetic wraps in the result's dtype, as TVM's does."""
    from . import requantize as rq

    if depth > 32:
        return None
    expr = _peel(expr, var2val)
    c = rq.const_np(expr)
    if c is not None:
        return c
    name = _op_name(expr)
    if name not in _FOLDABLE:
        return None
    binary = name in ("relax.subtract", "relax.add", "relax.multiply")
    args = [_const_eval(a, var2val, depth + 1) for a in expr.args[:2 if binary else 1]]
    if any(a is None for a in args):
        return None
    out_dtype = rq.dtype_of(expr)
    try:
        if name == "relax.astype":
            return args[0].astype(str(expr.attrs.dtype))
        if name in ("relax.subtract", "relax.add", "relax.multiply"):
            f = {"relax.subtract": np.subtract, "relax.add": np.add, "relax.multiply": np.multiply}[name]
            a, b = (v.astype(np.int64) if v.dtype.kind in "iu" else v for v in args)
            r = f(a, b)
            return r.astype(out_dtype) if out_dtype else r
        if name == "relax.expand_dims":
            r = args[0]
            for ax in sorted(int(v) if int(v) >= 0 else int(v) + r.ndim + 1 for v in expr.attrs.axis):
                r = np.expand_dims(r, ax)
            return r
        if name == "relax.reshape":
            shape = _static_shape(expr)
            return None if shape is None else args[0].reshape(shape)
        if name == "relax.permute_dims":
            axes = expr.attrs.axes
            return np.transpose(args[0], None if axes is None else [int(v) for v in axes])
    except Exception:  # noqa: BLE001 - anything unexpected: not a foldable constant
        return None
    return None


def _fits_int8(a: np.ndarray) -> bool:
    return a.dtype.kind in "iu" and a.size > 0 and int(a.min()) >= -128 and int(a.max()) <= 127


def _dynamic_weights(w_expr, var2val) -> Tuple[List[Tuple[np.ndarray, Optional[np.ndarray]]], str]:
    """Candidate (Wq int8 [K, N], zw int32 [N] or None) with W' = Wq - zw (zw per column, broadcast over K), best
    first, and why there is none:

    * W' itself when its values fit int8 (zw all zeros, hago's symmetric weights, or any zw that keeps W - zw in
      int8: no zw term needed);
    * W' = subtract(A, B) (not constant-folded) with A fitting int8 and B a per-column ([N] / [1, N] / scalar)
      constant: the zw term ``- rowsum(x - zx) * zw`` is added (for W - zw outside int8, or outside 7 bits where
      the AVX2 kernel needs them)."""
    weff = _const_eval(w_expr, var2val)
    if weff is None:
        return [], "weight is not a constant expression"
    if weff.ndim != 2 or weff.dtype.kind not in "iu":
        return [], f"weight of rank {weff.ndim} / dtype {weff.dtype}: only an integer [K, N]"
    out: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []
    if _fits_int8(weff):
        out.append((weff.astype(np.int8), None))
    node = _peel(w_expr, var2val)
    if _op_name(node) == "relax.subtract":
        a, b = (_const_eval(v, var2val) for v in node.args)
        n = weff.shape[1]
        if a is not None and b is not None and a.shape == weff.shape and _fits_int8(a) and \
                b.dtype.kind in "iu" and (b.size == 1 or (b.size == n and b.shape[-1] == n)):
            zw = np.broadcast_to(b.reshape(-1).astype(np.int64), (n,))
            if zw.any() and np.array_equal(a.astype(np.int64) - zw[None, :], weff.astype(np.int64)):
                out.append((a.astype(np.int8), zw.astype(np.int32)))
    return out, ("" if out else "weight does not fit int8, nor int8 minus a per-column zero point")


def _dynamic_activation(x_expr, var2val):
    """(xq, zx or None, zx shape) for ``subtract(astype(xq int8/uint8, int32), zx)`` / ``astype(xq, int32)``
    where zx is int32 and constant along K (rank <= x's, last dimension 1 or scalar); else None."""
    from . import requantize as rq

    node = _peel(x_expr, var2val)
    zx = None
    if _op_name(node) == "relax.subtract":
        node, zx = _peel(node.args[0], var2val), node.args[1]
    if _op_name(node) != "relax.astype" or str(node.attrs.dtype) != "int32":
        return None
    xq = node.args[0]
    if rq.dtype_of(xq) not in ("int8", "uint8"):
        return None
    if zx is not None:
        zs = _static_shape(zx)
        xs = _static_shape(xq)
        if rq.dtype_of(zx) != "int32" or zs is None or xs is None or len(zs) > len(xs) or (zs and zs[-1] != 1):
            return None
    return xq, zx


def _rewrite_dynamic_matmuls(func, bb, isa: Isa, allow_saturating: bool, records: List[Dict[str, Any]],
                             funcs: Dict[str, Any]):
    """``matmul(subtract(astype(xq, int32), zx), W')`` (ONNX ``MatMulInteger`` with a runtime activation zero
    point, as TVM's frontend imports it) -> ``kernel(xq, Wq) - zx * colsum(Wq)`` (``- sum(x - zx, -1) * zw`` for a
    weight zero point that does not leave W' in int8). int32 arithmetic throughout: exactly the original value."""
    from tvm import relax
    from tvm.relax.analysis import get_var2val
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    from . import requantize as rq

    var2val = get_var2val(func)
    seen: Dict[Any, Any] = {}

    def rewrite(orig, _m):
        if orig in seen:
            return seen[orig]
        seen[orig] = orig
        if _op_name(orig) != "relax.matmul":
            return orig
        act = _dynamic_activation(orig.args[0], var2val)
        if act is None:
            return orig   # not this form: the plain patterns of tensorize_module look at it
        xq, zx = act
        shape = _static_shape(xq)
        x_dtype = rq.dtype_of(xq)
        cands, why = _dynamic_weights(orig.args[1], var2val)
        if cands and isa.saturates and not allow_saturating:
            cands = [c for c in cands if avx2_exact(c[0].T)] or cands
        wq, zw = cands[0] if cands else (None, None)
        desc: Dict[str, Any] = {"op": "matmul", "x_dtype": x_dtype, "x_shape": list(shape) if shape else None,
                                "weight_shape": list(wq.shape) if wq is not None else None,
                                "dynamic_zero_point": zx is not None}
        if rq.dtype_of(orig) != "int32":
            why = why or "not an int32 matmul"
        if not why and shape is None:
            why = "dynamic input shape: build with a static batch (batch=1) to tensorize"
        if not why and len(shape) < 2:
            why = f"matmul of a {len(shape)}-D input: only [..., M, K] x [K, N]"
        if not why and isa.saturates and not allow_saturating and not avx2_exact(wq.T):
            why = ("weights above 7 bits: vpmaddubsw's int16 pair sums could saturate (not bit-exact); "
                   "re-quantize with reduce_range / 7-bit weights")
        if why:
            if desc["dynamic_zero_point"] or _const_eval(orig.args[1], var2val) is not None:
                records.append({**desc, "status": "default", "why": why, "instruction": None})
            return orig
        kernel = matmul_kernel(int(np.prod(shape[:-1])), x_dtype, wq, isa=isa)
        name = f"hago_matmul_{isa.name}_{len(funcs)}"
        gv = bb.add_func(kernel.func.with_attr("global_symbol", name).with_attr("op_pattern", 8), name)
        funcs[name] = gv
        n = int(wq.shape[1])
        x = xq if len(shape) == 2 else relax.op.reshape(xq, (int(np.prod(shape[:-1])), shape[-1]))
        new = relax.call_tir(gv, [x, relax.const(kernel.w_packed, "int8"), relax.const(kernel.comp, "int32")],
                             relax.TensorType(list(kernel.out_shape), "int32"))
        if len(shape) > 2:
            new = relax.op.reshape(new, tuple(shape[:-1]) + (n,))
        notes = []
        if zx is not None:
            colsum = wq.astype(np.int64).sum(0).astype(np.int32)
            new = relax.op.subtract(new, relax.op.multiply(zx, relax.const(colsum, "int32")))
            notes.append(DYNAMIC_ZP_NOTE)
        if zw is not None and zw.any():
            rows = relax.op.sum(orig.args[0], axis=[-1], keepdims=True)
            new = relax.op.subtract(new, relax.op.multiply(rows, relax.const(zw, "int32")))
            notes.append("weight zero point corrected: - sum(x - zx, -1) * zw")
        records.append({**desc, "status": "tensorized", "kernel": name, "instruction": isa.instruction,
                        "dot_product": True, "isa": isa.name, "lanes": isa.lanes,
                        "activation_shift": kernel.shift, "weight_zero_point": zw is not None and bool(zw.any()),
                        "note": "; ".join(notes), "why": ""})
        seen[orig] = new
        return new

    return rewrite_call(is_op("relax.matmul")(wildcard(), wildcard()), rewrite, func)
