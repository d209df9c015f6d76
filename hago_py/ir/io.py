"""Load, validate, upgrade and save ONNX models.

``load_model`` is the single entry for user models: it accepts a path or a ModelProto, resolves
external data, runs onnx.checker, upgrades the opset to at least ``MIN_OPSET`` and infers shapes.
Failures become ``ModelError`` naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Union

import onnx
import onnx_ir as ir

from ..errors import ModelError, OutputError

MIN_OPSET = 13
ModelLike = Union[str, os.PathLike, onnx.ModelProto, bytes]


def _describe(source) -> str:
    return f"'{source}'" if isinstance(source, (str, os.PathLike)) else "the given ModelProto"


def load_model(source: ModelLike, *, check: bool = True, min_opset: int = MIN_OPSET,
               infer_shapes: bool = True) -> onnx.ModelProto:
    """Return a validated, opset>=min_opset, shape-inferred ModelProto (external data loaded)."""
    where = _describe(source)
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray)):
        try:
            model = onnx.load_from_string(bytes(source))
        except Exception as e:
            raise ModelError(f"the given bytes are not an ONNX model ({e}); pass a .onnx path or a ModelProto") from e
    else:
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file {where} does not exist; check the path")
        if path.is_dir():
            raise ModelError(f"model path {where} is a directory; pass the .onnx file inside it")
        try:
            model = onnx.load(str(path), load_external_data=True)
        except Exception as e:
            raise ModelError(f"{where} is not a readable ONNX model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'parse error'}); export the model to ONNX "
                             "or check that external data files sit next to it") from e
    if len(model.graph.node) == 0:
        raise ModelError(f"{where} has an empty graph (no nodes); is it really an ONNX model?")
    if check:
        try:
            onnx.checker.check_model(model, full_check=False)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "validation error"
            raise ModelError(f"{where} fails onnx.checker: {first}. Fix the exporter output "
                             "(or re-export with a recent opset) before quantizing") from e
    model = upgrade_opset(model, min_opset, where)
    if infer_shapes:
        model = infer_model_shapes(model, where)
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def upgrade_opset(model: onnx.ModelProto, min_opset: int, where: str = "the model") -> onnx.ModelProto:
    ver = default_opset(model)
    if ver >= min_opset:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, min_opset)
    except Exception as e:
        raise ModelError(f"{where} uses opset {ver}; upgrading it to opset {min_opset} failed "
                         f"({str(e).splitlines()[0]}). Re-export the model with opset >= {min_opset}") from e


def infer_model_shapes(model: onnx.ModelProto, where: str = "the model") -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        raise ModelError(f"shape inference failed on {where}: {str(e).splitlines()[0]}") from e


def without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` without intermediate shape annotations: how hago_py deploys and times models (with
    them ORT 1.32 fuses residual Add + LayerNorm into the slower SkipLayerNormalization; see realize)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the deterministic serialization (identifies the input model in plans/reports)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write via temp file + rename in the same folder: never a half-written file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"cannot write '{path}': folder '{parent}' does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"cannot write '{path}': it is a directory; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(parent))
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror}; choose a writable location") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write '{path}': {e.strerror}; choose a writable location") from e
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike]) -> Path:
    """Atomically save; models over 2 GB are not supported by a single-file save (ModelError)."""
    data = model.SerializeToString(deterministic=True)
    if len(data) > 2**31 - 1:
        raise ModelError(f"model too large ({len(data) / 2**30:.1f} GB) for a single .onnx file")
    return atomic_write_bytes(path, data)
