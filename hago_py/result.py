"""The result of one quantization: the model, its plan and the report (``finish`` makes it from a built plan).

Shared by api.quantize and the search driver (hago_py.search), so that neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx

from .backends.base import measured_on
from .backends.ort import OrtBackend
from .errors import OptionError
from .ir.io import check_writable, model_bytes, write_all
from .pipeline import Built, Pipeline, _progress
from .quant.artifact import check_artifact
from .quant.padding import token_mask_input
from .quant.plan import QuantPlan


@dataclass
class Result:
    model: onnx.ModelProto
    plan: QuantPlan
    report: Dict[str, Any]
    fp32_model: onnx.ModelProto
    pareto: List[Dict[str, Any]] = field(default_factory=list)
    chosen: Optional[Dict[str, Any]] = None

    def save(self, path, report_dir=None) -> Path:
        """Write the quantized model, next to it the plan (<name>.plan.json), and the report into
        ``report_dir``: all of them or none (every location is checked before anything is written)."""
        path = Path(path)
        check_outputs(path, report_dir)
        files = {path: model_bytes(self.model), path.with_suffix(".plan.json"): (self.plan.to_json() + "\n").encode()}
        dirs = []
        if report_dir is not None:
            from .report.write import render_report

            files.update({Path(report_dir) / k: v for k, v in render_report(self).items()})
            dirs.append(Path(report_dir))
        write_all(files, make_dirs=dirs)
        return path


def check_outputs(path, report_dir=None) -> None:
    """OutputError unless the model, its plan and the report folder can all be written (called before the
    work by the CLI, and again by Result.save)."""
    path = Path(path)
    check_writable(path)
    check_writable(path.with_suffix(".plan.json"))
    if report_dir is not None:
        from .report.write import check_report_dir

        check_report_dir(Path(report_dir))


def finish(pipe: Pipeline, built: Built, *, measure_latency: bool = True, backend=None) -> Result:
    """Deployability (ORT-optimizer fallback), output gate, artifact check, latency vs FP32 and the report for one
    built plan. backend: what times it (default: OrtBackend(threads=opts.threads)); the search passes its own."""
    from .pipeline import nothing_to_quantize
    from .quant.gate import deployable, verify_output

    built, outputs = deployable(pipe, built)
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")
               for n in built.model.graph.node):  # never return the input unchanged as if quantized (MatMulInteger:
        # per-token dynamic activations, quant/per_token.py)
        raise OptionError(nothing_to_quantize(built.plan, pipe.spec.name, pipe.opts))
    opts, spec, plan, qmodel = pipe.opts, pipe.spec, built.plan, built.model
    verify_output(qmodel, outputs, built.info.get("deploy_error"))
    report: Dict[str, Any] = {
        "target": spec.name,
        "target_host": spec.host_match,   # target="host": the CPU flags that chose this spec (hw/host.py)
        "backend": spec.backend,
        "options": opts.to_dict(),
        "prepare_passes": pipe.changed,
        "model_canonicalized": list(pipe.load_notes),
        "smoothing": list(pipe.smoothed),
        "calibration_samples": pipe.calib.num_samples,
        "calibration_notes": list(getattr(pipe.calib, "notes", [])),
        "synthetic": pipe.synthetic,
        "remedy": built.info.get("remedy", {}),
        "layers": layer_rows(plan),
        "timings_s": dict(pipe.timings),
    }
    if plan.embeddings:
        report["embeddings"] = plan.embeddings
    for k in ("rounding", "brecq", "lapq", "bias_adjusted", "sanity_fallback", "ort_fallback", "hybrid", "multipoint",
              "sparq", "nonuniform_mix", "padding_mask"):
        if k in built.info:
            report[k] = built.info[k]
    if opts.check_artifact:
        chk = check_artifact(qmodel, plan, pipe.prepared, pipe.check_batches, threads=opts.threads,
                             mask_input=token_mask_input(pipe.prepared, opts))
        report["artifact_check"] = chk.to_dict()
        _progress(pipe.progress, f"artifact check: {'ok' if chk.ok else 'FLOAT FALLBACK'}; integer kernels "
                                 f"{chk.integer_kernels}; SQNR fused {chk.sqnr_fused_db:.1f} dB / simulated "
                                 f"{chk.sqnr_simulated_db:.1f} dB")
    remote = backend is not None and getattr(backend, "rpc", None) is not None   # TVM RPC (api.quantize rpc=)
    tvm_be = backend is not None and getattr(backend, "name", "") == "tvm"   # backends/select.py chose TVM
    if measure_latency and (spec.backend.get("name") == "ort" or tvm_be):
        feed = pipe.timing_feed()
        be = backend if backend is not None else OrtBackend(threads=opts.threads)
        tr = be.time({"fp32": pipe.reference, "int8": qmodel}, feed,
                                                   repeats=opts.timing_repeats, warmup=3)
        report["latency"] = {"measured": True, "speedup": tr.speedup("int8"),
                             "speedup_spread": tr.speedup_spread("int8"), "measured_on": measured_on(be),
                             **tr.to_dict()}
        if remote:
            report["latency"]["where"] = tr.meta.get("remote_device")
        _progress(pipe.progress, f"measured speedup {tr.speedup('int8'):.2f}x vs FP32 (batch 1, "
                                 f"{opts.threads} thread(s)"
                                 + (f", on {tr.meta.get('remote_device')} via {tr.meta.get('rpc_endpoint')}"
                                    if remote else "") + ")")
    return Result(model=qmodel, plan=plan, report=report, fp32_model=pipe.prepared)


def _nonuniform_cell(w) -> str:
    """', non-uniform W4 (codebook4, 12-16 levels/ch)': the weight_scheme="nonuniform" part of a weight cell."""
    lv = w.levels or {}
    if lv.get("full_int8"):
        return f", non-uniform W{w.levels_bits} requested: full INT8 grid (a codebook would not shrink this layer)"
    used = (f", {lv['levels_per_channel_min']}-{lv['levels_per_channel_max']} levels/ch"
            if "levels_per_channel_min" in lv else "")
    return f", non-uniform W{w.levels_bits} ({w.storage or 'not realized'}{used})"


def _multipoint_cell(w) -> str:
    """', multipoint W4: 1.38 points/ch (max 2), +38% MACs, error 0.0103 -> 0.0019 (accumulate)'."""
    mp = w.multipoint or {}
    pts = mp.get("points") or [1]
    extra = f", +{100 * mp['extra_macs'] / mp['macs']:.0f}% MACs" if mp.get("macs") else ""
    return (f", multipoint W{w.bits}: {np.mean(pts):.2f} points/ch (max {max(pts)}){extra}, output error "
            f"{mp.get('error_one_point', 0):.4g} -> {mp.get('error', 0):.4g}"
            + (f" ({mp.get('kernel', 'accumulate')} kernel)" if max(pts) > 1 else ""))


def layer_rows(plan: QuantPlan) -> List[Dict[str, Any]]:
    rows = []
    for lp in plan.layers.values():
        w = lp.weight
        rows.append({
            "node": lp.node, "op": lp.op_type, "quantized": lp.quantize, "reason": lp.reason,
            "kernel": (lp.scheme or {}).get("kernel"), "fused": lp.fused,
            "weight": None if w is None else f"{w.dtype} {w.bits}b {'sym' if w.symmetric else 'asym'} {w.granularity}"
            + (_nonuniform_cell(w) if w.scheme == "nonuniform" else "")
            + (_multipoint_cell(w) if w.scheme == "multipoint" else ""),
            "activation": None if not lp.inputs else ",".join(
                sorted({plan.activations[i].mode for i in lp.inputs if i in plan.activations})),
            "remedy": lp.remedy, "simulated": lp.simulated,
        })
    return rows
