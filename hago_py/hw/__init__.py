"""Hardware specs (what a target runs natively) and the analytic roofline cost model."""
from .spec import (
    BUILTIN_DIR,
    DTYPE_BITS,
    SCHEMA_PATH,
    CostModel,
    HardwareSpec,
    OpRule,
    SaturationHazard,
    Scheme,
    builtin_names,
    list_specs,
    load_spec,
)
from .cost import predict_latency, predict_layer_latency, predict_model_latency, predict_speedup

__all__ = [
    "BUILTIN_DIR",
    "DTYPE_BITS",
    "SCHEMA_PATH",
    "CostModel",
    "HardwareSpec",
    "OpRule",
    "SaturationHazard",
    "Scheme",
    "builtin_names",
    "list_specs",
    "load_spec",
    "predict_latency",
    "predict_layer_latency",
    "predict_model_latency",
    "predict_speedup",
]
