"""The Pareto plot of a search (matplotlib, Agg, no global pyplot state) and the peers' points.

x: speed-up vs FP32 (latency ratio, >1 is faster); y: metric - FP32 metric (higher is better). Every measured
plan is a dot, the front a line, the chosen plan a star, FP32 a black square; predicted latencies are drawn
hollow. Peer points (other tools' recipes, e.g. from benchmarks/results/*.json) are drawn on the same axes
when the search used the same kind of metric, else as vertical markers of their speed-ups only (a proxy
and a validation metric do not share units).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import OptionError

PeersLike = Union[str, Path, Sequence[Dict[str, Any]], None]


def load_peers(src: PeersLike) -> List[Dict[str, Any]]:
    """Peer points as ``[{"name", "family", "speedup", "delta"}]`` where ``delta`` = metric - FP32 metric.

    ``src``: a list of dicts (``name``, ``speedup`` and ``delta``; or ``drop`` = FP32 - metric) or the path
    of a benchmark result file (``benchmarks/results/<model>.json``: ``rows[].recipe / family / speedup.median
    / drop`` where that file's ``drop`` is metric - FP32)."""
    if src is None:
        return []
    try:
        return _load_peers(src)
    except OptionError:
        raise
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:
        where = f"peers file '{src}'" if isinstance(src, (str, Path)) else "the peers list"
        raise OptionError(f"{where} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]}); pass a "
                          "benchmarks/results/*.json file or a list of {name, speedup, delta} dicts") from e


def _load_peers(src: PeersLike) -> List[Dict[str, Any]]:
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise OptionError(f"peers file '{path}' does not exist; pass a benchmarks/results/*.json file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise OptionError(f"peers file '{path}' cannot be read as JSON ({type(e).__name__}); pass a "
                              "benchmarks/results/*.json file or a list of {name, speedup, delta} dicts") from e
        if not isinstance(data, dict) or not isinstance(data.get("rows", []), list):
            raise OptionError(f"peers file '{path}' is not a benchmark result (a JSON object with a 'rows' list); "
                              "pass a benchmarks/results/*.json file")
        out = []
        for r in data.get("rows", []):
            sp = r.get("speedup")
            sp = sp.get("median") if isinstance(sp, dict) else sp
            if sp is None or r.get("drop") is None or r.get("error"):
                continue
            fp32 = (data.get("fp32") or {}).get("metric", data.get("fp32_reference"))
            out.append({"name": r.get("recipe", "?"), "family": r.get("family", "peer"), "speedup": float(sp),
                        "delta": float(r["drop"]), "metric": r.get("metric"), "fp32": fp32,
                        "source": f"{path.name} ({data.get('metric_name', 'metric')}, "
                                  f"{data.get('eval_samples', '?')} samples)"})
        return out
    out = []
    for i, r in enumerate(src):
        if not isinstance(r, dict) or "speedup" not in r or not ("delta" in r or "drop" in r):
            raise OptionError(f"peer point {i} must be a dict with speedup and delta (metric - FP32) or drop "
                              f"(FP32 - metric), got {r!r}")
        delta = float(r["delta"]) if "delta" in r else -float(r["drop"])
        out.append({"name": str(r.get("name", f"peer{i}")), "family": r.get("family", "peer"),
                    "speedup": float(r["speedup"]), "delta": delta, "fp32": r.get("fp32"),
                    "source": r.get("source", "given")})
    return out


def align_peers(peers: List[Dict[str, Any]], fp32_metric: Optional[float]) -> Tuple[List[Dict[str, Any]], str]:
    """Peer deltas in the search metric's units: a peer file in percent (FP32 81.03) against a metric in
    fractions (FP32 0.81) is scaled by 1/100 (and the reverse by 100); other units are left alone."""
    out, note = [], ""
    for p in peers:
        q = dict(p)
        ref = p.get("fp32")
        if ref and fp32_metric and fp32_metric > 0 and ref > 0:
            ratio = ref / fp32_metric
            if 50 <= ratio <= 200:
                q["delta"] = p["delta"] / 100.0
                note = "peer deltas converted from % to fractions"
            elif 0.005 <= ratio <= 0.02:
                q["delta"] = p["delta"] * 100.0
                note = "peer deltas converted from fractions to %"
        out.append(q)
    return out, note


def pareto_png(search: Dict[str, Any], peers: Optional[List[Dict[str, Any]]] = None, *, dpi: int = 110) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = search.get("metric", {})
    fp32 = metric.get("fp32", 0.0)
    kind = metric.get("kind", "user")
    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)

    def xy(pts):
        return [p["speedup"] for p in pts], [p["metric"] - fp32 for p in pts]

    pts = [p for p in search.get("points", []) if p.get("quantized", True)]
    for pred in (False, True):
        sel = [p for p in pts if (p.get("latency") == "predicted") == pred]
        if sel:
            x, y = xy(sel)
            ax.scatter(x, y, s=18, alpha=0.6, facecolors="none" if pred else "tab:blue", edgecolors="tab:blue",
                       label=f"measured plans ({'predicted' if pred else 'measured'} latency)")
    front = [p for p in search.get("pareto", []) if p.get("id") != "fp32"]
    if front:
        x, y = xy(front)
        ax.plot(x, y, "-o", color="tab:orange", ms=5, lw=1.5, label="Pareto front")
    ax.scatter([1.0], [0.0], marker="s", s=50, color="black", zorder=5, label="FP32")
    ch = search.get("chosen")
    if ch:
        ax.scatter([ch["speedup"]], [ch["metric"] - fp32], marker="*", s=260, color="tab:red", zorder=6,
                   edgecolors="black", label="chosen")
    b = search.get("budgets", {})
    if b.get("accuracy") is not None:
        ax.axhline(-b["accuracy"], ls="--", lw=1, color="tab:red", alpha=0.6, label="accuracy budget")
    if b.get("latency") is not None:
        ax.axvline(b["latency"], ls=":", lw=1, color="tab:purple", alpha=0.8, label="latency budget")
    peers, note = align_peers(peers or [], fp32)
    same_units = kind == "user"
    for i, p in enumerate(peers):
        col = {"ort": "tab:green", "nncf": "tab:brown", "hago": "tab:gray"}.get(str(p.get("family")), "tab:olive")
        if same_units:
            ax.scatter([p["speedup"]], [p["delta"]], marker="^", s=40, color=col, zorder=4,
                       label=f"peers (own eval set{'; ' + note if note else ''})" if i == 0 else None)
            ax.annotate(p["name"], (p["speedup"], p["delta"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        else:
            ax.axvline(p["speedup"], color=col, lw=0.8, alpha=0.5,
                       label="peer speed-ups (accuracy in other units)" if i == 0 else None)
            ax.annotate(p["name"], (p["speedup"], 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="bottom")
    ax.set_xlabel("speed-up vs FP32 (latency ratio, higher is faster)")
    name = metric.get("name", "metric")
    ax.set_ylabel(f"{name} - FP32" + (" (proxy)" if kind == "proxy" else ""))
    ax.set_title(f"Search: {len(pts)} measured plans, target {search.get('target', '')}".strip())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
