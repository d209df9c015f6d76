"""Measure where it runs: TVM RPC (issue 13 item 5).

``TvmBackend(target=..., rpc=...)`` compiles here for ``target``, exports the library, uploads it to a remote
TVM RPC server (directly, or through a tracker that hands out a device by key), loads it there into a Relax VM
and runs / times it ON THE REMOTE. Timing keeps the local path's rules: warm up, then rounds in which every
artifact is timed once, in rotating order (one remote ``time_evaluator`` call of ``number`` runs each), so the
paired per-round ratios of base.TimingResult apply unchanged.

``rpc`` (see :func:`parse_rpc`):
* ``{"tracker": "host:port", "key": "rasp4"}`` — a device registered with ``python -m tvm.exec.rpc_server
  --tracker host:port --key rasp4``;
* ``{"host": "10.0.0.5", "port": 9090}`` — an RPC server without tracker;
* the string ``"host:port:key"`` (tracker) or ``"host:port"`` (direct server).
Optional keys: ``cc`` (cross compiler used by ``export_library`` for a foreign target, e.g.
``"aarch64-linux-gnu-g++"``; default: this host's compiler, right for a host-arch remote), ``number`` (runs per
timed sample, default 1), ``connect_timeout`` (seconds to reach the tracker / server, default 5),
``request_timeout`` (seconds to wait for a free device, default 60), ``session_timeout`` (seconds the server
keeps the session, default 0 = no limit), ``target`` (backends/select.py only: the TVM target dict to compile for,
or "host"; default the spec's tvm_target).

TVM is imported only inside functions (``import hago_py`` never imports tvm).
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time as _time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ...errors import BackendError, RemoteError

_FIX = ("start a tracker with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT` and register the device "
        "with `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`, then pass rpc={'tracker': "
        "'HOST:PORT', 'key': 'KEY'} (or rpc={'host': ..., 'port': ...} for a server without tracker)")


@dataclass
class RpcEndpoint:
    """Where the remote is: a tracker (``tracker`` + ``key``) or a server (``host`` + ``port``)."""
    host: str
    port: int
    key: str = ""
    via_tracker: bool = True
    cc: Optional[str] = None
    number: int = 1
    connect_timeout: float = 5.0
    request_timeout: float = 60.0
    session_timeout: float = 0.0
    target: Any = None   # for backends/select.py: a TVM target dict or "host" (None = the spec's tvm_target)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        if self.via_tracker:
            return f"TVM RPC tracker {self.address} key '{self.key}'"
        return f"TVM RPC server {self.address}" + (f" key '{self.key}'" if self.key else "")

    def label(self) -> str:
        """Short form for reports: 'KEY@HOST:PORT' (tracker) or 'server HOST:PORT'."""
        if self.via_tracker:
            return f"{self.key}@{self.address}"
        return f"server {self.address}" + (f" key '{self.key}'" if self.key else "")

    def meta(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"kind": "tracker" if self.via_tracker else "server", "address": self.address}
        if self.key:
            d["key"] = self.key
        return d


def _port(v, what: str) -> int:
    try:
        p = int(v)
    except (TypeError, ValueError):
        p = -1
    if not 0 < p < 65536:
        raise RemoteError(f"TVM RPC {what} port {v!r} is not a port number; pass an integer in 1..65535 "
                           "(e.g. rpc={'tracker': '127.0.0.1:9190', 'key': 'rasp4'})")
    return p


def _split_addr(addr: str, what: str) -> Tuple[str, int]:
    if not isinstance(addr, str) or ":" not in addr:
        raise RemoteError(f"TVM RPC {what} address {addr!r} is not 'host:port'; pass e.g. '127.0.0.1:9190'")
    host, port = addr.rsplit(":", 1)
    return host or "127.0.0.1", _port(port, what)


def parse_rpc(rpc) -> RpcEndpoint:
    """An RpcEndpoint from a dict / 'host:port:key' / 'host:port' string / RpcEndpoint (see the module doc)."""
    if isinstance(rpc, RpcEndpoint):
        return rpc
    if isinstance(rpc, str):
        parts = rpc.split(":")
        if len(parts) == 3 and parts[2]:
            return RpcEndpoint(parts[0] or "127.0.0.1", _port(parts[1], "tracker"), parts[2], True)
        if len(parts) == 2:
            return RpcEndpoint(parts[0] or "127.0.0.1", _port(parts[1], "server"), "", False)
        raise RemoteError(f"rpc={rpc!r} is not 'host:port:key' (tracker) or 'host:port' (server); pass e.g. "
                           "'127.0.0.1:9190:rasp4'")
    if not isinstance(rpc, Mapping):
        raise RemoteError(f"rpc={rpc!r} is not a dict or string; pass {{'tracker': 'host:port', 'key': 'KEY'}}, "
                           "{'host': ..., 'port': ...} or 'host:port:key'")
    known = {"tracker", "key", "host", "port", "cc", "number", "connect_timeout", "request_timeout",
             "session_timeout", "target"}
    unknown = sorted(set(rpc) - known)
    if unknown:
        raise RemoteError(f"rpc has unknown key(s) {unknown}; use {sorted(known)}")
    opt = {k: rpc[k] for k in ("cc", "number", "connect_timeout", "request_timeout", "session_timeout", "target")
           if k in rpc}
    if opt.get("target") is not None and opt["target"] != "host" and not (isinstance(opt["target"], Mapping)
                                                                           and "kind" in opt["target"]):
        raise RemoteError(f"rpc target={opt['target']!r} is not a TVM target dict with a 'kind' or 'host'; pass "
                           "e.g. {'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu', 'mcpu': 'cortex-a72'}")
    if "number" in opt and (not isinstance(opt["number"], int) or opt["number"] < 1):
        raise RemoteError(f"rpc number={opt['number']!r} must be a positive integer (runs per timed sample)")
    if "tracker" in rpc:
        if not rpc.get("key"):
            raise RemoteError(f"rpc={dict(rpc)!r} names tracker {rpc['tracker']!r} but no 'key'; pass the key the "
                               "device registered with (rpc_server --key KEY)")
        host, port = _split_addr(rpc["tracker"], "tracker")
        return RpcEndpoint(host, port, str(rpc["key"]), True, **opt)
    if "host" in rpc and "port" in rpc:
        return RpcEndpoint(str(rpc["host"]), _port(rpc["port"], "server"), str(rpc.get("key", "")), False, **opt)
    raise RemoteError(f"rpc={dict(rpc)!r} names neither a tracker nor a server; pass {{'tracker': 'host:port', "
                       "'key': 'KEY'} or {'host': ..., 'port': ...}")


def _reachable(ep: RpcEndpoint, what: str) -> None:
    """Fail fast (connect_timeout) instead of TVM's 60 s connect-with-retry."""
    try:
        with socket.create_connection((ep.host, ep.port), timeout=ep.connect_timeout):
            pass
    except OSError as e:
        raise RemoteError(f"cannot reach the TVM RPC {what} at {ep.address} ({type(e).__name__}: {e}); check the "
                           f"address and that the {what} runs there, or {_FIX}", details=repr(e)) from e


@dataclass
class RemoteSession:
    """One open RPC session (a device held from the tracker until close())."""
    endpoint: RpcEndpoint
    session: Any
    server: str = ""                 # the server the tracker handed out (host:port)
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hago_rpc_"))
    n_uploads: int = 0

    def device(self):
        return self.session.cpu(0)

    def describe_device(self) -> str:
        where = self.server or self.endpoint.address
        return f"cpu(0) on {where}" + (f" (key '{self.endpoint.key}')" if self.endpoint.key else "")

    def close(self) -> None:
        self.session = None


def _with_timeout(fn, timeout: float, what: str):
    box: Dict[str, Any] = {}

    def go():
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise RemoteError(f"{what} did not finish within {timeout:g} s; the device may be busy with another "
                           "session (a TVM RPC server serves one session at a time; in this process, close() the "
                           "other TvmBackend and drop its artifacts; see `python -m tvm.exec.query_rpc_tracker`) — "
                           "retry later or raise rpc['request_timeout']")
    if "e" in box:
        raise box["e"]
    return box.get("v")


def open_session(ep: RpcEndpoint) -> RemoteSession:
    from tvm import rpc as trpc

    if not ep.via_tracker:
        _reachable(ep, "server")
        try:
            sess = _with_timeout(lambda: trpc.connect(ep.host, ep.port, ep.key, session_timeout=ep.session_timeout),
                                 ep.request_timeout, f"connecting to {ep.describe()}")
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"could not open a session with {ep.describe()} ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); check the "
                               f"key and that a TVM RPC server listens there, or {_FIX}", details=str(e)) from e
        return RemoteSession(ep, sess, ep.address)
    _reachable(ep, "tracker")
    try:
        ts = _with_timeout(lambda: trpc.connect_tracker(ep.host, ep.port), ep.connect_timeout + 5,
                           f"connecting to {ep.describe()}")
        summary = _with_timeout(ts.summary, ep.connect_timeout + 5, f"querying {ep.describe()}")
    except RemoteError:
        raise
    except Exception as e:
        raise RemoteError(f"{ep.address} does not answer as a TVM RPC tracker ({type(e).__name__}: {e}); "
                           f"check the address, or {_FIX}", details=str(e)) from e
    servers = [s for s in summary.get("server_info", []) if str(s.get("key", "")).split(":", 1)[-1] == ep.key]
    if not servers:
        keys = sorted({str(s.get("key", "")).split(":", 1)[-1] for s in summary.get("server_info", [])})
        raise RemoteError(f"no device with key '{ep.key}' is registered at the TVM RPC tracker {ep.address} "
                           f"(registered: {keys or 'none'}); start `python -m tvm.exec.rpc_server --tracker "
                           f"{ep.address} --key {ep.key}` on the device or pass one of the registered keys")
    try:
        sess = _with_timeout(lambda: ts.request(ep.key, session_timeout=ep.session_timeout, max_retry=2),
                             ep.request_timeout, f"requesting key '{ep.key}' from {ep.describe()}")
    except RemoteError:
        raise
    except Exception as e:
        raise RemoteError(f"the TVM RPC tracker {ep.address} could not hand out a device with key '{ep.key}' "
                           f"({type(e).__name__}: {str(e).strip()[:200]}); check that the device's rpc_server is "
                           "up and reachable from here at the address it registered", details=str(e)) from e
    finally:
        try:
            ts.close()
        except Exception:  # pragma: no cover
            pass
    addr = servers[0].get("addr")
    return RemoteSession(ep, sess, f"{addr[0]}:{addr[1]}" if addr else "")


def _is_foreign(target: Mapping[str, Any]) -> bool:
    import platform

    triple = str(target.get("mtriple") or "")
    if not triple:
        return False
    m = platform.machine().lower()
    host_arm = m in ("aarch64", "arm64")
    return triple.startswith(("aarch64", "arm64")) != host_arm


def set_remote_threads(rs: RemoteSession, n: int) -> bool:
    """Size the remote TVM thread pool (False when the remote runtime has no runtime.config_threadpool)."""
    try:
        rs.session.get_function("runtime.config_threadpool")(0, int(n))
        return True
    except Exception:
        return False


def upload(rs: RemoteSession, exe, target: Mapping[str, Any], label: str):
    """Export ``exe`` (a tvm.compile result), upload it and load it on the remote into a Relax VM."""
    from tvm import relax

    ep = rs.endpoint
    rs.n_uploads += 1
    name = f"hago_{os.getpid()}_{id(rs) & 0xffff:x}_{rs.n_uploads}.so"
    path = os.path.join(rs.workdir, name)
    try:
        if ep.cc:
            from tvm.contrib import cc as tcc

            exe.export_library(path, fcompile=tcc.cross_compiler(ep.cc))
        else:
            exe.export_library(path)
    except Exception as e:
        hint = (f"target {dict(target)} is foreign to this host: pass rpc['cc'] = the cross compiler "
                "(e.g. 'aarch64-linux-gnu-g++')" if _is_foreign(target) and not ep.cc
                else "check that the compiler (rpc['cc'] or this host's g++) is installed")
        raise RemoteError(f"TVM could not export {label} as a shared library for {ep.describe()} "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''});"
                           f" {hint}", details=str(e)) from e
    try:
        rs.session.upload(path)
        rlib = rs.session.load_module(name)
        dev = rs.device()
        vm = relax.VirtualMachine(rlib, dev)
    except Exception as e:
        raise RemoteError(f"could not load {label} on {rs.describe_device()} via {ep.describe()} "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''});"
                           f" check that target {dict(target)} matches the remote CPU (mtriple / mcpu) and that "
                           "its TVM runtime has the Relax VM", details=str(e)) from e
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    return vm, dev


def _set_inputs(art, feeds: Mapping[str, np.ndarray]) -> None:
    import tvm

    dev = art.remote["device"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev) for n in art.inputs]
    art.vm.set_input("main", *args)


def _flatten(out) -> List[Any]:
    if hasattr(out, "numpy"):
        return [out]
    res: List[Any] = []
    for o in out:
        res.extend(_flatten(o))
    return res


def run(art, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
    try:
        _set_inputs(art, feeds)
        art.vm.invoke_stateful("main")
        return [o.numpy() for o in _flatten(art.vm.get_outputs("main"))]
    except Exception as e:
        raise BackendError(f"remote TVM run of {art.label} on {art.remote['where']} failed ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); feed data whose "
                           "dtypes and shapes match the ONNX inputs, and check the RPC connection",
                           details=str(e)) from e


def time(arts: Mapping[str, Any], feed: Mapping[str, np.ndarray], *, repeats: int, warmup: int, number: int,
         min_time_s: float = 0.0) -> Tuple[Dict[str, List[float]], int]:
    """Round-robin on the remote: per round, every artifact once in rotating order, each sample one remote
    time_evaluator call (``number`` runs averaged, after the evaluator's own discarded warm-up run). Rounds go on
    past ``repeats`` until ``min_time_s`` of wall clock has passed, as in the local timers (remote-measured time
    alone would take ~10^5 round trips to fill a search's 1.5 s on a 10 us model). Returns (samples, rounds)."""
    labels = list(arts)
    evals = {}
    for k in labels:
        a = arts[k]
        _set_inputs(a, feed)
        evals[k] = a.vm.time_evaluator("invoke_stateful", a.remote["device"], number=int(number), repeat=1)
    try:
        for _ in range(warmup):
            for k in labels:
                evals[k]("main")
        samples: Dict[str, List[float]] = {k: [] for k in labels}
        t_start = _time.perf_counter()
        r = 0
        while r < repeats or _time.perf_counter() - t_start < min_time_s:
            for k in labels[r % len(labels):] + labels[: r % len(labels)]:
                samples[k].append(float(evals[k]("main").results[0]))
            r += 1
    except Exception as e:
        raise RemoteError(f"remote TVM timing on {arts[labels[0]].remote['where']} failed ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}); check the RPC "
                           "connection (a session_timeout too short for the timing ends the session)",
                           details=str(e)) from e
    return samples, r
