"""Where and how a model runs: one :class:`Target` that profiling, verification, ``find_r``, the
sweep, the Lightning callback and the export all take.

A Target holds the runtime (``torch``, ``cuda_graphs``, ``onnxruntime``, ``openvino``: each one
class of :mod:`pomt.deploy.runtimes`, with its options), the device, the dtype and the
precision, the threads and the batch size. What is left out is filled from the model when it
is used (:meth:`Target.on`): its device, its dtype, torch's thread count, batch size 1, the
precision from autocast and the dtype (or the runtime's own, for an exported graph).

Its identity (:meth:`Target.key`) is what a latency profile is keyed by and what the record
says was timed. What runs is kept apart from how it is timed, as in
``torch.utils.benchmark.Timer``: :meth:`Target.prepare` gives the model ready to run pruned to
any token count; ``pomt.timing`` and ``pomt.offline`` time it.

    >>> Target.coerce("openvino").runtime
    'openvino'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pomt.deploy.placement import precision_name, resolve_dtype
from pomt.errors import PomtValueError, TargetError, is_int
from pomt.models import device_of, dtype_of, find_vit, uncompiled, unwrap_compiled
from pomt.timing import device_name

__all__ = ["Target", "Runtime", "Prepared", "Call", "RUNTIMES", "runtime_named"]

RUNTIMES: dict[str, type[Runtime]] = {}  # by name, filled as each Runtime subclass is defined


def runtime_named(name: object, options: dict[str, Any] | None = None) -> Runtime:
    """The runtime called ``name`` with ``options``, else a TargetError naming the valid ones."""
    if not isinstance(name, str) or name not in RUNTIMES:
        raise TargetError(f"runtime must be one of {', '.join(RUNTIMES)}; got {name!r}")
    return RUNTIMES[name](**(options or {}))


@dataclass(frozen=True)
class Call:
    """The model pruned to one token count: ``run()`` is what a timer times, ``setup()`` (or
    None) runs untimed before each call (an eager model switching its pruning), ``mode`` says
    how it runs (``eager``, ``cuda_graphs``, ``openvino:bf16 graph``); ``infer``, for a runtime
    that runs a compiled graph, runs it on other images of the same shape (its accuracy)."""

    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    mode: str = ""
    # an exported configuration on any batch of its compiled shape (images -> logits), else None
    infer: Callable[[torch.Tensor], torch.Tensor] | None = None


class Prepared:
    """A model prepared by a runtime: a :class:`Call` per token count n, and what a latency
    profile records about how it ran (:meth:`record`, asked after the timing). ``device`` is
    the one a timer synchronises (the CPU for an exported graph)."""

    n_total: int
    device: torch.device

    def at(self, n: int) -> Call:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """``threads``, ``cuda_graphs``, ``kernels``, ``precision`` and, for an exported runtime,
        ``runtime_version`` and ``runtime_options`` (the LatencyProfile fields)."""
        raise NotImplementedError

    def configured(self, method: str, r: int | tuple[int, ...], label: str) -> Call | None:
        """The model pruned by any ``method`` at ``r`` (a sweep's configuration, named ``label`` in
        warnings), or None where this runtime cannot run it (with a warning saying why)."""
        raise NotImplementedError


class Runtime:
    """One way to run a model; a subclass with a ``name`` registers itself in :data:`RUNTIMES`.

    ``devices``: the device types it runs on. ``options`` (keywords of the constructor) are the
    runtime's own settings, recorded with what it timed.
    """

    name: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    exported: ClassVar[bool] = False  # runs an exported graph of its own (not the module)
    marker: ClassVar[str] = "x"  # its rows' marker in a figure that shows several runtimes
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            RUNTIMES[cls.name] = cls

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            valid = ", ".join(self.option_names) or "none"
            raise TargetError(
                f"runtime {self.name!r} has no option(s) {', '.join(unknown)}; its options: {valid}"
            )
        self.options = dict(options)

    def check(self, device: torch.device) -> None:
        """A TargetError when this runtime does not run on ``device``."""
        if device.type not in self.devices:
            raise TargetError(
                f"runtime {self.name!r} runs on {' or '.join(self.devices)}; got device {str(device)!r}: "
                f"use device='{self.devices[0]}'"
            )

    def version(self) -> str:
        return str(torch.__version__)

    def precision(self, device: torch.device, asked: str) -> str:
        """What a profile timed here records as its precision (``asked``: the Target's)."""
        return asked

    def key(self, device: torch.device) -> dict[str, Any]:
        """The LatencyProfile fields, beyond the Target's, that a reused profile must match."""
        return {}

    def prepare(
        self, model: nn.Module, vit: nn.Module, layer: int, target: Any, example: torch.Tensor | None
    ) -> Any:
        """A context manager giving the :class:`Prepared` model, fed ``example`` (else a seeded
        random batch at the Target's shape); ``target`` is resolved."""
        raise NotImplementedError

    def computes_as_pytorch(self, precision: str) -> bool:
        """Whether a model run here at ``precision`` (what :meth:`precision` says) computes what
        PyTorch computes, so that PyTorch's accuracy holds for it."""
        return True

    def kernels(self, device: torch.device, dtype: torch.dtype | None) -> str | None:
        """The implementation POMT's block runs with here (``pomt.method.ops``'s choice), or None
        where the runtime runs a graph of its own."""
        return None

    def describe_timing(self, device: torch.device, precision: str) -> str:
        """How calls run here, in words, for a report's header (``eager calls, precision 32-true``)."""
        return f"{self.name} calls, precision {precision}"

    def announce(self, model: str, layer: int) -> str | None:
        """A line saying what :meth:`prepare` is about to do when it takes a while, else None."""
        return None

    def convert(self, onnx_path: Path) -> str | None:
        """What ``export_onnx`` writes beside the ONNX file for this runtime (its path), if anything."""
        return None


def _positive(name: str, value: object) -> None:
    if value is not None and (not is_int(value) or value < 1):
        raise TargetError(f"{name} must be a positive int or None, got {value!r}")


@dataclass(frozen=True)
class Target:
    """Where and how the model runs (None: taken from the model or the caller when used).

    ``runtime``: a name of :data:`RUNTIMES`; ``options``: that runtime's own settings
    (OpenVINO: ``precision``). ``device``/``dtype``: where the model runs and in what
    (exported runtimes: fp32, computed at the runtime's precision). ``precision``: what the
    timing is recorded at, in Lightning's names (a Trainer's ``trainer.precision``). ``threads``:
    CPU threads (torch's, or the runtime's). ``batch_size`` and ``img_size``: the input.
    """

    runtime: str = "torch"
    device: str | None = None
    dtype: str | None = None
    precision: str | None = None
    threads: int | None = None
    batch_size: int | None = None
    img_size: tuple[int, int] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalised once: plain strings and tuples
        set_(self, "options", dict(self.options or {}))
        backend = runtime_named(self.runtime, self.options)
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise TargetError(
                    f"device must be a torch device such as 'cpu' or 'cuda:0'; got {self.device!r}"
                ) from err
            backend.check(device)
            set_(self, "device", str(device))
        if self.dtype is not None:
            try:
                set_(self, "dtype", str(resolve_dtype(self.dtype)).removeprefix("torch."))
            except PomtValueError as err:
                raise TargetError(str(err)) from err
        _positive("threads", self.threads)
        _positive("batch_size", self.batch_size)
        if self.img_size is not None:
            set_(self, "img_size", image_size_pair(self.img_size))

    # ------------------------------------------------------------------ parsing
    @classmethod
    def coerce(cls, value: Target | str | Mapping[str, Any] | None) -> Target:
        """``value`` as a Target: itself, the defaults for None, a runtime's name
        (``"openvino"``), or a mapping of the fields (a dict, Hydra's ``DictConfig``; unknown keys
        are a TargetError listing the valid ones)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(runtime=value)
        if not isinstance(value, Mapping):
            raise TargetError(
                f"target must be a Target, a runtime name ({', '.join(RUNTIMES)}) or a mapping of its fields; "
                f"got {type(value).__name__}"
            )
        data = {str(k): v for k, v in value.items()}
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise TargetError(f"target: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        if data.get("options") is not None:
            data["options"] = dict(data["options"])
        return cls(**data)

    # ------------------------------------------------------------------ use
    @property
    def backend(self) -> Runtime:
        """The runtime (one :class:`pomt.deploy.runtimes.Runtime`) with this Target's options."""
        return runtime_named(self.runtime, dict(self.options))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype or "float32")

    def on(self, model: nn.Module | None = None) -> Target:
        """This Target with what it leaves open filled from ``model`` (device, dtype), torch
        (threads on the CPU), batch size 1, and the precision it runs at (for an exported runtime
        the runtime's own, asked of it); a TargetError when the device cannot run here."""
        device = (
            torch.device(self.device) if self.device else (device_of(model) if model is not None else None)
        )
        device = device or torch.device("cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TargetError("device 'cuda' requested but CUDA is not available; use device='cpu'")
        dtype = self.dtype or str((dtype_of(model) if model is not None else None) or torch.float32)
        done = replace(self, device=str(device), dtype=dtype, batch_size=self.batch_size or 1)
        threads = done.threads or (torch.get_num_threads() if device.type == "cpu" else None)
        asked = self.precision or precision_name(device, done.torch_dtype)
        return replace(done, threads=threads, precision=done.backend.precision(device, asked))

    def key(self) -> dict[str, Any]:
        """What a latency profile timed on this (resolved) Target records, and a reused one must
        match: the hardware, batch size, dtype, precision and runtime; on a CPU the thread count
        (latency scales with it); the runtime's own (its version, whether CUDA graphs ran)."""
        device = self.torch_device
        key: dict[str, Any] = dict(
            runtime=self.runtime, device=device, batch_size=self.batch_size, dtype=self.torch_dtype,
            precision=self.precision,
        )  # fmt: skip
        if device.type == "cpu":
            key["threads"] = self.threads
        return key | self.backend.key(device)

    @contextlib.contextmanager
    def prepare(
        self,
        model: nn.Module,
        *,
        layer: int,
        vit: nn.Module | None = None,
        example: torch.Tensor | None = None,
    ) -> Iterator[Prepared]:
        """``model`` (the ViT ``vit`` inside it, found when None) ready to run here pruned to any
        token count (POMT at ``layer``) or configuration, fed ``example`` (default: a seeded
        random batch at this Target's batch and image size); put back as it was afterwards. A
        ``torch.compile``'d module runs as its eager original (it would recompile at every
        token count)."""
        target = self.on(model)
        with uncompiled(model) as (eager, _):
            vit = find_vit(eager)[1] if vit is None else unwrap_compiled(vit)
            with target.backend.prepare(eager, vit, layer, target, example) as prepared:
                yield prepared

    def describe_timing(self) -> str:
        """How calls run on this (resolved) Target, in words, for a report's header."""
        return self.backend.describe_timing(self.torch_device, self.precision or "?")

    def describe(self) -> str:
        """In words: ``openvino (openvino:bf16) on cpu (Intel Xeon), 2 threads, batch 1``."""
        device = self.torch_device
        threads = f", {self.threads} thread(s)" if self.threads else ""
        batch = f", batch {self.batch_size}" if self.batch_size else ""
        return f"{self.runtime} ({self.precision or '?'}) on {device} ({device_name(device)}){threads}{batch}"


def image_size_pair(value: Any) -> tuple[int, int]:
    """An image size as (height, width) from an int or a pair, else a TargetError."""
    pair = (value, value) if is_int(value) else tuple(value) if isinstance(value, list | tuple) else ()
    if len(pair) != 2 or not all(is_int(v) and v > 0 for v in pair):
        raise TargetError(f"img_size must be a positive int or a pair of them, got {value!r}")
    return (int(pair[0]), int(pair[1]))
