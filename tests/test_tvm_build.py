"""TVM builds per target (hago_py/build.py, backends/tvm/targets.py, inspect.py): no tuning here."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from models import calib, run, small_cnn

tvm = pytest.importorskip("tvm")

from hago_py import build as build_mod  # noqa: E402
from hago_py.backends.tvm import inspect as insp  # noqa: E402
from hago_py.backends.tvm.targets import expected_instructions, host_target, missing_features, resolve_target  # noqa: E402
from hago_py.errors import OptionError  # noqa: E402

INTEL_AVX2 = ("model name\t: Intel(R) Core(TM) i7-4770\nflags\t\t: fpu sse sse2 pni ssse3 fma cx16 sse4_1 sse4_2 "
              "movbe popcnt aes xsave avx f16c rdrand abm bmi1 avx2 bmi2 pclmulqdq\n")
SPR = ("model name\t: Intel(R) Xeon(R) Platinum 8480\nflags\t\t: sse sse2 pni ssse3 fma sse4_1 sse4_2 movbe popcnt aes "
       "avx f16c abm bmi1 avx2 bmi2 adx sha_ni pclmulqdq avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma "
       "avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq avx_vnni "
       "avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 serialize\n")


def _real_flags():
    from hago_py.hw.host import read_host

    return set(read_host().flags)


def test_host_target_never_exceeds_host_flags():
    tdict, isa, why = host_target()
    mcpu = tdict.get("mcpu")
    if mcpu:
        assert missing_features(mcpu, _real_flags()) == [], why
    assert "mcpu" in why or "LLVM defaults" in why or "aarch64" in why


def test_host_intel_avx2_is_not_znver3():
    tdict, isa, why = host_target(INTEL_AVX2, "x86_64")
    assert tdict["mcpu"] not in ("znver3", "znver2", "znver4"), why   # znver* needs AMD's sse4a
    assert "sse4a" in (missing_features("znver3", resolve_flags(INTEL_AVX2)) or [])
    assert tdict["mcpu"] == "haswell" and "avx2" in isa


def resolve_flags(cpuinfo):
    from hago_py.hw.host import read_host

    return set(read_host(cpuinfo, "x86_64").flags)


def test_host_sapphire_rapids_and_aarch64():
    tdict, isa, why = host_target(SPR, "x86_64")
    assert tdict["mcpu"] == "sapphirerapids" and "amx_int8" in isa
    tdict, isa, _ = host_target("Features\t: fp asimd asimddp\n", "aarch64")
    assert tdict["mtriple"].startswith("aarch64") and "+dotprod" in tdict["mattr"] and "dotprod" in isa


def test_spec_targets():
    a76 = resolve_target("arm_cortex_a76")
    assert a76.target["mtriple"] == "aarch64-linux-gnu" and a76.target["mcpu"] == "cortex-a76"
    assert a76.arch == "aarch64" and set(a76.expected()) == {"sdot", "udot"}
    t4 = resolve_target("cuda_t4")
    assert t4.target == {"kind": "cuda", "arch": "sm_75"} and t4.arch == "cuda" and "dp4a" in t4.expected()
    assert t4.tvm().host is not None
    assert expected_instructions(["avx512_vnni"]) == {"vpdpbusd": "avx512_vnni"}
    assert expected_instructions(["avx2", "fma"]) == {"vpmaddubsw": "avx2"}


def test_count_instructions_on_snippets():
    x86 = "\tvpdpbusd\t%zmm1, %zmm2, %zmm3\n\t{vex} vpdpbusd %ymm1, %ymm2, %ymm3\n\tvpmaddubsw %ymm0, %ymm1, %ymm2\n" \
          "\tvpmaddwd %ymm0, %ymm1, %ymm2\n\ttdpbusd %tmm1, %tmm2, %tmm0\n\tvmovups %zmm0, (%rax)\n# vpdpbusd in a comment"
    assert insp.count_instructions(x86, "x86_64") == {"vpdpbusd": 2, "vpdpbusds": 0, "vpmaddubsw": 1,
                                                      "vpmaddwd": 1, "tdpbusd": 1}
    arm = "\tsdot\tv0.4s, v1.16b, v2.16b\n\tudot\tv0.4s, v1.16b, v2.16b\n\tsmull2\tv3.8h, v1.16b, v2.16b\n" \
          "\tsmlal\tv3.8h, v1.8b, v2.8b\n\tfmla\tv0.4s, v1.4s, v2.4s\n"
    c = insp.count_instructions(arm, "aarch64")
    assert (c["sdot"], c["udot"], c["smull"], c["smlal"]) == (1, 1, 1, 1)
    cu = "dp4a.s32.s32 %r1, %r2, %r3, %r4;\n x = __dp4a(a, b, c);\n"
    assert insp.count_instructions(cu, "cuda")["dp4a"] == 2
    f = insp.findings({"vpdpbusd": 0}, {"vpdpbusd": "avx512_vnni"})
    assert f == ["spec says avx512_vnni, generated code has 0 vpdpbusd: the default schedules did not tensorize "
                 "(untuned build)"]
    assert "has 3 sdot" in insp.findings({"sdot": 3, "udot": 0}, expected_instructions(["dotprod"]))[0]


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("b")
    return build_mod.build(small_cnn(), "host", calibration=calib(), out=out), out


def _hash(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_host_build_files_hashes_and_load(host_build):
    import onnx
    from tvm import relax

    m, out = host_build
    d = out / "host"
    for f in ("model.so", "model.s", "plan.json", "report.json", "model_qdq.onnx", "manifest.json",
              "build_report.md"):
        assert (d / f).is_file(), f
    man = json.loads((d / "manifest.json").read_text())
    assert man["files"].keys() == {"model.so", "model.s", "plan.json", "report.json", "model_qdq.onnx",
                                   "build_report.md"}
    # every layer the plan quantizes runs as an integer op, and the report lists each one
    c = man["integerize"]["counts"]
    assert c["rewritten"] >= 3 and c["left_float"] == 0 and c.get("conv2d", 0) >= 2, c
    rep = (d / "build_report.md").read_text()
    assert rep.count("| integer |") == c["rewritten"] and "untuned" in rep and "int8 instructions" in rep
    for f, meta in man["files"].items():
        assert meta["sha256"] == _hash(d / f) and meta["bytes"] == (d / f).stat().st_size
    assert man["versions"]["tvm"] == tvm.__version__ and man["versions"]["apache_tvm_ffi"]
    assert man["tvm_target"]["kind"] == "llvm" and man["toolchain"]["name"]
    assert man["tuning"]["kernels"] and set(man["tuning"]["kernels"].values()) == {"untuned"}
    assert set(man["instructions"]) >= {"vpdpbusd", "vpmaddubsw"} and man["findings"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temp folder left behind
    # standard loading, inputs in ONNX order, compared with ORT within one output quantization step
    qdq = onnx.load(str(d / "model_qdq.onnx"))
    x = calib(seed=7, n=4)["input"]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(d / "model.so")), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    from models import run

    # ORT's reference semantics (QDQ as float ops): ORT's fused u8 x s8 kernels saturate int16 pairs on AVX2
    # hosts without VNNI, so "all" is not the reference there
    ref = run(qdq, {"input": x}, optimization="basic")[0]
    step = build_mod.output_steps(qdq)[0]
    assert step and got.shape == ref.shape and np.max(np.abs(got - ref)) <= step + 1e-6
    assert m["check"]["max_abs_diff_vs_ort_reference"][0] <= step


def test_prequantized_build_with_plan(host_build, tmp_path):
    _, out = host_build
    d = out / "host"
    m = build_mod.build(str(d / "model_qdq.onnx"), "host", plan=str(d / "plan.json"), out=tmp_path, check=False)
    assert (tmp_path / "host" / "plan.json").read_text() == (d / "plan.json").read_text()
    assert "report.json" not in m["files"]
    with pytest.raises(OptionError, match="calibration"):
        build_mod.build(small_cnn(), "host", out=tmp_path)
    with pytest.raises(OptionError, match="tune database"):
        build_mod.build(small_cnn(), "host", calibration=calib(), out=tmp_path, tune_db=tmp_path / "nodb")


def test_arm_build_without_cross_compiler(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "find_cross_compiler", lambda name=build_mod.AARCH64_CC: None)
    m = build_mod.build(small_cnn(), "arm_cortex_a76", calibration=calib(), out=tmp_path)
    d = tmp_path / "arm_cortex_a76"
    assert not (d / "model.so").exists()
    assert (d / "model.o").read_bytes()[18:20] == (183).to_bytes(2, "little")   # ELF EM_AARCH64
    assert (d / "model.tar").is_file() and "\tret" in (d / "model.s").read_text()
    assert "no aarch64-linux-gnu-gcc" in m["library"]["note"] and m["toolchain"]["name"] is None
    assert set(m["instructions"]) >= {"sdot", "udot"}


def test_arm_build_with_cross_compiler_if_present(tmp_path):
    if build_mod.find_cross_compiler() is None:   # CI: the fallback above is what runs there
        m = build_mod.build(small_cnn(), "arm_cortex_a76", calibration=calib(), out=tmp_path)
        assert m["library"]["file"] == "model.tar"
        return
    m = build_mod.build(small_cnn(), "arm_cortex_a76", calibration=calib(), out=tmp_path)
    so = tmp_path / "arm_cortex_a76" / "model.so"
    assert so.read_bytes()[18:20] == (183).to_bytes(2, "little") and m["toolchain"]["version"]


def test_cuda_build_writes_source(tmp_path):
    m = build_mod.build(small_cnn(), "cuda_t4", calibration=calib(), out=tmp_path)
    d = tmp_path / "cuda_t4"
    assert "__global__" in (d / "model.cu").read_text() and (d / "model.so").is_file()
    if build_mod.find_nvcc():
        assert ".target sm_75" in (d / "model.ptx").read_text()
        assert (d / "model.cubin").read_bytes()[18:20] == (190).to_bytes(2, "little")   # ELF EM_CUDA
    else:   # the fallback: source only, explained
        assert not (d / "model.cubin").exists() and "no nvcc" in m["library"]["note"]
    assert "dp4a" in m["instructions"]


def test_cuda_build_without_nvcc(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "find_nvcc", lambda: None)
    m = build_mod.build(small_cnn(), "cuda_t4", calibration=calib(), out=tmp_path)
    assert not (tmp_path / "cuda_t4" / "model.cubin").exists() and "no nvcc" in m["library"]["note"]


def test_cli_build(tmp_path, capsys):
    from hago_py.cli import main

    np.savez(tmp_path / "c.npz", **calib())
    import onnx

    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    rc = main(["build", str(tmp_path / "m.onnx"), "--target", "host", "--calib", str(tmp_path / "c.npz"),
               "--out", str(tmp_path / "b"), "-q"])
    assert rc == 0 and (tmp_path / "b" / "host" / "model.so").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["tune", str(tmp_path / "m.onnx"), "--target", "host", "--trials", "0", "--db",
                 str(tmp_path / "db"), "--calib", str(tmp_path / "c.npz"), "-q"]) == 2


def test_static_shapes_for_tuning(tmp_path):
    """Tuning needs static shapes (MetaSchedule in TVM 0.27 fails on symbolic ones): the batch dimension is
    fixed, another symbolic dimension needs an explicit shape, and a static build runs that batch."""
    from onnx import TensorProto, helper

    from hago_py.backends.tvm.importer import static_shapes
    from hago_py.errors import BackendError

    m = small_cnn()
    s = static_shapes(m, batch=3)
    assert s.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S"])])
    two = helper.make_model(g)
    with pytest.raises(BackendError, match=r"symbolic dimension 1 \('S'\).*shapes=\{'x'"):
        static_shapes(two)
    assert [d.dim_value for d in static_shapes(two, shapes={"x": [2, 5]}).graph.input[0].type.tensor_type.shape.dim] == [2, 5]
    man = build_mod.build(m, "host", calibration=calib(), out=tmp_path, batch=2)
    assert man["static_shapes"] == {"batch": 2, "shapes": {}} and man["check"]["samples"] == 2
    x = calib(seed=3, n=2)["input"]
    got = build_mod.run_library(tmp_path / "host" / "model.so", [x])[0]
    assert got.shape[0] == 2


def test_tuning_builder_skips_the_intrinsic_registry():
    """MetaSchedule's default builder imports tvm.s_tir.tensor_intrin in every fresh worker (a minute of CPU on a
    2-core host); ours builds the scheduled candidate without it, and the result runs correctly."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, tvm\n"
            "from tvm import te\n"
            "from hago_py.backends.tvm.tune import build_candidate\n"
            "A = te.placeholder((64,), name='A', dtype='int32')\n"
            "B = te.compute((64,), lambda i: A[i] * 3 + 1, name='B')\n"
            "f = build_candidate(tvm.IRModule({'main': te.create_prim_func([A, B])}), tvm.target.Target('llvm'))\n"
            "a = tvm.runtime.tensor(np.arange(64, dtype='int32')); b = tvm.runtime.tensor(np.zeros(64, 'int32'))\n"
            "f['main'](a, b)\n"
            "assert (b.numpy() == np.arange(64) * 3 + 1).all()\n"
            "print('tvm.s_tir.tensor_intrin' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def _two_convs(seed: int = 0):
    """input -> Conv(pads 1) -> Conv(pads 1) -> output: the second conv reads a signed tensor (uint8 zero point
    far from 0), so its zero-point padding matters."""
    from models import checked_model
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (6, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["output"], name="conv2", pads=[1, 1, 1, 1])]
    return checked_model(nodes, inits, "two_convs", ["N", 3, 8, 8], ["N", 6, 8, 8])


def test_multipoint_conv_integer_builds_as_integer_conv(tmp_path):
    """weight_scheme="multipoint" writes its widened convolutions as ConvInteger + Cast + scale-and-sum. The TVM
    build lowers each into the QDQ form with unit scales and integerizes it back into an int8 conv2d with int32
    accumulators (zero-point padding included): same outputs as ORT, no conv left float."""
    import onnx

    from hago_py.backends.tvm.importer import lower_conv_integer

    import hago_py

    m, cal = _two_convs(), calib(n=16)
    res = hago_py.quantize(m, cal, "x86_avx2", weight_scheme="multipoint", weight_bits=8, multipoint_points=2.0,
                           measure_latency=False)
    convint = [n for n in res.model.graph.node if n.op_type == "ConvInteger"]
    assert convint, "multipoint wrote no ConvInteger"
    zps = {i.name: i for i in res.model.graph.initializer}
    assert any(int(onnx.numpy_helper.to_array(zps[n.input[2]])) != 0 for n in convint)   # padding needs z_x
    lowered = lower_conv_integer(res.model)
    assert not any(n.op_type in ("ConvInteger", "Cast") for n in lowered.graph.node if "conv2" in n.name)
    man = build_mod.build(res.model, "host", plan=res.plan, out=tmp_path, check=False)
    integ = man["integerize"]
    acc = [r for r in integ["layers"] if r.get("pattern") == "conv2d_accumulators (ConvInteger)"]
    assert len(acc) == len(convint) and all(r["status"] == "integer" for r in acc)
    assert any(r["padded_with_zero_point"] for r in acc)
    assert integ["counts"]["left_float"] == 0
    x = cal["input"][:4]
    want = run(res.model, {"input": x})[0]
    got = build_mod.run_library(tmp_path / "host" / "model.so", [x])[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_conv_integer_that_is_not_hagos_form_is_refused():
    """A ConvInteger whose int32 result feeds anything but one Cast to float is not lowered: a clear error."""
    from models import checked_model
    from onnx import TensorProto, helper, numpy_helper

    from hago_py.backends.tvm.importer import import_qdq
    from hago_py.errors import BackendError

    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.int8), "w")
    nodes = [helper.make_node("QuantizeLinear", ["input", "s"], ["xq"], name="q"),
             helper.make_node("ConvInteger", ["xq", "w"], ["acc"], name="ci"),
             helper.make_node("Cast", ["acc"], ["accf"], name="c", to=TensorProto.FLOAT),
             helper.make_node("Add", ["acc", "acc"], ["acc2"], name="twice"),
             helper.make_node("Cast", ["acc2"], ["output"], name="c2", to=TensorProto.FLOAT)]
    m = checked_model(nodes, [w, numpy_helper.from_array(np.float32(0.1), "s")], "ci", [1, 3, 4, 4], [1, 2, 4, 4])
    with pytest.raises(BackendError, match=r"ConvInteger.*a Cast to float alone reads it"):
        import_qdq(m)


@pytest.mark.parametrize("scheme", ["none", "rowwise"])
def test_out_of_range_token_ids_raise_instead_of_crashing(tmp_path, scheme):
    """TVM imports Gather as an unchecked take: an id >= the table's rows read past it and the library segfaulted
    (exit 139). The build now checks the graph inputs that index tables: negative ids still wrap as in ONNX,
    out-of-range ones raise with the input's name (as ONNX Runtime does). Run in a child process, so that a
    crash fails this test instead of killing the run."""
    import subprocess
    import sys
    import textwrap

    from test_embedding import emb_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 16)).astype(np.float32)
    cal = {"ids": rng.integers(0, 300, (8, 5)).astype(np.int64)}
    man = build_mod.build(emb_model(w), "host", calibration=cal, out=tmp_path, embedding_scheme=scheme)
    lib, qdq = tmp_path / "host" / "model.so", tmp_path / "host" / "model_qdq.onnx"
    ids = np.array([[0, -1, 299, -300]], np.int64)
    want = run(qdq, {"ids": ids})[0]
    np.testing.assert_allclose(build_mod.run_library(lib, [ids])[0], want, rtol=0, atol=1e-5)
    assert man["check"]["max_abs_diff_vs_ort_fused"] == [0.0]
    code = textwrap.dedent(f"""
        import numpy as np
        from hago_py.build import run_library
        run_library({str(lib)!r}, [np.array([[1, 300]], np.int64)])
        print("NO ERROR")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "input 'ids' holds an index outside [-300, 300)" in r.stderr and "NO ERROR" not in r.stdout


def test_simulated_w4_builds_with_int4_initializers(tmp_path):
    """Simulated W4 writes INT4 initializers (DequantizeLinear-21); TVM's importer read them as one byte per value
    and failed ("TensorCopyFromBytes: size mismatch"). They are widened to INT8 before import: the convs run the
    4-bit values on the int8 kernel, same outputs as ORT."""
    import onnx

    import hago_py

    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", weight_bits=4, simulate=True, measure_latency=False)
    assert any(t.data_type == onnx.TensorProto.INT4 for t in res.model.graph.initializer)
    man = build_mod.build(res.model, "host", plan=res.plan, out=tmp_path, check=False)
    assert man["integerize"]["counts"]["conv2d"] == 2 and man["integerize"]["counts"]["left_float"] == 0
    x = calib(seed=5, n=3)["input"]
    want = run(res.model, {"input": x})[0]
    np.testing.assert_allclose(build_mod.run_library(tmp_path / "host" / "model.so", [x])[0], want, rtol=0,
                               atol=1e-5)


def test_symbolic_dimension_errors_say_which_shapes_to_pass(tmp_path, monkeypatch):
    """TVM 0.27 fails to import / compile several graphs whose inputs have symbolic dimensions besides the batch
    (fuzz_build: a Reshape or Softmax after a symbolic feature axis). The error then names those dimensions and
    the static shapes to pass, taken from the calibration sample; a batch-only symbolic model gets no hint."""
    from onnx import TensorProto, helper

    from hago_py.errors import BackendError

    def model(dims):
        g = helper.make_graph([helper.make_node("Relu", ["input"], ["output"], name="r")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    feed = {"input": np.zeros((1, 3, 15), np.float32)}
    hint = build_mod.shape_hint(model(["N", 3, "d1"]), None, feed)
    assert "'input' ['N', 3, 'd1']" in hint and "shapes={'input': [1, 3, 15]}" in hint and "--shape input=1x3x15" in hint
    assert build_mod.shape_hint(model(["N", 3, "d1"]), {"batch": 1, "shapes": {}}, feed) == ""
    assert build_mod.shape_hint(model(["N", 3, 15]), None, feed) == ""
    assert "--shape input=1x3xD" in build_mod.shape_hint(model(["N", 3, "d1"]), None, None)

    def fail(*a, **k):
        raise BackendError("TVM could not import the quantized model (InternalError: Reshape expects the input "
                           "tensor to have known shape)")

    monkeypatch.setattr(build_mod, "to_relax", fail)
    m = small_cnn()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(BackendError, match=r"known shape\); the inputs have symbolic dimensions besides the batch "
                                           r"\('input' \['N', 3, 'H', 8\]\).*--shape input=1x3x8x8"):
        build_mod.build(m, "host", calibration=calib(), out=tmp_path)


def test_single_element_weights_keep_their_rank(tmp_path):
    """A 1x1x1x1 conv weight (one input and one output channel) became a scalar constant in the integer rewrite
    (one-element constants are broadcast scalars elsewhere) and TVM refused the conv2d ("layout OIHW requires the
    input to be 4-dim tensor ... ndim 0"), a crash found by fuzz_build. Same for a [1, 1] matmul weight."""
    from models import checked_model
    from onnx import helper, numpy_helper

    import hago_py

    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["t"], name="t", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "m"], ["output"], name="mm")]
    inits = [numpy_helper.from_array(np.full((1, 1, 1, 1), -0.7, np.float32), "w"),
             numpy_helper.from_array(np.full((1, 1), 1.3, np.float32), "m")]
    m = checked_model(nodes, inits, "one", ["N", 1, 4, 4], ["N", 4, 4, 1])
    cal = {"input": np.random.default_rng(0).normal(size=(8, 1, 4, 4)).astype(np.float32)}
    res = hago_py.quantize(m, cal, "x86_avx2", activation_mode="static", measure_latency=False)
    man = build_mod.build(res.model, "host", plan=res.plan, out=tmp_path, check=False, batch=2,
                          shapes={"input": [2, 1, 4, 4]})
    c = man["integerize"]["counts"]
    assert c["conv2d"] == 1 and c["matmul"] == 1 and c["left_float"] == 0
    x = cal["input"][:2]
    want = run(res.model, {"input": x})[0]
    np.testing.assert_allclose(build_mod.run_library(tmp_path / "host" / "model.so", [x])[0], want, rtol=0,
                               atol=1e-5)


def test_prequantized_per_token_model_is_recognised(tmp_path):
    """A model whose only quantized layers are per-token MatMuls has no QuantizeLinear / DequantizeLinear; build
    took it for FP32 and refused its plan (fuzz_build). MatMulInteger / ConvInteger mark a quantized model too."""
    from models import small_transformer_mlp

    import hago_py

    x = np.random.default_rng(0).normal(size=(6, 5, 16)).astype(np.float32)
    res = hago_py.quantize(small_transformer_mlp(), {"input": x}, "x86_avx2", activation_granularity="per_token",
                           measure_latency=False)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in res.model.graph.node)
    man = build_mod.build(res.model, "host", plan=res.plan, out=tmp_path, check=False)
    want = run(res.model, {"input": x})[0]
    np.testing.assert_allclose(build_mod.run_library(tmp_path / "host" / man["library"]["file"], [x])[0], want,
                               rtol=0, atol=1e-5)


def _computed_split_model():
    """Torch-export style: y = x @ W; the q / k halves of y cut by Slice bounds computed from Shape(y)."""
    from models import checked_model
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    i64 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "W"),
             i64("two", [2]), i64("half_div", 2), i64("zero", [0]), i64("axis2", [2])]
    nodes = [helper.make_node("MatMul", ["input", "W"], ["y"], name="proj"),
             helper.make_node("Shape", ["y"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "two"], ["d"], name="last_dim", axis=0),
             helper.make_node("Div", ["d", "half_div"], ["h"], name="half"),
             helper.make_node("Add", ["h", "h"], ["e"], name="end"),
             helper.make_node("Slice", ["y", "zero", "h", "axis2"], ["q"], name="q"),
             helper.make_node("Slice", ["y", "h", "e", "axis2"], ["k"], name="k"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["output"], name="scores")]
    return checked_model(nodes, inits, "split", ["N", 6, 16], ["N", 6, 6])


def test_static_build_folds_shape_arithmetic(tmp_path):
    """A static build of a model that computes Slice bounds from Shape (torch exports of attention) left Relax
    tensors of unknown shape, and TVM's matmul legalization failed (fuzz_build, exporters family). With static
    shapes the Shape nodes fold into constants first, then the arithmetic on them."""
    import hago_py
    from hago_py.backends.tvm.importer import fold_static_shapes, static_shapes

    x = np.random.default_rng(1).normal(size=(4, 6, 16)).astype(np.float32)
    res = hago_py.quantize(_computed_split_model(), {"input": x}, "x86_avx2", measure_latency=False)
    static = static_shapes(res.model, 2)
    assert not any(n.op_type == "Shape" for n in fold_static_shapes(static).graph.node)
    # symbolic batch: Shape(y) stays, but Gather(Shape(y), 2) reads the known feature size and folds
    dyn = fold_static_shapes(res.model)
    assert any(n.op_type == "Shape" for n in dyn.graph.node) and not any(n.op_type == "Gather" for n in dyn.graph.node)
    want = run(res.model, {"input": x[:2]})[0]
    for sub, kw in (("static", {"batch": 2}), ("dynamic", {})):
        build_mod.build(res.model, "host", plan=res.plan, out=tmp_path / sub, check=False, **kw)
        np.testing.assert_allclose(build_mod.run_library(tmp_path / sub / "host" / "model.so", [x[:2]])[0], want,
                                   rtol=0, atol=1e-4)


def test_concat_with_an_empty_constant_builds_a_loadable_library(tmp_path):
    """A Concat reading a zero-element initializer: TVM kept the empty constant, exported it, and the library
    failed to load ("Invalid DLTensor file format"; fuzz_build). The importer drops such inputs first."""
    from models import checked_model
    from onnx import helper, numpy_helper

    from hago_py.backends.tvm.importer import drop_empty_concat_inputs

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros((1, 0, 8, 8), np.float32), "empty")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["c", "empty"], ["output"], name="cat", axis=1)]
    m = checked_model(nodes, inits, "empty_cat", [1, 3, 8, 8], [1, 4, 8, 8])
    assert [n.input for n in drop_empty_concat_inputs(m).graph.node if n.op_type == "Concat"] == [["c"]]
    cal = {"input": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}
    man = build_mod.build(m, "host", calibration=cal, out=tmp_path)
    assert man["check"]["max_abs_diff_vs_ort_fused"] == [0.0]


def test_padding_masked_dynamic_model_builds_and_matches_ort(tmp_path):
    """mask_padding (quant/padding.py) puts a Mul by the token mask before DynamicQuantizeLinear and builds the mask
    from the int64 attention_mask input: the library takes both inputs and gives ORT's outputs, real rows included
    bit for bit."""
    import hago_py
    from test_padding import FAST, _feed, _masked_mlp

    cal = _feed()
    res = hago_py.quantize(_masked_mlp(), cal, "x86_avx2", **FAST)
    assert set(res.report["padding_mask"]) == {"input", "r"}
    man = build_mod.build(res.model, "host", plan=res.plan, out=tmp_path, check=False)
    c = man["integerize"]["counts"]  # dynamic MatMulIntegers arrive integer from the importer
    assert c["imported_integer"] == 2 and c["left_float"] == 0 and man["integerize"]["float_ops"]["integer matmul"] == 2
    feed = {k: v[:4] for k, v in cal.items()}
    want = run(res.model, feed)[0]
    got = build_mod.run_library(tmp_path / "host" / "model.so", [feed["input"], feed["attention_mask"]])[0]
    real = feed["attention_mask"] != 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.array_equal(got[real], want[real])
