"""QDQ ONNX -> Relax: fold constant subgraphs, then ``tvm.relax.frontend.onnx.from_onnx``.

``from_onnx`` rejects a Pad whose ``pads`` is computed ("Dynamic pads are not supported yet"), as torch exports
write it (Constant -> Cast / Concat / Reshape chains). :func:`fold_constants` evaluates every node whose inputs
are all constant with ONNX's reference evaluator and replaces it by initializers. QuantizeLinear /
DequantizeLinear stay (they are what the integer rewrites match) unless their output only feeds a Pad's
``pads`` / ``constant_value`` (directly or through other such Q/DQ nodes): the Q/DQ pair quantizing a Pad's
constant value is folded too. After import, QuantizeLinear / DequantizeLinear are ``relax.quantize`` /
``relax.dequantize`` (float fake-quant until ``integerize`` rewrites them). ``from_onnx`` does not import
QLinearConv / ConvInteger / QLinearMatMul: feed the QDQ form (what ``hago_py.quantize`` returns).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import BackendError

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_NOT_FOLDED = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial")
_UNSUPPORTED = ("QLinearConv", "ConvInteger", "QLinearMatMul", "QGemm", "QLinearAdd")


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
    """The Relax IRModule of a QDQ ONNX model (constants folded first; parameters bound as constants)."""
    if not isinstance(model, onnx.ModelProto):
        from ...ir import load_model

        model = load_model(model)
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in _UNSUPPORTED})
    if bad:
        raise BackendError(f"TVM's ONNX importer does not support {', '.join(bad)}: pass the QDQ form of the model "
                           "(QuantizeLinear / DequantizeLinear around float ops, what hago_py.quantize returns)")
    folded = fold_constants(model)
    try:
        from tvm.relax.frontend.onnx import from_onnx

        return from_onnx(folded, keep_params_in_input=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise BackendError(f"TVM could not import the QDQ model ({type(e).__name__}: {msg}); check its ops against "
                           "tvm.relax.frontend.onnx (Pad pads must be constant after folding)", details=str(e)) from e


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
