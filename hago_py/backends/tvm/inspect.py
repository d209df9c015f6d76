"""Look inside a built TVM library: its assembly / CUDA source, and the int8 dot-product instructions in it.

TVM 0.27: ``exe.mod`` (relax.VMExecutable) imports an ``llvm`` module whose ``inspect_source("asm")`` is the
CPU assembly; a CUDA build nests a ``cuda`` module under it whose ``inspect_source("cuda")`` is the kernel
source (PTX only exists once nvcc / NVRTC compiled it: see build.py).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping

#: instruction -> regex (multiline) over assembly / PTX / CUDA source
PATTERNS = {
    "x86_64": {
        "vpdpbusd": r"^\s*(?:\{vex\}\s*)?vpdpbusd\b", "vpdpbusds": r"^\s*(?:\{vex\}\s*)?vpdpbusds\b",
        "vpmaddubsw": r"^\s*vpmaddubsw\b", "vpmaddwd": r"^\s*vpmaddwd\b", "tdpbusd": r"^\s*tdpb[su][su]d\b",
    },
    "aarch64": {"sdot": r"^\s*sdot\b", "udot": r"^\s*udot\b", "smull": r"^\s*smull2?\b",
                "smlal": r"^\s*smlal2?\b", "umull": r"^\s*umull2?\b", "umlal": r"^\s*umlal2?\b"},
    "cuda": {"dp4a": r"\bdp4a\.[su]32\.[su]32\b|__dp4a\s*\(", "mma_s8": r"\bmma\.sync\.aligned\.[^;]*\.s8\b"},
}


def module_sources(exe) -> Dict[str, str]:
    """{"asm": CPU assembly, "cuda": CUDA source} of a relax.VMExecutable or runtime.Module (missing keys absent)."""
    out: Dict[str, str] = {}
    root = getattr(exe, "mod", exe)
    seen: List = [root]
    while seen:
        m = seen.pop()
        kind = getattr(m, "kind", "")
        try:
            if kind == "llvm" and "asm" not in out:
                out["asm"] = m.inspect_source("asm")
            elif kind == "cuda" and "cuda" not in out:
                out["cuda"] = m.inspect_source("cuda")
        except Exception:  # a module that cannot show its source: leave it out
            pass
        seen.extend(list(m.imports))
    return out


def count_instructions(text: str, arch: str) -> Dict[str, int]:
    """{instruction: count} of the int8 dot-product instructions of ``arch`` (x86_64 / aarch64 / cuda) in
    ``text`` (assembly, PTX or CUDA source)."""
    pats = PATTERNS.get(arch)
    if pats is None:
        return {}
    return {k: len(re.findall(p, text or "", re.M)) for k, p in pats.items()}


def findings(counts: Mapping[str, int], expected: Mapping[str, str], *, integerized: bool = True,
             tuned: bool = False) -> List[str]:
    """Compare instruction ``counts`` with what the spec's isa promises (``expected``: {instruction: isa})."""
    out: List[str] = []
    for isa in dict.fromkeys(expected.values()):
        ins = [i for i, e in expected.items() if e == isa]
        have = {i: counts.get(i, 0) for i in ins}
        if any(have.values()):
            out.append(f"spec says {isa}: generated code has {_fmt(have)}")
            continue
        why = ("the model was not integerized (float kernels on dequantized weights)" if not integerized else
               "the default schedules did not tensorize" + ("" if tuned else " (untuned build)"))
        out.append(f"spec says {isa}, generated code has {_fmt(have)}: {why}")
    if not expected:
        out.append("the spec's isa promises no int8 dot-product instruction; nothing to compare")
    return out


def _fmt(have: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {i}" for i, n in have.items())


def inspect_library(exe, arch: str, expected: Mapping[str, str], *, extra_text: Iterable[str] = (),
                    integerized: bool = True, tuned: bool = False) -> Dict:
    """{"sources": {...}, "instructions": counts, "findings": [...]} for a built executable."""
    src = module_sources(exe)
    text = src.get("cuda" if arch == "cuda" else "asm", "") + "\n".join(["", *extra_text])
    counts = count_instructions(text, arch)
    return {"sources": src, "instructions": counts,
            "findings": findings(counts, expected, integerized=integerized, tuned=tuned)}
