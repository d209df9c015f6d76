"""A small interpreter that runs an ONNX graph (or a sub-graph given by node names) with torch ops.

It is differentiable end to end (gradients flow to any tensor fed or substituted through a hook), which
is what block reconstruction (BRECQ) needs; it is not a general ONNX runtime. PyTorch is an optional
extra: importing this module never imports torch, constructing a :class:`TorchGraph` does.

Hooks let a caller change the computation without rewriting the graph:

* ``value_hook(name, tensor) -> tensor`` runs on every tensor as it is produced (and on fed tensors):
  fake-quantize an activation, or turn a tensor into a leaf to take a gradient with respect to it.
* ``input_hook(node_name, index, tensor) -> tensor`` runs on every input of a node as it is consumed:
  substitute a fake-quantized weight, or quantize one consumer's input (dynamic quantization).

Supported ops: see ``SUPPORTED_OPS``; any other op is an ``OptionError`` naming the node and the op.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import DataError, ModelError, OptionError
from ..ir.blocks import node_names

TORCH_REQUIREMENT = "pip install -e .[torch] (torch==2.13.0)"

torch = None   # set by _torch() on first use
F = None


def _torch(purpose: str = "the torch interpreter (hago_py.quant.torch_lower)"):
    """Import torch, or raise OptionError saying how to install it."""
    global torch, F
    try:
        import torch as _t
        import torch.nn.functional as _F
    except ImportError:
        raise OptionError(f"{purpose} needs PyTorch: {TORCH_REQUIREMENT}") from None
    torch, F = _t, _F
    return _t


# -- helpers -----------------------------------------------------------------------------------------

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def _tdtype(onnx_type: int, where: str):
    name = _DTYPES.get(int(onnx_type))
    if name is None:
        raise OptionError(f"{where}: ONNX element type {onnx.TensorProto.DataType.Name(onnx_type)} is not "
                          "supported by the torch interpreter")
    return getattr(torch, name)


def _from_numpy(a: np.ndarray):
    a = np.asarray(a)
    if a.dtype == np.uint16 or a.dtype == np.uint32:
        a = a.astype(np.int64)
    return torch.from_numpy(np.array(a, copy=True))


def _ints(t) -> List[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _attrs(node: onnx.NodeProto) -> Dict[str, object]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out[a.name] = v
    return out


def _is_float(t) -> bool:
    return t.is_floating_point()


def _bcast_reduce(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def _pads_begin_end(pads: Sequence[int], nd: int):
    pads = list(pads) if pads else [0] * (2 * nd)
    return pads[:nd], pads[nd:]


def _auto_pads(auto_pad: str, in_sp, kernel, strides, dilations):
    begins, ends = [], []
    for i, k, s, d in zip(in_sp, kernel, strides, dilations):
        out = -(-i // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - i)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins, ends


def _spatial_pads(x, a, kernel, strides, dilations):
    nd = x.dim() - 2
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _auto_pads(auto_pad, list(x.shape[2:]), kernel, strides, dilations)
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    return _pads_begin_end(a.get("pads"), nd)


def _torch_pad_list(begins, ends):
    """F.pad wants (last_begin, last_end, prev_begin, prev_end, ...)."""
    out = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    return out


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# -- op implementations: fn(graph, node, attrs, inputs) -> list of outputs --------------------------------

def _conv(g, n, a, ins):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = x.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    begins, ends = _spatial_pads(x, a, kernel, strides, dil)
    if begins != ends:
        x = F.pad(x, _torch_pad_list(begins, ends))
        padding = 0
    else:
        padding = tuple(begins)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if conv is None:
        raise OptionError(f"node '{n}': Conv with {nd} spatial dims is not supported by the torch interpreter")
    return [conv(x, w, b, stride=tuple(strides), padding=padding, dilation=tuple(dil), groups=int(a.get("group", 1)))]


def _pool_prep(x, a, pad_value):
    nd = x.dim() - 2
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    begins, ends = _spatial_pads(x, a, kernel, strides, dil)
    if any(begins) or any(ends):
        x = F.pad(x, _torch_pad_list(begins, ends), value=pad_value)
    return x, nd, kernel, strides, dil, begins, ends


def _maxpool(g, n, a, ins):
    if len(g.node_outputs(n)) > 1 and g.node_outputs(n)[1]:
        raise OptionError(f"node '{n}': MaxPool with an Indices output is not supported by the torch interpreter")
    x, nd, kernel, strides, dil, _, _ = _pool_prep(ins[0], a, float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return [pool(x, kernel, strides, 0, dil, ceil_mode=bool(a.get("ceil_mode", 0)))]


def _avgpool(g, n, a, ins):
    x0 = ins[0]
    x, nd, kernel, strides, dil, begins, ends = _pool_prep(x0, a, 0.0)
    if any(d != 1 for d in dil):
        raise OptionError(f"node '{n}': AveragePool with dilations is not supported by the torch interpreter")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    ceil = bool(a.get("ceil_mode", 0))
    s = pool(x, kernel, strides, 0, ceil_mode=ceil)
    if any(begins) or any(ends) or ceil:
        # divisor: the elements inside the (padded, if count_include_pad) input in each window
        ones = torch.ones((1, 1) + tuple(x0.shape[2:]), dtype=x0.dtype)
        value = 1.0 if int(a.get("count_include_pad", 0)) else 0.0
        mask = F.pad(ones, _torch_pad_list(begins, ends), value=value)
        s = s / pool(mask, kernel, strides, 0, ceil_mode=ceil)
    return [s]


def _gemm(g, n, a, ins):
    A, B = ins[0], ins[1]
    if a.get("transA", 0):
        A = A.transpose(0, 1)
    if a.get("transB", 0):
        B = B.transpose(0, 1)
    y = A @ B
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = alpha * y
    if len(ins) > 2 and ins[2] is not None:
        y = y + (beta * ins[2] if beta != 1.0 else ins[2])
    return [y]


def _div(g, n, a, ins):
    x, y = ins
    if not _is_float(x):
        return [torch.div(x, y, rounding_mode="trunc")]
    return [x / y]


def _pow(g, n, a, ins):
    x, y = ins
    return [torch.pow(x, y).to(x.dtype)]


def _clip(g, n, a, ins):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
    if lo is not None and not isinstance(lo, (int, float)):
        lo = lo.reshape(())
    if hi is not None and not isinstance(hi, (int, float)):
        hi = hi.reshape(())
    if lo is None and hi is None:
        return [x]
    return [torch.clamp(x, lo, hi)]


def _softmax_like(fn):
    def op(g, n, a, ins):
        x = ins[0]
        if g.opset < 13:
            axis = _normalize_axis(int(a.get("axis", 1)), x.dim())
            shape = x.shape
            return [fn(x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1), 1).reshape(shape)]
        return [fn(x, int(a.get("axis", -1)))]
    return op


def _reduce_axes(g, n, a, ins, input_axes_opset):
    x = ins[0]
    if g.opset >= input_axes_opset:
        axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else []
    else:
        axes = list(a.get("axes", []))
    if not axes:
        if int(a.get("noop_with_empty_axes", 0)):
            return x, None
        axes = list(range(x.dim()))
    return x, [_normalize_axis(ax, x.dim()) for ax in axes]


def _reduce(kind, input_axes_opset):
    def op(g, n, a, ins):
        x, axes = _reduce_axes(g, n, a, ins, input_axes_opset)
        if axes is None:
            return [x]
        keep = bool(a.get("keepdims", 1))
        if kind == "mean":
            return [x.mean(dim=axes, keepdim=keep)]
        if kind == "sum":
            return [x.sum(dim=axes, keepdim=keep)]
        y = x
        for ax in sorted(axes, reverse=True):
            y = (y.amax if kind == "max" else y.amin)(dim=ax, keepdim=keep)
        return [y]
    return op


def _flatten(g, n, a, ins):
    x = ins[0]
    axis = _normalize_axis(int(a.get("axis", 1)), x.dim())
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return [x.reshape(lead, -1)]


def _reshape(g, n, a, ins):
    x = ins[0]
    shape = _ints(ins[1])
    if not int(a.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _transpose(g, n, a, ins):
    x = ins[0]
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return [x.permute(*perm)]


def _unsqueeze(g, n, a, ins):
    x = ins[0]
    axes = _ints(ins[1]) if g.opset >= 13 else list(a["axes"])
    rank = x.dim() + len(axes)
    for ax in sorted(_normalize_axis(ax, rank) for ax in axes):
        x = x.unsqueeze(ax)
    return [x]


def _squeeze(g, n, a, ins):
    x = ins[0]
    if g.opset >= 13:
        axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    else:
        axes = a.get("axes")
    if axes is None:
        return [x.squeeze()] if x.dim() else [x]
    for ax in sorted((_normalize_axis(ax, x.dim()) for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return [x]


def _concat(g, n, a, ins):
    xs = [x for x in ins if x is not None]
    return [torch.cat(xs, dim=int(a["axis"]))]


def _gather(g, n, a, ins):
    data, idx = ins
    axis = _normalize_axis(int(a.get("axis", 0)), data.dim())
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))]


def _slice(g, n, a, ins):
    x = ins[0]
    if g.opset >= 10:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = _normalize_axis(ax, x.dim())
        dim = x.shape[ax]
        if sp == 0:
            raise OptionError(f"node '{n}': Slice step 0 is invalid")
        st = st + dim if st < 0 else st
        en = en + dim if en < 0 else en
        if sp > 0:
            st, en = min(max(st, 0), dim), min(max(en, 0), dim)
            if sp == 1:
                x = x.narrow(ax, st, max(0, en - st))
                continue
        else:
            st, en = min(max(st, 0), dim - 1), min(max(en, -1), dim - 1)
        idx = torch.arange(st, en, sp, dtype=torch.int64)
        x = x.index_select(ax, idx)
    return [x]


def _shape(g, n, a, ins):
    shape = list(ins[0].shape)
    start, end = a.get("start", 0), a.get("end")
    return [torch.tensor(shape[start:end] if end is not None else shape[start:], dtype=torch.int64)]


def _size(g, n, a, ins):
    return [torch.tensor(int(ins[0].numel()), dtype=torch.int64)]


def _cast(g, n, a, ins):
    return [ins[0].to(_tdtype(a["to"], f"node '{n}'"))]


def _constant(g, n, a, ins):
    if "value" in a:
        return [_from_numpy(numpy_helper.to_array(a["value"]))]
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in a:
            return [_from_numpy(np.asarray(a[key], dt))]
    raise OptionError(f"node '{n}': Constant with attributes {sorted(a)} is not supported by the torch interpreter")


def _constant_of_shape(g, n, a, ins):
    shape = _ints(ins[0])
    v = a.get("value")
    val = numpy_helper.to_array(v).reshape(-1) if v is not None else np.zeros(1, np.float32)
    return [torch.full(shape, val[0].item(), dtype=_from_numpy(val).dtype)]


def _where(g, n, a, ins):
    return [torch.where(ins[0].to(torch.bool), ins[1], ins[2])]


def _expand(g, n, a, ins):
    x = ins[0]
    out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(ins[1])))
    return [x.expand(out)]


def _layernorm(g, n, a, ins):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = _normalize_axis(int(a.get("axis", -1)), x.dim())
    eps = float(a.get("epsilon", 1e-5))
    norm_shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == norm_shape and (bias is None or tuple(bias.shape) == norm_shape):
        return [F.layer_norm(x, norm_shape, scale, bias, eps)]
    dims = tuple(range(axis, x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * scale
    return [y + bias if bias is not None else y]


def _batchnorm(g, n, a, ins):
    x, scale, bias, mean, var = ins[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + float(a.get("epsilon", 1e-5)))
    return [(x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)]


def _pad(g, n, a, ins):
    x = ins[0]
    mode = a.get("mode", "constant")
    if g.opset >= 11:
        pads = _ints(ins[1])
        value = ins[2].reshape(()).item() if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    else:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
        axes = list(range(x.dim()))
    k = len(axes)
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, ax in enumerate(axes):
        ax = _normalize_axis(ax, x.dim())
        begins[ax], ends[ax] = pads[i], pads[i + k]
    first = next((i for i in range(x.dim()) if begins[i] or ends[i]), x.dim())
    plist = _torch_pad_list(begins[first:], ends[first:])
    if not plist:
        return [x]
    if mode == "constant":
        return [F.pad(x, plist, mode="constant", value=value)]
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        raise OptionError(f"node '{n}': Pad mode '{mode}' is not supported by the torch interpreter")
    return [F.pad(x, plist, mode=tmode)]


def _split(g, n, a, ins):
    x = ins[0]
    axis = _normalize_axis(int(a.get("axis", 0)), x.dim())
    outs = g.node_outputs(n)
    if g.opset >= 13:
        split = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    else:
        split = list(a["split"]) if "split" in a else None
    if split is None:
        k = int(a.get("num_outputs", len(outs)))
        size = -(-x.shape[axis] // k)
        split = [min(size, x.shape[axis] - i * size) for i in range(k)]
    return list(torch.split(x, split, dim=axis))


def _range(g, n, a, ins):
    start, limit, delta = (v.reshape(()).item() for v in ins)
    return [torch.arange(start, limit, delta, dtype=ins[0].dtype)]


def _gelu(g, n, a, ins):
    return [F.gelu(ins[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")]


def _unary(fn):
    return lambda g, n, a, ins: [fn(ins[0])]


def _binary(fn):
    return lambda g, n, a, ins: [fn(ins[0], ins[1])]


_OPS: Dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _binary(lambda x, y: torch.matmul(x, y)),
    "Add": _binary(lambda x, y: x + y),
    "Sub": _binary(lambda x, y: x - y),
    "Mul": _binary(lambda x, y: x * y),
    "Div": _div,
    "Pow": _pow,
    "Relu": _unary(lambda x: torch.relu(x)),
    "LeakyRelu": lambda g, n, a, ins: [F.leaky_relu(ins[0], float(a.get("alpha", 0.01)))],
    "Clip": _clip,
    "Sigmoid": _unary(lambda x: torch.sigmoid(x)),
    "HardSigmoid": lambda g, n, a, ins: [torch.clamp(float(a.get("alpha", 0.2)) * ins[0] + float(a.get("beta", 0.5)),
                                                     0.0, 1.0)],
    "HardSwish": _unary(lambda x: F.hardswish(x)),
    "Tanh": _unary(lambda x: torch.tanh(x)),
    "Erf": _unary(lambda x: torch.erf(x)),
    "Gelu": _gelu,
    "Sqrt": _unary(lambda x: torch.sqrt(x)),
    "Exp": _unary(lambda x: torch.exp(x)),
    "Log": _unary(lambda x: torch.log(x)),
    "Neg": _unary(lambda x: -x),
    "Abs": _unary(lambda x: torch.abs(x)),
    "Reciprocal": _unary(lambda x: 1.0 / x),
    "Min": lambda g, n, a, ins: [_bcast_reduce(torch.minimum, ins)],
    "Max": lambda g, n, a, ins: [_bcast_reduce(torch.maximum, ins)],
    "Sum": lambda g, n, a, ins: [_bcast_reduce(lambda x, y: x + y, ins)],
    "Softmax": _softmax_like(lambda x, ax: torch.softmax(x, ax)),
    "LogSoftmax": _softmax_like(lambda x, ax: torch.log_softmax(x, ax)),
    "ReduceMean": _reduce("mean", 18),
    "ReduceSum": _reduce("sum", 13),
    "ReduceMax": _reduce("max", 18),
    "ReduceMin": _reduce("min", 18),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "AveragePool": _avgpool,
    "MaxPool": _maxpool,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Gather": _gather,
    "Slice": _slice,
    "Split": _split,
    "Shape": _shape,
    "Size": _size,
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Where": _where,
    "Equal": _binary(lambda x, y: torch.eq(x, y)),
    "Less": _binary(lambda x, y: torch.lt(x, y)),
    "Greater": _binary(lambda x, y: torch.gt(x, y)),
    "Not": _unary(lambda x: torch.logical_not(x)),
    "Expand": _expand,
    "LayerNormalization": _layernorm,
    "BatchNormalization": _batchnorm,
    "Pad": _pad,
    "Identity": _unary(lambda x: x),
    "Dropout": _unary(lambda x: x),
}
SUPPORTED_OPS = tuple(sorted(_OPS))
_MULTI_OUTPUT_OK = {"Split", "Dropout"}


class TorchGraph:
    """An ONNX graph, or the sub-graph of ``nodes`` (node names), executable with torch ops.

    Initializers and constant sub-expressions (Constant nodes and nodes computed from constants only) are
    converted / evaluated once, here. ``run`` executes only the nodes needed for the requested outputs.
    """

    def __init__(self, model: onnx.ModelProto, nodes: Optional[Iterable[str]] = None, *, _parent=None):
        _torch()
        if _parent is not None:
            self._share(_parent, nodes)
            return
        g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.names = node_names(model)
        self.protos = {nm: n for nm, n in zip(self.names, g.node)}
        self.attrs = {nm: _attrs(n) for nm, n in zip(self.names, g.node)}
        self.graph_inputs = [i.name for i in g.input]
        self.graph_outputs = [o.name for o in g.output]
        self.constants: Dict[str, object] = {}
        for init in g.initializer:
            self.constants[init.name] = _from_numpy(numpy_helper.to_array(init))
        self.graph_inputs = [i for i in self.graph_inputs if i not in self.constants]
        self.order = [nm for nm in self._topo(g)]
        self.producer = {o: nm for nm in self.order for o in self.protos[nm].output if o}
        # fold constant sub-expressions once
        with torch.no_grad():
            for nm in self.order:
                n = self.protos[nm]
                if n.op_type in _OPS and all((not t) or t in self.constants for t in n.input) \
                        and n.domain in ("", "ai.onnx"):
                    try:
                        outs = self._exec(nm, [self.constants[t] if t else None for t in n.input])
                    except Exception:   # leave it to run time, where errors name the node
                        continue
                    for o, v in zip(n.output, outs):
                        if o:
                            self.constants[o] = v
        self._select(nodes)

    # -- construction helpers ---------------------------------------------------------------------
    def _topo(self, g):
        known = set(self.graph_inputs) | set(self.constants) | {""}
        remaining = list(self.names)
        out = []
        while remaining:
            progressed = False
            rest = []
            for nm in remaining:
                n = self.protos[nm]
                if all(t in known for t in n.input):
                    out.append(nm)
                    known.update(n.output)
                    progressed = True
                else:
                    rest.append(nm)
            if not progressed:
                missing = sorted({t for nm in rest for t in self.protos[nm].input if t not in known})
                raise ModelError(f"node '{rest[0]}' reads tensor(s) {', '.join(missing[:3])} that no node, input or "
                                 "initializer provides (or the graph has a cycle)")
            remaining = rest
        return out

    def _share(self, parent: "TorchGraph", nodes):
        for k in ("opset", "names", "protos", "attrs", "graph_inputs", "graph_outputs", "constants", "order",
                  "producer"):
            setattr(self, k, getattr(parent, k))
        self._select(nodes)

    def _select(self, nodes):
        if nodes is None:
            sel = [nm for nm in self.order if not self._folded(nm)]
        else:
            nodes = set(nodes)
            unknown = sorted(nodes - set(self.protos))
            if unknown:
                raise ModelError(f"torch interpreter: node(s) {', '.join(unknown[:5])} are not in the model")
            sel = [nm for nm in self.order if nm in nodes and not self._folded(nm)]
        for nm in sel:
            n = self.protos[nm]
            if n.domain not in ("", "ai.onnx") or n.op_type not in _OPS:
                dom = f"{n.domain}." if n.domain not in ("", "ai.onnx") else ""
                raise OptionError(f"node '{nm}': op {dom}{n.op_type} is not supported by the torch interpreter "
                                  "used for block reconstruction (supported: hago_py.quant.torch_lower."
                                  "SUPPORTED_OPS); use a layer-wise rounding method for this model")
        self.selected = sel
        self._sel_set = set(sel)
        self._plans: Dict = {}

    def _folded(self, nm: str) -> bool:
        outs = [o for o in self.protos[nm].output if o]
        return bool(outs) and all(o in self.constants for o in outs)

    def subgraph(self, nodes: Iterable[str]) -> "TorchGraph":
        """The sub-graph of ``nodes`` sharing this graph's converted initializers and folded constants."""
        return TorchGraph(None, nodes, _parent=self)

    def node_outputs(self, name: str) -> List[str]:
        return list(self.protos[name].output)

    def external_inputs(self) -> List[str]:
        """Tensors the selected nodes read that they do not produce (constants excluded)."""
        produced = {o for nm in self.selected for o in self.protos[nm].output}
        out: List[str] = []
        for nm in self.selected:
            for t in self.protos[nm].input:
                if t and t not in produced and t not in self.constants and t not in out:
                    out.append(t)
        return out

    def default_outputs(self) -> List[str]:
        if len(self.selected) == len([nm for nm in self.order if not self._folded(nm)]):
            return list(self.graph_outputs)
        used = {t for nm in self.selected for t in self.protos[nm].input}
        outs = [o for nm in self.selected for o in self.protos[nm].output if o]
        return [o for o in outs if o not in used or o in self.graph_outputs]

    # -- execution ---------------------------------------------------------------------------------
    def _exec(self, nm: str, inputs: List):
        n = self.protos[nm]
        try:
            outs = _OPS[n.op_type](self, nm, self.attrs[nm], inputs)
        except (OptionError, ModelError, DataError):
            raise
        except Exception as e:
            shapes = [tuple(x.shape) if x is not None else None for x in inputs]
            raise ModelError(f"node '{nm}' ({n.op_type}) failed in the torch interpreter on input shapes "
                             f"{shapes}: {e}") from e
        return outs

    def _plan(self, outputs: Sequence[str], fed: frozenset):
        key = (tuple(outputs), fed)
        if key in self._plans:
            return self._plans[key]
        needed_nodes = set()
        stack = list(outputs)
        seen = set()
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in fed or t in self.constants:
                continue
            nm = self.producer.get(t)
            if nm is None or nm not in self._sel_set:
                where = "a graph input" if t in self.graph_inputs else "produced outside this (sub-)graph"
                raise DataError(f"tensor '{t}' is needed but not fed: it is {where}; pass it in feeds")
            if nm not in needed_nodes:
                needed_nodes.add(nm)
                stack.extend(self.protos[nm].input)
        sched = [nm for nm in self.selected if nm in needed_nodes]
        last_use: Dict[str, int] = {}
        for k, nm in enumerate(sched):
            for t in self.protos[nm].input:
                if t:
                    last_use[t] = k
        keep = set(outputs)
        frees = [[] for _ in sched]
        for t, k in last_use.items():
            if t not in keep and t not in self.constants:
                frees[k].append(t)
        plan = (sched, frees)
        self._plans[key] = plan
        return plan

    def run(self, feeds: Mapping[str, object], outputs: Optional[Sequence[str]] = None, *,
            value_hook: Optional[Callable] = None, input_hook: Optional[Callable] = None,
            hook_feeds: bool = True) -> Dict[str, object]:
        """Compute ``outputs`` (default: the graph outputs, or for a sub-graph the tensors it leaves) from
        ``feeds`` (name -> torch tensor or numpy array). Returns {name: torch tensor}."""
        outputs = list(outputs) if outputs is not None else self.default_outputs()
        env: Dict[str, object] = {}
        for k, v in feeds.items():
            if not torch.is_tensor(v):
                v = _from_numpy(np.asarray(v))
            if value_hook is not None and hook_feeds:
                v = value_hook(k, v)
            env[k] = v
        sched, frees = self._plan(outputs, frozenset(env))
        consts = self.constants
        for k, nm in enumerate(sched):
            n = self.protos[nm]
            ins = []
            for i, t in enumerate(n.input):
                if not t:
                    ins.append(None)
                    continue
                v = env[t] if t in env else consts[t]
                if input_hook is not None:
                    v = input_hook(nm, i, v)
                ins.append(v)
            outs = self._exec(nm, ins)
            for o, v in zip(n.output, outs):
                if o:
                    if value_hook is not None:
                        v = value_hook(o, v)
                    env[o] = v
            for t in frees[k]:
                env.pop(t, None)
        return {o: (env[o] if o in env else consts[o]) for o in outputs}


def run_numpy(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None
              ) -> List[np.ndarray]:
    """Run ``model`` with the torch interpreter (no gradients) and return numpy arrays, like ORT's run."""
    _torch()
    g = TorchGraph(model)
    with torch.no_grad():
        env = g.run(feeds, outputs)
    names = list(outputs) if outputs is not None else g.graph_outputs
    return [env[o].detach().cpu().numpy() for o in names]
