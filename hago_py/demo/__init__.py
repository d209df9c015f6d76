"""Embedded demo: ResNet-20 (CIFAR-10) and a few hundred CIFAR-10 images, small enough to ship.

``load_demo()`` gives the model path, a calibration set and a labelled test set, preprocessed the way
the model was trained (``x = (pixel / 255 - mean) / std``, NCHW float32). See LICENSE_DATA.md for
where the files came from; ``make_demo_data.py`` rebuilds them from the bench data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

HERE = Path(__file__).resolve().parent
DEMO_MODEL = HERE / "resnet20_cifar10.onnx"
DEMO_DATA = HERE / "cifar10_demo.npz"
DEMO_INPUT = "input"
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)

__all__ = ["DEMO_MODEL", "DEMO_DATA", "DEMO_INPUT", "CIFAR_MEAN", "CIFAR_STD", "preprocess_cifar", "load_demo",
           "top1"]


def preprocess_cifar(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, 3] (RGB) -> float32 [N, 3, H, W] with ``x = (pixel / 255 - mean) / std``."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess_cifar expects uint8 images [N, H, W, 3], got shape {x.shape}")
    mean = np.asarray(CIFAR_MEAN, dtype=np.float32)
    std = np.asarray(CIFAR_STD, dtype=np.float32)
    x = (x.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def load_demo() -> Dict[str, Any]:
    """``dict(model=Path, calib={'input': float32 [200,3,32,32]}, test_x=float32 [500,3,32,32],
    test_y=int64 [500])``."""
    from hago_py.errors import DataError

    for p in (DEMO_MODEL, DEMO_DATA):
        if not p.is_file():
            raise DataError(f"demo file '{p}' is missing from the installation; reinstall hago_py (the demo "
                            "files are package data)")
    with np.load(DEMO_DATA, allow_pickle=False) as z:
        calib = z["calib_images"]
        test_images = z["test_images"]
        test_labels = z["test_labels"].astype(np.int64)
    return dict(model=DEMO_MODEL, calib={DEMO_INPUT: preprocess_cifar(calib)}, test_x=preprocess_cifar(test_images),
                test_y=test_labels)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``logits`` [N, classes] against integer ``labels`` [N]."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"top1 expects logits [N, classes] and labels [N], got {logits.shape} and {labels.shape}")
    if labels.size == 0:
        raise ValueError("top1 of an empty set")
    return float(np.mean(np.argmax(logits, axis=1) == labels))
