"""What every data-free generator shares: the input to synthesize, the torch setup, the seeded start and the
Adam loop that moves the inputs.

The generators optimise the *inputs* of the FP32 graph (the graph's weights never change): the graph runs in
the differentiable torch interpreter (hago_py.quant.torch_lower.TorchGraph) and ``value_hook`` reads the
intermediate tensors whose statistics a generator matches. Everything is plain data between stages: a
generator returns ``({input_name: float32 array}, info)``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import OptionError

TORCH_HINT = "pip install -e .[torch]"


@dataclass
class Settings:
    """How a generator runs. ``iterations`` / ``lr`` / ``batch`` None: the generator's default."""
    samples: int = 256
    seed: int = 0
    threads: Optional[int] = None       # torch intra-op threads; None: all cores
    iterations: Optional[int] = None
    lr: Optional[float] = None
    batch: Optional[int] = None
    progress: Optional[Callable[[str], None]] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)


@dataclass
class ImageInput:
    """The one float input the generators synthesize: its name and per-sample shape (C, H, W, ...)."""
    name: str
    sample_shape: Tuple[int, ...]


def torch_module(method: str):
    """Import torch, or raise OptionError naming the install command."""
    try:
        import torch
    except ImportError:
        raise OptionError(f"synthetic_method={method!r} (calibration='synthetic') needs PyTorch: "
                          f"{TORCH_HINT}") from None
    return torch


def float_inputs(model, method: str, allow_rank2: bool = False) -> List[ImageInput]:
    """The graph inputs to synthesize. Every input must be float with static non-batch dims: token ids,
    masks or other integer inputs have no gradient and no statistics to match (OptionError, not a crash)."""
    from ..readers import model_input_specs

    out = []
    for s in model_input_specs(model):
        if s.dtype is None or np.dtype(s.dtype).kind != "f":
            dt = np.dtype(s.dtype).name if s.dtype is not None else "unknown"
            raise OptionError(f"calibration='synthetic' (synthetic_method={method!r}) needs float inputs; input "
                              f"'{s.name}' is {dt} (token ids / masks cannot be synthesized): pass real calibration "
                              "data (an .npz or a dict of arrays) for this model")
        if s.shape is None or len(s.shape) < 2 or not all(isinstance(d, int) and d > 0 for d in s.shape[1:]):
            raise OptionError(f"calibration='synthetic' needs input '{s.name}' to declare static dims after the "
                              f"batch axis, got {s.describe()}; fix the input shape or pass real calibration data")
        if len(s.shape) < 3 and not allow_rank2:
            raise OptionError(f"synthetic_method={method!r} synthesizes images [N, C, H, W]; input "
                              f"'{s.name}' is {s.describe()}: use synthetic_method='gaussian' or real data")
        out.append(ImageInput(s.name, tuple(int(d) for d in s.shape[1:])))
    if not out:
        raise OptionError("calibration='synthetic': the model has no inputs to synthesize")
    return out


class ThreadScope:
    """Set torch's intra-op threads for the synthesis and restore them afterwards."""

    def __init__(self, torch, threads: Optional[int]):
        self.torch = torch
        self.threads = int(threads or os.cpu_count() or 1)

    def __enter__(self):
        self.before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        self.torch.set_num_threads(self.before)


def batches(total: int, size: int) -> List[Tuple[int, int]]:
    return [(s, min(total, s + size)) for s in range(0, total, size)]


def optimise(torch, x0, loss_fn, iterations: int, lr: float, label: str, settings: Settings) -> Tuple[object, Dict]:
    """Adam on the input tensor ``x0`` for ``iterations`` steps of ``loss_fn(x) -> (loss, {term: float})``,
    with a cosine-decayed learning rate (big early steps move noise towards the statistics quickly, small late
    steps settle it). Returns the final input (detached) and the loss terms of the last step."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    terms: Dict[str, float] = {}
    t0 = time.perf_counter()
    for it in range(iterations):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1.0 + np.cos(np.pi * it / max(1, iterations)))
        opt.zero_grad(set_to_none=True)
        loss, terms = loss_fn(x)
        loss.backward()
        opt.step()
        if it == 0 or (it + 1) % max(1, iterations // 4) == 0:
            settings.say(f"{label}: step {it + 1}/{iterations} loss {float(loss.detach()):.4g} "
                         f"({time.perf_counter() - t0:.1f} s)")
    with torch.no_grad():
        _, terms = loss_fn(x)
    return x.detach(), terms


def seeded_normal(torch, seed: int, shape: Sequence[int]):
    """N(0, 1) from a generator seeded with ``seed`` (same seed, same bytes, whatever the thread count)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def class_targets(num_classes: int, samples: int, seed: int) -> np.ndarray:
    """One target class per sample, covering the classes round-robin (every class once before any repeats;
    all of them when samples >= num_classes), in a seeded order so that each batch mixes classes."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.permutation(num_classes) for _ in range(-(-samples // num_classes))])
    return labels[:samples].astype(np.int64)


def summarise_inputs(arrays: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """Range of the synthesized inputs (to judge plausibility against the real preprocessing)."""
    return {k: {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std()),
                "p0.1": float(np.percentile(v, 0.1)), "p99.9": float(np.percentile(v, 99.9))}
            for k, v in arrays.items()}
