"""Which backend MEASURES latency for a target (issue 13 item 5, "measure where it runs").

``backend_for(spec, rpc=None, threads=1) -> Backend | None``:

* ``rpc`` given -> ``TvmBackend`` over TVM RPC: compiled here for the spec's ``tvm_target`` (or ``rpc["target"]``:
  a TVM target dict, or ``"host"`` for this host's target), run and timed on the remote device;
* the spec's runtime is TVM (``backend.name == "tvm"``) and its ``tvm_target`` is this host's architecture ->
  ``TvmBackend`` on this host (the host's own llvm target: a spec's mcpu is never reused for a host build, see
  tvm/targets.py);
* the spec's runtime is ONNX Runtime and the target is this machine (same execution provider, architecture and
  ISA: ``target_reachable``) -> ``OrtBackend`` (the default, as before);
* otherwise ``None``: latency cannot be measured here and is predicted by the spec's cost model (label it so).

``select_backend`` returns the same choice with ``kind`` ("ort" / "tvm" / "tvm-rpc" / "predicted") and ``why``.
TVM is imported only when a TvmBackend is used.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from .ort import OrtBackend


@dataclass
class Selection:
    backend: Any            # OrtBackend / TvmBackend / None (predicted)
    kind: str               # "ort" | "tvm" | "tvm-rpc" | "predicted"
    why: str

    @property
    def measured(self) -> bool:
        return self.backend is not None


def host_arch() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("aarch64", "arm64") else "x86_64" if m in ("x86_64", "amd64", "i686", "x86") else m


def spec_arch(spec) -> str:
    """x86_64 / aarch64 / cuda: what the spec's tvm_target compiles for (its mtriple, else its ISA list)."""
    t = dict(getattr(spec, "tvm_target", None) or {})
    if t.get("kind") not in (None, "llvm", "c"):
        return str(t.get("kind"))
    triple = str(t.get("mtriple") or "")
    if triple:
        return "aarch64" if triple.startswith(("aarch64", "arm64")) else "x86_64" if "86" in triple else triple
    isa = [str(i).lower() for i in getattr(spec, "isa", ())]
    return "aarch64" if any(i.startswith("armv") or i in ("neon", "dotprod") for i in isa) else "x86_64"


def _ort_reachable(spec) -> Tuple[bool, str]:
    try:   # the search's own test (same EP / arch / ISA), so both agree on "measured here"
        from ..search.evaluators import target_reachable
    except Exception:  # pragma: no cover - search being refactored: the arch test alone
        ok = spec_arch(spec) == host_arch()
        return ok, f"{spec.name} is {spec_arch(spec)}, this machine is {host_arch()}"
    return target_reachable(spec)


def select_backend(spec, rpc=None, threads: int = 1, target: Optional[Mapping[str, Any]] = None) -> Selection:
    """The measuring backend for ``spec`` (a HardwareSpec or anything hago_py.hw.load_spec takes)."""
    from ..hw import load_spec

    spec = load_spec(spec) if not hasattr(spec, "backend_name") else spec
    if rpc is not None:
        from .tvm.backend import TvmBackend, host_target
        from .tvm.rpc import parse_rpc

        ep = parse_rpc(rpc)
        t = target if target is not None else ep.target
        if t is None:
            t = dict(spec.tvm_target)
        elif t == "host":
            t = host_target()
        if str(t.get("kind")) != "llvm":
            from ..errors import BackendError

            raise BackendError(f"TVM RPC measurement of target {spec.name} needs an llvm (CPU) target, not {t}; "
                               "pass rpc['target'] = a CPU target dict or measure a CPU spec")
        be = TvmBackend(target=t, threads=threads, spec=spec, rpc=ep)
        return Selection(be, "tvm-rpc", f"TVM over RPC on {ep.describe()}, compiled here for {t}")
    runtime = spec.backend_name
    if runtime == "tvm":
        arch = spec_arch(spec)
        if arch == host_arch():
            from .tvm.backend import TvmBackend, host_target

            t = host_target()
            return Selection(TvmBackend(target=t, threads=threads, spec=spec), "tvm",
                             f"TVM on this host ({arch}, target {t}): the spec's runtime is TVM")
        return Selection(None, "predicted", f"target {spec.name} is {arch} under TVM and this machine is "
                                            f"{host_arch()}: predicted by the cost model (pass rpc= to measure it "
                                            "on the device)")
    if runtime == "ort":
        ok, why = _ort_reachable(spec)
        if ok:
            return Selection(OrtBackend(threads=threads), "ort", why)
        return Selection(None, "predicted", f"{why}: predicted by the cost model (pass rpc= to measure it on the "
                                            "device with TVM)")
    return Selection(None, "predicted", f"runtime {runtime!r} of target {spec.name} is not available here: "
                                        "predicted by the cost model")


def backend_for(spec, rpc=None, threads: int = 1, target: Optional[Mapping[str, Any]] = None):
    """The measuring backend for ``spec``, or None (latency predicted by the cost model). See the module doc."""
    return select_backend(spec, rpc=rpc, threads=threads, target=target).backend
