"""Block discovery for block-wise reconstruction (BRECQ): dominator analysis on the ONNX graph.

A *block* is a single-entry single-exit region of the main data flow: every path from the graph inputs
to the graph outputs passes through the block's entry tensor and its exit tensor. The cut points are
found structurally, with no per-architecture patterns:

1. Build the node graph (networkx DiGraph, one vertex per ONNX node, an edge per tensor).
2. Drop *side edges*: a tensor that carries no value depending on a weighted layer (computed from
   shapes, constants or the graph inputs only, e.g. an attention mask or a ``Shape -> Gather -> Concat``
   shape computation) and does not feed a weighted layer itself (as the input stem does), entering a node
   whose other inputs do depend on one. Such tensors are side inputs of a block,
   not its data flow; left in, one attention mask feeding every layer of a transformer would make the
   whole encoder a single region. Nodes that no longer reach a graph output are *side nodes*.
3. Add a virtual source / sink and compute dominators (``networkx.immediate_dominators``) on the graph and
   post-dominators on its reverse. The dominators of the sink are the articulation nodes of the data
   flow; between two consecutive ones lies a region where every node is dominated by the first and
   post-dominated by the second: a residual block (fork tensor -> the Add that joins it), a transformer
   sub-layer (LayerNorm output -> the next LayerNorm / residual Add), or a single node of a chain.
4. Regions without weighted layers (ReLU / LayerNorm after a residual Add, pooling, reshapes, the
   embedding stem) are merged into a neighbour: into the previous block while they keep its output
   shape (an activation or normalisation of its output), else into the next one (GAP/Flatten join the
   classifier). Consecutive single-layer chain regions are grouped into blocks of at most
   ``max_chain_layers`` layers.
5. Side nodes join the block of their first consumer, so a block is runnable from its inputs.

Every weighted layer passed in ends up in exactly one block; blocks come in topological order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Set, Tuple

import networkx as nx
import onnx

from ..errors import ModelError

# Ops whose output depends only on the *shape* of their input, not on its values.
VALUE_FREE_OPS = ("Shape", "Size")
_SOURCE, _SINK = -1, -2


@dataclass
class Block:
    name: str
    nodes: List[str]                 # node names, topological order
    inputs: List[str]                # tensors entering the block (initializers excluded)
    output: str                      # the exit tensor (what the next block reads)
    layers: List[str]                # weighted nodes inside (those passed to find_blocks), topological order
    outputs: List[str] = field(default_factory=list)   # every tensor leaving the block; ``output`` first
    kind: str = "chain"              # "region" (branching single-entry single-exit region) | "chain"


def node_names(model: onnx.ModelProto) -> List[str]:
    """A name per node: its own, or ``<op_type>_<index>`` for unnamed nodes (shared with torch_lower)."""
    return [n.name if n.name else f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]


def _topo_order(model: onnx.ModelProto) -> List[int]:
    """Node indices in a topological order (the file order when it already is one)."""
    g = model.graph
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    ok = True
    for n in g.node:
        if any(i not in known for i in n.input):
            ok = False
            break
        known.update(n.output)
    if ok:
        return list(range(len(g.node)))
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    dg = nx.DiGraph()
    dg.add_nodes_from(range(len(g.node)))
    for i, n in enumerate(g.node):
        for t in n.input:
            if t in producer:
                dg.add_edge(producer[t], i)
    try:
        return list(nx.lexicographical_topological_sort(dg))
    except nx.NetworkXUnfeasible:
        raise ModelError("the model graph has a cycle; it is not a valid ONNX graph") from None


def shape_only_tensors(model: onnx.ModelProto) -> Set[str]:
    """Tensors whose values depend only on shapes and constants (not on the values of graph inputs):
    outputs of Shape / Size and everything computed from them and from initializers / Constants.
    Such a tensor is the same for every batch of the same size."""
    g = model.graph
    const = {i.name for i in g.initializer} | {""}
    out: Set[str] = set()
    for i in _topo_order(model):
        n = g.node[i]
        if n.op_type in VALUE_FREE_OPS or all(t in const or t in out for t in n.input):
            out.update(o for o in n.output if o)
    return out


def _shapes(model: onnx.ModelProto) -> Dict[str, Tuple]:
    def dims(vi):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                     for d in vi.type.tensor_type.shape.dim)

    g = model.graph
    vis = list(g.input) + list(g.output) + list(g.value_info)
    if not g.value_info and len(g.node) > 0:
        try:
            vis = list(g.input) + list(g.output) + list(onnx.shape_inference.infer_shapes(model).graph.value_info)
        except Exception:  # shapes are only a merging hint; without them layerless tails join the previous block
            pass
    return {vi.name: dims(vi) for vi in vis if dims(vi) is not None}


def find_blocks(model: onnx.ModelProto, layers: Sequence[str], *, max_chain_layers: int = 3) -> List[Block]:
    """Partition the graph into blocks for block-wise reconstruction (see the module docstring).

    ``layers``: names of the weighted nodes (Conv / Gemm / MatMul with a constant weight) to reconstruct.
    Returns the blocks that contain at least one of them, in topological order; every layer is in exactly
    one block. Nodes outside every block (stems and tails without layers) are merged into neighbours.
    """
    g = model.graph
    names = node_names(model)
    index = {nm: i for i, nm in enumerate(names)}
    layer_set = set(layers)
    unknown = sorted(layer_set - set(index))
    if unknown:
        raise ModelError(f"find_blocks: layer(s) {', '.join(unknown[:5])} are not nodes of the model; pass the "
                         "node names of the prepared model the plan was made for")
    if not layer_set:
        return []
    order = _topo_order(model)
    pos = {i: k for k, i in enumerate(order)}
    inits = {t.name for t in g.initializer}
    graph_outputs = [o.name for o in g.output]
    producer: Dict[str, int] = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    consumers: Dict[str, List[int]] = {}
    for i, n in enumerate(g.node):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)

    def preds(i: int) -> List[int]:
        return sorted({producer[t] for t in g.node[i].input if t in producer}, key=pos.get)

    # 1-2. value dependency on the weighted layers, then drop side edges
    aw = {}
    for i in order:
        n = g.node[i]
        aw[i] = names[i] in layer_set or (n.op_type not in VALUE_FREE_OPS and any(aw[p] for p in preds(i)))
    # stem: value-independent nodes that feed a weighted layer through value-independent nodes only (the
    # embedding / input stem, a LayerNorm before the first layer); their edges are data flow, not side edges
    stem = {}
    for i in reversed(order):
        succ = [c for o in g.node[i].output for c in consumers.get(o, [])]
        stem[i] = not aw[i] and any(names[c] in layer_set or (not aw[c] and stem.get(c, False)) for c in succ)
    full = nx.DiGraph()
    full.add_nodes_from(order)
    for v in order:
        pv = preds(v)
        for u in pv:
            if not aw[u] and not stem[u] and any(aw[p] for p in pv if p != u):
                continue  # side edge
            full.add_edge(u, v)
    # graph inputs are vertices too (an input read by two nodes is a fork: the residual of a first block)
    for k, name in enumerate(i.name for i in g.input if i.name not in inits):
        v = -3 - k
        full.add_node(v)
        cons = sorted(set(consumers.get(name, [])), key=pos.get)
        feeds_layer = any(names[c] in layer_set or stem[c] for c in cons)
        for c in cons:
            if not feeds_layer and any(aw[p] for p in preds(c)):
                continue  # side edge (e.g. an attention mask input)
            full.add_edge(v, c)
    exits = {producer[o] for o in graph_outputs if o in producer}
    main: Set[int] = set()
    for e in exits:
        main.add(e)
        main.update(nx.ancestors(full, e))
    gm = nx.DiGraph(full.subgraph(main))
    roots = [i for i in gm.nodes if gm.in_degree(i) == 0]
    sinks = [i for i in gm.nodes if gm.out_degree(i) == 0]
    gm.add_node(_SOURCE)
    gm.add_node(_SINK)
    for r in roots:
        gm.add_edge(_SOURCE, r)
    for s in set(sinks) | exits:
        gm.add_edge(s, _SINK)

    # 3. dominators / post-dominators; the dominators of the sink are the cut nodes
    idom = nx.immediate_dominators(gm, _SOURCE)
    ipdom = nx.immediate_dominators(gm.reverse(copy=False), _SINK)
    chain = []
    c = _SINK
    while c != _SOURCE:
        c = idom[c]
        chain.append(c)
    chain.reverse()                       # [SOURCE, c1, ..., ck]
    cut_rank = {c: k for k, c in enumerate(chain)}
    cut_rank[_SINK] = len(chain)

    def up(tree, n, stop):
        while n not in cut_rank and n != stop:
            n = tree[n]
        return n

    segments: Dict[int, List[int]] = {}
    for n in main:
        if n < 0:
            continue  # graph-input vertex
        end = n if n in cut_rank else up(ipdom, ipdom[n], _SINK)
        start = up(idom, idom[n], _SOURCE)
        if cut_rank[start] != cut_rank[end] - 1:  # pragma: no cover - a property of dominance
            raise ModelError(f"block analysis failed at node '{names[n]}': region boundaries are inconsistent")
        segments.setdefault(cut_rank[end], []).append(n)
    shapes = _shapes(model)

    def exit_tensor(nodes: List[int], end_rank: int) -> str:
        if end_rank < len(chain):
            n = g.node[chain[end_rank]]
            outs = [o for o in n.output if o]
            for o in outs:
                if o in graph_outputs or any(c in main for c in consumers.get(o, [])):
                    return o
            return outs[0]
        inside = {o for i in nodes for o in g.node[i].output}
        return next(o for o in graph_outputs if o in inside)

    segs = []
    for rank in sorted(segments):
        nodes = sorted(segments[rank], key=pos.get)
        start = chain[rank - 1]
        if rank < len(chain) and chain[rank] < 0:
            continue  # the segment of a graph-input vertex holds no node
        branching = len(nodes) > 1 or gm.out_degree(start) > 1
        segs.append({"nodes": nodes, "layers": sum(names[i] in layer_set for i in nodes),
                     "kind": "region" if branching else "chain", "exit": exit_tensor(nodes, rank)})

    # 4. merge layerless regions into neighbours, then group chains
    merged: List[dict] = []
    pending: List[dict] = []

    def absorb(dst: dict, src: dict, front: bool = False) -> None:
        dst["nodes"] = src["nodes"] + dst["nodes"] if front else dst["nodes"] + src["nodes"]
        dst["layers"] += src["layers"]
        if not front:
            dst["exit"] = src["exit"]

    for seg in segs:
        if seg["layers"] == 0:
            pending.append(seg)
            continue
        if merged:
            while pending and shapes.get(pending[0]["exit"]) == shapes.get(merged[-1]["exit"]):
                absorb(merged[-1], pending.pop(0))
        for p in reversed(pending):
            absorb(seg, p, front=True)
        pending = []
        merged.append(seg)
    for p in pending:
        absorb(merged[-1], p)

    grouped: List[dict] = []
    run: List[dict] = []

    def flush():
        if not run:
            return
        k = -(-len(run) // max(1, max_chain_layers))       # number of groups
        size, extra = divmod(len(run), k)
        it = iter(run)
        for j in range(k):
            grp = [next(it) for _ in range(size + (j < extra))]
            blk = dict(grp[0], nodes=list(grp[0]["nodes"]))
            for other in grp[1:]:
                absorb(blk, other)
            grouped.append(blk)
        run.clear()

    for seg in merged:
        if seg["kind"] == "chain" and seg["layers"] == 1:
            run.append(seg)
        else:
            flush()
            grouped.append(seg)
    flush()

    # 5. side nodes join the block of their first consumer
    block_of: Dict[int, int] = {}
    for b, blk in enumerate(grouped):
        for i in blk["nodes"]:
            block_of[i] = b
    for i in reversed(order):
        if i in block_of:
            continue
        cons = [block_of[c] for o in g.node[i].output for c in consumers.get(o, []) if c in block_of]
        block_of[i] = min(cons) if cons else len(grouped) - 1
    members: List[List[int]] = [[] for _ in grouped]
    for i in order:
        members[block_of[i]].append(i)

    out: List[Block] = []
    outset = set(graph_outputs)
    for b, (blk, nodes) in enumerate(zip(grouped, members)):
        produced = {o for i in nodes for o in g.node[i].output if o}
        inputs: List[str] = []
        for i in nodes:
            for t in g.node[i].input:
                if t and t not in produced and t not in inits and t not in inputs:
                    inputs.append(t)
        leaving = [blk["exit"]]
        for i in nodes:
            for o in g.node[i].output:
                if o and o not in leaving and (o in outset or any(block_of[c] != b for c in consumers.get(o, []))):
                    leaving.append(o)
        out.append(Block(name=f"block{b}", nodes=[names[i] for i in nodes], inputs=inputs, output=blk["exit"],
                         layers=[names[i] for i in nodes if names[i] in layer_set], outputs=leaving,
                         kind=blk["kind"]))
    return out


def describe(blocks: Sequence[Block]) -> List[str]:
    """One line per block, for reports and logs."""
    return [f"{b.name} ({b.kind}, {len(b.layers)} layer{'s' if len(b.layers) != 1 else ''}: "
            f"{', '.join(b.layers)}) -> {b.output}" for b in blocks]
