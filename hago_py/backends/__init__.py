"""Backends behind one protocol (see base.Backend): ORT, TVM Relax (local or over TVM RPC); select.backend_for
picks the one that measures latency for a spec."""
from .base import Backend, Timing, TimingResult
from .ort import OrtBackend
from .select import backend_for, select_backend

__all__ = ["Backend", "Timing", "TimingResult", "OrtBackend", "backend_for", "select_backend"]
