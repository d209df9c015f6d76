"""TVM 0.27's own tensor intrinsics (tvm.s_tir.tensor_intrin), unmodified, on an im2col'd ResNet-20 conv
(M=256 output pixels, K=288=3*3*32, N=32): u8 x s8 -> s32 with B packed [N/16, K/4, 16, 4] for the x86 16x4 ones,
s8 x s8 with B packed [N/4, K/4, 4, 4] for the ARM 4x4 ones. split / reorder / decompose_reduction / tensorize,
compile (llvm cascadelake / aarch64 cortex-a76 +dotprod), count the instruction. Shows which upstream intrinsics
work with 0.27's LLVM (hago_py/backends/tvm/tensorize.py registers its own copies). Importing tensor_intrin takes
60-140 s of CPU here.

    python benchmarks/tvm_tensorize_upstream.py
"""
import re
import time

import tvm
from tvm import te, s_tir
from tvm.target.codegen import llvm_version_major
M, K, N = 256, 288, 32
t0 = time.time()
from tvm.s_tir.tensor_intrin import arm_cpu, x86  # noqa: E402  (60-140 s: ~500 TVMScript intrinsics)
print(f"import tensor_intrin {time.time()-t0:.1f}s; llvm {llvm_version_major()}", flush=True)

def kernel(a_dtype, lanes):
    A = te.placeholder((M, K), a_dtype, "A")
    B = te.placeholder((N // lanes, K // 4, lanes, 4), "int8", "B")
    k = te.reduce_axis((0, K), "k")
    C = te.compute((M, N), lambda i, j: te.sum(A[i, k].astype("int32") *
                   B[j // lanes, k // 4, j % lanes, k % 4].astype("int32"), axis=k), name="C")
    return te.create_prim_func([A, B, C])

def sched(func, lanes, intrin):
    sch = s_tir.Schedule(func)
    b = sch.get_sblock("C")
    i, j, k = sch.get_loops(b)
    jo, ji = sch.split(j, [None, lanes]); ko, ki = sch.split(k, [None, 4])
    sch.reorder(i, jo, ko, ji, ki)
    sch.decompose_reduction(b, ko)
    sch.tensorize(ji, intrin)
    return sch.mod

T_VNNI = {"kind": "llvm", "mcpu": "cascadelake"}
T_A76 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}
cases = [("VNNI_DOT_16x4_INTRIN", x86.VNNI_DOT_16x4_INTRIN, "uint8", 16, T_VNNI, r"^\s*vpdpbusd\b"),
         ("AVX512_DOT_16x4_INTRIN", x86.AVX512_DOT_16x4_INTRIN, "uint8", 16, T_VNNI, r"^\s*vpmaddubsw\b"),
         ("ARM_DOT_4x4_i8_SDOT_INTRIN", arm_cpu.ARM_DOT_4x4_i8_SDOT_INTRIN, "int8", 4, T_A76, r"^\s*sdot\b"),
         ("ARM_DOT_4x4_i8_NEON_INTRIN", arm_cpu.ARM_DOT_4x4_i8_NEON_INTRIN, "int8", 4, T_A76, r"^\s*smull2?\b")]
for name, intrin, adt, lanes, tgt, pat in cases:
    try:
        mod = sched(kernel(adt, lanes), lanes, intrin)
        lib = tvm.compile(mod, target=tvm.target.Target(tgt))
        asm = lib.mod.inspect_source("asm")
        print(f"{name}: OK, {pat}: {len(re.findall(pat, asm, re.M))}", flush=True)
    except Exception as e:
        msg = str(e); m = re.search(r"(Call parameter type does not match.*?\n.*?\n)", msg, re.S)
        print(f"{name}: FAIL {type(e).__name__}: {(m.group(1) if m else msg[-600:]).strip()}", flush=True)
