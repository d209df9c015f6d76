"""Embedding tables (Gather from a constant [rows, dim] table), quantized row-wise or by a codebook.

Method: Guan, Malevich, Yang, Park, Yuen 2019, "Post-training 4-bit quantization on embedding tables":

* ``rowwise``: each row gets its own uniform grid, ``w ≈ q * scale + lo`` with q in [0, 2**bits - 1] (asymmetric,
  as the paper and FBGEMM's fused n-bit row-wise format). The row's range [lo, hi] is found by the paper's greedy
  search: starting from [min, max], each step shrinks the range by one step (range / NUM_BINS) on the side
  whose shrinking gives the lower squared error, until the range is RATIO of the original; the best range
  seen is kept (FBGEMM's defaults: 200 bins, ratio 0.16).
  Two options beyond the paper (quantize_embeddings):
  - ``center`` (on by default): the table's column mean (one [dim] float vector) is subtracted before the rows are
    quantized and added back after the Gather (one Add). Columns with a common offset across rows (typical of
    position tables) then no longer widen every row's range; the centred form is kept only where it lowers the
    table's squared error by at least 5 % (CENTER_GAIN; the Add is not free).
  - ``block``: one grid (scale, offset, greedy range) per ``block`` consecutive values of a row instead of one per
    row (the layout of ONNX Runtime's GatherBlockQuantized); 0 = the paper's one grid per row.
  - ``hot_rows``: the rows the calibration data reads most (e.g. [CLS], [SEP], frequent words: read by almost every
    input, so their quantization error is systematic, not noise) are restored exactly by a small residual table.
* ``codebook``: k-means with 2**bits centroids (16 at 4 bits) per row or per table; each entry stores its
  centroid index.

Realized with standard ONNX ops on the *gathered rows only*, so the runtime never expands the table: 4-bit
indices / codes are packed two per byte in a uint8 table (byte j: value j in the low nibble, value j + h in the high
one, h = half the row or block), the Gather picks the packed rows, a float split (row-wise) or BitShift / Sub
(codebook) + Concat unpacks them, and the row's scale / offset (or codebook row) is gathered beside them. The file
and the resident table shrink to ~1/8 (4-bit) of FP32; the arithmetic after the Gather is a few elementwise
ops on [batch, seq, dim].
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EMBEDDING_SCHEMES = ("none", "rowwise", "codebook")
NUM_BINS = 200        # greedy range search: step = original range / NUM_BINS
RATIO = 0.16          # ... shrinking at most to this fraction of the original range
KMEANS_ITERS = 25
# centring is kept only when it lowers the table's squared error below this fraction of the plain one: its Add costs
# a full pass over the gathered rows (~6 us of MiniLM's 4.8 ms per table), for nothing on a table without a common
# column offset (MiniLM's word table: 1 % lower error; position 18 %, token type 99 %)
CENTER_GAIN = 0.95
ROW_CHUNK = 2048      # rows per vectorised k-means / search chunk (bounds the temporary memory)


# ------------------------------------------------------------------------------------------ row-wise uniform
def _row_error(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    scale = np.maximum(hi - lo, 1e-12) / levels
    q = np.clip(np.rint((w - lo) / scale), 0, levels)
    return np.sum((q * scale + lo - w) ** 2, axis=1, keepdims=True)


def greedy_ranges(w: np.ndarray, bits: int, num_bins: Optional[int] = None, ratio: float = RATIO):
    """Per-row [lo, hi] by the paper's greedy search (vectorised over rows). Returns (lo, hi), [rows, 1].
    ``num_bins``: None = NUM_BINS, read at call time (benchmarks/embedding_spread.py varies it)."""
    num_bins = NUM_BINS if num_bins is None else int(num_bins)
    if w.shape[0] > ROW_CHUNK:
        parts = [greedy_ranges(w[s:s + ROW_CHUNK], bits, num_bins, ratio) for s in range(0, w.shape[0], ROW_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    w = w.astype(np.float32)
    levels = 2 ** bits - 1
    lo0, hi0 = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    step = (hi0 - lo0) / num_bins
    lo, hi = lo0.copy(), hi0.copy()
    best_lo, best_hi = lo0.copy(), hi0.copy()
    best = _row_error(w, lo, hi, levels)
    for _ in range(int(round(num_bins * (1.0 - ratio)))):
        e_left = _row_error(w, lo + step, hi, levels)
        e_right = _row_error(w, lo, hi - step, levels)
        left = e_left < e_right
        lo = np.where(left, lo + step, lo)
        hi = np.where(left, hi, hi - step)
        e = np.where(left, e_left, e_right)
        better = e < best
        best = np.where(better, e, best)
        best_lo, best_hi = np.where(better, lo, best_lo), np.where(better, hi, best_hi)
    return best_lo, best_hi


def rowwise_quantize(w: np.ndarray, bits: int, search: bool = True, block: int = 0):
    """(q uint8 [rows, dim] in [0, 2**bits - 1], scale float32 [rows, n], lo float32 [rows, n]): one grid per
    row (``block`` 0 or >= dim: n = 1), or per ``block`` consecutive values of a row (n = ceil(dim / block), the
    last block shorter), each with its own greedy range."""
    if 0 < block < w.shape[1]:
        parts = [rowwise_quantize(np.ascontiguousarray(w[:, s:s + block]), bits, search)
                 for s in range(0, w.shape[1], block)]
        return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
    lo, hi = greedy_ranges(w, bits) if search else (w.min(1, keepdims=True), w.max(1, keepdims=True))
    levels = 2 ** bits - 1
    scale = (np.maximum(hi - lo, 1e-12) / levels).astype(np.float32)
    lo = lo.astype(np.float32)
    q = np.clip(np.rint((w - lo) / scale), 0, levels).astype(np.uint8)
    return q, scale, lo


def rowwise_dequantize(q, scale, lo, block: int = 0) -> np.ndarray:
    """Reconstruction of rowwise_quantize's output (``block``: the one it was given)."""
    if scale.shape[1] > 1:  # one grid per block of a row
        cols = np.arange(q.shape[1]) // int(block)
        scale, lo = scale[:, cols], lo[:, cols]
    return (q.astype(np.float32) * scale + lo).astype(np.float32)


def _rowwise_table(w: np.ndarray, bits: int, search: bool, center: bool, block: int = 0):
    """(q, scale, lo, column mean or None): the table row-wise quantized (``block``: see rowwise_quantize),
    centred on its column mean when ``center`` and that lowers the squared error of the reconstruction by more
    than 1 - CENTER_GAIN."""
    got = rowwise_quantize(w, bits, search=search, block=block) + (None,)
    if not center:
        return got
    mean = w.mean(axis=0).astype(np.float32)
    cen = rowwise_quantize(w - mean, bits, search=search, block=block) + (mean,)
    e_plain = float(np.sum((rowwise_dequantize(*got[:3], block) - w) ** 2))
    e_cen = float(np.sum((rowwise_dequantize(*cen[:3], block) + mean - w) ** 2))
    return cen if e_cen < CENTER_GAIN * e_plain else got


# ------------------------------------------------------------------------------------------ codebook (k-means)
def _lloyd(x: np.ndarray, c: np.ndarray, iters: int) -> Tuple[np.ndarray, np.ndarray]:
    """Batched 1-D Lloyd: x [R, n] values, c [R, k] initial centroids -> (centroids, indices)."""
    for _ in range(iters):
        idx = np.argmin(np.abs(x[:, :, None] - c[:, None, :]), axis=2)
        onehot = idx[:, :, None] == np.arange(c.shape[1])[None, None, :]
        cnt = onehot.sum(axis=1)
        s = np.einsum("rn,rnk->rk", x, onehot)
        c = np.where(cnt > 0, s / np.maximum(cnt, 1), c)
    idx = np.argmin(np.abs(x[:, :, None] - c[:, None, :]), axis=2)
    return c, idx


def _init_centroids(x: np.ndarray, k: int) -> np.ndarray:
    """Per row: the values' evenly spaced quantiles, or the row's distinct values (padded) when it has at most k
    of them, so that such a row is reproduced exactly."""
    c = np.quantile(x, (np.arange(k) + 0.5) / k, axis=1).T
    distinct = 1 + (np.diff(np.sort(x, axis=1), axis=1) > 0).sum(axis=1)
    for r in np.nonzero(distinct <= k)[0]:
        u = np.unique(x[r])
        c[r] = np.pad(u, (0, k - len(u)), mode="edge")
    return c


def codebook_quantize(w: np.ndarray, bits: int, per: str = "row") -> Tuple[np.ndarray, np.ndarray]:
    """(indices uint8 [rows, dim], codebook float32 [rows, k] per row or [k] per table). Deterministic:
    centroids start at the values' evenly spaced quantiles."""
    k = 2 ** bits
    w = w.astype(np.float64)
    if per == "table":
        flat = w.reshape(1, -1)
        sample = np.sort(flat[0])[:: max(1, flat.size // 200_000)][None, :]   # centroids fitted on a subsample
        c, _ = _lloyd(sample, _init_centroids(sample, k), KMEANS_ITERS)
        idx = np.concatenate([np.argmin(np.abs(flat[:, s:s + 1_000_000, None] - c[:, None, :]), axis=2)
                              for s in range(0, flat.shape[1], 1_000_000)], axis=1)
        return idx.reshape(w.shape).astype(np.uint8), c[0].astype(np.float32)
    cs, ids = [], []
    for s in range(0, w.shape[0], ROW_CHUNK):
        x = w[s:s + ROW_CHUNK]
        c, idx = _lloyd(x, _init_centroids(x, k), KMEANS_ITERS)
        cs.append(c)
        ids.append(idx)
    return np.concatenate(ids).astype(np.uint8), np.concatenate(cs).astype(np.float32)


def pack4(q: np.ndarray) -> np.ndarray:
    """[rows, dim] values < 16 -> uint8 [rows, h = ceil(dim / 2)]: byte j holds element j in its low nibble and
    element j + h in its high nibble (so unpacking is one Concat of the two nibble planes, no interleave)."""
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), q.dtype)], axis=1)
    h = q.shape[1] // 2
    return (q[:, :h] | (q[:, h:] << 4)).astype(np.uint8)


def unpack4(p: np.ndarray, dim: int) -> np.ndarray:
    return np.concatenate([p & 15, p >> 4], axis=1)[:, :dim]


# ------------------------------------------------------------------------------------------ graph
def embedding_tables(model: onnx.ModelProto) -> List[Dict[str, Any]]:
    """Gather nodes that read rows (axis 0) of a constant float [rows, dim] table with run-time indices.
    Each: {node, table, indices, rows, dim, skip (None or the reason it is left alone)}."""
    inits = {t.name: t for t in model.graph.initializer}
    const = set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    from ..ir.fusion import _consumers

    users = {t: [n.name for n in ns] for t, ns in _consumers(model).items()}
    out = []
    for n in model.graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if len(t.dims) != 2 or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or axis != 0:
            continue
        skip = None
        if n.input[1] in const:
            skip = "constant indices: the runtime folds this Gather into a constant anyway"
        elif len(users.get(n.input[0], [])) > 1 or n.input[0] in {o.name for o in model.graph.output}:
            skip = f"table shared with {', '.join(u for u in users[n.input[0]] if u != n.name) or 'a graph output'}"
        out.append({"node": n.name, "table": n.input[0], "indices": n.input[1], "rows": int(t.dims[0]),
                    "dim": int(t.dims[1]), "skip": skip})
    return out


def count_reads(tables: List[Dict[str, Any]], feeds) -> Dict[str, np.ndarray]:
    """{Gather node: reads per table row} of ``tables`` (embedding_tables entries whose indices are model inputs)
    over ``feeds`` (feed dicts); negative indices count from the end, out-of-range ones are not counted."""
    counts = {e["node"]: np.zeros(e["rows"], np.int64) for e in tables}
    for feed in feeds:
        for e in tables:
            ids = np.asarray(feed[e["indices"]]).ravel().astype(np.int64)
            ids = np.where(ids < 0, ids + e["rows"], ids)
            ids = ids[(ids >= 0) & (ids < e["rows"])]
            counts[e["node"]] += np.bincount(ids, minlength=e["rows"])
    return counts


class _Builder:
    """Appends nodes / initializers with fresh names next to one Gather."""

    def __init__(self, model: onnx.ModelProto, base: str):
        self.model, self.base, self.k = model, base, 0
        self.taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} \
            | {i.name for i in model.graph.input} | {n.name for n in model.graph.node}
        self.nodes: List[onnx.NodeProto] = []

    def name(self, tag: str) -> str:
        while True:
            self.k += 1
            n = f"{self.base}/{tag}_{self.k}"
            if n not in self.taken:
                self.taken.add(n)
                return n

    def init(self, tag: str, arr: np.ndarray) -> str:
        n = self.name(tag)
        self.model.graph.initializer.append(numpy_helper.from_array(arr, n))
        return n

    def op(self, op: str, inputs: List[str], tag: str, out: Optional[str] = None, **attrs) -> str:
        o = out or self.name(tag)
        self.nodes.append(helper.make_node(op, inputs, [o], name=self.name(op), **attrs))
        return o


def _unpack_rows(b: _Builder, packed_rows: str, dim: int, as_float: bool = False) -> str:
    """uint8 [..., h] packed rows (pack4) -> [..., dim] 4-bit values (Concat of the low and high nibbles on the
    last axis): uint8, or float32 when ``as_float`` (split after one Cast with Floor(x / 16): vectorized float ops,
    where ORT's uint8 BitShift is a scalar loop — ~8 us per BitShift on MiniLM's 64 x 192 bytes)."""
    if as_float:
        x = b.op("Cast", [packed_rows], "bytes_f", to=TensorProto.FLOAT)
        hi = b.op("Floor", [b.op("Mul", [x, b.init("sixteenth", np.array(0.0625, np.float32))], "x16")], "hi")
        lo = b.op("Sub", [x, b.op("Mul", [hi, b.init("sixteen", np.array(16.0, np.float32))], "hi16")], "lo")
    else:
        four = b.init("four", np.array(4, np.uint8))
        hi = b.op("BitShift", [packed_rows, four], "hi", direction="RIGHT")
        lo = b.op("Sub", [packed_rows, b.op("BitShift", [hi, four], "hi_shl", direction="LEFT")], "lo")
    vals = b.op("Concat", [lo, hi], "vals", axis=-1)
    if dim % 2:
        vals = b.op("Slice", [vals, b.init("s0", np.array([0], np.int64)), b.init("s1", np.array([dim], np.int64)),
                              b.init("sax", np.array([-1], np.int64))], "vals_cut")
    return vals


def _ids_rank(model: onnx.ModelProto, ids: str) -> Optional[int]:
    """Rank of the index tensor when the graph states it (an input or a value_info), else None."""
    for v in list(model.graph.input) + list(model.graph.value_info):
        if v.name == ids and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _replace(model: onnx.ModelProto, node: onnx.NodeProto, b: _Builder) -> None:
    graph = model.graph
    pos = list(graph.node).index(node)
    del graph.node[pos]
    for k, n in enumerate(b.nodes):
        graph.node.insert(pos + k, n)


def quantize_embeddings(model: onnx.ModelProto, scheme: str, bits: int = 4, per: str = "row",
                        search: bool = True, only=None, small_rows: int = 0,
                        cache: Optional[Dict] = None, center: bool = True, block: int = 0,
                        hot_rows: int = 0, read_counts: Optional[Dict[str, np.ndarray]] = None
                        ) -> Tuple[onnx.ModelProto, Dict]:
    """Rewrite every eligible embedding Gather (embedding_tables; ``only``: these node names) of ``model`` (a copy
    is returned) with ``scheme`` in EMBEDDING_SCHEMES. Tables with at most ``small_rows`` rows are quantized
    row-wise at 8 bits instead (their rows are read by every token). ``center`` / ``block``: the row-wise options
    of the module docstring. ``hot_rows`` > 0 with ``read_counts`` ({node: reads per row, from calibration data}):
    the ``hot_rows`` most-read rows of a table are restored exactly (a residual added after the dequantization).
    ``cache`` (a dict kept by the caller) holds each table's quantization across rebuilds of one model (a search
    builds many plans). Returns (model, {node: record}) with sizes and errors."""
    from ..errors import OptionError

    if block < 0 or hot_rows < 0:
        bad = f"embedding_block={block!r}" if block < 0 else f"embedding_hot_rows={hot_rows!r}"
        raise OptionError(f"option {bad} is invalid; use 0 (off) or a positive count / block length")

    if scheme not in EMBEDDING_SCHEMES:
        raise OptionError(f"option embedding_scheme={scheme!r} is invalid; use one of {', '.join(EMBEDDING_SCHEMES)}")
    if scheme == "none":
        return model, {}
    if bits not in (4, 8) or (scheme == "codebook" and bits != 4):
        raise OptionError(f"option embedding_bits={bits!r} is invalid for embedding_scheme={scheme!r}; use 4"
                          + (" or 8" if scheme == "rowwise" else " (16 centroids)"))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    records: Dict[str, Dict[str, Any]] = {}
    for e in embedding_tables(m):
        if only is not None and e["node"] not in only:
            continue
        if e["skip"]:
            records[e["node"]] = {"table": e["table"], "scheme": "none", "why": e["skip"]}
            continue
        node, t = nodes[e["node"]], inits[e["table"]]
        w = numpy_helper.to_array(t).astype(np.float32)
        out_dtype = t.data_type
        b = _Builder(m, e["node"])
        ids, dim, y = node.input[1], e["dim"], node.output[0]
        small = bits == 4 and e["rows"] <= small_rows
        if small:
            t_scheme, t_bits = "rowwise", 8
        else:
            t_scheme, t_bits = scheme, bits
        t_block = block if t_scheme == "rowwise" and 0 < block < dim else 0
        key = (e["table"], t_scheme, t_bits, per, search, bool(center), t_block)
        if cache is None or key not in cache:  # the table's quantization does not depend on the plan
            got = _rowwise_table(w, t_bits, search, center, t_block) if t_scheme == "rowwise" else \
                codebook_quantize(w, t_bits, per=per)
            if cache is not None:
                cache[key] = got
        got = cache[key] if cache is not None else got
        if t_scheme == "rowwise":
            q, scale, lo, mean = got
            w_hat = rowwise_dequantize(q, scale, lo, t_block) + (0 if mean is None else mean)
            # with blocks that divide the row, the table is stored as [rows, n, block(/2 packed)] and the grids as
            # [rows, n, 1]: the gathered [..., n, block] values meet their grids by broadcasting, then one Reshape
            # back to [..., dim]; otherwise [rows, dim(/2)] with [rows, n] grids
            view = bool(t_block) and dim % t_block == 0 and t_block % 2 == 0
            width = t_block if view else dim
            qt = q.reshape(-1, width)
            packed = pack4(qt) if t_bits == 4 else qt
            if view:
                packed = packed.reshape(q.shape[0], dim // t_block, -1)
            grids = (scale[:, :, None], lo[:, :, None]) if view else (scale, lo)
            rows = b.op("Gather", [b.init("table_q", packed), ids], "rows", axis=0)
            f = _unpack_rows(b, rows, width, as_float=True) if t_bits == 4 else \
                b.op("Cast", [rows], "vals_f", to=TensorProto.FLOAT)
            s = b.op("Gather", [b.init("row_scale", grids[0]), ids], "scale", axis=0)
            o = b.op("Gather", [b.init("row_offset", grids[1]), ids], "offset", axis=0)
            if t_block and not view:  # a shorter last block: each column gathers its grid (~75 us a Gather on MiniLM)
                cols = b.init("block_of_column", np.arange(dim, dtype=np.int64) // t_block)
                s = b.op("Gather", [s, cols], "scale_cols", axis=-1)
                o = b.op("Gather", [o, cols], "offset_cols", axis=-1)
            res = b.op("Add", [b.op("Mul", [f, s], "scaled"), o], "deq")
            if view:
                rank = _ids_rank(m, ids)
                if rank is not None:  # Reshape's 0 keeps the index dims
                    row = b.init("row", np.array([0] * rank + [dim], np.int64))
                else:
                    row = b.op("Concat", [b.op("Shape", [ids], "ids_shape"), b.init("dim", np.array([dim], np.int64))],
                               "row_shape", axis=0)
                res = b.op("Reshape", [res, row], "deq_rows")
            if mean is not None:  # the column mean the rows were quantized without
                res = b.op("Add", [res, b.init("column_mean", mean)], "uncentred")
            extra = scale.nbytes + lo.nbytes + (0 if mean is None else mean.nbytes)
            detail = {"range_search": "greedy (Guan et al. 2019)" if search else "min-max",
                      "centred": mean is not None, "grids_per_row": int(scale.shape[1])}
        else:
            idx, cb = got
            w_hat = (cb[np.arange(w.shape[0])[:, None], idx] if per == "row" else cb[idx]).astype(np.float32)
            rows = b.op("Gather", [b.init("table_idx", pack4(idx)), ids], "rows", axis=0)
            i64 = b.op("Cast", [_unpack_rows(b, rows, dim)], "idx", to=TensorProto.INT64)
            if per == "row":
                cbr = b.op("Gather", [b.init("codebook", cb), ids], "codebook_rows", axis=0)
                res = b.op("GatherElements", [cbr, i64], "deq", axis=-1)
            else:
                res = b.op("Gather", [b.init("codebook", cb), i64], "deq", axis=0)
            extra = cb.nbytes
            detail = {"codebook": per, "centroids": int(2 ** t_bits)}
        counts = (read_counts or {}).get(e["node"])
        if hot_rows > 0 and counts is not None and np.size(counts) == e["rows"] and np.sum(counts) > 0:
            # the most-read rows (calibration data) get their exact value back: a [K + 1, dim] residual table
            # (row 0 zeros) gathered through a [rows] slot map; 3 small ops, K * dim * 4 + rows * 4 bytes
            counts = np.asarray(counts, np.int64)
            hot = np.argsort(-counts, kind="stable")[:hot_rows]
            hot = hot[counts[hot] > 0]
            slot = np.zeros(e["rows"], np.int32)
            slot[hot] = np.arange(1, hot.size + 1, dtype=np.int32)
            resid = np.zeros((hot.size + 1, dim), np.float32)
            resid[1:] = w[hot] - w_hat[hot]
            fix = b.op("Gather", [b.init("hot_residual", resid),
                                  b.op("Gather", [b.init("hot_slot", slot), ids], "slots", axis=0)], "fix", axis=0)
            res = b.op("Add", [res, fix], "hot_fixed")
            w_hat = w_hat.copy()
            w_hat[hot] = (w_hat[hot] + resid[1:]).astype(np.float32)
            extra += slot.nbytes + resid.nbytes
            detail.update({"hot_rows": int(hot.size),
                           "hot_read_share": round(float(counts[hot].sum() / counts.sum()), 4)})
        if out_dtype != TensorProto.FLOAT:
            b.op("Cast", [res], "out", out=y, to=out_dtype)
        else:
            b.nodes[-1].output[0] = y  # the last op made ``res``: it writes the Gather's output directly
        _replace(m, node, b)
        m.graph.initializer.remove(t)
        before = int(w.size * (2 if out_dtype == TensorProto.FLOAT16 else 4))
        after = int(-(-dim // 2) * e["rows"] if t_bits == 4 else dim * e["rows"]) + int(extra)
        err = float(np.linalg.norm(w_hat - w) / max(np.linalg.norm(w), 1e-30))
        if small:
            detail["why"] = f"{e['rows']} rows <= embedding_small_rows={small_rows}: 8-bit row-wise"
        records[e["node"]] = {"table": e["table"], "scheme": t_scheme, "bits": t_bits, "rows": e["rows"], "dim": dim,
                              "bytes_before": before, "bytes_after": after, "relative_error": err,
                              "mse": float(np.mean((w_hat - w) ** 2)), **detail}
    return m, records
