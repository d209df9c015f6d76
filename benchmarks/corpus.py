"""The benchmark corpus: three real models with real labelled data (see ../shared/bench/README.md).

The corpus lives outside the repository; it is found through ``$HAGO_BENCH_DATA`` or else
``<repo>/../shared/bench``. Nothing here writes files: preprocessed arrays are cached in memory only.

Each model is a small object with

* ``model_path``                        the FP32 ONNX file
* ``calib_arrays(n)`` / ``calib_feeds(n, batch)``   calibration data from the calib split
* ``evaluate(session_or_model, limit=None) -> float``   the README metric on the test split
* ``timing_feed()``                     one batch-1 feed for latency measurements
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

ENV_VAR = "HAGO_BENCH_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "bench"

Feed = Dict[str, np.ndarray]

# In-memory cache of preprocessed splits, keyed by (corpus root, model name, split).
_CACHE: Dict[Tuple[str, str, str], Any] = {}


# ----------------------------------------------------------------------------------- locating
def locate(root: Union[str, os.PathLike, None] = None) -> Tuple[Optional[Path], str]:
    """Find the corpus folder. Returns ``(path, "")`` or ``(None, reason to skip)``.

    An explicit ``root`` wins, then ``$HAGO_BENCH_DATA`` (if set, it is the only place looked at),
    then ``<repo>/../shared/bench``. A folder counts only if it holds ``models/``.
    """
    if root is not None:
        cand, origin = Path(root), f"root={root}"
    elif os.environ.get(ENV_VAR):
        cand, origin = Path(os.environ[ENV_VAR]), f"${ENV_VAR}={os.environ[ENV_VAR]}"
    else:
        cand, origin = DEFAULT_ROOT, f"default location {DEFAULT_ROOT}"
    if not cand.is_dir():
        return None, f"benchmark corpus not found ({origin} is not a folder)"
    if not (cand / "models").is_dir():
        return None, f"benchmark corpus not found ({origin} has no models/ folder)"
    return cand, ""


# ----------------------------------------------------------------------------------- sessions
def make_session(model, threads: Optional[int] = None, optimization: str = "all"):
    """An ORT CPU session for a path / ModelProto / bytes (deployment optimisation level by default)."""
    import onnx
    import onnxruntime as ort

    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return model
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _batches(n: int, batch: int):
    for s in range(0, n, batch):
        yield s, min(n, s + batch)


# ----------------------------------------------------------------------------------- models
class BenchModel:
    """Common shape of a corpus model. Subclasses fill in the data handling."""

    name: str = ""
    title: str = ""
    model_file: str = ""
    metric_name: str = ""
    fp32_reference: float = float("nan")  # README figure
    eval_batch: int = 64
    quick_limit: int = 200  # test samples used by --quick
    default_calib: int = 256

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = Path(root)

    # files
    @property
    def model_path(self) -> Path:
        return self.root / "models" / self.model_file

    def required_files(self) -> List[Path]:
        return [self.model_path]

    def available(self) -> Tuple[bool, str]:
        missing = [str(p) for p in self.required_files() if not p.exists()]
        if missing:
            return False, "missing: " + ", ".join(missing)
        return True, ""

    def _cached(self, split: str, loader):
        key = (str(self.root), self.name, split)
        if key not in _CACHE:
            _CACHE[key] = loader()
        return _CACHE[key]

    # calibration
    def calib_arrays(self, n: Optional[int] = None) -> Feed:
        raise NotImplementedError

    def calib_feeds(self, n: Optional[int] = None, batch: int = 1) -> List[Feed]:
        arrays = self.calib_arrays(n)
        total = len(next(iter(arrays.values())))
        return [{k: v[s:e] for k, v in arrays.items()} for s, e in _batches(total, batch)]

    # evaluation
    def eval_size(self) -> int:
        raise NotImplementedError

    def evaluate(self, session_or_model, limit: Optional[int] = None, threads: Optional[int] = None,
                 batch: Optional[int] = None) -> float:
        raise NotImplementedError

    def timing_feed(self) -> Feed:
        raise NotImplementedError

    # presentation
    def format_metric(self, v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f} %"

    def format_delta(self, d: Optional[float]) -> str:
        return "-" if d is None else f"{d:+.2f} pp"


class _ImageClassifier(BenchModel):
    metric_name = "top-1 %"

    def _images(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
        """(NCHW float32, int64 labels) of a split."""
        raise NotImplementedError

    def calib_arrays(self, n: Optional[int] = None) -> Feed:
        x, _ = self._images("calib")
        return {"input": x[:n] if n else x}

    def eval_size(self) -> int:
        return len(self._images("test")[1])

    def evaluate(self, session_or_model, limit=None, threads=None, batch=None) -> float:
        sess = make_session(session_or_model, threads)
        x, y = self._images("test")
        if limit:
            x, y = x[:limit], y[:limit]
        iname = sess.get_inputs()[0].name
        correct = 0
        for s, e in _batches(len(y), batch or self.eval_batch):
            logits = sess.run(None, {iname: x[s:e]})[0]
            correct += int((np.argmax(logits, axis=1) == y[s:e]).sum())
        return 100.0 * correct / len(y)

    def timing_feed(self) -> Feed:
        return {"input": np.ascontiguousarray(self._images("test")[0][:1])}


class Resnet20Cifar10(_ImageClassifier):
    name = "resnet20"
    title = "ResNet-20 / CIFAR-10"
    model_file = "resnet20_cifar10.onnx"
    fp32_reference = 81.03
    eval_batch = 64
    quick_limit = 1000
    default_calib = 1000
    MEAN = np.array([0.485, 0.456, 0.406], np.float32)
    STD = np.array([0.229, 0.224, 0.225], np.float32)

    def required_files(self):
        return [self.model_path, self.root / "cifar10" / "calib.npz", self.root / "cifar10" / "test.npz"]

    @classmethod
    def preprocess(cls, images_nhwc_u8: np.ndarray) -> np.ndarray:
        x = (images_nhwc_u8.astype(np.float32) / 255.0 - cls.MEAN) / cls.STD
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    def _images(self, split):
        def load():
            d = np.load(self.root / "cifar10" / ("calib.npz" if split == "calib" else "test.npz"))
            return self.preprocess(d["images"]), d["labels"].astype(np.int64)

        return self._cached(split, load)


class EfficientNetLite0(_ImageClassifier):
    name = "lite0"
    title = "EfficientNet-Lite0 / ImageNet"
    model_file = "efficientnet_lite0.onnx"
    fp32_reference = 82.38
    eval_batch = 32
    quick_limit = 200
    default_calib = 250

    def required_files(self):
        return [self.model_path, self.root / "imagenet" / "calib" / "labels.tsv",
                self.root / "imagenet" / "val" / "labels.tsv"]

    @staticmethod
    def preprocess_file(path: Union[str, os.PathLike]) -> np.ndarray:
        """RGB; resize the whole image to 256x256 bilinear; centre-crop 224; (p-127)/128; CHW float32."""
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.float32)
        o = (256 - 224) // 2
        a = a[o:o + 224, o:o + 224, :]
        return np.ascontiguousarray(((a - 127.0) / 128.0).transpose(2, 0, 1), dtype=np.float32)

    def _images(self, split):
        def load():
            folder = self.root / "imagenet" / ("calib" if split == "calib" else "val")
            files, labels = [], []
            for line in (folder / "labels.tsv").read_text().splitlines():
                if not line.strip():
                    continue
                f, lab = line.split("\t")
                files.append(folder / f)
                labels.append(int(lab))
            x = np.stack([self.preprocess_file(f) for f in files]).astype(np.float32)
            return x, np.asarray(labels, np.int64)

        return self._cached(split, load)


class MiniLmStsb(BenchModel):
    name = "minilm"
    title = "MiniLM-L6 / STS-B"
    model_file = "minilm_l6.onnx"
    metric_name = "Spearman rho"
    fp32_reference = 0.8203
    eval_batch = 64
    quick_limit = 200
    default_calib = 256  # sentences: both sides of the first 128 calibration pairs
    INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def required_files(self):
        return [self.model_path, self.root / "stsb" / "calib.npz", self.root / "stsb" / "test.npz"]

    def _split(self, split):
        def load():
            d = np.load(self.root / "stsb" / ("calib.npz" if split == "calib" else "test.npz"))
            return {k: d[k] for k in d.files}

        return self._cached(split, load)

    def calib_arrays(self, n: Optional[int] = None) -> Feed:
        """Both sentence sides as separate samples, interleaved: s1[0], s2[0], s1[1], s2[1], ..."""
        d = self._split("calib")
        out = {}
        for k in self.INPUTS:
            a = np.stack([d["s1_" + k], d["s2_" + k]], axis=1).reshape(-1, d["s1_" + k].shape[1])
            out[k] = np.ascontiguousarray(a[:n] if n else a, dtype=np.int64)
        return out

    def eval_size(self) -> int:
        return len(self._split("test")["scores"])

    def _embed(self, sess, side: Dict[str, np.ndarray], batch: int) -> np.ndarray:
        names = {i.name for i in sess.get_inputs()}
        out = []
        for s, e in _batches(len(side["input_ids"]), batch):
            feed = {k: side[k][s:e] for k in self.INPUTS if k in names}
            h = sess.run(None, feed)[0]
            m = side["attention_mask"][s:e].astype(np.float32)[:, :, None]
            emb = (h * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
            out.append(emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None))
        return np.concatenate(out)

    def evaluate(self, session_or_model, limit=None, threads=None, batch=None) -> float:
        from scipy.stats import spearmanr

        sess = make_session(session_or_model, threads)
        d = self._split("test")
        n = limit or len(d["scores"])
        b = batch or self.eval_batch
        e1 = self._embed(sess, {k: d["s1_" + k][:n] for k in self.INPUTS}, b)
        e2 = self._embed(sess, {k: d["s2_" + k][:n] for k in self.INPUTS}, b)
        cos = (e1 * e2).sum(axis=1)
        return float(spearmanr(cos, d["scores"][:n]).statistic)

    def timing_feed(self) -> Feed:
        d = self._split("test")
        return {k: np.ascontiguousarray(d["s1_" + k][:1]) for k in self.INPUTS}

    def format_metric(self, v):
        return "-" if v is None else f"{v:.4f}"

    def format_delta(self, d):
        return "-" if d is None else f"{d:+.4f}"


MODEL_CLASSES = {c.name: c for c in (Resnet20Cifar10, EfficientNetLite0, MiniLmStsb)}


# The same two networks exported with their BatchNormalization nodes kept (data-free methods read the BN
# statistics): same data, preprocessing and FP32 accuracy as the folded exports. Selected by name only
# (--models resnet20_bn,lite0_bn); the default model list stays MODEL_CLASSES.
class Resnet20Cifar10Bn(Resnet20Cifar10):
    name = "resnet20_bn"
    title = "ResNet-20 / CIFAR-10 (BN kept)"
    model_file = "resnet20_cifar10_bn.onnx"


class EfficientNetLite0Bn(EfficientNetLite0):
    name = "lite0_bn"
    title = "EfficientNet-Lite0 / ImageNet (BN kept)"
    model_file = "efficientnet_lite0_bn.onnx"


EXTRA_MODEL_CLASSES = {c.name: c for c in (Resnet20Cifar10Bn, EfficientNetLite0Bn)}
ALL_MODEL_CLASSES = {**MODEL_CLASSES, **EXTRA_MODEL_CLASSES}


def get_model(name: str, root: Union[str, os.PathLike, None] = None) -> BenchModel:
    r, why = locate(root)
    if r is None:
        raise FileNotFoundError(why)
    return ALL_MODEL_CLASSES[name](r)


def get_models(names=None, root=None) -> Tuple[Dict[str, BenchModel], str]:
    """Available corpus models by name, and a reason string when nothing (or something) is missing."""
    r, why = locate(root)
    if r is None:
        return {}, why
    out, reasons = {}, []
    for n in (names or list(MODEL_CLASSES)):
        if n not in ALL_MODEL_CLASSES:
            reasons.append(f"unknown model {n!r} (known: {', '.join(ALL_MODEL_CLASSES)})")
            continue
        m = ALL_MODEL_CLASSES[n](r)
        ok, why_m = m.available()
        if ok:
            out[n] = m
        else:
            reasons.append(f"{n}: {why_m}")
    return out, "; ".join(reasons)
