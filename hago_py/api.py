"""Public entry points: quantize, evaluate, benchmark.

quantize() runs the pipeline of DESIGN.md in one direction:
load -> prepare -> annotate(spec) -> calibrate -> round weights -> realize -> artifact check (+ timing)
and returns a Result holding the QDQ model, the QuantPlan and the report data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import onnx

from .backends.ort import OrtBackend
from .data import load_calibration, model_input_specs
from .errors import OptionError
from .hw import load_spec
from .ir import load_model, model_digest, prepare, save_model
from .quant.annotate import annotate
from .quant.artifact import check_artifact
from .quant.calibrate import apply_observers, collect
from .quant.options import QuantOptions
from .quant.plan import QuantPlan
from .quant.realize import realize
from .quant.remedy import choose_remedy


@dataclass
class Result:
    model: onnx.ModelProto
    plan: QuantPlan
    report: Dict[str, Any]
    fp32_model: onnx.ModelProto
    pareto: List[Dict[str, Any]] = field(default_factory=list)
    chosen: Optional[Dict[str, Any]] = None

    def save(self, path, report_dir=None) -> Path:
        """Write the quantized model (atomic) and, next to it, the plan (<name>.plan.json)."""
        path = Path(path)
        save_model(self.model, path)
        self.plan.save(path.with_suffix(".plan.json"))
        if report_dir is not None:
            from .report import write_report

            write_report(self, report_dir)
        return path


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[hago] {msg}", flush=True)


def quantize(model, calibration, target: str | Mapping | Path = "x86_avx2", *, progress: bool = False,
             measure_latency: bool = True, **options) -> Result:
    """Quantize ``model`` for ``target``.

    model: path / ModelProto. calibration: .npz path, folder of .npy, dict of arrays or iterable of feed
    dicts (leading batch axis). target: built-in spec name, path to a spec JSON, or a dict.
    options: see QuantOptions (weight_bits, activation_bits, per_channel, calibration, ...).
    """
    t0 = time.perf_counter()
    opts = QuantOptions.from_kwargs(**options)
    spec = load_spec(target)
    proto = load_model(model)
    digest = model_digest(proto)
    inputs = model_input_specs(proto)
    calib = load_calibration(calibration, inputs, batch_size=opts.calib_batch_size,
                             max_samples=opts.max_calib_samples)
    prepared, changed = prepare(proto)
    _progress(progress, f"prepared graph ({', '.join(changed) or 'no changes'})")
    plan = annotate(prepared, spec, opts, target_name=spec.name, model_digest=digest)
    if not plan.quantized_layers():
        raise OptionError(f"nothing to quantize: target {spec.name} allows none of this model's layers at "
                          f"W{opts.weight_bits}A{opts.activation_bits} (see the reasons with hago_py.annotate "
                          "or pass simulate=True)")
    observers = collect(prepared, plan, calib, percentile=opts.percentile, threads=opts.threads,
                        progress=progress)
    apply_observers(plan, observers)
    t_cal = time.perf_counter()
    _progress(progress, f"calibrated {len(observers)} tensors on {calib.num_samples} samples")
    check_batches = _first_batches(calib, 64)
    remedy_info = choose_remedy(prepared, plan, spec, opts, check_batches)
    qmodel = realize(prepared, plan)
    plan.history.append("realize")
    report: Dict[str, Any] = {
        "target": spec.name,
        "backend": spec.backend,
        "options": opts.to_dict(),
        "prepare_passes": changed,
        "calibration_samples": calib.num_samples,
        "remedy": remedy_info,
        "layers": layer_rows(plan),
        "timings_s": {"calibrate": t_cal - t0},
    }
    if opts.check_artifact:
        chk = check_artifact(qmodel, plan, prepared, check_batches, threads=opts.threads)
        report["artifact_check"] = chk.to_dict()
        _progress(progress, f"artifact check: {'ok' if chk.ok else 'FLOAT FALLBACK'}; integer kernels "
                            f"{chk.integer_kernels}; SQNR fused {chk.sqnr_fused_db:.1f} dB / simulated "
                            f"{chk.sqnr_simulated_db:.1f} dB")
    if measure_latency and spec.backend.get("name") == "ort":
        feed = {k: v[:1] for k, v in check_batches[0].items()}
        tr = OrtBackend(threads=opts.threads).time({"fp32": proto, "int8": qmodel}, feed,
                                                   repeats=opts.timing_repeats, warmup=3)
        report["latency"] = {"measured": True, "speedup": tr.speedup("int8"),
                             "speedup_spread": tr.speedup_spread("int8"), **tr.to_dict()}
        _progress(progress, f"measured speedup {tr.speedup('int8'):.2f}x vs FP32 (batch 1, "
                            f"{opts.threads} thread(s))")
    report["timings_s"]["total"] = time.perf_counter() - t0
    return Result(model=qmodel, plan=plan, report=report, fp32_model=prepared)


def _first_batches(calib, n_samples: int) -> List[Dict[str, np.ndarray]]:
    out, seen = [], 0
    for b in calib:
        out.append(b)
        seen += len(next(iter(b.values())))
        if seen >= n_samples:
            break
    return out


def layer_rows(plan: QuantPlan) -> List[Dict[str, Any]]:
    rows = []
    for lp in plan.layers.values():
        w = lp.weight
        rows.append({
            "node": lp.node, "op": lp.op_type, "quantized": lp.quantize, "reason": lp.reason,
            "kernel": (lp.scheme or {}).get("kernel"), "fused": lp.fused,
            "weight": None if w is None else f"{w.dtype} {w.bits}b {'sym' if w.symmetric else 'asym'} {w.granularity}",
            "activation": None if not lp.inputs else ",".join(
                sorted({plan.activations[i].mode for i in lp.inputs if i in plan.activations})),
            "remedy": lp.remedy, "simulated": lp.simulated,
        })
    return rows


def evaluate(model, data: Iterable[Mapping[str, np.ndarray]], metric: Callable[[List[List[np.ndarray]]], float],
             *, threads: int = 1, optimization: str = "all") -> float:
    """Run ``model`` on ``data`` (iterable of feed dicts) with ORT and return ``metric(outputs)``."""
    outs = OrtBackend(threads=threads).predict(model if not isinstance(model, str) else load_model(model),
                                               data, optimization=optimization)
    return float(metric(outs))


def benchmark(models: Mapping[str, Any], feed: Mapping[str, np.ndarray], *, threads: int = 1,
              repeats: int = 50, warmup: int = 5) -> Dict[str, Any]:
    """Time models interleaved in one process; the first is the baseline. Returns medians, spreads, ratios."""
    return OrtBackend(threads=threads).time(dict(models), feed, repeats=repeats, warmup=warmup).to_dict()
