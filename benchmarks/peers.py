"""Quantization recipes (peers and hago_py) and an isolated runner for them.

A *recipe* turns a corpus model into a quantized ONNX file. Recipes live in ``RECIPES`` (a registry:
``register(Recipe(...))`` adds a row to every benchmark). Each recipe runs in a fresh ``spawn``ed child
process so that

* its peak memory is the child's own peak RSS (VmHWM, reset just before quantizing; see below),
* a crash, hang or OOM in a peer tool becomes an error row instead of killing the benchmark.

Memory figures: the child imports the recipe's framework and loads the calibration data, then resets
its RSS high-water mark (``/proc/self/clear_refs`` = 5) and quantizes. ``peak_rss_mb`` is the peak RSS
of the child during quantization (absolute, so it includes the interpreter, the framework and the
calibration data); ``peak_delta_mb`` is that peak minus the RSS at the reset (what quantizing added).
Where the reset is unavailable, ``ru_maxrss`` of the child is used (peak over its whole life).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .corpus import BenchModel, get_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------ registry
@dataclass
class Recipe:
    """One row of the benchmark.

    ``fn(model, out_path, calib, notes) -> None`` writes the quantized model to ``out_path``;
    ``calib`` is the dict of stacked calibration arrays; ``notes`` is a list to append remarks to.
    """

    name: str
    family: str  # "ort" | "nncf" | "hago"
    description: str
    fn: Callable[[BenchModel, Path, Dict[str, np.ndarray], List[str]], None]
    models: Optional[tuple] = None  # None: all models
    imports: tuple = ()  # modules imported before the clock starts
    options: Dict[str, Any] = field(default_factory=dict)
    suite: str = "default"  # default (foundation table) | rounding (issue 5 table) | search (issue 4)

    def applies_to(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models


RECIPES: Dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


# ------------------------------------------------------------------------------------ helpers
def _short(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def feeds_from_arrays(calib: Dict[str, np.ndarray], batch: int = 1) -> List[Dict[str, np.ndarray]]:
    n = len(next(iter(calib.values())))
    return [{k: np.ascontiguousarray(v[s:s + batch]) for k, v in calib.items()} for s in range(0, n, batch)]


def _ort_reader(calib: Dict[str, np.ndarray], batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = feeds_from_arrays(calib, batch)
            self._it = iter(self._feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self._feeds)

    return Reader()


def _ort_preprocess(src: Path, dst: Path, notes: List[str]) -> Path:
    """ORT's quant_pre_process (symbolic shape inference + ORT basic optimisation + ONNX shape
    inference). Returns the model to quantize: the pre-processed one, or ``src`` when it failed."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        if not dst.exists():
            raise RuntimeError("quant_pre_process wrote no file")
        notes.append("pre-processed")
        return dst
    except Exception as e:  # noqa: BLE001 - recorded, then quantize the raw model
        notes.append(f"quant_pre_process failed ({_short(e, 200)}); quantized the raw model")
        return src


# ------------------------------------------------------------------------------------ ORT recipes
_CALIB_BATCH = 8  # max samples per calibration call for ORT (results do not depend on it)


def _calib_batch(calib: Dict[str, np.ndarray], max_batch: int = _CALIB_BATCH) -> int:
    """Largest batch <= max_batch that divides the sample count: ORT's histogram calibrators
    (Entropy, Percentile) np.asarray() the per-call outputs and fail on a ragged last batch."""
    n = len(next(iter(calib.values())))
    return max(b for b in range(1, max_batch + 1) if n % b == 0)


def _ort_static(method: str, per_channel: bool):
    def fn(model: BenchModel, out: Path, calib, notes):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        src = _ort_preprocess(model.model_path, out.with_suffix(".pre.onnx"), notes)
        # Deliberately no CalibMaxIntermediateOutputs: in ORT 1.32 MinMaxCalibrater's flush
        # (clear_collected_data) discards the collected outputs without merging their ranges, so
        # the ranges would come from the last partial chunk only (or "No data is collected").
        extra = {}
        quantize_static(
            str(src), str(out), _ort_reader(calib, _calib_batch(calib)),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method), extra_options=extra,
        )
        if src != model.model_path:
            Path(src).unlink(missing_ok=True)

    return fn


def _ort_dynamic(model: BenchModel, out: Path, calib, notes):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _ort_preprocess(model.model_path, out.with_suffix(".pre.onnx"), notes)
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    if src != model.model_path:
        Path(src).unlink(missing_ok=True)


for _name, _method, _pc, _desc in [
    ("ort_minmax_pc", "MinMax", True, "ORT quantize_static QDQ U8/S8, MinMax, per-channel weights"),
    ("ort_minmax_pt", "MinMax", False, "ORT quantize_static QDQ U8/S8, MinMax, per-tensor weights"),
    ("ort_entropy", "Entropy", True, "ORT quantize_static QDQ U8/S8, Entropy, per-channel weights"),
    ("ort_percentile", "Percentile", True, "ORT quantize_static QDQ U8/S8, Percentile 99.999, per-channel"),
]:
    register(Recipe(_name, "ort", _desc, _ort_static(_method, _pc), imports=("onnxruntime.quantization",),
                    options={"method": _method, "per_channel": _pc}))

register(Recipe("ort_dynamic", "ort", "ORT quantize_dynamic, QInt8 weights, dynamic U8 activations",
                _ort_dynamic, imports=("onnxruntime.quantization",)))


# ------------------------------------------------------------------------------------ NNCF
def _nncf_default(model: BenchModel, out: Path, calib, notes):
    import nncf
    import onnx

    feeds = feeds_from_arrays(calib, 1)
    m = onnx.load(str(model.model_path))
    q = nncf.quantize(m, nncf.Dataset(feeds), subset_size=len(feeds))
    notes.append(f"nncf {nncf.__version__}, subset_size={len(feeds)}")
    onnx.save(q, str(out))


register(Recipe("nncf_default", "nncf", "NNCF nncf.quantize defaults (benchmark-only extra)",
                _nncf_default, imports=("nncf",)))


# ------------------------------------------------------------------------------------ hago_py
def hago_recipe(name: str, description: str = "", models=None, suite: str = "default", **options) -> Recipe:
    """A hago_py row: ``hago_py.quantize(model, calibration=<arrays>, target=..., **options)``."""
    opts = {"target": "x86_avx2", **options}

    def fn(model: BenchModel, out: Path, calib, notes):
        import onnx
        import hago_py

        res = hago_py.quantize(str(model.model_path), calibration=calib, **opts)
        qm = res.model if hasattr(res, "model") else res
        if not isinstance(qm, onnx.ModelProto):
            raise TypeError(f"hago_py.quantize returned {type(res).__name__} without an onnx.ModelProto .model")
        onnx.save(qm, str(out))
        for attr in ("summary", "notes"):
            v = getattr(res, attr, None)
            if isinstance(v, str) and v:
                notes.append(v[:300])

    return Recipe(name, "hago", description or f"hago_py.quantize({opts})", fn, models=models,
                  imports=("hago_py",), options=opts, suite=suite)


register(hago_recipe("hago_default", "hago_py.quantize(target='x86_avx2') defaults"))
# More hago rows, e.g.: register(hago_recipe("hago_u8u8", some_option=...))

# Rounding / reconstruction table (issue 5): method x bits, all in one run with FP32 and nearest.
# W4 has no integer kernel on ORT CPU: those rows are simulated (int4 initializers + DequantizeLinear-21).
for _bits, _abits in ((4, 8), (4, 4), (8, 8)):
    for _method in ("nearest", "adaround", "adaquant", "flexround", "gptq", "brecq"):
        _extra = {"simulate": True} if (_bits, _abits) != (8, 8) else {}
        register(hago_recipe(f"hago_w{_bits}a{_abits}_{_method}", f"W{_bits}A{_abits}, rounding={_method}",
                             suite="rounding", weight_bits=_bits, activation_bits=_abits, rounding=_method,
                             measure_latency=False, **_extra))
register(hago_recipe("hago_w4a8_cle_adaround", "W4A8, cross-layer equalization + AdaRound", suite="rounding",
                     weight_bits=4, simulate=True, equalize=True, rounding="adaround", measure_latency=False))
register(hago_recipe("hago_w4a8_adaround_bc", "W4A8, AdaRound + bias correction", suite="rounding",
                     weight_bits=4, simulate=True, rounding="adaround", bias_correction=True, measure_latency=False))
register(hago_recipe("hago_w8a8_lapq", "W8A8, LAPQ clipping", suite="rounding", clipping="lapq",
                     measure_latency=False))
# the AdaRound / BRECQ papers' convention: first and last weighted layer at 8 bits, the rest W4
for _method in ("nearest", "gptq", "adaround", "flexround"):
    register(hago_recipe(f"hago_w4a8e8_{_method}", f"W4A8, first/last layer W8, rounding={_method}",
                         suite="rounding", weight_bits=4, edge_weight_bits=8, simulate=True, rounding=_method,
                         measure_latency=False))


# Data-free table (issue 14): calibration="synthetic" rows never see an image; the runner's calibration arrays
# are ignored (not even activation ranges come from them). Lite0's set is 64 samples (its synthesis budget is
# 10 min on 2 cores); the synthesis seconds go into the row notes. ZeroQ needs BN: the *_bn corpus models only.
DATAFREE_SAMPLES = {"lite0": 64, "lite0_bn": 64}


def hago_datafree_recipe(name: str, description: str, models=None, **options) -> Recipe:
    opts = {"target": "x86_avx2", "calibration": "synthetic", **options}

    def fn(model: BenchModel, out: Path, calib, notes):
        import onnx
        import hago_py

        del calib  # data-free: the real calibration images are never used
        kw = {k: v for k, v in opts.items() if k != "calibration"}
        kw.setdefault("synthetic_samples", DATAFREE_SAMPLES.get(model.name, 256))
        kw.setdefault("threads", os.cpu_count() or 1)
        res = hago_py.quantize(str(model.model_path), calibration="synthetic", **kw)
        onnx.save(res.model, str(out))
        syn = res.report.get("synthetic") or {}
        det = syn.get("details", {})
        notes.append(f"synthesis {syn.get('method')} {syn.get('samples')} samples {syn.get('seconds', 0):.1f} s "
                     f"({syn.get('torch_threads')} torch threads; statistics: {det.get('statistics', '-')}, "
                     f"classes covered {det.get('classes_covered', '-')})")
        return {"synthesis_s": syn.get("seconds"), "synthetic": {k: v for k, v in syn.items() if k != "details"}}

    return Recipe(name, "hago", description, fn, models=models, imports=("hago_py",), options=opts,
                  suite="datafree")


_BN_MODELS = ("resnet20_bn", "lite0_bn")
_R20 = ("resnet20", "resnet20_bn")
register(hago_recipe("hago_df_real_w8a8", "W8A8 defaults, real calibration data", suite="datafree",
                     measure_latency=False))
for _m in ("retro", "zeroq", "gaussian"):
    register(hago_datafree_recipe(f"hago_df_{_m}_w8a8", f"W8A8 defaults, data-free: synthetic_method={_m}",
                                  models=_BN_MODELS if _m == "zeroq" else None, synthetic_method=_m,
                                  measure_latency=False))
register(hago_recipe("hago_df_real_w4a8_flexround", "W4A8 FlexRound (simulated), real calibration data",
                     models=_R20, suite="datafree", weight_bits=4, simulate=True, rounding="flexround",
                     measure_latency=False))
register(hago_datafree_recipe("hago_df_retro_w4a8_flexround", "W4A8 FlexRound (simulated), data-free: retro",
                              models=_R20, synthetic_method="retro", weight_bits=4, simulate=True,
                              rounding="flexround", measure_latency=False))


# Embedding table (issue 15): the W8A8 default plus 4-bit embedding tables (quant/embedding.py), timed in the same
# run as FP32 and the plain W8A8 model (hago_default rides along: SUITE_PEERS). MiniLM only (the CNNs have no Gather).
register(hago_recipe("hago_emb_rowwise4", "W8A8 defaults + embedding_scheme=rowwise 4-bit (greedy row ranges, "
                     "centred where it pays; tables <= 1024 rows 8-bit)", models=("minilm",), suite="embeddings",
                     embedding_scheme="rowwise"))
register(hago_recipe("hago_emb_rowwise4_all", "W8A8 defaults + every embedding table rowwise 4-bit (centred where it "
                     "pays)", models=("minilm",), suite="embeddings", embedding_scheme="rowwise", embedding_small_rows=0))
register(hago_recipe("hago_emb_rowwise4_all_paper", "W8A8 defaults + every embedding table rowwise 4-bit, the "
                     "paper's form (no centring)", models=("minilm",), suite="embeddings", embedding_scheme="rowwise",
                     embedding_small_rows=0, embedding_center=False))
register(hago_recipe("hago_emb_rowwise4_all_b128", "W8A8 defaults + every embedding table 4-bit, one grid per 128 "
                     "values of a row (3 per row)", models=("minilm",), suite="embeddings", embedding_scheme="rowwise",
                     embedding_small_rows=0, embedding_block=128))
register(hago_recipe("hago_emb_rowwise4_all_b128_hot8", "W8A8 defaults + every embedding table 4-bit, 3 grids per row, "
                     "the 8 most-read rows of each input-indexed table exact", models=("minilm",), suite="embeddings",
                     embedding_scheme="rowwise", embedding_small_rows=0, embedding_block=128, embedding_hot_rows=8))
register(hago_recipe("hago_emb_codebook4", "W8A8 defaults + embedding_scheme=codebook (16 centroids per row)",
                     models=("minilm",), suite="embeddings", embedding_scheme="codebook"))
# the W8A8 default before padding rows were left out of the dynamic ranges (mask_padding=False; quant/padding.py)
register(hago_recipe("hago_nomask", "W8A8 defaults with mask_padding=False (dynamic ranges over padding rows too; "
                     "embeddings FP32)", models=("minilm",), suite="embeddings", mask_padding=False))
register(hago_recipe("hago_emb_rowwise4_all_nomask", "mask_padding=False + every embedding table rowwise 4-bit",
                     models=("minilm",), suite="embeddings", mask_padding=False, embedding_scheme="rowwise",
                     embedding_small_rows=0))
# the same on per-token dynamic activations (activation_granularity="per_token": a sentence's result does not depend
# on its batch; ORT does not fuse it, so it is slower than the per-tensor default)
register(hago_recipe("hago_pertoken", "W8A8 with per-token dynamic activations (embeddings FP32)", models=("minilm",),
                     suite="embeddings", activation_granularity="per_token"))
register(hago_recipe("hago_emb_rowwise4_all_b128_hot8_pertoken", "per-token W8A8 + every embedding table 4-bit, 3 grids "
                     "per row, 8 hot rows exact", models=("minilm",), suite="embeddings", activation_granularity="per_token",
                     embedding_scheme="rowwise", embedding_small_rows=0, embedding_block=128, embedding_hot_rows=8))


# Hybrid table (issue 14): per-layer weight granularity (quant/hybrid.py) against both uniform granularities, with
# ORT's per-channel / per-tensor MinMax peers in the same run (recipe_names adds them to this suite). The hybrid row
# measures the per-tensor gain end to end on this host while it chooses (that timing is part of its wall time).
def hago_hybrid_recipe(name: str, description: str, **options) -> Recipe:
    opts = {"target": "x86_avx2", "granularity": "hybrid", **options}

    def fn(model: BenchModel, out: Path, calib, notes):
        import time as _time

        import onnx
        import hago_py

        t0 = _time.perf_counter()
        res = hago_py.quantize(str(model.model_path), calibration=calib, **opts)
        wall = _time.perf_counter() - t0
        onnx.save(res.model, str(out))
        h = res.report.get("hybrid") or {}
        lat = h.get("latency") or {}
        notes.append(f"hybrid: {h.get('per_tensor')} per-tensor / {h.get('per_channel')} per-channel layers, chosen "
                     f"in {h.get('seconds', 0):.1f} s, quantize() {wall:.1f} s in all; latency gain {lat.get('source')}"
                     + (f" {100 * lat['gain']:.2f} % (p10-p90 {100 * lat['gain_p10']:.2f}-{100 * lat['gain_p90']:.2f} %)"
                        if lat.get("source") == "measured" else ""))
        return {"hybrid_s": h.get("seconds"), "hybrid_quantize_s": wall,
                "hybrid": {k: v for k, v in h.items() if k not in ("layers", "latency")},
                "hybrid_choices": {r["node"]: r["choice"] for r in h.get("layers", [])}}

    return Recipe(name, "hago", description, fn, imports=("hago_py",), options=opts, suite="hybrid")


register(hago_recipe("hago_hy_per_channel", "W8A8 defaults, all weights per-channel (granularity=per_channel)",
                     suite="hybrid", granularity="per_channel"))
register(hago_recipe("hago_hy_per_tensor", "W8A8 defaults, all weights per-tensor (granularity=per_tensor)",
                     suite="hybrid", granularity="per_tensor"))
register(hago_hybrid_recipe("hago_hy_hybrid", "W8A8 defaults, granularity=hybrid (per layer: sensitivity + "
                                              "measured per-tensor gain)"))


# Multipoint table (issue 15): weight_scheme="multipoint" (quant/multipoint.py) — each channel a sum of low-bit
# points, extra points as extra rows of the integer kernel — against W8A8, uniform W4A8 nearest (simulated) and the
# single error-optimal point, all in one run; the W8-point row uses multipoint_kernel="requantize" (QLinearConv)
# so the speed-up sits beside its extra MACs. W4A4 rows: the quality-vs-complexity trade-off by complexity_budget.
def hago_multipoint_recipe(name: str, description: str, **options) -> Recipe:
    opts = {"target": "x86_avx2", "measure_latency": False, "weight_scheme": "multipoint", **options}

    def fn(model: BenchModel, out: Path, calib, notes):
        import onnx
        import hago_py

        res = hago_py.quantize(str(model.model_path), calibration=calib, **opts)
        onnx.save(res.model, str(out))
        mp = res.report.get("multipoint", {})
        notes.append(f"multipoint: {mp.get('points_per_channel', 0):.3f} points/channel, "
                     f"+{100 * mp.get('extra_macs_fraction', 0):.1f} % MACs, {len(mp.get('widened_layers', []))} "
                     f"widened layers; multipoint stage {res.report['timings_s'].get('multipoint', 0):.1f} s")
        return {"multipoint": {k: v for k, v in mp.items() if k != "widened_layers"}}

    return Recipe(name, "hago", description, fn, imports=("hago_py",), options=opts, suite="multipoint")


register(hago_recipe("hago_mp_w8a8", "W8A8 defaults", suite="multipoint", measure_latency=False))
register(hago_recipe("hago_mp_w4a8_uniform", "W4A8 uniform, rounding=nearest (simulated)", suite="multipoint",
                     weight_bits=4, simulate=True, rounding="nearest", measure_latency=False))
register(hago_multipoint_recipe("hago_mp_w4a8_1pt", "W4A8 multipoint, one error-optimal point per channel",
                                weight_bits=4, max_points=1))
register(hago_multipoint_recipe("hago_mp_w4a8", "W4A8 multipoint, 1.25 points/channel (accumulate kernel)",
                                weight_bits=4, multipoint_points=1.25))
register(hago_multipoint_recipe("hago_mp_w4a8_bc", "W4A8 multipoint, 1.25 points/channel + mean-shift bias correction",
                                weight_bits=4, multipoint_points=1.25, bias_correction=True))
register(hago_multipoint_recipe("hago_mp_w4a8_rq", "W4A8 multipoint, 1.25 points/channel (requantize kernel)",
                                weight_bits=4, multipoint_points=1.25, multipoint_kernel="requantize"))
register(hago_multipoint_recipe("hago_mp_w8a8_rq", "W8A8 multipoint, 1.25 points/channel (requantize: QLinearConv)",
                                weight_bits=8, multipoint_points=1.25, multipoint_kernel="requantize"))
register(hago_recipe("hago_mp_w4a4_uniform", "W4A4 uniform nearest (simulated)", suite="multipoint",
                     weight_bits=4, activation_bits=4, simulate=True, measure_latency=False))
register(hago_recipe("hago_mp_w4a4_uniform_lapq", "W4A4 uniform nearest, LAPQ activation ranges (simulated)",
                     suite="multipoint", weight_bits=4, activation_bits=4, simulate=True, clipping="lapq",
                     measure_latency=False))


def hago_front_recipe(name: str, description: str, pick: float = 0.15, **options) -> Recipe:
    """The W4A4 quality-vs-complexity front (hago_py.multipoint_front) scored by the benchmark's own metric on the
    eval split; the row's artifact is the point of the largest budget <= ``pick``; the plot goes beside the
    results (results/multipoint/<model>_<row>.png)."""
    opts = {"target": "x86_avx2", "weight_scheme": "multipoint", **options}

    def fn(model: BenchModel, out: Path, calib, notes):
        import onnx
        import hago_py

        fp32 = model.evaluate(model.model_path)
        res = hago_py.multipoint_front(str(model.model_path), calib, evaluate=lambda m: model.evaluate(m), **opts)
        from hago_py.quant.tradeoff import front_png

        png = Path(__file__).resolve().parent / "results" / "multipoint" / f"{model.name}_{name.replace('hago_mp_', '')}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(front_png(res, title=f"{model.title}: W4A4 multipoint", baseline=fp32,
                                  metric_label=model.metric_name))
        pts = res["points"]
        i = max((k for k, p in enumerate(pts) if p["complexity_budget"] <= pick + 1e-9),
                key=lambda k: pts[k]["complexity_budget"])
        onnx.save(res["models"][i], str(out))
        notes.append("front: " + "; ".join(f"{100 * p['complexity_budget']:.0f}% -> {p['metric'] - fp32:+.2f} "
                                           f"({100 * p['extra_macs_fraction']:.1f}% MACs)" for p in pts))
        return {"front": [{**p, "drop": p["metric"] - fp32} for p in pts], "front_indices": res["front"],
                "front_plot": str(png.name), "front_pick": pts[i]["complexity_budget"]}

    return Recipe(name, "hago", description, fn, imports=("hago_py",), options=opts, suite="multipoint")


register(hago_front_recipe("hago_mp_w4a4_front", "W4A4 multipoint front (budgets 0/5/10/15/30 % extra MACs; row = "
                                                 "the 15 % point; simulated)",
                           weight_bits=4, activation_bits=4, simulate=True))
register(hago_front_recipe("hago_mp_w4a4_front_lapq", "W4A4 multipoint front, LAPQ activation ranges fitted to the "
                                                      "points (budgets 0/5/10/15/30 %; row = the 15 % point; simulated)",
                           weight_bits=4, activation_bits=4, simulate=True, clipping="lapq"))
# end of the multipoint table

# SPARQ table (issue 15): activation_scheme="sparq" (quant/sparq.py) on top of W8A8 — 4-bit windows with the
# pair rule, the paper's 5opt / 3opt / 2opt placements, and bSPARQ alone — beside W8A8 and plain A4 (simulated).
register(hago_recipe("hago_sq_w8a8", "W8A8 defaults", suite="sparq", measure_latency=False))
register(hago_recipe("hago_sq_a4_uniform", "W8A4 uniform nearest (simulated)", suite="sparq", activation_bits=4,
                     simulate=True, measure_latency=False))
for _o in (5, 3, 2):
    register(hago_recipe(f"hago_sq_{_o}opt", f"W8A8 + SPARQ 4-bit windows, {_o}opt, pairs (simulated)", suite="sparq",
                         activation_scheme="sparq", sparq_options=_o, measure_latency=False))
register(hago_recipe("hago_sq_5opt_edges", "W8A8 + SPARQ 5opt, pairs, first / last layer trimmed too (simulated)",
                     suite="sparq", activation_scheme="sparq", sparq_edges=True, measure_latency=False))
register(hago_recipe("hago_sq_5opt_nopairs", "W8A8 + SPARQ 4-bit windows, 5opt, no pairs (bSPARQ; simulated)",
                     suite="sparq", activation_scheme="sparq", sparq_pairs=False, measure_latency=False))
# end of the SPARQ table


# default-suite rows that also run in these suites (ORT's static recipes, with real calibration data)
SUITE_PEERS = {"hybrid": ("ort_minmax_pc", "ort_minmax_pt"), "datafree": ("ort_minmax_pc", "ort_minmax_pt"),
               "embeddings": ("hago_default", "ort_dynamic")}


# Non-uniform table (issue 14): weight_scheme="nonuniform" (quant/nonuniform.py) — 3-4 bit non-uniform levels
# snapped onto the per-channel int8 grid, stored as packed 4/3-bit indices + an int8 codebook (quant/codebook.py)
# and run on the int8 kernels — against W8A8 and uniform W4A8 nearest (simulated: no W4 kernel on ORT CPU).
# The runner records each artifact's file size (row["model_bytes"]).
register(hago_recipe("hago_nu_w8a8", "W8A8 defaults", suite="nonuniform", measure_latency=False))
register(hago_recipe("hago_nu_w4a8_uniform", "W4A8 uniform, rounding=nearest (simulated)", suite="nonuniform",
                     weight_bits=4, simulate=True, rounding="nearest", measure_latency=False))
for _bits in (4, 3):
    register(hago_recipe(f"hago_nu_w{_bits}a8", f"W{_bits}A8 non-uniform levels on the int8 kernel (codebook storage)",
                         suite="nonuniform", weight_scheme="nonuniform", weight_bits=_bits, measure_latency=False))
    # labelled extra row: + the mean-shift bias correction of the non-uniform layers (one E[x] pass, cheap)
    register(hago_recipe(f"hago_nu_w{_bits}a8_bc", f"W{_bits}A8 non-uniform + mean-shift bias correction",
                         suite="nonuniform", weight_scheme="nonuniform", weight_bits=_bits, bias_correction=True,
                         measure_latency=False))
# mixed 3 / 4-bit under a bound on the non-uniform layers' stored bytes (quant/nu_mix.py): 0.52 of their INT8
# bytes is what ResNet-20 needs for a file <= 0.6x of its W8A8 model (4-bit alone stores 0.542)
register(hago_recipe("hago_nu_w4a8_size052", "W4A8 non-uniform, nonuniform_size=0.52 (least sensitive layers 3-bit)",
                     suite="nonuniform", weight_scheme="nonuniform", weight_bits=4, nonuniform_size=0.52,
                     measure_latency=False))
# end of the non-uniform table


# Search table (issue 4): hago_py's hardware-aware search, scored by the benchmark's own metric.
# The search's ``evaluate`` is the model's metric on the *same* eval split the table reports (as Intel Neural
# Compressor's accuracy-aware tuning does with its eval_func): the chosen point is a selection on that split,
# which the README says. Budgets are the targets, in the metric's units.
SEARCH_BUDGETS = {"resnet20": 0.1, "lite0": 0.3, "minilm": 0.003}


def hago_search_recipe(name: str, description: str, time_budget: float = 840.0, **search_options) -> Recipe:
    def fn(model: BenchModel, out: Path, calib, notes):
        import onnx
        import hago_py

        threads = os.cpu_count() or 1

        def evaluate(m):
            return model.evaluate(m, threads=threads)

        evaluate.metric_name = model.metric_name
        res = hago_py.quantize(str(model.model_path), calibration=calib, target="x86_avx2", search=True,
                               evaluate=evaluate,
                               accuracy_budget=SEARCH_BUDGETS[model.name], time_budget=time_budget,
                               search_options=search_options or None)
        onnx.save(res.model, str(out))
        s = res.report["search"]
        ch = s["chosen"] or {}
        notes.append(f"search {s['search_s']:.0f} s, {s['counts']['trials']} measured trials "
                     f"({s['counts']['plan_trials']} end-to-end plans); chosen: search-time speedup "
                     f"{ch.get('speedup', float('nan')):.2f}x ({ch.get('latency')}), "
                     f"{sum(1 for r in s['layers'] if r.get('quantized'))}/{len(s['layers'])} layers quantized")
        keep = ("metric", "speedup", "latency", "drop", "id", "n_quantized")
        return {"search": {"search_s": s["search_s"], "counts": s["counts"], "budgets": s["budgets"],
                           "stopped_early": s["stopped_early"], "metric": s["metric"],
                           "chosen": {k: ch.get(k) for k in keep},
                           "pareto": [{k: p.get(k) for k in keep} for p in s["pareto"]],
                           "points": [{k: p.get(k) for k in keep + ("quantized",)} for p in s["points"]],
                           "boundaries": {k: (s.get("boundaries") or {}).get(k)
                                          for k in ("cost_per_element", "prior_per_element", "pairs")},
                           "log": [f"{x['t']:7.1f} s  {x['stage']}: {x['msg']}" for x in s.get("log", [])]}}

    return Recipe(name, "hago", description, fn, imports=("hago_py",),
                  options={"search": True, "time_budget": time_budget, **search_options}, suite="search")


register(hago_search_recipe("hago_search", "hago_py search=True, accuracy_budget = the issue's target, "
                            "time_budget 840 s, evaluate = the benchmark metric"))


# ------------------------------------------------------------------------------------ runner
def _rss_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(conn, recipe_name: str, model_name: str, root: str, out_path: str, calib_n: Optional[int],
           tmpdir: str, threads: Optional[int]):
    """Child process body: import, load calibration data, reset the RSS peak, quantize, report."""
    res: Dict[str, Any] = {"notes": []}
    try:
        root, out_path, tmpdir = (os.path.abspath(p) for p in (root, out_path, tmpdir))
        os.environ["TMPDIR"] = tmpdir  # peers write temp models; keep them under results/
        tempfile.tempdir = tmpdir
        os.chdir(tmpdir)  # and the files some write to the working directory (ORT's shape-inference temp, .data)
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        recipe = RECIPES[recipe_name]
        model = get_model(model_name, root)
        for mod in recipe.imports:
            __import__(mod)
        calib = model.calib_arrays(calib_n)
        res["calib_samples"] = int(len(next(iter(calib.values()))))
        res["rss_before_mb"] = (_rss_kb("VmRSS") or 0) / 1024
        reset = _reset_peak()
        t0 = time.perf_counter()
        extra = recipe.fn(model, Path(out_path), calib, res["notes"])
        if isinstance(extra, dict):
            res.update(extra)
        res["quantize_s"] = time.perf_counter() - t0
        if reset and _rss_kb("VmHWM"):
            res["peak_rss_mb"] = _rss_kb("VmHWM") / 1024
            res["peak_source"] = "VmHWM after reset"
        else:
            res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            res["peak_source"] = "ru_maxrss (whole child)"
        res["peak_delta_mb"] = max(0.0, res["peak_rss_mb"] - res["rss_before_mb"])
        if not Path(out_path).exists():
            raise RuntimeError("recipe wrote no model file")
        res["model_path"] = out_path
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row
        res["error"] = _short(e)
        res["traceback"] = traceback.format_exc()[-3000:]
    conn.send(res)
    conn.close()


def _mem_available_mb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _pid_rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_recipe(recipe_name: str, model: BenchModel, out_dir: Path, *, calib_n: Optional[int] = None,
               timeout_s: float = 3600, threads: Optional[int] = None,
               mem_reserve_mb: float = 1500) -> Dict[str, Any]:
    """Run one recipe on one model in a spawned child; always returns a row dict (maybe with 'error').

    A watchdog kills the child when it runs past ``timeout_s`` or when the machine's MemAvailable
    falls below ``mem_reserve_mb`` (the machine is shared; an OOM kill could hit someone else).
    """
    recipe = RECIPES[recipe_name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmpdir = out_dir / f"tmp_{recipe_name}"
    tmpdir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{recipe_name}.onnx"
    out_path.unlink(missing_ok=True)
    row: Dict[str, Any] = {"recipe": recipe_name, "family": recipe.family, "description": recipe.description,
                           "options": {k: str(v) for k, v in recipe.options.items()}}
    ctx = mp.get_context("spawn")
    parent, child_conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child_conn, recipe_name, model.name, str(model.root), str(out_path),
                                         calib_n, str(tmpdir), threads), daemon=True)
    t0 = time.perf_counter()
    p.start()
    child_conn.close()
    res: Optional[Dict[str, Any]] = None
    killed: Optional[str] = None
    seen_rss = 0.0
    while True:
        try:
            if parent.poll(0.5):
                res = parent.recv()
                break
        except EOFError:  # child exited without sending
            break
        if not p.is_alive():
            try:
                if parent.poll(0.5):
                    res = parent.recv()
            except EOFError:
                pass
            break
        seen_rss = max(seen_rss, _pid_rss_mb(p.pid) or 0.0)
        if time.perf_counter() - t0 > timeout_s:
            killed = f"timed out after {timeout_s:.0f} s"
        avail = _mem_available_mb()
        if avail is not None and avail < mem_reserve_mb:
            killed = (f"killed by the benchmark: machine memory nearly exhausted (MemAvailable {avail:.0f} MB "
                      f"< {mem_reserve_mb:.0f} MB reserve; child RSS {seen_rss:.0f} MB)")
        if killed:
            p.kill()
            break
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join(10)
    row["wall_s"] = time.perf_counter() - t0
    if res is None:
        row["error"] = killed or f"child process died (exit code {p.exitcode}; -9 = killed, e.g. by the OOM killer)"
        row["notes"] = []
        if seen_rss:
            row["peak_rss_mb"] = seen_rss
            row["peak_source"] = "parent polling of VmRSS (child did not finish)"
    else:
        row.update(res)
    _rmtree_quiet(tmpdir)
    return row


def _rmtree_quiet(path: Path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def recipe_names(model_name: str, selected: Optional[List[str]] = None, suite: str = "default") -> List[str]:
    # the search table carries the foundation rows too: the peers are measured in the same run
    suites = ("default", "search") if suite == "search" else (suite,)
    names = selected or [n for n, r in RECIPES.items() if r.suite in suites or n in SUITE_PEERS.get(suite, ())]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise KeyError(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    return [n for n in names if RECIPES[n].applies_to(model_name)]
