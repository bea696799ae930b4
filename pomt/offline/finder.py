"""POMT's whole offline step in one call: ``find_r(model, data, ...)`` -> the selection and both profiles.

Accuracy first (it does not depend on the device, and it guides the latency search), then
latency on the device, then the choice of R. Profiles saved by an earlier call are reused
where they are valid for this model and setup. Lightning's callback and the evaluation
sweep go through here; the command-line tools run its steps one by one (``profile_latency``,
``estimate_accuracy``, ``select_r``, on different machines if need be), with the same
settings, as one :class:`SearchConfig` names them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pomt.deploy.runtimes import RuntimeModel, check_runtime, runtime_precision, runtime_version
from pomt.errors import is_int
from pomt.models import (
    architecture,
    device_of,
    dtype_of,
    find_vit,
    token_layout,
    uncompiled,
    unwrap_compiled,
)
from pomt.offline.profiles import AccuracyProfile, LatencyProfile
from pomt.offline.profiling import (
    estimate_accuracy,
    model_name,
    precision_name,
    profile_latency,
    resolve_dtype,
)
from pomt.offline.selection import Selection, check_objective, select_r
from pomt.offline.verify import paired_speedups, speedup_samples, verify
from pomt.timing import MIN_RUN_TIME
from pomt.weights import weights_fingerprint

__all__ = ["SearchConfig", "Search", "find_r", "LATENCY_SETTINGS", "LOW_ACCURACY_FRACTION"]

# Below this fraction of the unpruned model's estimated accuracy, the chosen R is warned about.
LOW_ACCURACY_FRACTION = 0.8

# The SearchConfig fields that pomt.profile_latency takes under the same names.
LATENCY_SETTINGS = tuple(
    "grid alpha warmup min_run_time cuda_graphs relative coarse_points max_points period".split()
)


def _plain(value: Any) -> Any:
    """A config value with OmegaConf's list containers as plain lists."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, tuple, list)):
        return [_plain(v) for v in value]
    return value


def _positive(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class SearchConfig:
    """How R is chosen: the objective, and how L(n) and A(n) are measured.

    Objective: maximise U(n) = alpha (1 - L/max L) + (1 - alpha) A/max A, or, with
    ``latency_budget_ms``, the most accurate n within the budget, or, with
    ``accuracy_floor`` (a fraction), the fastest n that reaches it.

    Latency: ``grid`` (token counts to time) or the adaptive search (``coarse_points``,
    ``max_points``; ``period``: a sawtooth's period in n, ``"auto"`` to detect one, None for
    none, see ``pomt.offline.grid.adaptive_search``); ``min_run_time`` seconds and ``warmup`` untimed calls per point;
    ``cuda_graphs`` times graph replays on CUDA; ``relative`` pairs every call with the
    unpruned model, which cancels a drifting machine (default: on the CPU, not on CUDA).

    Accuracy: ``accuracy_samples`` images (seeded by ``seed``, class-balanced), at
    ``accuracy_grid`` (default: 16 token counts), in batches of ``accuracy_batch_size``.

    Verification (``verify``, on by default; see ``pomt.offline.verify``): the chosen R is timed
    against the unpruned model, call by call, in ``verify_groups`` groups, for about
    ``verify_time`` seconds per candidate (the pairs adapt to the model's latency), and never
    fewer than ``verify_pairs`` pairs (at least one per group); R is kept only if it is
    significantly faster over the groups (and, in utility mode, its measured utility beats
    R = 0), else the next of up to ``verify_candidates`` candidates is tried, down to R = 0.

    :meth:`coerce` makes one from a mapping (a dict, or a Hydra/OmegaConf ``DictConfig``),
    rejecting unknown keys.
    """

    alpha: float = 0.5
    latency_budget_ms: float | None = None
    accuracy_floor: float | None = None
    grid: tuple[int, ...] | None = None
    coarse_points: int = 9
    max_points: int | None = None
    period: int | str | None = "auto"
    min_run_time: float = MIN_RUN_TIME
    warmup: int = 3
    cuda_graphs: bool = False
    relative: bool | None = None
    accuracy_samples: int = 1024
    accuracy_grid: tuple[int, ...] | None = None
    accuracy_batch_size: int | None = None
    seed: int = 0
    verify: bool = True
    verify_pairs: int = 6
    verify_time: float = 1.0
    verify_candidates: int = 3
    verify_groups: int = 6
    verify_blocks: InitVar[int | None] = None  # deprecated name of verify_groups

    @classmethod
    def coerce(cls, value: SearchConfig | Mapping[str, Any] | None) -> SearchConfig:
        """``value`` as a SearchConfig: itself, the defaults for None, or one built from a mapping
        (a dict, or a Hydra/OmegaConf ``DictConfig``; a ``_target_`` naming SearchConfig is
        dropped). Unknown keys are a ValueError listing the valid ones."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"search must be a SearchConfig or a mapping of its fields, got {type(value).__name__}"
            )
        data = {str(k): _plain(v) for k, v in value.items()}
        target = data.pop("_target_", None)
        if target is not None and str(target).rsplit(".", 1)[-1] != cls.__name__:
            raise ValueError(f"search: _target_ {target!r} is not pomt.SearchConfig")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid) - {"verify_blocks"})
        if unknown:
            raise ValueError(f"search: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**data)

    def __post_init__(self, verify_blocks: int | None) -> None:
        if verify_blocks is not None:  # "blocks" are the transformer's: these are timing groups
            warnings.warn("verify_blocks is now verify_groups", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "verify_groups", verify_blocks)
        check_objective(self.alpha, self.latency_budget_ms, self.accuracy_floor)
        if not self.min_run_time >= 0:
            raise ValueError(f"min_run_time must be >= 0, got {self.min_run_time!r}")
        if self.coarse_points < 2:
            raise ValueError(f"coarse_points must be >= 2, got {self.coarse_points!r}")
        _positive("max_points", self.max_points)
        if self.period not in ("auto", None) and (
            isinstance(self.period, bool) or not isinstance(self.period, int)
        ):
            raise ValueError(f"period must be 'auto', None or an int (16), got {self.period!r}")
        _positive("accuracy_samples", self.accuracy_samples, allow_none=False)
        _positive("accuracy_batch_size", self.accuracy_batch_size)
        _positive("verify_pairs", self.verify_pairs, allow_none=False)
        _positive("verify_candidates", self.verify_candidates, allow_none=False)
        _positive("verify_groups", self.verify_groups, allow_none=False)
        if not self.verify_time >= 0:
            raise ValueError(f"verify_time must be >= 0, got {self.verify_time!r}")
        for name in ("grid", "accuracy_grid"):  # lists from YAML or JSON become tuples
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def utility_mode(self) -> bool:
        return self.latency_budget_ms is None and self.accuracy_floor is None

    def relative_on(self, device: torch.device | str) -> bool:
        """Whether latency is timed relative to the unpruned model on ``device``."""
        return torch.device(device).type != "cuda" if self.relative is None else bool(self.relative)

    def latency_kwargs(
        self, accuracy: AccuracyProfile | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, Any]:
        """Keyword arguments of :func:`pomt.profile_latency` on ``device`` (the search guided by
        ``accuracy`` in utility mode)."""
        kwargs = {name: getattr(self, name) for name in LATENCY_SETTINGS}
        kwargs["accuracy"] = accuracy if self.utility_mode else None
        kwargs["relative"] = self.relative_on(device)
        return kwargs

    def accuracy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pomt.estimate_accuracy`."""
        return dict(
            num_samples=self.accuracy_samples,
            grid=self.accuracy_grid,
            seed=self.seed,
            batch_size=self.accuracy_batch_size,
        )

    def select(self, latency: LatencyProfile, accuracy: AccuracyProfile) -> Selection:
        """R from the two profiles with this objective (cheap: reused profiles are re-selected)."""
        return select_r(
            latency,
            accuracy,
            alpha=self.alpha,
            latency_budget_ms=self.latency_budget_ms,
            accuracy_floor=self.accuracy_floor,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Search:
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
    def from_dict(cls, data: dict[str, Any]) -> Search | None:
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
    for profile, where in sources:
        why = profile.mismatch(expect)
        if why is None:
            notes.append(f"reusing {where}")
            return profile
        notes.append(f"not reusing {where}: {why}")
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


def find_r(
    model: nn.Module,
    data: object | None = None,
    *,
    layer: int = 3,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    config: SearchConfig | None = None,
    vit: nn.Module | None = None,
    latency_path: str | os.PathLike[str] | None = None,
    accuracy_path: str | os.PathLike[str] | None = None,
    previous: Search | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
    precision: str | None = None,
    warn: Callable[[str], object] | None = None,
    previous_origin: str = "measured earlier",
    runtime: str = "torch",
) -> Search:
    """Choose R for ``model`` (or the ViT inside it) on ``device`` at ``batch_size``.

    ``data``: labelled images for the accuracy estimate (a Dataset or DataLoader of
    ``(image, label)``); it may be None when a valid accuracy profile is at hand.
    ``dtype``: the latency profile's dtype (default: the model's). ``precision``: what the
    latency is timed at, in Lightning's names (``32-true``, ``bf16-mixed``, ``16-mixed``, ...;
    default: ``16-mixed``/``bf16-mixed`` when autocast is on, else ``<dtype>-true``); a
    profile timed at another precision, or one that does not record it, is measured again.

    Profiles are reused where they are valid, from ``previous`` (an earlier search, e.g. from a
    checkpoint; ``previous_origin`` names it in the notes, e.g. ``"loaded from the checkpoint"``)
    or from ``latency_path``/``accuracy_path`` (JSON files, written after measuring): latency
    for the same architecture (depth, width, heads, patch size, N, prefix), model, device,
    dtype, precision, batch size and layer (on a CPU, thread count), whatever the weights;
    accuracy only for the same weights (a fingerprint of the parameters) and token count. Anything else is
    measured again; ``log`` receives one line for each decision and its reason.

    ``torch.compile``'d modules are timed and evaluated as their eager originals (a compiled
    module would recompile at every token count); the user's compiled wrapper is kept.
    Unless ``config.verify`` is off, the choice is then checked against the unpruned model
    (``pomt.offline.verify``). ``warn`` receives a warning when the chosen R keeps less than
    ``LOW_ACCURACY_FRACTION`` of the unpruned accuracy (default: ``warnings.warn``).

    ``runtime`` (``pomt.deploy.runtimes``): ``torch`` times the module; ``onnxruntime``/``openvino``
    export it (fp32) and time and verify the compiled graphs in that runtime, at the precision it
    really runs in (``precision`` is then ``<runtime>:<precision>``, e.g. ``openvino:bf16``). A
    profile is reused only for the same runtime, runtime version, precision and thread count.
    A(n) is estimated in PyTorch: ``pomt.deploy.export`` checks each export equal to it.
    """
    config = SearchConfig.coerce(config)
    warn = warn or (lambda text: warnings.warn(text, stacklevel=3))
    device = torch.device(device) if device is not None else device_of(model)
    runtime = check_runtime(runtime, device)
    deployed: list[RuntimeModel] = []  # exported once, when first needed
    notes: list[str] = []
    logged = 0

    def flush() -> None:  # each decision is said as it is made
        nonlocal logged
        for note in notes[logged:]:
            log(note)
        logged = len(notes)

    with uncompiled(model) as (eager, compiled):
        if compiled:
            notes.append(f"timing the eager module: {', '.join(compiled)} torch.compile'd, left as they are")
        vit = find_vit(eager)[1] if vit is None else unwrap_compiled(vit)
        dtype = (dtype_of(vit) or torch.float32) if dtype is None else dtype
        if runtime != "torch":
            precision = f"{runtime}:{runtime_precision(runtime, device)}"
        precision = str(precision) if precision else precision_name(device, dtype)
        name = model_name(vit)

        expect = dict(model=name, n_total=token_layout(vit).n_total, weights=weights_fingerprint(eager))
        path = None if accuracy_path is None else Path(accuracy_path)
        accuracy = _reuse(
            AccuracyProfile, path, previous and previous.accuracy, expect, notes, previous_origin
        )
        if accuracy is None:
            if data is None:
                raise ValueError(
                    "find_r needs labelled data for the accuracy estimate (a Dataset or DataLoader of "
                    "(image, label)), or a saved accuracy profile of these weights (accuracy_path)"
                )
            flush()
            log(f"estimating A(n) on up to {config.accuracy_samples} images")
            accuracy = estimate_accuracy(
                eager, data, vit=vit, device=device, progress=progress, **config.accuracy_kwargs()
            )
            notes.append(
                f"estimated A(n) at {len(accuracy.points)} token counts on {accuracy.num_samples} images"
            )
            if path is not None:
                accuracy.save(path)

        # how the latency is timed: what profile_latency takes, and what a reused profile must match
        setup = dict(device=device, batch_size=batch_size, dtype=dtype, precision=precision, layer=layer)
        expect = dict(model=name, architecture=architecture(vit), runtime=runtime, **setup)
        if device.type == "cuda":
            expect["cuda_graphs"] = config.cuda_graphs
        elif device.type == "cpu":  # CPU latency scales with its threads: never reused at another count
            expect["threads"] = torch.get_num_threads()
        if runtime != "torch":
            expect["runtime_version"] = runtime_version(runtime)

        def exported() -> RuntimeModel | None:
            if runtime != "torch" and not deployed:
                log(f"exporting {name} for {runtime} (unpruned, and POMT at block {layer} per token count)")
                deployed.append(
                    RuntimeModel(eager, runtime, layer=layer, batch_size=batch_size, vit=vit, device=device)
                )
            return deployed[0] if deployed else None

        path = None if latency_path is None else Path(latency_path)
        latency = _reuse(LatencyProfile, path, previous and previous.latency, expect, notes, previous_origin)
        if latency is None:
            flush()
            log(f"measuring L(n) on {device} at {precision}, batch {batch_size}")
            latency = profile_latency(
                eager,
                vit=vit,
                progress=progress,
                runtime=runtime,
                runtime_model=exported(),
                **setup,
                **config.latency_kwargs(accuracy, device),
            )
            notes.append(f"measured L(n) at {len(latency.points)} token counts ({latency.sampling})")
            if path is not None:
                latency.save(path)
        flush()
        selection = config.select(latency, accuracy)
        if config.verify:

            def speedups_at(r: int) -> tuple[list[float], float]:
                graphs = exported()
                if graphs is not None:  # the compiled graphs, side by side in the runtime
                    n = graphs.n_total - r
                    return paired_speedups(
                        (graphs.call(n), None),
                        (graphs.call(graphs.n_total), None),
                        warmup=config.warmup,
                        min_run_time=config.verify_time,
                        min_pairs=config.verify_pairs,
                        groups=config.verify_groups,
                    )
                return speedup_samples(
                    eager,
                    vit,
                    r,
                    layer=layer,
                    batch_size=batch_size,
                    device=device,
                    dtype=resolve_dtype(dtype),
                    cuda_graphs=config.cuda_graphs,
                    warmup=config.warmup,
                    min_run_time=config.verify_time,
                    min_pairs=config.verify_pairs,
                    groups=config.verify_groups,
                )

            selection = verify(selection, speedups_at, candidates=config.verify_candidates, log=log)
        _check_accuracy_kept(selection, warn)
    return Search(selection, latency, accuracy, tuple(notes))
