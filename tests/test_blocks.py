"""Block discovery (hago_py.ir.blocks): dominator-based single-entry single-exit regions. No torch needed."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago_py.errors import ModelError
from hago_py.ir import prepare
from hago_py.ir.blocks import describe, find_blocks, shape_only_tensors
from hago_py.quant.annotate import WEIGHTED_OPS

from models import small_cnn, small_transformer_mlp

BENCH = Path(os.environ.get("HAGO_BENCH_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "bench"))


def _i(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _model(nodes, inputs, outputs, inits, name="m"):
    g = helper.make_graph(nodes, name, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def tiny_transformer(seed: int = 0, d: int = 16, h: int = 32, mask: bool = False) -> onnx.ModelProto:
    """x [B,S,d] -> LN -> MatMul+Add -> Relu -> MatMul+Add -> Add(x) -> LN -> MatMul+Add.

    With ``mask``: a second input mask [B,S] (int64) becomes an additive float mask (side input) used by
    the first sub-layer and, through a Shape -> Reshape, the head: a second pre-LN residual sub-layer."""
    rng = np.random.default_rng(seed)

    def f(*s, sc=0.3):
        return rng.normal(0, sc, s).astype(np.float32)

    inits = [_i("g0", 1 + f(d, sc=0.1)), _i("b0", f(d, sc=0.1)), _i("w1", f(d, h)), _i("c1", f(h, sc=0.1)),
             _i("w2", f(h, d)), _i("c2", f(d, sc=0.1)), _i("g1", 1 + f(d, sc=0.1)), _i("b1", f(d, sc=0.1)),
             _i("w3", f(d, d)), _i("c3", f(d, sc=0.1))]
    N = helper.make_node
    nodes = [N("LayerNormalization", ["input", "g0", "b0"], ["ln0"], name="ln0", axis=-1),
             N("MatMul", ["ln0", "w1"], ["m1"], name="fc1"), N("Add", ["m1", "c1"], ["a1"], name="fc1_bias"),
             N("Relu", ["a1"], ["r1"], name="relu"),
             N("MatMul", ["r1", "w2"], ["m2"], name="fc2"), N("Add", ["m2", "c2"], ["a2"], name="fc2_bias")]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "S", d])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]))
        inits += [_i("ax2", np.array([2], np.int64)), _i("one", np.array(1.0, np.float32)),
                  _i("big", np.array(-3.0, np.float32)), _i("w4", f(d, d)), _i("minus1", np.array([-1], np.int64))]
        nodes += [N("Unsqueeze", ["mask", "ax2"], ["mu"], name="mask_unsqueeze"),
                  N("Cast", ["mu"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
                  N("Sub", ["one", "mf"], ["mi"], name="mask_invert"),
                  N("Mul", ["mi", "big"], ["madd"], name="mask_scale"),
                  N("Add", ["a2", "madd"], ["a2m"], name="apply_mask"),
                  N("Add", ["a2m", "input"], ["res"], name="residual"),
                  # second sub-layer: pre-LN, reshaped through a Shape computation, masked again
                  N("LayerNormalization", ["res", "g1", "b1"], ["ln1"], name="ln1", axis=-1),
                  N("Shape", ["ln1"], ["sh"], name="shape"),
                  N("MatMul", ["ln1", "w4"], ["m4"], name="fc4"),
                  N("Reshape", ["m4", "minus1"], ["flat"], name="flatten_all"),
                  N("Reshape", ["flat", "sh"], ["m4r"], name="unflatten"),
                  N("Add", ["m4r", "madd"], ["m4m"], name="apply_mask2"),
                  N("Add", ["m4m", "res"], ["res2"], name="residual2"),
                  N("MatMul", ["res2", "w3"], ["m3"], name="head"),
                  N("Add", ["m3", "c3"], ["output"], name="head_bias")]
    else:
        nodes += [N("Add", ["a2", "input"], ["res"], name="residual"),
                  N("LayerNormalization", ["res", "g1", "b1"], ["ln1"], name="ln1", axis=-1),
                  N("MatMul", ["ln1", "w3"], ["m3"], name="head"), N("Add", ["m3", "c3"], ["output"], name="head_bias")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "S", d])], inits,
                  "tiny_transformer")


def conv_chain(n_layers: int = 5, seed: int = 0) -> onnx.ModelProto:
    """A plain chain Conv+Relu x n (no residual): grouped into blocks of at most a few layers."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for k in range(n_layers):
        inits += [_i(f"w{k}", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)),
                  _i(f"b{k}", np.zeros(4, np.float32))]
        nodes += [helper.make_node("Conv", [x, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}")]
        x = f"r{k}"
    nodes[-1].output[0] = "output"
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 6, 6])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 6, 6])], inits, "chain")


def weighted_layers(model):
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits]


def check_partition(model, blocks, layers):
    names = [n.name for n in model.graph.node]
    pos = {nm: k for k, nm in enumerate(names)}
    seen = [lay for b in blocks for lay in b.layers]
    assert sorted(seen) == sorted(layers) and len(seen) == len(set(seen))       # each layer exactly once
    nodes = [nm for b in blocks for nm in b.nodes]
    assert len(nodes) == len(set(nodes))                                         # blocks are disjoint
    assert sorted(nodes) == sorted(names)                                        # ... and cover the graph
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for nm in nodes:                                  # blocks in order, nodes in order: a topological order
        node = model.graph.node[pos[nm]]
        assert all(t in known for t in node.input), nm
        known.update(node.output)
    produced = {}
    for b in blocks:
        assert b.nodes == sorted(b.nodes, key=pos.get)
        assert b.output == b.outputs[0]
        for nm in b.nodes:
            for o in model.graph.node[pos[nm]].output:
                produced[o] = b.name
        assert produced.get(b.output) == b.name


def test_residual_cnn_blocks():
    p, _ = prepare(small_cnn())
    blocks = find_blocks(p, weighted_layers(p))
    check_partition(p, blocks, weighted_layers(p))
    assert [b.layers for b in blocks] == [["conv1"], ["conv2"], ["fc"]]
    b0, b1, b2 = blocks
    assert b0.nodes == ["conv1", "relu1"] and b0.inputs == ["input"] and b0.output == "r1"
    # the residual region: from the fork tensor r1 to the Add that joins it, plus the ReLU after it
    assert b1.kind == "region" and b1.nodes == ["conv2", "add", "relu2"] and b1.inputs == ["r1"] and b1.output == "r2"
    # pooling / flatten change the shape: they go with the classifier, not with the residual block
    assert b2.nodes == ["gap", "flatten", "fc"] and b2.output == "output"
    assert len(describe(blocks)) == 3


def test_transformer_layer_blocks():
    p, _ = prepare(tiny_transformer())
    blocks = find_blocks(p, weighted_layers(p))
    check_partition(p, blocks, weighted_layers(p))
    assert len(blocks) == 2
    # from the graph input (a fork: LayerNorm and the residual Add) to the next LayerNorm output
    assert blocks[0].kind == "region" and blocks[0].layers == ["fc1", "fc2"]
    assert blocks[0].nodes[0] == "ln0" and blocks[0].nodes[-2:] == ["residual", "ln1"] and blocks[0].output == "ln1"
    assert blocks[1].layers == ["head"] and blocks[1].inputs == ["ln1"]


def test_side_inputs_do_not_merge_blocks():
    """An attention-mask-like side input used by every sub-layer and a Shape -> Reshape inside a sub-layer
    must not turn the model into one region."""
    m = tiny_transformer(mask=True)
    blocks = find_blocks(m, weighted_layers(m))
    check_partition(m, blocks, weighted_layers(m))
    assert [b.layers for b in blocks] == [["fc1", "fc2"], ["fc4"], ["head"]]
    b0, b1, _ = blocks
    assert b0.output == "res" and "madd" in b0.outputs            # the mask leaves the block that computes it
    assert "mask_cast" in b0.nodes                                 # side nodes join their first consumer's block
    assert b1.kind == "region" and b1.output == "res2" and "madd" in b1.inputs and "shape" in b1.nodes
    shape_only = shape_only_tensors(m)
    assert "sh" in shape_only and "madd" not in shape_only and "ln1" not in shape_only


def test_chain_grouping():
    m = conv_chain(5)
    layers = weighted_layers(m)
    blocks = find_blocks(m, layers)
    check_partition(m, blocks, layers)
    assert [len(b.layers) for b in blocks] == [3, 2]
    assert all(b.kind == "chain" for b in blocks)
    assert blocks[0].output == "r2"                                 # the activation stays with its conv
    assert [len(b.layers) for b in find_blocks(m, layers, max_chain_layers=2)] == [2, 2, 1]
    assert [len(b.layers) for b in find_blocks(m, layers, max_chain_layers=1)] == [1] * 5
    # only some layers asked for: the others are plain nodes inside blocks
    sub = find_blocks(m, ["conv1", "conv3"])
    assert [b.layers for b in sub] == [["conv1", "conv3"]]


def test_mlp_and_errors():
    m = small_transformer_mlp()
    blocks = find_blocks(m, ["mm1", "mm2"])
    assert [b.layers for b in blocks] == [["mm1", "mm2"]] and blocks[0].output == "output"
    assert find_blocks(m, []) == []
    with pytest.raises(ModelError, match="nope"):
        find_blocks(m, ["mm1", "nope"])


@pytest.mark.skipif(not (BENCH / "models").is_dir(), reason="benchmark corpus not available (HAGO_BENCH_DATA)")
def test_corpus_models_blocks():
    from hago_py.ir import load_model

    expected = {"resnet20_cifar10": (11, 20), "efficientnet_lite0": (17, 50), "minilm_l6": (12, 36)}
    for name, (n_blocks, n_layers) in expected.items():
        p, _ = prepare(load_model(BENCH / "models" / f"{name}.onnx"))
        layers = weighted_layers(p)
        blocks = find_blocks(p, layers)
        check_partition(p, blocks, layers)
        assert (len(blocks), len(layers)) == (n_blocks, n_layers), name
        if name == "resnet20_cifar10":
            assert [len(b.layers) for b in blocks] == [1] + [2] * 9 + [1]
            assert all(b.kind == "region" for b in blocks[1:-1])
        if name == "minilm_l6":   # attention sub-layer (q, k, v, out) and FFN sub-layer, per encoder layer
            assert [len(b.layers) for b in blocks] == [4, 2] * 6
            assert all(b.output.endswith("LayerNormalization_output_0") or b.output == "last_hidden_state"
                       for b in blocks)
