"""Backends behind one protocol (see base.Backend): ORT now, TVM Relax next."""
from .base import Backend, Timing, TimingResult
from .ort import OrtBackend

__all__ = ["Backend", "Timing", "TimingResult", "OrtBackend"]
