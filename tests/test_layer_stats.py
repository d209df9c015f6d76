"""Layer statistics for layer-wise rounding: the grouped weight times the im2col rows must reproduce the
layer's real output (ORT), for every conv geometry; statistics stream exactly; sub-models compute only
what is asked."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago_py.quant.layer_stats import LayerGeometry, StatsAccumulator, dynamic_fake_quant, sub_model

from models import run


def _conv_model(cin, cout, k, group, stride, pad, dil, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(cout, cin // group, k, k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, strides=[stride, stride],
                            pads=pad, dilations=[dil, dil], kernel_shape=[k, k])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, 9, 11])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return m, w, {"group": group, "strides": [stride, stride], "pads": pad, "dilations": [dil, dil]}


@pytest.mark.parametrize("cin,cout,k,group,stride,pad,dil", [
    (3, 4, 3, 1, 1, [1, 1, 1, 1], 1),
    (4, 6, 3, 2, 2, [1, 0, 0, 1], 1),      # grouped, strided, asymmetric pads
    (5, 5, 3, 5, 1, [2, 2, 2, 2], 2),      # depthwise, dilated
    (6, 12, 1, 6, 1, [0, 0, 0, 0], 1),     # depthwise with channel multiplier 2
    (4, 8, 1, 1, 1, [0, 0, 0, 0], 1),      # pointwise
])
def test_grouped_weight_times_rows_is_the_conv_output(cin, cout, k, group, stride, pad, dil):
    m, w, attrs = _conv_model(cin, cout, k, group, stride, pad, dil)
    x = np.random.default_rng(1).normal(size=(2, cin, 9, 11)).astype(np.float32)
    y = run(m, {"x": x})[0]                                  # N, O, Ho, Wo
    geo = LayerGeometry.of("conv", "Conv", attrs, w.shape)
    rows = geo.rows(x)                                       # G, R, K
    wg = geo.to_grouped(w)                                   # G, N, K
    out = np.einsum("gnk,grk->grn", wg, rows)                # G, R, N
    n, _, ho, wo = y.shape
    out = out.reshape(group, n, ho, wo, cout // group).transpose(1, 0, 4, 2, 3).reshape(n, cout, ho, wo)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(geo.from_grouped(wg), w)


@pytest.mark.parametrize("op,trans_b", [("MatMul", 0), ("Gemm", 0), ("Gemm", 1)])
def test_matmul_gemm_geometry(op, trans_b):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5) if not trans_b else (5, 6)).astype(np.float32)
    geo = LayerGeometry.of("fc", op, {"transB": trans_b} if op == "Gemm" else {}, w.shape)
    x = rng.normal(size=(2, 3, 6)).astype(np.float32)
    y = x @ (w.T if trans_b else w)
    out = geo.rows(x)[0] @ geo.to_grouped(w)[0].T
    np.testing.assert_allclose(out, y.reshape(-1, 5), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(geo.from_grouped(geo.to_grouped(w)), w)
    assert geo.channel_to_grouped(np.arange(5)).shape == (1, 5)


def test_stats_accumulate_in_chunks_exactly():
    rng = np.random.default_rng(0)
    xq, xf = rng.normal(size=(2, 1000, 7)).astype(np.float32), rng.normal(size=(2, 1000, 7)).astype(np.float32)
    acc = StatsAccumulator(2, 7)
    acc.add(xq[:, :300], xf[:, :300], chunk=128)
    acc.add(xq[:, 300:], xf[:, 300:], chunk=1000)
    q64, f64 = xq.astype(np.float64), xf.astype(np.float64)
    np.testing.assert_allclose(acc.h, np.einsum("grk,grl->gkl", q64, q64), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(acc.c, np.einsum("grk,grl->gkl", q64, f64), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(acc.g, np.einsum("grk,grl->gkl", f64, f64), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(acc.m_q, q64.sum(1), rtol=1e-5, atol=1e-3)
    assert acc.n == 1000


def test_dynamic_fake_quant_matches_dynamicquantizelinear():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32) * 3
    node_q = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    node_d = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    g = helper.make_graph([node_q, node_d], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    np.testing.assert_allclose(dynamic_fake_quant(x), run(m, {"x": x}, optimization="basic")[0], atol=1e-6)


def test_sub_model_keeps_only_what_outputs_need():
    from models import small_cnn

    m = small_cnn()
    mid = m.graph.node[1].output[0]  # relu1
    sm = sub_model(m, [mid])
    x = {m.graph.input[0].name: np.ones((1, 3, 8, 8), np.float32)}
    from hago_py.quant.calibrate import with_outputs

    full = run(with_outputs(m, [mid]), x)[-1]
    np.testing.assert_allclose(run(sm, x)[0], full, rtol=1e-6)
    assert [n.name for n in sm.graph.node] == [n.name for n in m.graph.node[:2]]
    assert [o.name for o in sm.graph.output] == [mid]
    assert {t.name for t in sm.graph.initializer} <= {i for n in sm.graph.node for i in n.input}


def test_frontier_advances_through_a_residual_block_like_a_full_run():
    """Reconstruction runs each model segment once, from the cached tensors of the previous cut; the values at
    every cut equal what the whole model computes (here through a skip connection)."""
    from models import small_cnn
    from hago_py.backends.ort import OrtBackend
    from hago_py.quant.calibrate import with_outputs
    from hago_py.quant.reconstruct import _Frontier, _liveness

    m = small_cnn()
    rng = np.random.default_rng(0)
    batches = [{"input": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    prod, last = _liveness(m)
    topo = {n.name: i for i, n in enumerate(m.graph.node)}
    front = _Frontier(OrtBackend(threads=1), batches)
    for layer, x in (("conv1", "input"), ("conv2", "r1"), ("fc", "f")):
        cut = topo[layer]
        live = [t for t, p in prod.items() if p < cut and last.get(t, -1) >= cut]
        vals = front.advance(m, [x] + live)
        assert set(front.cache[0]) <= {x, *live}  # nothing older is kept
        for b, v in zip(batches, vals):
            full = run(with_outputs(m, [x]), b)[-1] if x != "input" else b["input"]
            np.testing.assert_allclose(v[x], full, rtol=1e-5, atol=1e-6)
    assert live == ["f"] or set(live) <= {"f"}
    # sub_model with supplied inputs: the segment conv2 -> add -> relu2 starts from r1
    seg = sub_model(m, ["r2"], inputs={"r1": np.zeros((1, 8, 8, 8), np.float32)})
    assert [i.name for i in seg.graph.input] == ["r1"]
    assert [n.name for n in seg.graph.node] == ["conv2", "add", "relu2"]
