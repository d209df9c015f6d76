"""Statistics matching, and the ZeroQ generator built on it (Cai et al. 2020, "ZeroQ"): inputs are moved until
the per-channel mean / standard deviation of the tensors entering every BatchNormalization node equal the
running mean / sqrt(running var) that node holds (what the training data produced there). No class target.

The same machinery serves retro-synthesis (retro.py): ``bn_targets`` reads BN statistics from the graph,
``activation_targets`` measures statistics of chosen tensors on given inputs (the paper's substitute for
models whose BN was folded away), ``StatCapture`` records the statistics of a forward pass through
``value_hook`` and ``stat_loss`` compares them with the targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from onnx import numpy_helper

from ...errors import OptionError
from ._base import Settings, batches, float_inputs, optimise, seeded_normal, torch_module, ThreadScope


@dataclass
class StatTarget:
    """Per-channel target statistics of one tensor (channel axis 1)."""
    tensor: str
    node: str
    mean: np.ndarray
    std: np.ndarray


def bn_targets(model) -> List[StatTarget]:
    """The running statistics of every BatchNormalization node whose mean / var are initializers, as targets
    for the node's input tensor. Empty when the graph has no (constant) BN: BN folded into the convolutions."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for k, n in enumerate(model.graph.node):
        if n.op_type != "BatchNormalization" or len(n.input) < 5:
            continue
        if n.input[3] not in inits or n.input[4] not in inits:
            continue
        mean = numpy_helper.to_array(inits[n.input[3]]).astype(np.float64)
        var = numpy_helper.to_array(inits[n.input[4]]).astype(np.float64)
        out.append(StatTarget(n.input[0], n.name or f"BatchNormalization_{k}", mean.astype(np.float32),
                              np.sqrt(np.maximum(var, 0.0)).astype(np.float32)))
    return out


def channel_stats(torch, t) -> Tuple[object, object]:
    """Per-channel (axis 1) mean and standard deviation over every other axis."""
    if t.dim() < 2:
        t = t.reshape(-1, 1)
    dims = [0] + list(range(2, t.dim()))
    mean = t.mean(dim=dims)
    var = (t - mean.reshape((1, -1) + (1,) * (t.dim() - 2))).pow(2).mean(dim=dims)
    return mean, torch.sqrt(var + 1e-8)


class StatCapture:
    """A ``value_hook`` that records the per-channel statistics of the watched tensors during a run."""

    def __init__(self, torch, names: Sequence[str]):
        self.torch = torch
        self.names = set(names)
        self.stats: Dict[str, Tuple[object, object]] = {}

    def __call__(self, name, t):
        if name in self.names and t.is_floating_point():
            self.stats[name] = channel_stats(self.torch, t)
        return t


def stat_loss(torch, stats, targets: Sequence[StatTarget], cache: Dict[str, Tuple[object, object]]):
    """Sum over targets of MSE(mean) + MSE(std) (ZeroQ's per-layer distance, squared L2 over channels), each
    divided by the target's mean std so that wide and narrow layers weigh alike."""
    total = 0.0
    for tg in targets:
        if tg.tensor not in stats:
            raise OptionError(f"synthesis: tensor '{tg.tensor}' (input of node '{tg.node}') was not computed; "
                              "the graph's statistics points must lie on the path to its outputs")
        if tg.tensor not in cache:
            cache[tg.tensor] = (torch.from_numpy(tg.mean), torch.from_numpy(tg.std),
                                float(max(np.mean(tg.std), 1e-6)) ** 2)
        m_t, s_t, norm = cache[tg.tensor]
        m, s = stats[tg.tensor]
        if m.shape != m_t.shape:
            raise OptionError(f"synthesis: node '{tg.node}' holds {tuple(m_t.shape)} statistics but its input "
                              f"'{tg.tensor}' has {tuple(m.shape)} channels")
        total = total + ((m - m_t).pow(2).mean() + (s - s_t).pow(2).mean()) / norm
    return total / max(1, len(targets))


def activation_targets(torch, graph, names: Sequence[str], feeds) -> List[StatTarget]:
    """Targets measured on ``feeds``: the per-channel statistics of ``names`` in one forward pass."""
    cap = StatCapture(torch, names)
    with torch.no_grad():
        graph.run(feeds, list(names), value_hook=cap)
    return [StatTarget(n, graph.producer.get(n, n), cap.stats[n][0].numpy().astype(np.float32),
                       cap.stats[n][1].numpy().astype(np.float32)) for n in names]


def default_batch(shape: Sequence[int]) -> int:
    """Samples per optimisation batch: enough for per-channel batch statistics to mean something, few enough
    that a 224x224 network's activations and gradients stay within a few GB."""
    return int(max(8, min(64, 2_500_000 // max(1, int(np.prod(shape))))))


def default_iterations(shape: Sequence[int]) -> int:
    """Adam steps per batch: 100 for small images (CIFAR-sized: the statistics settle within ~50), 30 for
    ImageNet-sized inputs, where one step of a batch of 16 costs seconds on two cores and the budget is minutes."""
    return 100 if int(np.prod(shape)) <= 50_000 else 30


def image_setup(model, method: str, settings: Settings):
    """The one image input a statistics-matching generator synthesizes, and its iterations / lr / batch."""
    inputs = float_inputs(model, method)
    if len(inputs) != 1:
        raise OptionError(f"synthetic_method={method!r} synthesizes one image input; the model has {len(inputs)} "
                          "inputs: use synthetic_method='gaussian' or real data")
    inp = inputs[0]
    return (inp, settings.iterations or default_iterations(inp.sample_shape), settings.lr or 0.2,
            settings.batch or default_batch(inp.sample_shape))


def zeroq(model, settings: Settings):
    """ZeroQ: BN-statistics matching only. OptionError when the graph has no BatchNormalization left."""
    torch = torch_module("zeroq")
    from ...quant.torch_lower import TorchGraph

    inp, iters, lr, bs = image_setup(model, "zeroq", settings)
    targets = bn_targets(model)
    if not targets:
        raise OptionError("synthetic_method='zeroq' matches BatchNormalization statistics, but this graph has no "
                          "BatchNormalization node (BN folded into the convolutions): use synthetic_method='retro', "
                          "which also handles folded models, or export the model with its BN nodes")
    with ThreadScope(torch, settings.threads) as ts:
        graph = TorchGraph(model)
        names = [t.tensor for t in targets]
        cache: Dict = {}
        parts, terms = [], []
        x_all = seeded_normal(torch, settings.seed, (settings.samples,) + inp.sample_shape)
        for bi, (s, e) in enumerate(batches(settings.samples, bs)):
            def loss_fn(x):
                cap = StatCapture(torch, names)
                graph.run({inp.name: x}, names, value_hook=cap)
                # ZeroQ also pulls the input itself towards the N(0, 1) statistics of normalised images
                im, isd = channel_stats(torch, x)
                l_in = im.pow(2).mean() + (isd - 1.0).pow(2).mean()
                l_bn = stat_loss(torch, cap.stats, targets, cache)
                return l_bn + l_in, {"bn": float(l_bn.detach()), "input": float(l_in.detach())}

            x, t = optimise(torch, x_all[s:e], loss_fn, iters, lr,
                            f"zeroq batch {bi + 1}/{-(-settings.samples // bs)}", settings)
            parts.append(x.numpy())
            terms.append((e - s, t))
        n = sum(k for k, _ in terms)
        final = {key: sum(k * t[key] for k, t in terms) / n for key in terms[0][1]}
        info = {"iterations": iters, "lr": lr, "batch": bs, "bn_layers": len(targets), "torch_threads": ts.threads,
                "final_loss": final}
    return {inp.name: np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)}, info
