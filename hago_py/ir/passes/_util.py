"""Small helpers shared by the graph passes."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer/constant input, or None if it is computed at run time."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
        return prod.attributes["value"].as_tensor().numpy()
    return None


def single_consumer(value: ir.Value) -> ir.Node | None:
    users = value.uses()
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0].node


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray, names=None) -> ir.Value:
    """Register a fresh initializer with a unique name derived from ``name`` (from ``names``, a
    hago_py.ir.names.NameAllocator, when given: unique among all values, not only the initializers)."""
    if names is not None:
        name = names.value(name)
    base, k = name, 0
    existing = graph.initializers
    while name in existing:
        k += 1
        name = f"{base}_{k}"
    array = np.array(array, copy=True, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
    v = ir.Value(name=name, shape=ir.Shape(array.shape),
                 type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def named_node(names, op: str, inputs, node_name: str, out_names, attributes=None) -> ir.Node:
    """An ir.Node whose node name and output names are fresh (``names``: the graph's NameAllocator)."""
    node = ir.Node("", op, inputs, attributes=attributes or {}, name=names.node(node_name),
                   num_outputs=len(out_names))
    for o, n in zip(node.outputs, out_names):
        o.name = names.value(n)
    return node
