"""Where the search measures latency (issue 13 item 5, "measure where it runs").

The search runs every candidate for accuracy with its own backend (ONNX Runtime: the QDQ model as simulation)
and times it with the *latency backend*: ``choose_timer`` picks it with hago_py.backends.select for the
pipeline's spec and ``pipe.rpc`` (api.quantize's ``rpc=``), unless one is given:

* the spec's runtime is ONNX Runtime and the target is this machine -> the search's own backend times too
  (the default; the same sessions serve accuracy and latency, as before);
* the spec's runtime is TVM on this host's architecture -> a local TvmBackend (llvm for this host);
* ``rpc`` given -> a TvmBackend over TVM RPC: each timed model is compiled here and timed on the device;
* otherwise nothing here measures the target: ``reachable`` is False and latency="auto" predicts it with the
  spec's cost model (latency="measured" then times with the search's own backend, labelled by where it ran).

The search reaches the latency backend only through the Backend protocol (compile / time / describe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..backends.base import measured_on


@dataclass
class Timer:
    backend: Any       # the latency backend; None = the search's own backend
    reachable: bool    # can latency for the spec be measured from here (latency="auto" measures it)
    why: str           # the reason, for the report
    owned: bool        # made by choose_timer: close() it when the search ends

    def close(self) -> None:
        if self.owned and hasattr(self.backend, "close"):
            self.backend.close()


def choose_timer(pipe, latency_backend: Optional[Any] = None) -> Timer:
    if latency_backend is not None:   # api.quantize(rpc=...) passes the one it opened the device with
        given = "rpc= given" if getattr(pipe, "rpc", None) is not None else "latency_backend passed in"
        return Timer(latency_backend, True, f"{measured_on(latency_backend)}: {given}", False)
    from ..backends.select import select_backend

    sel = select_backend(pipe.spec, rpc=getattr(pipe, "rpc", None), threads=pipe.opts.threads)
    if sel.kind in ("ort", "predicted"):
        return Timer(None, sel.measured, sel.why, False)
    return Timer(sel.backend, True, sel.why, True)
