"""The runtimes one sweep compares, in one place: per runtime, what its records (POMT's search
and the side-by-side timing) are valid for, how it times, where its pieces live, and where
its accuracy comes from.

Each runtime keeps its own pieces in its own folder (``[bs<B>/]<runtime>/``: ``search.json``,
``latency_profile.json``, ``timing.json``), keyed by its own conditions, so that adding a
runtime to a finished evaluation measures only that runtime. Accuracy is PyTorch's, tested once
per configuration (``results/<key>.json``), for every runtime that computes the exported fp32
graph in fp32 (the export is checked equal to PyTorch on the timed batch); a runtime that
computes in another precision (OpenVINO in bf16 on CPUs with AMX/AVX512-BF16) has its accuracy
measured in it, on the same test batches, beside its timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pomt.runtimes import RUNTIMES, check_runtime, runtime_conditions
from pomt.sweep.configurations import SideBySide

__all__ = ["RuntimeRun", "check_runtimes", "runtime_runs"]


def check_runtimes(runtimes: object) -> tuple[str, ...]:
    """A non-empty list of distinct runtimes, each one of ``pomt.runtimes.RUNTIMES``."""
    if isinstance(runtimes, str) or not runtimes:
        raise ValueError(f"runtimes must be a non-empty list of {', '.join(RUNTIMES)}; got {runtimes!r}")
    names = tuple(check_runtime(name) for name in runtimes)  # type: ignore[union-attr]
    if len(set(names)) != len(names):
        raise ValueError(f"runtimes must not repeat a runtime; got {list(names)}")
    return names


@dataclass(frozen=True)
class RuntimeRun:
    """One runtime of the sweep: ``conditions`` (the run's, with the precision it computes in
    and its version), ``how_timed`` in words, and ``precision`` (the Trainer's for ``torch``,
    else ``<runtime>:<precision>``, e.g. ``openvino:bf16``)."""

    name: str
    conditions: dict[str, Any]
    how_timed: str
    precision: str

    def folder(self, batch_folder: Path) -> Path:
        """Where this runtime's search, latency profile and timing of one batch size live."""
        return batch_folder / self.name

    @property
    def own_accuracy(self) -> bool:
        """Whether its accuracy is measured in it: it computes in another precision than fp32."""
        return self.name != "torch" and not self.precision.endswith(":f32")

    def accuracy_from(self, torch_precision: str) -> str:
        """Where the accuracy of its rows comes from, in words (empty for eager PyTorch)."""
        if self.name == "torch":
            return ""
        if self.own_accuracy:
            return f"measured in {self.precision} (its own precision), on the same test images"
        return f"PyTorch's ({torch_precision}), shared: {self.precision} computes the checked fp32 export in fp32"


def runtime_runs(
    runtimes: tuple[str, ...], conditions: dict[str, Any], how: SideBySide, device: torch.device
) -> dict[str, RuntimeRun]:
    """Each runtime's :class:`RuntimeRun`, in the order given; ``conditions`` are the run's
    (what the accuracy records are valid for), ``how`` the side-by-side timing settings."""
    out = {}
    for name in runtimes:
        check_runtime(name, device)
        own = dict(conditions)
        if name != "torch":  # the precision the runtime really computes in names its records
            own |= runtime_conditions(name, device)
        timing = SideBySide(how.rounds, how.warmup, how.cuda_graphs, name).describe(device, own["precision"])
        run = RuntimeRun(name, own, timing, own["precision"])
        if run.own_accuracy:
            timing = timing.replace(
                "accuracy from PyTorch after the equality check", "accuracy measured in it"
            )
        out[name] = RuntimeRun(name, own, timing, own["precision"])
    return out
