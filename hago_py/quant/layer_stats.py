"""Per-layer second-order statistics for layer-wise rounding / reconstruction.

For a weighted layer y = W x (+ b), every input row x (one sample x spatial position; im2col for Conv)
enters the reconstruction loss only through H = sum x~ x~^T, C = sum x~ x^T, G = sum x x^T and the sums of x~
and x, where x is the layer input in the FP32 model and x~ the same input in the (partially) quantized model.
This module turns a Conv / Gemm / MatMul node and a batch of its inputs into grouped rows (G, R, K) matching
the grouped weight (G, N, K), and back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import ModelError


@dataclass
class LayerGeometry:
    """How a node's weight maps to the grouped matrix form (G, N, K) and how its input becomes rows."""

    node: str
    op_type: str
    w_shape: Tuple[int, ...]
    groups: int
    attrs: Dict[str, Any]

    @classmethod
    def of(cls, node_name: str, op_type: str, attrs: Dict[str, Any], w_shape) -> "LayerGeometry":
        g = int(attrs.get("group", 1)) if op_type == "Conv" else 1
        if op_type == "Conv" and attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ModelError(f"Conv '{node_name}' uses auto_pad={attrs['auto_pad']!r}; layer-wise rounding needs "
                             "explicit pads (export the model with explicit padding)")
        if op_type == "Gemm" and attrs.get("transA", 0):
            raise ModelError(f"Gemm '{node_name}' has transA=1, not supported by layer-wise rounding")
        return cls(node_name, op_type, tuple(int(d) for d in w_shape), g, dict(attrs))

    # -- weights ---------------------------------------------------------------------------
    def to_grouped(self, w: np.ndarray) -> np.ndarray:
        """Original weight layout -> (G, N, K)."""
        if self.op_type == "Conv":
            o = w.shape[0]
            return w.reshape(self.groups, o // self.groups, -1)
        if self.op_type == "Gemm" and self.attrs.get("transB", 0):
            return w[None]                      # [N, K]
        return w.T[None]                        # MatMul / Gemm: [K, N] -> [N, K]

    def from_grouped(self, wg: np.ndarray) -> np.ndarray:
        if self.op_type == "Conv":
            return wg.reshape(self.w_shape)
        if self.op_type == "Gemm" and self.attrs.get("transB", 0):
            return wg[0]
        return wg[0].T

    def channel_to_grouped(self, v: np.ndarray) -> np.ndarray:
        """Per-output-channel vector (length N_total, or 1 for per-tensor) -> (G, N)."""
        n_total = self.w_shape[0] if self.op_type == "Conv" else (
            self.w_shape[0] if (self.op_type == "Gemm" and self.attrs.get("transB", 0)) else self.w_shape[-1])
        v = np.asarray(v)
        if v.size == 1:
            v = np.broadcast_to(v.reshape(()), (n_total,))
        return np.ascontiguousarray(v).reshape(self.groups, n_total // self.groups)

    # -- inputs ----------------------------------------------------------------------------
    def rows(self, x: np.ndarray) -> np.ndarray:
        """Layer input batch -> rows (G, R, K) in float32, in the weight's K order."""
        x = np.asarray(x, np.float32)
        if self.op_type != "Conv":
            k = x.shape[-1]
            return x.reshape(1, -1, k)
        if x.ndim != 4 or len(self.w_shape) != 4:
            raise ModelError(f"Conv '{self.node}': layer-wise rounding supports 2-D convolutions only "
                             f"(input rank {x.ndim})")
        kh, kw = self.w_shape[2], self.w_shape[3]
        pads = list(self.attrs.get("pads", [0, 0, 0, 0]))
        sh, sw = list(self.attrs.get("strides", [1, 1]))
        dh, dw = list(self.attrs.get("dilations", [1, 1]))
        if any(pads):
            x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        win = np.lib.stride_tricks.sliding_window_view(x, (eh, ew), axis=(2, 3))  # B,C,Ho',Wo',eh,ew
        win = win[:, :, ::sh, ::sw, ::dh, ::dw]                                     # B,C,Ho,Wo,kh,kw
        b, c, ho, wo = win.shape[:4]
        g = self.groups
        win = win.reshape(b, g, c // g, ho, wo, kh * kw)
        rows = win.transpose(1, 0, 3, 4, 2, 5).reshape(g, b * ho * wo, (c // g) * kh * kw)
        return np.ascontiguousarray(rows)


class StatsAccumulator:
    """Streams (x~, x) row pairs into H, C, G and the row sums, in float64."""

    def __init__(self, groups: int, k: int):
        self.h = np.zeros((groups, k, k))
        self.c = np.zeros((groups, k, k))
        self.g = np.zeros((groups, k, k))
        self.m_q = np.zeros((groups, k))
        self.m = np.zeros((groups, k))
        self.n = 0

    def add(self, rows_q: np.ndarray, rows_fp: np.ndarray, chunk: int = 65536) -> None:
        if rows_q.shape != rows_fp.shape:
            raise ModelError(f"quantized and FP32 layer inputs differ in shape {rows_q.shape} vs {rows_fp.shape}")
        r = rows_q.shape[1]
        for s in range(0, r, chunk):
            xq = rows_q[:, s:s + chunk]
            xf = rows_fp[:, s:s + chunk]
            tq = xq.transpose(0, 2, 1)
            self.h += (tq @ xq).astype(np.float64)
            self.c += (tq @ xf).astype(np.float64)
            self.g += (xf.transpose(0, 2, 1) @ xf).astype(np.float64)
            self.m_q += xq.sum(axis=1, dtype=np.float64)
            self.m += xf.sum(axis=1, dtype=np.float64)
        self.n += r


def dynamic_fake_quant(x: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeLinear + dequantize does to ``x`` (uint8, range including 0, per tensor)."""
    x = np.asarray(x, np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return ((q - zp) * scale).astype(np.float32)


def sub_model(model, outputs, inputs=None):
    """Copy of ``model`` computing only what ``outputs`` (tensor names) need, returning exactly those.

    ``inputs`` (name -> array, optional) are tensors whose values the caller supplies: the walk back stops
    there and they become graph inputs (typed from the arrays), so a model segment between two cuts can run
    from cached values."""
    import onnx

    stop = dict(inputs or {})
    producers = {}
    for i, n in enumerate(model.graph.node):
        for o in n.output:
            producers[o] = i
    keep, stack, fed = set(), list(outputs), set()
    while stack:
        t = stack.pop()
        if t in stop:
            fed.add(t)
            continue
        i = producers.get(t)
        if i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(x for x in model.graph.node[i].input if x)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(model.graph.node[i] for i in sorted(keep))
    used = {x for n in m.graph.node for x in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    vis = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    del m.graph.output[:]
    for t in outputs:
        m.graph.output.append(vis[t] if t in vis else onnx.helper.make_empty_tensor_value_info(t))
    ins = [i for i in model.graph.input if i.name in used and i.name not in stop]
    del m.graph.input[:]
    m.graph.input.extend(ins)
    for t in sorted(fed):
        a = np.asarray(stop[t])
        m.graph.input.append(onnx.helper.make_tensor_value_info(
            t, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim))
    return m
