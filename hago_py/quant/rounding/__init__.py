"""Weight rounding schemes. Each module exposes ``round_weight(w, scale, zero_point, qmin, qmax, axis, **ctx)``
returning the integer weight; the plan names the scheme per layer (TensorQuant.method)."""
from __future__ import annotations

from . import nearest

ROUNDERS = {"nearest": nearest.round_weight}


def get_rounder(name: str):
    from ...errors import OptionError

    try:
        return ROUNDERS[name]
    except KeyError:
        raise OptionError(f"unknown rounding scheme {name!r}; available: {', '.join(sorted(ROUNDERS))}") from None
