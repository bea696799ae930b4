"""POMT's whole offline step in one call: ``find_r(model, data, ...)`` -> the selection and both profiles.

Accuracy first (it does not depend on the device, and it guides the latency search), then
latency on the device, then the choice of R. Profiles saved by an earlier call are reused
where they are valid for this model and setup. Lightning's callback and the evaluation
sweep go through here; the command-line tools run its steps one by one (``profile_latency``,
``estimate_accuracy``, ``select_r``, on different machines if need be), with the same
settings, as one :class:`SearchConfig` names them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pomt.deploy.targets import Prepared, Target
from pomt.errors import PomtValueError
from pomt.models import architecture, find_vit, model_name, token_layout, uncompiled, unwrap_compiled
from pomt.offline.config import SearchConfig
from pomt.offline.profiles import AccuracyProfile, LatencyProfile
from pomt.offline.profiling import estimate_accuracy, latency_profile
from pomt.offline.selection import Selection
from pomt.offline.stability import rated, retimed_at_star
from pomt.offline.verify import check_candidates, speedups
from pomt.weights import weights_fingerprint

__all__ = ["SearchResult", "Reuse", "Console", "find_r", "flat_profile", "LOW_ACCURACY_FRACTION"]

# Below this fraction of the unpruned model's estimated accuracy, the chosen R is warned about.
LOW_ACCURACY_FRACTION = 0.8


@dataclass(frozen=True)
class SearchResult:
    """What :func:`find_r` found: the selection, the two profiles it was made from, and one
    line per profile saying whether it was measured or reused (and why)."""

    selection: Selection
    latency: LatencyProfile
    accuracy: AccuracyProfile
    notes: tuple[str, ...] = field(default=())

    @property
    def precision(self) -> str:
        """The precision the latency profile was timed at (``32-true``, ``bf16-mixed``, ...)."""
        return self.latency.precision

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (no pickled classes: checkpoints load with ``weights_only=True``)."""
        out = {"selection": self.selection.to_dict(), "latency_profile": self.latency.to_dict()}
        out |= {"accuracy_profile": self.accuracy.to_dict(), "notes": list(self.notes)}
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult | None:
        """Inverse of ``to_dict``; None when ``data`` holds no complete search."""
        parts = [data.get(k) for k in ("selection", "latency_profile", "accuracy_profile")]
        if any(part is None for part in parts):
            return None
        selection, latency, accuracy = parts
        return cls(
            Selection.from_dict(selection),
            LatencyProfile.from_dict(latency),
            AccuracyProfile.from_dict(accuracy),
            tuple(data.get("notes", ())),
        )


@dataclass(frozen=True)
class Reuse:
    """Where :func:`find_r` looks for profiles to reuse: an earlier result (``previous``, e.g.
    from a checkpoint; ``origin`` names it in the notes, ``"loaded from the checkpoint"``), and
    JSON files (``latency_path``, ``accuracy_path``), written after measuring."""

    previous: SearchResult | None = None
    origin: str = "measured earlier"
    latency_path: str | os.PathLike[str] | None = None
    accuracy_path: str | os.PathLike[str] | None = None


@dataclass(frozen=True)
class Console:
    """Where :func:`find_r` reports: ``log`` gets one line per decision and its reason, ``warn``
    a warning (default ``warnings.warn``), and ``progress`` shows progress bars."""

    log: Callable[[str], object] = print
    warn: Callable[[str], object] | None = None
    progress: bool = True

    def warning(self, text: str) -> None:
        (self.warn or (lambda line: warnings.warn(line, stacklevel=4)))(text)


def flat_profile(latency: LatencyProfile, margin: float = 0.01) -> str | None:
    """One line when the measured L(n) gains nothing anywhere: no token count below the largest
    is ``margin`` (1 %) faster than it; else None."""
    ms = latency.latency_ms
    top = max(ms)
    others = {n: v for n, v in ms.items() if n < top}
    if not others or min(others.values()) < (1 - margin) * ms[top]:
        return None
    best = min(others, key=others.get)
    return (
        f"L(n) is flat on this device: no token count measured is faster than the unpruned model's "
        f"{ms[top]:.3f} ms by {margin:.0%} (best: n={best}, {others[best]:.3f} ms), so pruning gains nothing here"
    )


def _reuse(
    kind: type, path: Path | None, earlier: Any, expect: dict[str, Any], notes: list[str], origin: str
) -> Any:
    """The first valid profile of ``earlier`` (kept from a previous search; ``origin`` says where
    it came from) and the file at ``path``; each one passed over adds its reason to ``notes``."""
    sources = [(earlier, f"the {kind.kind} profile {origin}")] if earlier is not None else []
    if path is not None and path.is_file():
        try:
            sources.append((kind.load(path), f"the {kind.kind} profile {path}"))
        except ValueError as err:  # corrupt or foreign: measured again, and overwritten
            notes.append(f"not reusing {path} ({err}); measuring the {kind.kind} profile again")
    passed: dict[str, list[str]] = {}  # reason -> the sources it rules out: one line per decision
    for profile, where in sources:
        why = profile.mismatch(expect)
        if why is None:
            notes.extend(f"not reusing {' or '.join(wheres)}: {reason}" for reason, wheres in passed.items())
            notes.append(f"reusing {where}")
            return profile
        passed.setdefault(why, []).append(where)
    notes.extend(f"not reusing {' or '.join(wheres)}: {reason}" for reason, wheres in passed.items())
    if not sources:
        notes.append(f"no {kind.kind} profile to reuse (none saved, none measured earlier)")
    return None


def _check_accuracy_kept(selection: Selection, warn: Callable[[str], object]) -> None:
    """Warn when the chosen n keeps less than ``LOW_ACCURACY_FRACTION`` of the unpruned accuracy."""
    if selection.mode == "accuracy_floor" or selection.n_star == selection.n_total:
        return
    accuracy = dict(zip(selection.curve_n, selection.curve_accuracy, strict=True))
    unpruned = accuracy.get(selection.n_total, max(selection.curve_accuracy))
    if unpruned > 0 and selection.predicted_accuracy < LOW_ACCURACY_FRACTION * unpruned:
        n, total = selection.n_star, selection.n_total
        warn(
            f"R={selection.r} keeps {n} of {total} tokens. The selection's estimate with {n} random tokens "
            f"is {selection.predicted_accuracy:.3f}, {selection.predicted_accuracy / unpruned:.0%} of the "
            f"same estimate with all {total} tokens ({unpruned:.3f}); both are random-token estimates on "
            "one sample, not the pruned model's accuracy, which keeps the best-scoring tokens and is "
            "usually higher (the stage measures it). To bound the loss, set accuracy_floor (e.g. "
            f"accuracy_floor={LOW_ACCURACY_FRACTION * unpruned:.2f}) or lower alpha."
        )


class _Notes:
    """The notes of one search; each decision is said (``log``) as it is made."""

    def __init__(self, log: Callable[[str], object]) -> None:
        self.lines: list[str] = []
        self.log, self.said = log, 0

    def flush(self) -> None:
        for note in self.lines[self.said :]:
            self.log(note)
        self.said = len(self.lines)


def _accuracy(
    model: nn.Module, data: object, vit: nn.Module, target: Target, search: SearchConfig, reuse: Reuse,
    notes: _Notes, console: Console,
) -> AccuracyProfile:  # fmt: skip
    """A(n): reused where valid (same weights and token count), else estimated (and saved)."""
    expect = dict(
        model=model_name(vit), n_total=token_layout(vit).n_total, weights=weights_fingerprint(model)
    )
    path = None if reuse.accuracy_path is None else Path(reuse.accuracy_path)
    earlier = reuse.previous and reuse.previous.accuracy
    accuracy = _reuse(AccuracyProfile, path, earlier, expect, notes.lines, reuse.origin)
    if accuracy is not None:
        return accuracy
    if data is None:
        raise PomtValueError(
            "find_r needs labelled data for the accuracy estimate (a Dataset or DataLoader of "
            "(image, label)), or a saved accuracy profile of these weights (accuracy_path)"
        )
    notes.flush()
    console.log(f"estimating A(n) on up to {search.accuracy_samples} images")
    accuracy = estimate_accuracy(
        model, data, search=search, device=target.torch_device, vit=vit, progress=console.progress
    )
    notes.lines.append(
        f"estimated A(n) at {len(accuracy.points)} token counts on {accuracy.num_samples} images"
    )
    if path is not None:
        accuracy.save(path)
    return accuracy


class _Run:
    """One :func:`find_r` on one Target: the model prepared there once, when first needed (an
    export costs seconds), then timed for L(n) and the checks of the selection."""

    def __init__(
        self, eager: nn.Module, vit: nn.Module, target: Target, layer: int, search: SearchConfig,
        console: Console, stack: contextlib.ExitStack,
    ) -> None:  # fmt: skip
        self.eager, self.vit, self.layer, self.search, self.console, self.stack = (
            eager,
            vit,
            layer,
            search,
            console,
            stack,
        )
        self.given, self.target = target, target.on(vit)
        self._prepared: Prepared | None = None

    def prepared(self) -> Prepared:
        if self._prepared is None:
            said = self.target.backend.announce(model_name(self.vit), self.layer)
            if said:
                self.console.log(said)
            self._prepared = self.stack.enter_context(
                self.given.prepare(self.eager, layer=self.layer, vit=self.vit)
            )
        return self._prepared

    def latency(self, accuracy: AccuracyProfile, reuse: Reuse, notes: _Notes) -> LatencyProfile:
        """L(n): reused where valid (same model, architecture, layer and Target), else measured."""
        vit, target = self.vit, self.target
        expect = dict(model=model_name(vit), architecture=architecture(vit), layer=self.layer) | target.key()
        path = None if reuse.latency_path is None else Path(reuse.latency_path)
        earlier = reuse.previous and reuse.previous.latency
        latency = _reuse(LatencyProfile, path, earlier, expect, notes.lines, reuse.origin)
        if latency is None:
            notes.flush()
            self.console.log(
                f"measuring L(n) on {target.torch_device} at {target.precision}, batch {target.batch_size}"
            )
            guide = accuracy if self.search.utility_mode else None
            latency = latency_profile(
                self.prepared(), vit, target, self.layer, self.search, guide, self.console.progress
            )
            notes.lines.append(f"measured L(n) at {len(latency.points)} token counts ({latency.sampling})")
            if path is not None:
                latency.save(path)
        return latency

    def checked(self, selection: Selection, latency: LatencyProfile, accuracy: AccuracyProfile) -> Selection:
        """``selection`` verified (or, without verification, n* re-timed against N), rated for
        stability, and warned about when it keeps too little accuracy."""
        search, console = self.search, self.console
        if search.verify:
            measure = lambda r, decided: speedups(self.prepared(), r, search, decided)  # noqa: E731
            selection = check_candidates(
                selection, measure, candidates=search.verify_candidates, log=console.log
            )
            if selection.prediction_check:  # said once, as a line of its own
                console.log(selection.prediction_check)
        else:  # the verification would time n* against N, side by side, afresh: re-time them
            again = dataclasses.replace(search, retime_points=0)

            def regrid(grid: list[int]) -> LatencyProfile:
                at = dataclasses.replace(again, grid=tuple(grid))
                return latency_profile(self.prepared(), self.vit, self.target, self.layer, at, None, False)

            selection = retimed_at_star(selection, regrid)
        selection = rated(
            selection, latency, lambda lat: search.select(lat, accuracy), search.stability_resamples
        )
        if selection.stability_line:
            console.log(f"stability: {selection.stability_line}")
        _check_accuracy_kept(selection, console.warning)
        return selection


def find_r(
    model: nn.Module,
    data: object | None = None,
    target: Target | str | None = None,
    *,
    layer: int = 3,
    search: SearchConfig | None = None,
    vit: nn.Module | None = None,
    reuse: Reuse | None = None,
    console: Console | None = None,
) -> SearchResult:
    """Choose R for ``model`` (or the ViT inside it) on ``target``.

    ``data``: labelled images for the accuracy estimate (a Dataset or DataLoader of
    ``(image, label)``); it may be None when a valid accuracy profile is at hand. ``target``
    (a :class:`pomt.Target` or a runtime's name): where and how the latency is timed and R
    verified (device, dtype, precision, runtime, threads, batch size; what it leaves open comes
    from the model). In an exported runtime (``onnxruntime``, ``openvino``) the fp32 export is
    timed and verified at the precision the runtime really runs in (``openvino:bf16``); A(n) is
    estimated in PyTorch: ``pomt.deploy.export`` checks each export equal to it. ``search``:
    the objective and how L(n) and A(n) are measured and R verified.

    Profiles are reused where they are valid (``reuse``: an earlier result and JSON files):
    latency for the same architecture (depth, width, heads, patch size, N, prefix), model and
    Target (:meth:`pomt.Target.key`: device, dtype, precision, batch size, runtime and its
    version, on a CPU the thread count) and layer, whatever the weights; accuracy only for the
    same weights (a fingerprint of the parameters) and token count. Anything else is measured
    again; ``console.log`` receives one line for each decision and its reason.

    ``torch.compile``'d modules are timed and evaluated as their eager originals (a compiled
    module would recompile at every token count); the user's compiled wrapper is kept. Unless
    ``search.verify`` is off, the choice is then checked against the unpruned model
    (``pomt.offline.verify``). ``console.warn`` receives a warning when the chosen R keeps less
    than ``LOW_ACCURACY_FRACTION`` of the unpruned accuracy.
    """
    search, target = SearchConfig.coerce(search), Target.coerce(target)
    reuse, console = reuse or Reuse(), console or Console()
    notes = _Notes(console.log)
    with uncompiled(model) as (eager, compiled), contextlib.ExitStack() as stack:
        if compiled:
            notes.lines.append(
                f"timing the eager module: {', '.join(compiled)} torch.compile'd, left as they are"
            )
        vit = find_vit(eager)[1] if vit is None else unwrap_compiled(vit)
        run = _Run(eager, vit, target, layer, search, console, stack)
        accuracy = _accuracy(eager, data, vit, run.target, search, reuse, notes, console)
        latency = run.latency(accuracy, reuse, notes)
        notes.flush()
        if (flat := flat_profile(latency)) is not None:
            console.log(flat)
        selection = run.checked(search.select(latency, accuracy), latency, accuracy)
    return SearchResult(selection, latency, accuracy, tuple(notes.lines))
