"""Activation smoothing (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", section 4).

Transformer activations have a few outlier channels (after LayerNorm, a handful of hidden dimensions are
10-20x larger than the median one). A per-tensor activation scale (static, or dynamic as in ORT's
DynamicQuantizeMatMul) is set by those outliers, and every other channel keeps only a few levels. For
Y = X W the per-input-channel scale s_k moves the difficulty from the activation to the weight without
changing the function:

    Y = (X diag(s)^-1) (diag(s) W),     s_k = max|X_k|^alpha / max|W_k,:|^(1 - alpha)

(max|X_k| over the calibration data, max|W_k,:| over the row k of every weight that consumes X; alpha = 0.5
is the paper's choice for BERT/OPT-sized models). The weights are quantized per output channel, so the
row scaling costs them little.

Where it applies: a tensor X produced by LayerNormalization (the paper's QKV and FC1 inputs) and consumed
as the first input of MatMul nodes with a constant 2-D weight (or Gemm with transA=0), each weight used by
that node only. Two realisations, both exact in real arithmetic:

* *folded*: when the MatMuls are X's only consumers (pre-LN transformers) the 1/s goes into the
  LayerNorm's scale and bias: no extra op;
* *Mul*: otherwise (post-LN BERT: X is also the residual input of the next Add) a ``Mul(X, 1/s)`` feeds
  the smoothed MatMuls only, leaving the residual path untouched (one elementwise op per tensor).

Rows of padding tokens (``mask == 0``) are left out of max|X_k| by the caller. After ``call`` the pass
instance holds ``smoothed``: per tensor, the layers, how it was realised and the outlier ratio
max_k / median_k of max|X_k| before and after.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx_ir as ir

from ._util import attr, const_array, new_initializer

SMOOTH_PRODUCERS = ("LayerNormalization",)


def _weight_rows(node: ir.Node) -> Optional[np.ndarray]:
    """The constant weight of a MatMul / Gemm(transA=0) as [K, N] (rows = input channels), or None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or len(node.inputs[1].uses()) != 1:
        return None
    if node.op_type == "MatMul":
        return w
    if node.op_type == "Gemm" and not attr(node, "transA", 0):
        return w.T if attr(node, "transB", 0) else w
    return None


def smoothable(model: ir.Model) -> Dict[str, List[str]]:
    """Tensor name -> the MatMul / Gemm nodes whose first input it is and that can absorb its scale."""
    out: Dict[str, List[str]] = {}
    for node in model.graph:
        if node.op_type not in SMOOTH_PRODUCERS or node.domain not in ("", "ai.onnx") or not node.outputs:
            continue
        x = node.outputs[0]
        users = [u.node for u in x.uses() if u.idx == 0 and u.node.op_type in ("MatMul", "Gemm")
                 and _weight_rows(u.node) is not None]
        if users and x.name:
            out[x.name] = [u.name for u in users]
    return out


def smoothing_scales(absmax: np.ndarray, weight_rows: List[np.ndarray], alpha: float) -> np.ndarray:
    """s_k = max|X_k|^alpha / max|W_k|^(1-alpha); channels never active (or all-zero weights) keep s = 1."""
    a = np.asarray(absmax, np.float64)
    w = np.max([np.abs(r).max(axis=1) for r in weight_rows], axis=0).astype(np.float64)
    s = np.ones_like(a)
    ok = (a > 0) & (w > 0)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def _outlier_ratio(a: np.ndarray) -> float:
    med = float(np.median(a))
    return float(a.max() / med) if med > 0 else float("inf")


class SmoothActivationsPass(ir.passes.InPlacePass):
    """Apply SmoothQuant scales to the tensors in ``absmax`` (per-channel max|X| from calibration)."""

    def __init__(self, absmax: Mapping[str, np.ndarray], alpha: float = 0.5):
        super().__init__()
        self.absmax = dict(absmax)
        self.alpha = float(alpha)
        self.smoothed: List[Dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = smoothable(model)
        nodes = {n.name: n for n in model.graph}
        graph = model.graph
        for tname, layer_names in groups.items():
            if tname not in self.absmax:
                continue
            layers = [nodes[n] for n in layer_names]
            rows = [_weight_rows(n) for n in layers]
            a = np.asarray(self.absmax[tname], np.float64)
            if any(a.shape != (r.shape[0],) for r in rows):
                continue
            s = smoothing_scales(a, rows, self.alpha)
            producer = layers[0].inputs[0].producer()
            x = producer.outputs[0]
            for n, r in zip(layers, rows):
                new = (r.astype(np.float64) * s[:, None]).astype(np.float32)
                if n.op_type == "Gemm" and attr(n, "transB", 0):
                    new = new.T
                n.replace_input_with(1, new_initializer(graph, f"{n.inputs[1].name}_smooth", new))
            inv = (1.0 / s).astype(np.float32)
            rank = len(x.shape) if x.shape is not None else None
            foldable = (len(x.uses()) == len(layers) and not x.is_graph_output() and len(producer.inputs) >= 2
                        and attr(producer, "axis", -1) in (-1, (rank or 0) - 1)
                        and all(v is not None and const_array(v) is not None and len(v.uses()) == 1
                                and const_array(v).shape[-1:] == a.shape for v in producer.inputs[1:3]))
            if foldable:
                for i in range(1, len(producer.inputs)):
                    p = const_array(producer.inputs[i]).astype(np.float64) * inv
                    producer.replace_input_with(i, new_initializer(graph, f"{producer.inputs[i].name}_smooth",
                                                                   p.astype(np.float32)))
                how = "folded into " + producer.name
            else:
                inv_val = new_initializer(graph, f"{tname}_smooth_inv", inv)
                mul = ir.Node("", "Mul", [x, inv_val], name=f"{producer.name}/smooth", num_outputs=1)
                mul.outputs[0].name = f"{tname}_smoothed"
                graph.insert_after(producer, mul)
                for n in layers:
                    n.replace_input_with(0, mul.outputs[0])
                how = "Mul"
            self.smoothed.append({"tensor": tname, "layers": layer_names, "how": how, "alpha": self.alpha,
                                  "outlier_ratio_before": round(_outlier_ratio(a), 2),
                                  "outlier_ratio_after": round(_outlier_ratio(a / s), 2)})
        return ir.passes.PassResult(model, modified=bool(self.smoothed))
