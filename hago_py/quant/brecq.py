"""BRECQ (Li et al., ICLR 2021): block-wise reconstruction of weight rounding, on PyTorch (optional extra).

For each block of :func:`hago_py.ir.blocks.find_blocks` in topological order:

* inputs: the block's input tensors in the *quantized* model — the fake-quant model (static activations
  fake-quantized with the plan's scales, dynamic ones per batch, weights of the blocks already
  reconstructed at their learned integers, the rest at nearest) run up to the block;
* target: the block's output in the FP32 model;
* variables: AdaRound's continuous rounding variables V for every weighted layer in the block, jointly:
  ``W~ = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, V initialised so
  that h(V) equals the fractional part of W/s (W~ = W at the start);
* loss: ``rec + lambda * sum(1 - |2 h(V) - 1| ** beta)``, lambda = 0.01, the regulariser off for the first
  20 % of the iterations, then beta annealed linearly from 20 to 2 (as AdaRound). Activations inside the
  block are fake-quantized with straight-through gradients (zero outside the clipping range);
* rec: the Fisher-weighted squared error of the block output,
  ``sum(F * (z~ - z) ** 2)`` summed over the channel axis (axis 1) and averaged over the rest, with ``F``
  the squared gradient of the network's loss with respect to the block output, computed on the FP32
  model, per sample and element (the diagonal Fisher), averaged over ``FISHER_SAMPLES`` = 4 draws,
  normalised to mean 1 over the calibration set, plus a damping of ``FISHER_DAMPING`` = 1 (so F is
  never 0 where one noisy draw said so; BRECQ's reference code adds 1 as well). ``fisher=False`` sets
  F = 1 (MSE). On ResNet-20 W4, one draw without damping was clearly worse than MSE (output KL to FP32
  0.106 vs 0.065); 4 draws with damping 0.078.

Fisher without labels. The calibration set is unlabelled, so the gradient is that of the negative
log-likelihood of the model's *own* predictive distribution (its true Fisher, sampled per input):

* an output that looks like class logits (2-D [N, C], C >= 2, float) is a categorical distribution:
  a label is sampled from softmax(FP logits) and the loss is the cross-entropy to it, so the gradient
  at the logits is ``p - onehot(y)``;
* any other float output is a Gaussian with unit variance around the FP output: ``y = f(x) + eps``,
  ``eps ~ N(0, I)``, so the gradient at the output is ``-eps`` and at the block output ``J^T eps``.

Sampling uses a generator seeded from ``seed`` and the block index: the same inputs and seed give the
same integer weights (byte for byte, with the same ``threads``).

After the optimisation each layer's rounding is hardened (round up where V >= 0). The block loss is
evaluated with hard rounding before (nearest) and after; if BRECQ did not lower it on the calibration
set the block keeps nearest rounding (``fallback`` in the info), so a block is never made worse than
round-to-nearest on the data it was fitted on.

Defaults (``iterations=300``, ``lr=1e-2``, Fisher on; ``rounding_params={"brecq": {...}}`` changes them) were
measured on ResNet-20 W4A8, all layers, 256 reconstruction images, 10,000 CIFAR-10 test images: Fisher +0.05 pp
vs FP32 in 101 s; the same with plain MSE -0.70 pp; the paper's 2,000 iterations at lr 1e-3 took > 20 min here.

The returned integer weights (``{layer node: int64 array in the layout of its initializer}``) go to
``hago_py.quant.realize.realize(model, plan, weights=...)``; the plan's weight scales / zero points are
filled here with ``hago_py.quant.weights.weight_qparams``.
"""
from __future__ import annotations

import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import DataError, ModelError, OptionError
from ..ir.blocks import find_blocks, node_names, shape_only_tensors
from .observers import qrange
from .plan import QuantPlan, TensorQuant
from .weights import weight_qparams
from . import torch_lower as tl

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2
FISHER_SAMPLES = 4       # sampled labels / noise vectors per input, averaged (one sample is very noisy)
FISHER_DAMPING = 1.0     # added to the mean-1 Fisher weights (Tikhonov damping; BRECQ's code adds 1 too)


def _require_torch():
    return tl._torch("rounding='brecq'")


# -- fake quantization ----------------------------------------------------------------------------------

def _bshape(v: np.ndarray, ndim: int, axis: Optional[int]):
    if axis is None or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


class _Layer:
    """One weighted layer: its FP weight, qparams, and the AdaRound state."""

    def __init__(self, torch, name: str, node: onnx.NodeProto, w: np.ndarray, tq: TensorQuant):
        self.name, self.node, self.tq = name, node, tq
        scale, zp = weight_qparams(w, tq)
        tq.scale = [float(s) for s in scale]
        tq.zero_point = [int(z) for z in zp]
        self.qmin, self.qmax = qrange(tq.dtype, tq.bits, tq.narrow)
        axis = tq.axis if tq.granularity == "per_channel" else None
        self.s = torch.from_numpy(np.ascontiguousarray(_bshape(scale.astype(np.float32), w.ndim, axis)))
        self.z = torch.from_numpy(np.ascontiguousarray(_bshape(zp.astype(np.float32), w.ndim, axis)))
        self.w = torch.from_numpy(np.array(w, np.float32))
        self.floor = torch.floor(self.w / self.s)
        self.V = None

    def dequant(self, q):
        return (q - self.z) * self.s

    def nearest_int(self):
        torch = tl.torch
        return torch.clamp(torch.round(self.w / self.s) + self.z, self.qmin, self.qmax)

    def init_v(self):
        torch = tl.torch
        rest = torch.clamp(self.w / self.s - self.floor, 0.0, 1.0)
        self.V = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))
        return self.V

    def h(self):
        torch = tl.torch
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft_weight(self):
        torch = tl.torch
        return self.dequant(torch.clamp(self.floor + self.h() + self.z, self.qmin, self.qmax))

    def hard_int(self):
        torch = tl.torch
        return torch.clamp(self.floor + (self.V.detach() >= 0).to(self.floor.dtype) + self.z, self.qmin, self.qmax)


class FakeQuant:
    """Hooks for :class:`TorchGraph.run` that compute the fake-quant model realize() builds from ``plan``."""

    def __init__(self, torch, plan: QuantPlan, layers: Dict[str, _Layer], graph: "tl.TorchGraph"):
        self.torch = torch
        self.static: Dict[str, Tuple[float, float, float, float]] = {}
        for name, tq in plan.activations.items():
            if tq.mode != "static":
                continue
            eff = plan.resolve(name)
            if eff.scale is None:
                raise OptionError(f"tensor '{name}' has no calibrated scale in the plan; run calibrate "
                                  "(hago_py.quant.calibrate) before rounding='brecq'")
            qmin, qmax = qrange(eff.dtype)           # QuantizeLinear saturates to the storage type
            self.static[name] = (float(np.float32(eff.scale[0])), float(eff.zero_point[0]), float(qmin), float(qmax))
        self.layers = layers
        self.dynamic = set()
        self.per_token: Dict[str, int] = {}  # dynamic per-token inputs (quant/per_token.py): node -> bits
        self.bias: Dict[str, object] = {}
        self.weights: Dict[str, object] = {n: l.dequant(l.nearest_int()) for n, l in layers.items()}
        self.soft: Dict[str, _Layer] = {}
        for lp in plan.quantized_layers():
            if lp.weight is None or lp.node not in layers:
                continue
            x = lp.inputs[0] if lp.inputs else None
            x_tq = plan.activations.get(x) if x else None
            if x_tq is not None and x_tq.mode == "dynamic":
                self.dynamic.add(lp.node)
                if x_tq.granularity == "per_token":
                    self.per_token[lp.node] = x_tq.bits
                continue
            node = layers[lp.node].node
            if lp.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in graph.constants \
                    and x_tq is not None:
                eff = plan.resolve(x)
                b = graph.constants[node.input[2]].detach().cpu().numpy()
                bs = (np.float64(eff.scale[0]) * np.asarray(lp.weight.scale, np.float64)).astype(np.float32)
                bs = np.broadcast_to(bs, b.shape) if bs.size == 1 else bs
                bq = np.clip(np.rint(b.astype(np.float64) / bs), -2**31, 2**31 - 1).astype(np.float32)
                self.bias[lp.node] = torch.from_numpy((bq * bs).astype(np.float32))

    def _fq(self, x, scale, zp, qmin, qmax):
        torch = self.torch
        lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
        q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
        deq = (q - zp) * scale
        if not x.requires_grad:
            return deq
        y = torch.clamp(x, lo, hi)                     # straight-through inside the range, zero outside
        return y + (deq - y).detach()

    def _dynamic(self, x):
        torch = self.torch
        xd = x.detach()
        lo = min(0.0, float(xd.min())) if xd.numel() else 0.0
        hi = max(0.0, float(xd.max())) if xd.numel() else 0.0
        scale = float((np.float32(hi) - np.float32(lo)) / np.float32(255.0)) or 1.0
        zp = float(np.clip(np.rint(np.float32(-lo) / np.float32(scale)), 0, 255))
        return self._fq(x, scale, zp, 0.0, 255.0)

    def _per_token(self, x, bits):
        """One symmetric scale per row of the last axis, straight-through (quant/per_token.py)."""
        from .per_token import TINY, qmax_of

        torch = self.torch
        qmax = float(qmax_of(bits))
        s = torch.clamp(x.detach().abs().amax(dim=-1, keepdim=True), min=float(TINY)) / qmax
        deq = torch.clamp(torch.round(x.detach() / s), -qmax, qmax) * s
        return x + (deq - x).detach() if x.requires_grad else deq

    def value_hook(self, name, x):
        p = self.static.get(name)
        if p is not None and x.is_floating_point():
            return self._fq(x, *p)
        return x

    def input_hook(self, node, idx, x):
        if idx == 1:
            lay = self.soft.get(node)
            if lay is not None:
                return lay.soft_weight()
            w = self.weights.get(node)
            return x if w is None else w
        if idx == 2 and node in self.bias:
            return self.bias[node]
        if idx == 0 and node in self.per_token and x.is_floating_point():
            return self._per_token(x, self.per_token[node])
        if idx == 0 and node in self.dynamic and x.is_floating_point():
            return self._dynamic(x)
        return x


# -- data -----------------------------------------------------------------------------------------------

def _stack(batches, inputs: Sequence[str]) -> Tuple[Dict[str, np.ndarray], int]:
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise DataError("rounding='brecq' got no calibration batches; pass at least one batch of samples")
    out: Dict[str, np.ndarray] = {}
    for name in inputs:
        parts = []
        for k, b in enumerate(batches):
            if name not in b:
                raise DataError(f"calibration batch {k} has no input '{name}' (it has: {', '.join(sorted(b))})")
            parts.append(np.asarray(b[name]))
        try:
            out[name] = np.ascontiguousarray(np.concatenate(parts, axis=0))
        except ValueError:
            shapes = sorted({tuple(p.shape[1:]) for p in parts})
            raise DataError(f"calibration batches disagree on the shape of input '{name}' {shapes}; BRECQ "
                            "needs one shape per input (pad sequences to one length)") from None
    ns = {len(v) for v in out.values()}
    if len(ns) != 1 or 0 in ns:
        raise DataError(f"calibration inputs have different or zero sample counts {sorted(ns)}; every input needs "
                        "the same number of samples along axis 0")
    return out, ns.pop()


def _fisher_loss(torch, F, env, outputs, gen):
    total = None
    for o in outputs:
        x = env.get(o)
        if x is None or not x.is_floating_point() or not x.requires_grad:
            continue
        if x.dim() == 2 and x.shape[1] >= 2:
            p = torch.softmax(x.detach().double(), dim=1)
            y = torch.multinomial(p, 1, generator=gen).squeeze(1)
            term = F.cross_entropy(x, y, reduction="sum")
        else:
            eps = torch.randn(tuple(x.shape), generator=gen, dtype=x.dtype)
            term = (x * eps).sum()
        total = term if total is None else total + term
    return total


def _rec(out, y, w):
    d = (out - y) ** 2
    if w is not None:
        d = d * w
    rows = d.numel() / d.shape[1] if d.dim() > 1 and d.shape[1] > 0 else max(d.numel(), 1)
    return d.sum() / rows


def _seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]).generate_state(1)[0])


# -- the method -----------------------------------------------------------------------------------------

BRECQ_SETTINGS = ("iterations", "fisher", "lr", "batch_size")  # what rounding_params["brecq"] may set


def brecq(model: onnx.ModelProto, plan: QuantPlan, batches: List[Dict[str, np.ndarray]], *,
          iterations: int = 300, fisher: bool = True, lr: float = 1e-2, batch_size: int = 32, seed: int = 0,
          threads: int = 1, progress: bool = False) -> Tuple[Dict[str, np.ndarray], dict]:
    """Learn the weight rounding of every quantized weighted layer block by block (see module docstring).

    model: the prepared FP32 ModelProto the plan was made for (BN folded). plan: a calibrated QuantPlan;
    its weight scales / zero points are filled here. batches: calibration feed dicts (leading batch axis).
    Returns ``(weights, info)``: integer weights per layer node (int64, the initializer's layout, within
    the plan's range) for ``realize(model, plan, weights=weights)``, and per-block losses and timings.
    """
    torch = _require_torch()
    for name, v, lo in (("iterations", iterations, 0), ("batch_size", batch_size, 1), ("threads", threads, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise OptionError(f"brecq option {name}={v!r} is invalid; use an integer >= {lo}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise OptionError(f"brecq option lr={lr!r} is invalid; use a positive number")
    prev = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _brecq(torch, model, plan, batches, int(iterations), bool(fisher), float(lr), int(batch_size),
                      int(seed), progress)
    finally:
        torch.set_num_threads(prev)


def _brecq(torch, model, plan, batches, iterations, fisher, lr, batch_size, seed, progress):
    F = tl.F
    t_start = time.perf_counter()
    graph = tl.TorchGraph(model)
    protos = dict(zip(node_names(model), model.graph.node))
    inits = {i.name: i for i in model.graph.initializer}
    layers: Dict[str, _Layer] = {}
    for lp in plan.quantized_layers():
        if lp.weight is None:
            continue
        node = protos.get(lp.node)
        if node is None:
            raise ModelError(f"plan names node '{lp.node}' which is not in the model; the plan was made for "
                             "another model (check plan.model_digest)")
        if len(node.input) < 2 or node.input[1] not in inits:
            raise ModelError(f"layer '{lp.node}': weight '{node.input[1] if len(node.input) > 1 else ''}' is not "
                             "an initializer; run the prepare passes (constant folding) first")
        layers[lp.node] = _Layer(torch, lp.node, node, numpy_helper.to_array(inits[node.input[1]]), lp.weight)
    info = {"blocks": [], "fisher": fisher, "iterations": iterations, "seed": seed}
    if not layers:
        info["seconds"] = time.perf_counter() - t_start
        return {}, info

    data, n = _stack(batches, graph.graph_inputs)
    bs = min(batch_size, n)
    chunks = [slice(i, min(i + bs, n)) for i in range(0, n, bs)]
    sim = FakeQuant(torch, plan, layers, graph)
    blocks = find_blocks(model, list(layers))
    shape_only = shape_only_tensors(model)
    result: Dict[str, np.ndarray] = {}

    it_blocks = blocks
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(blocks, desc="brecq", unit="block", leave=False)
            it_blocks = bar
        except ImportError:  # pragma: no cover
            pass

    for bi, blk in enumerate(it_blocks):
        t0 = time.perf_counter()
        exec_nodes = [nm for nm in blk.nodes
                      if not all(o in shape_only for o in protos[nm].output if o) or not protos[nm].output]
        sub = graph.subgraph(exec_nodes)
        ext = sub.external_inputs()
        # the tensors the loss compares: block outputs downstream of its layers
        down = set()
        for nm in exec_nodes:
            p = protos[nm]
            if nm in blk.layers or any(t in down for t in p.input):
                down.update(o for o in p.output if o)
        targets = [o for o in blk.outputs if o in down and o not in shape_only]
        gen = torch.Generator().manual_seed(_seed(seed, bi, 1))

        # 1. cache quantized inputs, FP targets and Fisher weights, chunk by chunk
        X: Dict[str, list] = {t: [] for t in ext}
        Y: Dict[str, list] = {o: [] for o in targets}
        W: Dict[str, list] = {o: [] for o in targets}
        for sl in chunks:
            feeds = {k: torch.from_numpy(v[sl]) for k, v in data.items()}
            with torch.no_grad():
                qin = graph.run(feeds, ext, value_hook=sim.value_hook, input_hook=sim.input_hook)
            for t in ext:
                X[t].append(qin[t].detach())
            if fisher:
                taps = {}

                def tap(name, x, _taps=taps):
                    if name in Y and x.is_floating_point():
                        x = x.detach().requires_grad_(True)
                        _taps[name] = x
                    return x

                sq = {}
                with torch.enable_grad():
                    env = graph.run(feeds, list(dict.fromkeys(graph.graph_outputs + targets)), value_hook=tap)
                    tapped = [o for o in targets if o in taps]
                    for k in range(FISHER_SAMPLES):   # one forward, several sampled labels / noises
                        loss = _fisher_loss(torch, F, env, graph.graph_outputs, gen)
                        if loss is None or not loss.requires_grad or not tapped:
                            break
                        grads = torch.autograd.grad(loss, [taps[o] for o in tapped], allow_unused=True,
                                                    retain_graph=k < FISHER_SAMPLES - 1)
                        for o, g in zip(tapped, grads):
                            if g is not None:
                                sq[o] = g.detach() ** 2 if o not in sq else sq[o] + g.detach() ** 2
                for o in targets:
                    y = env[o].detach()
                    Y[o].append(y)
                    W[o].append(sq[o] / FISHER_SAMPLES if o in sq else torch.zeros_like(y))
            else:
                with torch.no_grad():
                    env = graph.run(feeds, targets)
                for o in targets:
                    Y[o].append(env[o].detach())
        targets = [o for o in targets if Y[o] and Y[o][0].is_floating_point()]
        if fisher:
            for o in targets:
                m = float(sum(float(w.double().sum()) for w in W[o]) / max(1, sum(w.numel() for w in W[o])))
                W[o] = [w / m + FISHER_DAMPING for w in W[o]] if m > 0 else [torch.ones_like(w) for w in W[o]]
        else:
            W = {o: [None] * len(chunks) for o in targets}

        per_sample = [t for t in ext if t not in shape_only]
        sizes = [sl.stop - sl.start for sl in chunks]
        sample_mode = all(X[t][k].dim() > 0 and X[t][k].shape[0] == sizes[k] for t in per_sample
                          for k in range(len(chunks))) and \
            all(Y[o][k].dim() > 0 and Y[o][k].shape[0] == sizes[k] for o in targets for k in range(len(chunks)))

        def block_loss(k: int, feeds=None):
            if feeds is None:
                feeds = {t: X[t][k] for t in ext}
            out = sub.run(feeds, targets, value_hook=sim.value_hook, input_hook=sim.input_hook, hook_feeds=False)
            return sum(_rec(out[o], Y[o][k], W[o][k]) for o in targets)

        def evaluate() -> float:
            if not targets:
                return 0.0
            with torch.no_grad():
                tot = sum(float(block_loss(k)) * sizes[k] for k in range(len(chunks)))
            return tot / n

        blk_layers = [layers[nm] for nm in blk.layers if nm in layers]
        loss_before = evaluate()

        # 2. optimise the rounding variables of the block's layers jointly
        params = [lay.init_v() for lay in blk_layers]
        for lay in blk_layers:
            sim.soft[lay.name] = lay
        if sample_mode:   # one tensor per input (per-chunk lists become views of it)
            Xc = {t: torch.cat(X[t]) for t in per_sample}
            Yc = {o: torch.cat(Y[o]) for o in targets}
            Wc = {o: (torch.cat(W[o]) if W[o][0] is not None else None) for o in targets}
            for t in per_sample:
                X[t] = list(torch.split(Xc[t], sizes))
            for o in targets:
                Y[o] = list(torch.split(Yc[o], sizes))
                if Wc[o] is not None:
                    W[o] = list(torch.split(Wc[o], sizes))
            fixed = {t: X[t][0] for t in ext if t in shape_only}
        rng = np.random.default_rng(_seed(seed, bi, 2))
        opt = torch.optim.Adam(params, lr=lr)
        warm = int(WARMUP * iterations)
        last_rec = float("nan")
        if targets and params:
            for it in range(iterations):
                if sample_mode:
                    idx = torch.from_numpy(np.sort(rng.choice(n, size=bs, replace=False)))
                    feeds = {t: Xc[t].index_select(0, idx) for t in per_sample}
                    feeds.update(fixed)
                    out = sub.run(feeds, targets, value_hook=sim.value_hook, input_hook=sim.input_hook,
                                  hook_feeds=False)
                    rec = sum(_rec(out[o], Yc[o].index_select(0, idx),
                                   None if Wc[o] is None else Wc[o].index_select(0, idx)) for o in targets)
                else:
                    rec = block_loss(int(rng.integers(len(chunks))))
                loss = rec
                if it >= warm:
                    rel = (it - warm) / max(1, iterations - warm)
                    beta = BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - rel)
                    reg = sum((1.0 - (2.0 * lay.h() - 1.0).abs().pow(beta)).sum() for lay in blk_layers)
                    loss = rec + REG_WEIGHT * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last_rec = float(rec.detach())
        for lay in blk_layers:
            sim.soft.pop(lay.name, None)
            sim.weights[lay.name] = lay.dequant(lay.hard_int())
        loss_after = evaluate()
        fallback = loss_after > loss_before
        if fallback:
            for lay in blk_layers:
                sim.weights[lay.name] = lay.dequant(lay.nearest_int())
        flipped = 0
        for lay in blk_layers:
            q = lay.nearest_int() if fallback else lay.hard_int()
            flipped += int((q != lay.nearest_int()).sum())
            result[lay.name] = q.detach().cpu().numpy().astype(np.int64)
            lay.V = None
        secs = time.perf_counter() - t0
        info["blocks"].append({
            "name": blk.name, "kind": blk.kind, "layers": list(blk.layers), "output": blk.output,
            "loss_before": loss_before, "loss_after": min(loss_after, loss_before) if fallback else loss_after,
            "loss_brecq": loss_after, "fallback": fallback, "changed_vs_nearest": flipped,
            "last_train_rec": last_rec, "sample_mode": sample_mode, "seconds": secs,
        })
        if bar is not None:
            bar.set_postfix_str(f"{blk.name}: {loss_before:.4g} -> {loss_after:.4g}")
    # layers no block reached (none expected): nearest
    for name, lay in layers.items():
        if name not in result:
            result[name] = lay.nearest_int().cpu().numpy().astype(np.int64)
    info["seconds"] = time.perf_counter() - t_start
    info["samples"] = n
    return result, info


def simulate(model: onnx.ModelProto, plan: QuantPlan, feeds: Mapping[str, np.ndarray],
             weights: Optional[Mapping[str, np.ndarray]] = None) -> List[np.ndarray]:
    """Outputs of the fake-quant model (what realize(model, plan, weights) computes) via the torch
    interpreter; a check of the BRECQ simulation against ORT. The plan needs weight scales (brecq fills
    them)."""
    torch = _require_torch()
    graph = tl.TorchGraph(model)
    protos = dict(zip(node_names(model), model.graph.node))
    inits = {i.name: i for i in model.graph.initializer}
    layers = {}
    for lp in plan.quantized_layers():
        if lp.weight is None:
            continue
        node = protos[lp.node]
        tq = lp.weight
        saved = (tq.scale, tq.zero_point)
        layers[lp.node] = _Layer(torch, lp.node, node, numpy_helper.to_array(inits[node.input[1]]), tq)
        if saved[0] is not None:
            tq.scale, tq.zero_point = saved
    sim = FakeQuant(torch, plan, layers, graph)
    for name, q in (weights or {}).items():
        sim.weights[name] = layers[name].dequant(torch.from_numpy(np.asarray(q, np.float32)))
    with torch.no_grad():
        env = graph.run(feeds, None, value_hook=sim.value_hook, input_hook=sim.input_hook)
    return [env[o].numpy() for o in graph.graph_outputs]
