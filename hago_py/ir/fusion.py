"""Recognise the fusion patterns a hardware spec lists, so quantization points match what the backend fuses.

A pattern like ("Conv", "Relu") means the backend computes Conv+Relu as one integer kernel: no
quantize/dequantize may sit between the two, and the group's output (the Relu output) is the tensor
that gets quantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import onnx


@dataclass
class FusionGroup:
    anchor: str                 # name of the first node (the compute op)
    nodes: List[str]            # node names, anchor first
    ops: List[str]              # op types
    output: str                 # tensor produced by the last node of the group
    pattern: Tuple[str, ...] = field(default_factory=tuple)


def _consumers(model: onnx.ModelProto) -> Dict[str, List[onnx.NodeProto]]:
    cons: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                cons.setdefault(i, []).append(n)
    return cons


def find_fusion_groups(model: onnx.ModelProto, patterns: Sequence[Sequence[str]],
                       anchors: Sequence[str] | None = None) -> Dict[str, FusionGroup]:
    """Map anchor node name -> its longest matching fusion group (a lone anchor if none matches)."""
    cons = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    by_anchor: Dict[str, List[Tuple[str, ...]]] = {}
    for p in patterns:
        by_anchor.setdefault(p[0], []).append(tuple(p))
    groups: Dict[str, FusionGroup] = {}
    claimed: set = set()
    for node in model.graph.node:
        if anchors is not None and node.op_type not in anchors:
            continue
        best = FusionGroup(node.name, [node.name], [node.op_type], node.output[0], (node.op_type,))
        for pat in sorted(by_anchor.get(node.op_type, []), key=len, reverse=True):
            chain, cur = [node], node
            ok = True
            for op in pat[1:]:
                out = cur.output[0]
                users = cons.get(out, [])
                if out in outputs or len(users) != 1 or users[0].op_type != op or users[0].name in claimed:
                    ok = False
                    break
                cur = users[0]
                chain.append(cur)
            if ok and len(chain) > len(best.nodes):
                best = FusionGroup(node.name, [n.name for n in chain], [n.op_type for n in chain],
                                   chain[-1].output[0], pat)
        groups[node.name] = best
        claimed.update(best.nodes[1:])
    return groups
