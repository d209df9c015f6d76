"""Per-layer numeric sanity: no quantized layer may silently ruin its output.

Every quantized weighted layer's output is compared with the FP32 model's on a check batch (the QDQ model run
as its exact simulation, ORT basic optimization). A layer is *catastrophic* when its output SQNR is low in
absolute terms and far below its input's: the damage happens at that layer (an int32 bias overflow, a
degenerate range, a scale that underflowed), not upstream. Such layers are kept FP32 by Pipeline.build
and the report names them with both figures; accuracy is never lost without a word.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx

from ..backends.ort import OrtBackend
from .artifact import sqnr_db
from .calibrate import with_outputs
from .padding import real_rows
from .plan import QuantPlan

CATASTROPHIC_DB = 10.0   # worst significant output channel's SQNR below this ...
DROP_DB = 20.0           # ... and this far below the layer's input SQNR ...
BITS_MARGIN_DB = 20.0    # ... and this far below a uniform grid of the layer's bits (6.02 dB per bit)
CAP_DB = 80.0            # SQNR of an exact tensor (graph inputs, identical outputs)
SIGNIFICANT = 1e-3       # channels with less energy than this share of the mean channel's are not judged


def layer_sqnr(fp_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan,
               batches: Sequence[Mapping[str, np.ndarray]], threads: int = 1,
               mask_input: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """{layer: {"input_db", "output_db"}} for every quantized weighted layer (anchor node input / output).
    ``mask_input``: a token mask input; padding rows of token-wise tensors are left out (quant/padding.py)."""
    nodes = {n.name: n for n in fp_model.graph.node}
    q_names = {o for n in qmodel.graph.node for o in n.output} | {i.name for i in qmodel.graph.input}
    pairs = {}
    for lp in plan.quantized_layers():
        n = nodes.get(lp.node)
        if lp.weight is None or n is None or not n.output or not n.input:
            continue
        x, y = n.input[0], n.output[0]
        if y in q_names and (x in q_names):
            pairs[lp.node] = (x, y)
    if not pairs:
        return {}
    names = sorted({t for p in pairs.values() for t in p})
    be = OrtBackend(threads=threads)
    fp_sess = be.compile(with_outputs(fp_model, names), optimization="basic")
    q_sess = be.compile(with_outputs(qmodel, names), optimization="basic")
    ref: Dict[str, List[np.ndarray]] = {t: [] for t in names}
    got: Dict[str, List[np.ndarray]] = {t: [] for t in names}
    for b in batches:  # few samples (Pipeline.SANITY_SAMPLES): every layer's input and output is kept
        mask = b.get(mask_input) if mask_input else None
        for t, v in zip(names, be.run(fp_sess, b, names)):
            ref[t].append(real_rows(v, mask))
        for t, v in zip(names, be.run(q_sess, b, names)):
            got[t].append(real_rows(v, mask))
    out = {}
    for layer, (x, y) in pairs.items():
        axis = 1 if plan.layers[layer].op_type == "Conv" else -1
        lp = plan.layers[layer]
        bits = min(lp.weight.bits, int((lp.scheme or {}).get("activation_bits", 8)))
        out[layer] = {"input_db": worst_channel_db(ref[x], got[x], axis),
                      "output_db": worst_channel_db(ref[y], got[y], axis), "bits": bits}
    return out


def worst_channel_db(ref: List[np.ndarray], got: List[np.ndarray], axis: int) -> float:
    """The lowest SQNR over the significant channels of a tensor (a whole-tensor SQNR hides one ruined
    channel among many good ones: 1 of 8 channels at 0 dB is still ~15 dB over the tensor)."""
    r = np.concatenate([np.asarray(a, np.float64) for a in ref], axis=0)
    g = np.concatenate([np.asarray(a, np.float64) for a in got], axis=0)
    if r.ndim < 2 or r.shape != g.shape or r.size == 0:
        return min(CAP_DB, sqnr_db(ref, got))
    r, g = np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1), np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)
    with np.errstate(over="ignore", invalid="ignore"):  # 1e30-sized data: inf energies compare as inf
        sig = np.sum(r ** 2, axis=1)
        err = np.sum((r - g) ** 2, axis=1)
    keep = sig >= SIGNIFICANT * max(float(sig.mean()), 1e-30)
    if not np.any(keep):
        return CAP_DB
    with np.errstate(divide="ignore", over="ignore"):   # sig / tiny err overflows to inf: capped below
        db = np.where(err[keep] > 0, 10 * np.log10(sig[keep] / np.maximum(err[keep], 1e-300)), CAP_DB)
    return float(min(CAP_DB, db.min()))


def catastrophic(stats: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """The layers whose own quantization ruins their output (see module docstring). Only layers of 8 bits and
    more are judged: a W2-W4 layer's large error is what the user asked for (simulate=True, a rounding method
    fitted to the real rows of token data), an 8-bit layer at 5 dB is broken."""
    return {k: v for k, v in stats.items()
            if v.get("bits", 8) >= 8 and v["output_db"] < min(CATASTROPHIC_DB, 6.02 * v["bits"] - BITS_MARGIN_DB)
            and v["input_db"] - v["output_db"] > DROP_DB}
