"""Build the small demo data embedded in the package (``cifar10_demo.npz``, and copy the demo model).

Not run at install time: the outputs are committed. Re-run by hand to rebuild them::

    python -m hago_py.demo.make_demo_data            # reads $HAGO_BENCH_DATA or the shared bench folder

Sources (see LICENSE_DATA.md):
  * ``<bench>/cifar10/calib.npz``  -> first 200 images            -> ``calib_images`` uint8 [200,32,32,3]
  * ``<bench>/cifar10/test.npz``   -> the first 50 images of each class, in their original order
                                      -> ``test_images`` uint8 [500,32,32,3], ``test_labels`` int64 [500]
  * ``<bench>/models/resnet20_cifar10.onnx`` -> copied as ``resnet20_cifar10.onnx``
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_CALIB = 200
PER_CLASS = 50
N_CLASSES = 10


def bench_root() -> Path:
    env = os.environ.get("HAGO_BENCH_DATA")
    if env:
        return Path(env)
    repo_relative = HERE.parents[2] / "shared" / "bench"  # <repo>/../shared/bench
    return repo_relative if repo_relative.is_dir() else Path("/work/shared/bench")


def balanced_first(labels: np.ndarray, per_class: int, n_classes: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, kept in their original order."""
    idx = []
    for c in range(n_classes):
        hits = np.flatnonzero(labels == c)[:per_class]
        if len(hits) < per_class:
            raise SystemExit(f"class {c} has only {len(hits)} test images, need {per_class}")
        idx.append(hits)
    return np.sort(np.concatenate(idx))


def main(out_dir: Path = HERE) -> None:
    root = bench_root()
    calib_path = root / "cifar10" / "calib.npz"
    test_path = root / "cifar10" / "test.npz"
    model_path = root / "models" / "resnet20_cifar10.onnx"
    for p in (calib_path, test_path, model_path):
        if not p.is_file():
            raise SystemExit(f"missing {p}; set HAGO_BENCH_DATA to the bench data folder")
    with np.load(calib_path) as z:
        calib = np.ascontiguousarray(z["images"][:N_CALIB], dtype=np.uint8)
    with np.load(test_path) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    idx = balanced_first(labels, PER_CLASS, N_CLASSES)
    test_x = np.ascontiguousarray(images[idx], dtype=np.uint8)
    test_y = labels[idx]
    assert calib.shape == (N_CALIB, 32, 32, 3) and test_x.shape == (PER_CLASS * N_CLASSES, 32, 32, 3)
    np.savez_compressed(out_dir / "cifar10_demo.npz", calib_images=calib, test_images=test_x, test_labels=test_y)
    shutil.copyfile(model_path, out_dir / "resnet20_cifar10.onnx")
    print(f"wrote {out_dir / 'cifar10_demo.npz'} ({(out_dir / 'cifar10_demo.npz').stat().st_size} bytes) "
          f"and {out_dir / 'resnet20_cifar10.onnx'} from {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
