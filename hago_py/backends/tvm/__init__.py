"""TVM Relax backend: import a QDQ ONNX model, rewrite its fake-quant layers into integer Relax, compile, run.

``import_qdq(model) -> IRModule``; ``integerize(mod, spec=None) -> (IRModule, info)``; ``TvmBackend``.
TVM is imported only when these are used (``import hago_py`` never imports tvm).
"""
from .backend import TvmBackend
from .importer import import_qdq
from .integerize import integerize

__all__ = ["import_qdq", "integerize", "TvmBackend"]
