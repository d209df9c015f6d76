"""Integer program over the per-layer estimates (scipy.optimize.milp), as in AdaQuant's bit allocation.

One binary x[L, c] per layer and candidate, exactly one candidate per layer:

* ``objective="latency"``: minimise sum dlat x  subject to  sum err x <= max_err
* ``objective="error"``:   minimise sum err x   subject to  ref_latency + sum dlat x <= max_latency

A tiny weight on the other term breaks ties towards the better plan.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .table import Table


def solve(table: Table, *, objective: str = "latency", max_err: Optional[float] = None,
          max_latency: Optional[float] = None, time_limit: float = 20.0) -> Optional[Dict[str, str]]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    nodes = list(table.rows)
    if not nodes:
        return table.full()
    var = [(n, k) for n in nodes for k in sorted(table.rows[n])]
    err = np.array([table.rows[n][k][0] for n, k in var])
    lat = np.array([table.rows[n][k][1] for n, k in var])
    e_scale = max(float(np.abs(err).max()), 1e-12)
    l_scale = max(float(np.abs(lat).max()), 1e-12)
    if objective == "latency":
        c = lat / l_scale + 1e-4 * err / e_scale
    elif objective == "error":
        c = err / e_scale + 1e-4 * lat / l_scale
    else:
        raise ValueError(objective)
    a_eq = np.zeros((len(nodes), len(var)))
    for j, (n, _) in enumerate(var):
        a_eq[nodes.index(n), j] = 1.0
    cons = [LinearConstraint(a_eq, 1.0, 1.0)]
    if max_err is not None:
        cons.append(LinearConstraint(err[None, :] / e_scale, -np.inf, (max_err - table.fixed_err) / e_scale + 1e-9))
    if max_latency is not None:
        cons.append(LinearConstraint(lat[None, :] / l_scale, -np.inf, (max_latency - table.ref_latency) / l_scale
                                     + 1e-9))
    res = milp(c, constraints=cons, integrality=np.ones(len(var)), bounds=Bounds(0, 1),
               options={"time_limit": time_limit})
    if res.x is None or res.status not in (0, 1):
        return None
    assign = {}
    for j, (n, k) in enumerate(var):
        if res.x[j] > 0.5:
            assign[n] = k
    return table.full(assign)
