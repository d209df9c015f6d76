"""The quality-vs-complexity trade-off of multipoint quantization (Zharikov & Sedova's framing: maximise quality F
subject to a complexity budget P(M) <= P0): one pipeline, one plan per ``complexity_budget``, each scored by the
user's ``evaluate(model)`` (or, without it, by the divergence of the model's outputs from FP32 on the calibration
proxy), its complexity the extra multiply-accumulates of the widened rows and two-point inputs; the front is the
set of budgets no other budget beats on both. Inside one budget the per-layer / per-channel point counts are
chosen by quant/multipoint.py (output-error reduction per MAC), so the sweep is over the one knob that matters.
"""
from __future__ import annotations

import io
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

DEFAULT_BUDGETS = (0.0, 0.05, 0.10, 0.15, 0.30)


def _proxy(pipe):
    """(reference outputs, scorer) on the calibration proxy: minus the output divergence (KL of class scores,
    else noise-to-signal), so higher is better like an accuracy."""
    from ..backends.ort import OrtBackend
    from .hybrid import PROXY_INPUT_ELEMS, PROXY_SAMPLES, _divergence
    from .padding import real_rows, token_mask_input

    per_sample = sum(int(np.prod(v.shape[1:])) for v in pipe.calib.first_batch().values()) or 1
    batches = pipe.first_batches(int(max(32, min(PROXY_SAMPLES, PROXY_INPUT_ELEMS // per_sample))), exact=True)
    be = OrtBackend(threads=pipe.opts.threads)
    mask = token_mask_input(pipe.prepared, pipe.opts)  # padding rows left out (quant/padding.py)

    def outs(model):
        sess = be.compile(model)
        res = [[real_rows(o, b.get(mask) if mask else None) for o in be.run(sess, b)] for b in batches]
        return [np.concatenate([r[k] for r in res], 0) for k in range(len(res[0]))]

    ref = outs(pipe.reference)
    return lambda model: -_divergence(ref, outs(model))[0]


def multipoint_front(pipe, budgets: Sequence[float] = DEFAULT_BUDGETS, *, evaluate: Optional[Callable] = None,
                     keep_models: bool = False) -> Dict[str, Any]:
    """One multipoint plan per budget (extra MACs / model MACs) on ``pipe`` (weight_scheme="multipoint"):
    {"metric": "evaluate" | "proxy", "points": [{"complexity_budget", "extra_macs_fraction", "points_per_channel",
    "metric", "seconds", ...}], "front": [indices of the non-dominated points, by extra MACs]}."""
    from ..errors import OptionError

    if pipe.opts.weight_scheme != "multipoint":
        raise OptionError("multipoint_front needs weight_scheme='multipoint' (the budgets widen multipoint layers)")
    if not budgets or any(not 0.0 <= float(b) <= 8.0 for b in budgets):
        raise OptionError(f"budgets={list(budgets)!r} is invalid; give extra-MAC fractions in [0, 8], e.g. "
                          "(0, 0.05, 0.1, 0.15)")
    score = evaluate if evaluate is not None else _proxy(pipe)
    points: List[Dict[str, Any]] = []
    models = []
    for b in sorted({float(x) for x in budgets}):
        t = time.perf_counter()
        built = pipe.build(complexity_budget=b)
        mp = built.info.get("multipoint", {})
        p = {"complexity_budget": b, "metric": float(score(built.model)),
             "extra_macs_fraction": float(mp.get("extra_macs_fraction", 0.0)),
             "extra_macs": float(mp.get("extra_macs", 0.0)), "points_per_channel": float(mp.get("points_per_channel", 1.0)),
             "activation_points": sum(int(np.sum(np.asarray(lp.weight.multipoint.get("act_points", [1])) > 1))
                                      for lp in built.plan.quantized_layers()
                                      if lp.weight is not None and lp.weight.multipoint),
             "seconds": time.perf_counter() - t}
        points.append(p)
        models.append(built.model)
    front, best = [], -float("inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i]["extra_macs_fraction"], -points[i]["metric"])):
        if points[i]["metric"] > best + 1e-12:
            front.append(i)
            best = points[i]["metric"]
    out = {"metric": "evaluate" if evaluate is not None else "proxy",
           "metric_definition": ("the user's evaluate(model)" if evaluate is not None else
                                 "minus the output divergence from FP32 on the calibration proxy (KL nats for class "
                                 "scores, else noise-to-signal)"),
           "points": points, "front": front}
    if keep_models:
        out["models"] = models
    return out


def front_png(result: Dict[str, Any], *, title: str = "multipoint: quality vs complexity", baseline: Optional[float] = None,
              metric_label: Optional[str] = None, dpi: int = 110) -> bytes:
    """The front as a PNG: x extra MACs (% of the model's), y the metric; every budget a dot labelled with it, the
    front a line; ``baseline`` (e.g. FP32's metric) a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    pts = result["points"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    x = [100 * p["extra_macs_fraction"] for p in pts]
    y = [p["metric"] for p in pts]
    ax.scatter(x, y, color="tab:blue", zorder=3)
    for p, xi, yi in zip(pts, x, y):
        ax.annotate(f"{100 * p['complexity_budget']:.0f}%", (xi, yi), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    f = result["front"]
    ax.plot([x[i] for i in f], [y[i] for i in f], color="tab:orange", label="front")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="FP32")
    ax.set_xlabel("extra MACs (% of the model)")
    ax.set_ylabel(metric_label or result.get("metric", "metric"))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
