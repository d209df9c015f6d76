"""Embedding tables: row-wise uniform (greedy range search) and codebook quantization of Gather tables
(hago_py/quant/embedding.py), realized so that ORT gathers packed rows without expanding the table."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago_py
from hago_py.errors import OptionError
from hago_py.quant.embedding import (codebook_quantize, greedy_ranges, pack4, quantize_embeddings,
                                     rowwise_dequantize, rowwise_quantize, unpack4)

RNG = np.random.default_rng(0)


def table(v=60, d=37):
    w = RNG.standard_normal((v, d)).astype(np.float32) * RNG.uniform(0.05, 2.0, (v, 1)).astype(np.float32)
    w[3, 5] = 25.0  # an outlier row: the greedy search should clip it
    return w


def emb_model(w, extra_consumer=False, const_ids=False, opset=17):
    nodes = [helper.make_node("Gather", ["W", "ids"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "P"], ["y"], name="proj")]
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(RNG.standard_normal((w.shape[1], 8)).astype(np.float32), "P")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])]
    if const_ids:
        inits.append(numpy_helper.from_array(np.array([[0, 1, 2]], np.int64), "ids"))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])]
        nodes.append(helper.make_node("Add", ["y", "x"], ["y2"], name="add"))
    outputs = [helper.make_tensor_value_info("y2" if const_ids else "y", TensorProto.FLOAT,
                                             ["B", 8] if const_ids else ["B", "S", 8])]
    if extra_consumer:
        nodes.append(helper.make_node("ReduceSum", ["W", "axes0"], ["wsum"], name="tied", keepdims=0))
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
        outputs.append(helper.make_tensor_value_info("wsum", TensorProto.FLOAT, [w.shape[1]]))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def run_gather(model, ids):
    """The embedding rows the rewritten graph produces for ``ids`` (the Gather's output)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", "S", "D"]))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["e"], {"ids": ids})[0]


def test_pack_unpack_roundtrip_odd_dim():
    q = RNG.integers(0, 16, (5, 7)).astype(np.uint8)
    p = pack4(q)
    assert p.shape == (5, 4) and p.dtype == np.uint8
    assert np.array_equal(unpack4(p, 7), q)
    assert p[0, 0] == q[0, 0] | (q[0, 4] << 4)  # byte j: element j (low nibble) and j + 4 (high)


def _sse(w, lo, hi, bits):
    lv = 2 ** bits - 1
    s = np.maximum(hi - lo, 1e-12) / lv
    return float(np.sum((np.clip(np.rint((w - lo) / s), 0, lv) * s + lo - w) ** 2))


def test_greedy_range_is_the_greedy_optimum_on_a_brute_forced_row():
    """The chosen range is the best range on the greedy path (replayed step by step here), never worse than
    min-max, and among the best quarter of all ranges reachable by as many shrinks (brute force)."""
    w = np.array([[-3.0, -0.4, -0.1, 0.0, 0.05, 0.2, 0.3, 0.5, 4.0]], np.float32)
    bins, ratio, bits = 10, 0.5, 2
    lo, hi = greedy_ranges(w, bits, num_bins=bins, ratio=ratio)
    step = (w.max() - w.min()) / bins
    # replay the greedy path by hand
    l, h, best, best_r = float(w.min()), float(w.max()), _sse(w, w.min(), w.max(), bits), (w.min(), w.max())
    for _ in range(int(round(bins * (1 - ratio)))):
        el, er = _sse(w, l + step, h, bits), _sse(w, l, h - step, bits)
        l, h = (l + step, h) if el < er else (l, h - step)
        if min(el, er) < best:
            best, best_r = min(el, er), (l, h)
    assert np.allclose([lo[0, 0], hi[0, 0]], best_r, atol=1e-5)
    # every range reachable by 5 shrinks, brute force: greedy is within the best of them or better than min-max
    reach = [_sse(w, w.min() + a * step, w.max() - b * step, bits) for a, b in itertools.product(range(6), range(6))
             if a + b <= 5]
    assert _sse(w, lo, hi, bits) <= _sse(w, w.min(), w.max(), bits)
    assert _sse(w, lo, hi, bits) <= np.percentile(reach, 25)


def test_greedy_search_beats_minmax_on_outlier_rows():
    w = table()
    e = {}
    for search in (True, False):
        q, s, lo = rowwise_quantize(w, 4, search=search)
        e[search] = float(np.sum((rowwise_dequantize(q, s, lo) - w) ** 2))
    assert e[True] < 0.9 * e[False]


@pytest.mark.parametrize("scheme,bits,per", [("rowwise", 4, "row"), ("rowwise", 8, "row"), ("codebook", 4, "row"),
                                             ("codebook", 4, "table")])
def test_realization_is_exact_and_smaller(scheme, bits, per):
    w = table()
    m = emb_model(w)
    q, rec = quantize_embeddings(m, scheme, bits, per)
    onnx.checker.check_model(q)
    r = rec["emb"]
    assert r["scheme"] == scheme and r["bits"] == bits
    assert "W" not in {t.name for t in q.graph.initializer}  # the FP32 table is gone
    ids = RNG.integers(0, w.shape[0], (2, 9)).astype(np.int64)
    got = run_gather(q, ids)
    if scheme == "rowwise":  # centring is on by default, kept only where it lowers the error
        mean = w.mean(axis=0) if r["centred"] else 0
        qq, s, lo = rowwise_quantize(w - mean, bits)
        want = (rowwise_dequantize(qq, s, lo) + mean)[ids]
    else:
        idx, cb = codebook_quantize(w, bits, per)
        want = (cb[np.arange(w.shape[0])[:, None], idx] if per == "row" else cb[idx])[ids]
    np.testing.assert_array_equal(got, want)  # bit-exact: the ONNX unpacking is the numpy reconstruction
    assert r["bytes_after"] < (0.5 if bits == 8 else 0.6) * r["bytes_before"]
    assert r["relative_error"] < (0.01 if bits == 8 else 0.2)
    size_q = sum(numpy_helper.to_array(t).nbytes for t in q.graph.initializer if t.name != "P")
    assert size_q <= r["bytes_after"] + 64


def test_codebook_is_exact_when_a_row_has_at_most_16_values():
    w = RNG.choice(np.linspace(-1, 1, 16).astype(np.float32), size=(20, 33))
    idx, cb = codebook_quantize(w, 4, "row")
    np.testing.assert_array_equal(cb[np.arange(20)[:, None], idx], w)


def test_ort_keeps_the_table_packed():
    """ORT's optimized graph still gathers the packed uint8 table: nothing expands it to float at load."""
    w = table(v=300, d=64)
    q, _ = quantize_embeddings(emb_model(w), "rowwise", 4)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    floats = [t for t in opt.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 300 * 64]
    assert not floats
    assert any(t.data_type == TensorProto.UINT8 and list(t.dims) == [300, 32] for t in opt.graph.initializer)


def test_shared_and_constant_index_tables_are_left_alone():
    q, rec = quantize_embeddings(emb_model(table(), extra_consumer=True), "rowwise", 4)
    assert rec["emb"]["scheme"] == "none" and "shared with tied" in rec["emb"]["why"]
    q, rec = quantize_embeddings(emb_model(table(), const_ids=True), "rowwise", 4)
    assert rec["emb"]["scheme"] == "none" and "constant indices" in rec["emb"]["why"]


def test_pipeline_option_plan_and_report():
    w = table(v=200, d=32)
    m = emb_model(w)
    calib = {"ids": RNG.integers(0, 200, (16, 5)).astype(np.int64)}
    res = hago_py.quantize(m, calib, embedding_scheme="rowwise", embedding_bits=4, measure_latency=False)
    assert res.plan.embeddings["emb"]["scheme"] == "rowwise" and res.plan.embeddings["emb"]["bits"] == 8
    assert "embedding_small_rows=1024" in res.plan.embeddings["emb"]["why"]  # 200 rows: a small table stays 8-bit
    res = hago_py.quantize(m, calib, embedding_scheme="rowwise", embedding_small_rows=0, measure_latency=False)
    assert res.plan.embeddings["emb"]["bits"] == 4 and "why" not in res.plan.embeddings["emb"]
    assert res.report["embeddings"]["emb"]["bytes_after"] < res.report["embeddings"]["emb"]["bytes_before"]
    from hago_py.quant.plan import QuantPlan
    from hago_py.report.write import render_markdown

    assert QuantPlan.from_json(res.plan.to_json()).embeddings == res.plan.embeddings
    assert "## Embedding tables" in render_markdown(res.report)
    res = hago_py.quantize(m, calib, embedding_scheme="rowwise", embedding_small_rows=0, embedding_block=16,
                           measure_latency=False)
    assert res.plan.embeddings["emb"]["grids_per_row"] == 2
    assert "2 grids per row" in render_markdown(res.report)
    base = hago_py.quantize(m, calib, measure_latency=False)
    assert not base.plan.embeddings and "W" in {t.name for t in base.model.graph.initializer}
    with pytest.raises(OptionError, match="embedding_scheme"):
        hago_py.quantize(m, calib, embedding_scheme="kmeans", measure_latency=False)
    with pytest.raises(OptionError, match="embedding_bits"):
        quantize_embeddings(m, "codebook", 8)


def test_cli_embedding_flags(tmp_path):
    from hago_py.cli import main

    w = table(v=1500, d=16)
    mp, cp, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(emb_model(w), str(mp))
    np.savez(cp, ids=RNG.integers(0, 1500, (8, 4)).astype(np.int64))
    assert main(["quantize", str(mp), "--calib", str(cp), "--out", str(out), "--embedding-scheme", "rowwise",
                 "--no-latency", "-q"]) == 0
    q = onnx.load(str(out))
    assert "W" not in {t.name for t in q.graph.initializer}
    assert any(t.data_type == TensorProto.UINT8 and list(t.dims) == [1500, 8] for t in q.graph.initializer)
    # every table 4-bit (a 200-row table would stay 8-bit by default), the paper's plain row-wise search
    onnx.save(emb_model(table(v=200, d=16)), str(mp))
    np.savez(cp, ids=RNG.integers(0, 200, (8, 4)).astype(np.int64))
    assert main(["quantize", str(mp), "--calib", str(cp), "--out", str(out), "--embedding-scheme", "rowwise",
                 "--embedding-small-rows", "0", "--embedding-plain", "--embedding-block", "8", "--no-latency",
                 "-q"]) == 0
    q = onnx.load(str(out))
    # 2 grids of 8 per row: the packed table as [rows, blocks, 4 bytes], the grids as [rows, blocks, 1]
    assert any(t.data_type == TensorProto.UINT8 and list(t.dims) == [200, 2, 4] for t in q.graph.initializer)
    assert any("row_scale" in t.name and list(t.dims) == [200, 2, 1] for t in q.graph.initializer)
    assert not any("column_mean" in t.name for t in q.graph.initializer)


def test_centring_removes_a_common_column_offset():
    """Rows that share a per-column offset (a position table's typical shape) waste their 4-bit range on it;
    centring quantizes only the rows' deviations and adds the column mean back, exactly as the numpy reference."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((100, 40)) * 0.05 + rng.standard_normal(40) * 1.0).astype(np.float32)
    m = emb_model(w)
    e = {}
    for center in (True, False):
        q, rec = quantize_embeddings(m, "rowwise", 4, center=center)
        assert rec["emb"]["centred"] == center
        e[center] = rec["emb"]["relative_error"]
    assert e[True] < 0.3 * e[False]
    q, _ = quantize_embeddings(m, "rowwise", 4)
    mean = w.mean(axis=0)
    qq, s, lo = rowwise_quantize(w - mean, 4)
    ids = rng.integers(0, 100, (3, 7)).astype(np.int64)
    np.testing.assert_array_equal(run_gather(q, ids), (rowwise_dequantize(qq, s, lo) + mean)[ids])  # bit-exact
    assert any(t.name.endswith("column_mean_" + t.name.rsplit("_", 1)[-1]) for t in q.graph.initializer)


@pytest.mark.parametrize("dim,block", [(40, 16), (37, 8), (48, 16)])
def test_block_grids_are_exact_and_lower_the_error(dim, block):
    """block > 0: one grid per `block` values of a row (the last block shorter when it does not divide dim); the
    ONNX realization reproduces the numpy reconstruction bit for bit; more grids, lower error, a few bytes more."""
    w = table(v=80, d=dim)
    m = emb_model(w)
    q1, r1 = quantize_embeddings(m, "rowwise", 4, center=False)
    qb, rb = quantize_embeddings(m, "rowwise", 4, center=False, block=block)
    n = -(-dim // block)
    assert rb["emb"]["grids_per_row"] == n and r1["emb"]["grids_per_row"] == 1
    assert rb["emb"]["relative_error"] < 0.85 * r1["emb"]["relative_error"]
    assert rb["emb"]["bytes_after"] == r1["emb"]["bytes_after"] + 80 * (n - 1) * 8
    qq, s, lo = rowwise_quantize(w, 4, block=block)
    assert s.shape == (80, n)
    ids = RNG.integers(0, 80, (2, 5)).astype(np.int64)
    np.testing.assert_array_equal(run_gather(qb, ids), rowwise_dequantize(qq, s, lo, block)[ids])
    # block >= dim is the one-grid row
    assert quantize_embeddings(m, "rowwise", 4, center=False, block=dim)[1]["emb"]["grids_per_row"] == 1
    with pytest.raises(OptionError, match="embedding_block"):
        quantize_embeddings(m, "rowwise", 4, block=-1)


def test_blocks_of_computed_indices_use_the_reshape_view():
    """Indices computed in the graph (no stated rank, like BERT's sliced position ids) still take the [..., n,
    block] view (Shape + Concat for the row shape), not the per-column Gather of the scales; output exact."""
    w = table(v=50, d=32)
    m = emb_model(w)
    m.graph.node.insert(0, helper.make_node("Identity", ["ids_in"], ["ids"], name="ids_copy"))
    m.graph.input[0].name = "ids_in"
    q, rec = quantize_embeddings(m, "rowwise", 4, center=False, block=16)
    names = {t.name for t in q.graph.initializer}
    assert rec["emb"]["grids_per_row"] == 2 and not any("block_of_column" in n for n in names)
    qq, s, lo = rowwise_quantize(w, 4, block=16)
    ids = RNG.integers(0, 50, (2, 3)).astype(np.int64)
    mm = onnx.ModelProto()
    mm.CopyFrom(q)
    mm.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", "S", "D"]))
    sess = ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["e"], {"ids_in": ids})[0]
    np.testing.assert_array_equal(got, rowwise_dequantize(qq, s, lo, 16)[ids])


def test_hot_rows_are_restored_exactly():
    """The most-read rows (by the counts given) come out exact; the others are the plain 4-bit reconstruction;
    the residual's bytes are accounted; rows never read are never hot; the pipeline counts reads on its
    calibration data."""
    w = table(v=60, d=32)
    m = emb_model(w)
    counts = np.zeros(60, np.int64)
    counts[[7, 3, 11]] = [50, 40, 1]
    q0, r0 = quantize_embeddings(m, "rowwise", 4)
    q, r = quantize_embeddings(m, "rowwise", 4, hot_rows=2, read_counts={"emb": counts})
    assert r["emb"]["hot_rows"] == 2 and r["emb"]["hot_read_share"] == round(90 / 91, 4)
    assert r["emb"]["bytes_after"] == r0["emb"]["bytes_after"] + 60 * 4 + 3 * 32 * 4
    assert r["emb"]["relative_error"] < r0["emb"]["relative_error"]
    ids = np.array([[7, 3, 11, 0]], np.int64)
    got, plain = run_gather(q, ids), run_gather(q0, ids)
    np.testing.assert_allclose(got[0, :2], w[[7, 3]], rtol=0, atol=1e-6)  # hot: exact (up to float addition)
    np.testing.assert_array_equal(got[0, 2:], plain[0, 2:])  # cold rows unchanged
    _, r1 = quantize_embeddings(m, "rowwise", 4, hot_rows=10, read_counts={"emb": counts})
    assert r1["emb"]["hot_rows"] == 3  # only rows that were read
    with pytest.raises(OptionError, match="embedding_hot_rows"):
        quantize_embeddings(m, "rowwise", 4, hot_rows=-1)
    ids_cal = np.full((16, 5), 42, np.int64)
    ids_cal[:, 0] = 9
    res = hago_py.quantize(m, {"ids": ids_cal}, embedding_scheme="rowwise", embedding_small_rows=0,
                           embedding_hot_rows=1, measure_latency=False)
    assert res.plan.embeddings["emb"]["hot_rows"] == 1 and res.plan.embeddings["emb"]["hot_read_share"] == 0.8
    np.testing.assert_allclose(run_gather(res.model, np.array([[42]], np.int64))[0, 0], w[42], rtol=0, atol=1e-6)


def test_cache_reuses_the_table_quantization(monkeypatch):
    """A cache dict (the pipeline keeps one per run) serves rebuilds: same model bytes, no second search."""
    from hago_py.quant import embedding as E

    m = emb_model(table(v=300, d=32))
    cache = {}
    a, _ = quantize_embeddings(m, "rowwise", 4, cache=cache)
    assert list(cache) == [("W", "rowwise", 4, "row", True, True, 0)]

    def no_second_search(*args, **kw):
        raise AssertionError("the table was quantized again")

    monkeypatch.setattr(E, "rowwise_quantize", no_second_search)
    b, _ = quantize_embeddings(m, "rowwise", 4, cache=cache)
    assert a.SerializeToString() == b.SerializeToString()
    with pytest.raises(AssertionError, match="quantized again"):
        quantize_embeddings(m, "rowwise", 4)
