"""Resolve a hago target (built-in spec name, spec .json, or "host") into a TVM target dict.

Spec targets use the spec's ``backend.tvm_target`` as written (cross builds). ``"host"`` detects this CPU: the
first LLVM ``mcpu`` in :data:`X86_CANDIDATES` whose instruction-set features (as LLVM defines them for that CPU)
are all in this CPU's /proc/cpuinfo flags. A spec's mcpu is never reused for a host build: ``znver3`` (x86_avx2)
enables AMD-only SSE4A, so its code can die with an illegal instruction on Intel.

``expected_instructions(isa)`` maps a spec's ``isa`` list to the int8 dot-product instructions a tensorized
build for it should contain (see inspect.py).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ...errors import SpecError

#: host x86 candidates, best first, with why each is worth choosing
X86_CANDIDATES: Tuple[Tuple[str, str], ...] = (
    ("sapphirerapids", "AMX-INT8 tiles (tdpbusd) and AVX-512 VNNI (vpdpbusd)"),
    ("icelake-server", "AVX-512 VNNI (vpdpbusd zmm)"),
    ("cascadelake", "AVX-512 VNNI (vpdpbusd zmm)"),
    ("znver4", "AVX-512 VNNI on AMD Zen 4"),
    ("alderlake", "AVX-VNNI (vpdpbusd ymm) without AVX-512"),
    ("skylake-avx512", "AVX-512 without VNNI (vpmaddubsw zmm)"),
    ("znver3", "AVX2 on AMD Zen 3 (vpmaddubsw)"),
    ("znver2", "AVX2 on AMD Zen 2 (vpmaddubsw)"),
    ("haswell", "AVX2 + FMA (vpmaddubsw)"),
    ("x86-64-v3", "generic AVX2"),
    ("x86-64-v2", "generic SSE4.2"),
    ("x86-64", "baseline x86-64"),
)

#: LLVM feature -> /proc/cpuinfo flag, for the features the code generator may use on its own
LLVM_TO_CPUINFO = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm",
    "popcnt": "popcnt", "movbe": "movbe", "sse4a": "sse4a", "xop": "xop", "fma4": "fma4", "tbm": "tbm",
    "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "gfni": "gfni",
    "adx": "adx", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
}
_ISA_PREFIXES = ("avx", "amx", "sse", "fma", "xop")

#: spec isa entry -> instructions a tensorized int8 build should show
ISA_INSTRUCTIONS = {
    "amx_int8": ("tdpbusd",), "avx512_vnni": ("vpdpbusd",), "avx_vnni": ("vpdpbusd",), "avx2": ("vpmaddubsw",),
    "dotprod": ("sdot", "udot"), "dp4a": ("dp4a",), "imma_int8": ("mma_s8",), "neon": ("smull", "smlal"),
}


@dataclass
class ResolvedTarget:
    """What `build` compiles for: ``name`` (build/<name>/), ``spec`` (hago spec name used to quantize),
    ``target`` (TVM target dict), ``isa`` (what the target has), ``why`` (how it was chosen)."""
    name: str
    spec: str
    target: Dict[str, Any]
    isa: Tuple[str, ...]
    why: str
    host: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.target.get("kind"))

    @property
    def arch(self) -> str:
        """x86_64 / aarch64 / cuda."""
        if self.kind == "cuda":
            return "cuda"
        triple = str(self.target.get("mtriple") or platform.machine())
        return "aarch64" if triple.startswith(("aarch64", "arm64")) else "x86_64" if "86" in triple else triple

    def tvm(self):
        """The tvm.target.Target (CUDA gets an llvm host)."""
        import tvm

        if self.kind == "cuda":
            return tvm.target.Target(dict(self.target), host={"kind": "llvm"})
        return tvm.target.Target(dict(self.target))

    def expected(self) -> Dict[str, str]:
        return expected_instructions(self.isa)


def expected_instructions(isa) -> Dict[str, str]:
    """{instruction: isa entry that promises it}; sm_61+ implies dp4a."""
    out: Dict[str, str] = {}
    for entry in isa:
        e = str(entry).lower()
        for ins in ISA_INSTRUCTIONS.get(e, ()):
            out.setdefault(ins, e)
        if e.startswith("sm_") and e[3:].isdigit() and int(e[3:]) >= 61:
            out.setdefault("dp4a", e)
    if "sdot" in out or "udot" in out:   # with dotprod, widening multiplies are not the expected kernel
        out.pop("smull", None), out.pop("smlal", None)
    return out


def _llvm_features(mcpu: str) -> Optional[set]:
    try:
        import tvm
        from tvm.target import codegen

        return set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu,
                                                                    "mtriple": "x86_64-linux-gnu"})))
    except Exception:  # unknown CPU to this LLVM, or TVM without LLVM
        return None


def missing_features(mcpu: str, flags) -> Optional[List[str]]:
    """cpuinfo flags ``mcpu`` would use that ``flags`` lack ([] = safe); None if LLVM does not know ``mcpu``."""
    feats = _llvm_features(mcpu)
    if feats is None:
        return None
    norm = {f.replace("_", "").replace("-", "").replace(".", "") for f in flags}
    miss = []
    for f in sorted(feats):
        if f in LLVM_TO_CPUINFO:
            if LLVM_TO_CPUINFO[f] not in flags:
                miss.append(LLVM_TO_CPUINFO[f])
        elif f.startswith(_ISA_PREFIXES) and f.replace("-", "").replace(".", "") not in norm:
            miss.append(f)
    return miss


def host_target(cpuinfo: Optional[str] = None, machine: Optional[str] = None) -> Tuple[Dict[str, Any], Tuple[str, ...], str]:
    """(TVM target dict, isa of this CPU, why) for this host; ``cpuinfo`` / ``machine`` override for tests."""
    from ...hw.host import read_host

    cpu = read_host(cpuinfo, machine)
    f = set(cpu.flags)
    isa = tuple(x for x in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp", "i8mm")
                if x in f)
    if cpu.arch in ("aarch64", "arm64"):
        mattr = ["+neon"] + (["+dotprod"] if "asimddp" in f else []) + (["+i8mm"] if "i8mm" in f else [])
        isa = ("neon",) + (("dotprod",) if "asimddp" in f else ())
        return ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr}, isa,
                f"host {cpu.model} (aarch64): generic mcpu with mattr {mattr} from /proc/cpuinfo Features")
    if cpu.arch not in ("x86_64", "amd64", "x86-64"):
        return {"kind": "llvm"}, isa, f"host {cpu.model} ({cpu.arch}): LLVM defaults"
    skipped = []
    for mcpu, what in X86_CANDIDATES:
        miss = missing_features(mcpu, f)
        if miss is None:
            skipped.append(f"{mcpu} (unknown to this LLVM)")
            continue
        if not miss:
            why = (f"host {cpu.model}: mcpu {mcpu} ({what}); every ISA feature LLVM enables for {mcpu} is in "
                   f"/proc/cpuinfo" + (f"; rejected: {'; '.join(skipped[:4])}" if skipped else ""))
            return {"kind": "llvm", "mcpu": mcpu}, isa, why
        skipped.append(f"{mcpu} needs {', '.join(miss[:3])}")
    return {"kind": "llvm"}, isa, f"host {cpu.model}: no known mcpu fits ({'; '.join(skipped[:4])}); LLVM defaults"


def resolve_target(target) -> ResolvedTarget:
    """``target``: "host", a built-in spec name or a spec .json path. SpecError if the spec has no tvm_target."""
    from ...hw import load_spec

    if str(target) == "host":
        tdict, isa, why = host_target()
        try:
            spec = load_spec("host").name
        except SpecError:
            spec = "x86_avx2"
        if "avx512_vnni" in isa or "avx_vnni" in isa:
            isa = tuple(dict.fromkeys(isa + ("avx512_vnni" if "avx512_vnni" in isa else "avx_vnni",)))
        return ResolvedTarget("host", spec, tdict, isa, why, host=True)
    spec = load_spec(target)
    tdict = getattr(spec, "tvm_target", None) or spec.backend.get("tvm_target")
    if not isinstance(tdict, dict) or "kind" not in tdict:
        raise SpecError(f"spec '{spec.name}' has no backend.tvm_target with a 'kind'; add e.g. "
                        '{"kind": "llvm", "mcpu": "..."} to its backend section')
    return ResolvedTarget(spec.name, spec.name, dict(tdict), tuple(spec.isa),
                          f"backend.tvm_target of spec {spec.name}")
