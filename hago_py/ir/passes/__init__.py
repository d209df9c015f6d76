"""Graph passes (one per file), all onnx-ir InPlacePass subclasses."""
from .constant_folding import ConstantFoldingPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_gemm_scalars import FoldGemmScalarsPass
from .fold_pad import FoldPadIntoConvPass

__all__ = ["ConstantFoldingPass", "FoldBatchNormPass", "FoldGemmScalarsPass", "FoldPadIntoConvPass"]
