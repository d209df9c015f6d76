"""Depthwise int8 kernels (backends/tvm/tensorize.py ``depthwise_conv2d_kernel``) vs TVM 0.27's untuned default.

EfficientNet-Lite0 depthwise layers (:data:`LAYERS`), batch 1, uint8 activations x int8 weights -> int32
(``relax.nn.conv2d`` with groups = channels). Each variant is a Relax module
with that one conv, built at opt_level 3 for ``--mcpu`` (haswell: AVX2) and run through the Relax VM:
``default`` (legalized, untuned), and ``tensorize_module(mod, --isa)`` with the kernel's layout forced to
``nchwc`` / ``nchw`` and left on ``auto`` (what hago uses). All outputs checked identical to numpy. Timing: round
robin over the variants, ``--repeats`` samples each of the mean of ``--number`` calls; median and min reported.

    TVM_NUM_THREADS=1 python benchmarks/tvm_depthwise.py --repeats 15
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np

#: channels, H = W, kernel, stride (pad = kernel // 2): EfficientNet-Lite0 depthwise layers at 224x224
LAYERS = [(144, 56, 3, 1), (144, 56, 5, 2), (96, 112, 3, 2), (480, 14, 5, 1)]


def _model(c, hw, k, stride, x_dtype, w):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=[stride] * 2,
                                                          padding=[k // 2] * 4, groups=c, out_dtype="int32")))
        bb.emit_func_output(o)
    return bb.get()


def main(argv=None):
    import tvm
    from tvm import relax

    from hago_py.backends.tvm import tensorize as tz

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from models import conv_int

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--number", type=int, default=10)
    p.add_argument("--mcpu", default="haswell")
    p.add_argument("--isa", default="avx2")
    p.add_argument("--out")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    orig = tz.depthwise_conv2d_kernel
    results = {"host": platform.processor() or platform.machine(), "mcpu": a.mcpu, "isa": a.isa,
               "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "repeats": a.repeats, "number": a.number,
               "layers": []}
    for c, hw, k, s in LAYERS:
        w = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
        x = rng.integers(0, 256, (1, c, hw, hw)).astype(np.uint8)
        ref = conv_int(x, w, 0, (k // 2,) * 4, (s, s), c)
        mod = _model(c, hw, k, s, "uint8", w)
        variants = {"default_untuned": mod}
        for layout in ("nchwc", "nchw", "auto"):
            tz.depthwise_conv2d_kernel = functools.partial(orig, layout=layout)
            try:
                new, recs = tz.tensorize_module(mod, tz.ISAS[a.isa])
            finally:
                tz.depthwise_conv2d_kernel = orig
            assert [r["status"] for r in recs] == ["tensorized"], recs
            variants[f"hago_{layout}"] = new
        fns, xt = {}, tvm.runtime.tensor(x, dev)
        for name, m in variants.items():
            with tvm.transform.PassContext(opt_level=3):
                ex = relax.build(m, target=tvm.target.Target({"kind": "llvm", "mcpu": a.mcpu}))
            vm = relax.VirtualMachine(ex, dev)
            assert np.array_equal(vm["main"](xt).numpy(), ref), name
            fns[name] = vm["main"]
        samples = {name: [] for name in fns}
        for _ in range(a.repeats):
            for name, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(a.number):
                    f(xt)
                samples[name].append((time.perf_counter() - t0) / a.number)
        layer = {"layer": f"depthwise {k}x{k} stride {s} pad {k // 2}, {c} ch, {hw}x{hw}, uint8 x int8, batch 1",
                 "exact": True}
        for name, t in samples.items():
            layer[name] = {"median_ms": round(1e3 * float(np.median(t)), 3), "min_ms": round(1e3 * min(t), 3)}
        base = layer["default_untuned"]["median_ms"]
        layer["speedup_vs_default_median"] = {n: round(base / layer[n]["median_ms"], 2) for n in samples
                                              if n != "default_untuned"}
        results["layers"].append(layer)
        print(json.dumps(layer), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
