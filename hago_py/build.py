"""`hago build`: quantize, import to Relax, compile for one target, and write a self-describing build folder.

``build(model, target, calibration=..., out="build")`` writes ``out/<target>/``:

* the library: ``model.so`` (host / x86; CUDA: host code with the CUDA source embedded), for aarch64 a
  cross-linked ``model.so`` when ``aarch64-linux-gnu-gcc`` exists, else ``model.o`` + ``model.tar`` (objects
  that ``tvm.runtime.load_module`` links on the board) and the reason in the manifest;
* ``model.s`` (CPU assembly), for CUDA ``model.cu`` and, with nvcc, ``model.ptx`` / ``model.cubin``;
* ``plan.json``, ``report.json``, ``model_qdq.onnx`` and ``manifest.json`` (target, versions, toolchain, tuning
  per kernel, sha256 of every file, int8 instruction counts and findings).

The folder is assembled beside the destination and swapped in with renames: never half written.
A host library loads the standard way::

    vm = relax.VirtualMachine(tvm.runtime.load_module("model.so"), tvm.cpu())
    out = vm["main"](*inputs)            # inputs in the ONNX graph's input order
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx

from .errors import BackendError, OptionError, OutputError

AARCH64_CC = "aarch64-linux-gnu-gcc"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu/lib")
# ops only a quantized model has: QDQ, and the integer ops of hago's dynamic per-token / multipoint layers (a
# model whose only quantized layers are per-token MatMuls has no QuantizeLinear at all)
_QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger")


# ---------------------------------------------------------------- toolchains
def find_cross_compiler(name: str = AARCH64_CC) -> Optional[str]:
    """Path of the cross compiler, or None (tests monkeypatch this to simulate its absence)."""
    return shutil.which(name)


def find_nvcc() -> Optional[str]:
    return shutil.which("nvcc")


def _version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    rel = [ln for ln in lines if "release" in ln]
    return (rel or lines or ["unknown"])[0].strip()


# ---------------------------------------------------------------- model -> Relax
def _is_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in _QDQ for n in model.graph.node)


def _graph_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def to_relax(qdq: onnx.ModelProto, spec=None):
    """(Relax IRModule, integerize info or None): the parallel importer / integerizer when present, else
    tvm.relax.frontend.onnx.from_onnx of the QDQ model (float kernels on dequantized tensors)."""
    try:
        from .backends.tvm.importer import import_qdq
    except ImportError:
        import_qdq = None
    try:
        if import_qdq is not None:
            mod = import_qdq(qdq)
        else:
            from tvm.relax.frontend.onnx import from_onnx

            mod = from_onnx(qdq, keep_params_in_input=False)
    except Exception as e:
        raise BackendError(f"TVM could not import the quantized model ({type(e).__name__}: "
                           f"{str(e).strip()[:200]}); check the model's ops against tvm.relax.frontend.onnx",
                           details=str(e)) from e
    try:
        from .backends.tvm.integerize import integerize
    except ImportError:
        return mod, None
    from .api import internal_errors

    with internal_errors("the TVM integer rewrite"):     # anything it raises is a hago_py bug: InternalError
        mod, info = integerize(mod, spec)
    return mod, dict(info or {})


# ---------------------------------------------------------------- quantize / load
def _quantized(model, target_spec: str, calibration, plan, progress, quantize_options):
    """(qdq ModelProto, plan json text or None, report dict or None)."""
    from .ir import load_model

    m = load_model(model)
    if _is_qdq(m):
        if quantize_options:
            raise OptionError(f"the model is already quantized (QDQ); quantize options "
                              f"{', '.join(sorted(quantize_options))} do not apply: drop them or pass the FP32 model")
        plan_text = None
        if plan is not None:
            plan_text = plan.to_json() if hasattr(plan, "to_json") else Path(plan).read_text()
            json.loads(plan_text)
        return m, plan_text, None
    if plan is not None:
        raise OptionError("plan= is for an already quantized (QDQ) model; the given model is FP32: drop plan= "
                          "(build quantizes it) or pass the model_qdq.onnx the plan belongs to")
    if calibration is None:
        raise OptionError("build of an FP32 model needs calibration data: pass calibration= (.npz, folder of .npy, "
                          "dict) or --calib, or pass an already quantized QDQ model with its plan.json")
    from . import api

    opts = dict(quantize_options)
    opts.setdefault("measure_latency", False)   # build times nothing on ORT
    res = api.quantize(model, calibration, target_spec, progress=progress, **opts)
    return res.model, res.plan.to_json(), res.report


# ---------------------------------------------------------------- export
def _link_aarch64(exe, path: Path, cc: str) -> Dict[str, Any]:
    """Cross-link ``exe`` into an aarch64 model.so. Without the aarch64 libc dev files (crti.o, libc.so
    script), link against the sysroot's libc.so.6 directly (-nostdlib)."""
    from tvm.support import cc as tcc

    try:
        exe.export_library(str(path), fcompile=tcc.cross_compiler(cc))
        return {"options": []}
    except Exception as e:
        first = str(e)
    libs = [str(AARCH64_SYSROOT / n) for n in ("libc.so.6", "libm.so.6") if (AARCH64_SYSROOT / n).is_file()]
    if not libs:
        raise BackendError(f"{cc} cannot link a shared library (no aarch64 libc found: install "
                           "libc6-dev-arm64-cross)", details=first)
    opts = ["-nostdlib", *libs, "-lgcc"]
    exe.export_library(str(path), fcompile=tcc.cross_compiler(cc, options=opts))
    return {"options": opts, "note": "the aarch64 libc development files (crti.o) are missing: linked with "
                                     "-nostdlib against the sysroot's libc.so.6 / libm.so.6"}


def _elf_machine(path: Path) -> Optional[int]:
    head = path.read_bytes()[:20]
    return int.from_bytes(head[18:20], "little") if head[:4] == b"\x7fELF" else None


def _export(exe, rt, tmp: Path, sources: Dict[str, str]) -> Dict[str, Any]:
    """Write the library files of ``exe`` into ``tmp``; returns the manifest's "library" + "toolchain"."""
    lib: Dict[str, Any] = {}
    tool: Dict[str, Any] = {}
    if "asm" in sources:
        (tmp / "model.s").write_text(sources["asm"])
    if rt.kind == "cuda":
        return _export_cuda(exe, rt, tmp, sources)
    if rt.arch == "aarch64" and platform.machine() not in ("aarch64", "arm64"):
        cc = find_cross_compiler()
        if cc:
            link = _link_aarch64(exe, tmp / "model.so", cc)
            mach = _elf_machine(tmp / "model.so")
            if mach != 183:
                raise BackendError(f"{cc} wrote a model.so for ELF machine {mach}, not aarch64 (183); check the "
                                   "cross toolchain")
            tool = {"name": cc, "version": _version(cc), **link}
            lib = {"file": "model.so", "loadable_here": False,
                   "load": "on the aarch64 board: relax.VirtualMachine(tvm.runtime.load_module('model.so'), tvm.cpu())"}
        else:
            exe.export_library(str(tmp / "model.tar"))
            import tarfile

            with tarfile.open(tmp / "model.tar") as tf:
                member = next(m for m in tf.getmembers() if m.name.startswith("lib") and m.name.endswith(".o"))
                (tmp / "model.o").write_bytes(tf.extractfile(member).read())
            tool = {"name": None, "version": None}
            lib = {"file": "model.tar", "loadable_here": False,
                   "note": f"no {AARCH64_CC} on this machine: wrote the aarch64 object (model.o), the objects + VM "
                           "code (model.tar; tvm.runtime.load_module links it on the board with its gcc) and the "
                           "assembly (model.s) instead of model.so; install gcc-aarch64-linux-gnu to get model.so"}
        return {"library": lib, "toolchain": tool}
    exe.export_library(str(tmp / "model.so"))
    cc = os.environ.get("CXX") or shutil.which("g++") or shutil.which("gcc") or "c++"
    lib = {"file": "model.so", "loadable_here": True,
           "load": "relax.VirtualMachine(tvm.runtime.load_module('model.so'), tvm.cpu())"}
    mcpu = rt.target.get("mcpu")
    if mcpu and not rt.host and platform.machine() in ("x86_64", "AMD64"):
        from .backends.tvm.targets import missing_features
        from .hw.host import read_host

        miss = missing_features(str(mcpu), read_host().flags)
        if miss:   # e.g. znver3 on Intel: running it here could die with an illegal instruction
            lib["loadable_here"] = False
            lib["note"] = (f"built for mcpu {mcpu}; this CPU lacks {', '.join(miss[:4])}: not run here (use "
                           "--target host for a library this machine can run)")
    return {"library": lib, "toolchain": {"name": cc, "version": _version(cc)}}


def _export_cuda(exe, rt, tmp: Path, sources: Dict[str, str]) -> Dict[str, Any]:
    exe.export_library(str(tmp / "model.so"))
    src = sources.get("cuda", "")
    (tmp / "model.cu").write_text(src)
    arch = str(rt.target.get("arch", "sm_75"))
    lib = {"file": "model.so", "loadable_here": False,
           "load": "on a GPU machine with tvm.support.nvcc imported (it compiles the embedded CUDA source on load): "
                   "relax.VirtualMachine(tvm.runtime.load_module('model.so'), tvm.cuda())"}
    nvcc = find_nvcc()
    if not nvcc:
        lib["note"] = "no nvcc on this machine: CUDA source only (model.cu); no model.ptx / model.cubin"
        return {"library": lib, "toolchain": {"name": None, "version": None}}
    import tvm
    from tvm.support import nvcc as tnvcc

    with rt.tvm():
        try:
            ptx = bytes(tnvcc.compile_cuda(src, target_format="ptx", arch=arch, compiler="nvcc"))
            cubin = bytes(tnvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc"))
        except Exception as e:
            raise BackendError(f"nvcc could not compile the generated CUDA source for {arch} "
                               f"({type(e).__name__}); see model.cu", details=str(e)) from e
    if f".target {arch}".encode() not in ptx or cubin[:4] != b"\x7fELF" or _elf_machine_bytes(cubin) != 190:
        raise BackendError(f"nvcc output is not an {arch} PTX / CUDA ELF cubin; check the nvcc install")
    (tmp / "model.ptx").write_bytes(ptx)
    (tmp / "model.cubin").write_bytes(cubin)
    lib["cubin"] = f"model.cubin (ELF EM_CUDA, {arch})"
    del tvm
    return {"library": lib, "toolchain": {"name": nvcc, "version": _version(nvcc), "arch": arch}}


def _elf_machine_bytes(b: bytes) -> Optional[int]:
    return int.from_bytes(b[18:20], "little") if b[:4] == b"\x7fELF" else None


# ---------------------------------------------------------------- run / check
def run_library(path, inputs: Sequence[np.ndarray], device=None) -> List[np.ndarray]:
    """Load ``path`` (model.so) and run ``main`` on ``inputs`` (ONNX input order); outputs as numpy, in order."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device or tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    outs = list(out) if isinstance(out, (list, tuple)) or type(out).__name__ in ("Array", "Tuple") else [out]
    return [o.numpy() for o in outs]


def output_steps(model: onnx.ModelProto) -> List[Optional[float]]:
    """Per graph output: the quantization step (scale) of the DequantizeLinear producing it, else None."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {o: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"
              for o in n.output}
    prod = {o: n for n in model.graph.node for o in n.output}
    steps = []
    for out in model.graph.output:
        n = prod.get(out.name)
        seen = 0
        while n is not None and n.op_type not in ("DequantizeLinear",) and seen < 4 and n.input:
            n, seen = prod.get(n.input[0]), seen + 1   # through Flatten / Reshape / Gemm: keep looking upward
            if n is not None and n.op_type in ("Gemm", "MatMul", "Conv", "Add"):
                n = None
        s = None
        if n is not None and n.op_type == "DequantizeLinear":
            arr = inits.get(n.input[1], consts.get(n.input[1]))
            s = None if arr is None else float(np.max(arr))
        steps.append(s)
    return steps


def _check_host(lib: Path, qdq: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    from .backends.ort import OrtBackend

    names = [i.name for i in _graph_inputs(qdq)]
    got = run_library(lib, [feed[n] for n in names])
    be = OrtBackend(threads=1)

    def diffs(level):
        ref = be.run(be.compile(qdq, optimization=level), dict(feed))
        return [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in zip(got, ref)]

    # "reference": QDQ run as float ops (the model's defined semantics); "fused": ORT's integer kernels, which on
    # AVX2 hosts without VNNI saturate u8 x s8 int16 pairs (vpmaddubsw), so they may differ from both
    return {"max_abs_diff_vs_ort_reference": diffs("basic"), "max_abs_diff_vs_ort_fused": diffs("all"),
            "output_steps": output_steps(qdq), "samples": int(len(feed[names[0]]))}


# ---------------------------------------------------------------- build
def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import tvm

    try:
        from importlib.metadata import version

        ffi = version("apache-tvm-ffi")
    except Exception:
        ffi = "unknown"
    return {"tvm": tvm.__version__, "apache_tvm_ffi": ffi}


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` by the finished folder ``tmp`` with renames (the old build is kept until it succeeds)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError as e:
        if old is not None:
            os.replace(old, dest)
        raise OutputError(f"cannot write '{dest}': {e.strerror}; choose a writable --out") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _symbolic_dims(model: onnx.ModelProto) -> Dict[str, List[Any]]:
    """Graph inputs with a symbolic (or unknown) dimension other than the leading one: {input: [dims]}."""
    out = {}
    for i in _graph_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in i.type.tensor_type.shape.dim]
        if any(isinstance(d, str) for d in dims[1:]):
            out[i.name] = dims
    return out


def shape_hint(model: onnx.ModelProto, static, feed: Optional[Mapping[str, np.ndarray]]) -> str:
    """'' or a '; ...' suffix for a TVM import / compile error of a model whose inputs have symbolic non-batch
    dimensions (TVM 0.27 fails on several such graphs where the weights fix the size): name them and the static
    shapes to pass, from the calibration sample where there is one."""
    sym = _symbolic_dims(model)
    if not sym or static is not None:
        return ""
    given = []
    for name, dims in sym.items():
        real = list(np.asarray(feed[name]).shape) if feed is not None and name in feed else None
        want = real if real is not None and len(real) == len(dims) else [1] + [d if isinstance(d, int) else "D"
                                                                              for d in dims[1:]]
        given.append((name, dims, want))
    where = ", ".join(f"'{n}' {d}" for n, d, _ in given)
    py = ", ".join(f"'{n}': {w}" for n, _, w in given)
    cli = " ".join(f"--shape {n}={'x'.join(str(v) for v in w)}" for n, _, w in given)
    return (f"; the inputs have symbolic dimensions besides the batch ({where}), which TVM often cannot compile "
            f"when the weights fix them: if they are fixed, build for static shapes, shapes={{{py}}} (CLI {cli})")


def _first_feed(model: onnx.ModelProto, calibration) -> Optional[Dict[str, np.ndarray]]:
    """One calibration sample per input (batch 1) for the host check, when calibration is a dict / .npz."""
    names = [i.name for i in _graph_inputs(model)]
    data = calibration
    if isinstance(calibration, (str, os.PathLike)) and str(calibration).endswith(".npz"):
        with np.load(calibration) as z:
            data = {k: z[k][:1] for k in z.files}
    if isinstance(data, Mapping) and all(n in data for n in names):
        return {n: np.asarray(data[n])[:1] for n in names}
    return None


def build(model, target, *, calibration=None, out="build", plan=None, tune_db=None, progress: bool = False,
          check: bool = True, batch: Optional[int] = None, shapes=None, tensorize="auto",
          **quantize_options) -> Dict[str, Any]:
    """Quantize ``model`` for ``target`` (or take an already quantized QDQ model + ``plan``), compile it with TVM
    and write ``out/<target>/`` (see the module docstring). ``target``: "host", a built-in spec name or a spec
    .json. ``tune_db``: a MetaSchedule database folder (see backends/tvm/tune.py), used when present.
    ``check``: for host builds, run the library on one calibration sample and compare with ORT.
    ``batch`` / ``shapes``: compile for static input shapes (leading dimension ``batch``, others from ``shapes``);
    a tuned build (``tune_db``) is always static, batch 1 unless given, as its ``hago tune`` run was.
    ``tensorize``: replace the int8 conv2d / matmul kernels by hand-scheduled ones built on the target's int8
    dot-product instruction (backends/tvm/tensorize.py; needs static shapes, e.g. ``batch=1``): "auto" for
    targets whose spec declares avx512_vnni / avx_vnni / dotprod, True also for avx2 (only where bit-exact),
    False never. Returns the manifest (plus "dir")."""
    from .backends.tvm.inspect import inspect_library
    from .backends.tvm.targets import resolve_target
    from .backends.tvm.tune import compile_module, has_database, kernel_status

    t0 = time.perf_counter()
    rt = resolve_target(target)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create build folder '{out}': {e.strerror}; choose a writable --out") from e
    if tune_db is not None and not Path(tune_db).is_dir():
        raise OptionError(f"tune database folder '{tune_db}' does not exist; run `hago tune ... --db {tune_db}` "
                          "first or drop --tune-db")
    say = (lambda m: print(f"[build] {m}", flush=True)) if progress else (lambda m: None)
    qdq, plan_text, report = _quantized(model, "host" if rt.host else target, calibration, plan, progress,
                                        quantize_options)
    from .hw import load_spec

    spec = load_spec("host" if rt.host else target)
    static = None

    def hint() -> str:     # only for an error message: the calibration sample is read when one is raised
        return shape_hint(qdq, static, _first_feed(qdq, calibration))

    try:
        if batch is not None or shapes or tune_db is not None:
            from .backends.tvm.importer import static_shapes

            static = {"batch": int(batch or 1), "shapes": dict(shapes or {})}
            mod, integ = to_relax(static_shapes(qdq, static["batch"], static["shapes"]), spec)
        else:
            mod, integ = to_relax(qdq, spec)
    except BackendError as e:
        raise BackendError(f"{e}{hint()}", details=e.details) from e
    tvm_target = rt.tvm()
    tensorized = _tensorize(mod, rt, tensorize, say)
    mod = tensorized.pop("module", mod)
    tuned = has_database(tune_db)
    say(f"compiling for {rt.name} ({tvm_target.export().get('mcpu', rt.kind)}), "
        f"{'tuned with ' + str(tune_db) if tuned else 'untuned'}")
    try:
        kernels = kernel_status(mod, tvm_target, tune_db if tuned else None)
        for r in tensorized.get("kernels", []):
            if r.get("kernel") in kernels:
                kernels[r["kernel"]] = (f"hand-scheduled, tensorized ({r['instruction']})" if r.get("dot_product", True)
                                        else f"hand-scheduled, vectorized ({r['instruction']})")
        exe = compile_module(mod, tvm_target, tune_db if tuned else None)
    except Exception as e:
        raise BackendError(f"TVM could not compile the model for target {rt.name} ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}){hint()}",
                           details=str(e)) from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{rt.name}.", dir=str(out)))
    try:
        sources = inspect_library(exe, rt.arch, rt.expected(), integerized=integ is not None,
                                  tuned=tuned and any(s != "untuned" for s in kernels.values()))
        exported = _export(exe, rt, tmp, sources["sources"])
        extra = [(tmp / "model.ptx").read_text(errors="replace")] if (tmp / "model.ptx").exists() else []
        if extra:   # count dp4a / mma in the PTX too
            sources = inspect_library(exe, rt.arch, rt.expected(), extra_text=extra, integerized=integ is not None,
                                      tuned=tuned)
        (tmp / "model_qdq.onnx").write_bytes(qdq.SerializeToString(deterministic=True))
        if plan_text is not None:
            (tmp / "plan.json").write_text(plan_text.rstrip() + "\n")
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
        manifest: Dict[str, Any] = {
            "format": 1, "target": rt.name, "spec": spec.name, "tvm_target": _target_json(tvm_target),
            "target_why": rt.why, "versions": _versions(), **exported,
            "integerized": integ is not None, "integerize": integ,
            "tuning": {"database": str(tune_db) if tuned else None, "kernels": kernels},
            "tensorize": tensorized,
            "static_shapes": static,
            "instructions": sources["instructions"], "expected_instructions": rt.expected(),
            "findings": sources["findings"],
            "inputs": [i.name for i in _graph_inputs(qdq)], "outputs": [o.name for o in qdq.graph.output],
        }
        if check and exported["library"].get("loadable_here"):
            feed = _first_feed(qdq, calibration)
            if feed is not None and static is not None:     # the library takes exactly the static shapes
                feed = None if static["shapes"] else {k: np.repeat(v[:1], static["batch"], 0) for k, v in feed.items()}
            if feed is not None:
                from .api import internal_errors

                with internal_errors("the check of the built library"):   # it must load and run: else a bug
                    manifest["check"] = _check_host(tmp / exported["library"]["file"], qdq, feed)
        (tmp / "build_report.md").write_text(build_report(manifest))
        manifest["files"] = {p.name: {"sha256": _sha(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        dest = out / rt.name
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {dest} ({', '.join(sorted(manifest['files']))}); " + "; ".join(manifest["findings"]))
    return {**manifest, "dir": str(dest)}


def build_report(manifest: Mapping[str, Any]) -> str:
    """The human-readable build report: per layer the integer op (or why float), per kernel tuned or not, and
    the int8 instructions found in the generated code against what the spec promises."""
    integ = manifest.get("integerize") or {}
    c = integ.get("counts", {})
    lines = [f"# Build for {manifest['target']} (spec {manifest['spec']})", "",
             f"TVM target: `{json.dumps(manifest.get('tvm_target'))}` ({manifest.get('target_why', '')})", "",
             f"Integer layers: {c.get('rewritten', 0)} rewritten ({', '.join(f'{k} {v}' for k, v in c.items() if k in ('conv2d', 'matmul', 'add'))}), "
             f"{c.get('imported_integer', 0)} imported integer (dynamic activations), {c.get('left_float', 0)} left "
             f"float against the plan, {c.get('float_in_plan', 0)} float compute ops the plan keeps float.", "",
             "| layer | op | status | pattern | in / out dtype | requantize | clamp |", "|---|---|---|---|---|---|---|"]
    for r in integ.get("layers", []):
        lines.append(f"| {r.get('name')} | {r.get('op', '').split('.')[-1]} | {r.get('status')} | "
                     f"{r.get('pattern', r.get('reason', ''))} | {r.get('x_dtype', '')} / {r.get('out_dtype', '')} | "
                     f"{r.get('requantize', '')} | {r.get('clamp', '')} |")
    for r in integ.get("left_float", []):
        if r.get("status") == "left_float" and r not in integ.get("layers", []):
            lines.append(f"| {r.get('name')} | {r.get('op', '').split('.')[-1]} | left_float | {r.get('reason')} "
                         "| | | |")
    kernels = (manifest.get("tuning") or {}).get("kernels", {})
    tuned = sum(1 for v in kernels.values() if v.startswith("tuned"))
    lines += ["", f"Kernels: {tuned} of {len(kernels)} tuned"
              + (f" (database {manifest['tuning']['database']})" if tuned else " (untuned build)"), ""]
    lines += [f"- `{k}`: {v}" for k, v in kernels.items()]
    tz = manifest.get("tensorize") or {}
    if tz.get("kernels") or tz.get("why"):
        lines += ["", f"Tensorized int8 kernels ({tz.get('isa') or 'none'}): {tz.get('why', '')}", ""]
        lines += [f"- {r['op']} {r.get('x_dtype', '')} {r.get('x_shape')} x {r.get('weight_shape')}: "
                  + (f"`{r['kernel']}` ({r['instruction']})" + (f"; {r['note']}" if r.get("note") else "")
                     if r["status"] == "tensorized" else
                     f"default schedule ({r.get('why', '')})") for r in tz.get("kernels", [])]
    ins = manifest.get("instructions") or {}
    lines += ["", "int8 instructions in the generated code: "
              + (", ".join(f"{k} {v}" for k, v in ins.items()) or "none counted"), ""]
    lines += [f"- {f}" for f in manifest.get("findings", [])]
    if manifest.get("check"):
        lines += ["", f"Check against ORT: {json.dumps(manifest['check'])}"]
    return "\n".join(lines) + "\n"


def _tensorize(mod, rt, option, say) -> Dict[str, Any]:
    """{"isa", "why", "kernels": per int8 op record, "module": the rewritten module (when any)}."""
    if option is False or option is None or rt.kind != "llvm":
        return {"isa": None, "why": "off" if rt.kind == "llvm" else f"no tensorized kernels for {rt.kind}",
                "kernels": []}
    from .backends.tvm.tensorize import isa_for, tensorize_module

    if option not in (True, "auto"):
        raise OptionError(f"tensorize={option!r} is invalid; pass 'auto', True or False")
    isa = isa_for(rt.isa, include_avx2=option is True)
    if isa is None:
        return {"isa": None, "why": f"the spec's isa {list(rt.isa)} declares no int8 dot-product instruction "
                                    "with a tensorized kernel" + ("" if option is True else
                                                                  " (avx2 only with tensorize=True)"), "kernels": []}
    try:
        new, recs = tensorize_module(mod, isa)
    except Exception as e:  # a kernel TVM cannot schedule: build with the default schedules and say why
        return {"isa": isa.name, "why": f"tensorizing failed ({type(e).__name__}: {str(e).strip()[:200]}); "
                                        "default schedules used", "kernels": []}
    n = sum(r["status"] == "tensorized" for r in recs)
    n_dw = sum(r["status"] == "tensorized" and not r.get("dot_product", True) for r in recs)
    dw = (f" ({n_dw} of them depthwise: hand-scheduled vectorized multiply-add, no {isa.instruction})"
          if n_dw else "")
    say(f"tensorized {n} of {len(recs)} int8 kernels with {isa.instruction}{dw}")
    out = {"isa": isa.name, "why": f"{n - n_dw} of {len(recs)} int8 conv2d / matmul kernels use {isa.instruction}"
                                   + (f"; {n_dw} depthwise: vectorized int32 multiply-add" if n_dw else ""),
           "kernels": recs}
    n_dyn = sum(r["status"] == "tensorized" and bool(r.get("dynamic_zero_point")) for r in recs)
    if n_dyn:
        out["why"] += f"; {n_dyn} with a runtime activation zero point (dynamic zero point corrected)"
    if n:
        out["module"] = new
    return out


def _umask() -> int:
    from .ir.io import _umask as um

    return um()


def tune(model, target, *, trials: int, db, calibration=None, plan=None, progress: bool = True,
         batch: int = 1, shapes=None, **quantize_options) -> Dict[str, Any]:
    """MetaSchedule-tune the module `build` would compile (same quantization) into the database folder ``db``;
    rerunning with the same ``db`` resumes. Then ``build(..., tune_db=db)`` (same ``batch`` / ``shapes``).
    Shapes are made static (leading dimension ``batch``): MetaSchedule in TVM 0.27 fails on symbolic ones."""
    from .backends.tvm.targets import resolve_target
    from .backends.tvm.tune import tune_module
    from .hw import load_spec

    rt = resolve_target(target)
    qdq, _, _ = _quantized(model, "host" if rt.host else target, calibration, plan, progress, quantize_options)
    from .backends.tvm.importer import static_shapes

    mod, _ = to_relax(static_shapes(qdq, batch, shapes), load_spec("host" if rt.host else target))
    return tune_module(mod, rt.tvm(), db, trials, progress=progress)


class _CallableModule(type(json)):
    """``hago_py.build`` is both this module and the function: importing the submodule rebinds the package
    attribute to the module, so the module itself calls :func:`build`."""

    def __call__(self, *args, **kwargs):
        return build(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule


def _target_json(target) -> Dict[str, Any]:
    """The tvm.target.Target as plain JSON (its str() is JSON in TVM 0.27)."""
    try:
        return json.loads(str(target))
    except ValueError:
        return {"str": str(target)}
