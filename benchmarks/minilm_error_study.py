"""Where MiniLM-L6's W8A8 error comes from, and how much of it Spearman rho on STS-B can see.

    python -m benchmarks.minilm_error_study [--variants default,float_f2,f2_per_token] [--noise-draws 400]
                                            [--out benchmarks/results/embeddings/spread/error_study]

Two measurements, same host, same run:

1. **Variants of the W8A8 default** (hago_py.quantize, x86_avx2): one group of the 36 weight MatMuls kept FP32
   (``float_q`` ... ``float_f2``: query / key / value / attention output / FFN1 / FFN2), or FFN2's dynamic input
   per token / static, and every embedding table row-wise 4-bit (``tables_all4``). Each is scored by the Spearman
   rho drop vs FP32 (test set, 64 and 1 sentences per ORT run), the paired bootstrap spread of that drop (the
   test pairs resampled; how precisely 1,379 pairs measure it) and the RMSE of its pair cosines against the FP32
   model's (batch 64), a smooth measure of the error.
2. **A noise model of the metric**: Gaussian noise of RMSE sigma added to the FP32 pair cosines (``--noise-draws``
   draws per sigma): the rho drop a model with that much *independent* error would score, mean and spread.

If rho followed the error, removing most of it (FFN2) would remove most of the drop.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROLES = {"q": "self/query", "k": "self/key", "v": "self/value", "o": "attention/output", "f1": "intermediate",
         "f2": "/output/dense"}
SIGMAS = (0.004, 0.006, 0.008, 0.010, 0.012, 0.014)


def _matmuls(model_path) -> List[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type == "MatMul"]


def _role(names: List[str], role: str) -> List[str]:
    pat = ROLES[role]
    return [n for n in names if pat in n and not (role == "f2" and "attention" in n)]


def variants(model_path) -> Dict[str, dict]:
    mm = _matmuls(model_path)
    v: Dict[str, dict] = {"default": {}}
    for r in ROLES:
        v[f"float_{r}"] = {"exclude": _role(mm, r)}
    f2, o = _role(mm, "f2"), _role(mm, "o")
    v["f2_per_token"] = {"layers": {n: {"activation_granularity": "per_token"} for n in f2}}
    v["f2_o_per_token"] = {"layers": {n: {"activation_granularity": "per_token"} for n in f2 + o}}
    v["f2_static"] = {"layers": {n: {"activation_mode": "static"} for n in f2}}
    v["tables_all4"] = {"embedding_scheme": "rowwise", "embedding_small_rows": 0}   # issue 15's configuration
    v["no_mask_padding"] = {"mask_padding": False}   # dynamic ranges over the padding rows too (before 2026-12-04)
    v["tables_all4_no_mask_padding"] = dict(v["tables_all4"], mask_padding=False)
    return v


def paired_bootstrap(cos: np.ndarray, cos_fp: np.ndarray, gold: np.ndarray, draws: int, seed: int = 0):
    """Sampling spread of the measured drop on this test set: the SD of rho(cos) - rho(cos_fp) over ``draws``
    resamples of the pairs (with replacement, the same pairs for both)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    n = len(gold)
    d = np.empty(draws)
    for k in range(draws):
        i = rng.integers(0, n, n)
        d[k] = spearmanr(cos[i], gold[i]).statistic - spearmanr(cos_fp[i], gold[i]).statistic
    return float(d.std()), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def _cosines(M, model, batch: int) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    d = M._split("test")
    e1 = M._embed(sess, {k: d["s1_" + k] for k in M.INPUTS}, batch)
    e2 = M._embed(sess, {k: d["s2_" + k] for k in M.INPUTS}, batch)
    return (e1 * e2).sum(axis=1)


def main(argv=None) -> int:
    from scipy.stats import spearmanr

    import hago_py
    from benchmarks.corpus import get_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="bench folder (default ../shared/bench or $HAGO_BENCH_DATA)")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--noise-draws", type=int, default=400)
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of the test pairs")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/embeddings/spread/error_study")
    a = ap.parse_args(argv)
    import os

    root = a.data or os.environ.get("HAGO_BENCH_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "bench")
    M = get_model("minilm", root)
    if not all(Path(p).exists() for p in M.required_files()):
        print(f"skipped: the MiniLM corpus is not under {root}")
        return 0
    gold = M._split("test")["scores"]
    c_fp = {b: _cosines(M, str(M.model_path), b) for b in (64, 1)}
    rho_fp = {b: float(spearmanr(c_fp[b], gold).statistic) for b in c_fp}
    rows = []
    allv = variants(M.model_path)
    names = a.variants.split(",") if a.variants else list(allv)
    calib = M.calib_arrays(a.calib)
    for name in names:
        t0 = time.perf_counter()
        res = hago_py.quantize(str(M.model_path), calib, "x86_avx2", measure_latency=False, **allv[name])
        row = {"variant": name, "kept_fp32": len(allv[name].get("exclude", []))}
        for b in (64, 1):
            c = _cosines(M, res.model, b)
            row[f"drop_b{b}"] = round(float(spearmanr(c, gold).statistic) - rho_fp[b], 5)
            if b == 64:
                row["cos_rmse"] = round(float(np.sqrt(np.mean((c - c_fp[64]) ** 2))), 5)
                sd, lo, hi = paired_bootstrap(c, c_fp[64], gold, a.bootstrap)
                row.update(bootstrap_sd=round(sd, 5), bootstrap_95=[round(lo, 5), round(hi, 5)])
        row["seconds"] = round(time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    rng = np.random.default_rng(0)
    noise = []
    for s in SIGMAS:
        d = np.array([spearmanr(c_fp[64] + rng.normal(0, s, c_fp[64].size), gold).statistic - rho_fp[64]
                      for _ in range(a.noise_draws)])
        noise.append({"sigma": s, "mean": round(float(d.mean()), 5), "sd": round(float(d.std()), 5),
                      "p5": round(float(np.percentile(d, 5)), 5), "p_below_0.002": round(float(np.mean(d < -0.002)), 3)})
    from benchmarks.run import machine_info

    machine = machine_info(2)
    host = f"{machine['cpu']} ({', '.join(machine['int8_isa']) or 'no int8 ISA flags'})"
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": host, "machine": machine,
           "fp32_rho": rho_fp,
           "variants": rows, "noise_model": noise}
    from hago_py.ir.io import atomic_write_bytes

    base = Path(a.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(base.with_suffix(".json"), json.dumps(out, indent=1).encode())
    md = ["| variant | kept FP32 | rho drop (batch 64) | paired bootstrap SD, 95 % interval | rho drop (batch 1) | "
          "pair-cosine RMSE vs FP32 |", "|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['kept_fp32']} | {r['drop_b64']:+.4f} | {r['bootstrap_sd']:.4f}, "
           f"[{r['bootstrap_95'][0]:+.4f}, {r['bootstrap_95'][1]:+.4f}] | {r['drop_b1']:+.4f} | {r['cos_rmse']:.4f} |"
           for r in rows]
    md += ["", "| Gaussian noise on the FP32 cosines, RMSE | rho drop: mean | sd | 5th percentile | P(drop < -0.002) |",
           "|---|---|---|---|---|"]
    md += [f"| {n['sigma']:.3f} | {n['mean']:+.4f} | {n['sd']:.4f} | {n['p5']:+.4f} | {n['p_below_0.002']:.2f} |"
           for n in noise]
    md += ["", f"FP32 rho {rho_fp[64]:.4f}; {host}; {out['date']}; {a.noise_draws} noise draws per RMSE"]
    atomic_write_bytes(base.with_suffix(".md"), ("\n".join(md) + "\n").encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
