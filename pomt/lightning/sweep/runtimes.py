"""The Targets one sweep compares, in one place: per Target, what its records (POMT's search and
the side-by-side timing) are valid for, how it times, where its pieces live, and where its
accuracy comes from.

Each Target keeps its own pieces in its own folder (``[bs<B>/]<label>/``: ``search.json``,
``latency_profile.json``, ``timing.json``), keyed by its own conditions, so that adding a
runtime to a finished evaluation measures only that runtime. Accuracy is PyTorch's, tested once
per configuration (``results/<key>.json``), for every runtime that computes the model as
PyTorch does (eager, CUDA graphs) or the exported fp32 graph in fp32 (the export is checked
equal to PyTorch on the timed batch); a runtime that computes in another precision (OpenVINO in
bf16 on CPUs with AMX/AVX512-BF16) has its accuracy measured in it, on the same test batches,
beside its timing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pomt.deploy.targets import RUNTIMES, Target
from pomt.errors import PomtValueError
from pomt.lightning.sweep.configurations import SideBySide

__all__ = ["RuntimeRun", "check_targets", "runtime_runs", "target_label"]


def target_label(target: Target) -> str:
    """The name a Target's rows, folders and W&B values go by: its runtime, with its options."""
    options = ",".join(f"{k}={v}" for k, v in sorted(target.options.items()))
    return target.runtime + (f"[{options}]" if options else "")


def check_targets(targets: object) -> tuple[Target, ...]:
    """A non-empty list of distinct Targets (each a Target, a runtime's name or a mapping)."""
    if isinstance(targets, str | Target) or not targets:
        raise PomtValueError(
            f"targets must be a non-empty list of Targets or runtimes ({', '.join(RUNTIMES)}); got {targets!r}"
        )
    out = tuple(Target.coerce(target) for target in targets)  # type: ignore[union-attr]
    labels = [target_label(target) for target in out]
    if len(set(labels)) != len(labels):
        raise PomtValueError(f"targets must not repeat a runtime with the same options; got {labels}")
    return out


@dataclass(frozen=True)
class RuntimeRun:
    """One Target of the sweep: ``target`` (completed with the Trainer's device and precision),
    ``conditions`` (the run's, with the precision it computes in and the runtime's version),
    ``how_timed`` in words, and ``precision`` (the Trainer's for PyTorch, else
    ``<runtime>:<precision>``, e.g. ``openvino:bf16``)."""

    name: str
    target: Target
    conditions: dict[str, Any]
    how_timed: str
    precision: str

    def folder(self, batch_folder: Path) -> Path:
        """Where this runtime's search, latency profile and timing of one batch size live."""
        return batch_folder / self.name

    @property
    def own_accuracy(self) -> bool:
        """Whether its accuracy is measured in it: it computes in another precision than PyTorch's."""
        return not self.target.backend.computes_as_pytorch(self.precision)

    def accuracy_from(self, torch_precision: str) -> str:
        """Where the accuracy of its rows comes from, in words (empty where PyTorch runs the model)."""
        if not self.target.backend.exported:
            return ""
        if self.own_accuracy:
            return f"measured in {self.precision} (its own precision), on the same test images"
        return f"PyTorch's ({torch_precision}), shared: {self.precision} computes the checked fp32 export in fp32"


def runtime_runs(
    targets: tuple[Target, ...],
    conditions: dict[str, Any],
    how: SideBySide,
    device: torch.device,
    precision: str,
) -> dict[str, RuntimeRun]:
    """Each Target's :class:`RuntimeRun`, in the order given; ``conditions`` are the run's (what
    the accuracy records are valid for), ``how`` the side-by-side timing settings, ``device`` and
    ``precision`` the Trainer's (what a Target leaves open)."""
    out = {}
    for target in targets:
        completed = dataclasses.replace(
            target, device=target.device or str(device), precision=target.precision or precision
        )
        done = completed.on()  # (its precision: the runtime's own, for an exported graph)
        own = dict(conditions) | {
            "precision": done.precision,
            "runtime": f"{done.runtime} {done.backend.version()}",
        }
        timing = how.describe(done)
        run = RuntimeRun(target_label(target), completed, own, timing, done.precision)
        if run.own_accuracy:
            timing = timing.replace(
                "accuracy from PyTorch after the equality check", "accuracy measured in it"
            )
        out[run.name] = dataclasses.replace(run, how_timed=timing)
    return out
