"""The tensorized Cortex-A76 sdot kernels executed under qemu-aarch64 (benchmarks/tvm_tensorize_qemu.py): bit-exact
against numpy with full 8-bit weights, and SIGILL on a CPU without dotprod (so sdot really runs). Skipped without
tvm, qemu-aarch64 or aarch64-linux-gnu-gcc. A few s."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ also under a bare `pytest`
from benchmarks import tvm_tensorize_qemu as q  # noqa: E402

pytestmark = pytest.mark.skipif(not q.tools_available(), reason="needs qemu-aarch64 and aarch64-linux-gnu-gcc")


@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
def test_sdot_kernels_run_bit_exact_under_qemu(tmp_path, x_dtype):
    from hago_py.backends.tvm import tensorize as tz

    isa = tz.ISAS["dotprod"]
    rng = np.random.default_rng(1)
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    w = rng.integers(-128, 128, (12, 8, 3, 3)).astype(np.int8)
    x = rng.integers(lo, hi, (1, 8, 7, 7)).astype(x_dtype)
    k = tz.conv2d_kernel(x.shape, x_dtype, w, padding=(1, 1, 1, 1), isa=isa)
    out, rc, err, b = q.run(k, x, str(tmp_path))
    assert b["sdot"] > 0 and rc == 0, err
    np.testing.assert_array_equal(out.astype(np.int64), q.ref_conv(x, w, 1, 1))
    wd = rng.integers(-128, 128, (40, 10)).astype(np.int8)
    xd = rng.integers(lo, hi, (3, 40)).astype(x_dtype)
    k = tz.matmul_kernel(3, x_dtype, wd, isa=isa)
    out, rc, err, b = q.run(k, xd, str(tmp_path))
    assert b["sdot"] > 0 and rc == 0, err
    np.testing.assert_array_equal(out.astype(np.int64), xd.astype(np.int64) @ wd.astype(np.int64))
    if x_dtype == "int8":
        _, rc53, err53, _ = q.run(k, xd, str(tmp_path), cpu="cortex-a53")
        assert rc53 != 0 and "Illegal instruction" in err53
