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
from typing import Dict, List, Optional, Union

import onnx
import onnx_ir as ir

from ..errors import ModelError, OutputError

MIN_OPSET = 13
ModelLike = Union[str, os.PathLike, onnx.ModelProto, bytes]


def describe_source(source) -> str:
    """How messages name a model source: its path in quotes, or what was given."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{source}'"
    return "the given model bytes" if isinstance(source, (bytes, bytearray)) else "the given ModelProto"


def load_model(source: ModelLike, *, check: bool = True, min_opset: int = MIN_OPSET,
               infer_shapes: bool = True, base_dir: Union[str, os.PathLike, None] = None,
               notes: Optional[List[str]] = None) -> onnx.ModelProto:
    """Return a validated, canonical, opset>=min_opset, shape-inferred ModelProto (external data loaded).

    ``base_dir``: the folder that relative external-data locations of an in-memory model (ModelProto / bytes)
    refer to; for a path it is the model's folder. ``notes`` (a list) receives one line per change the
    canonicalization made (see :mod:`hago_py.ir.canonical`).
    """
    from .canonical import canonicalize, check_strings

    where = describe_source(source)
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray)):
        try:
            model = onnx.load_from_string(bytes(source))
        except Exception as e:
            raise ModelError(f"the given bytes are not an ONNX model ({type(e).__name__}); pass a .onnx path or a "
                             "ModelProto", details=str(e)) from e
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file {where} does not exist; check the path")
        if path.is_dir():
            raise ModelError(f"model path {where} is a directory; pass the .onnx file inside it")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise ModelError(f"{where} is not a readable ONNX model ({type(e).__name__}: "
                             f"{_first_line(e) or 'parse error'}); export the model to ONNX", details=str(e)) from e
        base_dir = path.parent if base_dir is None else base_dir
    else:
        raise ModelError(f"model of type {type(source).__name__} is not supported; pass a .onnx path, a "
                         "ModelProto or its serialized bytes")
    check_strings(model, where)
    _load_external(model, base_dir, where)
    if len(model.graph.node) == 0:
        raise ModelError(f"{where} has an empty graph (no nodes): nothing to quantize; check that the file is the "
                         "exported model (re-export it)")
    model = canonicalize(model, where, notes)
    if check:
        try:
            onnx.checker.check_model(model, full_check=False)
        except Exception as e:  # ValidationError, and the C++ checker's other failures
            raise ModelError(f"{where} fails onnx.checker: {_first_line(e) or 'validation error'}. Fix the "
                             "exporter output (or re-export with a recent opset) before quantizing",
                             details=str(e)) from e
    model = upgrade_opset(model, min_opset, where)
    if infer_shapes:
        model = infer_model_shapes(model, where)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _load_external(model: onnx.ModelProto, base_dir, where: str) -> None:
    """Load the tensors stored in external files, relative to ``base_dir`` (never the working directory)."""
    ext = _external_tensors(model)
    if not ext:
        return
    files = sorted({e.value for t in ext for e in t.external_data if e.key == "location"})
    if base_dir is None:
        raise ModelError(f"{where} keeps {len(ext)} tensors in external data file(s) {', '.join(files[:3])} but has "
                         "no folder to find them in; pass the model's .onnx path, or base_dir=<the folder holding "
                         "the data files>")
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, str(base_dir))
    except Exception as e:
        raise ModelError(f"{where}: external data file(s) {', '.join(files[:3])} cannot be read from "
                         f"'{base_dir}' ({type(e).__name__}: {_first_line(e)}); keep the data files next to the "
                         "model", details=str(e)) from e


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
                         f"({_first_line(e)}). Re-export the model with opset >= {min_opset}", details=str(e)) from e


def infer_model_shapes(model: onnx.ModelProto, where: str = "the model") -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        raise ModelError(f"shape inference failed on {where}: {_first_line(e)}; fix the model's shapes or "
                         "re-export it", details=str(e)) from e


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


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; else set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_target(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"cannot write '{path}': folder '{parent}' does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"cannot write '{path}': it is a directory; give a file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write '{path}': folder '{parent}' is not writable; choose a writable location")
    return parent


def check_writable(path: Union[str, os.PathLike]) -> Path:
    """OutputError unless ``path`` can be written as a file (checked before any work starts)."""
    return _check_target(Path(path))


def write_all(files, make_dirs=()) -> List[Path]:
    """Write every ``{path: bytes}`` of ``files`` or none of them.

    Each file goes to a temp file in its own folder first (fsync'd, mode 0666 minus the umask, like a plain
    ``open``); only when all are written are they renamed into place. If a rename fails, the files already
    renamed are taken back and any file they replaced is restored, so a failed save leaves the folders as
    they were. ``make_dirs``: folders to create first (removed again on failure if they were new)."""
    files = {Path(p): d for p, d in files.items()}
    created: List[Path] = []
    temps: Dict[Path, str] = {}
    backups: Dict[Path, str] = {}
    done: List[Path] = []
    mode = 0o666 & ~_umask()
    try:
        for d in make_dirs:
            d = Path(d)
            missing = []
            p = d
            while not p.exists():
                missing.append(p)
                p = p.parent
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create folder '{d}': {e.strerror}; choose a writable location") from e
            created += list(reversed(missing))
        for path, data in files.items():
            parent = _check_target(path)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(parent))
                temps[path] = tmp
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, mode)
            except OSError as e:
                raise OutputError(f"cannot write '{path}': {e.strerror}; choose a writable location") from e
        for path, tmp in temps.items():
            try:
                if path.exists():
                    fd, bak = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bak", dir=str(path.parent))
                    os.close(fd)
                    os.replace(path, bak)
                    backups[path] = bak
                os.replace(tmp, path)
                done.append(path)
            except OSError as e:
                raise OutputError(f"cannot write '{path}': {e.strerror}; choose a writable location") from e
    except BaseException:
        for path in done:
            _silent_unlink(path)
        for path, bak in backups.items():
            try:
                os.replace(bak, path)
            except OSError:
                pass
        for tmp in temps.values():
            _silent_unlink(tmp)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    for bak in backups.values():
        _silent_unlink(bak)
    return list(files)


def _silent_unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> Path:
    """Write one file via temp file + rename in the same folder: never a half-written file."""
    return write_all({Path(path): data})[0]


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def model_bytes(model: onnx.ModelProto) -> bytes:
    """The deterministic serialization; models over 2 GB are not supported by a single-file save."""
    data = model.SerializeToString(deterministic=True)
    if len(data) > 2**31 - 1:
        raise OutputError(f"model too large ({len(data) / 2**30:.1f} GB) for a single .onnx file")
    return data


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike]) -> Path:
    """Atomically save (see write_all)."""
    return write_all({Path(path): model_bytes(model)})[0]
