"""LAPQ: loss-aware post-training quantization of the activation clipping ranges
(Nahshan et al., "Loss Aware Post-training Quantization", Machine Learning 2021).

``lapq(model, plan, batches)`` re-chooses the clipping range of every statically quantized activation
of a calibrated plan by looking at the *network* loss instead of each tensor's own error:

1. **Lp initialisation.** For each p in ``p_values`` every tensor gets the range minimising its own
   E|x - Q(x)|^p, estimated from an exact histogram of its calibration values (the observers of
   :mod:`hago_py.quant.observers`; the histograms are re-collected on ``batches``). The network loss of
   each p is measured. The paper fits a quadratic in p; here the best of the grid is taken, plus one
   extra evaluation at the vertex of a quadratic fitted to the grid losses when that vertex is a
   minimum strictly inside the grid (so: best of grid + fitted vertex).
2. **Joint Powell search.** From the best start, all clipping values are optimised together with
   Powell's method (``scipy.optimize.minimize(method="Powell")``, bounded) on the network loss. Each
   tensor is parametrised as ``log m_t`` with its range ``m_t * (lo_t, hi_t)`` (the start range scaled
   by a multiplier), so every coordinate has the same scale; bounds are ``m_t in [0.05, ratio_t * 1.05]``
   where ``ratio_t`` takes the start range to the tensor's min/max range. The number of network
   evaluations over the whole run (plan as given, Lp grid and Powell) never exceeds ``max_evals``.

The best point seen is kept, including the plan as given, so the result is never worse (on
``batches``) than the start. Ranges are turned into (scale, zero point) by the same
``qparams_from_range`` the observers use, with each tensor's dtype / bits / symmetry / narrow.
Two-sided asymmetric tensors keep the ratio lo/hi of their start range (one multiplier per tensor,
as in the paper's one clipping value per tensor).

Network loss: the plan is realized once (:func:`hago_py.quant.realize.realize`) and turned into a
*simulation model* whose activation scale / zero-point initializers (``<tensor>_scale`` /
``<tensor>_zero_point``, found through the ``<tensor>/quantize`` nodes) are graph inputs, so one ORT
session (basic optimization: Q/DQ stay float ops, the fake-quant arithmetic of the deployed graph)
serves every evaluation; only the feeds change. The int32 bias of a layer depends on its input scale
(bias scale = s_x * s_w); the simulation recomputes it in the graph from the fed s_x exactly as
realize does (float64 division, round half to even, int32 clip, DequantizeLinear with
float32(s_x * s_w)), so each evaluation equals realizing the plan with those qparams. Activation
dtypes ORT cannot feed (int4 / uint4) fall back to realizing the model for every evaluation (slow,
identical results). The default loss ``"mse"`` is sum ||y_fp - y_q||^2 / sum ||y_fp||^2 over all
outputs and batches; ``"kl"`` is the mean KL(softmax(y_fp) || softmax(y_q)) over the last axis of the
first output (classifier logits); a callable ``loss(outputs_fp, outputs_q) -> float`` receives, per
batch, the list of output arrays of each model.

Only activation clipping is optimised; weights keep their rounding. ``model`` is the prepared FP32
model the plan was annotated on (the one realize takes). With ``weights`` (pre-rounded integer weights
per layer, as for realize) the simulation uses them.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..backends.ort import OrtBackend
from ..errors import DataError, InternalError, ModelError, OptionError
from .calibrate import calibration_targets, collect_tensors
from .observers import qparams_from_range, qrange
from .plan import QuantPlan, TensorQuant
from .realize import realize

__all__ = ["lapq", "LOSSES", "lp_range"]

LOSSES = ("mse", "kl")
_FEEDABLE = {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16}
_ZP_ONNX = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "uint16": TensorProto.UINT16,
            "int16": TensorProto.INT16}
_MIN_MULT = 0.05


class _BudgetExhausted(Exception):
    pass


# ----------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------
def _mse_loss(fp: List[List[np.ndarray]], q: List[List[np.ndarray]]) -> float:
    num = den = 0.0
    for bf, bq in zip(fp, q):
        for a, b in zip(bf, bq):
            a = np.asarray(a, np.float64)
            num += float(np.sum((a - np.asarray(b, np.float64)) ** 2))
            den += float(np.sum(a * a))
    return num / max(den, 1e-30)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl_loss(fp: List[List[np.ndarray]], q: List[List[np.ndarray]]) -> float:
    tot, n = 0.0, 0
    for bf, bq in zip(fp, q):
        lp = _log_softmax(np.asarray(bf[0], np.float64))
        lq = _log_softmax(np.asarray(bq[0], np.float64))
        kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
        tot += float(kl.sum())
        n += kl.size
    return tot / max(n, 1)


def _loss_fn(loss) -> Tuple[str, Callable]:
    if callable(loss):
        return getattr(loss, "__name__", "callable"), loss
    key = str(loss).strip().lower() if isinstance(loss, str) else None
    if key == "mse":
        return "mse", _mse_loss
    if key == "kl":
        return "kl", _kl_loss
    raise OptionError(f"lapq: unknown loss {loss!r}; use one of {', '.join(LOSSES)} or a callable "
                      "loss(outputs_fp, outputs_q) -> float")


# ----------------------------------------------------------------------------------------------------
# Lp-optimal clipping from a histogram
# ----------------------------------------------------------------------------------------------------
def _candidates(obs, tq: TensorQuant, n: int = 400) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate ranges alpha * (full range), with their clip bounds and scales."""
    lo0, hi0 = min(obs.min, 0.0), max(obs.max, 0.0)
    alphas = np.unique(np.concatenate([np.geomspace(1e-3, 1.0, n), np.linspace(0.5, 1.0, n // 4)]))
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    bounds = np.empty((alphas.size, 2))
    scales = np.empty(alphas.size)
    for k, a in enumerate(alphas):
        s, zp = qparams_from_range(a * lo0, a * hi0, tq.dtype, tq.bits, tq.symmetric, tq.narrow)
        bounds[k] = (s * (qmin - zp), s * (qmax - zp))
        scales[k] = s
    return alphas, bounds, scales


def lp_range(obs, tq: TensorQuant, p: float) -> Tuple[float, float]:
    """Range ``alpha * (min, max)`` minimising the histogram estimate of E|x - Q(x)|^p.

    A bin (centre c) inside the clip interval costs the uniform-rounding-noise term (s/2)^p / (p+1)
    per value, outside |c - clamp(c)|^p; exact zeros cost nothing (0 is always representable).
    ``obs`` is a histogram observer (``hist``, ``min``, ``max``, ``zeros``) that has seen data.
    """
    lo0, hi0 = min(obs.min, 0.0), max(obs.max, 0.0)
    if lo0 == hi0:
        return 0.0, 0.0
    left, right, cnt = obs.hist.signed_bins(obs.min, obs.max, obs.zeros)
    keep = (cnt > 0) & ~((left == 0.0) & (right == 0.0))
    c, n = (0.5 * (left + right))[keep], cnt[keep]
    if n.size == 0:
        return 0.0, 0.0
    alphas, bounds, scales = _candidates(obs, tq)
    a, b = bounds[:, :1], bounds[:, 1:]
    out = np.abs(c[None, :] - np.clip(c[None, :], a, b)) ** p           # (candidates, bins)
    inside = (c[None, :] >= a) & (c[None, :] <= b)
    cost = (out * n[None, :]).sum(axis=1) + (inside * n[None, :]).sum(axis=1) * (scales / 2.0) ** p / (p + 1.0)
    k = int(cost.size - 1 - np.argmin(cost[::-1]))  # widest range on ties
    return float(alphas[k] * lo0), float(alphas[k] * hi0)


# ----------------------------------------------------------------------------------------------------
# evaluation of a set of activation qparams
# ----------------------------------------------------------------------------------------------------
def _plan_range(tq: TensorQuant) -> Tuple[float, float]:
    """The float range a calibrated TensorQuant stands for (the observer's, when it reproduces the qparams)."""
    r = (tq.stats or {}).get("range") or {}
    if "lo" in r and "hi" in r:
        try:
            if qparams_from_range(r["lo"], r["hi"], tq.dtype, tq.bits, tq.symmetric, tq.narrow) == \
                    (float(tq.scale[0]), int(tq.zero_point[0])):
                return float(r["lo"]), float(r["hi"])
        except OptionError:
            pass
    qmin, qmax = qrange(tq.dtype, tq.bits, tq.narrow)
    s, zp = float(tq.scale[0]), int(tq.zero_point[0])
    return s * (qmin - zp), s * (qmax - zp)


def _quantize_nodes(graph) -> Dict[str, Tuple[Any, Any]]:
    """{quantized tensor: (its QuantizeLinear, the Clip before it or None)}. realize clips an activation quantized
    to fewer bits than its container (A4 in uint8) to its bits' range before the QuantizeLinear."""
    producer = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or not n.input:
            continue
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "Clip" and len(p.input) == 3 and "/clip_to_bits" in p.name:
            out[p.input[0]] = (n, p)
        else:
            out.setdefault(n.input[0], (n, None))
    return out


def _activation_point_inputs(graph) -> Dict[str, List[Dict[str, str]]]:
    """{tensor: [{role: initializer}]} of the multipoint two-point inputs reading ``tensor`` (quant/widen.py
    activation_points: Clip(lo1, hi1) -> Q/DQ(s1, z1) -> x1; Clip(x - x1, lo2, hi2) -> Q/DQ(s2, z2)): their grids
    follow the tensor's qparams, so LAPQ feeds them too."""
    consumers: Dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(value, op):
        return next((c for c in consumers.get(value, ()) if c.op_type == op), None)

    out: Dict[str, List[Dict[str, str]]] = {}
    for c1 in graph.node:
        if c1.op_type != "Clip" or "/act_clip1" not in c1.name or len(c1.input) != 3:
            continue
        q1 = only(c1.output[0], "QuantizeLinear")
        dq1 = only(q1.output[0], "DequantizeLinear") if q1 is not None else None
        sub = only(dq1.output[0], "Sub") if dq1 is not None else None
        c2 = only(sub.output[0], "Clip") if sub is not None else None
        q2 = only(c2.output[0], "QuantizeLinear") if c2 is not None else None
        if q2 is None or len(q1.input) < 3 or len(q2.input) < 3 or len(c2.input) != 3:
            raise InternalError(f"lapq: the two-point input at node '{c1.name}' does not have the structure "
                                "quant/widen.py builds; please report it (clipping='mse' avoids LAPQ)")
        out.setdefault(c1.input[0], []).append({"lo1": c1.input[1], "hi1": c1.input[2], "s1": q1.input[1],
                                                "z1": q1.input[2], "lo2": c2.input[1], "hi2": c2.input[2],
                                                "s2": q2.input[1]})
    return out


class _Simulator:
    """Network loss of activation qparams {tensor: (scale, zero_point)} on fixed batches."""

    def __init__(self, model, plan: QuantPlan, batches, loss_fn, threads: int, weights=None):
        self.plan = plan
        self.batches = batches
        self.loss_fn = loss_fn
        self.backend = OrtBackend(threads=threads)
        self.weights = weights
        fp_sess = self.backend.compile(model, optimization="basic")
        self.fp_outputs = [self.backend.run(fp_sess, b) for b in batches]
        self.model = model
        self.static = [n for n, tq in plan.activations.items() if tq.mode == "static"]
        self.evaluations = 0
        # weights the data-driven rounding has not solved yet (it runs after LAPQ) are nearest here
        qmodel = realize(model, plan.nearest_copy(weights or {}), weights=weights)
        # a planned tensor that only feeds a graph output has its Q/DQ removed as unused by realize: nothing to feed
        q_in = set(_quantize_nodes(qmodel.graph))
        self.static = [t for t in self.static if t in q_in]
        self.fast = all(plan.resolve(t).dtype in _FEEDABLE for t in self.static)
        self.feeds: Dict[str, Tuple[str, str]] = {}
        self.clip_feeds: Dict[str, Tuple[str, str]] = {}  # narrow activations (A4 in uint8): Clip min / max inputs
        self.act_feeds: Dict[str, List[Dict[str, str]]] = {}  # multipoint two-point inputs of a tensor
        if self.fast:
            sim = self._simulation_model(qmodel, model)
            self.sess = self.backend.compile(sim, optimization="basic")
        else:
            self._work = QuantPlan.from_dict(plan.to_dict())

    # -- simulation graph ---------------------------------------------------------------------------
    def _simulation_model(self, qmodel: onnx.ModelProto, fp_model: onnx.ModelProto) -> onnx.ModelProto:
        sim = onnx.ModelProto()
        sim.CopyFrom(qmodel)
        g = sim.graph
        inits = {i.name: i for i in g.initializer}
        q_of = _quantize_nodes(g)
        drop = set()
        for t in self.static:
            qn, clip = q_of.get(t, (None, None))
            if qn is None:
                raise InternalError(f"lapq: the realized model has no QuantizeLinear for tensor '{t}'; please "
                                    "report it (clipping='mse' avoids LAPQ)")
            s_name, z_name = qn.input[1], qn.input[2]
            self.feeds[t] = (s_name, z_name)
            drop.update((s_name, z_name))
            g.input.append(helper.make_tensor_value_info(s_name, TensorProto.FLOAT, []))
            g.input.append(helper.make_tensor_value_info(z_name, _ZP_ONNX[self.plan.resolve(t).dtype], []))
            if clip is not None:  # fewer bits than the container: realize's clip bounds move with the fed qparams
                self.clip_feeds[t] = (clip.input[1], clip.input[2])
                drop.update(clip.input[1:3])
                for c in clip.input[1:3]:
                    g.input.append(helper.make_tensor_value_info(c, TensorProto.FLOAT, []))
        for t, groups in _activation_point_inputs(g).items():
            if t not in self.feeds:
                continue
            self.act_feeds[t] = groups
            for grp in groups:
                for role, name in grp.items():
                    drop.add(name)
                    g.input.append(helper.make_tensor_value_info(
                        name, _ZP_ONNX[self.plan.resolve(t).dtype] if role == "z1" else TensorProto.FLOAT, []))
        kept = [i for i in g.initializer if i.name not in drop]
        del g.initializer[:]
        g.initializer.extend(kept)

        # int32 biases follow the fed input scale, as in realize: bq = rint(b / f32(s_x * s_w)) clipped
        fp_inits = {i.name: i for i in fp_model.graph.initializer}
        fp_nodes = {n.name: n for n in fp_model.graph.node}
        nodes = {n.name: n for n in g.node}
        producer = {o: n for n in g.node for o in n.output}

        def dq_input(layer: str, idx: int):
            """The DequantizeLinear feeding input ``idx`` of ``layer`` in the realized graph (by structure, not by
            name: realize's names get suffixes on collisions, and tied weights share one DQ)."""
            n = nodes.get(layer)
            p = producer.get(n.input[idx]) if n is not None and len(n.input) > idx else None
            return p if p is not None and p.op_type == "DequantizeLinear" else None

        for lp in self.plan.quantized_layers():
            bdq = dq_input(lp.node, 2)
            wdq = dq_input(lp.node, 1)
            if bdq is None or wdq is None or not lp.inputs or lp.inputs[0] not in self.feeds:
                continue
            fpn = fp_nodes.get(lp.node)
            if fpn is None or len(fpn.input) < 3 or fpn.input[2] not in fp_inits:
                raise ModelError(f"lapq: the bias of layer '{lp.node}' is not an initializer of the FP32 model; "
                                 "run the prepare passes (constant folding) before lapq")
            b = numpy_helper.to_array(fp_inits[fpn.input[2]]).astype(np.float64)
            ws = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float64)
            bq = numpy_helper.to_array(inits[bdq.input[0]]) if bdq.input[0] in inits else None
            if bq is not None and b.size != bq.size and b.size == 1:  # Gemm C broadcast to [N] by realize
                b = np.full(bq.shape, b.reshape(-1)[0])
            if bq is not None and b.size != bq.size:  # a widened layer (multipoint rows): its int32 bias stays as
                continue  # realized for the plan's input scale (a small error in the simulation only)
            b = b.reshape(-1) if bq is not None else b
            ws = np.broadcast_to(ws, b.shape) if ws.size == 1 else ws
            pre = f"lapq/{lp.node}/bias"
            xs = self.feeds[lp.inputs[0]][0]
            new_inits = [numpy_helper.from_array(np.ascontiguousarray(b), pre + "/b64"),
                         numpy_helper.from_array(np.ascontiguousarray(ws, dtype=np.float64), pre + "/ws64"),
                         numpy_helper.from_array(np.array(-2.0 ** 31), pre + "/lo"),
                         numpy_helper.from_array(np.array(2.0 ** 31 - 1), pre + "/hi")]
            g.initializer.extend(new_inits)
            D, F = TensorProto.DOUBLE, TensorProto.FLOAT
            new_nodes = [
                helper.make_node("Cast", [xs], [pre + "/xs64"], to=D, name=pre + "/cast_xs"),
                helper.make_node("Mul", [pre + "/xs64", pre + "/ws64"], [pre + "/bs64"], name=pre + "/mul"),
                helper.make_node("Cast", [pre + "/bs64"], [pre + "/bs"], to=F, name=pre + "/cast_bs"),
                helper.make_node("Cast", [pre + "/bs"], [pre + "/bs_d"], to=D, name=pre + "/cast_bs_d"),
                helper.make_node("Div", [pre + "/b64", pre + "/bs_d"], [pre + "/ratio"], name=pre + "/div"),
                helper.make_node("Round", [pre + "/ratio"], [pre + "/round"], name=pre + "/round"),
                helper.make_node("Clip", [pre + "/round", pre + "/lo", pre + "/hi"], [pre + "/clip"],
                                 name=pre + "/clip"),
                helper.make_node("Cast", [pre + "/clip"], [pre + "/bq"], to=TensorProto.INT32, name=pre + "/cast_q"),
                helper.make_node("DequantizeLinear", [pre + "/bq", pre + "/bs"] + [z for z in bdq.input[2:3] if z],
                                 list(bdq.output), axis=0, name=bdq.name),
            ]
            pos = list(g.node).index(bdq)
            g.node.remove(bdq)
            for k, n in enumerate(new_nodes):
                g.node.insert(pos + k, n)
        used = {i for n in g.node for i in n.input}
        kept = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(kept)
        return sim

    # -- evaluation ------------------------------------------------------------------------------------
    def loss(self, qp: Mapping[str, Tuple[float, int]]) -> float:
        """qp: {calibration target: (scale, zero point)}; shared tensors follow their source."""
        self.evaluations += 1
        if self.fast:
            feed_q = {}
            for t, (s_name, z_name) in self.feeds.items():
                src = self.plan.resolve(t)
                s, z = qp[src.tensor]
                feed_q[s_name] = np.array(s, np.float32)
                feed_q[z_name] = np.array(z, _FEEDABLE[src.dtype])
                qmin, qmax = qrange(src.dtype, src.bits, src.narrow)
                if t in self.clip_feeds:
                    feed_q[self.clip_feeds[t][0]] = np.array((qmin - z) * s, np.float32)
                    feed_q[self.clip_feeds[t][1]] = np.array((qmax - z) * s, np.float32)
                for grp in self.act_feeds.get(t, ()):  # as multipoint.refresh_activation_points sets them
                    s2, z2 = float(s) / float(2 ** src.bits), (qmin + qmax + 1) // 2
                    vals = {"lo1": (qmin - z) * s, "hi1": (qmax - z) * s, "s1": s, "lo2": (qmin - z2) * s2,
                            "hi2": (qmax - z2) * s2, "s2": s2}
                    for role, name in grp.items():
                        feed_q[name] = (np.array(z, _FEEDABLE[src.dtype]) if role == "z1"
                                        else np.array(vals[role], np.float32))
            outs = [self.backend.run(self.sess, {**b, **feed_q}) for b in self.batches]
        else:
            work = self._work
            for t in self.static:
                src = self.plan.resolve(t)
                s, z = qp[src.tensor]
                work.activations[t].scale, work.activations[t].zero_point = [float(s)], [int(z)]
            qm = realize(self.model, work.nearest_copy(self.weights or {}), weights=self.weights)
            sess = self.backend.compile(qm, optimization="basic")
            outs = [self.backend.run(sess, b) for b in self.batches]
        val = float(self.loss_fn(self.fp_outputs, outs))
        return val if math.isfinite(val) else math.inf


# ----------------------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------------------
def _check_args(plan, batches, p_values, max_evals, threads):
    if not isinstance(plan, QuantPlan):
        raise OptionError(f"lapq: plan must be a QuantPlan, got {type(plan).__name__}")
    try:
        batches = list(batches)
    except TypeError:
        raise DataError("lapq: batches must be a list of feed dicts {input name: array}") from None
    if not batches or not all(isinstance(b, Mapping) and b for b in batches):
        raise DataError("lapq: batches must be a non-empty list of non-empty feed dicts {input name: array}")
    try:
        ps = [float(p) for p in p_values]
    except (TypeError, ValueError):
        raise OptionError(f"lapq: p_values={p_values!r} must be a sequence of numbers > 0") from None
    if not ps or any(not math.isfinite(p) or p <= 0 for p in ps):
        raise OptionError(f"lapq: p_values={p_values!r} must be a non-empty sequence of finite numbers > 0")
    if isinstance(max_evals, bool) or not isinstance(max_evals, (int, np.integer)) or max_evals < 1:
        raise OptionError(f"lapq: max_evals={max_evals!r} must be an integer >= 1")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise OptionError(f"lapq: threads={threads!r} must be an integer >= 1")
    for t in calibration_targets(plan):
        tq = plan.activations[t]
        if not tq.scale or not tq.zero_point:
            raise OptionError(f"lapq: activation '{t}' has no calibrated scale in the plan; run calibrate "
                              "(collect + apply_observers) before lapq")
        if tq.granularity != "per_tensor" and len(tq.scale) > 1:
            raise OptionError(f"lapq: activation '{t}' is quantized {tq.granularity}; lapq optimises "
                              "per-tensor activation ranges only")
    return batches, sorted(set(ps))


def lapq(model: onnx.ModelProto, plan: QuantPlan, batches: List[Dict[str, np.ndarray]], *,
         loss: Union[str, Callable] = "mse", p_values: Sequence[float] = (2.0, 2.5, 3.0, 3.5, 4.0),
         max_evals: int = 200, threads: int = 1, seed: int = 0,
         weights: Optional[Dict[str, np.ndarray]] = None, observers: Optional[Dict[str, Any]] = None
         ) -> Dict[str, Any]:
    """Optimise the static activation ranges of ``plan`` (in place) for the network loss; return info.

    model: the prepared FP32 model the plan belongs to. batches: feed dicts (the loss is measured on all
    of them at every evaluation, so keep them small: a few hundred samples). loss: "mse" (default),
    "kl" or ``callable(outputs_fp, outputs_q) -> float`` (lists over batches of lists of output arrays).
    max_evals: network evaluations over the whole run. seed: orders Powell's initial directions.
    weights: pre-rounded integer weights per layer (as for realize). observers: histogram observers
    {tensor: observer} already collected on these batches (e.g. a Pipeline's cache); the missing ones
    are collected here.
    """
    t0 = time.perf_counter()
    loss_name, loss_fn = _loss_fn(loss)
    batches, ps = _check_args(plan, batches, p_values, max_evals, threads)
    targets = calibration_targets(plan)
    info: Dict[str, Any] = {"loss": loss_name, "p_values": ps, "max_evals": int(max_evals), "seed": int(seed),
                            "tensors": {}, "p_losses": {}, "p": None, "initial_loss": None}
    if not targets:
        info.update(initial_loss=None, final_loss=None, evaluations=0, p=None, start="plan",
                    seconds=time.perf_counter() - t0, simulation=None)
        return info

    # histograms of every target (the plan's stats keep only summaries)
    observers = dict(observers or {})
    for t, obs in observers.items():
        if not hasattr(obs, "hist") or obs.count == 0:
            raise OptionError(f"lapq: the observer given for tensor '{t}' is not a histogram observer that has "
                              "seen data (use 'mse', 'percentile' or 'entropy' observers, or leave it out)")
    missing = [t for t in targets if t not in observers]
    if missing:
        observers.update(collect_tensors(model, {t: "mse" for t in missing}, batches, threads=threads))

    sim = _Simulator(model, plan, batches, loss_fn, threads, weights=weights)
    info["simulation"] = "fed-qparams" if sim.fast else "realize-per-evaluation"
    specs = {t: plan.activations[t] for t in targets}
    budget = int(max_evals)
    best = {"loss": math.inf, "qp": None, "ranges": None, "source": None}

    def qparams(ranges: Mapping[str, Tuple[float, float]]):
        return {t: qparams_from_range(lo, hi, specs[t].dtype, specs[t].bits, specs[t].symmetric, specs[t].narrow)
                for t, (lo, hi) in ranges.items()}

    def evaluate(qp, ranges, source) -> float:
        if sim.evaluations >= budget:
            raise _BudgetExhausted
        val = sim.loss(qp)
        if val < best["loss"]:
            best.update(loss=val, qp=dict(qp), ranges=dict(ranges), source=source)
        return val

    plan_ranges = {t: _plan_range(specs[t]) for t in targets}
    plan_qp = {t: (float(specs[t].scale[0]), int(specs[t].zero_point[0])) for t in targets}
    start_ranges, start_loss, start_src = plan_ranges, None, "plan"
    powell_info: Dict[str, Any] = {"evaluations": 0}
    try:
        info["initial_loss"] = start_loss = evaluate(plan_qp, plan_ranges, "plan")
        # 1. Lp initialisation
        p_ranges = {}
        for p in ps:
            p_ranges[p] = {t: lp_range(observers[t], specs[t], p) for t in targets}
            info["p_losses"][p] = evaluate(qparams(p_ranges[p]), p_ranges[p], f"p={p:g}")
        if len(ps) >= 3:
            xs = np.array(list(info["p_losses"]), np.float64)
            ys = np.array(list(info["p_losses"].values()), np.float64)
            if np.all(np.isfinite(ys)):
                a, b_, _ = np.polyfit(xs, ys, 2)
                if a > 0:
                    pv = float(-b_ / (2 * a))
                    if xs.min() < pv < xs.max() and np.min(np.abs(xs - pv)) > 1e-3:
                        p_ranges[pv] = {t: lp_range(observers[t], specs[t], pv) for t in targets}
                        info["p_losses"][pv] = evaluate(qparams(p_ranges[pv]), p_ranges[pv], f"p={pv:g}")
        best_p = min(info["p_losses"], key=info["p_losses"].get)
        info["p"] = best_p
        if info["p_losses"][best_p] <= start_loss:
            start_ranges, start_loss, start_src = p_ranges[best_p], info["p_losses"][best_p], f"p={best_p:g}"

        # 2. joint Powell search over log multipliers of the start ranges
        opt = [t for t in targets if start_ranges[t][0] < 0 or start_ranges[t][1] > 0]
        if opt and sim.evaluations < budget:
            from scipy.optimize import Bounds, minimize

            lb, ub = [], []
            for t in opt:
                lo, hi = start_ranges[t]
                ratio = max((min(observers[t].min, 0.0) / lo) if lo < 0 else 0.0,
                            (max(observers[t].max, 0.0) / hi) if hi > 0 else 0.0, 1.0)
                lb.append(math.log(_MIN_MULT))
                ub.append(math.log(ratio * 1.05))
            rng = np.random.default_rng(seed)
            direc = np.eye(len(opt))[rng.permutation(len(opt))]
            cache: Dict[bytes, float] = {}

            def ranges_at(x):
                r = dict(start_ranges)
                for t, v in zip(opt, x):
                    m = math.exp(float(v))
                    r[t] = (start_ranges[t][0] * m, start_ranges[t][1] * m)
                return r

            def objective(x):
                r = ranges_at(x)
                qp = qparams(r)
                key = repr(sorted(qp.items())).encode()
                if key not in cache:  # Powell revisits points; a repeat costs no evaluation
                    cache[key] = evaluate(qp, r, "powell")
                return cache[key]

            q_start = qparams(start_ranges)
            if start_src != "plan" or q_start == plan_qp:
                cache[repr(sorted(q_start.items())).encode()] = start_loss
            n0 = sim.evaluations
            try:
                res = minimize(objective, np.zeros(len(opt)), method="Powell", bounds=Bounds(lb, ub),
                               options={"xtol": 1e-2, "ftol": 1e-4, "maxfev": max(budget - n0, 1),
                                        "direc": direc})
                powell_info.update(iterations=int(res.nit), message=str(res.message))
            finally:
                powell_info["evaluations"] = sim.evaluations - n0
    except _BudgetExhausted:
        powell_info.setdefault("message", "max_evals reached")
    info["start"] = start_src
    info["start_loss"] = start_loss
    info["powell"] = powell_info
    info["evaluations"] = sim.evaluations

    # write the best point into the plan (the plan as given stays when nothing beat it)
    if best["source"] == "plan" or best["qp"] is None:
        final_qp, final_ranges = plan_qp, plan_ranges
        info["final_loss"] = info.get("initial_loss")
    else:
        final_qp, final_ranges = best["qp"], best["ranges"]
        info["final_loss"] = best["loss"]
    info["chosen"] = best["source"] or "plan"
    for t in targets:
        tq = specs[t]
        s, z = final_qp[t]
        info["tensors"][t] = {"old_range": list(plan_ranges[t]), "new_range": list(final_ranges[t]),
                              "old_scale": float(tq.scale[0]), "new_scale": float(s),
                              "old_zero_point": int(tq.zero_point[0]), "new_zero_point": int(z)}
        tq.scale, tq.zero_point = [float(s)], [int(z)]
        tq.stats = dict(tq.stats or {})
        tq.stats["lapq"] = {"lo": float(final_ranges[t][0]), "hi": float(final_ranges[t][1]),
                            "old_lo": float(plan_ranges[t][0]), "old_hi": float(plan_ranges[t][1]),
                            "chosen": info["chosen"]}
    for n, tq in plan.activations.items():
        if tq.shared_with is not None:
            src = plan.resolve(n)
            tq.scale, tq.zero_point, tq.dtype = list(src.scale), list(src.zero_point), src.dtype
    plan.history.append("lapq")
    info["seconds"] = time.perf_counter() - t0
    return info
