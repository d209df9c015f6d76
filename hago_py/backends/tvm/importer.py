"""QDQ ONNX -> Relax: fold constant subgraphs, then ``tvm.relax.frontend.onnx.from_onnx``.

``from_onnx`` rejects a Pad whose ``pads`` is computed ("Dynamic pads are not supported yet"), as torch exports
write it (Constant -> Cast / Concat / Reshape chains). :func:`fold_constants` evaluates every node whose inputs
are all constant with ONNX's reference evaluator and replaces it by initializers. QuantizeLinear /
DequantizeLinear stay (they are what the integer rewrites match) unless their output only feeds a Pad's
``pads`` / ``constant_value`` (directly or through other such Q/DQ nodes): the Q/DQ pair quantizing a Pad's
constant value is folded too. After import, QuantizeLinear / DequantizeLinear are ``relax.quantize`` /
``relax.dequantize`` (float fake-quant until ``integerize`` rewrites them). ``from_onnx`` does not import
QLinearConv / ConvInteger / QLinearMatMul. hago_py writes ConvInteger itself (the int32 accumulators of
``weight_scheme="multipoint"``'s widened convolutions, read by a Cast to float): :func:`lower_conv_integer`
rewrites each ConvInteger -> Cast(float) into its QDQ form with unit scales, DequantizeLinear(x, 1, x_zp) and
DequantizeLinear(w, 1, w_zp) into a float Conv, which ``integerize`` turns back into an int8 conv2d with int32
accumulators and a cast to float (the same values as ORT's ConvInteger + Cast). The other integer ops (ORT's
quantizer output) are refused: feed the QDQ form.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import BackendError
from ...ir.io import default_opset
from ...ir.names import NameAllocator

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_NOT_FOLDED = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial")
_UNSUPPORTED = ("QLinearConv", "ConvInteger", "QLinearMatMul", "QGemm", "QLinearAdd")
_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def widen_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose INT4 / UINT4 initializers (simulated W4: DequantizeLinear-21 of packed 4-bit
    weights and their zero points) are INT8 / UINT8 with the same values; ``from_onnx`` reads packed 4-bit data
    as if it were one byte per value ("TensorCopyFromBytes: size mismatch"). DequantizeLinear gives the same
    floats, and the integer rewrites see int8 weights (4-bit values on the int8 kernel)."""
    four = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}
    if not any(t.data_type in four for t in model.graph.initializer):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type in four:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(four[t.data_type]), t.name))
    return m


def lower_conv_integer(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every ConvInteger whose result only a Cast to float reads rewritten into
    DequantizeLinear (scale 1, the node's zero points) -> Conv, writing the Cast's output: the QDQ form the Relax
    integer rewrites match (``rewrite_conv``'s accumulator pattern). A per-channel weight zero point needs
    DequantizeLinear's ``axis`` (opset 13); other ConvIntegers are left for :func:`import_qdq` to refuse."""
    if not any(n.op_type == "ConvInteger" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    opset = default_opset(m)
    names = NameAllocator(values={v for n in g.node for v in list(n.input) + list(n.output)} | set(inits)
                          | {i.name for i in g.input} | {o.name for o in g.output}, nodes={n.name for n in g.node})
    fresh = names.value

    def unit_scale(base: str, n: int = 0) -> str:
        name = fresh(base)
        g.initializer.append(numpy_helper.from_array(np.ones(n, np.float32) if n else np.float32(1.0), name))
        return name

    consumers = _consumers(g)
    outputs = {o.name for o in g.output}
    dropped = set()
    nodes = []
    for node in g.node:
        if id(node) in dropped:
            continue
        if node.op_type != "ConvInteger" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        ins = list(node.input) + [""] * (4 - len(node.input))
        x, w, x_zp, w_zp = ins[:4]
        w_zp_dims = list(inits[w_zp].dims) if w_zp and w_zp in inits else []
        per_channel = bool(w_zp_dims) and int(np.prod(w_zp_dims)) > 1
        uses = consumers.get(node.output[0], [])
        cast = uses[0][0] if len(uses) == 1 else None
        if (cast is None or cast.op_type != "Cast" or node.output[0] in outputs
                or helper.get_attribute_value(next(a for a in cast.attribute if a.name == "to")) != onnx.TensorProto.FLOAT
                or (w_zp and w_zp not in inits) or (x_zp and x_zp not in inits) or (per_channel and opset < 13)):
            nodes.append(node)   # not the accumulator form hago writes: import_qdq refuses it
            continue
        dropped.add(id(cast))
        base = node.name or node.output[0]
        x_dq, w_dq, y = fresh(f"{base}_x_unit_dq"), fresh(f"{base}_w_unit_dq"), cast.output[0]
        x_ins = [x, unit_scale(f"{base}_x_unit_scale")] + ([x_zp] if x_zp else [])
        if per_channel:
            w_ins = [w, unit_scale(f"{base}_w_unit_scale", int(np.prod(w_zp_dims)))] + [w_zp]
            w_axis = {"axis": 0}
        else:
            w_ins = [w, unit_scale(f"{base}_w_unit_scale")] + ([w_zp] if w_zp else [])
            w_axis = {}
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _CONV_ATTRS}
        nodes += [helper.make_node("DequantizeLinear", x_ins, [x_dq], name=names.node(f"{base}/x_unit_dq")),
                  helper.make_node("DequantizeLinear", w_ins, [w_dq], name=names.node(f"{base}/w_unit_dq"), **w_axis),
                  helper.make_node("Conv", [x_dq, w_dq], [y], name=names.node(f"{base}/conv"), **attrs)]
    del g.node[:]
    g.node.extend(nodes)
    return m


def _consumers(graph) -> Dict[str, List]:
    out: Dict[str, List] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name:
                out.setdefault(name, []).append((n, i))
    return out


def _feeds_pad_params_only(name: str, consumers, outputs) -> bool:
    """True when ``name`` reaches only Pad's pads / constant_value inputs (maybe through Q/DQ nodes)."""
    uses = consumers.get(name, [])
    if not uses or name in outputs:
        return False
    for node, idx in uses:
        if node.op_type == "Pad" and idx >= 1:
            continue
        if node.op_type in _QDQ and idx == 0 and all(_feeds_pad_params_only(o, consumers, outputs)
                                                     for o in node.output):
            continue
        return False
    return True


def drop_empty_concat_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose Concat nodes no longer read zero-element initializers (they add nothing). TVM
    keeps such a constant in the module, exports it, and the library then fails to load ("Invalid DLTensor file
    format"): found by fuzz_build on a Concat with a [1, 0, 5, 3] constant."""
    empty = {t.name for t in model.graph.initializer if 0 in t.dims}
    if not empty or not any(n.op_type == "Concat" and set(n.input) & empty for n in model.graph.node):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            keep = [i for i in node.input if i not in empty]
            if keep and len(keep) < len(node.input):
                del node.input[:]
                node.input.extend(keep)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    inits = [t for t in m.graph.initializer if t.name not in empty or t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def fold_static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where the shape arithmetic torch exports build is made constant wherever ONNX shape
    inference knows the dimensions it reads: a Shape node of a fully known tensor becomes its shape, and a
    Gather(Shape(t), constant index) of known dimensions of ``t`` (the feature size next to a symbolic batch)
    becomes those dimensions; :func:`fold_constants` then folds the Div / Slice arithmetic on them. Without this,
    a model whose qkv split has computed Slice bounds left Relax tensors of unknown shape, and TVM's matmul
    legalization failed ("'NoneType' object is not iterable"; fuzz_build, exporters family)."""
    if not any(n.op_type == "Shape" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:      # a model shape inference cannot take: nothing is folded, from_onnx decides
        return model
    g = inferred.graph
    dims: Dict[str, List] = {}      # value -> its dimensions, None where not known
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in g.initializer:
        dims[init.name] = [int(d) for d in init.dims]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    shape_of: Dict[str, List] = {}  # Shape output -> the dimensions it holds
    for n in model.graph.node:
        if n.op_type == "Shape" and n.domain in ("", "ai.onnx") and n.input[0] in dims:
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            d = dims[n.input[0]]
            start, stop = int(a.get("start", 0)), a.get("end")
            shape_of[n.output[0]] = d[start:] if stop is None else d[start:int(stop)]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for node in m.graph.node:
        value = None
        if node.op_type == "Shape" and node.output[0] in shape_of and None not in shape_of[node.output[0]]:
            value = np.asarray(shape_of[node.output[0]], np.int64)
        elif (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] in shape_of
              and node.input[1] in consts and not any(x.name == "axis" and x.i != 0 for x in node.attribute)):
            held = shape_of[node.input[0]]
            idx = np.asarray(consts[node.input[1]]).astype(np.int64)
            if idx.size and np.all((idx >= -len(held)) & (idx < len(held))):
                got = np.asarray([held[int(i)] for i in idx.reshape(-1)], dtype=object)
                if not any(v is None for v in got):
                    value = got.astype(np.int64).reshape(idx.shape)
        if value is not None:
            m.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            continue
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with constant nodes (and Q/DQ nodes that only feed Pad parameters) folded into
    initializers."""
    from onnx.reference import ReferenceEvaluator

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    outputs = {o.name for o in g.output}
    opset = [o for o in m.opset_import]
    consumers = _consumers(g)
    kept = []
    for node in g.node:          # nodes are topologically sorted in a valid ONNX graph
        ins = [i for i in node.input if i]
        foldable = (node.op_type not in _NOT_FOLDED and not node.domain and not any(
            a.type == onnx.AttributeProto.GRAPH for a in node.attribute) and all(i in consts for i in ins))
        if foldable and node.op_type in _QDQ:
            foldable = all(_feeds_pad_params_only(o, consumers, outputs) for o in node.output)
        if not foldable:
            kept.append(node)
            continue
        sub = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
                                [numpy_helper.from_array(np.asarray(consts[i]), i) for i in set(ins)])
        sub_model = helper.make_model(sub, opset_imports=opset)
        try:
            vals = ReferenceEvaluator(sub_model).run(None, {})
        except Exception:      # an op the reference evaluator lacks: keep the node, from_onnx may handle it
            kept.append(node)
            continue
        for name, v in zip(node.output, vals):
            if name:
                consts[name] = np.asarray(v)
                g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in kept for i in n.input} | outputs
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    return m


def import_qdq(model: onnx.ModelProto):
    """The Relax IRModule of a QDQ ONNX model (constants folded first; parameters bound as constants; graph
    inputs that index a table checked for range, backends/tvm/guards.py)."""
    if not isinstance(model, onnx.ModelProto):
        from ...ir import load_model

        model = load_model(model)
    model = lower_conv_integer(widen_int4(model))
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in _UNSUPPORTED})
    if bad:
        raise BackendError(f"TVM's ONNX importer does not support {', '.join(bad)}: pass the QDQ form of the model "
                           "(QuantizeLinear / DequantizeLinear around float ops, what hago_py.quantize returns)"
                           + ("; a ConvInteger is lowered only when a Cast to float alone reads it and its zero "
                              "points are constants (per-channel ones need opset >= 13)" if "ConvInteger" in bad else ""))
    folded = fold_constants(fold_static_shapes(drop_empty_concat_inputs(model)))
    try:
        from tvm.relax.frontend.onnx import from_onnx

        mod = from_onnx(folded, keep_params_in_input=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise BackendError(f"TVM could not import the QDQ model ({type(e).__name__}: {msg}); check its ops against "
                           "tvm.relax.frontend.onnx (Pad pads must be constant after folding)", details=str(e)) from e
    from .guards import guard_gather_indices

    try:
        return guard_gather_indices(mod)[0]     # out-of-range Gather ids raise instead of reading past the table
    except Exception:   # a module shape the guard does not know: build it unguarded rather than not at all
        return mod


def static_shapes(model: onnx.ModelProto, batch: int = 1, shapes=None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have no symbolic dimension: the leading one becomes ``batch``,
    others come from ``shapes`` ({input: [dims]}). MetaSchedule (TVM 0.27) cannot tune kernels with symbolic
    shapes (its trace replay fails with "Check failed: old_rv != nullptr && new_rv != nullptr"), and a tuning
    database keys on the shapes, so tuning and the tuned build use the same static shapes."""
    shapes = dict(shapes or {})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        given = shapes.get(inp.name)
        if given is not None:
            if len(given) != len(dims):
                raise BackendError(f"shape {list(given)} for input '{inp.name}' has {len(given)} dimensions; the "
                                   f"model's input has {len(dims)}: pass one value per dimension")
            for d, v in zip(dims, given):
                d.ClearField("dim_param")
                d.dim_value = int(v)
            continue
        for k, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if k != 0:
                raise BackendError(f"input '{inp.name}' has the symbolic dimension {k} ('{d.dim_param}'); tuning "
                                   f"needs static shapes: pass shapes={{'{inp.name}': [...]}} (CLI --shape "
                                   f"{inp.name}=1x...)")
            d.ClearField("dim_param")
            d.dim_value = int(batch)
    return m
