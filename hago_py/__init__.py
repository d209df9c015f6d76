"""hago_py: hardware-aware automated post-training quantization for ONNX models."""
from .errors import (BackendError, DataError, HagoError, InternalError, ModelError, OptionError, OutputError,
                     SearchError, SpecError)

__version__ = "0.1.0"


def __getattr__(name):  # lazy: keep `import hago_py` cheap
    if name in ("quantize", "evaluate", "benchmark", "Result", "multipoint_front"):
        from . import api

        return getattr(api, name)
    if name in ("build", "tune"):
        import importlib

        return getattr(importlib.import_module(".build", __name__), name)
    if name == "synthesize":
        from .data.synthetic import synthesize

        return synthesize
    if name in ("load_spec", "list_specs"):
        from . import hw

        return getattr(hw, name)
    if name in ("QuantPlan", "QuantOptions"):
        from . import quant

        return getattr(quant, name)
    raise AttributeError(name)


__all__ = ["build", "tune", "quantize", "multipoint_front", "synthesize", "evaluate", "benchmark", "Result", "load_spec", "list_specs", "QuantPlan",
           "QuantOptions", "HagoError", "ModelError", "SpecError", "DataError", "BackendError", "OptionError",
           "OutputError", "SearchError", "InternalError", "__version__"]
