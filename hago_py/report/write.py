"""Render a quantization Result as report.md / report.html / report.json (atomic writes).

A search result adds: the Pareto plot (pareto.png, embedded in the HTML as base64) with the FP32 point and
optional peer points, the front as a table, the per-layer table (op, shape, chosen configuration,
sensitivity, latency share, why) and the search log.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import OutputError
from ..ir.io import write_all

LOG_LINES_MD = 400


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _g(x, nd=4):
    return "-" if x is None else f"{x:.{nd}g}"


def _short(node: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0/conv1' (exporter names end in the op type)."""
    parts = [p for p in node.split("/") if p]
    if len(parts) >= 3:
        return "/".join(parts[-3:-1])
    return "/".join(parts) or node


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Dict[str, Any], plan_summary: Dict[str, Any] | None = None,
                    pareto_image: Optional[str] = None) -> str:
    r = report
    lines = [f"# hago_py quantization report — target `{r['target']}`", ""]
    if r.get("target_host"):
        lines.append(f"- target `host`: {r['target_host']}")
    opts = r.get("options", {})
    nu = " non-uniform (levels on the int8 kernel)" if opts.get("weight_scheme") == "nonuniform" else ""
    lines.append(f"- weights W{opts.get('weight_bits')}{nu} / activations A{opts.get('activation_bits')}, "
                 f"clipping `{opts.get('clipping')}` on {r.get('calibration_samples')} samples, "
                 f"activation mode `{opts.get('activation_mode')}`"
                 + (", dynamic activations per token" if opts.get("activation_granularity") == "per_token" else ""))
    syn = r.get("synthetic")
    if syn:  # calibration="synthetic": no real sample was used anywhere
        det = syn.get("details", {})
        lines.append(f"- calibration data: **synthetic** (data-free), `{syn['method']}`, {syn['samples']} samples made "
                     f"in {syn['seconds']:.1f} s on {syn.get('torch_threads')} torch thread(s); statistics matched: "
                     f"{det.get('statistics', '-')}" + (f", {det['classes_covered']} of {det['classes']} classes "
                                                       "targeted" if det.get("class_target") else "")
                     + "; final loss " + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in syn.get("final_loss", {}).items()))
    lines.append(f"- prepare passes that changed the graph: {', '.join(r.get('prepare_passes') or []) or 'none'}")
    sm = r.get("smoothing") or []
    if sm:
        lines.append(f"- activation smoothing (SmoothQuant, alpha {sm[0]['alpha']}): {len(sm)} tensors, outlier ratio "
                     "max/median of max|x| per channel " + ", ".join(
                         f"{e['outlier_ratio_before']:.1f}->{e['outlier_ratio_after']:.1f}" for e in sm[:6])
                     + (" ..." if len(sm) > 6 else "")
                     + f" ({sum(e['how'] == 'Mul' for e in sm)} as an extra Mul, the rest folded into LayerNorm)")
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
                     f", batch 1, {lat['threads']} thread(s)"
                     + (f", TVM on {lat['where']} via {lat.get('meta', {}).get('rpc_endpoint')}" if lat.get('where')
                        else f", {lat['measured_on']}" if lat['measured'] and lat.get('measured_on') else "")
                     + (f", interleaved; per-round ratio p10–p90 {sp['p10']:.2f}–{sp['p90']:.2f})" if lat['measured']
                        else f"; {lat.get('source', 'cost model')})"))
    chk = r.get("artifact_check")
    if chk:
        lines.append(f"- artifact check: {'**ok**' if chk['ok'] else '**FLOAT FALLBACK**'} — integer kernels "
                     f"{chk['integer_kernels']}, float compute {chk['float_compute']}; output SQNR vs FP32: "
                     f"fused {_fmt(chk.get('sqnr_fused_db'), 1)} dB, simulated {_fmt(chk.get('sqnr_simulated_db'), 1)} dB")
        for fb in chk.get("fallbacks", []):
            lines.append(f"  - fallback: {fb}")
        for note in chk.get("notes", []):
            lines.append(f"  - note: {note}")
    if r.get("search"):
        lines += [""] + render_search_markdown(r["search"], pareto_image)
    if r.get("hybrid"):
        lines += [""] + render_hybrid_markdown(r["hybrid"])
    if r.get("nonuniform_mix"):
        lines += [""] + render_nonuniform_mix_markdown(r["nonuniform_mix"])
    if r.get("embeddings"):
        lines += [""] + render_embeddings_markdown(r["embeddings"])
    lines += ["", "## Per-layer decisions", "",
              "| node | op | quantized | kernel | weights | activations | remedy | why |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r.get("layers", []):
        lines.append(f"| `{row['node']}` | {row['op']} | {'yes' if row['quantized'] else 'no'} | "
                     f"{row.get('kernel') or '-'} | {row.get('weight') or '-'} | {row.get('activation') or '-'} | "
                     f"{row.get('remedy') or '-'} | {_cell(row['reason'])} |")
    if r.get("search"):
        lines += render_search_log(r["search"])
    return "\n".join(lines) + "\n"


def render_embeddings_markdown(emb: Dict[str, Any]) -> List[str]:
    """embedding_scheme (quant/embedding.py): per table, scheme, size before / after, relative error."""
    lines = ["## Embedding tables", "", "| node | table | scheme | rows x dim | MB before | MB after | rel. error | note |",
             "|---|---|---|---|---|---|---|---|"]
    for node, e in emb.items():
        if e.get("scheme") == "none":
            lines.append(f"| `{node}` | `{e['table']}` | kept | | | | | {_cell(e.get('why', ''))} |")
            continue
        grids = e.get("grids_per_row", 1)
        how = "; ".join(x for x in (e.get("range_search") or f"{e.get('centroids')} centroids per {e.get('codebook')}",
                                    f"{grids} grids per row" if grids > 1 else None,
                                    "centred on the column mean" if e.get("centred") else None,
                                    f"{e['hot_rows']} most-read rows exact ({100 * e['hot_read_share']:.0f} % of "
                                    "calibration reads)" if e.get("hot_rows") else None,
                                    e.get("why")) if x)
        lines.append(f"| `{node}` | `{e['table']}` | {e['scheme']} {e['bits']}-bit | {e['rows']} x {e['dim']} | "
                     f"{e['bytes_before'] / 1e6:.2f} | {e['bytes_after'] / 1e6:.2f} | {e['relative_error']:.4f} | "
                     f"{_cell(how)} |")
    return lines


def render_nonuniform_mix_markdown(m: Dict[str, Any]) -> List[str]:
    """nonuniform_size (quant/nu_mix.py): per non-uniform layer, its bits, stored bytes and sensitivity."""
    int8 = max(m["int8_bytes"], 1)
    lines = ["## Non-uniform weights under a size budget", "",
             f"- nonuniform_size {m['size']}: {m['low_bits']} layer(s) at 3 bits, stored "
             f"{m['bytes_final']} B = {m['bytes_final'] / int8:.3f} of the {m['int8_bytes']} INT8 bytes "
             f"({'met' if m['reached'] else '**not met**'}; all at their own bits {m['bytes_start'] / int8:.3f}); "
             f"chosen in {m['seconds']:.1f} s"]
    if m.get("sensitivity"):
        lines.append(f"- sensitivity: {m['sensitivity']['definition']}; background {_g(m['sensitivity']['background'])}")
    if m.get("note"):
        lines.append(f"- {m['note']}")
    if m.get("layers"):
        lines += ["", "| node | op | weights | bits | stored B | saved at 3 bits | sensitivity | why |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in m["layers"]:
            sens = "-" if row["sensitivity"] is None else _g(row["sensitivity"])
            lines.append(f"| `{row['node']}` | {row['op']} | {row['weights']} | {row['bits']} | {row['bytes']} | "
                         f"{row['bytes_saved_at_3']} | {sens} | {_cell(row['why'])} |")
    return lines


def render_hybrid_markdown(h: Dict[str, Any]) -> List[str]:
    """granularity="hybrid" (quant/hybrid.py): each layer's sensitivity to per-tensor weights, latency gain, choice."""
    lines = ["## Hybrid weight granularity", ""]
    if not h.get("layers"):
        return lines + [f"- {h.get('note', 'no layer could take either granularity')}"]
    sn, lat = h["sensitivity"], h["latency"]
    lines.append(f"- {h['per_tensor']} layer(s) per-tensor, {h['per_channel']} per-channel, of {h['candidates']} "
                 f"that allow both; chosen in {h['seconds']:.1f} s")
    lines.append(f"- sensitivity: {sn['definition']}; background (all per-channel) {_g(sn['background'])}; "
                 f"budget {_g(sn['budget'])}, used {_g(h['budget_used'])}")
    extra = ""
    if lat["source"] == "measured":
        extra = (f"; per-tensor saved {100 * lat['gain']:.2f} % end to end (p10–p90 {100 * lat['gain_p10']:.2f}–"
                 f"{100 * lat['gain_p90']:.2f} %; per-channel {lat['per_channel_ms']:.3f} ms, per-tensor "
                 f"{lat['per_tensor_ms']:.3f} ms)")
    lines.append(f"- latency gain: **{lat['source']}** — {lat['label']}{extra}")
    lines += ["", "| node | op | sensitivity | requant elements | latency gain | choice | why |",
              "|---|---|---|---|---|---|---|"]
    for row in h["layers"]:
        lines.append(f"| `{row['node']}` | {row['op']} | {_g(row['sensitivity'])} | {row['requant_elements']:.0f} | "
                     f"{100 * row['latency_gain']:.3f} % | {row['choice']} | {_cell(row['why'])} |")
    return lines


def render_search_markdown(s: Dict[str, Any], pareto_image: Optional[str] = None) -> List[str]:
    m, b, lat, c = s["metric"], s["budgets"], s["latency_source"], s.get("counts", {})
    proxy = m["kind"] == "proxy"
    lines = ["## Hardware-aware search", ""]
    lines.append(f"- metric: {'**proxy** — ' if proxy else ''}{m['definition']}; FP32 = {m['fp32']:.6g}")
    acc = b.get("accuracy")
    lat_b, time_b = b.get("latency"), b.get("time_s")
    lines.append("- budgets: accuracy " + (f"drop <= {_g(acc)} ({b.get('accuracy_note')})" if acc is not None
                                             else "none") +
                 "; latency " + (f">= {_g(lat_b)}x speed-up" if lat_b is not None else "none") +
                 "; time " + (f"{_g(time_b)} s" if time_b is not None else "none") + f" — objective: {s['objective']}")
    on = lat.get("measured_on")
    lines.append(f"- latency: **{lat['kind']}**" + (f" ({on})" if on and on not in lat["description"] else "")
                 + f" — {lat['description']}"
                 + ("" if lat["kind"] == "measured" else f" (target not measurable here: {lat['why']})"
                    if not lat.get("target_reachable") else ""))
    sp = s.get("space", {})
    n_cand = sum(len([x for x in L["candidates"] if not x.get("pruned")]) for L in sp.get("layers", {}).values())
    lines.append(f"- space (from the spec): {len(sp.get('layers', {}))} layers, {n_cand} active candidates, "
                 f"~{sp.get('size', 0):.3g} plans; roundings {', '.join(sp.get('roundings', []))}"
                 + "".join(f"; {n}" for n in sp.get("notes", [])))
    lines.append(f"- trials: {c.get('trials')} in all ({c.get('plan_trials')} end-to-end plans, "
                 f"{c.get('layer_candidates')} layer candidates); {c.get('measured_this_run')} measured in this run, "
                 f"{c.get('replayed')} replayed from the checkpoint; search time {s.get('search_s', 0):.0f} s"
                 + ("; **stopped early by time_budget: best plan measured so far**" if s.get("stopped_early") else ""))
    bd = s.get("boundaries") or {}
    if bd.get("edges"):
        pairs = bd.get("pairs") or []
        lines.append(f"- int8-region boundaries: {len(bd['edges'])} edges between layers; cost "
                     f"{1e6 * bd['cost_per_element']:.3g} ppm of the FP32 latency per boundary element, fitted from "
                     f"{len(pairs)} adjacent pairs timed in float together (cost model: "
                     f"{1e6 * bd.get('prior_per_element', 0.0):.3g}); adjacent float layers share it")
    ch = s.get("chosen")
    if ch:
        lines.append(f"- chosen: **{ch['speedup']:.2f}x** ({ch['latency']}) at {m['name']} {ch['metric']:.6g} "
                     f"(drop {ch['drop']:+.4g}{', proxy' if proxy else ''}); {ch['n_fp32']} of {ch['n_layers']} "
                     f"searched layers kept FP32; found by {ch['stage']}")
    lines.append("")
    if pareto_image:
        lines += [f"![Pareto front: speed-up vs {m['name']}]({pareto_image})", ""]
    lines += ["### Pareto front", "",
              "| speed-up | latency | metric | drop | FP32 layers | found by | changes vs reference |",
              "|---|---|---|---|---|---|---|"]
    for p in s.get("pareto", []):
        changes = p.get("assign") or {}
        if p.get("id") == "fp32":
            ch_txt = "FP32 model"
        else:
            items = [f"{_short(n)}:{k}" for n, k in changes.items()]
            ch_txt = ", ".join(items[:8]) + (f" (+{len(items) - 8})" if len(items) > 8 else "") or "reference"
        star = " ★" if ch and p.get("id") == ch.get("id") else ""
        lines.append(f"| {p['speedup']:.3f}x{star} | {p['latency']} | {p['metric']:.6g} | {p['drop']:+.4g} | "
                     f"{p.get('n_fp32', '-')} | {p.get('stage', '-')} | {_cell(ch_txt)} |")
    peers = s.get("peers") or []
    if peers:
        lines += ["", "### Peers", "", "| recipe | family | speed-up | metric - FP32 | source |", "|---|---|---|---|---|"]
        from .plot import align_peers

        aligned, note = align_peers(peers, m.get("fp32"))
        for p in aligned:
            lines.append(f"| {p['name']} | {p.get('family', '-')} | {p['speedup']:.2f}x | {p['delta']:+.4g} | "
                         f"{_cell(p.get('source', '-'))} |")
        lines += ["", "Peer figures come from their own runs (their evaluation set, their timing run): compare "
                      "speed-ups as ratios and accuracy only where the metric and data match"
                  + (f"; {note}." if note else ".")]
    lines += ["", "### Per-layer decisions of the search", "",
              "| node | op | shape (weight / output) | chosen config | sensitivity (rank) | latency share | why |",
              "|---|---|---|---|---|---|---|"]
    for row in s.get("layers", []):
        shape = f"{row.get('weight_shape') or '-'} / {row.get('output_shape') or '-'}"
        sens = "-" if row.get("sensitivity") is None else \
            f"{row['sensitivity']:.2g} ({row.get('sensitivity_rank')})"
        share = "-" if row.get("latency_share") is None else f"{100 * row['latency_share']:+.1f} %"
        lines.append(f"| `{row['node']}` | {row['op']} | {shape} | {_cell(row['config'])} | {sens} | {share} | "
                     f"{_cell(row['why'])} |")
    lines += ["", "Sensitivity: estimated contribution of the layer's reference configuration to the output error "
                  "(proxy units, from the layer table; rank 1 = most sensitive). Latency share: the FP32 model's "
                  f"latency the chosen configuration saves vs keeping the layer FP32 ({lat['kind']}; negative: "
                  "FP32 is faster)."]
    return lines


def render_search_log(s: Dict[str, Any]) -> List[str]:
    log = s.get("log") or []
    lines = ["", "## Search log", "", "```"]
    shown = log[-LOG_LINES_MD:]
    if len(log) > len(shown):
        lines.append(f"... {len(log) - len(shown)} earlier lines in report.json")
    for e in shown:
        lines.append(f"{e['t']:8.1f}s [{e['stage']}] {e['msg']}")
    lines.append("```")
    return lines


# ------------------------------------------------------------------------------------------------ HTML

_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>")]


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    for rx, sub in _INLINE:
        t = rx.sub(sub, t)
    return t


def markdown_to_html(md: str, images: Optional[Dict[str, str]] = None) -> str:
    """The small Markdown subset the report uses (headings, lists, tables, code blocks, images) as HTML;
    ``images`` maps an image path to a data: URI so the HTML is self-contained."""
    images = images or {}
    out, in_code, in_list, table = [], False, False, None

    def close_list():
        nonlocal in_list
        if in_list:
            out.append("</ul>")
            in_list = False

    def close_table():
        nonlocal table
        if table is not None:
            out.append("</tbody></table>")
            table = None

    for line in md.splitlines():
        if line.startswith("```"):
            close_list()
            close_table()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            close_list()
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if table is None:
                out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells) + "</tr></thead><tbody>")
                table = "head"
            elif table == "head" and all(set(c) <= set("-: ") for c in cells):
                table = "body"
            else:
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        close_table()
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line.strip())
        if m:
            close_list()
            src = images.get(m.group(2), m.group(2))
            out.append(f"<p><img alt='{html.escape(m.group(1))}' src='{src}' style='max-width:100%'></p>")
            continue
        h = re.match(r"(#+) (.*)", line)
        if h:
            close_list()
            n = len(h.group(1))
            out.append(f"<h{n}>{_inline(h.group(2))}</h{n}>")
            continue
        li = re.match(r"(\s*)- (.*)", line)
        if li:
            if not in_list:
                out.append("<ul>")
                in_list = True
            style = " style='margin-left:1.5em'" if li.group(1) else ""
            out.append(f"<li{style}>{_inline(li.group(2))}</li>")
            continue
        close_list()
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    close_list()
    close_table()
    if in_code:
        out.append("</pre>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:1em auto;font-size:14px}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:12px;vertical-align:top}th{background:#eee}pre{background:#f6f6f6;padding:.5em;"
             "font-size:12px;overflow-x:auto}code{font-size:12px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hago_py report</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def render_report(result, peers=None) -> Dict[str, bytes]:
    """The report files as {file name: bytes}: report.md, report.html (self-contained), report.json,
    plan.json and, for a search, pareto.png. Nothing is written (see write_report / Result.save)."""
    report = result.report
    files: Dict[str, bytes] = {}
    images = {}
    if report.get("search"):
        from .plot import load_peers, pareto_png

        s = report["search"]
        if peers is not None:
            s["peers"] = load_peers(peers)
        png = pareto_png(dict(s, target=report.get("target", "")), s.get("peers"))
        files["pareto.png"] = png
        images["pareto.png"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    md = render_markdown(report, pareto_image="pareto.png" if images else None)
    files["report.md"] = md.encode("utf-8")
    files["report.json"] = (json.dumps(report, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8")
    files["report.html"] = markdown_to_html(md, images).encode("utf-8")
    files["plan.json"] = (result.plan.to_json() + "\n").encode("utf-8")
    return files


def write_report(result, out_dir, peers=None) -> Path:
    """Write the report files (render_report) into ``out_dir``, all or nothing."""
    out = Path(out_dir)
    check_report_dir(out)
    write_all({out / k: v for k, v in render_report(result, peers).items()}, make_dirs=[out])
    return out


def check_report_dir(out: Path) -> None:
    """OutputError unless ``out`` is an existing folder or can be created as one (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"report folder '{out}' is an existing file; give a folder name (--report DIR)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create report folder '{out}': '{parent}' is not a writable folder; choose a "
                          "writable location")
