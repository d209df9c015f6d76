"""Codebook storage of non-uniform weights (weight_scheme="nonuniform", quant/nonuniform.py).

A non-uniform layer's integer weight uses at most 2**bits int8 values per output channel. Instead of the
[C, K] int8 initializer (K = weights per output channel), realize stores its rows as

* packed indices: uint8 [C, ceil(K/2)], two 4-bit indices per byte (3-bit indices also take a nibble):
  byte j of a row holds index j in its low nibble and index j + ceil(K/2) in its high nibble;
* a codebook: int8 (uint8 for u8u8 weights) [C, 2**bits], the channel's levels (unused entries 0).

Layers with the same K, integer dtype and bits form one group and share one expansion chain: their rows are
concatenated along axis 0 into one ``<g>_nu_index`` and one ``<g>_nu_codebook`` initializer (``<w>_nu_index`` /
``<w>_nu_codebook`` for a group of one layer, ``nu<i>_nu_index`` / ... for a larger one), expanded once with
standard ONNX ops, all constant-foldable:

    lo = BitShift(BitShift(packed, 4, LEFT), 4, RIGHT)     (uint8: the left shift drops the high nibble)
    hi = BitShift(packed, 4, RIGHT)
    idx = Cast<int64>(Slice(Concat(lo, hi, axis=1), 0, K, axis=1))   (Slice only when K is odd)
    rows = GatherElements(codebook, idx, axis=1)                     [sum C_i, K]
    rows_i = Split(rows, [C_1, C_2, ...], axis=0)                     (only for a group of two or more)
    q_i = Reshape(rows_i, weight shape, channels first)  (+ Transpose for a [K, N] MatMul weight)

into exactly each layer's int8 weight ``<w>_quantized``, which feeds the layer's DequantizeLinear as before.
The chains read initializers only and sit at the start of the graph; CodebookWriter.weight() hands out each
layer's final value at once and CodebookWriter.finish() (end of realize) builds the chains, since the groups
are known only after every layer was seen. ONNX Runtime folds the chains when it loads the model (constant
folding, every optimization level but 'disabled'), then fuses the QDQ into QLinearConv / QGemm /
DynamicQuantizeMatMul as for a plain int8 initializer (tests/test_nonuniform.py checks the optimized graph).
Where the codebook form is not smaller (e.g. depthwise 3x3: K=9 < 16 + 5 bytes) the weight stays a plain int8
initializer ("int8" storage; quantize_weight applies the same rule first and gives such a layer the full INT8
grid).
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
MIN_OPSET = 11  # BitShift, GatherElements; Split takes its sizes as an attribute before opset 13, an input from 13
SHARE_CHAINS = True  # one chain per (K, dtype, bits) group; False: one chain per layer (for comparisons)


def pack(q2d: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """[C, K] integers with at most 2**bits distinct values per row -> (packed uint8 [C, ceil(K/2)],
    codebook [C, 2**bits] of q2d's dtype). Exact: ``unpack(*pack(q)) == q``."""
    c, k = q2d.shape
    n_lv = 1 << int(bits)
    h = (k + 1) // 2
    book = np.zeros((c, n_lv), q2d.dtype)
    idx = np.zeros((c, 2 * h), np.uint8)
    for i in range(c):
        lv = np.unique(q2d[i])
        if lv.size > n_lv:
            raise ValueError(f"row {i} uses {lv.size} values, more than 2**{bits}")
        book[i, :lv.size] = lv
        idx[i, :k] = np.searchsorted(lv, q2d[i])
    packed = (idx[:, :h] | (idx[:, h:] << 4)).astype(np.uint8)
    return packed, book


def unpack(packed: np.ndarray, book: np.ndarray, k: int) -> np.ndarray:
    """numpy reference of the ONNX expansion: [C, K] values."""
    idx = np.concatenate([packed & 0x0F, packed >> 4], axis=1)[:, :k].astype(np.int64)
    return np.take_along_axis(book, idx, axis=1)


def codebook_bytes(shape, axis: int, bits: int) -> Tuple[int, int]:
    """(codebook form, plain int8 form) sizes in bytes of a weight of ``shape`` with channels on ``axis``."""
    c = int(shape[axis])
    k = int(np.prod(shape)) // max(c, 1)
    return c * ((1 << int(bits)) + (k + 1) // 2), c * k


class _Layer:
    """One codebook-stored weight waiting for finish(): its rows, shape and the value DequantizeLinear reads."""

    def __init__(self, base: str, packed: np.ndarray, book: np.ndarray, moved_shape: tuple, axis: int, out: ir.Value):
        self.base, self.packed, self.book, self.moved_shape, self.axis, self.out = \
            base, packed, book, moved_shape, axis, out
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
        ("int8"), or ("codebook4") a value named ``<base>_quantized`` without a producer yet, which finish() makes
        the output of its group's expansion chain. ``force`` picks the storage regardless of size."""
        if self._finished:
            raise RuntimeError("CodebookWriter.weight() after finish()")
        cb, plain = codebook_bytes(q.shape, axis, bits)
        storage = force or ("codebook4" if cb + CHAIN_OVERHEAD < plain else "int8")
        if storage == "int8":
            return new_initializer(self.graph, f"{base}_quantized", q, self.names), "int8"
        moved = np.moveaxis(q, axis, 0)
        c = moved.shape[0]
        q2d = np.ascontiguousarray(moved.reshape(c, -1))
        k = q2d.shape[1]
        packed, book = pack(q2d, bits)
        out = ir.Value(name=self.names.value(f"{base}_quantized"), shape=ir.Shape(list(q.shape)),
                       type=ir.TensorType(ir.DataType.from_numpy(q.dtype)))
        layer = _Layer(base, packed, book, tuple(moved.shape), axis, out)
        key = (k, q.dtype.str, int(bits)) if SHARE_CHAINS else (k, q.dtype.str, int(bits), len(self._groups))
        self._groups.setdefault(key, []).append(layer)
        return out, "codebook4"

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
            packed, book = layers[0].packed, layers[0].book
        else:
            stem = n
            packed = np.concatenate([lay.packed for lay in layers], axis=0)
            book = np.concatenate([lay.book for lay in layers], axis=0)
        p_val = new_initializer(self.graph, f"{stem}_nu_index", packed, self.names)
        b_val = new_initializer(self.graph, f"{stem}_nu_codebook", book, self.names)
        four = self._const("nu_shift4", np.array([4], np.uint8))
        nodes = []
        shl = self._node("BitShift", [p_val, four], f"{n}_shl", f"{n}_shl", [ir.AttrString("direction", "LEFT")])
        lo = self._node("BitShift", [shl.outputs[0], four], f"{n}_lo", f"{n}_lo", [ir.AttrString("direction", "RIGHT")])
        hi = self._node("BitShift", [p_val, four], f"{n}_hi", f"{n}_hi", [ir.AttrString("direction", "RIGHT")])
        cat = self._node("Concat", [lo.outputs[0], hi.outputs[0]], f"{n}_cat", f"{n}_cat", [ir.AttrInt64("axis", 1)])
        nodes += [shl, lo, hi, cat]
        idx8 = cat.outputs[0]
        if 2 * packed.shape[1] != k:
            sl = self._node("Slice", [idx8, self._const("nu_zero", np.array([0], np.int64)),
                                      self._const("nu_len", np.array([k], np.int64)),
                                      self._const("nu_axis1", np.array([1], np.int64))],
                            f"{n}_slice", f"{n}_slice")
            nodes.append(sl)
            idx8 = sl.outputs[0]
        cast = self._node("Cast", [idx8], f"{n}_cast", f"{n}_cast", [ir.AttrInt64("to", int(ir.DataType.INT64))])
        nodes.append(cast)
        # each layer's [C_i, K] rows: the value it reads when no Reshape / Transpose follows
        direct = [lay.out if lay.ndim == 2 and lay.axis == 0 else None for lay in layers]
        gat_out = direct[0] if len(layers) == 1 else None
        gat = self._node("GatherElements", [b_val, cast.outputs[0]], f"{n}_gather", f"{n}_gather",
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

    def _opset(self) -> int:
        return int(self.graph.opset_imports.get("", MIN_OPSET))
