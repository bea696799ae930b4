"""The run directory of an evaluation, and the records that make a sweep resumable.

Each finished piece of a sweep is written as soon as it is known, with the conditions that
make it valid (the weights' fingerprint, the data, the device, the precision, the layer;
then the batch size, the search settings, the test limit, the method and r, where they
matter): the search of each batch size (``bs<B>/search.json``), the side by side timing of
its configurations (``bs<B>/timing.json``), and the accuracy of each configuration
(``results/<key>.json``, e.g. ``tome-r4.json``), and the weights of each healed configuration
(``healed/<key>.pt`` with ``healed/<key>.json``, see ``pomt.lightning.sweep.healing``). A rerun reuses a record whose conditions
all match, and says why it measures again when one does not. Under DDP, global rank 0 writes
the plan of each batch size (``ready.json``, see ``pomt.lightning.sweep.plan``); the other ranks wait
for the plan of this session and follow it, so that every rank runs the same configurations
in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pomt.offline.profiles import write_json

__all__ = ["RunDir", "session_id"]

RECORD_SCHEMA = 1
_SESSION = "POMT_SWEEP_SESSION"
_PER_FOLDER = ("search.json", "timing.json", "ready.json", "latency_profile.json", "accuracy_profile.json")


def session_id() -> str:
    """An id shared by the processes of one run: set by rank 0 before Lightning starts the
    others (they inherit it), or the launcher's own (torchrun, SLURM)."""
    for name in (_SESSION, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    os.environ[_SESSION] = uuid.uuid4().hex
    return f"{_SESSION}={os.environ[_SESSION]}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == RECORD_SCHEMA else None


def mismatch(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """None when every condition of ``current`` holds in ``stored``; else the first difference."""
    for key, value in current.items():
        if stored.get(key) != value:
            return f"it was made with {key}={stored.get(key)!r}, now {key}={value!r}"
    return None


class RunDir:
    """``root`` (created), read and written by global rank 0; ``resume=False`` starts clean."""

    def __init__(self, root: Path, *, resume: bool, rank_zero: bool, log: Callable[[str], object]) -> None:
        self.root, self.rank_zero, self.log = Path(root), rank_zero, log
        self.session = session_id()
        if rank_zero:
            if not resume:
                for name in ("results", "healed", "report.csv", "report.json"):
                    target = self.root / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
                for folder in [self.root, *self.root.glob("bs*")]:
                    for name in _PER_FOLDER:
                        (folder / name).unlink(missing_ok=True)
            self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, batch_size: int, per_batch_size: bool) -> Path:
        return self.root / f"bs{batch_size}" if per_batch_size else self.root

    # ------------------------------------------------------------------ records
    def load(self, path: Path, conditions: Mapping[str, Any], what: str) -> dict[str, Any] | None:
        """The payload of the record at ``path`` when its conditions match (else None, said)."""
        record = _read(path)
        if record is None:
            return None
        why = mismatch(record.get("conditions", {}), json.loads(json.dumps(conditions)))  # as stored
        if why is not None:
            self.log(f"not reusing {what} ({path}): {why}")
            return None
        return record["payload"]

    def save(self, path: Path, conditions: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
        if self.rank_zero:
            write_json(
                path, {"schema": RECORD_SCHEMA, "conditions": dict(conditions), "payload": dict(payload)}
            )

    # ------------------------------------------------------------------ DDP hand-over
    def mark_ready(self, folder: Path, plan: Mapping[str, Any]) -> None:
        """Rank 0: this batch size's search and timing are on disk; ``plan`` is what all ranks run."""
        self.save(folder / "ready.json", {"session": self.session}, plan)

    def mark_failed(self, folder: Path, error: BaseException) -> None:
        """Rank 0: measuring failed; the waiting ranks stop with this error instead of waiting."""
        self.save(
            folder / "ready.json", {"session": self.session}, {"error": f"{type(error).__name__}: {error}"}
        )

    def wait_ready(self, folder: Path, poll: float = 0.5) -> dict[str, Any]:
        """Other ranks: the plan rank 0 marked ready in this session (waits while rank 0 measures);
        a RuntimeError when rank 0 marked it failed."""
        while True:
            record = _read(folder / "ready.json")
            if record is not None and record.get("conditions", {}).get("session") == self.session:
                if "error" in record["payload"]:
                    raise RuntimeError(f"global rank 0 stopped while measuring: {record['payload']['error']}")
                return record["payload"]
            time.sleep(poll)
