"""Int8-region boundaries: the latency a layer's precision costs its neighbours.

A layer kept in float between int8 layers makes the runtime leave the int8 region and come back: a
DequantizeLinear before it and a QuantizeLinear after it, and on ORT CPU a layout change between the int8
kernels (NHWC) and the float ones (NCHWc). Two adjacent float layers share that cost, so the latency of a plan
is not a sum of per-layer terms: timing one layer in float in place pays two boundaries, timing a run of
``k`` float layers pays two for all ``k``. The layer table (one layer changed at a time) therefore sees a
float *island* — e.g. the stem and the first block of a CNN, where the int8 kernels are weakest (few channels,
large feature maps) — as ``k`` separate losses, and a search over its additive estimates never tries it.

This module finds the edges where a boundary can arise: a search layer ``v`` whose data input comes from the
output of layer ``u`` through ops that carry the tensor unchanged in size (activations, reshapes, pooling to
the same layout), or from a graph input (``u`` is None: the model's inputs are float), and a layer whose output
reaches a graph output the same way (``v`` is None). Each edge has the element count of the tensor that would
be (de)quantized there. The cost per element is fitted from measurements (see ``fit_cost``), and
``strategies.table.Table`` adds ``cost * numel`` for every edge whose two ends differ in precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

# ops that pass one data tensor through (the boundary could sit on either side of them at the same cost)
TRANSPARENT = frozenset({"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Identity",
                         "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout", "Cast"})


@dataclass(frozen=True)
class Edge:
    u: Optional[str]      # producing search layer; None = a graph input (float)
    v: Optional[str]      # consuming search layer; None = a graph output (float)
    tensor: str
    numel: int

    def to_dict(self):
        return {"u": self.u, "v": self.v, "tensor": self.tensor, "numel": self.numel}


def layer_edges(model: onnx.ModelProto, layers: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> List[Edge]:
    """Edges between the search ``layers`` of ``model`` (node names), with the boundary tensor's size from
    ``shapes`` (tensor -> shape at the timing batch). Tensors of unknown shape give no edge."""
    layers = set(layers)
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output if o}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    inits = {i.name for i in model.graph.initializer}
    graph_in = {i.name for i in model.graph.input} - inits
    graph_out = {o.name for o in model.graph.output}

    def numel(t: str) -> Optional[int]:
        s = shapes.get(t)
        return int(np.prod(s)) if s is not None and len(s) > 0 else None

    edges: Dict[Tuple[Optional[str], Optional[str]], Edge] = {}
    for name in sorted(layers):
        node = nodes.get(name)
        if node is None or not node.input:
            continue
        # upstream: follow the data input back through transparent single-consumer ops
        t = node.input[0]
        src: Optional[str] = "?"
        for _ in range(16):
            if t in graph_in:
                src = None
                break
            p = producer.get(t)
            if p is None:
                break
            if p.name in layers:
                src = p.name
                break
            if p.op_type not in TRANSPARENT or len(consumers.get(t, [])) != 1:
                break
            t = p.input[0]
        n_in = numel(node.input[0])
        if src != "?" and n_in:
            edges[(src, name)] = Edge(src, name, node.input[0], n_in)
        # downstream: the output reaches a graph output through transparent ops only
        t = node.output[0]
        for _ in range(16):
            if t in graph_out:
                n_out = numel(node.output[0])
                if n_out:
                    edges[(name, None)] = Edge(name, None, node.output[0], n_out)
                break
            cs = consumers.get(t, [])
            if len(cs) != 1 or cs[0].op_type not in TRANSPARENT:
                break
            t = cs[0].output[0]
    return [edges[k] for k in sorted(edges, key=lambda k: (k[0] or "", k[1] or ""))]


def fit_cost(pairs: Sequence[Tuple[float, int]], prior: float, prior_weight: float = 0.25) -> float:
    """Cost per element of one boundary from pair measurements.

    Each pair (u, v) joined by an edge of ``n`` elements is timed in place with both layers in float:
    ``y = dlat_u + dlat_v - dlat_uv`` is then twice the boundary the pair shares (the rest of both layers'
    changes cancels), so ``y = 2 * cost * n``. Least squares through the origin, combined with the cost
    model's ``prior`` as ``prior_weight`` pseudo-observations at the mean edge size; never negative."""
    if not pairs:
        return max(0.0, prior)
    ns = np.array([float(n) for _, n in pairs])
    ys = np.array([float(y) for y, _ in pairs])
    n_bar = float(ns.mean())
    num = float((ys * 2 * ns).sum()) + prior_weight * prior * (2 * n_bar) ** 2
    den = float(((2 * ns) ** 2).sum()) + prior_weight * (2 * n_bar) ** 2
    return max(0.0, num / den)
