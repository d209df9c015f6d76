"""Canonical form of a user model, made once on load so that no later stage meets an ONNX corner case.

What exporters legally write and what the stages assume differ in a few ways; each is fixed here, and
every change is reported (``notes``) so the report can say what was done to the user's graph:

* **Initializers that are also graph inputs** (IR version 3, ``torch.onnx.export(...,
  keep_initializers_as_inputs=True)``): the initializer is the weight. It is removed from the graph inputs
  (so it is quantized like any weight, and the output has no overridable float copy of it) and the IR
  version is raised to 4 where needed (IR 3 requires every initializer to be an input).
* **Sparse initializers** become dense ones (the stages, and ORT's QDQ fusions, read dense tensors).
* **Node names** are optional and need not be unique in ONNX; the plan is keyed by node name. Unnamed
  nodes get ``<op_type>_<k>`` and duplicates a suffix (onnx-ir's NameFixPass), every other name is kept.
* **Strings must be UTF-8**: protobuf keeps an invalid UTF-8 string field as raw bytes; such a model is
  rejected here with the field's path (it would fail much later in onnx-ir or ORT).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError


def check_strings(model: onnx.ModelProto, where: str) -> None:
    """ModelError naming the first string field that is not valid UTF-8 (raw tensor bytes are not strings)."""
    bad = _first_bad_string(model, "model")
    if bad is not None:
        raise ModelError(f"{where}: field {bad} is not valid UTF-8 text; re-export the model with UTF-8 "
                         "names and strings")


def _repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 5.28; older ones have only .label
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def _first_bad_string(msg, path: str) -> Optional[str]:
    from google.protobuf.descriptor import FieldDescriptor as FD

    for fd, value in msg.ListFields():
        rep = _repeated(fd)
        vals = list(value) if rep else [value]
        for i, v in enumerate(vals):
            where = f"{path}.{fd.name}" + (f"[{i}]" if rep else "")
            if fd.type == FD.TYPE_STRING:
                if isinstance(v, bytes):
                    return where
            elif fd.type == FD.TYPE_MESSAGE:
                if fd.message_type.name == "TensorProto":  # walk names, not the (large) payloads
                    if isinstance(v.name, bytes):
                        return where + ".name"
                    for j, e in enumerate(v.external_data):
                        if isinstance(e.key, bytes) or isinstance(e.value, bytes):
                            return f"{where}.external_data[{j}]"
                    continue
                found = _first_bad_string(v, where)
                if found is not None:
                    return found
    return None


def canonicalize(model: onnx.ModelProto, where: str = "the model",
                 notes: Optional[List[str]] = None) -> onnx.ModelProto:
    """The model in canonical form (see the module docstring); ``notes`` receives a line per change."""
    notes = notes if notes is not None else []
    g = model.graph
    _densify(model, where, notes)
    inits = {t.name for t in g.initializer}
    as_inputs = [i.name for i in g.input if i.name in inits]
    if as_inputs:
        keep = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(keep)
        if model.ir_version < 4:
            model.ir_version = 4
        notes.append(f"{len(as_inputs)} initializer(s) were also graph inputs ({_few(as_inputs)}): treated as "
                     "constant weights, removed from the inputs")
    names = [n.name for n in g.node]
    unnamed = sum(1 for n in names if not n)
    dup = len([n for n in names if n]) - len({n for n in names if n})
    if unnamed or dup or _subgraph_names_need_fix(g):
        model = _fix_node_names(model)
        notes.append(f"node names made unique: {unnamed} unnamed node(s) named after their op type, {dup} duplicate "
                     "name(s) given a suffix")
    return model


def _few(names: List[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _densify(model: onnx.ModelProto, where: str, notes: List[str]) -> None:
    g = model.graph
    if not len(g.sparse_initializer):
        return
    names = []
    for sp in g.sparse_initializer:
        try:
            dense = sparse_to_dense(sp)
        except Exception as e:
            raise ModelError(f"{where}: sparse initializer '{sp.values.name}' is malformed ({e}); re-export it "
                             "as a dense initializer") from e
        g.initializer.append(numpy_helper.from_array(dense, sp.values.name))
        names.append(sp.values.name)
    del g.sparse_initializer[:]
    notes.append(f"{len(names)} sparse initializer(s) stored dense ({_few(names)})")


def sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """Dense numpy array of a SparseTensorProto (indices [NNZ] linearized or [NNZ, rank], ONNX's two forms)."""
    values = numpy_helper.to_array(sp.values).reshape(-1)
    dims = tuple(int(d) for d in sp.dims)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64) if sp.HasField("indices") else np.arange(values.size)
    out = np.zeros(int(np.prod(dims)) if dims else 1, values.dtype)
    if idx.ndim == 2:
        if idx.shape != (values.size, len(dims)):
            raise ValueError(f"indices of shape {idx.shape} for {values.size} values of a rank-{len(dims)} tensor")
        idx = np.ravel_multi_index(tuple(idx.T), dims)
    elif idx.shape != (values.size,):
        raise ValueError(f"{idx.size} indices for {values.size} values")
    if idx.size and (idx.min() < 0 or idx.max() >= out.size):
        raise ValueError("an index lies outside the tensor")
    out[idx] = values
    return out.reshape(dims)


def _subgraph_names_need_fix(g: onnx.GraphProto) -> bool:
    """True when a node of a subgraph (If / Loop / Scan bodies) is unnamed or repeats a name."""
    seen = {n.name for n in g.node}
    stack = [a.g for n in g.node for a in n.attribute if a.HasField("g")]
    stack += [s for n in g.node for a in n.attribute for s in a.graphs]
    while stack:
        cur = stack.pop()
        for n in cur.node:
            if not n.name or n.name in seen:
                return True
            seen.add(n.name)
            stack += [a.g for a in n.attribute if a.HasField("g")] + [s for a in n.attribute for s in a.graphs]
    return False


def _fix_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Unique names for every node of the model (subgraphs included) via onnx-ir's NameFixPass."""
    import onnx_ir as ir
    from onnx_ir.passes.common import NameFixPass
    from onnx_ir.passes.common.naming import SimpleNameGenerator

    class _OpTypeNames(SimpleNameGenerator):
        def generate_node_name(self, node: ir.Node) -> str:
            return node.name or node.op_type

    m = ir.serde.deserialize_model(model)
    NameFixPass(_OpTypeNames())(m)
    return ir.serde.serialize_model(m)
