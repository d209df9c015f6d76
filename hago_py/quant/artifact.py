"""Artifact check: does the deployed (fused) model really run the planned layers as integer kernels,
and does it compute what the simulation computes?

1. ORT loads the QDQ model with full optimization and dumps the optimized graph; every layer the plan
   calls int8 must appear as an integer kernel (QLinearConv, QGemm, DynamicQuantizeMatMul, ...) and
   no float Conv/MatMul/Gemm may remain for it. A float fallback is reported, never silent.
2. The fused model and the unfused simulation (ORT basic optimization: Q/DQ as float ops) run on the
   same calibration batches; their outputs are compared with FP32 (SQNR in dB). A fused model much
   worse than its simulation points at a kernel effect such as int16 saturation (vpmaddubsw on AVX2).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Sequence

import numpy as np
import onnx

from ..backends.ort import OrtBackend
from .padding import real_rows

INTEGER_KERNELS = {
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "NhwcQLinearConv",
    "QLinearReduceMean", "QAttention", "DynamicQuantizeLSTM",
}
FLOAT_COMPUTE = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"}
WEIGHTLESS_FLOAT = {"Add": "QLinearAdd", "Mul": "QLinearMul", "GlobalAveragePool": "QLinearGlobalAveragePool",
                    "AveragePool": "QLinearAveragePool", "Concat": "QLinearConcat", "Sigmoid": "QLinearSigmoid"}


@dataclass
class ArtifactCheck:
    ok: bool
    integer_kernels: Dict[str, int]
    float_compute: Dict[str, int]
    expected_int: int
    fallbacks: List[str] = field(default_factory=list)
    sqnr_fused_db: float | None = None
    sqnr_simulated_db: float | None = None
    max_abs_fused_vs_sim: float | None = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self):
        return asdict(self)


def sqnr_db(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    num = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in ref)
    den = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(t, np.float64)) ** 2)) for r, t in zip(ref, test))
    if den == 0:
        return float("inf")
    return 10.0 * np.log10(max(num, 1e-30) / den)


def optimized_graph(model: onnx.ModelProto, threads: int = 1) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        OrtBackend(threads=threads).compile(model, optimization="all", optimized_model_path=path)
        return onnx.load(path, load_external_data=False)


def check_artifact(qmodel: onnx.ModelProto, plan, fp_model: onnx.ModelProto | None = None,
                   batches: Sequence[Mapping[str, np.ndarray]] = (), threads: int = 1,
                   mask_input: str | None = None) -> ArtifactCheck:
    """Which kernels ORT's optimized graph of ``qmodel`` runs, and (with ``fp_model`` and ``batches``) the output
    SQNR of the fused and the simulated graph against FP32; with ``mask_input`` (a token mask input) the padding
    rows of token-wise outputs are left out of the SQNR (quant/padding.py)."""
    opt = optimized_graph(qmodel, threads)
    ops = Counter(n.op_type for n in opt.graph.node)
    ints = {k: v for k, v in ops.items() if k in INTEGER_KERNELS}
    floats = {k: v for k, v in ops.items() if k in FLOAT_COMPUTE}
    q_layers = [lp for lp in plan.quantized_layers() if not lp.simulated]
    expected = len(q_layers)
    fallbacks = []
    # Node-level check: names of surviving float compute nodes that the plan quantized.
    q_names = {lp.node for lp in q_layers}
    for n in opt.graph.node:
        if n.op_type in FLOAT_COMPUTE and n.name in q_names:
            fallbacks.append(f"{n.name} ({n.op_type}) runs in FP32 although the plan quantizes it")
    fp_weighted = sum(1 for lp in plan.fp_layers() if lp.op_type in ("Conv", "MatMul", "Gemm"))
    sim_weighted = [lp for lp in plan.quantized_layers() if lp.simulated and lp.op_type in ("Conv", "MatMul", "Gemm")]
    if sim_weighted:  # simulated layers run as DQ -> float op by design: expected, and said so
        fp_weighted += len(sim_weighted)
    float_total = sum(floats.values())
    n_int = sum(ints.values())
    if float_total > fp_weighted and not fallbacks:
        fallbacks.append(f"{float_total} float Conv/MatMul/Gemm nodes remain but only {fp_weighted} are planned "
                         "FP32")
    for op, qop in WEIGHTLESS_FLOAT.items():
        planned = sum(1 for lp in q_layers if lp.op_type == op)
        if planned and ops.get(qop, 0) < planned:
            fallbacks.append(f"{planned} {op} planned int8 but only {ops.get(qop, 0)} {qop} kernels in the "
                             "optimized graph")
    res = ArtifactCheck(ok=not fallbacks, integer_kernels=ints, float_compute=floats, expected_int=expected,
                        fallbacks=fallbacks)
    if sim_weighted:
        res.notes.append(f"{len(sim_weighted)} layers are simulated (no integer kernel for their scheme on this "
                         "backend): they run as DequantizeLinear -> float op; accuracy is the deployed graph's")
    if fp_model is not None and batches:
        be = OrtBackend(threads=threads)
        out_names = [o.name for o in fp_model.graph.output]
        fp = be.predict(fp_model, batches, optimization="all")
        fused = be.predict(qmodel, batches, optimization="all", output_names=out_names)
        sim = be.predict(qmodel, batches, optimization="basic", output_names=out_names)
        masks = [b.get(mask_input) if mask_input else None for b in batches]
        flat = lambda outs: [real_rows(o, m) for b, m in zip(outs, masks) for o in b]  # noqa: E731
        res.sqnr_fused_db = sqnr_db(flat(fp), flat(fused))
        res.sqnr_simulated_db = sqnr_db(flat(fp), flat(sim))
        res.max_abs_fused_vs_sim = float(max(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                                             for a, b in zip(flat(fused), flat(sim))))
        if res.sqnr_fused_db < res.sqnr_simulated_db - 1.0:
            res.notes.append(f"fused integer kernels are {res.sqnr_simulated_db - res.sqnr_fused_db:.1f} dB worse "
                             "than the simulation: a kernel effect (e.g. int16 saturation) is present")
    return res
