"""One name allocator over every name of a graph.

realize adds initializers, nodes and values named after the tensors they quantize (``<w>_quantized``,
``<w>_scale``, ``<x>_dequantized``, ...). A user model may already hold any of those names, and two layers
may share one weight: every new name therefore comes from one allocator that knows all value names
(inputs, outputs, initializers, node outputs, subgraphs included) and all node names, and never hands out
a name twice.
"""
from __future__ import annotations

from typing import Iterable, Set

import onnx_ir as ir


class NameAllocator:
    def __init__(self, values: Iterable[str] = (), nodes: Iterable[str] = ()):
        self._values: Set[str] = {v for v in values if v}
        self._nodes: Set[str] = {n for n in nodes if n}

    @classmethod
    def for_graph(cls, graph: ir.Graph) -> "NameAllocator":
        values, nodes = set(graph.initializers), set()
        values.update(v.name for v in graph.inputs if v.name)
        values.update(v.name for v in graph.outputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                nodes.add(node.name)
            for v in list(node.outputs) + [i for i in node.inputs if i is not None]:
                if v.name:
                    values.add(v.name)
        return cls(values, nodes)

    @staticmethod
    def _fresh(base: str, taken: Set[str]) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def value(self, base: str) -> str:
        """A value / initializer name derived from ``base`` that no value of the graph has."""
        return self._fresh(base, self._values)

    def node(self, base: str) -> str:
        """A node name derived from ``base`` that no node of the graph has."""
        return self._fresh(base, self._nodes)
