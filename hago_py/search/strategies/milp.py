"""Integer program over the per-layer estimates (scipy.optimize.milp), as in AdaQuant's bit allocation.

One binary x[L, c] per layer and candidate, exactly one candidate per layer:

* ``objective="latency"``: minimise latency  subject to  sum err x <= max_err
* ``objective="error"``:   minimise sum err x   subject to  latency <= max_latency

latency is the table's model (strategies/table.py): the per-candidate changes, plus, for every int8-region
boundary edge (u, v, cost), ``cost * z`` with a continuous z >= |float(u) - float(v)| (float(L) = x[L, fp32];
the model's inputs and outputs are float), so adjacent float layers share their boundary. A tiny weight on
the other term breaks ties towards the better plan.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from ..space import FP32
from .table import Table


def solve(table: Table, *, objective: str = "latency", max_err: Optional[float] = None,
          max_latency: Optional[float] = None, time_limit: float = 20.0) -> Optional[Dict[str, str]]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    nodes = list(table.rows)
    if not nodes:
        return table.full()
    var = [(n, k) for n in nodes for k in sorted(table.rows[n])]
    col = {v: j for j, v in enumerate(var)}
    err = np.array([table.rows[n][k][0] for n, k in var])
    lat = np.array([table.rows[n][k][1] for n, k in var])
    const = table.ref_latency
    # boundaries: per-layer corrections, one z per edge that touches a searched layer
    corr = table.corrections
    for j, (n, k) in enumerate(var):
        if n in corr and (k == FP32) != table.is_float(table.ref, n):
            lat[j] -= corr[n]
    const -= table.boundary(table.ref)

    def f(node) -> Tuple[Dict[int, float], float]:      # float(node) as (coefficients, constant)
        if node is not None and node in table.rows:
            j = col.get((node, FP32))
            return ({j: 1.0} if j is not None else {}), 0.0
        return {}, float(table.is_float({}, node))

    z_edges: List[Tuple[Dict[int, float], float, float]] = []   # (f_u - f_v coefficients, constant, cost)
    for u, v, c in table.edges:
        (cu, ku), (cv, kv) = f(u), f(v)
        if not cu and not cv:
            const += c * float(ku != kv)
            continue
        d = dict(cu)
        for j, a in cv.items():
            d[j] = d.get(j, 0.0) - a
        z_edges.append((d, ku - kv, c))
    nz = len(z_edges)
    nv = len(var) + nz
    lat_full = np.concatenate([lat, np.array([c for _, _, c in z_edges])])
    err_full = np.concatenate([err, np.zeros(nz)])
    e_scale = max(float(np.abs(err).max()), 1e-12)
    l_scale = max(float(np.abs(lat_full).max()), 1e-12)
    if objective == "latency":
        c = lat_full / l_scale + 1e-4 * err_full / e_scale
    elif objective == "error":
        c = err_full / e_scale + 1e-4 * lat_full / l_scale
    else:
        raise ValueError(objective)
    a_eq = np.zeros((len(nodes), nv))
    for j, (n, _) in enumerate(var):
        a_eq[nodes.index(n), j] = 1.0
    cons = [LinearConstraint(a_eq, 1.0, 1.0)]
    if nz:
        a_z = np.zeros((2 * nz, nv))
        lb = np.zeros(2 * nz)
        for i, (d, k, _) in enumerate(z_edges):
            zc = len(var) + i
            # z - (f_u - f_v) >= 0  and  z + (f_u - f_v) >= 0, with the constant moved to the bound
            a_z[2 * i, zc], a_z[2 * i + 1, zc] = 1.0, 1.0
            for j, a in d.items():
                a_z[2 * i, j] -= a
                a_z[2 * i + 1, j] += a
            lb[2 * i], lb[2 * i + 1] = k, -k
        cons.append(LinearConstraint(a_z, lb, np.inf))
    if max_err is not None:
        cons.append(LinearConstraint(err_full[None, :] / e_scale, -np.inf,
                                     (max_err - table.fixed_err) / e_scale + 1e-9))
    if max_latency is not None:
        cons.append(LinearConstraint(lat_full[None, :] / l_scale, -np.inf, (max_latency - const) / l_scale + 1e-9))
    integrality = np.concatenate([np.ones(len(var)), np.zeros(nz)])
    res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(0, 1), options={"time_limit": time_limit})
    if res.x is None or res.status not in (0, 1):
        return None
    assign = {}
    for j, (n, k) in enumerate(var):
        if res.x[j] > 0.5:
            assign[n] = k
    return table.full(assign)
