"""Data-driven weight rounding, sequential over the layers (AdaRound, AdaQuant, FlexRound, GPTQ, bias
correction, BN re-estimation).

Layers are visited in topological order in *waves* (one layer each, unless there are more than
``max_waves``). Both the FP32 model and the partially quantized model (earlier waves rounded by their solver,
everything else nearest) are advanced from one cut of the graph to the next: the values of the tensors live
at the cut are cached for all reconstruction samples (``_Frontier``), and only the segment between two cuts
runs, with the weights solved so far. So the whole reconstruction costs one forward pass of each model,
not one prefix per layer. Each layer's input rows from the two models stream into H = sum x~x~^T,
C = sum x~x^T, G = sum xx^T (layer_stats.py), and the plan's solver for that layer turns the statistics into
integer weights (+ learned scale / bias). So each layer is fitted on the inputs it will really see
(AdaQuant's sequential mode). With more layers than ``max_waves`` consecutive layers share a wave: they see
quantized inputs from earlier waves and nearest-rounded layers inside the wave.

The result is plain data: integer weights per node (the original layout), the plan's weight scales
updated in place, and new float biases per node, applied to the model with ``apply_biases`` before realize.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..backends.ort import OrtBackend
from ..errors import ModelError
from .calibrate import progress_iter, token_rows
from .padding import token_mask_input
from .layer_stats import LayerGeometry, StatsAccumulator, dynamic_fake_quant, sub_model
from .per_token import fake_quant as per_token_fake_quant
from .observers import qrange
from .plan import LayerPlan, QuantPlan
from .weights import weight_qparams

DATA_DRIVEN = ("adaround", "adaquant", "flexround", "gptq")


def needs_reconstruction(plan: QuantPlan, opts) -> bool:
    return bool(opts.bias_correction or opts.bn_reestimate or any(
        lp.weight is not None and lp.weight.method in DATA_DRIVEN for lp in plan.quantized_layers()))


def _bias_source(model: onnx.ModelProto, node: onnx.NodeProto, consumers) -> Tuple[Optional[str], Optional[str]]:
    """(kind, initializer name) of the bias of a weighted node: ('input', name) for Conv/Gemm C input,
    ('add', name) for MatMul followed by Add of a constant, (None, None) if it has none."""
    inits = {i.name for i in model.graph.initializer}
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in inits:
        return "input", node.input[2]
    if node.op_type == "MatMul":
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            if len(other) == 1 and other[0] in inits:
                return "add", other[0]
    return None, None


def apply_biases(model: onnx.ModelProto, biases: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``model`` with the biases of the given weighted nodes replaced (added where missing)."""
    if not biases:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    uses = {}
    for n in m.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for name, b in biases.items():
        node = nodes[name]
        kind, init = _bias_source(m, node, consumers)
        b = np.asarray(b, np.float32)
        if kind is not None:
            old = numpy_helper.to_array(inits[init])
            # a broadcast bias (Gemm C of shape [1]) becomes the per-channel vector the correction computed
            arr = b.reshape(old.shape) if old.size == b.size else b
            if uses.get(init, 0) == 1:
                inits[init].CopyFrom(numpy_helper.from_array(arr, init))
            else:  # a bias shared with other nodes: this node gets its own corrected copy
                new = f"{name}/bias_corrected"
                m.graph.initializer.append(numpy_helper.from_array(arr, new))
                holder = node if kind == "input" else consumers[node.output[0]][0]
                holder.input[:] = [new if i == init else i for i in holder.input]
                uses[init] -= 1
        elif node.op_type in ("Conv", "Gemm") and (len(node.input) < 3 or not node.input[2]):
            new = f"{name}/bias_corrected"
            m.graph.initializer.append(numpy_helper.from_array(b, new))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = new
        else:
            raise ModelError(f"cannot update the bias of '{name}' ({node.op_type}): its bias is shared or it has "
                             "none; disable bias_correction / bn_reestimate for this layer")
    return m


class _Frontier:
    """Cached values, for every batch, of the tensors of one model at the current cut of the graph.

    ``advance(model, wanted)`` computes the ``wanted`` tensors from the cached ones (running only the segment
    in between, from ``model`` as it is now), then forgets everything not wanted."""

    def __init__(self, backend, batches: Sequence[Mapping[str, np.ndarray]]):
        self.be = backend
        self.batches = batches
        self.cache: List[Dict[str, np.ndarray]] = [{} for _ in batches]

    def advance(self, model: onnx.ModelProto, wanted: Sequence[str]) -> List[Dict[str, np.ndarray]]:
        wanted = list(dict.fromkeys(wanted))
        feeds = set(self.batches[0]) if self.batches else set()
        need = [t for t in wanted if t not in feeds and t not in self.cache[0]]
        if need:
            seg = sub_model(model, need, inputs=self.cache[0])
            sess = self.be.compile(seg, optimization="basic")
            ins = [i.name for i in sess.get_inputs()]
            outs = [o.name for o in sess.get_outputs()]
            for b, c in zip(self.batches, self.cache):
                src = {**b, **c}
                c.update(zip(outs, self.be.run(sess, {k: src[k] for k in ins})))
        keep = set(wanted)
        for c in self.cache:
            for k in [k for k in c if k not in keep]:
                del c[k]
        return [{t: (c[t] if t in c else b[t]) for t in wanted} for b, c in zip(self.batches, self.cache)]


def _liveness(model: onnx.ModelProto) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(producer position, last consumer position) of every node output, in graph order."""
    prod: Dict[str, int] = {}
    last: Dict[str, int] = {}
    for i, n in enumerate(model.graph.node):
        for t in n.input:
            if t:
                last[t] = i
        for t in n.output:
            prod[t] = i
    return prod, last


def _waves(order: List[str], max_waves: int) -> List[List[str]]:
    if len(order) <= max_waves:
        return [[n] for n in order]
    size = int(np.ceil(len(order) / max_waves))
    return [order[i:i + size] for i in range(0, len(order), size)]


def reconstruct(model: onnx.ModelProto, plan: QuantPlan, batches: Sequence[Mapping[str, np.ndarray]], opts, *,
                progress: bool = False, max_waves: int = 512
                ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, Any]]:
    """Round the weights of every quantized weighted layer with its plan method, sequentially.

    Returns (integer weights per node in the original layout, new float biases per node, info)."""
    from .realize import realize
    from .rounding import get_solver
    from .rounding.adaquant import bias_correction, bn_reestimate
    from .rounding.problem import LayerProblem

    t0 = time.perf_counter()
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    topo = {n.name: i for i, n in enumerate(model.graph.node)}
    layers = [lp for lp in plan.quantized_layers() if lp.weight is not None]
    layers.sort(key=lambda lp: topo.get(lp.node, 0))
    todo = [lp.node for lp in layers if lp.weight.method in DATA_DRIVEN or opts.bias_correction or opts.bn_reestimate]
    weights: Dict[str, np.ndarray] = {}
    biases: Dict[str, np.ndarray] = {}
    info: Dict[str, Any] = {"layers": {}, "waves": 0, "samples": 0}
    if not todo:
        return weights, biases, info
    be = OrtBackend(threads=opts.threads)
    n_samples = sum(len(next(iter(b.values()))) for b in batches)
    info["samples"] = n_samples
    waves = _waves(todo, max_waves)
    info["waves"] = len(waves)
    mask_name = token_mask_input(model, opts)
    info["token_mask"] = mask_name
    masked: Dict[str, int] = {}
    prod, last = _liveness(model)
    fp_front, q_front = _Frontier(be, batches), _Frontier(be, batches)
    for wave in progress_iter(waves, progress, "rounding", "wave"):
        # partially quantized model: solved layers use their weights; the rest nearest
        qmodel = realize(apply_biases(model, biases), plan.nearest_copy(weights), weights=weights)
        cut = max(topo[name] for name in wave)
        live = [t for t, p in prod.items() if p < cut and last.get(t, -1) >= cut]
        q_names = {o for n in qmodel.graph.node for o in n.output}
        q_nodes = {n.name: n for n in qmodel.graph.node}
        wanted_fp, wanted_q, dyn = [], [], {}
        for name in wave:
            lp = plan.layers[name]
            x = lp.inputs[0]
            tq = plan.activations.get(x)
            wanted_fp.append(x)
            if tq is not None and tq.mode == "static":
                # the layer's own input in the QDQ model: realize names it <x>_dequantized unless the user's graph
                # already had that name (the name allocator then picks another)
                qn = q_nodes.get(name)
                wanted_q.append(qn.input[0] if qn is not None and qn.input else f"{x}_dequantized")
                dyn[name] = None
            else:
                wanted_q.append(x)
                dyn[name] = tq if tq is not None and tq.mode == "dynamic" else None
        fp_vals = fp_front.advance(model, wanted_fp + live)
        q_vals = q_front.advance(qmodel, wanted_q + [t for t in live if t in q_names])
        geos: Dict[str, LayerGeometry] = {}
        accs: Dict[str, StatsAccumulator] = {}
        for name in wave:
            node = nodes[name]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            geos[name] = LayerGeometry.of(name, node.op_type, attrs, inits[node.input[1]].dims)
        for b, fo, qo in zip(batches, fp_vals, q_vals):
            mask = b.get(mask_name) if mask_name else None
            for name, xf_name, xq_name in zip(wave, wanted_fp, wanted_q):
                xq = qo[xq_name]
                if dyn[name] is not None and dyn[name].granularity == "per_token":
                    xq = per_token_fake_quant(xq, dyn[name].bits)  # one scale per token (quant/per_token.py)
                elif dyn[name] is not None:
                    xq = dynamic_fake_quant(xq)  # over the whole tensor, padding included, as at run time
                rq, rf = geos[name].rows(xq), geos[name].rows(fo[xf_name])
                sel = token_rows(fo[xf_name], mask) if geos[name].op_type != "Conv" else None
                if sel is not None:
                    rq, rf = rq[:, sel], rf[:, sel]
                    masked[name] = masked.get(name, 0) + int((~sel).sum())
                if name not in accs:
                    accs[name] = StatsAccumulator(rq.shape[0], rq.shape[2])
                accs[name].add(rq, rf)
        for name in wave:
            lp = plan.layers[name]
            geo, acc = geos[name], accs[name]
            t1 = time.perf_counter()
            w = numpy_helper.to_array(inits[nodes[name].input[1]]).astype(np.float32)
            tq = lp.weight
            scale, zp = weight_qparams(w, tq)
            qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
            kind, b_init = _bias_source(model, nodes[name], consumers)
            bias = None
            if kind is not None:
                bias = geo.channel_to_grouped(numpy_helper.to_array(inits[b_init]).astype(np.float32).reshape(-1))
            prob = LayerProblem(w=geo.to_grouped(w).astype(np.float32), h=acc.h, c=acc.c, g=acc.g, m_q=acc.m_q,
                                m=acc.m, n=acc.n, scale=geo.channel_to_grouped(scale).astype(np.float32),
                                zero_point=geo.channel_to_grouped(zp).astype(np.int64), qmin=qmin, qmax=qmax,
                                per_channel=tq.granularity == "per_channel" and scale.size > 1, bias=bias, name=name)
            method = tq.method if tq.method in DATA_DRIVEN else "nearest"
            k_fan = prob.w.shape[2]
            if method != "nearest" and acc.n < k_fan:
                # an underdetermined fit (e.g. the classifier after global pooling: rows = samples) would
                # overfit the few rows; keep nearest rounding for this layer and say so
                lp.notes.append(f"rounding {method} -> nearest: only {acc.n} calibration rows for fan-in {k_fan} "
                                f"(raise recon_samples to >= {k_fan} to fit it)")
                info.setdefault("fallbacks", {})[name] = f"{method} -> nearest ({acc.n} rows < K={k_fan})"
                method = "nearest"
            res = get_solver(method)(prob, seed=opts.seed, **(opts.solver_params(method) if method != "nearest" else {}))
            q, s_new, b_new = res.q, res.scale, res.bias
            linfo = {k: v for k, v in res.info.items() if isinstance(v, (int, float, str, bool))}
            can_bias = kind is not None or nodes[name].op_type in ("Conv", "Gemm")
            if not can_bias:
                linfo["bias_note"] = "MatMul without a constant bias Add: no bias to correct"
            elif opts.bn_reestimate:
                s_new, b_new = bn_reestimate(prob, q, s_new, b_new if b_new is not None else
                                             (bias if bias is not None else np.zeros(prob.scale.shape, np.float32)))
                linfo["bn_reestimate"] = True
            elif opts.bias_correction or (opts.bias_correction is None and tq.method in DATA_DRIVEN):
                b_new = bias_correction(prob, q, s_new) if b_new is None or method != "adaquant" else b_new
                linfo["bias_correction"] = True
            weights[name] = geo.from_grouped(np.asarray(q, np.int64))
            s_flat = np.asarray(s_new, np.float32).reshape(-1)
            zp_flat = np.asarray(zp).reshape(-1)
            keep = slice(None) if prob.per_channel else slice(0, 1)
            tq.scale = [float(v) for v in s_flat[keep]]
            tq.zero_point = [int(v) for v in zp_flat[keep]]
            if b_new is not None and can_bias:
                biases[name] = np.asarray(b_new, np.float32).reshape(-1)
            linfo["seconds"] = time.perf_counter() - t1
            linfo["rows"] = int(acc.n)
            if name in masked:
                linfo["padding_rows_left_out"] = masked[name]
            info["layers"][name] = linfo
            lp.notes.append(f"rounding {method}: relative reconstruction error "
                            f"{linfo.get('loss', float('nan')):.3g} (nearest {linfo.get('loss_nearest', float('nan')):.3g})"
                            + (", bias corrected" if linfo.get("bias_correction") else "")
                            + (", BN re-estimated" if linfo.get("bn_reestimate") else ""))
    info["seconds"] = time.perf_counter() - t0
    plan.history.append("reconstruct")
    return weights, biases, info
