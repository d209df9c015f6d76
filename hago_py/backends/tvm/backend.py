"""TVM Relax backend: QDQ ONNX -> integer Relax -> ``tvm.compile`` -> ``relax.VirtualMachine`` (no tuning).

``TvmBackend(target=None, threads=1, spec=None)`` implements hago_py/backends/base.py's protocol. ``target`` is a
TVM target dict (``{"kind": "llvm", "mcpu": ...}``); ``None`` = this host (``targets.host_target``: an mcpu
only when every feature LLVM enables for it is in /proc/cpuinfo, else plain ``{"kind": "llvm"}``). String
targets are rejected (dicts say exactly what is meant). ``spec``: the hardware spec whose ``requantize``
section the integer code follows (None = float_scale / half_to_even, ORT's arithmetic). ``rpc``: run and time on a
remote device over TVM RPC (``{"tracker": "host:port", "key": ...}`` or ``{"host": ..., "port": ...}``; see
rpc.py): compiled here for ``target`` (None = this host's target, right only for a remote of this host's
kind), uploaded, run and timed there.
"""
from __future__ import annotations

import os
import time as _time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import onnx

from ...errors import BackendError
from ..base import Timing, TimingResult


@dataclass
class TvmArtifact:
    """A compiled model: the VM, the ONNX input / output names, the target and integerize's info."""
    vm: Any
    inputs: List[str]
    outputs: List[str]
    target: Dict[str, Any]
    info: Dict[str, Any] = field(default_factory=dict)
    label: str = "the model"
    remote: Optional[Dict[str, Any]] = None   # over RPC: {"device", "where", "session"}


def host_target() -> Dict[str, Any]:
    """TVM target dict for this CPU (never a foreign mcpu such as znver3 on Intel)."""
    try:
        from .targets import host_target as _ht

        return dict(_ht()[0])
    except Exception:  # detection unavailable: LLVM's generic defaults are always safe
        return {"kind": "llvm"}


def _check_target(target) -> Dict[str, Any]:
    if target is None:
        return host_target()
    if not isinstance(target, Mapping) or "kind" not in target:
        raise BackendError(f"TVM target {target!r} is not a dict with a 'kind': pass e.g. {{'kind': 'llvm'}} or "
                           "{'kind': 'llvm', 'mcpu': 'cascadelake'} (string targets are not accepted)")
    return dict(target)


def _set_threads(n: int) -> None:
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(n)
    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(0, int(n))


class TvmBackend:
    """Compile / run / time QDQ ONNX models with TVM Relax on the CPU."""

    name = "tvm"

    def __init__(self, target: Optional[Mapping[str, Any]] = None, threads: int = 1, spec=None, rpc=None):
        if target is not None:
            _check_target(target)
        self.target = None if target is None else dict(target)
        self.threads = int(threads)
        self.spec = spec
        self.rpc = None
        self._remote = None
        self._remote_threads = False
        if rpc is not None:
            from .rpc import parse_rpc

            self.rpc = parse_rpc(rpc)

    def describe(self) -> str:
        """Where this backend measures, for reports: 'TVM local (llvm ...)' or 'TVM RPC key@tracker (...)'."""
        t = self.target if self.target is not None else host_target()
        if self.rpc is not None:
            return f"TVM RPC {self.rpc.label()} (compiled here for {t})"
        return f"TVM local ({t})"

    def remote_session(self):
        """The open RPC session (opened on first use; held until close())."""
        if self._remote is None or self._remote.session is None:
            from .rpc import open_session, set_remote_threads

            self._remote = open_session(self.rpc)
            self._remote_threads = set_remote_threads(self._remote, self.threads)
        return self._remote

    def close(self) -> None:
        """Release the remote device (RPC; the artifacts compiled over it hold the session too: drop them as
        well, a TVM RPC server serves one session at a time); local backends hold nothing."""
        if self._remote is not None:
            self._remote.close()
            self._remote = None

    # -- protocol ---------------------------------------------------------------------------
    def compile(self, model, target: Optional[Mapping[str, Any]] = None, *, integer: bool = True) -> TvmArtifact:
        """``integer=False`` compiles the float fake-quant import as is (for comparisons)."""
        import tvm
        from tvm import relax

        from ...ir import load_model
        from .importer import import_qdq
        from .integerize import integerize

        tdict = _check_target(target if target is not None else self.target)
        if self.rpc is not None:
            self.remote_session()   # an unreachable remote fails before the compile
        m = model if isinstance(model, onnx.ModelProto) else load_model(model)
        label = f"model '{m.graph.name}'" if m.graph.name else "the model"
        mod = import_qdq(m)
        info: Dict[str, Any] = {}
        if integer:
            mod, info = integerize(mod, self.spec)
        try:
            exe = tvm.compile(mod, target=tvm.target.Target(tdict))
        except Exception as e:
            raise BackendError(f"TVM could not compile {label} for target {tdict} ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); check the "
                               "target dict (kind / mcpu / mtriple) and the ops integerize left float "
                               f"({[x.get('name') for x in info.get('left_float', [])]})", details=str(e)) from e
        inits = {i.name for i in m.graph.initializer}
        ins = [i.name for i in m.graph.input if i.name not in inits]
        if self.rpc is not None:
            from .rpc import upload

            rs = self.remote_session()
            vm, dev = upload(rs, exe, tdict, label)
            return TvmArtifact(vm, ins, [o.name for o in m.graph.output], tdict, info, label,
                               remote={"device": dev, "where": rs.describe_device(), "session": rs})
        _set_threads(self.threads)
        vm = relax.VirtualMachine(exe, tvm.cpu())
        return TvmArtifact(vm, ins, [o.name for o in m.graph.output], tdict, info, label)

    def run(self, artifact: TvmArtifact, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        import tvm

        missing = [n for n in artifact.inputs if n not in feeds]
        if missing:
            raise BackendError(f"TVM run of {artifact.label}: inputs {missing} not fed; feed every graph input "
                               f"({artifact.inputs}) by name")
        if artifact.remote is not None:
            from . import rpc as _rpc

            return _rpc.run(artifact, feeds)
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in artifact.inputs]
        try:
            out = artifact.vm["main"](*args)
        except Exception as e:
            raise BackendError(f"TVM run of {artifact.label} failed ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); feed data whose "
                               "dtypes and shapes match the ONNX inputs", details=str(e)) from e
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]

    def time(self, artifacts: Mapping[str, Any], feed: Mapping[str, np.ndarray], *, repeats: int = 50,
             warmup: int = 5, min_time_s: float = 0.0) -> TimingResult:
        """Round-robin timing like OrtBackend.time: every round calls each artifact once, in rotating order.
        Over RPC the rounds run on the remote (rpc.time: each sample is remote-measured, ``min_time_s`` is wall
        clock here as in the local loop)."""
        import tvm

        labels = list(artifacts)
        arts = {k: (v if isinstance(v, TvmArtifact) else self.compile(v)) for k, v in artifacts.items()}
        remote = [k for k in labels if arts[k].remote is not None]
        if remote:
            from . import rpc as _rpc

            if len(remote) != len(labels):
                raise BackendError(f"cannot time local artifacts {[k for k in labels if k not in remote]} with "
                                   f"remote ones {remote} in one interleaved run; compile them all with the same "
                                   "TvmBackend")
            number = self.rpc.number if self.rpc is not None else 1
            samples, rounds = _rpc.time(arts, feed, repeats=repeats, warmup=warmup, number=number,
                                        min_time_s=min_time_s)
            a0 = arts[labels[0]]
            return TimingResult([Timing(k, samples[k]) for k in labels], threads=self.threads,
                                meta={"backend": "tvm", "tvm_version": tvm.__version__, "tuned": False,
                                      "rpc": a0.remote["session"].endpoint.meta(),
                                      "rpc_endpoint": a0.remote["session"].endpoint.describe(),
                                      "remote_device": a0.remote["where"],
                                      "remote_threads": self.threads if self._remote_threads else "remote default",
                                      "timer": f"remote time_evaluator, number={number} per sample, 1 sample per "
                                               "artifact per round, rotating order",
                                      "rounds": rounds, "targets": {k: arts[k].target for k in labels}})
        args = {k: [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in a.inputs] for k, a in arts.items()}
        calls = {k: arts[k].vm["main"] for k in labels}
        for _ in range(warmup):
            for k in labels:
                calls[k](*args[k])
        samples: Dict[str, List[float]] = {k: [] for k in labels}
        t_start = _time.perf_counter()
        r = 0
        while r < repeats or (_time.perf_counter() - t_start) < min_time_s:
            for k in labels[r % len(labels):] + labels[: r % len(labels)]:
                t0 = _time.perf_counter()
                calls[k](*args[k])
                samples[k].append(_time.perf_counter() - t0)
            r += 1
        return TimingResult([Timing(k, samples[k]) for k in labels], threads=self.threads,
                            meta={"backend": "tvm", "tvm_version": tvm.__version__, "tuned": False,
                                  "targets": {k: arts[k].target for k in labels}})


class _Input:
    def __init__(self, name: str):
        self.name = name


class TvmSession:
    """An ONNX Runtime-session look-alike over a compiled artifact (``run(None, feeds)`` / ``get_inputs()``), so
    evaluation code written for ORT sessions runs the TVM build unchanged."""

    def __init__(self, backend: TvmBackend, artifact: TvmArtifact):
        self.backend, self.artifact = backend, artifact

    def get_inputs(self):
        return [_Input(n) for n in self.artifact.inputs]

    def run(self, output_names, feeds):
        outs = self.backend.run(self.artifact, {k: v for k, v in feeds.items() if k in self.artifact.inputs})
        if output_names is None:
            return outs
        return [outs[self.artifact.outputs.index(n)] for n in output_names]
