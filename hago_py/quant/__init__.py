"""Quantization: plans, annotate, observers, calibration, weight rounding, realize, artifact check."""
from .plan import LayerPlan, QuantPlan, TensorQuant
from .options import QuantOptions

__all__ = ["LayerPlan", "QuantPlan", "TensorQuant", "QuantOptions"]
