"""The prepare stage: FP32 -> FP32 rewrites that make the graph quantization-ready.

Every pass preserves the FP32 function (checked in tests on generated models).
"""
from __future__ import annotations

from typing import List, Sequence

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (IdentityEliminationPass, RemoveUnusedNodesPass, TopologicalSortPass)

from .io import infer_model_shapes, to_ir, to_proto
from .passes import ConstantFoldingPass, FoldBatchNormPass, FoldGemmScalarsPass, FoldPadIntoConvPass

DEFAULT_PASSES = ("constant_folding", "fold_batchnorm", "fold_gemm_scalars", "fold_pad", "identity_elimination")

_REGISTRY = {
    "constant_folding": ConstantFoldingPass,
    "fold_batchnorm": FoldBatchNormPass,
    "fold_gemm_scalars": FoldGemmScalarsPass,
    "fold_pad": FoldPadIntoConvPass,
    "identity_elimination": IdentityEliminationPass,
}


def prepare(model: onnx.ModelProto, passes: Sequence[str] = DEFAULT_PASSES) -> tuple[onnx.ModelProto, List[str]]:
    """Run the prepare passes; returns the new model and the names of the passes that changed it."""
    m = to_ir(model)
    changed = []
    for name in passes:
        if _REGISTRY[name]()(m).modified:
            changed.append(name)
    RemoveUnusedNodesPass()(m)
    TopologicalSortPass()(m)
    out = to_proto(m)
    return infer_model_shapes(out), changed
