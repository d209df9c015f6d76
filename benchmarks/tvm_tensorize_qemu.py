"""Run the tensorized Cortex-A76 (sdot) kernels of hago_py/backends/tvm/tensorize.py under qemu-aarch64 and check
them bit-exact against numpy (issue 13 item 2: the x86 host cannot execute sdot; qemu-user can).

The PrimFunc is compiled by TVM for aarch64 (+neon,+dotprod) to an object file, linked statically with a small C
harness (benchmarks/tvm_tensorize_harness.c: DLTensor arguments, serial stubs for TVMBackendParallelLaunch /
workspace) by aarch64-linux-gnu-gcc, and run with ``qemu-aarch64 -cpu max``. A second run with ``-cpu cortex-a53``
(no dotprod) must die with SIGILL, which shows the sdot instructions are really executed. qemu timings mean
nothing, so none are taken. Needs: apt-get install qemu-user gcc-aarch64-linux-gnu.

    python benchmarks/tvm_tensorize_qemu.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
A76 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}
DL = {"int8": (0, 8), "uint8": (1, 8), "int32": (0, 32)}


def tools_available() -> bool:
    return all(shutil.which(t) for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc"))


def ref_conv(x, w, pad, stride):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride],
                             w[:, :, i, j].astype(np.int64))
    return out


def build(kernel, workdir: str) -> dict:
    """Compile ``kernel.func`` for A76, link with the harness; {"exe", "sdot", "smull"} (counts in its assembly)."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": kernel.func}), target=tvm.target.Target(A76))
    asm = lib.mod.inspect_source("asm")
    obj, exe = os.path.join(workdir, "k.o"), os.path.join(workdir, "run_k")
    lib.mod.write_to_file(obj)
    inc = os.path.join(os.path.dirname(tvm.__file__), "..", "tvm_ffi", "include")
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-static", "-I", inc, os.path.join(HERE, "tvm_tensorize_harness.c"),
                    obj, "-o", exe], check=True, capture_output=True, text=True)
    return {"exe": exe, "sdot": len(re.findall(r"^\s*sdot\b", asm, re.M)),
            "smull": len(re.findall(r"^\s*smull2?\b", asm, re.M))}


def run(kernel, x: np.ndarray, workdir: str, cpu: str = "max"):
    """Execute the kernel on ``x`` under qemu; (int32 output or None, returncode, stderr)."""
    b = build(kernel, workdir)
    args = [("x.bin", x), ("w.bin", kernel.w_packed), ("c.bin", kernel.comp),
            ("out.bin", np.zeros(kernel.out_shape, np.int32))]
    lines = [str(len(args))]
    for name, a in args:
        a = np.ascontiguousarray(a)
        path = os.path.join(workdir, name)
        a.tofile(path)
        code, bits = DL[str(a.dtype)]
        lines.append(f"{a.ndim} {code} {bits} {path} " + " ".join(map(str, a.shape)))
    spec = os.path.join(workdir, "spec.txt")
    with open(spec, "w") as f:
        f.write("\n".join(lines) + "\n")
    p = subprocess.run(["qemu-aarch64", "-cpu", cpu, b["exe"], spec], capture_output=True, text=True, timeout=120)
    out = np.fromfile(os.path.join(workdir, "out.bin"), np.int32).reshape(kernel.out_shape) if p.returncode == 0 else None
    return out, p.returncode, p.stderr.strip(), b


def cases():
    rng = np.random.default_rng(0)
    for x_dtype in ("int8", "uint8"):
        lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
        w = rng.integers(-128, 128, (32, 32, 3, 3)).astype(np.int8)             # full 8-bit weights
        x = rng.integers(lo, hi, (1, 32, 16, 16)).astype(x_dtype)
        yield f"conv 3x3 32->32 16x16 pad1, x {x_dtype}", "conv", x, w, dict(padding=(1, 1, 1, 1)), ref_conv(x, w, 1, 1)
        w = rng.integers(-128, 128, (12, 3, 3, 3)).astype(np.int8)              # C=3, O=12 padded, stride 2
        x = rng.integers(lo, hi, (1, 3, 9, 9)).astype(x_dtype)
        yield (f"conv 3x3 3->12 9x9 pad1 stride2, x {x_dtype}", "conv", x, w,
               dict(padding=(1, 1, 1, 1), strides=(2, 2)), ref_conv(x, w, 1, 2))
        w = rng.integers(-128, 128, (64, 10)).astype(np.int8)
        x = rng.integers(lo, hi, (1, 64)).astype(x_dtype)
        yield f"dense 64->10, x {x_dtype}", "dense", x, w, {}, x.astype(np.int64) @ w.astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not tools_available():
        raise SystemExit("needs qemu-aarch64 and aarch64-linux-gnu-gcc (apt-get install qemu-user gcc-aarch64-linux-gnu)")
    from hago_py.backends.tvm import tensorize as tz

    isa = tz.ISAS["dotprod"]
    rows, res = [], []
    with tempfile.TemporaryDirectory() as d:
        for name, kind, x, w, kw, ref in cases():
            k = (tz.conv2d_kernel(x.shape, str(x.dtype), w, isa=isa, **kw) if kind == "conv"
                 else tz.matmul_kernel(x.shape[0], str(x.dtype), w, isa=isa))
            out, rc, err, b = run(k, x, d)
            exact = out is not None and np.array_equal(out.astype(np.int64), ref)
            _, rc53, err53, _ = run(k, x, d, cpu="cortex-a53")
            r = {"kernel": name, "sdot": b["sdot"], "smull": b["smull"], "qemu_rc": rc, "exact": bool(exact),
                 "mismatches": None if out is None else int((out.astype(np.int64) != ref).sum()),
                 "of": int(ref.size), "a53_rc": rc53, "a53_stderr": err53[-120:]}
            res.append(r)
            rows.append(f"| {name} | {b['sdot']} | {b['smull']} | {rc} | {'yes' if exact else 'NO'} "
                        f"({r['mismatches']}/{r['of']} differ) | {rc53} ({err53.splitlines()[-1] if err53 else ''}) |")
    print("| kernel | sdot | smull | qemu -cpu max rc | bit-exact vs numpy | qemu -cpu cortex-a53 rc |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": res, "qemu": subprocess.run(["qemu-aarch64", "--version"], capture_output=True,
                                                              text=True).stdout.splitlines()[0]}, f, indent=1)


if __name__ == "__main__":
    main()
