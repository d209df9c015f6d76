"""Calibration / validation data readers.

Everything a user can hand over as data ends up as a :class:`Dataset`: a re-iterable source of
feed dicts ``{input_name: array with a leading batch axis}`` that has been checked against the
model's inputs (:func:`model_input_specs`). Accepted sources (see :func:`load_calibration`):

* a path to an ``.npz`` file (keys = input names, leading sample axis);
* a folder of ``.npy`` files, one per input, the file name stem being the input name
  (``input.npy``), or a single such ``.npy`` file;
* an :class:`ImageFolder` (images + declared :class:`Preprocess`), loaded batch by batch;
* a dict ``{input_name: array}`` (leading sample axis), or a single array for a one-input model;
* a list / iterable of feed dicts, each one batch (checked lazily, batch by batch);
* an existing :class:`Dataset`.

Every problem is reported as :class:`hago_py.errors.DataError` naming the file / input / field at
fault and what to do about it.
"""
from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from hago_py.errors import DataError

__all__ = [
    "InputSpec",
    "model_input_specs",
    "Dataset",
    "load_calibration",
    "iterate_batches",
    "Preprocess",
    "ImageFolder",
    "IMAGE_EXTENSIONS",
    "static_batch_size",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# Silent casts: {expected dtype: set of accepted source dtypes} (native byte order; data in the other byte
# order is accepted for every dtype, the swap is lossless). float64 -> float32 is the one narrowing cast
# (calibration tolerates it); values beyond the float32 range are rejected, never turned into Inf.
_ALLOWED_CASTS = {
    np.dtype(np.float32): {np.dtype(np.float64), np.dtype(np.float16)},
    np.dtype(np.float64): {np.dtype(np.float32), np.dtype(np.float16)},
    np.dtype(np.int64): {np.dtype(t) for t in (np.int32, np.int16, np.int8, np.uint32, np.uint16, np.uint8)},
    np.dtype(np.int32): {np.dtype(t) for t in (np.int16, np.int8, np.uint16, np.uint8)},
}

_FINITE_CHUNK = 256  # samples checked for NaN/Inf at a time (bounds temporary memory)


# --------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and shape (an int per static dim; None or a str for a
    dynamic dim). ``shape`` is None when the model declares no shape (rank unknown)."""

    name: str
    dtype: np.dtype
    shape: Optional[tuple]

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    def describe(self) -> str:
        if self.shape is None:
            dims = "?"
        else:
            dims = ",".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name if self.dtype is not None else '?'} [{dims}]"


def model_input_specs(model) -> List[InputSpec]:
    """The graph inputs of ``model`` (an ``onnx.ModelProto``) that are not initializers."""
    try:
        graph = model.graph
    except AttributeError:
        raise DataError(f"model_input_specs expects an onnx.ModelProto, got {type(model).__name__}; "
                        "load the model with onnx.load first") from None
    from onnx import helper

    init_names = {t.name for t in graph.initializer}
    init_names |= {t.values.name for t in getattr(graph, "sparse_initializer", [])}
    specs: List[InputSpec] = []
    for vi in graph.input:
        if vi.name in init_names:
            continue
        dtype = None
        shape: Optional[tuple] = None
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            if tt.elem_type:
                try:
                    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
                except Exception:  # pragma: no cover - exotic element types (float8 ...)
                    dtype = None
            if tt.HasField("shape"):
                dims = []
                for d in tt.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(int(d.dim_value))
                    elif d.HasField("dim_param") and d.dim_param:
                        dims.append(str(d.dim_param))
                    else:
                        dims.append(None)
                shape = tuple(dims)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _dtype_name(dt) -> str:
    """numpy's dtype name, with the byte order when it is not the machine's (``float32 (big-endian)``)."""
    if dt is None:
        return "?"
    dt = np.dtype(dt)
    if dt.byteorder in ("<", ">"):  # numpy writes the native order as "=" and order-less types as "|"
        return f"{dt.name} ({'big' if dt.byteorder == '>' else 'little'}-endian)"
    return dt.name


def _native(dt: np.dtype) -> np.dtype:
    return dt.newbyteorder("=") if dt.byteorder in ("<", ">") else dt


def _target_dtype(arr: np.ndarray, spec: InputSpec, where: str) -> np.dtype:
    """The dtype ``arr`` will be fed as (its own, or a silent cast); DataError otherwise.

    Data in the non-native byte order (e.g. ``>f4`` read from a big-endian file) is converted to the native
    order, which is lossless; the allowed casts are those of ``_ALLOWED_CASTS``.
    """
    native = _native(arr.dtype)
    if spec.dtype is None:
        return native
    want = _native(np.dtype(spec.dtype))
    if native == want or native in _ALLOWED_CASTS.get(want, ()):
        return want
    hint = ""
    if native == np.uint8 and np.issubdtype(want, np.floating):
        hint = " (raw image pixels? apply the model's preprocessing, e.g. with Preprocess / ImageFolder)"
    elif np.issubdtype(native, np.floating) and np.issubdtype(want, np.integer):
        hint = " (an integer input such as token ids or indices: round / cast the data, e.g. .astype(np.int64))"
    raise DataError(f"{where}: input '{spec.name}' has dtype {_dtype_name(arr.dtype)} but the model expects "
                    f"{_dtype_name(want)}{hint}; convert the data to {_dtype_name(want)}")


def _check_shape(arr: np.ndarray, spec: InputSpec, where: str, check_batch_axis: bool) -> None:
    empty = [a for a in range(1, arr.ndim) if arr.shape[a] == 0]
    if empty and (spec.shape is None or arr.ndim == len(spec.shape)):
        raise DataError(f"{where}: input '{spec.name}' has an empty axis {empty[0]} (shape {tuple(arr.shape)}, "
                        f"model {spec.describe()}); every sample needs at least one element along each axis")
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape):
        raise DataError(f"{where}: input '{spec.name}' has {arr.ndim} dims {tuple(arr.shape)} but the model "
                        f"expects {len(spec.shape)} ({spec.describe()}); data arrays need a leading batch "
                        f"(sample) axis followed by the model's per-sample dims")
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
        if axis == 0 and not check_batch_axis:
            continue
        if isinstance(want, int) and want != got:
            raise DataError(f"{where}: input '{spec.name}' axis {axis} has size {got} but the model expects "
                            f"{want} (shape {tuple(arr.shape)}, model {spec.describe()}); fix the data "
                            f"(resize / preprocess) to match the model input")


def _check_finite(arr: np.ndarray, name: str, where: str, offset: int = 0,
                  target: Optional[np.dtype] = None) -> None:
    """NaN / Inf (and, when ``target`` is a narrower float, values that would overflow to Inf) -> DataError."""
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
        return
    limit = None
    if target is not None and np.issubdtype(target, np.floating) and \
            np.finfo(target).max < np.finfo(arr.dtype).max:
        limit = float(np.finfo(target).max)
    n = arr.shape[0] if arr.ndim else 1
    flat = arr.reshape(n, -1) if arr.ndim else arr.reshape(1, 1)
    for s in range(0, n, _FINITE_CHUNK):
        chunk = flat[s:s + _FINITE_CHUNK]
        ok = np.isfinite(chunk).all(axis=1)
        if not ok.all():
            i = int(np.argmin(ok))
            bad = chunk[i]
            kind = "NaN" if np.isnan(bad).any() else "Inf"
            raise DataError(f"{where}: input '{name}' contains {kind} at sample {offset + s + i}; "
                            "remove or repair that sample")
        if limit is not None and chunk.size:
            big = (np.abs(chunk) > limit).any(axis=1)
            if big.any():
                i = int(np.argmax(big))
                raise DataError(f"{where}: input '{name}' sample {offset + s + i} holds a value of magnitude "
                                f"{float(np.abs(chunk[i]).max()):.3g}, beyond the {_dtype_name(target)} range "
                                f"({limit:.3g}) the model computes in; rescale or repair the data")


def _check_names(found: Sequence[str], specs: Sequence[InputSpec], where: str) -> None:
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing:
        raise DataError(f"{where}: missing model input(s) {missing}; expected {expected}, found {list(found)}; "
                        "name each array after the model input it feeds")
    if extra:
        raise DataError(f"{where}: unexpected key(s) {extra} that are not model inputs (model inputs: "
                        f"{expected}); remove them or rename them to model input names")


def _as_array(value: Any, name: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise DataError(f"{where}: input '{name}' cannot be converted to an array ({e})") from None
    if arr.dtype == object:
        raise DataError(f"{where}: input '{name}' is an object array (ragged or mixed data); "
                        "give a numeric array with one shape for all samples")
    return arr


def _leading(arr: np.ndarray, name: str, where: str) -> int:
    if arr.ndim == 0:
        raise DataError(f"{where}: input '{name}' is a scalar; data arrays need a leading batch (sample) axis")
    return int(arr.shape[0])


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
    """Slice ``{name: array[N, ...]}`` into consecutive feed dicts of ``batch_size`` samples
    (the last one may be shorter). Batches are views of the arrays."""
    _check_batch_size(batch_size)
    counts = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"inconsistent sample counts between inputs: {counts}; every input needs the same "
                        "number of samples")
    n = next(iter(counts.values()), 0)
    for s in range(0, n, batch_size):
        yield {k: v[s:s + batch_size] for k, v in arrays.items()}


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r} (in quantize() this is the "
                        "option calib_batch_size)")


def _check_max_samples(max_samples) -> Optional[int]:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 0:
        raise DataError(f"max_samples must be a non-negative integer or None, got {max_samples!r} (in quantize() "
                        "this is the option max_calib_samples, on the CLI --max-calib-samples)")
    return int(max_samples)


class Dataset:
    """A re-iterable, checked source of feed dicts ``{input_name: array with leading batch axis}``.

    ``len(ds)`` is the number of batches, ``ds.num_samples`` the number of samples, ``ds.input_names``
    the model inputs every batch carries. Iterating twice gives the same batches in the same order.
    """

    name: str
    input_names: List[str]
    batch_size: Optional[int]
    #: Remarks for the user about how the data was used (a fixed model batch size, samples left out);
    #: for an iterable source complete after the first full pass.
    notes: List[str]

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_samples(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def arrays(self) -> Dict[str, np.ndarray]:
        """All samples, concatenated per input (materialises the data set in memory)."""
        parts: Dict[str, List[np.ndarray]] = {n: [] for n in self.input_names}
        for batch in self:
            for n in self.input_names:
                parts[n].append(batch[n])
        return {n: np.concatenate(p, axis=0) for n, p in parts.items()}

    def first_batch(self) -> Dict[str, np.ndarray]:
        for batch in self:
            return batch
        raise DataError(f"{self.name} set is empty; give at least one sample")  # pragma: no cover

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, inputs={self.input_names}, "
                f"samples={self.num_samples}, batches={len(self)})")


class ArrayDataset(Dataset):
    """Data held as whole arrays ``{name: [N, ...]}``, checked eagerly; batches are slices (views;
    dtype casts float64->float32 / int32->int64 happen per batch)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], batch_size: int = 8,
                 max_samples: Optional[int] = None, name: str = "calibration", where: Optional[str] = None):
        _check_batch_size(batch_size)
        max_samples = _check_max_samples(max_samples)
        self.name = name
        self.notes: List[str] = []
        where = where or f"{name} data"
        self._where = where
        if not isinstance(arrays, Mapping):
            raise DataError(f"{where}: expected a dict {{input_name: array}}, got {type(arrays).__name__}")
        _check_names(list(arrays.keys()), specs, where)
        self._specs = list(specs)
        self.input_names = [s.name for s in specs]
        raw = {s.name: _as_array(arrays[s.name], s.name, where) for s in specs}
        for s in specs:  # rank / static dims first: a missing batch axis explains odd sample counts
            _leading(raw[s.name], s.name, where)
            _check_shape(raw[s.name], s, where, check_batch_axis=False)
        counts = {k: _leading(v, k, where) for k, v in raw.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"{where}: inconsistent sample counts between inputs: {counts}; every input needs "
                            "the same number of samples (leading axis)")
        given = n = next(iter(counts.values()), 0)
        if max_samples is not None:
            n = min(n, max_samples)
        if n == 0:
            raise DataError(f"{where}: {name} set is empty (0 samples); give at least one sample")
        self.batch_size = _effective_batch_size(batch_size, specs, where, self.notes)
        self.dropped = 0
        fixed = _fixed_batch(specs)
        if fixed is not None and fixed > 1:
            n, self.dropped = _whole_batches(n, fixed, where, given=given, max_samples=max_samples)
            if self.dropped:
                self.notes.append(_dropped_note(where, fixed, n + self.dropped, self.dropped))
        self._dtypes: Dict[str, np.dtype] = {}
        self._arrays: Dict[str, np.ndarray] = {}
        for s in specs:
            arr = raw[s.name][:n]
            self._dtypes[s.name] = _target_dtype(arr, s, where)
            _check_finite(arr, s.name, where, target=self._dtypes[s.name])
            self._arrays[s.name] = arr
        self._n = n

    @property
    def num_samples(self) -> int:
        return self._n

    def __len__(self) -> int:
        return math.ceil(self._n / self.batch_size)

    def _cast(self, name: str, a: np.ndarray) -> np.ndarray:
        dt = self._dtypes[name]
        return a if a.dtype == dt else a.astype(dt)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for batch in iterate_batches(self._arrays, self.batch_size):
            yield {k: self._cast(k, v) for k, v in batch.items()}

    def arrays(self) -> Dict[str, np.ndarray]:
        return {k: self._cast(k, v) for k, v in self._arrays.items()}


def _fixed_batch(specs: Sequence[InputSpec]) -> Optional[int]:
    sizes = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    return sizes.pop() if len(sizes) == 1 else None


def static_batch_size(inputs: Sequence[InputSpec]) -> Optional[int]:
    """The model's fixed batch size B (the one static leading dim its inputs share), or None when the batch
    is dynamic. A model with a fixed B only runs batches of exactly B samples: never slice a batch of it
    (e.g. to one sample for timing) -- take whole batches instead."""
    return _fixed_batch(list(inputs))


def _whole_batches(n: int, b: int, where: str, given: Optional[int] = None,
                   max_samples: Optional[int] = None) -> Tuple[int, int]:
    """A fixed batch size B > 1 takes only whole batches: (samples kept, the last n % B samples dropped).

    ``given``: samples in the source before ``max_samples`` cut them to ``n`` (for a precise message).
    """
    if n < b:
        if max_samples is not None and given is not None and given >= b:
            raise DataError(f"{where}: the model has a fixed batch size of {b} but max_samples={max_samples} keeps "
                            f"only {n} of the {given} samples; allow at least {b} samples (in quantize() the "
                            f"option max_calib_samples, on the CLI --max-calib-samples)")
        raise DataError(f"{where}: the model has a fixed batch size of {b} but only {n} sample(s) were given; "
                        f"give at least {b} samples (it runs whole batches of {b}) or export the model with a "
                        f"dynamic batch dimension")
    keep = n - n % b
    return keep, n - keep


def _dropped_note(where: str, b: int, n: int, dropped: int) -> str:
    return (f"{where}: the model has a fixed batch size of {b}; the last {dropped} of {n} samples do not fill a "
            f"batch and are not used")


def _effective_batch_size(batch_size: int, specs: Sequence[InputSpec], where: str,
                          notes: Optional[List[str]] = None) -> int:
    """The batch size data is fed in: a model with a fixed leading (batch) dim B takes batches of exactly B
    samples, whatever ``batch_size`` asks (a note records the override); otherwise ``batch_size``."""
    b = _fixed_batch(specs)
    if b is None:
        return int(batch_size)  # no static batch, or inputs disagree on axis 0 (then it is no common batch axis)
    if b != batch_size and notes is not None:
        notes.append(f"{where}: the model has a fixed batch size of {b}, so data is fed in batches of {b} "
                     f"(the requested batch size {batch_size}, option calib_batch_size, does not apply)")
    return int(b)


class IterableDataset(Dataset):
    """Data given as an iterable of feed dicts (each one batch), checked lazily as each batch is
    yielded. A one-shot iterator (generator) is cached on its first pass so the set can be
    iterated again; a list / re-iterable object is iterated afresh each time; a callable is called
    for a new iterator each time.

    Batches are kept as given, except for a model with a fixed batch size B: then the samples are
    regrouped into batches of exactly B (the last n % B samples are dropped, with a note). An exception
    raised by the source itself (a failing generator / loader) becomes a :class:`DataError` naming the batch.
    """

    def __init__(self, source: Any, specs: Sequence[InputSpec], max_samples: Optional[int] = None,
                 name: str = "calibration", where: Optional[str] = None, num_samples: Optional[int] = None,
                 batch_size: Optional[int] = None):
        self.name = name
        self._where = where or f"{name} data"
        self._specs = list(specs)
        self.input_names = [s.name for s in specs]
        self.notes: List[str] = []
        self._fixed = _fixed_batch(self._specs)
        self.batch_size = self._fixed if self._fixed is not None else batch_size
        self._max = _check_max_samples(max_samples)
        self._factory: Optional[Callable[[], Iterable]] = None
        self._once: Optional[Iterator] = None
        self._cache: Optional[List[Dict[str, np.ndarray]]] = None
        if callable(source) and not hasattr(source, "__iter__"):
            self._factory = source
        else:
            try:
                one_shot = iter(source) is source
            except Exception as e:
                raise self._source_error(e, None) from e
            if one_shot:  # one-shot iterator / generator
                self._once = source
            else:
                self._factory = lambda: source
        self._n_batches: Optional[int] = None
        self._n_samples: Optional[int] = None
        if num_samples is not None:
            n = num_samples if self._max is None else min(num_samples, self._max)
            self._set_counts(n, given=num_samples)
        elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
            if len(source) == 0:
                raise DataError(f"{self._where}: {name} set is empty (0 batches); give at least one sample")
            # cheap exact counts when every element is already a dict of arrays
            try:
                counts = [int(np.shape(next(iter(b.values())))[0]) for b in source]
            except Exception:
                counts = None  # malformed; the lazy check will say what is wrong
            if counts is not None:
                total, nb = 0, 0
                for c in counts:
                    if self._max is not None and total >= self._max:
                        break
                    take = c if self._max is None else min(c, self._max - total)
                    total += take
                    nb += 1 if take else 0
                if total == 0:
                    raise DataError(f"{self._where}: {name} set is empty (0 samples); give at least one sample")
                if self._fixed is not None:
                    self._set_counts(total, given=sum(counts))
                else:
                    self._n_samples, self._n_batches = total, nb

    def _set_counts(self, n: int, given: Optional[int] = None) -> None:
        if n == 0:
            raise DataError(f"{self._where}: {self.name} set is empty (0 samples); give at least one sample")
        if self._fixed is not None and self._fixed > 1:
            n, _ = _whole_batches(n, self._fixed, self._where, given=given, max_samples=self._max)
        self._n_samples = n
        if self.batch_size:
            self._n_batches = math.ceil(n / self.batch_size)

    def _source_error(self, e: BaseException, index: Optional[int]) -> DataError:
        import traceback

        at = "creating the batch iterator" if index is None else f"reading batch {index}"
        msg = " ".join(str(e).split())
        if len(msg) > 200:
            msg = msg[:197] + "..."
        return DataError(f"{self._where}: {at} failed: the data source raised {type(e).__name__}"
                         f"{': ' + msg if msg else ''}; fix the generator / loader that yields the batches",
                         details="".join(traceback.format_exception(type(e), e, e.__traceback__)))

    def _raw_iter(self) -> Iterator:
        if self._cache is not None:
            return iter(self._cache)
        if self._once is not None:
            return self._caching(self._once)
        return iter(self._factory())

    def _guarded(self) -> Iterator[Tuple[int, Any]]:
        """(index, batch) from the source; exceptions the source raises become DataErrors."""
        try:
            it = self._raw_iter()
        except DataError:
            raise
        except Exception as e:
            raise self._source_error(e, None) from e
        i = 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as e:
                raise self._source_error(e, i) from e
            yield i, batch
            i += 1

    def _caching(self, it: Iterator) -> Iterator:
        cache: List[Dict[str, np.ndarray]] = []
        for b in it:
            cache.append(b)
            yield b
        self._cache = cache
        self._once = None

    def _checked(self) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        """(samples before this batch, checked and cast batch) for each non-empty source batch."""
        seen = 0
        for i, batch in self._guarded():
            if self._max is not None and seen >= self._max:
                break
            where = f"{self._where}, batch {i}"
            if not isinstance(batch, Mapping):
                raise DataError(f"{where}: each batch must be a dict {{input_name: array}}, got "
                                f"{type(batch).__name__}")
            _check_names(list(batch.keys()), self._specs, where)
            arrs = {s.name: _as_array(batch[s.name], s.name, where) for s in self._specs}
            for s in self._specs:
                _leading(arrs[s.name], s.name, where)
                _check_shape(arrs[s.name], s, where, check_batch_axis=False)
            counts = {k: _leading(v, k, where) for k, v in arrs.items()}
            if len(set(counts.values())) > 1:
                raise DataError(f"{where}: inconsistent sample counts between inputs: {counts}; every input "
                                "needs the same batch size")
            n = next(iter(counts.values()), 0)
            if self._max is not None and seen + n > self._max:
                n = self._max - seen
                arrs = {k: v[:n] for k, v in arrs.items()}
            out = {}
            for s in self._specs:
                a = arrs[s.name]
                dt = _target_dtype(a, s, where)
                # a fixed batch size is restored by regrouping below, so only a free batch axis is checked as is
                _check_shape(a, s, where, check_batch_axis=self._fixed is None)
                _check_finite(a, s.name, where, offset=seen, target=dt)
                out[s.name] = a if a.dtype == dt else a.astype(dt)
            if n == 0:
                continue
            yield seen, out
            seen += n

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        total, nb, seen = 0, 0, 0
        b = self._fixed
        pending: Optional[Dict[str, np.ndarray]] = None  # samples waiting for a full batch of b
        for start, out in self._checked():
            n = len(next(iter(out.values())))
            seen = start + n
            if b is None:
                total += n
                nb += 1
                yield out
                continue
            if pending is not None:
                out = {k: np.concatenate([pending[k], out[k]], axis=0) for k in self.input_names}
                pending = None
            have = len(next(iter(out.values())))
            for s in range(0, have - b + 1, b):
                total += b
                nb += 1
                yield {k: v[s:s + b] for k, v in out.items()}
            if have % b:
                pending = {k: v[have - have % b:] for k, v in out.items()}
        if b is not None and pending is not None:
            left = len(next(iter(pending.values())))
            if total == 0:
                raise DataError(f"{self._where}: the model has a fixed batch size of {b} but only {left} "
                                f"sample(s) were given; give at least {b} samples (it runs whole batches of {b}) "
                                "or export the model with a dynamic batch dimension")
            note = _dropped_note(self._where, b, seen, left)
            if note not in self.notes:
                self.notes.append(note)
        if total == 0:
            raise DataError(f"{self._where}: {self.name} set is empty (0 samples); give at least one sample")
        self._n_samples, self._n_batches = total, nb

    def _count(self) -> None:
        for _ in self:
            pass

    def __len__(self) -> int:
        if self._n_batches is None:
            self._count()
        return int(self._n_batches)

    @property
    def num_samples(self) -> int:
        if self._n_samples is None:
            self._count()
        return int(self._n_samples)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataError(f"{path}: not an .npz archive")
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise DataError(f"cannot read calibration file '{path}' ({type(e).__name__}: {e}); give an .npz "
                        "written by numpy.savez with one numeric array per model input") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        # object arrays cannot be memory-mapped; try a plain load for a clearer message
        try:
            return np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read calibration file '{path}' ({type(e).__name__}: {e}); give an .npy "
                            "written by numpy.save holding a numeric array") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read calibration file '{path}' ({type(e).__name__}: {e}); give an .npy "
                        "written by numpy.save holding a numeric array") from None


def _load_path(path: Path) -> Tuple[Dict[str, np.ndarray], str]:
    if not path.exists():
        raise DataError(f"calibration data '{path}' does not exist; give an .npz file, a folder of .npy files "
                        "or an image folder")
    if path.is_dir():
        npys = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".npy")
        if not npys:
            has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))
            hint = (" it holds images: wrap it as ImageFolder(path, Preprocess(...)) to declare the "
                    "preprocessing" if has_images else "")
            raise DataError(f"calibration folder '{path}' holds no .npy files (one per model input, named "
                            f"<input name>.npy);{hint or ' add them'}")
        return {p.stem: _load_npy(p) for p in npys}, f"calibration folder '{path}'"
    suf = path.suffix.lower()
    if suf == ".npz":
        return _load_npz(path), f"calibration file '{path}'"
    if suf == ".npy":
        return {path.stem: _load_npy(path)}, f"calibration file '{path}'"
    raise DataError(f"calibration file '{path}' has an unsupported type '{path.suffix}'; give an .npz file, "
                    "a folder of .npy files, or an ImageFolder")


def load_calibration(source: Any, inputs: Sequence[InputSpec], batch_size: int = 8,
                     max_samples: Optional[int] = None, name: str = "calibration") -> Dataset:
    """Turn ``source`` into a checked :class:`Dataset` for a model with ``inputs``.

    ``source``: path to an ``.npz`` / ``.npy`` file, a folder of ``<input>.npy`` files, an
    :class:`ImageFolder`, a dict ``{name: array}``, a single array (one-input models), a list /
    iterable of feed dicts (each one batch, kept as given), a callable returning such an iterable,
    or a :class:`Dataset`. Arrays carry a leading sample axis. ``max_samples`` keeps the first N.
    Order is deterministic. Raises :class:`DataError` for anything that does not fit the model.
    """
    _check_batch_size(batch_size)
    specs = list(inputs)
    if not specs:
        raise DataError("the model has no inputs (all graph inputs are initializers); nothing to feed")
    if source is None:
        raise DataError(f"no {name} data given; pass an .npz file, a folder of .npy files, an ImageFolder, "
                        "a dict {input_name: array} or a list of feed dicts")
    if isinstance(source, Dataset):
        if list(source.input_names) != [s.name for s in specs] and \
                sorted(source.input_names) != sorted(s.name for s in specs):
            _check_names(source.input_names, specs, f"{name} data")
        if max_samples is None:
            return source
        return IterableDataset(source, specs, max_samples=max_samples, name=name,
                               num_samples=source.num_samples, batch_size=source.batch_size)
    if isinstance(source, (str, os.PathLike)):
        arrays, where = _load_path(Path(source))
        return ArrayDataset(arrays, specs, batch_size, max_samples, name, where)
    if isinstance(source, ImageFolder):
        return source.dataset(specs, batch_size=batch_size, max_samples=max_samples, name=name)
    if isinstance(source, Mapping):
        return ArrayDataset(source, specs, batch_size, max_samples, name, f"{name} data")
    if isinstance(source, np.ndarray):
        if len(specs) != 1:
            raise DataError(f"{name} data is a single array but the model has {len(specs)} inputs "
                            f"{[s.name for s in specs]}; give a dict {{input_name: array}}")
        return ArrayDataset({specs[0].name: source}, specs, batch_size, max_samples, name, f"{name} data")
    if isinstance(source, (str, bytes)) or not (hasattr(source, "__iter__") or callable(source)):
        raise DataError(f"{name} data of type {type(source).__name__} is not supported; pass an .npz path, a "
                        "folder of .npy files, an ImageFolder, a dict {input_name: array} or a list of feed dicts")
    return IterableDataset(source, specs, max_samples=max_samples, name=name, where=f"{name} data")


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

_INTERP = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS",
           "box": "BOX", "hamming": "HAMMING"}


def _hw(v, field_name: str) -> Optional[Union[int, Tuple[int, int]]]:
    if v is None:
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        if v < 1:
            raise DataError(f"Preprocess.{field_name} must be positive, got {v}")
        return int(v)
    try:
        t = tuple(int(x) for x in v)
    except Exception:
        raise DataError(f"Preprocess.{field_name} must be an int or (height, width), got {v!r}") from None
    if len(t) != 2 or min(t) < 1:
        raise DataError(f"Preprocess.{field_name} must be an int or (height, width) of positive ints, got {v!r}")
    return t


@dataclass
class Preprocess:
    """Declared image preprocessing, applied in this order:

    convert to ``color`` (RGB / BGR / L) -> ``resize`` ((h, w) exactly, or an int: the shorter side,
    aspect kept) -> ``center_crop`` ((h, w) or an int for a square) -> ``x = pixel * scale`` ->
    ``x = (x - mean) / std`` per channel (in the output channel order, i.e. BGR order for ``BGR``)
    -> ``layout`` NCHW gives (C, H, W) per image, NHWC gives (H, W, C). Output is float32.
    """

    resize: Optional[Union[Tuple[int, int], int]] = None
    center_crop: Optional[Union[Tuple[int, int], int]] = None
    scale: float = 1 / 255
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    color: str = "RGB"
    interpolation: str = "bilinear"

    def __post_init__(self):
        self.resize = _hw(self.resize, "resize")
        self.center_crop = _hw(self.center_crop, "center_crop")
        try:
            self.scale = float(self.scale)
        except Exception:
            raise DataError(f"Preprocess.scale must be a number, got {self.scale!r}") from None
        if isinstance(self.mean, (int, float)):
            self.mean = (self.mean,)
        if isinstance(self.std, (int, float)):
            self.std = (self.std,)
        try:
            self.mean = tuple(float(x) for x in self.mean)
            self.std = tuple(float(x) for x in self.std)
        except Exception:
            raise DataError(f"Preprocess.mean / std must be numbers per channel, got {self.mean!r} / "
                            f"{self.std!r}") from None
        self.layout = str(self.layout).upper()
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"Preprocess.layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        self.color = str(self.color).upper()
        if self.color == "GRAY":
            self.color = "L"
        if self.color not in ("RGB", "BGR", "L"):
            raise DataError(f"Preprocess.color must be 'RGB', 'BGR' or 'L', got {self.color!r}")
        self.interpolation = str(self.interpolation).lower()
        if self.interpolation not in _INTERP:
            raise DataError(f"Preprocess.interpolation must be one of {sorted(_INTERP)}, got "
                            f"{self.interpolation!r}")
        c = self.channels
        for fname in ("mean", "std"):
            v = getattr(self, fname)
            if len(v) not in (1, c):
                raise DataError(f"Preprocess.{fname} has {len(v)} values but color {self.color} has {c} "
                                f"channel(s); give 1 or {c} values")
        if any(s == 0 for s in self.std):
            raise DataError(f"Preprocess.std must not contain 0, got {self.std}")

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        if isinstance(d, Preprocess):
            return d
        if not isinstance(d, Mapping):
            raise DataError(f"preprocess must be a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"preprocess: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> Dict[str, Any]:
        def j(v):
            return list(v) if isinstance(v, tuple) else v
        return {f.name: j(getattr(self, f.name)) for f in fields(self)}

    def output_shape(self, image_hw: Optional[Tuple[int, int]] = None) -> Optional[tuple]:
        """Per-image output shape, when fixed by crop / exact resize (else from ``image_hw``)."""
        hw = None
        if self.center_crop is not None:
            hw = self.center_crop if isinstance(self.center_crop, tuple) else (self.center_crop,) * 2
        elif isinstance(self.resize, tuple):
            hw = self.resize
        elif image_hw is not None and self.resize is None:
            hw = tuple(image_hw)
        if hw is None:
            return None
        c = self.channels
        return (c, hw[0], hw[1]) if self.layout == "NCHW" else (hw[0], hw[1], c)

    def __call__(self, img: Any, name: str = "image") -> np.ndarray:
        from PIL import Image

        if isinstance(img, np.ndarray):
            arr = img
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
                raise DataError(f"{name}: expected an HWC image array with 1, 3 or 4 channels, got shape "
                                f"{img.shape}")
            if arr.dtype != np.uint8:
                raise DataError(f"{name}: expected a uint8 image array, got {arr.dtype.name}")
            if arr.shape[2] == 4:
                arr = arr[:, :, :3]
            if self.color == "L":
                pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("L")
            elif arr.shape[2] == 1:
                pil = Image.fromarray(arr[:, :, 0]).convert("RGB")
            else:
                pil = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        elif isinstance(img, Image.Image):
            pil = img.convert("L" if self.color == "L" else "RGB")
        else:
            raise DataError(f"{name}: expected a PIL image or a uint8 HWC array, got {type(img).__name__}")

        pil = self._resize(pil)
        pil = self._crop(pil, name)
        x = np.asarray(pil, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.color == "BGR":
            x = x[:, :, ::-1]
        x = x * np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _resize(self, pil):
        if self.resize is None:
            return pil
        from PIL import Image

        resample = getattr(Image.Resampling, _INTERP[self.interpolation]) if hasattr(Image, "Resampling") \
            else getattr(Image, _INTERP[self.interpolation])
        w, h = pil.size
        if isinstance(self.resize, tuple):
            th, tw = self.resize
        else:
            s = self.resize
            if h <= w:
                th, tw = s, max(1, int(round(w * s / h)))
            else:
                th, tw = max(1, int(round(h * s / w))), s
        if (th, tw) == (h, w):
            return pil
        return pil.resize((tw, th), resample=resample)

    def _crop(self, pil, name: str):
        if self.center_crop is None:
            return pil
        ch, cw = self.center_crop if isinstance(self.center_crop, tuple) else (self.center_crop,) * 2
        w, h = pil.size
        if ch > h or cw > w:
            raise DataError(f"{name}: center_crop {ch}x{cw} is larger than the image ({h}x{w} after resize); "
                            "resize to at least the crop size first")
        top = int(round((h - ch) / 2.0))
        left = int(round((w - cw) / 2.0))
        return pil.crop((left, top, left + cw, top + ch))


class ImageFolder:
    """A folder of images (jpg / jpeg / png / bmp, searched recursively, sorted by relative path)
    with a declared :class:`Preprocess`, and optional ``labels.tsv`` (``file<TAB>class index`` per
    line, file relative to the folder). ``limit`` keeps the first N images."""

    def __init__(self, root: Union[str, os.PathLike], preprocess: Union[Preprocess, Mapping, None] = None,
                 input_name: str = "input", limit: Optional[int] = None):
        self.root = Path(root)
        self.preprocess = Preprocess() if preprocess is None else Preprocess.from_dict(preprocess)
        self.input_name = input_name
        if not self.root.exists():
            raise DataError(f"image folder '{self.root}' does not exist")
        if not self.root.is_dir():
            raise DataError(f"image folder '{self.root}' is not a folder; give the folder that holds the images")
        files = sorted((p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda p: p.relative_to(self.root).as_posix())
        if limit is not None:
            if isinstance(limit, bool) or int(limit) < 0:
                raise DataError(f"ImageFolder limit must be a non-negative integer or None, got {limit!r}")
            files = files[:int(limit)]
        if not files:
            raise DataError(f"image folder '{self.root}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            "add images or point to the right folder")
        self.files: List[Path] = files
        self._labels = self._read_labels()

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, images={len(self)}, input_name={self.input_name!r})"

    @property
    def labels(self) -> Optional[np.ndarray]:
        return self._labels

    def _read_labels(self) -> Optional[np.ndarray]:
        path = self.root / "labels.tsv"
        if not path.is_file():
            return None
        table: Dict[str, int] = {}
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read labels file '{path}' ({e})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 2:
                raise DataError(f"labels file '{path}' line {lineno}: expected 'file<TAB>class index', got "
                                f"{line!r}")
            try:
                table[parts[0].strip()] = int(parts[1].strip())
            except ValueError:
                if lineno == 1 and not table:
                    continue  # a header line
                raise DataError(f"labels file '{path}' line {lineno}: class index {parts[1]!r} is not an "
                                "integer") from None
        out = []
        for p in self.files:
            rel = p.relative_to(self.root).as_posix()
            if rel in table:
                out.append(table[rel])
            elif p.name in table:
                out.append(table[p.name])
            else:
                raise DataError(f"labels file '{path}' has no label for image '{rel}'; add a line "
                                f"'{rel}<TAB>class index'")
        return np.asarray(out, dtype=np.int64)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` preprocessed (float32, per-image layout of the Preprocess)."""
        from PIL import Image, UnidentifiedImageError

        p = self.files[index]
        try:
            with Image.open(p) as im:
                im.load()
                return self.preprocess(im, name=f"image '{p}'")
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image '{p}' ({type(e).__name__}: {e}); remove or replace it") from None

    def _stack(self, idx: Iterable[int]) -> np.ndarray:
        imgs = [self.load(i) for i in idx]
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise DataError(f"image folder '{self.root}': images give different shapes after preprocessing "
                            f"{sorted(shapes)}; declare resize=(h, w) or center_crop so every image has the "
                            "same size")
        return np.stack(imgs, axis=0)

    def arrays(self) -> Dict[str, np.ndarray]:
        """All (``limit``) images, preprocessed and stacked: ``{input_name: [N, ...] float32}``."""
        return {self.input_name: self._stack(range(len(self.files)))}

    def batches(self, batch_size: int, max_samples: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
        _check_batch_size(batch_size)
        n = len(self.files) if max_samples is None else min(len(self.files), int(max_samples))
        first_shape = None
        for s in range(0, n, batch_size):
            arr = self._stack(range(s, min(n, s + batch_size)))
            if first_shape is None:
                first_shape = arr.shape[1:]
            elif arr.shape[1:] != first_shape:
                raise DataError(f"image folder '{self.root}': images give different shapes after preprocessing "
                                f"({first_shape} vs {arr.shape[1:]}); declare resize=(h, w) or center_crop so "
                                "every image has the same size")
            yield {self.input_name: arr}

    def dataset(self, specs: Sequence[InputSpec], batch_size: int = 8, max_samples: Optional[int] = None,
                name: str = "calibration") -> Dataset:
        """A lazily-loaded :class:`Dataset` (images decoded batch by batch on each pass); the first
        image is checked against the model input now."""
        where = f"image folder '{self.root}'"
        _check_batch_size(batch_size)
        max_samples = _check_max_samples(max_samples)
        _check_names([self.input_name], specs, where)
        spec = specs[0]
        notes: List[str] = []
        bs = _effective_batch_size(batch_size, specs, where, notes)
        first = self.load(0)[None]
        _target_dtype(first, spec, where)
        _check_shape(first, spec, where, check_batch_axis=False)
        n = len(self.files) if max_samples is None else min(len(self.files), max_samples)
        fixed = _fixed_batch(specs)
        if fixed is not None and fixed > 1:
            n, dropped = _whole_batches(n, fixed, where, given=len(self.files), max_samples=max_samples)
            if dropped:
                notes.append(_dropped_note(where, fixed, n + dropped, dropped))
        ds = IterableDataset(lambda: self.batches(bs, n), specs, name=name, where=where, num_samples=n,
                             batch_size=bs)
        ds.notes.extend(notes)
        return ds
