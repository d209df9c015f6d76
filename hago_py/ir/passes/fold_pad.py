"""Fold a constant zero Pad on spatial axes into the following Conv's ``pads`` attribute.

TF-style 'same' padding exported as Pad -> Conv (EfficientNet-Lite) costs a copy in FP32 and a
Q/DQ pair around the Pad once quantized; folded, the int8 kernel pads with the zero point itself.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._util import attr, const_array, single_consumer


class FoldPadIntoConvPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for pad in list(graph):
            if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx"):
                continue
            mode = attr(pad, "mode", "constant")
            if isinstance(mode, bytes):
                mode = mode.decode()
            if mode != "constant":
                continue
            conv = single_consumer(pad.outputs[0])
            if conv is None or conv.op_type != "Conv" or conv.inputs[0] is not pad.outputs[0]:
                continue
            pads = const_array(pad.inputs[1]) if len(pad.inputs) > 1 else None
            if pads is None:
                continue
            cval = const_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else None
            if cval is not None and np.any(cval != 0):
                continue
            if len(pad.inputs) > 3 and pad.inputs[3] is not None:  # axes input: keep it simple
                continue
            pads = [int(p) for p in pads.reshape(-1)]
            rank = len(pads) // 2
            begins, ends = pads[:rank], pads[rank:]
            if rank < 3 or any(p != 0 for p in begins[:2] + ends[:2]) or any(p < 0 for p in pads):
                continue
            auto_pad = attr(conv, "auto_pad", "NOTSET")
            if isinstance(auto_pad, bytes):
                auto_pad = auto_pad.decode()
            if auto_pad not in ("NOTSET", ""):
                continue
            nsp = rank - 2
            old = list(attr(conv, "pads", [0] * (2 * nsp)))
            new = [old[i] + begins[2 + i] for i in range(nsp)] + [old[nsp + i] + ends[2 + i] for i in range(nsp)]
            conv.attributes["pads"] = ir.AttrInt64s("pads", new)
            conv.replace_input_with(0, pad.inputs[0])
            graph.remove(pad, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)
