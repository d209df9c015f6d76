"""Weight rounding schemes. Each module exposes ``round_weight(w, scale, zero_point, qmin, qmax, axis, **ctx)``
returning the integer weight; the plan names the scheme per layer (TensorQuant.method).

Data-driven solvers (``SOLVERS``) work on a per-layer least-squares problem built from calibration
statistics (problem.LayerProblem): ``solve(problem, *, seed=0, **params) -> RoundingResult``.
"""
from __future__ import annotations

import time

from . import nearest
from .problem import LayerProblem, RoundingResult

ROUNDERS = {"nearest": nearest.round_weight}


def get_rounder(name: str):
    from ...errors import OptionError

    try:
        return ROUNDERS[name]
    except KeyError:
        raise OptionError(f"unknown rounding scheme {name!r}; available: {', '.join(sorted(ROUNDERS))}") from None


def solve_nearest(problem: LayerProblem, *, seed: int = 0, **params) -> RoundingResult:
    """Round-to-nearest as a solver (the reference every other solver is compared with)."""
    from ...errors import OptionError
    from . import problem as pr

    t0 = time.perf_counter()
    pr.validate(problem, need_rows=False)
    extra = sorted(set(params) - {"iterations"})          # iterations: accepted (and ignored) like gptq
    if extra:
        raise OptionError(f"layer {problem.name!r}: nearest rounding takes no parameters, got {', '.join(extra)}")
    q = pr.nearest(problem)
    return pr.finish(problem, "nearest", q, problem.scale, problem.bias, {"iterations": 0}, t0)


def _lazy(module: str):
    def solve(problem: LayerProblem, *, seed: int = 0, **params) -> RoundingResult:
        import importlib

        return importlib.import_module(f"{__name__}.{module}").solve(problem, seed=seed, **params)

    solve.__name__ = f"solve_{module}"
    solve.__doc__ = f"{module} solver (see hago_py.quant.rounding.{module})."
    return solve


SOLVERS = {
    "nearest": solve_nearest,
    "adaround": _lazy("adaround"),
    "adaquant": _lazy("adaquant"),
    "flexround": _lazy("flexround"),
    "gptq": _lazy("gptq"),
}


def get_solver(name: str):
    """The solver function for ``name``; OptionError listing the valid names otherwise."""
    from ...errors import OptionError

    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise OptionError(f"unknown rounding solver {name!r}; available: {', '.join(sorted(SOLVERS))}") from None
