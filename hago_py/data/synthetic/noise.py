"""Gaussian noise: the baseline every data-free generator is compared with. Each float input gets seeded
N(0, 1) samples (the range of inputs normalised to zero mean and unit variance); no model pass, no torch."""
from __future__ import annotations

import numpy as np

from ._base import Settings, float_inputs


def gaussian(model, settings: Settings):
    inputs = float_inputs(model, "gaussian", allow_rank2=True)
    rng = np.random.default_rng(settings.seed)
    arrays = {i.name: rng.standard_normal((settings.samples,) + i.sample_shape, dtype=np.float32) for i in inputs}
    return arrays, {"torch_threads": 0, "final_loss": {}}
