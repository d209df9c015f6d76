"""Codebook storage of non-uniform weights (weight_scheme="nonuniform", quant/nonuniform.py).

A non-uniform layer's integer weight uses at most 2**bits int8 values per output channel. Instead of the
[C, K] int8 initializer (K = weights per output channel), realize stores its rows as

* packed indices, 4 bits: uint8 [C, h], h = ceil(K/2), two indices per byte: byte j of a row holds index j in
  its low nibble and index j + h in its high nibble (``<g>_nu_index``);
* packed indices, 3 bits: two planes (no interleave: each unpacks to whole runs of indices, joined by a Reshape),
  - ``<g>_nu_index2``, uint8 [C, 1, q], q = ceil(K/4): byte j holds the low 2 bits of indices j, j+q, j+2q, j+3q
    at bit offsets 0, 2, 4, 6;
  - ``<g>_nu_index1``, uint8 [C, 1, e], e = ceil(K/8): byte j holds the high bit of indices j, j+e, ..., j+7e at
    bit offsets 0 .. 7
  (stored [C, 1, n] rather than [C, n], same bytes, so that one BitShift by a column of shift amounts
  broadcasts to all fields at once);
* a codebook: int8 (uint8 for u8u8 weights) [C, 2**bits], the channel's levels (unused entries 0).

Index bytes + codebook per layer: C * (16 + ceil(K/2)) at 4 bits, C * (8 + ceil(K/4) + ceil(K/8)) at 3 bits
(codebook_bytes).

Layers with the same K, integer dtype and bits form one group and share one expansion chain: their rows are
concatenated along axis 0 into one ``<g>_nu_index`` (3 bits: one ``<g>_nu_index2`` and one ``<g>_nu_index1``) and
one ``<g>_nu_codebook`` initializer (``<w>_nu_index`` / ``<w>_nu_codebook`` for a group of one layer,
``nu<i>_nu_index`` / ... for a larger one), expanded once with
standard ONNX ops (opset 11 on), all constant-foldable:

    4 bits: lo = BitShift(BitShift(packed, 4, LEFT), 4, RIGHT)     (uint8: the left shift drops the high nibble)
            hi = BitShift(packed, 4, RIGHT)
            idx = Cast<int64>(Slice(Concat(lo, hi, axis=1), 0, K, axis=1))   (Slice only when K is odd)
    3 bits: a field of width w at offset o is isolated by shifting it to the top (left by 8-w-o) and back down
            (right by 8-w); the left shift amounts form an [n, 1] column, which broadcasts against the [C, 1, m]
            plane to give every field at once, [C, n, m], rows in index order after a Reshape to [C, n*m]:
            f(plane, n, w) = Cast<int64>(Slice(Reshape(BitShift(BitShift(plane, [[8-w-o]]_o, LEFT), 8-w, RIGHT),
                                                        [0, -1]), 0, K, axis=1))    (Slice only when n*m != K)
            idx = f(index2, 4, 2) + 4 * f(index1, 8, 1)                        (Add, Mul on int64)
    rows = GatherElements(codebook, idx, axis=1)                     [sum C_i, K]
    rows_i = Split(rows, [C_1, C_2, ...], axis=0)                     (only for a group of two or more)
    q_i = Reshape(rows_i, weight shape, channels first)  (+ Transpose for a [K, N] MatMul weight)

into exactly each layer's int8 weight ``<w>_quantized``, which feeds the layer's DequantizeLinear as before.
The chains read initializers only and sit at the start of the graph; CodebookWriter.weight() hands out each
layer's final value at once and CodebookWriter.finish() (end of realize) builds the chains, since the groups
are known only after every layer was seen. ONNX Runtime folds the chains when it loads the model (constant
folding, every optimization level but 'disabled'), then fuses the QDQ into QLinearConv / QGemm /
DynamicQuantizeMatMul as for a plain int8 initializer (tests/test_nonuniform.py checks the optimized graph).
Where the codebook form is not smaller (e.g. depthwise 3x3: K=9 < 16 + 5 bytes at 4 bits, 8 + 3 + 2 at 3 bits) the
weight stays a plain int8 initializer ("int8" storage; quantize_weight applies the same rule first and gives such a
layer the full INT8 grid).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_ir as ir

from ..ir.passes._util import new_initializer

# bytes a codebook-stored layer costs beyond its index and codebook rows (node protos, tensor headers, small
# constants): the codebook form is used only when it saves more than this. Measured on ResNet-20 (18 codebook
# layers in 3 groups, opset 13+; tests/test_nonuniform.py has no fixed figure): a layer that joins a group costs
# ~100-140 B (its Reshape node 68 B, its Split output and size ~25 B, a shape constant ~45 B when its shape is
# new); a group's shared part costs ~470 B (BitShift x3, Concat, Cast, GatherElements ~400 B, two tensor headers
# ~70 B), all of it paid by a layer alone in its group (~540-585 B). The rule is applied per layer before the
# groups are known (quantize_weight, realize), hence a value between the two: a lone layer saving 256-580 B makes
# the file up to ~330 B larger, a grouped layer saving 100-256 B stays int8. Whole chains: ResNet-20 10.8 KB
# (one chain per layer, 600 B / layer) -> 3.3 KB (185 B / layer).
CHAIN_OVERHEAD = 256
# 3 bits: a group's shared part is ~270 B larger (11 nodes instead of 6: two index planes, Reshape, Mul, Add; a
# layer alone ~810 B), a layer joining a group costs the same; hence CHAIN_OVERHEAD + this. On ResNet-20 W3 the
# 10-class Gemm (C=10, K=64: saves 320 B) alone in its group made the file 489 B larger and cost 0.17 pp with 256.
CHAIN_OVERHEAD_3BIT_EXTRA = 128
MIN_OPSET = 11  # BitShift, GatherElements; Split takes its sizes as an attribute before opset 13, an input from 13
SHARE_CHAINS = True  # one chain per (K, dtype, bits) group; False: one chain per layer (for comparisons)


def planes_of(bits: int) -> Tuple[Tuple[int, int], ...]:
    """The index planes of ``bits``-bit indices, low bits first: (fields per byte n, field width w) each. A plane
    of n fields has m = ceil(K/n) bytes per row; byte j holds bits [b, b+w) of indices j, j+m, ..., j+(n-1)m at
    bit offsets 0, w, ..., (n-1)w (b: the widths of the planes before it)."""
    if int(bits) == 3:
        return ((4, 2), (8, 1))
    if not 1 <= int(bits) <= 4:
        raise ValueError(f"codebook indices of {bits} bits: 1-4 supported")
    return ((2, 4),)  # 1, 2 and 4 bits: one nibble each


def pack(q2d: np.ndarray, bits: int) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """[C, K] integers with at most 2**bits distinct values per row -> (index planes, one uint8 [C, ceil(K/n)] per
    entry of planes_of(bits): (nibbles,) at 4 bits, (2-bit plane, 1-bit plane) at 3 bits; codebook [C, 2**bits] of
    q2d's dtype). Exact: ``unpack(*pack(q), K) == q``."""
    c, k = q2d.shape
    n_lv = 1 << int(bits)
    book = np.zeros((c, n_lv), q2d.dtype)
    idx = np.zeros((c, k), np.uint8)
    for i in range(c):
        lv = np.unique(q2d[i])
        if lv.size > n_lv:
            raise ValueError(f"row {i} uses {lv.size} values, more than 2**{bits}")
        book[i, :lv.size] = lv
        idx[i] = np.searchsorted(lv, q2d[i])
    planes, low = [], 0
    for n, w in planes_of(bits):
        m = -(-k // n)
        field = np.zeros((c, n * m), np.uint8)
        field[:, :k] = (idx >> low) & ((1 << w) - 1)
        planes.append(np.bitwise_or.reduce([field[:, t * m:(t + 1) * m] << (t * w) for t in range(n)]).astype(np.uint8))
        low += w
    return tuple(planes), book


def unpack(planes, book: np.ndarray, k: int) -> np.ndarray:
    """numpy reference of the ONNX expansion: [C, K] values."""
    idx, low = 0, 0
    for plane, (n, w) in zip(planes, planes_of(int(book.shape[1]).bit_length() - 1)):
        field = np.concatenate([(plane >> (t * w)) & ((1 << w) - 1) for t in range(n)], axis=1)[:, :k]
        idx = idx + (field.astype(np.int64) << low)
        low += w
    return np.take_along_axis(book, idx, axis=1)


def codebook_pays(shape, axis: int, bits: int) -> bool:
    """Whether the codebook form of a weight of ``shape`` (channels on ``axis``) is worth its chain: it saves more
    than CHAIN_OVERHEAD bytes (+ CHAIN_OVERHEAD_3BIT_EXTRA at 3 bits) over plain int8."""
    cb, plain = codebook_bytes(shape, axis, bits)
    return cb + CHAIN_OVERHEAD + (CHAIN_OVERHEAD_3BIT_EXTRA if int(bits) == 3 else 0) < plain


def codebook_bytes(shape, axis: int, bits: int) -> Tuple[int, int]:
    """(codebook form, plain int8 form) sizes in bytes of a weight of ``shape`` with channels on ``axis``: index
    planes + codebook, C * (16 + ceil(K/2)) at 4 bits, C * (8 + ceil(K/4) + ceil(K/8)) at 3 bits."""
    c = int(shape[axis])
    k = int(np.prod(shape)) // max(c, 1)
    return c * ((1 << int(bits)) + sum(-(-k // n) for n, _ in planes_of(bits))), c * k


class _Layer:
    """One codebook-stored weight waiting for finish(): its rows, shape and the value DequantizeLinear reads."""

    def __init__(self, base: str, planes: Tuple[np.ndarray, ...], book: np.ndarray, moved_shape: tuple, axis: int,
                 out: ir.Value):
        self.base, self.planes, self.book, self.moved_shape, self.axis, self.out = \
            base, planes, book, moved_shape, axis, out
        self.ndim = len(moved_shape)


class CodebookWriter:
    """Adds codebook-stored weights to one graph. weight() only records a layer and returns the value its
    DequantizeLinear reads (no producer yet); finish() then builds one expansion chain per group of layers with
    the same row length K, integer dtype and bits (their index rows and codebooks concatenated along axis 0,
    Split back into the layers after GatherElements) and inserts the chains at the start of the graph. Small
    constants (shift, slice bounds, shapes) are shared between chains."""

    def __init__(self, graph: ir.Graph, names):
        self.graph = graph
        self.names = names
        self._consts: Dict[tuple, ir.Value] = {}
        self._groups: Dict[tuple, List[_Layer]] = {}  # (K, dtype, bits) -> layers, in the order weight() saw them
        self._count = 0
        self._finished = False

    def _const(self, base: str, arr: np.ndarray) -> ir.Value:
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = new_initializer(self.graph, base, arr, self.names)
        return self._consts[key]

    def _node(self, op: str, inputs, name: str, out: Optional[str] = None, attrs=None,
              outputs: Optional[List[ir.Value]] = None) -> ir.Node:
        """A node named ``name`` whose one output is named ``out``, or whose outputs are the given values."""
        if outputs is not None:
            return ir.Node("", op, inputs, attributes=attrs or [], name=self.names.node(name), outputs=outputs)
        node = ir.Node("", op, inputs, attributes=attrs or [], name=self.names.node(name), num_outputs=1)
        node.outputs[0].name = self.names.value(out)
        return node

    def weight(self, q: np.ndarray, axis: int, bits: int, base: str, *,
               force: Optional[str] = None) -> Tuple[ir.Value, str]:
        """The value holding integer weight ``q`` (int8 / uint8 array, channels on ``axis``): a plain initializer
        ("int8"), or ("codebook<bits>", e.g. "codebook3") a value named ``<base>_quantized`` without a producer yet,
        which finish() makes the output of its group's expansion chain. ``force`` ("int8" or "codebook") picks the
        storage regardless of size."""
        if self._finished:
            raise RuntimeError("CodebookWriter.weight() after finish()")
        storage = force or ("codebook" if codebook_pays(q.shape, axis, bits) else "int8")
        if storage == "int8":
            return new_initializer(self.graph, f"{base}_quantized", q, self.names), "int8"
        moved = np.moveaxis(q, axis, 0)
        c = moved.shape[0]
        q2d = np.ascontiguousarray(moved.reshape(c, -1))
        k = q2d.shape[1]
        planes, book = pack(q2d, bits)
        out = ir.Value(name=self.names.value(f"{base}_quantized"), shape=ir.Shape(list(q.shape)),
                       type=ir.TensorType(ir.DataType.from_numpy(q.dtype)))
        layer = _Layer(base, planes, book, tuple(moved.shape), axis, out)
        key = (k, q.dtype.str, int(bits)) if SHARE_CHAINS else (k, q.dtype.str, int(bits), len(self._groups))
        self._groups.setdefault(key, []).append(layer)
        return out, f"codebook{int(bits)}"

    def finish(self) -> None:
        """Build the expansion chains of every layer weight() recorded and insert them at the start of the graph
        (they read initializers only). Call once, after the last weight()."""
        if self._finished:
            return
        self._finished = True
        nodes: List[ir.Node] = []
        for key, layers in self._groups.items():
            nodes += self._chain(key[0], layers)
        if not nodes:
            return
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.extend(nodes)
        else:
            self.graph.insert_before(first, nodes)

    def _chain(self, k: int, layers: List[_Layer]) -> List[ir.Node]:
        # the intermediate values and nodes get short names (nu<i>_...): they are folded away at load time, and
        # long names would cost ~300 B per layer in the file
        self._count += 1
        n = f"nu{self._count}"
        if len(layers) == 1:
            stem = layers[0].base
            planes, book = layers[0].planes, layers[0].book
        else:
            stem = n
            planes = tuple(np.concatenate(p, axis=0) for p in zip(*(lay.planes for lay in layers)))
            book = np.concatenate([lay.book for lay in layers], axis=0)
        if len(planes) == 1:  # 4 bits (nibbles)
            p_val = new_initializer(self.graph, f"{stem}_nu_index", planes[0], self.names)
        else:  # 3 bits: [C, 1, m] planes, <stem>_nu_index2 (low 2 bits) and <stem>_nu_index1 (high bit)
            p_vals = [new_initializer(self.graph, f"{stem}_nu_index{w}", p[:, None, :], self.names)
                      for p, (_, w) in zip(planes, planes_of(3))]
        b_val = new_initializer(self.graph, f"{stem}_nu_codebook", book, self.names)
        nodes, idx = self._index4(n, p_val, k) if len(planes) == 1 else self._index3(n, p_vals, k)
        # each layer's [C_i, K] rows: the value it reads when no Reshape / Transpose follows
        direct = [lay.out if lay.ndim == 2 and lay.axis == 0 else None for lay in layers]
        gat_out = direct[0] if len(layers) == 1 else None
        gat = self._node("GatherElements", [b_val, idx], f"{n}_gather", f"{n}_gather",
                         [ir.AttrInt64("axis", 1)], outputs=None if gat_out is None else [gat_out])
        nodes.append(gat)
        if len(layers) == 1:
            rows = [gat.outputs[0]]
        else:
            outs = []
            for i, d in enumerate(direct):
                outs.append(d if d is not None else ir.Value(name=self.names.value(f"{n}_{i}")))
            sizes = [lay.moved_shape[0] for lay in layers]
            if self._opset() >= 13:  # split sizes: an input from opset 13, an attribute before
                split = self._node("Split", [gat.outputs[0], self._const("nu_split", np.array(sizes, np.int64))],
                                   f"{n}_split", attrs=[ir.AttrInt64("axis", 0)], outputs=outs)
            else:
                split = self._node("Split", [gat.outputs[0]], f"{n}_split",
                                   attrs=[ir.AttrInt64("axis", 0), ir.AttrInt64s("split", sizes)], outputs=outs)
            nodes.append(split)
            rows = outs
        for i, (lay, r) in enumerate(zip(layers, rows)):
            if r is lay.out:
                continue
            m = f"{n}_{i}" if len(layers) > 1 else n
            out = r
            if lay.ndim != 2:
                last = lay.axis == 0
                rs = self._node("Reshape", [out, self._const("nu_shape", np.array(lay.moved_shape, np.int64))],
                                f"{m}_reshape", None if last else f"{m}_reshape",
                                outputs=[lay.out] if last else None)
                nodes.append(rs)
                out = rs.outputs[0]
            if lay.axis != 0:
                perm = list(np.argsort([lay.axis] + [j for j in range(lay.ndim) if j != lay.axis]))
                tr = self._node("Transpose", [out], f"{m}_transpose",
                                attrs=[ir.AttrInt64s("perm", [int(p) for p in perm])], outputs=[lay.out])
                nodes.append(tr)
        return nodes

    def _cast_index(self, n: str, idx8: ir.Value, width: int, k: int, tag: str = "") -> Tuple[List[ir.Node], ir.Value]:
        """Slice the [C, width] uint8 indices to K columns (when width != K) and Cast them to int64."""
        nodes = []
        if width != k:
            sl = self._node("Slice", [idx8, self._const("nu_zero", np.array([0], np.int64)),
                                      self._const("nu_len", np.array([k], np.int64)),
                                      self._const("nu_axis1", np.array([1], np.int64))],
                            f"{n}_slice{tag}", f"{n}_slice{tag}")
            nodes.append(sl)
            idx8 = sl.outputs[0]
        cast = self._node("Cast", [idx8], f"{n}_cast{tag}", f"{n}_cast{tag}",
                          [ir.AttrInt64("to", int(ir.DataType.INT64))])
        return nodes + [cast], cast.outputs[0]

    def _index4(self, n: str, p_val: ir.Value, k: int) -> Tuple[List[ir.Node], ir.Value]:
        """int64 [C, K] indices of the nibble plane: low nibbles then high nibbles (Concat), sliced to K."""
        four = self._const("nu_shift4", np.array([4], np.uint8))
        shl = self._node("BitShift", [p_val, four], f"{n}_shl", f"{n}_shl", [ir.AttrString("direction", "LEFT")])
        lo = self._node("BitShift", [shl.outputs[0], four], f"{n}_lo", f"{n}_lo", [ir.AttrString("direction", "RIGHT")])
        hi = self._node("BitShift", [p_val, four], f"{n}_hi", f"{n}_hi", [ir.AttrString("direction", "RIGHT")])
        cat = self._node("Concat", [lo.outputs[0], hi.outputs[0]], f"{n}_cat", f"{n}_cat", [ir.AttrInt64("axis", 1)])
        tail, idx = self._cast_index(n, cat.outputs[0], 2 * int(p_val.const_value.shape[1]), k)
        return [shl, lo, hi, cat] + tail, idx

    def _index3(self, n: str, p_vals: List[ir.Value], k: int) -> Tuple[List[ir.Node], ir.Value]:
        """int64 [C, K] indices of the 3-bit planes: each [C, 1, m] plane of n_f fields of w bits is shifted left by
        the column [[8-w-o]] (o = 0, w, ..., the field offsets; broadcast to [C, n_f, m]) then right by 8 - w, so
        row t holds indices t*m .. t*m+m-1; Reshape [C, n_f*m], Slice to K, Cast; idx = low + 4 * high."""
        parts, nodes = [], []
        for p_val, (n_f, w) in zip(p_vals, planes_of(3)):
            left = self._const(f"nu_shl{w}", np.array([[8 - w - o] for o in range(0, 8, w)], np.uint8))
            right = self._const(f"nu_shift{8 - w}", np.array([8 - w], np.uint8))
            shl = self._node("BitShift", [p_val, left], f"{n}_shl{w}", f"{n}_shl{w}",
                             [ir.AttrString("direction", "LEFT")])
            shr = self._node("BitShift", [shl.outputs[0], right], f"{n}_shr{w}", f"{n}_shr{w}",
                             [ir.AttrString("direction", "RIGHT")])
            rs = self._node("Reshape", [shr.outputs[0], self._const("nu_rows", np.array([0, -1], np.int64))],
                            f"{n}_rows{w}", f"{n}_rows{w}")
            tail, idx = self._cast_index(n, rs.outputs[0], n_f * int(p_val.const_value.shape[2]), k, str(w))
            nodes += [shl, shr, rs] + tail
            parts.append(idx)
        mul = self._node("Mul", [parts[1], self._const("nu_four", np.array([4], np.int64))], f"{n}_high", f"{n}_high")
        add = self._node("Add", [parts[0], mul.outputs[0]], f"{n}_idx", f"{n}_idx")
        return nodes + [mul, add], add.outputs[0]

    def _opset(self) -> int:
        return int(self.graph.opset_imports.get("", MIN_OPSET))
