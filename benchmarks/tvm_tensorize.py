"""Tensorized int8 kernels vs TVM 0.27's default / MetaSchedule-tuned ones (issue 13 item 2).

Layers (ResNet-20 shapes, batch 1): conv 3x3 32->32 on 16x16 (pad 1), dense 64->10. For each:
* int8 instructions in the assembly for x86 AVX2 (znver3), AVX-512 VNNI (cascadelake) and Cortex-A76 (+dotprod):
  the default (legalized relax.nn.conv2d / matmul, untuned) and the tensorized kernel (backends/tvm/tensorize.py);
* on this host (AVX2 only): bit-exactness against numpy and latency of the untuned default, the MetaSchedule
  default-rules tuned default (``--trials``, 0 skips), the tensorized AVX2 kernel (vpmaddubsw + vpmaddwd, 7-bit
  weights) and the VNNI / sdot kernel layouts with a plain loop nest where the instruction would be.

    TVM_NUM_THREADS=1 python benchmarks/tvm_tensorize.py --trials 32 --out benchmarks/results/tvm/tensorize.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np

TARGETS = {"x86_avx2": {"kind": "llvm", "mcpu": "znver3"}, "x86_avx512_vnni": {"kind": "llvm", "mcpu": "cascadelake"},
           "arm_cortex_a76": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                              "mattr": ["+neon", "+dotprod"]}}
TZ_ISA = {"x86_avx2": "avx2", "x86_avx512_vnni": "avx512_vnni", "arm_cortex_a76": "dotprod"}


def _model(layer, w):
    from tvm import relax

    bb = relax.BlockBuilder()
    shape = (1, 32, 16, 16) if layer == "conv" else (1, 64)
    x = relax.Var("x", relax.TensorType(shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = (relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1, 1, 1], out_dtype="int32") if layer == "conv"
                 else relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            o = bb.emit_output(bb.emit(y))
        bb.emit_func_output(o)
    return bb.get()


def _ref(layer, x, w):
    if layer == "dense":
        return x.astype(np.int64) @ w.astype(np.int64)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((1, 32, 16, 16), np.int64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 16, j:j + 16], w[:, :, i, j].astype(np.int64))
    return out


def _time_vm(ex, x, number, repeat):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    vm.set_input("main", tvm.runtime.tensor(x))
    ev = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=number, repeat=repeat)("main")
    return got, ev


def _stats(ev):
    r = [1e6 * v for v in ev.results]
    return {"median_us": round(float(np.median(r)), 2), "min_us": round(min(r), 2), "repeats": len(r)}


def main(argv=None):
    import tvm
    from tvm import relax

    from hago_py.backends.tvm import tensorize as tz
    from hago_py.backends.tvm.inspect import count_instructions, module_sources
    from hago_py.backends.tvm.tune import compile_module, tune_module

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials for the tuned default (0: skip)")
    ap.add_argument("--number", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    host = tvm.target.Target(TARGETS["x86_avx2"])
    res = {"host": platform.processor() or platform.machine(), "tvm": tvm.__version__, "layers": {}}
    for layer in ("conv", "dense"):
        w7 = rng.integers(-64, 64, (32, 32, 3, 3) if layer == "conv" else (64, 10)).astype(np.int8)
        x = rng.integers(-128, 128, (1, 32, 16, 16) if layer == "conv" else (1, 64)).astype(np.int8)
        ref = _ref(layer, x, w7)
        mod = _model(layer, w7)
        L = res["layers"][layer] = {"instructions": {}, "host": {}}
        for tname, tdict in TARGETS.items():
            t = tvm.target.Target(tdict)
            arch = "aarch64" if "aarch64" in tdict.get("mtriple", "") else "x86_64"
            with tvm.transform.PassContext(opt_level=3):
                ex = relax.build(mod, target=t)
            isa = tz.ISAS[TZ_ISA[tname]]
            new, _ = tz.tensorize_module(mod, isa)
            with tvm.transform.PassContext(opt_level=3):
                ext = relax.build(new, target=t)
            L["instructions"][tname] = {
                "default": {k: v for k, v in count_instructions(module_sources(ex)["asm"], arch).items() if v},
                "tensorized": {k: v for k, v in count_instructions(module_sources(ext)["asm"], arch).items() if v}}
        with tvm.transform.PassContext(opt_level=3):
            ex = relax.build(mod, target=host)
        got, ev = _time_vm(ex, x, a.number // 5 or 1, a.repeat)
        L["host"]["default untuned"] = {**_stats(ev), "exact": bool((got == ref).all())}
        if a.trials:
            with tempfile.TemporaryDirectory() as db:
                t0 = time.perf_counter()
                tune_module(mod, host, db, a.trials, progress=False, seed=0)
                ex = compile_module(mod, host, db)
                got, ev = _time_vm(ex, x, a.number, a.repeat)
                L["host"][f"default MetaSchedule-tuned ({a.trials} trials)"] = {
                    **_stats(ev), "exact": bool((got == ref).all()), "tune_s": round(time.perf_counter() - t0, 1),
                    "instructions": {k: v for k, v in count_instructions(module_sources(ex)["asm"], "x86_64").items()
                                     if v}}
        for label, isa, tens in (("tensorized avx2 (vpmaddubsw+vpmaddwd)", "avx2", True),
                                 ("avx512_vnni layout, plain loop for vpdpbusd", "avx512_vnni", False),
                                 ("dotprod layout, plain loop for sdot", "dotprod", False)):
            i = tz.ISAS[isa]
            k = (tz.conv2d_kernel(x.shape, "int8", w7, padding=(1, 1, 1, 1), isa=i, tensorize=tens) if layer == "conv"
                 else tz.matmul_kernel(1, "int8", w7, isa=i, tensorize=tens))
            fn = tvm.compile(tvm.IRModule({"main": k.func}), target=host).jit()
            dev = tvm.cpu()
            out = tvm.runtime.empty(k.out_shape, "int32", dev)
            args = [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(k.w_packed, dev), tvm.runtime.tensor(k.comp, dev), out]
            fn["main"](*args)
            ev = fn.time_evaluator("main", dev, number=a.number, repeat=a.repeat)(*args)
            L["host"][label] = {**_stats(ev), "exact": bool((out.numpy() == ref).all())}
        if layer == "conv":   # 8-bit weights: the AVX2 pair saturates (why tensorize_module guards it)
            w8 = rng.integers(-127, 128, w7.shape).astype(np.int8)
            k = tz.conv2d_kernel(x.shape, "int8", w8, padding=(1, 1, 1, 1), isa=tz.ISAS["avx2"])
            fn = tvm.compile(tvm.IRModule({"main": k.func}), target=host).jit()
            out = tvm.runtime.empty(k.out_shape, "int32", tvm.cpu())
            fn["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(k.w_packed), tvm.runtime.tensor(k.comp), out)
            diff = out.numpy() != _ref(layer, x, w8)
            L["host"]["tensorized avx2, 8-bit weights"] = {"exact": not diff.any(), "mismatches": int(diff.sum()),
                                                          "of": int(diff.size),
                                                          "avx2_exact_guard": tz.avx2_exact(w8.reshape(32, -1))}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
