"""How much MiniLM's STS-B Spearman rho moves between equally good 4-bit embedding tables.

The greedy range search of the row-wise scheme (quant/embedding.py, Guan et al. 2019) steps by range / NUM_BINS;
the paper's 200 bins is one choice among many equally reasonable ones. Each setting of NUM_BINS gives tables of
practically the same error but different roundings, and the rho of the resulting model is one draw of how a
4-bit table's noise lands on 1,379 sentence pairs. This script quantizes the W8A8 default once, then quantizes
the embedding tables for each variant x NUM_BINS and scores the full STS-B test set: the spread of rho across
bins is the resolution at which two variants (or a target like "drop <= 0.002") can be told apart.

    python -m benchmarks.embedding_spread --bins 190,200,210 --threads 2

``--error-scales 0.25,0.5`` adds a study (not a model hago writes): the FP32 tables of the W8A8 model replaced by
W + a * (W4 - W), W4 the default per-row 4-bit reconstruction of each table, i.e. the same error pattern a times
smaller (a = 0.25: the error of ~6-bit tables). If rho's spread does not shrink with a, the spread is not the
tables' error but how any small perturbation of this model lands on the metric.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

#: name -> quantize_embeddings keyword arguments (small_rows=0: every table 4-bit; 1024: tables of <= 1024 rows
#: -- MiniLM's position and token-type tables -- 8-bit)
VARIANTS = {
    "all4_row_paper": dict(center=False, block=0, small_rows=0),
    "all4_row_centred": dict(center=True, block=0, small_rows=0),
    "all4_block128_centred": dict(center=True, block=128, small_rows=0),
    "word4_row_centred": dict(center=True, block=0, small_rows=1024),
    "word4_block128_centred": dict(center=True, block=128, small_rows=1024),
    "all4_row_hot8": dict(center=True, block=0, small_rows=0, hot_rows=8),
    "all4_block128_hot8": dict(center=True, block=128, small_rows=0, hot_rows=8),
}


def error_scaled(base, alpha: float):
    """(model, {node: {relative_error}}): ``base`` with each eligible embedding table W replaced by the float table
    W + alpha * (W4 - W), W4 the default per-row 4-bit reconstruction (a study: the model stays FP32-sized)."""
    from onnx import numpy_helper
    from hago_py.quant import embedding as E

    m = base.__class__()
    m.CopyFrom(base)
    inits = {t.name: t for t in m.graph.initializer}
    rec = {}
    for e in E.embedding_tables(m):
        if e["skip"]:
            continue
        t = inits[e["table"]]
        w = numpy_helper.to_array(t).astype(np.float32)
        q, scale, lo, mean = E._rowwise_table(w, 4, True, True)
        w4 = E.rowwise_dequantize(q, scale, lo) + (0 if mean is None else mean)
        w_a = (w + alpha * (w4 - w)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(w_a, t.name))
        rec[e["node"]] = {"relative_error": float(np.linalg.norm(w_a - w) / max(np.linalg.norm(w), 1e-30))}
    return m, rec


def main(argv=None):
    import hago_py
    from hago_py.quant import embedding as E
    from benchmarks.corpus import MiniLmStsb, locate
    from benchmarks.run import machine_info, versions

    p = argparse.ArgumentParser()
    p.add_argument("--bins", default="190,200,210")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base", default="w8a8", choices=("w8a8", "fp32"),
                   help="the model the tables are quantized in: the W8A8 default (the issue's setting) or FP32")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="sentences per ORT run when scoring (default the corpus's 64); the W8A8 default quantizes "
                        "activations per run (dynamic, per tensor), so a sentence's result depends on its batch")
    p.add_argument("--activation-granularity", default="per_tensor", choices=("per_tensor", "per_token"),
                   help="of the W8A8 base's dynamic activations (per_token: one scale per token, batch-invariant)")
    p.add_argument("--no-mask-padding", action="store_true",
                   help="W8A8 base with mask_padding=False (dynamic ranges over the padding rows too)")
    p.add_argument("--error-scales", default="", help="e.g. 0.25,0.5: the error-scaled study (module docstring)")
    p.add_argument("--target", default="x86_avx2", help="spec of the W8A8 base (the embeddings suite's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "embeddings" / "spread" / "spread.json"))
    a = p.parse_args(argv)
    root, why = locate()
    if root is None:
        print(f"skipped: {why}")
        return 0
    M = MiniLmStsb(root)
    t0 = time.time()
    fp32 = M.evaluate(str(M.model_path), threads=a.threads, batch=a.eval_batch)
    if a.base == "fp32":  # the tables on the FP32 model: no 8-bit activation rounding for the error to flip
        import onnx

        base = onnx.load(str(M.model_path))
    else:
        base = hago_py.quantize(str(M.model_path), calibration=M.calib_arrays(256), target=a.target,
                                measure_latency=False, activation_granularity=a.activation_granularity,
                                mask_padding=not a.no_mask_padding).model
    calib = M.calib_arrays(256)
    reads = E.count_reads([e for e in E.embedding_tables(base) if e["indices"] in calib], [calib])  # hot_rows
    w8 = M.evaluate(base, threads=a.threads, batch=a.eval_batch)
    print(f"FP32 {fp32:.4f}  base {a.base} {w8:.4f} ({w8 - fp32:+.4f})", flush=True)
    out = {"machine": machine_info(a.threads), "versions": versions(), "fp32": fp32, "base": a.base, "w8a8": w8,
           "target": a.target, "eval_batch": a.eval_batch or M.eval_batch,
           "activation_granularity": a.activation_granularity, "mask_padding": not a.no_mask_padding,
           "variants": {}}
    bins = [int(b) for b in a.bins.split(",")]
    scales = {f"error_x{s}": float(s) for s in a.error_scales.split(",") if s}
    for name in [v for v in a.variants.split(",") if v] + list(scales):
        rows = []
        for nb in bins:
            E.NUM_BINS = nb
            if name in scales:
                m, rec = error_scaled(base, scales[name])
            else:
                m, rec = E.quantize_embeddings(base, "rowwise", 4, read_counts=reads, **VARIANTS[name])
            rho = M.evaluate(m, threads=a.threads, batch=a.eval_batch)
            err = {k.split("/")[-2]: round(v["relative_error"], 4) for k, v in rec.items()}
            rows.append({"num_bins": nb, "rho": rho, "drop": rho - fp32, "relative_error": err})
            print(f"{name:18s} bins {nb}: rho {rho:.4f} ({rho - fp32:+.4f})  {err}", flush=True)
        E.NUM_BINS = 200
        drops = [r["drop"] for r in rows]
        opts = {"error_scale": scales[name]} if name in scales else VARIANTS[name]
        out["variants"][name] = {"options": opts, "runs": rows, "drop_mean": statistics.mean(drops),
                                 "drop_sd": statistics.stdev(drops) if len(drops) > 1 else 0.0,
                                 "drop_min": min(drops), "drop_max": max(drops)}
    out["wall_s"] = time.time() - t0
    lines = ["| variant | rho drop vs FP32: mean | sd | worst | best | runs |", "|---|---|---|---|---|---|"]
    for name, v in out["variants"].items():
        lines.append(f"| {name} | {v['drop_mean']:+.4f} | {v['drop_sd']:.4f} | {v['drop_min']:+.4f} | "
                     f"{v['drop_max']:+.4f} | {len(v['runs'])} |")
    md = "\n".join(lines) + f"\n\nFP32 {fp32:.4f}, base {a.base} {w8:.4f} ({w8 - fp32:+.4f}); NUM_BINS {bins}; " \
        f"mask_padding {not a.no_mask_padding}; {out['machine'].get('cpu')}; {time.strftime('%Y-%m-%d')}\n"
    print(md)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
