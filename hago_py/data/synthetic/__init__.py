"""Data-free calibration: a faux calibration set synthesized from the FP32 model itself.

    arrays, info = synthesize_set(model_proto, samples=256, method="retro", seed=0)

Methods (one module each): ``retro`` (retro-synthesis, retro.py: BN statistics or, for BN-folded graphs, the
activation statistics of Gaussian data, plus a class-targeted cross-entropy), ``zeroq`` (BN statistics only,
bn_stats.py) and ``gaussian`` (N(0, 1) noise, noise.py). The set is then used exactly like real calibration
data. Run it on the graph as the user gave it (before prepare() folds BatchNormalization away).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ...errors import OptionError
from ._base import Settings, summarise_inputs

METHODS = ("retro", "zeroq", "gaussian")


def _generator(method: str):
    if method == "retro":
        from .retro import retro
        return retro
    if method == "zeroq":
        from .bn_stats import zeroq
        return zeroq
    if method == "gaussian":
        from .noise import gaussian
        return gaussian
    raise OptionError(f"option synthetic_method={method!r} is invalid; use one of {', '.join(map(repr, METHODS))}")


def synthesize_set(model, samples: int = 256, method: str = "retro", seed: int = 0, threads: Optional[int] = None,
                   progress: Optional[Callable[[str], None]] = None, iterations: Optional[int] = None,
                   lr: Optional[float] = None, batch: Optional[int] = None,
                   **extra) -> Tuple[Dict[str, np.ndarray], Dict]:
    """Synthesize ``samples`` inputs for ``model`` (an onnx.ModelProto) with ``method``. Returns
    ``({input_name: float32 array [samples, ...]}, info)``; info holds method, samples, seconds, torch_threads,
    final_loss terms and the input range. Same arguments, same bytes (seeded, single ordering)."""
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise OptionError(f"option synthetic_samples={samples!r} is invalid; use an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"option seed={seed!r} is invalid; use an integer >= 0")
    gen = _generator(method)
    t0 = time.perf_counter()
    settings = Settings(samples=int(samples), seed=int(seed), threads=threads, iterations=iterations, lr=lr,
                        batch=batch, progress=progress, extra=dict(extra))
    arrays, info = gen(model, settings)
    info = {"method": method, "samples": int(samples), "seed": int(seed), **info,
            "seconds": time.perf_counter() - t0, "input_range": summarise_inputs(arrays)}
    return arrays, info


def synthesize(model, samples: int = 256, method: str = "retro", seed: int = 0,
               threads: Optional[int] = None, **kwargs) -> Dict[str, np.ndarray]:
    """The public form (hago_py.synthesize): model path or ModelProto -> {input_name: array}."""
    from ...ir import load_model

    proto = load_model(model)
    return synthesize_set(proto, samples=samples, method=method, seed=seed, threads=threads, **kwargs)[0]


__all__ = ["METHODS", "synthesize", "synthesize_set"]
