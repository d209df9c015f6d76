"""Tensorized int8 kernels (hago_py/backends/tvm/tensorize.py): compile only, no tuning, each test a few s."""
from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from hago_py.backends.tvm import tensorize as tz  # noqa: E402
from models import conv_int  # noqa: E402
from hago_py.backends.tvm.inspect import count_instructions, module_sources  # noqa: E402

TARGETS = {
    "avx512_vnni": {"kind": "llvm", "mcpu": "cascadelake"},
    "avx_vnni": {"kind": "llvm", "mcpu": "alderlake"},
    "avx2": {"kind": "llvm", "mcpu": "haswell"},
    "dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]},
}
rng = np.random.default_rng(0)
W_CONV = rng.integers(-64, 64, (32, 32, 3, 3)).astype(np.int8)    # 7-bit: AVX2 pairs cannot saturate
W_DENSE = rng.integers(-64, 64, (64, 10)).astype(np.int8)


def _vm_outputs(mod, *args, target=None):
    """Every output of a Relax module built for ``target`` (default: the AVX2 host) and run on ``args``."""
    from tvm import relax

    with tvm.transform.PassContext(opt_level=3):
        ex = relax.build(mod, target=tvm.target.Target(target or TARGETS["avx2"]))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in args))
    return [out.numpy()] if hasattr(out, "numpy") else [t.numpy() for t in out]


def _vm_run(mod, *args, target=None):
    return _vm_outputs(mod, *args, target=target)[0]


def _instruction_count(mod, isa: str) -> int:
    """How often the ISA's dot-product instruction occurs in ``mod`` built for that ISA's target."""
    from tvm import relax

    with tvm.transform.PassContext(opt_level=3):
        ex = relax.build(mod, target=tvm.target.Target(TARGETS[isa]))
    return count_instructions(module_sources(ex)["asm"], tz.ISAS[isa].arch)[tz.ISAS[isa].instruction]


def _asm(func, target):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))
    return lib.mod.inspect_source("asm")


def _ref_conv(x, w, pad, stride=1):
    return conv_int(x, w, 0, (pad,) * 4, (stride, stride), 1)


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx_vnni", "avx2", "dotprod"])
def test_kernels_emit_the_dot_product_instruction(isa):
    i = tz.ISAS[isa]
    conv = tz.conv2d_kernel((1, 32, 16, 16), "int8", W_CONV, padding=(1, 1, 1, 1), isa=i)
    dense = tz.matmul_kernel(1, "uint8", W_DENSE, isa=i)
    for k in (conv, dense):
        counts = count_instructions(_asm(k.func, TARGETS[isa]), i.arch)
        assert counts[i.instruction] > 0, counts
        if i.arch == "aarch64":
            assert counts["smull"] == 0 and counts["smlal"] == 0
    if isa == "avx512_vnni":
        assert "zmm" in _asm(conv.func, TARGETS[isa])


def _run(k, x, target="llvm"):
    dev = tvm.cpu()
    lib = tvm.compile(tvm.IRModule({"main": k.func}), target=target).jit()
    out = tvm.runtime.empty(k.out_shape, "int32", dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(k.w_packed, dev), tvm.runtime.tensor(k.comp, dev), out)
    return out.numpy()


@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("isa", ["avx512_vnni", "dotprod"])
def test_packing_shift_and_compensation_exact(isa, x_dtype):
    """The VNNI / sdot kernels' layout, +-128 activation shift and weight-sum compensation, run here with a plain
    loop nest in place of the instruction (this host cannot execute it): bit-exact."""
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    w = rng.integers(-127, 128, (12, 3, 3, 3)).astype(np.int8)        # C=3, O=12: both padded
    x = rng.integers(lo, hi, (1, 3, 9, 9)).astype(x_dtype)
    k = tz.conv2d_kernel(x.shape, x_dtype, w, strides=(2, 2), padding=(1, 1, 1, 1), isa=tz.ISAS[isa],
                         tensorize=False)
    assert k.shift == tz.shift_for(x_dtype, tz.ISAS[isa])
    np.testing.assert_array_equal(_run(k, x), _ref_conv(x, w, 1, 2))
    wd = rng.integers(-127, 128, (30, 10)).astype(np.int8)
    xd = rng.integers(lo, hi, (3, 30)).astype(x_dtype)
    k = tz.matmul_kernel(3, x_dtype, wd, isa=tz.ISAS[isa], tensorize=False)
    np.testing.assert_array_equal(_run(k, xd), xd.astype(np.int64) @ wd.astype(np.int64))


def _host_has(flag):
    from hago_py.hw.host import read_host

    return flag in set(read_host().flags)


@pytest.mark.skipif(not _host_has("avx2"), reason="the AVX2 kernel runs only on an AVX2 host")
@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
def test_avx2_tensorized_kernel_exact_on_host(x_dtype):
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    x = rng.integers(lo, hi, (1, 32, 16, 16)).astype(x_dtype)
    k = tz.conv2d_kernel(x.shape, x_dtype, W_CONV, padding=(1, 1, 1, 1), isa=tz.ISAS["avx2"])
    np.testing.assert_array_equal(_run(k, x, {"kind": "llvm", "mcpu": "haswell"}), _ref_conv(x, W_CONV, 1))
    xd = rng.integers(lo, hi, (2, 64)).astype(x_dtype)
    k = tz.matmul_kernel(2, x_dtype, W_DENSE, isa=tz.ISAS["avx2"])
    np.testing.assert_array_equal(_run(k, xd, {"kind": "llvm", "mcpu": "haswell"}), xd.astype(np.int64) @ W_DENSE.astype(np.int64))


def test_avx2_guard_and_isa_choice():
    assert tz.avx2_exact(W_CONV.reshape(32, -1))
    assert not tz.avx2_exact(np.full((1, 4), 127, np.int8))       # 255 * 254 > 32767
    assert tz.isa_for(["avx512f", "avx512_vnni"]).name == "avx512_vnni"
    assert tz.isa_for(["armv8.2-a", "neon", "dotprod"]).instruction == "sdot"
    assert tz.isa_for(["avx2", "fma"]) is None and tz.isa_for(["avx2"], include_avx2=True).name == "avx2"


def _relax_module(w_conv, x_dtype="int8"):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 16, 16), x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_conv), padding=[1, 1, 1, 1], out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(np.arange(32, dtype=np.int32).reshape(1, 32, 1, 1))))
            z = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(y, relax.const(np.int32(9))), -128, 127),
                                        "int8"))
            z = bb.emit(relax.op.reshape(relax.op.strided_slice(z, [2, 3], [0, 0], [2, 2]), (1, 128)))
            d = bb.emit(relax.op.matmul(z, relax.const(np.resize(W_DENSE, (128, 10))), out_dtype="int32"))
            o = bb.emit_output((y, d))
        bb.emit_func_output(o)
    return bb.get()


def test_tensorize_module_vnni_and_sdot_builds():
    mod = _relax_module(W_CONV)
    for isa in ("avx512_vnni", "dotprod"):
        new, recs = tz.tensorize_module(mod, tz.ISAS[isa])
        assert [r["status"] for r in recs] == ["tensorized", "tensorized"], recs
        assert _instruction_count(new, isa) > 0


@pytest.mark.skipif(not _host_has("avx2"), reason="runs the AVX2 kernels")
def test_tensorize_module_exact_on_host_and_guarded():
    run = _vm_outputs

    mod = _relax_module(W_CONV)
    x = rng.integers(-128, 128, (1, 32, 16, 16)).astype(np.int8)
    new, recs = tz.tensorize_module(mod, tz.ISAS["avx2"])
    assert all(r["status"] == "tensorized" for r in recs)
    for a, b in zip(run(mod, x), run(new, x)):
        np.testing.assert_array_equal(a, b)
    wide = rng.integers(-127, 128, (32, 32, 3, 3)).astype(np.int8)   # 8-bit weights: could saturate -> default
    _, recs = tz.tensorize_module(_relax_module(wide), tz.ISAS["avx2"])
    assert recs[0]["status"] == "default" and "saturate" in recs[0]["why"]


def test_build_cortex_a76_uses_sdot(tmp_path, monkeypatch):
    """`hago build` for the A76 spec (dotprod) with a static batch: every int8 kernel tensorized with sdot,
    reported per kernel; without a static batch the report says why not."""
    from models import calib, small_cnn

    from hago_py import build as build_mod

    monkeypatch.setattr(build_mod, "find_cross_compiler", lambda name=build_mod.AARCH64_CC: None)
    m = build_mod.build(small_cnn(), "arm_cortex_a76", calibration=calib(), out=tmp_path, batch=1)
    tzr = m["tensorize"]
    assert tzr["isa"] == "dotprod" and tzr["kernels"] and all(r["status"] == "tensorized" for r in tzr["kernels"])
    assert m["instructions"]["sdot"] > 0 and m["instructions"]["smull"] == 0
    report = (tmp_path / "arm_cortex_a76" / "build_report.md").read_text()
    assert "Tensorized int8 kernels (dotprod)" in report and "(sdot)" in report
    assert any(v.startswith("hand-scheduled") for v in m["tuning"]["kernels"].values())
    m = build_mod.build(small_cnn(), "arm_cortex_a76", calibration=calib(), out=tmp_path)
    assert all("dynamic input shape" in r["why"] for r in m["tensorize"]["kernels"])


def test_cli_build_tensorize_flag(tmp_path, capsys, monkeypatch):
    """`hago build --tensorize`: auto tensorizes the A76 build (sdot) and says how many kernels; off keeps TVM's
    default schedules (smull / smlal); without --batch it prints why nothing was tensorized."""
    import onnx

    from models import calib, small_cnn

    from hago_py import build as build_mod
    from hago_py.cli import main

    monkeypatch.setattr(build_mod, "find_cross_compiler", lambda name=build_mod.AARCH64_CC: None)
    np.savez(tmp_path / "c.npz", **calib())
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    base = ["build", str(tmp_path / "m.onnx"), "--target", "arm_cortex_a76", "--calib", str(tmp_path / "c.npz"),
            "--batch", "1", "-q"]
    assert main(base + ["--out", str(tmp_path / "on")]) == 0
    out = capsys.readouterr().out
    n = len(json.loads((tmp_path / "on" / "arm_cortex_a76" / "manifest.json").read_text())["tensorize"]["kernels"])
    assert n > 0 and f"{n} tensorized" in out and "sdot" in out, out
    assert main(base + ["--out", str(tmp_path / "off"), "--tensorize", "off"]) == 0
    out = capsys.readouterr().out
    man = json.loads((tmp_path / "off" / "arm_cortex_a76" / "manifest.json").read_text())
    on = json.loads((tmp_path / "on" / "arm_cortex_a76" / "manifest.json").read_text())["instructions"]
    assert "0 tensorized" in out and man["tensorize"]["why"] == "off", out
    # LLVM's own vectorizer emits a few sdot in the default schedules; the tensorized build is made of them
    assert man["instructions"]["smlal"] > 0 and on["smlal"] == 0 and on["sdot"] > 5 * man["instructions"]["sdot"]
    assert main(base[:-3] + ["-q", "--out", str(tmp_path / "dyn")]) == 0   # no --batch: why not, printed
    assert "dynamic input shape" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ depthwise
@pytest.mark.parametrize("geo", [(3, 1, 1), (5, 2, 2)], ids=["3x3s1p1", "5x5s2p2"])
@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("isa", ["avx2", "avx512_vnni", "dotprod"])
def test_depthwise_kernel_exact(isa, x_dtype, geo):
    """Both depthwise layouts, 13 channels (no multiple of 4 / 8 / 16 lanes), full 8-bit weights, bit-exact
    against conv_int. The kernels use no ISA-specific instruction, so the VNNI / sdot variants (16 / 4 lanes) run
    here as compiled for the host; the AVX2 one for haswell."""
    k, s, p = geo
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    w = rng.integers(-128, 128, (13, 1, k, k)).astype(np.int8)
    x = rng.integers(lo, hi, (1, 13, 11, 10)).astype(x_dtype)
    ref = conv_int(x, w, 0, (p,) * 4, (s, s), 13)
    target = TARGETS["avx2"] if isa == "avx2" else "llvm"
    for layout in ("nchwc", "nchw", "auto"):
        kern = tz.depthwise_conv2d_kernel(x.shape, x_dtype, w, strides=(s, s), padding=(p,) * 4, isa=tz.ISAS[isa],
                                          layout=layout, tensorize=False)
        assert kern.shift == 0 and not kern.comp.any() and kern.out_shape == ref.shape
        np.testing.assert_array_equal(_run(kern, x, target), ref, err_msg=layout)


def _dw_module(w_dw, x_dtype="uint8", c=13, stride=1, pad=1):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, 12, 12), x_dtype))
    w_g = np.resize(W_CONV, (c, c // 2, 3, 3)) if c % 2 == 0 else None
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_dw), strides=[stride] * 2, padding=[pad] * 4, groups=c,
                                           out_dtype="int32"))
            outs = [y]
            if w_g is not None:   # a grouped, not depthwise conv: stays on the default schedule
                outs.append(bb.emit(relax.op.nn.conv2d(x, relax.const(w_g), padding=[1] * 4, groups=2,
                                                       out_dtype="int32")))
            o = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(o)
    return bb.get()


def test_tensorize_module_depthwise_vnni_and_sdot_builds():
    """Depthwise convs are rewritten (not left on the default path) for every ISA and compile for cascadelake /
    the A76; their record says the truth: a vectorized multiply-add, no dot-product instruction. A grouped conv
    that is not depthwise keeps the default schedule and says why."""
    from tvm import relax

    w = rng.integers(-128, 128, (12, 1, 3, 3)).astype(np.int8)
    mod = _dw_module(w, c=12)
    for isa in ("avx512_vnni", "dotprod"):
        new, recs = tz.tensorize_module(mod, tz.ISAS[isa])
        dw, grouped = recs
        assert dw["status"] == "tensorized" and dw["depthwise"] and "depthwise" in dw["kernel"], recs
        assert dw["dot_product"] is False and dw["instruction"] == tz.DEPTHWISE_INSTRUCTION
        assert tz.ISAS[isa].instruction not in dw["instruction"]
        assert grouped["status"] == "default" and "groups 2" in grouped["why"] and "depthwise" in grouped["why"]
        with tvm.transform.PassContext(opt_level=3):
            relax.build(new, target=tvm.target.Target(TARGETS[isa]))


@pytest.mark.skipif(not _host_has("avx2"), reason="runs the AVX2 kernels")
@pytest.mark.parametrize("x_dtype,stride,pad", [("uint8", 1, 1), ("int8", 2, 2)])
def test_tensorize_module_depthwise_exact_on_host(x_dtype, stride, pad):
    """avx2 build of a depthwise conv with full 8-bit weights (no avx2_exact guard: no vpmaddubsw): tensorized and
    identical to the default build and to conv_int."""
    k = 2 * pad + 1
    w = rng.integers(-128, 128, (13, 1, k, k)).astype(np.int8)
    mod = _dw_module(w, x_dtype, stride=stride, pad=pad)
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    x = rng.integers(lo, hi, (1, 13, 12, 12)).astype(x_dtype)
    new, recs = tz.tensorize_module(mod, tz.ISAS["avx2"])
    assert [r["status"] for r in recs] == ["tensorized"] and recs[0]["depthwise"], recs

    got = _vm_run(new, x)
    np.testing.assert_array_equal(got, conv_int(x, w, 0, (pad,) * 4, (stride, stride), 13))
    np.testing.assert_array_equal(got, _vm_run(mod, x))


def _dw_cnn():
    """input [N,3,8,8] -> Conv 3->8 + Relu -> depthwise 3x3 Conv (group 8) + Relu -> GlobalAveragePool -> Gemm."""
    from onnx import helper, numpy_helper

    from models import checked_model

    r = np.random.default_rng(3)
    arrs = {"w1": r.normal(0, 0.3, (8, 3, 3, 3)), "b1": r.normal(0, 0.1, 8), "wd": r.normal(0, 0.3, (8, 1, 3, 3)),
            "bd": r.normal(0, 0.1, 8), "wf": r.normal(0, 0.3, (4, 8)), "bf": r.normal(0, 0.1, 4)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrs.items()]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1)]
    return checked_model(nodes, inits, "dw_cnn", ["N", 3, 8, 8], ["N", 4])


def test_build_reports_depthwise_as_vectorized(tmp_path, monkeypatch):
    """`hago build` (A76, batch 1) of a model with a depthwise conv: the depthwise kernel is hand-scheduled (not
    the default path) and reported as a vectorized multiply-add, never as an sdot kernel."""
    from models import calib

    from hago_py import build as build_mod

    monkeypatch.setattr(build_mod, "find_cross_compiler", lambda name=build_mod.AARCH64_CC: None)
    m = build_mod.build(_dw_cnn(), "arm_cortex_a76", calibration=calib(), out=tmp_path, batch=1)
    recs = m["tensorize"]["kernels"]
    dw = [r for r in recs if r.get("depthwise")]
    assert len(dw) == 1 and dw[0]["status"] == "tensorized" and dw[0]["dot_product"] is False, recs
    assert all(r["status"] == "tensorized" for r in recs) and len(recs) == 3, recs
    assert "1 depthwise" in m["tensorize"]["why"] and m["tensorize"]["why"].startswith("2 of 3"), m["tensorize"]
    assert m["tuning"]["kernels"][dw[0]["kernel"]].startswith("hand-scheduled, vectorized"), m["tuning"]["kernels"]
    report = (tmp_path / "arm_cortex_a76" / "build_report.md").read_text()
    assert f"`{dw[0]['kernel']}` ({tz.DEPTHWISE_INSTRUCTION})" in report


@pytest.mark.skipif(not _host_has("avx2"), reason="runs the AVX2 kernels")
@pytest.mark.parametrize("x_dtype", ["int8", "uint8"])
def test_batched_3d_matmul_tensorized_exact(x_dtype):
    """A transformer-shaped [B, S, K] x [K, N] int8 matmul (MiniLM's MatMulInteger) is tensorized with the
    leading dimensions folded into M and reshaped back; on the host (AVX2 kernel, 7-bit weights) the result is
    exactly numpy's; for vnni / sdot the rewrite is recorded as tensorized."""
    from tvm import relax

    w = rng.integers(-63, 64, (48, 20)).astype(np.int8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 7, 48), x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32")))
        bb.emit_func_output(o)
    mod = bb.get()
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    xv = rng.integers(lo, hi, (2, 7, 48)).astype(x_dtype)
    new, recs = tz.tensorize_module(mod, tz.ISAS["avx2"])
    assert [r["status"] for r in recs] == ["tensorized"], recs
    np.testing.assert_array_equal(_vm_run(new, xv), xv.astype(np.int64) @ w.astype(np.int64))
    for isa in ("avx512_vnni", "dotprod"):
        assert [r["status"] for r in tz.tensorize_module(mod, tz.ISAS[isa])[1]] == ["tensorized"]


# ------------------------------------------------------------------------------------------------ dynamic zero point
def _dynamic_mm_module(w, zw, fold=False, shape=(1, 7, 48)):
    """TVM's import of ONNX MatMulInteger with a runtime activation zero point (DynamicQuantizeLinear's):
    matmul(astype(xq) - astype(zx), astype(W) - expand_dims(astype(zw))); ``fold``: FoldConstant on the weight side."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "uint8"))
    z = relax.Var("z", relax.TensorType((), "uint8"))
    with bb.function("main", [x, z]):
        with bb.dataflow():
            d = bb.emit(relax.op.subtract(bb.emit(relax.op.astype(x, "int32")), bb.emit(relax.op.astype(z, "int32"))))
            w1 = bb.emit(relax.op.astype(relax.const(w), "int32"))
            z1 = bb.emit(relax.op.expand_dims(bb.emit(relax.op.astype(relax.const(zw), "int32")), axis=[0]))
            o = bb.emit_output(bb.emit(relax.op.matmul(d, bb.emit(relax.op.subtract(w1, z1)), out_dtype="int32")))
        bb.emit_func_output(o)
    mod = bb.get()
    return relax.transform.FoldConstant()(mod) if fold else mod


W_DYN = rng.integers(-63, 64, (48, 20)).astype(np.int8)   # 7-bit: the AVX2 kernel is exact


@pytest.mark.skipif(not _host_has("avx2"), reason="runs the AVX2 kernels")
@pytest.mark.parametrize("zw_kind,fold", [("zero", False), ("zero", True), ("wide", False)])
def test_dynamic_zero_point_matmul_exact_on_host(zw_kind, fold):
    """MatMulInteger with a runtime activation zero point: tensorized as kernel(xq, W) - zx * colsum(W) (plus
    - rowsum(x - zx) * zw for a weight zero point that takes W - zw out of int8), folded or not, and exactly the
    original module for zero points 0, 3, 128, 255."""
    zw = np.zeros(20, np.int8) if zw_kind == "zero" else np.full(20, -100, np.int8)   # W - zw up to 163
    mod = _dynamic_mm_module(W_DYN, zw, fold)
    new, recs = tz.tensorize_module(mod, tz.ISAS["avx2"])
    assert [r["status"] for r in recs] == ["tensorized"], recs
    assert recs[0]["dynamic_zero_point"] and "dynamic zero point corrected" in recs[0]["note"], recs
    assert recs[0]["instruction"] == "vpmaddubsw" and recs[0]["weight_zero_point"] == (zw_kind == "wide")
    x = rng.integers(0, 256, (1, 7, 48)).astype(np.uint8)
    ref = None
    for z in (0, 3, 128, 255):
        zz = np.array(z, np.uint8)
        ref = (x.astype(np.int64) - z) @ (W_DYN.astype(np.int64) - zw.astype(np.int64))
        got = _vm_run(new, x, zz)
        np.testing.assert_array_equal(got, ref, err_msg=f"zx={z}")
        np.testing.assert_array_equal(got, _vm_run(mod, x, zz), err_msg=f"zx={z}")


def test_dynamic_zero_point_matmul_guards():
    """Folded W - zw outside int8 has no int8 decomposition left: default, with the reason; 8-bit W - zw on
    AVX2: default (could saturate); a runtime zero point that varies along K is not this form (left alone)."""
    from tvm import relax

    _, recs = tz.tensorize_module(_dynamic_mm_module(W_DYN, np.full(20, -100, np.int8), True), tz.ISAS["avx2"])
    assert recs[0]["status"] == "default" and "does not fit int8" in recs[0]["why"], recs
    _, recs = tz.tensorize_module(_dynamic_mm_module(W_DYN, np.full(20, -60, np.int8), True), tz.ISAS["avx2"])
    assert recs[0]["status"] == "default" and "saturate" in recs[0]["why"], recs
    _, recs = tz.tensorize_module(_dynamic_mm_module(W_DYN, np.full(20, -60, np.int8), True),
                                  tz.ISAS["avx512_vnni"])
    assert recs[0]["status"] == "tensorized", recs
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 48), "uint8"))
    z = relax.Var("z", relax.TensorType((48,), "int32"))
    with bb.function("main", [x, z]):
        with bb.dataflow():
            d = bb.emit(relax.op.subtract(bb.emit(relax.op.astype(x, "int32")), z))
            o = bb.emit_output(bb.emit(relax.op.matmul(d, relax.const(W_DYN.astype(np.int32)), out_dtype="int32")))
        bb.emit_func_output(o)
    _, recs = tz.tensorize_module(bb.get(), tz.ISAS["avx2"])
    assert all(r["status"] == "default" for r in recs), recs


@pytest.mark.parametrize("isa", ["avx512_vnni", "dotprod"])
def test_dynamic_zero_point_matmul_vnni_and_sdot_builds(isa):
    new, recs = tz.tensorize_module(_dynamic_mm_module(W_DYN, np.zeros(20, np.int8)), tz.ISAS[isa])
    assert [r["status"] for r in recs] == ["tensorized"] and "dynamic zero point" in recs[0]["note"], recs
    assert _instruction_count(new, isa) > 0


@pytest.mark.skipif(not _host_has("avx2"), reason="runs the AVX2 kernels")
def test_dynamic_matmulinteger_onnx_tensorized_end_to_end():
    """ONNX DynamicQuantizeLinear + MatMulInteger (hago's dynamic-activation form, MiniLM's) imported with static
    shapes and integerized: its matmul is tensorized (runtime zero point corrected) and the build's output is
    identical to the untensorized build's, for inputs whose zero point is 0, 255 and in between."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hago_py.backends.tvm.importer import import_qdq, static_shapes
    from hago_py.backends.tvm.integerize import integerize

    inits = [numpy_helper.from_array(W_DYN, "w"), numpy_helper.from_array(np.zeros(20, np.int8), "wz"),
             numpy_helper.from_array(np.float32(0.02), "ws")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["y"])]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 48])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 20])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    mod, _ = integerize(import_qdq(static_shapes(m, 1)))
    new, recs = tz.tensorize_module(mod, tz.ISAS["avx2"])
    assert [r["status"] for r in recs] == ["tensorized"] and recs[0]["dynamic_zero_point"], recs
    r = np.random.default_rng(5)
    for x in (r.normal(size=(1, 7, 48)), r.uniform(0, 3, (1, 7, 48)), r.uniform(-3, 0, (1, 7, 48))):
        x = x.astype(np.float32)
        np.testing.assert_array_equal(_vm_run(new, x), _vm_run(mod, x))
