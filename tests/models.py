"""Tiny ONNX models built in code for the tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def small_cnn(seed: int = 0, opset: int = 17, with_bn: bool = False, with_pad: bool = False) -> onnx.ModelProto:
    """input [N,3,8,8] -> Conv+Relu -> Conv -> Add(residual) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 8).astype(np.float32)
    wf = rng.normal(0, 0.3, (4, 8)).astype(np.float32)
    bf = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes, inits = [], [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2), _init("wf", wf),
                        _init("bf", bf)]
    x = "input"
    if with_pad:
        inits.append(_init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
        nodes.append(helper.make_node("Pad", ["input", "pads"], ["padded"], name="pad0"))
        x = "padded"
        nodes.append(helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[0, 0, 0, 0]))
    else:
        nodes.append(helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    c1 = "c1"
    if with_bn:
        inits += [_init("g", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
                  _init("be", rng.normal(0, 0.1, 8).astype(np.float32)),
                  _init("mu", rng.normal(0, 0.1, 8).astype(np.float32)),
                  _init("var", rng.uniform(0.5, 2, 8).astype(np.float32))]
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn1"], name="bn1"))
        c1 = "bn1"
    nodes += [
        helper.make_node("Relu", [c1], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g1"], name="gap"),
        helper.make_node("Flatten", ["g1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1),
    ]
    return checked_model(nodes, inits, "small_cnn", ["N", 3, 8, 8], ["N", 4], opset)


def small_transformer_mlp(seed: int = 0) -> onnx.ModelProto:
    """input [B,S,16] -> MatMul+Add -> Relu -> MatMul+Add (token activations: rank-3 MatMuls)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 16)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 16).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["output"], name="add2"),
    ]
    return token_model(nodes, [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)], "mlp", 16)


def checked_model(nodes, inits, name: str, in_shape, out_shape, opset: int = 17) -> onnx.ModelProto:
    """A checked model from ``nodes``: float graph input ``input`` and output ``output`` of these shapes."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def token_model(nodes, inits, name: str, d: int) -> onnx.ModelProto:
    """A checked opset-17 model from ``nodes``: graph input ``input`` and output ``output``, both [B, S, d]."""
    return checked_model(nodes, inits, name, ["B", "S", d], ["B", "S", d])


def residual_layernorm(seed: int = 0, d: int = 32) -> onnx.ModelProto:
    """input [B,S,d] -> MatMul -> Reshape(flat) -> Reshape(Shape(input)) -> Add bias -> Add(input) ->
    LayerNormalization: the post-LN residual of a BERT layer, with the head reshapes whose shapes only a
    data-propagating shape inference recovers."""
    rng = np.random.default_rng(seed)
    N = helper.make_node
    nodes = [N("MatMul", ["input", "w"], ["m"], name="proj"), N("Shape", ["input"], ["sh"], name="shape"),
             N("Reshape", ["m", "minus1"], ["flat"], name="flatten"),
             N("Reshape", ["flat", "sh"], ["mr"], name="unflatten"),
             N("Add", ["mr", "b"], ["a"], name="proj_bias"),
             N("Add", ["a", "input"], ["r"], name="residual"),
             N("LayerNormalization", ["r", "gamma", "beta"], ["output"], name="ln", axis=-1)]
    inits = [_init("w", rng.normal(0, 0.3, (d, d)).astype(np.float32)),
             _init("b", rng.normal(0, 0.1, d).astype(np.float32)),
             _init("gamma", (1 + rng.normal(0, 0.1, d)).astype(np.float32)),
             _init("beta", rng.normal(0, 0.1, d).astype(np.float32)), _init("minus1", np.array([-1], np.int64))]
    return token_model(nodes, inits, "residual_ln", d)


def calib(seed: int = 1, n: int = 32, shape=(3, 8, 8)) -> dict:
    return {"input": np.random.default_rng(seed).normal(0, 1, (n,) + tuple(shape)).astype(np.float32)}


def run(model, feeds, optimization="all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization == "all"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def sqnr(ref, test) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - test) ** 2), 1e-30)))


def conv_int(xq, w, zx, pads, strides, groups, dilation=(1, 1)):
    """int64 NCHW convolution of (xq - zx) (padding with the zero point, i.e. 0 after the shift) and OIHW w."""
    x = np.pad(xq.astype(np.int64) - zx, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    og = o // groups
    for gi in range(groups):
        xs = x[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * og:(gi + 1) * og].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation[0]: i * dilation[0] + strides[0] * (oh - 1) + 1: strides[0],
                           j * dilation[1]: j * dilation[1] + strides[1] * (ow - 1) + 1: strides[1]]
                out[:, gi * og:(gi + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def with_bias_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a realized model in the old int32-bias form: every DequantizeLinear of an int32 initializer
    without a zero point gets an explicit all-zero int32 one of the bias's shape (what realize wrote before)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        src = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if src is None or src.data_type != onnx.TensorProto.INT32 or (len(n.input) > 2 and n.input[2]):
            continue
        z = numpy_helper.from_array(np.zeros(tuple(src.dims), np.int32), f"{n.input[0]}_zero_point_legacy")
        m.graph.initializer.append(z)
        del n.input[2:]
        n.input.append(z.name)
    return m
