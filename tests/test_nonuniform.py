"""weight_scheme="nonuniform": 3-4 bit non-uniform levels on the per-channel INT8 grid, stored as packed 4-bit (or
3-bit) indices + an int8 codebook, expanded by constant-foldable ONNX ops that ORT folds and fuses into int8
kernels."""
import copy
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago_py
from hago_py.errors import OptionError
from hago_py.pipeline import Pipeline
from hago_py.quant import codebook
from hago_py.quant.artifact import optimized_graph
from hago_py.quant.codebook import CodebookWriter, codebook_bytes, pack, unpack
from hago_py.quant import nonuniform as numod
from hago_py.quant.nonuniform import (allocate_steps, channel_levels, cov_error, quantize_nonuniform, refine_levels,
                                      uniform_nearest)
from hago_py.quant.options import QuantOptions
from hago_py.quant.plan import QuantPlan, TensorQuant
from hago_py.quant.weights import quantize_weight

from models import checked_model, run

FAST = dict(measure_latency=False)


def _i(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def nu_cnn(seed: int = 0) -> onnx.ModelProto:
    """input [N,16,8,8] -> convA 3x3 16->64 (K=144) + Relu -> dw 3x3 depthwise (K=9) + Relu
    -> GlobalAveragePool -> Flatten -> fc Gemm 64->48 (transB, K=64)."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.1, (64, 16, 3, 3)).astype(np.float32)
    wd = rng.normal(0, 0.3, (64, 1, 3, 3)).astype(np.float32)
    wf = rng.laplace(0, 0.1, (48, 64)).astype(np.float32)
    N = helper.make_node
    nodes = [N("Conv", ["input", "wa", "ba"], ["ca"], name="convA", pads=[1, 1, 1, 1]),
             N("Relu", ["ca"], ["ra"], name="reluA"),
             N("Conv", ["ra", "wd", "bd"], ["cd"], name="dw", pads=[1, 1, 1, 1], group=64),
             N("Relu", ["cd"], ["rd"], name="reluD"),
             N("GlobalAveragePool", ["rd"], ["g"], name="gap"),
             N("Flatten", ["g"], ["f"], name="flat"),
             N("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1)]
    inits = [_i("wa", wa), _i("ba", rng.normal(0, 0.1, 64).astype(np.float32)), _i("wd", wd),
             _i("bd", rng.normal(0, 0.1, 64).astype(np.float32)), _i("wf", wf),
             _i("bf", rng.normal(0, 0.1, 48).astype(np.float32))]
    return checked_model(nodes, inits, "nu_cnn", ["N", 16, 8, 8], ["N", 48])


def nu_mlp(seed: int = 0) -> onnx.ModelProto:
    """input [B,S,64] -> MatMul 64x64 (+Add): a dynamic-activation MatMul with a [K, N] weight."""
    rng = np.random.default_rng(seed)
    N = helper.make_node
    nodes = [N("MatMul", ["input", "w"], ["m"], name="mm"), N("Add", ["m", "b"], ["output"], name="add")]
    g = helper.make_graph(nodes, "nu_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "S", 64])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "S", 64])],
                          [_i("w", rng.normal(0, 0.2, (64, 64)).astype(np.float32)),
                           _i("b", rng.normal(0, 0.1, 64).astype(np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def calib(n=32, shape=(16, 8, 8), seed=1):
    return {"input": np.random.default_rng(seed).normal(0, 1, (n,) + shape).astype(np.float32)}


@pytest.fixture(scope="module")
def cnn_runs():
    m = nu_cnn()
    return {"w8": hago_py.quantize(m, calib(), "x86_avx2", **FAST),
            "w4": hago_py.quantize(m, calib(), "x86_avx2", weight_scheme="nonuniform", weight_bits=4, **FAST),
            "w3": hago_py.quantize(m, calib(), "x86_avx2", weight_scheme="nonuniform", weight_bits=3, **FAST)}


# -- the math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 3])
def test_levels_on_int8_grid(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (16, 32, 3, 3)).astype(np.float32)
    for qbits, qmax in ((8, 127), (7, 63)):  # plain int8 and reduce_range
        tq = TensorQuant("w", role="weight", dtype="int8", bits=qbits, symmetric=True, narrow=True,
                         granularity="per_channel", axis=0, mode="constant", method="nearest",
                         scheme="nonuniform", levels_bits=bits)
        q = quantize_weight(w, tq)
        s = np.asarray(tq.scale)
        np.testing.assert_allclose(s, np.abs(w).reshape(16, -1).max(1) / qmax, rtol=1e-6)  # the int8 grid's scale
        assert q.dtype == np.int64 and q.shape == w.shape and np.abs(q).max() <= qmax
        per_ch = [np.unique(q[c]).size for c in range(16)]
        assert max(per_ch) <= 2 ** bits and min(per_ch) >= 2 ** bits - 3  # uses (nearly) all its levels
        assert tq.levels["levels_per_channel_max"] == max(per_ch)


def test_allocation_follows_population_and_range():
    # same range, more weights -> more steps; same population, wider range -> more steps
    s = allocate_steps([1000, 10, 10], [1.0, 1.0, 1.0], 16)
    assert s.sum() == 16 and s[0] > s[1] and s.min() >= 1
    s = allocate_steps([50, 50], [1.0, 8.0], 16)
    assert s.sum() == 16 and s[1] > s[0]
    assert list(allocate_steps([8, 1, 1], [1.0, 0.0, 0.0], 8)) == [6, 1, 1]  # at least one level each
    # constructed channel: a dense centre (1000 weights in [-10, 10]) and two sparse tails (20 in [60, 120]):
    # the centre gets most of the 16 levels; without Lloyd the levels are uniform inside each cluster
    rng = np.random.default_rng(0)
    u = np.concatenate([rng.uniform(-10, 10, 1000), rng.uniform(60, 120, 20), -rng.uniform(60, 120, 20)])
    lv, refined, k = channel_levels(u, 4, -127, 127, clusters=3, lloyd_iters=0)
    assert k == 3
    assert not refined and lv.size <= 16
    centre = np.sum(np.abs(lv) <= 10)
    assert centre > np.sum(lv > 10) and centre > np.sum(lv < -10) and np.sum(lv > 10) >= 1


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_nonuniform_error_below_uniform_w4(dist):
    rng = np.random.default_rng(3)
    w = getattr(rng, dist)(0, 0.1, (32, 288)).astype(np.float32)
    s = np.abs(w).max(1) / 127
    for bits in (4, 3):
        q, info = quantize_nonuniform(w, s, np.zeros(32, np.int64), -127, 127, 0, bits)
        nu = np.mean((q * s[:, None] - w) ** 2)
        uni = np.mean((uniform_nearest(w, bits, 0) - w) ** 2)
        assert nu < 0.7 * uni, (dist, bits, nu, uni)
        q0, _ = quantize_nonuniform(w, s, np.zeros(32, np.int64), -127, 127, 0, bits, lloyd_iters=0)
        assert nu <= np.mean((q0 * s[:, None] - w) ** 2)  # Lloyd is kept only where it helps


def _correlated(k, n=2000, seed=5):
    """E[x x^T] of correlated, non-zero-mean inputs (a ReLU of mixed Gaussians) and the rows themselves."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(0, 1, (n, k)) @ rng.normal(0, 0.5, (k, k)) + 0.3, 0)
    return x.T @ x / n, x


def test_covariance_refinement_never_worse_and_on_grid():
    """refine_levels: integer levels within [qmin, qmax], no more than it started with, and the full output error
    (u - L[nearest])^T H (u - L[nearest]) never above the start's; on correlated inputs it is lower for most
    channels (the diagonal importance ignores the correlations and the mean shift)."""
    H, _ = _correlated(72)
    rng = np.random.default_rng(6)
    lower = 0
    for i in range(12):
        u = rng.laplace(0, 25, 72)
        u = np.clip(u * 127 / np.abs(u).max(), -127, 127)
        lv, _, _ = channel_levels(u, 4, -127, 127, importance=np.diag(H))
        ref = refine_levels(u, lv, H, -127, 127)
        assert ref.dtype.kind == "i" and np.all(np.diff(ref) > 0) and ref.min() >= -127 and ref.max() <= 127
        assert ref.size <= lv.size
        assert cov_error(u, ref, H) <= cov_error(u, lv, H) + 1e-9
        lower += cov_error(u, ref, H) < 0.98 * cov_error(u, lv, H)
    assert lower >= 6, lower


def test_batched_refinement_equals_one_channel_at_a_time(monkeypatch):
    """refine_levels_batch over many channels (in chunks, channels leaving the batch as they converge) gives
    every channel exactly what it gets alone, and errors equal to cov_error of the returned levels."""
    H, _ = _correlated(40, seed=9)
    rng = np.random.default_rng(10)
    U = np.clip(rng.laplace(0, 30, (11, 40)), -127, 127)
    LV = np.stack([numod._pad_levels(channel_levels(u, 3, -127, 127, importance=np.diag(H))[0], 8) for u in U])
    monkeypatch.setattr(numod, "_BATCH_ELEMENTS", 40 * 8 * 4)          # chunks of 4 channels
    L, E = numod.refine_levels_batch(U, LV, H, -127, 127)
    for i in range(len(U)):
        Li, Ei = numod.refine_levels_batch(U[i:i + 1], LV[i:i + 1], H, -127, 127)
        assert np.array_equal(L[i], Li[0]) and E[i] == pytest.approx(Ei[0])
        assert E[i] == pytest.approx(cov_error(U[i], L[i], H)) and E[i] <= cov_error(U[i], LV[i], H) + 1e-9


def test_covariance_lowers_the_layer_output_error(monkeypatch):
    """quantize_nonuniform with the layer's E[x x^T]: the output error on the very inputs is lower than with the
    diagonal importance alone; each channel still uses at most 16 values of its own INT8 grid; COV_ITERS = 0 or a
    covariance of the wrong size falls back to the diagonal result exactly."""
    H, x = _correlated(96)
    rng = np.random.default_rng(8)
    w = rng.normal(0, 0.1, (24, 96)).astype(np.float32)
    s = (np.abs(w).max(1) / 127).astype(np.float32)
    z = np.zeros(24, np.int64)
    imp = np.diag(H)[None]
    qd, _ = quantize_nonuniform(w, s, z, -127, 127, 0, 4, importance=imp)
    qc, info = quantize_nonuniform(w, s, z, -127, 127, 0, 4, importance=imp, covariance=H)
    assert info["covariance"] == "input E[x x^T]" and info["covariance_moved_channels"] > 0
    assert max(np.unique(r).size for r in qc) <= 16 and np.abs(qc).max() <= 127

    def out_err(q):
        return float(np.mean((x @ (w - q * s[:, None]).T) ** 2))

    assert out_err(qc) < 0.9 * out_err(qd), (out_err(qc), out_err(qd))
    q_bad, info_bad = quantize_nonuniform(w, s, z, -127, 127, 0, 4, importance=imp, covariance=H[:10, :10])
    assert np.array_equal(q_bad, qd) and "covariance" not in info_bad
    monkeypatch.setattr(numod, "COV_ITERS", 0)
    assert np.array_equal(quantize_nonuniform(w, s, z, -127, 127, 0, 4, importance=imp, covariance=H)[0], qd)


# -- the ONNX expansion --------------------------------------------------------------------------------
def _snapped(shape, axis, bits, seed=1, dtype=np.int8):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, shape).astype(np.float32)
    s = np.abs(np.moveaxis(w, axis, 0).reshape(shape[axis], -1)).max(1) / 127
    q, _ = quantize_nonuniform(w, s, np.zeros(shape[axis], np.int64), -127, 127, axis, bits)
    return (q + 128).astype(np.uint8) if dtype == np.uint8 else q.astype(dtype)


def _expand_in_ort(weights, opset=17):
    """weights: [(q, axis, bits)] -> (the writer's model proto, [ORT output of each expanded weight]), ORT with
    every optimization off (nothing folded)."""
    from hago_py.ir.names import NameAllocator

    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    ident = ir.Node("", "Identity", [x], name="id", num_outputs=1)
    ident.outputs[0].name, ident.outputs[0].shape, ident.outputs[0].type = "y", x.shape, x.type
    graph = ir.Graph([x], [ident.outputs[0]], nodes=[ident], opset_imports={"": opset}, name="g")
    writer = CodebookWriter(graph, NameAllocator.for_graph(graph))
    vals = []
    for i, (q, axis, bits) in enumerate(weights):
        val, storage = writer.weight(q, axis, bits, f"w{i}", force="codebook")
        assert storage == f"codebook{bits}" and val.producer() is None  # built by finish()
        vals.append(val)
    writer.finish()
    for val, (q, _, _) in zip(vals, weights):
        assert val.producer() is not None and val.name.endswith("_quantized")
        val.shape, val.type = ir.Shape(list(q.shape)), ir.TensorType(ir.DataType.from_numpy(q.dtype))
        graph.outputs.append(val)
    graph.sort()
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=8))
    onnx.checker.check_model(proto, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return proto, sess.run([v.name for v in vals], {"x": np.zeros(1, np.float32)})


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("shape,axis,bits", [((8, 5, 3, 3), 0, 4), ((64, 24), 1, 4), ((12, 7), 0, 3),
                                             ((12, 1), 0, 3), ((6, 3), 0, 3), ((9, 1, 3, 3), 0, 3),
                                             ((27, 10), 1, 3), ((5, 16, 2, 2), 0, 3), ((3, 40), 0, 3)])
def test_codebook_expansion_bit_exact_in_ort(shape, axis, bits, opset):
    """K = 1, 3, 7, 9, 27, 40, 45, 64: odd, below 8, not a multiple of 8 or of 4, and whole planes."""
    q8 = _snapped(shape, axis, bits)
    # numpy reference of the packing: nibbles at 4 bits, a 2-bit and a 1-bit plane at 3 bits
    moved = np.moveaxis(q8, axis, 0).reshape(shape[axis], -1)
    c, k = moved.shape
    planes, book = pack(moved, bits)
    per_byte = (2,) if bits == 4 else (4, 8)
    assert [p.shape for p in planes] == [(c, -(-k // n)) for n in per_byte] and book.shape == (c, 2 ** bits)
    assert all(p.dtype == np.uint8 for p in planes)
    assert sum(p.nbytes for p in planes) + book.nbytes == codebook_bytes(shape, axis, bits)[0]
    assert np.array_equal(unpack(planes, book, k), moved)
    # the ONNX chain, run by ORT with every optimization off
    proto, (out,) = _expand_in_ort([(q8, axis, bits)], opset)
    ops = Counter(n.op_type for n in proto.graph.node)
    need = {"Concat"} if bits == 4 else {"Reshape", "Mul", "Add"}
    assert {"BitShift", "GatherElements", "Cast"} | need <= set(ops) and "Split" not in ops  # a group of one
    assert ops["BitShift"] == (3 if bits == 4 else 4)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    names = ["w0_nu_index"] if bits == 4 else ["w0_nu_index2", "w0_nu_index1"]
    assert [n for n in inits if "_nu_index" in n] == names
    for n, p in zip(names, planes):  # the stored planes (3 bits: [C, 1, m], same bytes)
        assert inits[n].tobytes() == p.tobytes()
    assert out.dtype == np.int8 and np.array_equal(out, q8)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_equal_k_layers_share_one_chain_bit_exact(opset):
    """Layers with the same row length K, dtype and bits share one chain (indices and codebooks concatenated,
    Split after GatherElements; split sizes an attribute before opset 13, an input from 13); other K, another
    dtype or other bits get their own. Every expanded weight equals its int8 array bit for bit."""
    weights = [(_snapped((8, 5, 3, 3), 0, 4, 1), 0, 4),          # K=45 (odd: Slice)
               (_snapped((16, 5, 3, 3), 0, 4, 2), 0, 4),         # K=45
               (_snapped((45, 24), 1, 4, 3), 1, 4),              # [K, N] MatMul weight, K=45: Transpose
               (_snapped((12, 45), 0, 4, 4), 0, 4),              # [C, K] Gemm weight: the Split output itself
               (_snapped((6, 5, 3, 3), 0, 4, 5, np.uint8), 0, 4),  # K=45 but uint8: its own chain
               (_snapped((6, 5, 3, 3), 0, 3, 6), 0, 3),          # K=45 but 3 bits: its own chain ...
               (_snapped((45, 10), 1, 3, 10), 1, 3),             # ... shared with a 3-bit [K, N] weight
               (_snapped((10, 8, 3, 3), 0, 4, 7), 0, 4),         # K=72
               (_snapped((72, 20), 1, 4, 8), 1, 4),              # K=72, [K, N]
               (_snapped((12, 7), 0, 3, 9), 0, 3)]               # K=7, alone
    proto, outs = _expand_in_ort(weights, opset)
    for (q, _, _), out in zip(weights, outs):
        assert out.dtype == q.dtype and np.array_equal(out, q)
    ops = Counter(n.op_type for n in proto.graph.node)
    # 3 chains of 4 bits (3 BitShift each), 2 of 3 bits (4 each)
    assert ops["GatherElements"] == 5 and ops["BitShift"] == 17 and ops["Split"] == 3
    splits = [n for n in proto.graph.node if n.op_type == "Split"]
    sizes = sorted(len(n.output) for n in splits)
    assert sizes == [2, 2, 4]
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert sum(k.endswith("_nu_index") for k in inits) == 3
    assert sorted(k for k in inits if k.endswith(("_nu_index2", "_nu_index1"))) == \
        ["nu3_nu_index1", "nu3_nu_index2", "w9_nu_index1", "w9_nu_index2"]
    assert inits["nu3_nu_index2"].shape == (6 + 10, 1, 12) and inits["nu3_nu_index1"].shape == (16, 1, 6)
    big = next(n for n in splits if len(n.output) == 4)
    if opset >= 13:
        assert len(big.input) == 2 and list(inits[big.input[1]]) == [8, 16, 24, 12]
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in big.attribute}
        assert len(big.input) == 1 and list(attrs["split"]) == [8, 16, 24, 12]


def _dq_weight_inputs(model):
    return [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
            and any(n.output[0] == c.input[1] for c in model.graph.node if c.op_type in ("Conv", "Gemm"))]


@pytest.mark.parametrize("bits", [4, 3])
def test_realized_weights_exact_and_equal_to_plain_int8(monkeypatch, bits):
    pipe = Pipeline(nu_cnn(), calib(), "x86_avx2", QuantOptions.from_kwargs(weight_scheme="nonuniform",
                                                                              weight_bits=bits))
    built = pipe.build()
    assert built.plan.layers["convA"].weight.storage == f"codebook{bits}"
    assert "GatherElements" in {n.op_type for n in built.model.graph.node}
    # the same plan with plain int8 storage (the codebook never pays off): the reference snapped weights
    monkeypatch.setattr(codebook, "CHAIN_OVERHEAD", 10 ** 9)
    plain = pipe.build().model
    assert "GatherElements" not in {n.op_type for n in plain.graph.node}
    ref = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    # the expansion output (what DequantizeLinear reads), ORT with every optimization off: bit for bit
    names = _dq_weight_inputs(built.model)
    probe = copy.deepcopy(built.model)
    for n in names:
        probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.INT8, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outs = dict(zip(names, ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    .run(names, calib(n=1))))
    for w in ("wa", "wf"):
        got = next(v for k, v in outs.items() if k.startswith(w))
        assert got.dtype == np.int8 and np.array_equal(got, ref[f"{w}_quantized"])
        assert all(np.unique(got[c]).size <= 2 ** bits for c in range(got.shape[0]))
    # and the two models compute exactly the same outputs, fused and simulated
    x = calib(n=8, seed=5)
    for opt in ("all", "basic"):
        for a, b in zip(run(built.model, x, opt), run(plain, x, opt)):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("bits", [4, 3])
def test_fused_int8_kernels_no_gather_left(cnn_runs, bits):
    res = cnn_runs[f"w{bits}"]
    assert res.report["artifact_check"]["ok"], res.report["artifact_check"]["fallbacks"]
    if bits == 3:  # the 3-bit planes, really in the file
        assert {"wa_nu_index2", "wa_nu_index1"} <= {i.name for i in res.model.graph.initializer}
    ops = Counter(n.op_type for n in optimized_graph(res.model).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1
    assert not {"GatherElements", "BitShift", "Conv", "Gemm", "FusedConv", "Mul", "Add", "Reshape"} & set(ops)
    assert res.plan.layers["fc"].weight.storage == f"codebook{bits}"
    for lp in res.plan.quantized_layers():  # the kernel is the spec's int8 scheme, not simulated
        if lp.weight is not None:
            assert not lp.simulated and lp.weight.dtype == "int8" and lp.weight.bits in (7, 8)
            assert lp.weight.scheme == "nonuniform" and lp.weight.levels_bits == bits


def test_dynamic_matmul_codebook_fuses():
    res = hago_py.quantize(nu_mlp(), {"input": np.random.default_rng(0).normal(0, 1, (8, 4, 64)).astype(np.float32)},
                           "x86_avx2", weight_scheme="nonuniform", weight_bits=4, activation_mode="dynamic", **FAST)
    assert res.plan.layers["mm"].weight.storage == "codebook4"
    assert "GatherElements" in {n.op_type for n in res.model.graph.node}
    ops = Counter(n.op_type for n in optimized_graph(res.model).graph.node)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 1 and "GatherElements" not in ops
    assert res.report["artifact_check"]["ok"]


def test_file_smaller_than_w8(cnn_runs):
    w8 = len(cnn_runs["w8"].model.SerializeToString())
    w4 = len(cnn_runs["w4"].model.SerializeToString())
    assert w4 < 0.85 * w8, (w4, w8)  # scales, zero points and int32 biases weigh a lot in a model this small
    inits = {i.name: i.ByteSize() for i in cnn_runs["w4"].model.graph.initializer}
    w8_inits = {i.name: i.ByteSize() for i in cnn_runs["w8"].model.graph.initializer}
    assert inits["wa_nu_index"] + inits["wa_nu_codebook"] < 0.65 * w8_inits["wa_quantized"]  # K=144: 88 vs 144 B


def _codebook_payload(model) -> int:
    """Bytes of the index planes and codebooks of ``model`` (tensor data only)."""
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer
               if i.name.endswith(("_nu_index", "_nu_index2", "_nu_index1", "_nu_codebook")))


def test_3bit_storage_rule():
    """codebook_bytes counts 3-bit indices at 3 bits; a 3-bit chain costs more nodes, so the rule asks more."""
    assert codebook_bytes((10, 64), 0, 3) == (10 * (8 + 16 + 8), 640) and codebook_bytes((10, 64), 0, 4) == (480, 640)
    assert codebook_bytes((9, 1, 3, 3), 0, 3) == (9 * (8 + 3 + 2), 81)  # depthwise 3x3: never smaller
    assert not codebook.codebook_pays((10, 64), 0, 3)  # saves 320 B: less than a lone 3-bit chain (~810 B)
    assert codebook.codebook_pays((16, 64), 0, 3) and codebook.codebook_pays((64, 16, 3, 3), 0, 3)  # 512 B, 5 KB
    assert not codebook.codebook_pays((9, 1, 3, 3), 0, 3) and not codebook.codebook_pays((10, 64), 0, 4)


def test_w3_file_smaller_than_w4(cnn_runs):
    """3-bit indices take 3 bits (a 2-bit and a 1-bit plane, an 8-entry codebook): convA (C=64, K=144) and fc
    (C=48, K=64) are codebook-stored at both widths, the depthwise layer (K=9) is int8 at both."""
    w3, w4 = cnn_runs["w3"], cnn_runs["w4"]
    for res, bits in ((w3, 3), (w4, 4)):
        assert {lp.node: lp.weight.storage for lp in res.plan.quantized_layers() if lp.weight is not None} == \
            {"convA": f"codebook{bits}", "dw": "int8", "fc": f"codebook{bits}"}
    p3 = 64 * (8 + 144 // 4 + 144 // 8) + 48 * (8 + 64 // 4 + 64 // 8)  # C * (8 + ceil(K/4) + ceil(K/8))
    p4 = 64 * (16 + 144 // 2) + 48 * (16 + 64 // 2)                     # C * (16 + ceil(K/2))
    assert _codebook_payload(w3.model) == p3 == 5504 and _codebook_payload(w4.model) == p4 == 7936
    assert codebook_bytes((64, 16, 3, 3), 0, 3)[0] + codebook_bytes((48, 64), 0, 3)[0] == p3
    assert codebook_bytes((64, 16, 3, 3), 0, 4)[0] + codebook_bytes((48, 64), 0, 4)[0] == p4
    # the file shrinks by the payload difference less the 3-bit chains' extra nodes (2 chains x 6 nodes, ~250 B
    # each chain) and constants (~140 B)
    d = len(w4.model.SerializeToString()) - len(w3.model.SerializeToString())
    assert p4 - p3 - 900 < d < p4 - p3, (d, p4 - p3)


def test_per_layer_nonuniform_and_depthwise_int8_storage(cnn_runs):
    res = hago_py.quantize(nu_cnn(), calib(), "x86_avx2", layers={"convA": {"weight_scheme": "nonuniform"}}, **FAST)
    schemes = {lp.node: lp.weight.scheme for lp in res.plan.quantized_layers() if lp.weight is not None}
    assert schemes == {"convA": "nonuniform", "dw": "uniform", "fc": "uniform"}
    assert res.plan.layers["convA"].weight.levels_bits == 4
    rows = {r["node"]: r for r in hago_py.api.layer_rows(res.plan)}
    assert "non-uniform W4 (codebook4" in rows["convA"]["weight"] and "non-uniform" not in rows["fc"]["weight"]
    assert "non-uniform W4" in rows["convA"]["reason"]
    # depthwise 3x3 (K=9): the codebook is not smaller, so plain int8 storage and the full INT8 grid (restricted
    # levels would cost accuracy and save no byte)
    dw = cnn_runs["w4"].plan.layers["dw"].weight
    assert dw.scheme == "nonuniform" and dw.storage == "int8" and dw.levels == {"full_int8": True}
    rows4 = {r["node"]: r for r in hago_py.api.layer_rows(cnn_runs["w4"].plan)}
    assert "full INT8 grid" in rows4["dw"]["weight"]
    w8 = {lp.node: lp for lp in cnn_runs["w8"].plan.layers.values()}
    assert w8["dw"].weight.scale == dw.scale  # same grid as the uniform W8 layer
    # the plan records it and still loads without the new fields
    plan = QuantPlan.from_json(cnn_runs["w4"].plan.to_json())
    assert plan.layers["convA"].weight.storage == "codebook4" and plan.layers["convA"].weight.levels
    d = cnn_runs["w8"].plan.to_dict()
    for lp in d["layers"]:
        for k in ("scheme", "levels_bits", "storage", "levels"):
            (lp.get("weight") or {}).pop(k, None)
    assert QuantPlan.from_dict(d).layers["convA"].weight.scheme == "uniform"


@pytest.mark.parametrize("kw,name", [
    (dict(weight_scheme="nonuniform", weight_bits=5), "weight_bits"),
    (dict(weight_scheme="nonuniform", weight_bits=4, rounding="adaround"), "rounding"),
    (dict(weight_scheme="nonuniform", weight_bits=4, bn_reestimate=True), "bn_reestimate"),
    (dict(layers={"convA": {"weight_scheme": "nonuniform", "weight_bits": 8}}), "weight_bits"),
    (dict(layers={"convA": {"weight_scheme": "nonuniform", "rounding": "gptq"}}), "rounding"),
])
def test_option_errors(kw, name):
    with pytest.raises(OptionError, match=name) as e:
        QuantOptions.from_kwargs(**kw)
    assert "nonuniform" in str(e.value)


def test_bias_correction_is_mean_shift_and_labelled():
    res = hago_py.quantize(nu_cnn(), calib(), "x86_avx2", weight_scheme="nonuniform", weight_bits=4,
                           bias_correction=True, **FAST)
    notes = res.plan.layers["convA"].notes
    assert any("mean-shift" in n for n in notes), notes
    assert "rounding" not in res.report  # no reconstruction ran
    lv = res.plan.layers["convA"].weight.levels
    assert lv["importance"] == "input E[x^2]" and sum(lv["clusters_used"].values()) == 64


# -- one chain per group of equal-K layers, through realize ----------------------------------------------
def nu_deep(seed: int = 0) -> onnx.ModelProto:
    """input [N,16,8,8] -> cA 16->32 (K=144) -> cB 32->32, cC 32->32, cD 32->16 (K=288 each) -> cE 16->13 (K=144)
    -> cF 13->64 (K=117, odd) -> GlobalAveragePool -> Flatten -> fc Gemm 64->48 (transB, K=64); 3x3 convs, Relu."""
    rng = np.random.default_rng(seed)
    N = helper.make_node
    convs = [("cA", 16, 32), ("cB", 32, 32), ("cC", 32, 32), ("cD", 32, 16), ("cE", 16, 13), ("cF", 13, 64)]
    nodes, inits, x = [], [], "input"
    for name, cin, cout in convs:
        inits += [_i(f"{name}_w", rng.normal(0, 1 / np.sqrt(9 * cin), (cout, cin, 3, 3)).astype(np.float32)),
                  _i(f"{name}_b", rng.normal(0, 0.1, cout).astype(np.float32))]
        nodes += [N("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name, pads=[1, 1, 1, 1]),
                  N("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu")]
        x = f"{name}_r"
    nodes += [N("GlobalAveragePool", [x], ["g"], name="gap"), N("Flatten", ["g"], ["f"], name="flat"),
              N("Gemm", ["f", "fc_w", "fc_b"], ["output"], name="fc", transB=1)]
    inits += [_i("fc_w", rng.laplace(0, 0.1, (48, 64)).astype(np.float32)),
              _i("fc_b", rng.normal(0, 0.1, 48).astype(np.float32))]
    return checked_model(nodes, inits, "nu_deep", ["N", 16, 8, 8], ["N", 48])


def nu_mlp_deep(seed: int = 0) -> onnx.ModelProto:
    """input [B,S,64] -> MatMul 64x64, 64x64, 64x63, 63x64: dynamic MatMuls with [K, N] weights, three with K=64
    and one with K=63 (odd)."""
    rng = np.random.default_rng(seed)
    N = helper.make_node
    dims = [(64, 64), (64, 64), (64, 63), (63, 64)]
    nodes, inits, x = [], [], "input"
    for i, (k, n) in enumerate(dims):
        out = "output" if i == len(dims) - 1 else f"m{i}"
        nodes.append(N("MatMul", [x, f"w{i}"], [out], name=f"mm{i}"))
        inits.append(_i(f"w{i}", rng.normal(0, 1 / np.sqrt(k), (k, n)).astype(np.float32)))
        x = out
    g = helper.make_graph(nodes, "nu_mlp_deep",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "S", 64])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "S", 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _expanded_weights(model, names):
    """The named values of ``model`` computed by ORT with every optimization off."""
    probe = copy.deepcopy(model)
    inp = probe.graph.input[0]
    dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    for n in names:
        probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.INT8, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {inp.name: np.zeros(dims, np.float32)})))


def _grouped_vs_plain(monkeypatch, model, calibration, bits=4, **kw):
    pipe = Pipeline(model, calibration, "x86_avx2", QuantOptions.from_kwargs(weight_scheme="nonuniform",
                                                                              weight_bits=bits, **kw))
    built = pipe.build()
    storage = {lp.node: lp.weight.storage for lp in built.plan.quantized_layers() if lp.weight is not None}
    with monkeypatch.context() as mp:
        mp.setattr(codebook, "SHARE_CHAINS", False)
        per_layer = pipe.build().model
    with monkeypatch.context() as mp:
        mp.setattr(codebook, "CHAIN_OVERHEAD", 10 ** 9)
        plain = pipe.build().model
    return built, storage, per_layer, plain


@pytest.mark.parametrize("bits", [4, 3])
def test_equal_k_layers_grouped_through_realize(monkeypatch, bits):
    built, storage, per_layer, plain = _grouped_vs_plain(monkeypatch, nu_deep(), calib(), bits)
    assert storage == dict.fromkeys(("cA", "cB", "cC", "cD", "cE", "cF", "fc"), f"codebook{bits}")
    ops = Counter(n.op_type for n in built.model.graph.node)
    # groups: K=144 {cA, cE}, K=288 {cB, cC, cD}, K=117 {cF}, K=64 {fc}: 4 chains, 2 of them split
    assert ops["GatherElements"] == 4 and ops["Split"] == 2 and ops["BitShift"] == (12 if bits == 4 else 16)
    assert Counter(n.op_type for n in per_layer.graph.node)["GatherElements"] == 7
    # bit for bit the int8 weights of the plain model (same plan, int8 initializers)
    ref = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer if i.name.endswith("_w_quantized")}
    assert len(ref) == 7
    got = _expanded_weights(built.model, sorted(ref))
    for name, q in ref.items():
        assert got[name].dtype == np.int8 and np.array_equal(got[name], q), name
    # the same outputs, fused and simulated
    x = calib(n=8, seed=5)
    for opt in ("all", "basic"):
        for a, b in zip(run(built.model, x, opt), run(plain, x, opt)):
            assert np.array_equal(a, b)
    # ORT folds the chains (Split included) and fuses the int8 kernels
    fused = Counter(n.op_type for n in optimized_graph(built.model).graph.node)
    assert fused["QLinearConv"] == 6 and fused["QGemm"] == 1
    assert not {"GatherElements", "BitShift", "Split", "Concat", "Slice", "Conv", "Gemm"} & set(fused), fused
    # one chain for 3 (and 2) equal-K layers instead of one each: a smaller file
    size, size_per_layer = built.model.ByteSize(), per_layer.ByteSize()
    assert size < size_per_layer - 700, (size, size_per_layer)
    nodes = sum(n.ByteSize() for n in built.model.graph.node)
    nodes_per_layer = sum(n.ByteSize() for n in per_layer.graph.node)
    assert nodes < nodes_per_layer - 700, (nodes, nodes_per_layer)


def test_equal_k_dynamic_matmuls_grouped(monkeypatch):
    cal = {"input": np.random.default_rng(0).normal(0, 1, (8, 4, 64)).astype(np.float32)}
    built, storage, per_layer, plain = _grouped_vs_plain(monkeypatch, nu_mlp_deep(), cal, activation_mode="dynamic")
    assert storage == {f"mm{i}": "codebook4" for i in range(4)}
    ops = Counter(n.op_type for n in built.model.graph.node)
    assert ops["GatherElements"] == 2 and ops["Split"] == 1 and ops["Transpose"] == 4  # K=64 x3, K=63
    ref = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer if i.name.endswith("_quantized")
           and i.name.startswith("w")}
    assert len(ref) == 4
    got = _expanded_weights(built.model, sorted(ref))
    for name, q in ref.items():
        assert got[name].dtype == np.int8 and np.array_equal(got[name], q), name
    x = {"input": np.random.default_rng(3).normal(0, 1, (2, 4, 64)).astype(np.float32)}
    for opt in ("all", "basic"):
        for a, b in zip(run(built.model, x, opt), run(plain, x, opt)):
            assert np.array_equal(a, b)
    fused = Counter(n.op_type for n in optimized_graph(built.model).graph.node)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] + fused["MatMulInteger"] == 4, fused
    assert not {"GatherElements", "BitShift", "Split", "Transpose"} & set(fused), fused
    assert built.model.ByteSize() < per_layer.ByteSize()
