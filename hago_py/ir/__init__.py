"""Graph engine on onnx-ir: load / validate / save, prepare passes, fusion analysis."""
from .io import load_model, save_model, model_digest, to_ir, to_proto, atomic_write_bytes, atomic_write_text
from .prepare import prepare, DEFAULT_PASSES
from .fusion import FusionGroup, find_fusion_groups

__all__ = ["load_model", "save_model", "model_digest", "to_ir", "to_proto", "atomic_write_bytes",
           "atomic_write_text", "prepare", "DEFAULT_PASSES", "FusionGroup", "find_fusion_groups"]
