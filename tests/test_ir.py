import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hago_py.errors import ModelError, OutputError
from hago_py.ir import find_fusion_groups, load_model, prepare, save_model
from hago_py.ir.io import default_opset

from models import calib, run, small_cnn


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\xff")
    with pytest.raises(ModelError, match="bad.onnx"):
        load_model(bad)
    with pytest.raises(ModelError, match="directory"):
        load_model(tmp_path)


def test_checker_failure_is_model_error():
    m = small_cnn()
    m.graph.node[0].input[1] = "no_such_weight"
    with pytest.raises(ModelError, match="onnx.checker"):
        load_model(m)


def test_opset_upgrade_to_13():
    m = small_cnn(opset=11)
    out = load_model(m)
    assert default_opset(out) >= 13
    x = calib(n=2)
    np.testing.assert_allclose(run(out, x)[0], run(m, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"with_bn": True}, {"with_pad": True}])
def test_prepare_preserves_function(kw):
    m = small_cnn(**kw)
    out, changed = prepare(load_model(m))
    ops = [n.op_type for n in out.graph.node]
    if kw.get("with_bn"):
        assert "fold_batchnorm" in changed and "BatchNormalization" not in ops
    if kw.get("with_pad"):
        assert "fold_pad" in changed and "Pad" not in ops
    x = calib(n=4)
    np.testing.assert_allclose(run(out, x)[0], run(m, x)[0], rtol=1e-4, atol=1e-4)


def test_constant_folding_removes_shape_arithmetic():
    # Reshape target computed from Constant -> Concat: folded into one initializer
    nodes = [
        helper.make_node("Constant", [], ["c0"], value=helper.make_tensor("v0", TensorProto.INT64, [1], [-1])),
        helper.make_node("Constant", [], ["c1"], value=helper.make_tensor("v1", TensorProto.INT64, [1], [12])),
        helper.make_node("Concat", ["c0", "c1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, changed = prepare(load_model(m))
    assert "constant_folding" in changed
    assert [n.op_type for n in out.graph.node] == ["Reshape"]


def test_fusion_groups_follow_spec_patterns():
    m, _ = prepare(load_model(small_cnn()))
    groups = find_fusion_groups(m, [("Conv", "Relu"), ("Add", "Relu")], anchors=["Conv", "Add"])
    assert groups["conv1"].ops == ["Conv", "Relu"] and groups["conv1"].output == "r1"
    assert groups["conv2"].ops == ["Conv"]          # its output feeds Add, not a Relu
    assert groups["add"].ops == ["Add", "Relu"]


def test_save_is_atomic_and_errors_clearly(tmp_path):
    m = small_cnn()
    p = save_model(m, tmp_path / "m.onnx")
    assert onnx.load(str(p)).graph.name == "small_cnn"
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    with pytest.raises(OutputError, match="does not exist"):
        save_model(m, tmp_path / "nope" / "m.onnx")
