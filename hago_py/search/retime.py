"""The re-timing stage (measured latency only): the top feasible candidates timed again together with FP32 in
one interleaved run through the latency backend, so the final choice compares them under the same conditions.
Input: the trial runner (points in its state); output: the points' speed-ups, updated in place
(``speedup_first`` keeps the first measure, ``retimed`` marks them)."""
from __future__ import annotations

from .evaluators import ratio_stats
from .strategies import top_candidates
from .trials import Trials


def retime(tr: Trials) -> None:
    st = tr.state
    pts = [p for p in st.points.values() if tr.feasible(p)]
    top = top_candidates(pts, st.objective, k=4)
    if len(top) < 2:
        return
    keys = sorted(p["id"] for p in top)

    def run():
        sessions = {"fp32": tr.fp_timed()}
        for k in keys:
            sessions[k] = tr.timed(tr.build(st.full[k]).model)
        reps = max(st.timing["plan_repeats"], 20)
        t = tr.timer.time(sessions, tr.feed, repeats=reps, warmup=3, min_time_s=st.timing["retime_min_time_s"])
        base = t.baseline.samples
        out = {}
        for i, x in enumerate(t.timings[1:]):
            s = ratio_stats(base, x.samples, seed=i)
            out[x.label] = {"speedup": s["ratio"], "se": s["se"], "paired_median": s["paired_median"],
                            "p10": s["p10"], "p90": s["p90"], "ms": x.median * 1e3}
        return {"plans": keys, "results": out}

    rec = tr.trial("retime", {"plans": keys}, run, stage="retime")
    for k, r in rec["results"].items():
        p = st.points[k]
        p.setdefault("speedup_first", p["speedup"])
        p["speedup"] = r["speedup"]
        p["retimed"] = True
    tr.log("retime", "re-timed the top candidates together with FP32: " + ", ".join(
        f"{k[:8]} {rec['results'][k]['speedup']:.3f}x" for k in keys))
