"""Codebook storage of non-uniform weights (weight_scheme="nonuniform", quant/nonuniform.py).

A non-uniform layer's integer weight uses at most 2**bits int8 values per output channel. Instead of the
[C, K] int8 initializer (K = weights per output channel), realize stores

* ``<w>_nu_index``: uint8 [C, ceil(K/2)], two 4-bit indices per byte (3-bit indices also take a nibble):
  byte j of a row holds index j in its low nibble and index j + ceil(K/2) in its high nibble;
* ``<w>_nu_codebook``: int8 (uint8 for u8u8 weights) [C, 2**bits], the channel's levels (unused entries 0);

and expands them with standard ONNX ops, all constant-foldable:

    lo = BitShift(BitShift(packed, 4, LEFT), 4, RIGHT)     (uint8: the left shift drops the high nibble)
    hi = BitShift(packed, 4, RIGHT)
    idx = Cast<int64>(Slice(Concat(lo, hi, axis=1), 0, K, axis=1))   (Slice only when K is odd)
    q = Reshape(GatherElements(codebook, idx, axis=1), weight shape)  (+ Transpose for a [K, N] MatMul weight)

into exactly the int8 weight, which feeds the layer's DequantizeLinear as before. ONNX Runtime folds the
chain when it loads the model (constant folding, every optimization level but 'disabled'), then fuses the
QDQ into QLinearConv / QGemm / DynamicQuantizeMatMul as for a plain int8 initializer (tests/test_nonuniform.py
checks the optimized graph). Where the codebook form is not smaller (e.g. depthwise 3x3: K=9 < 16 + 5 bytes)
the weight stays a plain int8 initializer ("int8" storage; its levels are still non-uniform).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import onnx_ir as ir

from ..ir.passes._util import new_initializer

# bytes a codebook-stored layer costs beyond its two tensors (node protos, the per-layer Reshape / Slice
# constants): the codebook form is used only when it saves more than this
CHAIN_OVERHEAD = 512  # measured: ~500 B per layer (7-9 nodes) with short tensor names
MIN_OPSET = 11  # BitShift, GatherElements


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


class CodebookWriter:
    """Adds codebook-stored weights to one graph; small constants (shift, slice starts / axes, shapes) are
    shared between layers."""

    def __init__(self, graph: ir.Graph, names):
        self.graph = graph
        self.names = names
        self._consts: Dict[tuple, ir.Value] = {}
        self._count = 0

    def _const(self, base: str, arr: np.ndarray) -> ir.Value:
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = new_initializer(self.graph, base, arr, self.names)
        return self._consts[key]

    def _node(self, op: str, inputs, name: str, out: str, attrs=None, out_type=None) -> ir.Node:
        node = ir.Node("", op, inputs, attributes=attrs or [], name=self.names.node(name), num_outputs=1)
        node.outputs[0].name = self.names.value(out)
        return node

    def weight(self, q: np.ndarray, axis: int, bits: int, base: str, before: ir.Node,
               force: Optional[str] = None) -> Tuple[ir.Value, str]:
        """The value holding integer weight ``q`` (int8 / uint8 array, channels on ``axis``): the output of the
        expansion chain inserted before node ``before`` ("codebook4") or a plain initializer ("int8").
        ``force`` picks the storage regardless of size."""
        cb, plain = codebook_bytes(q.shape, axis, bits)
        storage = force or ("codebook4" if cb + CHAIN_OVERHEAD < plain else "int8")
        if storage == "int8":
            return new_initializer(self.graph, f"{base}_quantized", q, self.names), "int8"
        moved = np.moveaxis(q, axis, 0)
        c = moved.shape[0]
        q2d = np.ascontiguousarray(moved.reshape(c, -1))
        k = q2d.shape[1]
        packed, book = pack(q2d, bits)
        p_val = new_initializer(self.graph, f"{base}_nu_index", packed, self.names)
        b_val = new_initializer(self.graph, f"{base}_nu_codebook", book, self.names)
        four = self._const("nu_shift4", np.array([4], np.uint8))
        # the intermediate values and nodes get short names (nu<i>_...): they are folded away at load time, and
        # long names would cost ~300 B per layer in the file
        self._count += 1
        n = f"nu{self._count}"
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
        gat = self._node("GatherElements", [b_val, cast.outputs[0]], f"{n}_gather", f"{n}_gather",
                         [ir.AttrInt64("axis", 1)])
        nodes += [cast, gat]
        out = gat.outputs[0]
        if moved.shape != (c, k):
            rs = self._node("Reshape", [out, self._const("nu_shape", np.array(moved.shape, np.int64))],
                            f"{n}_reshape", f"{n}_reshape")
            nodes.append(rs)
            out = rs.outputs[0]
        if axis != 0:
            perm = list(np.argsort([axis] + [i for i in range(q.ndim) if i != axis]))
            tr = self._node("Transpose", [out], f"{n}_transpose", f"{base}_quantized",
                            [ir.AttrInt64s("perm", [int(p) for p in perm])])
            nodes.append(tr)
            out = tr.outputs[0]
        if axis == 0:
            out.name = self.names.value(f"{base}_quantized")  # the value DequantizeLinear reads, as for int8
        self.graph.insert_before(before, nodes)
        return out, "codebook4"
