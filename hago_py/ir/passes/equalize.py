"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.1).

For two layers y = f(W2 · g(W1 x + b1) + b2) joined by a positively homogeneous activation g
(g(s·z) = s·g(z) for s > 0: Relu, LeakyRelu, PRelu, identity), scaling output channel i of layer 1
by 1/s_i and input channel i of layer 2 by s_i leaves the function unchanged:

    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i.

The paper's choice s_i = (1 / r2_i) · sqrt(r1_i · r2_i) = sqrt(r1_i / r2_i) (r1_i: range of output
channel i of W1, r2_i: range of input channel i of W2; here the range is max|w|, the symmetric
quantization range) makes both channel ranges equal to sqrt(r1_i · r2_i), which maximises the total
per-channel precision sum_i (r1_i/R1)(r2_i/R2) when the weights are quantized per tensor.

Pairs recognised (the value between the two layers must have exactly one consumer at each step and
must not be a graph output):

* layer 1: Conv (any ``group``: scaling an output channel only touches its own filter),
  Gemm (any transA / transB / alpha / beta), MatMul with a constant 2-D weight, optionally followed
  by Add with a constant bias along the last axis (the MatMul + Add of exported Linear layers);
* activation: none, Identity, Relu, LeakyRelu, PRelu, Clip with min 0 and no max (that is Relu),
  and Clip(0, max) only with ``relu6_as_relu=True`` (see below);
* layer 2: Conv with ``group == 1`` or depthwise (``group == input channels``, any channel
  multiplier); other grouped convolutions are skipped. Gemm with transA=0, MatMul with a constant
  2-D weight. Conv pairs with Conv, Gemm/MatMul with Gemm/MatMul (a Conv output's last axis is
  spatial, not channels).

A depthwise Conv can be both layer 2 of one pair and layer 1 of the next (Conv -> DW -> Conv, the
MobileNet / EfficientNet block); such chains are equalized pair by pair in sweeps until the scales
converge (``max|log s_i| < tol``) or ``max_sweeps`` is reached.

Clip(0, 6) (ReLU6) is not positively homogeneous: after scaling, channel i would clip at 6·s_i in the
original units, and a scalar Clip cannot hold per-channel bounds. With ``relu6_as_relu=False`` (the
default) such pairs are skipped and the pass preserves the FP32 function exactly (up to float32
rounding of the rescaled weights). With ``relu6_as_relu=True`` the pass does what AIMET does: it
replaces the Clip of every equalized pair with Relu and equalizes through it. **That changes the FP32
function** (activations that used to saturate at 6 no longer do); use it only for models whose
ReLU6 rarely saturates, or when the changed function is re-validated (tests/test_equalize.py
measures the change). (A function-preserving alternative, Relu followed by a per-channel Min, would
break the Conv+Relu integer fusion, so it is not offered.)

Weights are never shared in place: a weight / bias initializer used by more than one node makes the
pair ineligible; rescaled tensors get fresh initializers (``<name>_cle``). After ``call`` the pass
instance holds ``pairs`` (the equalized (layer1, layer2) node names), ``sweeps`` and ``replaced_clips``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_ir as ir

from ._util import attr, const_array, new_initializer, single_consumer

_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")
# an output channel of layer 1 whose weight range is below this fraction of the layer's largest is dead (a folded
# BatchNorm with gamma ~ 0): it keeps s = 1. Equalizing it (s ~ sqrt(1e-13)) multiplied its bias, the channel's
# whole output, by ~1e6 and ruined the activation range (fuzz graphs:50001289: 0.05 -> 564,187, 1.1 dB)
DEAD_RANGE = 1e-6


def _is_std(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _single_use(value: Optional[ir.Value]) -> bool:
    return value is not None and len(value.uses()) == 1 and not value.is_graph_output()


class _Layer:
    """A weighted layer with float64 working copies of its weight (and bias) and channel accessors."""

    def __init__(self, node: ir.Node, kind: str, w: np.ndarray, b: Optional[np.ndarray],
                 bias_node: Optional[ir.Node], bias_idx: int, out_axis: int, in_axis: int):
        self.node = node
        self.kind = kind              # "conv" | "linear"
        self.w_dtype = w.dtype
        self.w = w.astype(np.float64)
        self.b_dtype = None if b is None else b.dtype
        self.b = None if b is None else b.astype(np.float64)
        self.bias_node = bias_node    # node holding the bias input (the layer itself or a following Add)
        self.bias_idx = bias_idx
        self.out_axis = out_axis      # weight axis of the output channels
        self.in_axis = in_axis        # weight axis of the input channels (conv: see in_rows)
        self.group = int(attr(node, "group", 1)) if kind == "conv" else 1
        self.touched_w = False
        self.touched_b = False

    @property
    def out_channels(self) -> int:
        return self.w.shape[self.out_axis]

    @property
    def in_channels(self) -> int:
        if self.kind == "conv":
            return self.w.shape[1] * self.group
        return self.w.shape[self.in_axis]

    def depthwise(self) -> bool:
        return self.kind == "conv" and self.group > 1 and self.w.shape[1] == 1

    def can_be_second(self) -> bool:
        return self.kind != "conv" or self.group == 1 or self.depthwise()

    # -- ranges --------------------------------------------------------------------------------
    def out_ranges(self) -> np.ndarray:
        a = np.moveaxis(np.abs(self.w), self.out_axis, 0)
        return a.reshape(a.shape[0], -1).max(axis=1)

    def _in_view(self) -> np.ndarray:
        """View of ``w`` with the input channel first (conv depthwise: [C, mult * k...])."""
        if self.kind == "conv" and self.group > 1:  # depthwise: in channel c <-> filters c*m .. c*m+m-1
            c = self.group
            return self.w.reshape(c, -1)
        return np.moveaxis(self.w, self.in_axis, 0)

    def in_ranges(self) -> np.ndarray:
        a = np.abs(self._in_view())
        return a.reshape(a.shape[0], -1).max(axis=1)

    # -- scaling -------------------------------------------------------------------------------
    def scale_out(self, inv: np.ndarray) -> None:
        """Output channel i multiplied by ``inv[i]`` (weights and bias)."""
        shape = [1] * self.w.ndim
        shape[self.out_axis] = -1
        self.w = self.w * inv.reshape(shape)
        self.touched_w = True
        if self.b is not None:
            n = inv.size
            b = self.b
            if b.ndim == 0 or b.shape[-1] == 1:
                b = np.broadcast_to(b, (b.shape[:-1] if b.ndim else ()) + (n,))
            self.b = b * inv
            self.touched_b = True

    def scale_in(self, s: np.ndarray) -> None:
        """Input channel i multiplied by ``s[i]``."""
        if self.kind == "conv" and self.group > 1:
            c = self.group
            m = self.w.shape[0] // c
            self.w = self.w * np.repeat(s, m).reshape((-1,) + (1,) * (self.w.ndim - 1))
        else:
            shape = [1] * self.w.ndim
            shape[self.in_axis] = -1
            self.w = self.w * s.reshape(shape)
        self.touched_w = True


class CrossLayerEqualizationPass(ir.passes.InPlacePass):
    """Equalize the per-channel weight ranges of consecutive layers (see the module docstring).

    relu6_as_relu: equalize through Clip(0, max) by replacing it with Relu (changes the FP32 function;
        AIMET's behaviour). Default False: such pairs are skipped.
    max_sweeps / tol: iterate over all pairs until every scale of a sweep is within ``tol`` of 1 in
        log space, or ``max_sweeps`` sweeps.
    """

    def __init__(self, relu6_as_relu: bool = False, max_sweeps: int = 50, tol: float = 1e-6):
        super().__init__()
        self.relu6_as_relu = bool(relu6_as_relu)
        self.max_sweeps = int(max_sweeps)
        self.tol = float(tol)
        self.pairs: List[Tuple[str, str]] = []
        self.sweeps = 0
        self.replaced_clips: List[str] = []

    # -- pattern matching ------------------------------------------------------------------------
    def _layer(self, node: ir.Node) -> Optional[_Layer]:
        if not _is_std(node) or node.op_type not in ("Conv", "Gemm", "MatMul"):
            return None
        if len(node.inputs) < 2 or not _single_use(node.inputs[1]):
            return None
        w = const_array(node.inputs[1])
        if w is None or w.dtype.kind != "f":
            return None
        bias_node, bias_idx, b = None, -1, None
        if node.op_type == "Conv":
            if w.ndim < 3 or int(attr(node, "group", 1)) < 1 or w.shape[0] % int(attr(node, "group", 1)):
                return None
            out_axis, in_axis, kind = 0, 1, "conv"
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                b = const_array(node.inputs[2])
                if b is None or not _single_use(node.inputs[2]) or b.shape != (w.shape[0],):
                    return None
                bias_node, bias_idx = node, 2
        else:
            if w.ndim != 2:
                return None
            kind = "linear"
            trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
            out_axis, in_axis = (0, 1) if trans_b else (1, 0)
            n = w.shape[out_axis]
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                b = const_array(node.inputs[2])
                if b is None or not _single_use(node.inputs[2]) or not _bias_ok(b, n):
                    return None
                bias_node, bias_idx = node, 2
            elif node.op_type == "MatMul":
                add = single_consumer(node.outputs[0])
                if add is not None and _is_std(add) and add.op_type == "Add":
                    other = 1 if add.inputs[0] is node.outputs[0] else 0
                    ob = const_array(add.inputs[other])
                    if ob is not None and _single_use(add.inputs[other]) and ob.ndim == 1 and ob.shape[0] == n \
                            and ob.dtype.kind == "f":
                        b, bias_node, bias_idx = ob, add, other
        return _Layer(node, kind, w, b, bias_node, bias_idx, out_axis, in_axis)

    def _activation(self, node: ir.Node) -> Optional[str]:
        """'homogeneous', 'relu6' (Clip(0, max)) or None for an op that blocks equalization."""
        if not _is_std(node):
            return None
        if node.op_type in _HOMOGENEOUS:
            if node.op_type == "PRelu":
                return "homogeneous" if const_array(node.inputs[1]) is not None else None
            return "homogeneous"
        if node.op_type != "Clip":
            return None
        if "min" in node.attributes or "max" in node.attributes:  # opset < 11: attributes
            lo, hi = attr(node, "min", None), attr(node, "max", None)
        else:  # opset >= 11: optional constant inputs
            bounds = []
            for k in (1, 2):
                v = node.inputs[k] if len(node.inputs) > k else None
                a = const_array(v) if v is not None else None
                if v is not None and a is None:
                    return None  # bound computed at run time
                bounds.append(a)
            lo, hi = bounds
        lo = None if lo is None else float(np.asarray(lo).reshape(-1)[0])
        hi = None if hi is None else float(np.asarray(hi).reshape(-1)[0])
        if lo is None or lo != 0.0:
            return None
        if hi is None or math.isinf(hi) and hi > 0:
            return "homogeneous"  # Clip(0, +inf) is Relu
        return "relu6" if hi > 0 else None

    def _next_layer(self, layer: _Layer, layers: Dict[ir.Node, _Layer]):
        """(second layer, activation nodes, clip nodes to replace) following ``layer``, or None."""
        v = (layer.bias_node if layer.bias_node is not None and layer.bias_node is not layer.node
             else layer.node).outputs[0]
        acts, clips = [], []
        while True:
            nxt = single_consumer(v)
            if nxt is None:
                return None
            if nxt in layers:
                second = layers[nxt]
                if nxt.inputs[0] is not v or not second.can_be_second() or second.kind != layer.kind:
                    return None
                if second.node.op_type == "Gemm" and attr(second.node, "transA", 0):
                    return None
                if second.in_channels != layer.out_channels:
                    return None
                return second, acts, clips
            kind = self._activation(nxt)
            if kind is None or nxt.inputs[0] is not v or len(nxt.outputs) != 1:
                return None
            if kind == "relu6":
                if not self.relu6_as_relu:
                    return None
                clips.append(nxt)
            acts.append(nxt)
            v = nxt.outputs[0]

    # -- the pass -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.pairs, self.sweeps, self.replaced_clips = [], 0, []
        layers: Dict[ir.Node, _Layer] = {}
        for node in graph:
            lay = self._layer(node)
            if lay is not None:
                layers[node] = lay
        pairs: List[Tuple[_Layer, _Layer, List[ir.Node]]] = []
        for node in graph:  # graph order: chains are visited front to back
            if node not in layers:
                continue
            found = self._next_layer(layers[node], layers)
            if found is not None:
                pairs.append((layers[node], found[0], found[2]))
        if not pairs:
            return ir.passes.PassResult(model, modified=False)

        for sweep in range(max(self.max_sweeps, 1)):
            worst = 0.0
            for l1, l2, _ in pairs:
                r1, r2 = l1.out_ranges(), l2.in_ranges()
                ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
                if ok.any():  # dead channels (BN gamma ~ 0): scaling would only multiply their constant bias output
                    ok &= r1 >= DEAD_RANGE * float(r1[ok].max())
                s = np.ones_like(r1)
                s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]  # the paper's s_i = sqrt(r1_i r2_i) / r2_i
                l1.scale_out(1.0 / s)
                l2.scale_in(s)
                worst = max(worst, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
            self.sweeps = sweep + 1
            if worst < self.tol:
                break

        for lay in layers.values():
            if lay.touched_w:
                old = lay.node.inputs[1]
                nv = new_initializer(graph, (old.name or "weight") + "_cle", lay.w.astype(lay.w_dtype))
                lay.node.replace_input_with(1, nv)
            if lay.touched_b and lay.b is not None:
                old = lay.bias_node.inputs[lay.bias_idx]
                nv = new_initializer(graph, (old.name or "bias") + "_cle", lay.b.astype(lay.b_dtype))
                lay.bias_node.replace_input_with(lay.bias_idx, nv)
        for _, _, clips in pairs:
            for clip in clips:
                if clip.graph is None:
                    continue
                relu = ir.Node("", "Relu", [clip.inputs[0]], name=clip.name, num_outputs=1)
                graph.insert_before(clip, relu)
                out_name = clip.outputs[0].name
                ir.convenience.replace_all_uses_with(clip.outputs[0], relu.outputs[0], replace_graph_outputs=True)
                graph.remove(clip, safe=False)
                relu.outputs[0].name = out_name
                self.replaced_clips.append(clip.name or out_name)
        self.pairs = [(l1.node.name, l2.node.name) for l1, l2, _ in pairs]

        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)


def _bias_ok(b: np.ndarray, n: int) -> bool:
    """A Gemm bias C whose last axis is per output channel (or broadcast over it)."""
    if b.dtype.kind != "f" or b.ndim > 2:
        return False
    return b.ndim == 0 or b.shape[-1] in (1, n)
