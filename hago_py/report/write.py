"""Render a quantization Result as report.md / report.html / report.json (atomic writes)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict

from ..errors import OutputError
from ..ir.io import atomic_write_text


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_markdown(report: Dict[str, Any], plan_summary: Dict[str, Any] | None = None) -> str:
    r = report
    lines = [f"# hago_py quantization report — target `{r['target']}`", ""]
    opts = r.get("options", {})
    lines.append(f"- weights W{opts.get('weight_bits')} / activations A{opts.get('activation_bits')}, "
                 f"clipping `{opts.get('clipping')}` on {r.get('calibration_samples')} samples, "
                 f"activation mode `{opts.get('activation_mode')}`")
    lines.append(f"- prepare passes that changed the graph: {', '.join(r.get('prepare_passes') or []) or 'none'}")
    rem = r.get("remedy") or {}
    lines.append(f"- saturation remedy: **{rem.get('chosen', 'none')}** — {rem.get('why', '')}")
    for hz, cands in (rem.get("candidates") or {}).items():
        for c, v in cands.items():
            lines.append(f"  - {hz} / {c}: fused SQNR {_fmt(v.get('sqnr_fused_db'), 1)} dB"
                         + (f", {_fmt(v.get('median_ms'), 3)} ms (measured)" if 'median_ms' in v else ""))
    lat = r.get("latency")
    if lat:
        sp = lat["speedup_spread"]
        lines.append(f"- latency: **{lat['speedup']:.2f}x** vs FP32 ({'measured' if lat['measured'] else 'predicted'}"
                     f", batch 1, {lat['threads']} thread(s), interleaved; per-round ratio p10–p90 "
                     f"{sp['p10']:.2f}–{sp['p90']:.2f})")
    chk = r.get("artifact_check")
    if chk:
        lines.append(f"- artifact check: {'**ok**' if chk['ok'] else '**FLOAT FALLBACK**'} — integer kernels "
                     f"{chk['integer_kernels']}, float compute {chk['float_compute']}; output SQNR vs FP32: "
                     f"fused {_fmt(chk.get('sqnr_fused_db'), 1)} dB, simulated {_fmt(chk.get('sqnr_simulated_db'), 1)} dB")
        for fb in chk.get("fallbacks", []):
            lines.append(f"  - fallback: {fb}")
        for note in chk.get("notes", []):
            lines.append(f"  - note: {note}")
    lines += ["", "## Per-layer decisions", "",
              "| node | op | quantized | kernel | weights | activations | remedy | why |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r.get("layers", []):
        lines.append(f"| `{row['node']}` | {row['op']} | {'yes' if row['quantized'] else 'no'} | "
                     f"{row.get('kernel') or '-'} | {row.get('weight') or '-'} | {row.get('activation') or '-'} | "
                     f"{row.get('remedy') or '-'} | {row['reason']} |")
    return "\n".join(lines) + "\n"


def write_report(result, out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create report folder '{out}': {e.strerror}; choose a writable location") from e
    md = render_markdown(result.report)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.json", json.dumps(result.report, indent=1, sort_keys=True, default=str) + "\n")
    body = "<br>\n".join(html.escape(line) for line in md.splitlines())
    atomic_write_text(out / "report.html", f"<!doctype html><meta charset='utf-8'><title>hago_py report</title>"
                                           f"<body style='font-family:monospace'>{body}</body>\n")
    result.plan.save(out / "plan.json")
    return out
