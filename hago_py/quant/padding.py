"""Dynamic activation ranges from real tokens only (QuantOptions.mask_padding, on by default).

A per-tensor dynamic quantizer (``DynamicQuantizeLinear``; ONNX Runtime fuses it into DynamicQuantizeMatMul)
takes its range from every row of its run, padding included. Sentence encoders run on padded batches (MiniLM-L6
on STS-B: 64 positions, 8-15 real tokens), and there the LayerNorm outputs of the padding positions reach 1.2-2.4x
the real tokens' range, so every real token is quantized on a coarser grid than its own rows need. Attention and
pooling mask the padding positions out; their values matter only through that range.

Where the model has a token mask input (``QuantOptions.token_mask``: a [batch, seq] input whose zeros mark
padding) and the padding rows widen a dynamic per-tensor MatMul input's range by more than ``PAD_WIDEN`` on the
calibration samples (median over samples, each run alone), realize zeroes those rows before the quantizer::

    m3 = Unsqueeze(Cast<float>(Not(Equal(mask, 0))), axes=[-1])    # once per graph: [batch, seq, 1]
    x' = Mul(x, m3)                                               # DynamicQuantizeLinear(x') as before

A zero row adds nothing to the range (which always holds 0), so the real tokens are quantized as if their run
held no padding. The cost is one Mul per masked tensor, and the outputs at padding positions are no longer the
FP32 model's (those of real positions are unaffected: padding reaches them only through the range). Only
tensors whose inferred shape is [d0, d1, K] with (d0, d1) the mask's own dimensions (same symbols or sizes) are
masked; the comparisons against FP32 that judge a model (sanity check, search proxy) use the real rows only
(``real_rows``).

That padding reaches real positions only through the range holds where attention masks the padding keys; a graph
that mixes positions without masking them (or pools over every position) does not have it. So a tensor is masked
only after ``padding_free`` has shown, on the FP32 model and CHECK_SAMPLES calibration samples, that zeroing its
padding rows leaves the real rows of every output unchanged (to float reordering); the others keep every row in
their range and the report says why. The same check guards the static ranges calibrated on real rows only.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import ModelError
from ..ir.names import NameAllocator
from ..ir.passes._util import named_node, new_initializer

PAD_WIDEN = 1.05   # mask a tensor when the padding rows widen its dynamic range by more than 5 % (median sample)
PAD_SAMPLES = 32   # calibration samples the widening is measured on
CHECK_SAMPLES = 8  # calibration samples the padding-free check runs on
CHECK_RTOL = 1e-4  # real-row outputs must agree to this fraction of their largest magnitude (float reordering only)


def token_mask_input(model: onnx.ModelProto, opts) -> Optional[str]:
    """The graph input whose zeros mark padding tokens (see QuantOptions.token_mask), or None."""
    names = {i.name for i in model.graph.input}
    want = getattr(opts, "token_mask", None)
    if want == "auto":
        return "attention_mask" if "attention_mask" in names else None
    if want and want not in names:
        raise ModelError(f"option token_mask={want!r} names no graph input (inputs: {', '.join(sorted(names))}); "
                         "pass the padding-mask input's name, or None")
    return want or None


def _dims(t) -> Optional[Tuple]:
    """Dimensions of a ValueInfoProto as (symbol or size, ...); None when its shape or a dimension is unknown."""
    tt = t.type.tensor_type
    if not tt.HasField("shape"):
        return None
    out = []
    for d in tt.shape.dim:
        if d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        elif d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            return None
    return tuple(out)


def maskable(model: onnx.ModelProto, names: Sequence[str], mask_input: str) -> List[str]:
    """The tensors of ``names`` whose inferred shape is [d0, d1, K] with (d0, d1) the dims of ``mask_input``.
    Symbols come from ONNX Runtime's symbolic shape inference, which carries the inputs' dimension names through
    Gather / Reshape / LayerNormalization (ONNX's own names them afresh); a model it cannot infer gets no mask."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - any failure of the helper only means: no tensor is proven token-wise
        return []
    if model is None:
        return []
    g = model.graph
    mask = next((i for i in g.input if i.name == mask_input), None)
    md = _dims(mask) if mask is not None else None
    if md is None or len(md) != 2:
        return []
    shapes = {v.name: _dims(v) for v in list(g.value_info) + list(g.input) + list(g.output)}
    return [n for n in names if (shapes.get(n) or ()) and len(shapes[n]) == 3 and shapes[n][:2] == md]


def token_wise(pipe, names: Sequence[str], mask_input: str) -> List[str]:
    """``maskable`` on the pipeline's prepared model, cached per (mask, tensor) on the pipeline."""
    cache = pipe._token_wise
    todo = [n for n in names if (mask_input, n) not in cache]
    if todo:
        ok = set(maskable(pipe.prepared, todo, mask_input))
        for n in todo:
            cache[(mask_input, n)] = n in ok
    return [n for n in names if cache[(mask_input, n)]]


def _range(x: np.ndarray) -> float:
    return float(max(x.max(initial=0.0), 0.0) - min(x.min(initial=0.0), 0.0))


def widening(model: onnx.ModelProto, names: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]],
             mask_input: str, *, threads: int = 1) -> Dict[str, float]:
    """{tensor: median over samples of (dynamic range over all rows) / (range over the real rows)}: how much the
    padding widens each [batch, seq, K] tensor's per-tensor dynamic range when a sample runs alone."""
    from .calibrate import tensor_pass

    names = list(names)
    if not names:
        return {}
    ratios: Dict[str, List[float]] = {n: [] for n in names}
    for batch, outs in tensor_pass(model, names, batches, threads=threads):
        mask = batch.get(mask_input)
        if mask is None:
            continue
        mask = np.asarray(mask) != 0
        for n in names:
            x = np.asarray(outs[n], np.float32)
            if x.ndim != 3 or x.shape[:2] != mask.shape:
                continue
            for i in range(x.shape[0]):
                real = x[i][mask[i]]
                r = _range(real) if real.size else 0.0
                if r > 0:
                    ratios[n].append(_range(x[i]) / r)
    return {n: float(np.median(v)) for n, v in ratios.items() if v}


def _zeroed(model: onnx.ModelProto, tensors: Sequence[str], mask_input: str) -> onnx.ModelProto:
    """Copy of ``model`` in which every reader of each tensor in ``tensors`` reads it with its padding rows zeroed."""
    from ..ir.io import to_ir, to_proto
    from .realize import _values_by_name

    m = to_ir(model)
    g = m.graph
    names = NameAllocator.for_graph(g)
    vals = _values_by_name(g)
    cache: Dict = {}
    for t in tensors:
        v = vals.get(t)
        uses = list(v.uses()) if v is not None else []
        if not uses:
            continue
        zv = masked_input(g, names, v, mask_input, uses[0].node, cache)
        for u in uses:
            u.node.replace_input_with(u.idx, zv)
    g.sort()
    return to_proto(m)


def padding_free(pipe, tensors: Sequence[str], mask_input: str, threads: int = 1) -> List[str]:
    """The tensors of ``tensors`` whose padding rows do not reach the real rows of any output: zeroing them changes no
    real row of the FP32 model's outputs on CHECK_SAMPLES calibration samples (outputs that are not token-wise are
    compared whole). All at once first, then one by one where that fails; cached per (mask, tensor) on ``pipe``."""
    from ..backends.ort import OrtBackend

    cache = pipe._padding_free
    todo = [t for t in tensors if (mask_input, t) not in cache]
    if todo:
        batches = pipe.first_batches(CHECK_SAMPLES, exact=True)
        be = OrtBackend(threads=threads)
        ref_sess = be.compile(pipe.prepared, optimization="basic")
        refs = [be.run(ref_sess, b) for b in batches]

        def unchanged(ts) -> bool:
            try:
                return _compare(ts)
            except Exception:  # noqa: BLE001 - a graph the check cannot rewrite or run (e.g. uses in subgraphs)
                return False   # is not shown padding-free: it keeps every row

        def _compare(ts) -> bool:
            sess = be.compile(_zeroed(pipe.prepared, ts, mask_input), optimization="basic")
            for b, ref in zip(batches, refs):
                mask = b.get(mask_input)
                if mask is None:
                    return False
                for r, o in zip(ref, be.run(sess, b)):
                    r, o = real_rows(np.asarray(r), mask), real_rows(np.asarray(o), mask)
                    if not np.issubdtype(r.dtype, np.floating):
                        if not np.array_equal(r, o):
                            return False
                        continue
                    r, o = r.astype(np.float64), o.astype(np.float64)
                    finite = np.isfinite(r)
                    if not np.array_equal(finite, np.isfinite(o)):
                        return False
                    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
                    if finite.any() and float(np.abs(r[finite] - o[finite]).max()) > CHECK_RTOL * scale + 1e-12:
                        return False
            return True

        if unchanged(todo):
            cache.update({(mask_input, t): True for t in todo})
        else:
            for t in todo:
                cache[(mask_input, t)] = unchanged([t])
    keep = [t for t in tensors if cache[(mask_input, t)]]
    return keep


def mark(pipe, plan, opts) -> Dict[str, float]:
    """Set ``pad_mask`` on the plan's dynamic per-tensor activations that padding widens (see the module
    docstring) and note it on the layers reading them; returns {tensor: widening} of the masked tensors."""
    mask_input = token_mask_input(pipe.prepared, opts)
    if not opts.mask_padding or mask_input is None:
        return {}
    dyn = sorted(n for n, tq in plan.activations.items()
                 if tq.mode == "dynamic" and tq.granularity == "per_tensor" and tq.shared_with is None)
    cand = token_wise(pipe, dyn, mask_input)
    cache = pipe._pad_widening
    todo = [n for n in cand if (mask_input, n) not in cache]
    if todo:
        got = widening(pipe.prepared, todo, pipe.first_batches(PAD_SAMPLES, exact=True), mask_input,
                       threads=opts.threads)
        for n in todo:
            cache[(mask_input, n)] = got.get(n)
    widened = [n for n in cand if (cache.get((mask_input, n)) or 0.0) > PAD_WIDEN]
    free = set(padding_free(pipe, widened, mask_input, threads=opts.threads))
    out = {}
    for n in widened:
        w = cache[(mask_input, n)]
        if n not in free:
            for lp in plan.quantized_layers():
                if lp.inputs and lp.inputs[0] == n:
                    lp.notes.append(f"dynamic input range over every row, padding included: zeroing its padding rows "
                                    f"({mask_input} = 0) would change the real rows of the outputs (the graph mixes "
                                    "positions without masking the padding)")
            continue
        tq = plan.activations[n]
        tq.pad_mask = mask_input
        tq.stats["padding_widening"] = round(w, 3)
        out[n] = round(w, 3)
    for lp in plan.quantized_layers():
        if lp.inputs and lp.inputs[0] in out:
            lp.notes.append(f"dynamic input range from real tokens only: its padding rows ({mask_input} = 0) are "
                            f"zeroed before the quantizer (they widened the range x{out[lp.inputs[0]]:.2f} on the "
                            "calibration samples); outputs at padding positions are not FP32's")
    return out


def masked_input(graph: ir.Graph, names: NameAllocator, x: ir.Value, mask_input: str, before: ir.Node,
                 cache: Dict) -> ir.Value:
    """``Mul(x, m3)`` inserted before ``before``; m3 (the [batch, seq, 1] float 0/1 mask) is built once."""
    key = ("pad_mask", mask_input)
    if key not in cache:
        mask = next((v for v in graph.inputs if v.name == mask_input), None)
        if mask is None:
            raise ValueError(f"token mask input '{mask_input}' is not a graph input")
        nodes = []
        if mask.dtype == ir.DataType.BOOL:
            keep = mask
        else:
            zero = new_initializer(graph, f"{mask_input}_zero", np.zeros((), mask.dtype.numpy()), names)
            eq = named_node(names, "Equal", [mask, zero], f"{mask_input}/is_padding", [f"{mask_input}_is_padding"])
            nt = named_node(names, "Not", eq.outputs, f"{mask_input}/is_token", [f"{mask_input}_is_token"])
            nodes += [eq, nt]
            keep = nt.outputs[0]
        cast = named_node(names, "Cast", [keep], f"{mask_input}/to_float", [f"{mask_input}_float"],
                          {"to": ir.AttrInt64("to", int(ir.DataType.FLOAT))})
        nodes.append(cast)
        if graph.opset_imports.get("", 13) >= 13:
            axes = new_initializer(graph, f"{mask_input}_row_axes", np.asarray([-1], np.int64), names)
            unsq = named_node(names, "Unsqueeze", [cast.outputs[0], axes], f"{mask_input}/rows",
                              [f"{mask_input}_rows"])
        else:
            unsq = named_node(names, "Unsqueeze", cast.outputs, f"{mask_input}/rows", [f"{mask_input}_rows"],
                              {"axes": ir.AttrInt64s("axes", [-1])})
        nodes.append(unsq)
        graph.insert_before(next(iter(graph)), nodes)
        cache[key] = unsq.outputs[0]
    base = x.name or before.name
    mul = named_node(names, "Mul", [x, cache[key]], f"{base}/zero_padding", [f"{base}_padding_zeroed"])
    graph.insert_before(before, mul)
    return mul.outputs[0]


def real_rows(o: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """``o`` with its padding rows set to 0 when it is token-wise ([batch, seq, ...] under a [batch, seq] mask);
    otherwise ``o`` unchanged. Comparisons against FP32 use it: padding outputs are not preserved (see above)."""
    if mask is None:
        return o
    mask = np.asarray(mask)
    if o.ndim < 2 or mask.ndim != 2 or tuple(o.shape[:2]) != tuple(mask.shape):
        return o
    keep = (mask != 0).reshape(mask.shape + (1,) * (o.ndim - 2))
    return np.where(keep, o, np.zeros((), o.dtype))
