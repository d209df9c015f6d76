"""target="host": the built-in spec that matches the CPU this process runs on.

The int8 kernels a runtime picks depend on CPU flags, not on the model name ("AMD EPYC" hosts with and without
VNNI exist), so the match reads the flags (Linux /proc/cpuinfo; ``platform`` elsewhere):

    x86-64 with amx_int8            -> x86_amx           (ORT's MLAS uses AMX tiles for int8 GEMM)
    x86-64 with avx512_vnni         -> x86_avx512_vnni   (vpdpbusd zmm)
    x86-64 with avx_vnni only       -> x86_avx512_vnni   (the same vpdpbusd without int16 saturation, ymm)
    x86-64 with avx2                -> x86_avx2          (vpmaddubsw: int16 pair saturation)
    aarch64 with asimddp (dotprod)  -> arm_cortex_a76    (sdot / udot)
    aarch64 otherwise               -> arm_cortex_a72    (NEON smull / sadalp)

Every answer comes with the reason (CPU model and the flags that decided), which the report records.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import SpecError

HOST = "host"
DECIDING_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp", "asimd")


@dataclass
class HostCpu:
    arch: str                       # platform.machine(): x86_64 / aarch64 / arm64 / ...
    model: str
    flags: frozenset = field(default_factory=frozenset)

    def deciding(self) -> List[str]:
        return [f for f in DECIDING_FLAGS if f in self.flags]


def read_host(cpuinfo: Optional[str] = None, machine: Optional[str] = None) -> HostCpu:
    """The CPU this process runs on. ``cpuinfo`` / ``machine`` override /proc/cpuinfo and platform.machine()
    (tests, or a description of another board)."""
    arch = (machine or platform.machine() or "unknown").lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or arch, set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("", arch, platform.processor()):
            model = val.strip() or model
        elif key in ("flags", "features") and not flags:  # x86 "flags", aarch64 "Features"
            flags = set(val.split())
    return HostCpu(arch, model, frozenset(flags))


def match_host(cpu: Optional[HostCpu] = None, available: Optional[Sequence[str]] = None):
    """(built-in spec name, why) for ``cpu`` (default: this host). SpecError when no built-in spec fits."""
    from .spec import builtin_names

    cpu = cpu or read_host()
    names = set(available if available is not None else builtin_names())
    f = cpu.flags
    if cpu.arch in ("x86_64", "amd64", "x86-64"):
        if "amx_int8" in f:
            name, how = "x86_amx", "AMX-INT8 (ONNX Runtime's MLAS runs int8 GEMMs on AMX tiles)"
        elif "avx512_vnni" in f:
            name, how = "x86_avx512_vnni", "AVX-512 VNNI (vpdpbusd)"
        elif "avx_vnni" in f:
            name, how = "x86_avx512_vnni", ("AVX-VNNI without AVX-512 (vpdpbusd on ymm: the same int8 arithmetic, "
                                            "half the width; the closest built-in spec)")
        elif "avx2" in f:
            name, how = "x86_avx2", "AVX2 without VNNI (vpmaddubsw, int16 pair saturation)"
        else:
            name, how = None, "no AVX2"
    elif cpu.arch in ("aarch64", "arm64"):
        if "asimddp" in f:
            name, how = "arm_cortex_a76", "Armv8.2 dot product (sdot / udot)"
        else:
            name, how = "arm_cortex_a72", "NEON without the dot product"
    else:
        name, how = None, f"architecture {cpu.arch!r}"
    seen = ", ".join(cpu.deciding()) or "none of " + ", ".join(DECIDING_FLAGS)
    if name is None or name not in names:
        raise SpecError(f"target='host': no built-in spec matches this CPU ({cpu.model}, {cpu.arch}; {how}; int8 "
                        f"flags: {seen}); pass a built-in target name or a spec .json for it")
    return name, f"host CPU {cpu.model} ({cpu.arch}; flags {seen}) -> {name}: {how}"
