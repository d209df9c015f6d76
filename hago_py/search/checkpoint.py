"""Search state on disk: one JSON file, rewritten atomically after every measured trial.

The file holds the run's identity (model digest, target spec, options, calibration digest, search settings)
and every trial record keyed by a stable hash of what the trial measured (the per-layer configuration of a
plan, the candidates of a layer-table group, ...). Budgets are not part of the identity: a resumed search
with other budgets reuses every trial it can. Resuming replays the recorded trials instead of re-measuring
them, so the search takes the same decisions as the interrupted run and continues where it stopped; a
``kill -9`` loses at most the trial that was running (the file is replaced by rename, never half-written).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import OptionError
from ..ir.io import atomic_write_text

CHECKPOINT_VERSION = 1


def _clean(x):
    """JSON-safe copy: non-finite floats become strings (the checkpoint is strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def stable_hash(obj: Any, n: int = 20) -> str:
    text = json.dumps(_clean(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


class Checkpoint:
    """Trial records in memory, mirrored to ``path`` (when given) after every ``add``."""

    def __init__(self, path: Optional[Path], identity: Dict[str, Any], *, resume: bool = False):
        self.path = Path(path) if path is not None else None
        self.identity = _clean(identity)
        self.identity_hash = stable_hash(self.identity)
        self.trials: Dict[str, Dict[str, Any]] = {}
        self.order: List[str] = []
        self.resumed = 0
        self.created = time.time()
        if self.path is None:
            if resume:
                raise OptionError("resume=True needs a checkpoint file: pass checkpoint=PATH (CLI: --checkpoint PATH)")
            return
        if self.path.is_dir():
            raise OptionError(f"checkpoint path '{self.path}' is a folder; give a file name such as search.json")
        if self.path.exists():
            if not resume:
                raise OptionError(f"checkpoint '{self.path}' already exists: pass resume=True (CLI: --resume) to "
                                  "continue that search, or delete the file to start over")
            self._load()
        elif resume:
            raise OptionError(f"cannot resume: checkpoint '{self.path}' does not exist (it is written by a search "
                              "run with checkpoint=PATH); drop resume to start a new search")
        elif not self.path.parent.exists():
            raise OptionError(f"cannot write checkpoint '{self.path}': folder '{self.path.parent}' does not exist")

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise OptionError(f"checkpoint '{self.path}' cannot be read ({e}); delete it to start over") from e
        if data.get("version") != CHECKPOINT_VERSION:
            raise OptionError(f"checkpoint '{self.path}' has version {data.get('version')}, expected "
                              f"{CHECKPOINT_VERSION}; delete it to start over")
        if data.get("identity_hash") != self.identity_hash:
            old = data.get("identity", {})
            diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
            raise OptionError(f"checkpoint '{self.path}' belongs to another search (differs in: "
                              f"{', '.join(diff) or 'identity'}); use the same model, calibration data, target and "
                              "options to resume, or delete the file to start over")
        for rec in data.get("trials", []):
            self.trials[rec["key"]] = rec
            self.order.append(rec["key"])
        self.resumed = len(self.order)
        self.created = data.get("created", self.created)

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.trials.get(key)

    def add(self, key: str, record: Dict[str, Any]) -> None:
        record = _clean(dict(record, key=key))
        self.trials[key] = record
        self.order.append(key)
        self.save()

    def records(self) -> List[Dict[str, Any]]:
        return [self.trials[k] for k in self.order]

    def save(self, extra: Optional[Dict[str, Any]] = None) -> None:
        if self.path is None:
            return
        data = {"version": CHECKPOINT_VERSION, "identity_hash": self.identity_hash, "identity": self.identity,
                "created": self.created, "updated": time.time(), "trials": self.records()}
        if extra:
            data.update(_clean(extra))
        atomic_write_text(self.path, json.dumps(data, indent=0, sort_keys=True, allow_nan=False) + "\n")
