"""The two profiles of POMT's offline step, as records that save to and load from JSON.

A :class:`LatencyProfile` holds L(n) of one model on one device, batch size, dtype and input
size; an :class:`AccuracyProfile` holds A(n) of one set of weights on a seeded sample. Both
carry the metadata that says what they are valid for, so a profile measured for another
setup is rejected naming the field (``check``/``load(expect=...)``), and both are plain JSON
(never pickle): latency measured on an edge device and accuracy measured on a server are
combined later by ``pomt.select_r``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from pomt.errors import PomtValueError
from pomt.timing import TimingStats, device_name

__all__ = [
    "SCHEMA_VERSION",
    "LatencyPoint",
    "SearchedPoints",
    "AccuracyPoint",
    "LatencyProfile",
    "AccuracyProfile",
    "write_json",
]

SCHEMA_VERSION = 2


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON at ``path`` atomically (a temporary file, then a rename, so a
    reader never sees half a file); parent folders are created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class LatencyPoint(TimingStats):
    """Latency of the deployed model with ``n`` tokens after the pruning block."""

    n: int = 0

    @classmethod
    def from_stats(cls, n: int, stats: TimingStats) -> LatencyPoint:
        return cls(n=int(n), values_ms=tuple(stats.values_ms), **stats.to_dict())


@dataclass(frozen=True)
class SearchedPoints:
    """What a search measured and the sawtooth period it detected (0: none), read by
    ``select_r`` as it reads a latency profile (``points``, ``period``)."""

    points: list[LatencyPoint]
    period: int = 0

    @classmethod
    def of(cls, measured: dict[int, TimingStats], period: int = 0) -> SearchedPoints:
        return cls([LatencyPoint.from_stats(n, s) for n, s in sorted(measured.items())], int(period or 0))


@dataclass(frozen=True)
class AccuracyPoint:
    """Top-1 accuracy (a fraction) with ``n`` random tokens kept, over ``samples`` images."""

    n: int
    accuracy: float
    samples: int

    @property
    def stderr(self) -> float:
        """Binomial standard error of ``accuracy``."""
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 0.0) / max(self.samples, 1))


def normalise(value: Any) -> Any:
    """A comparable, JSON-like form (tuples become lists, torch dtypes their short name)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, tuple):
        return [normalise(v) for v in value]
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class _Profile:
    """What both profiles record, and their JSON save/load (never pickle): the model, where it
    was measured, its token layout and input size, the points, and the versions that made them."""

    kind: ClassVar[str]
    _point_type: ClassVar[type]
    _old_keys: ClassVar[dict[str, str]] = {}  # JSON key of an earlier version -> its field now

    model: str
    device: str
    img_size: tuple[int, int]
    n_total: int
    prefix: int
    points: list[Any]
    torch_version: str = field(default_factory=lambda: str(torch.__version__))
    timm_version: str = field(default_factory=lambda: timm_version())
    created: str = field(default_factory=lambda: _now())

    @property
    def grid(self) -> list[int]:
        """The measured token counts n, ascending."""
        return [p.n for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": f"pomt.{self.kind}_profile", "schema_version": SCHEMA_VERSION}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = [asdict(p) for p in value] if f.name == "points" else normalise(value)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON (parent folders are created). Returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "profile") -> Any:
        if not isinstance(data, Mapping):
            raise PomtValueError(f"{source}: expected a JSON object, found {type(data).__name__}")
        schema = data.get("schema")
        expected_schema = f"pomt.{cls.kind}_profile"
        if schema != expected_schema:
            raise PomtValueError(
                f"{source}: not a {cls.kind} profile (schema {schema!r}, expected {expected_schema!r})"
            )
        version = data.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise PomtValueError(f"{source}: missing or invalid schema_version {version!r}")
        if version > SCHEMA_VERSION:
            raise PomtValueError(
                f"{source}: schema_version {version} was written by a newer pomt (this one reads {SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            raise PomtValueError(
                f"{source}: schema_version {version} predates the first release (this pomt reads "
                f"{SCHEMA_VERSION}); measure the profile again"
            )
        data = {cls._old_keys.get(k, k): v for k, v in data.items() if cls._old_keys.get(k) not in data}
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        required = [
            f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise PomtValueError(f"{source}: missing field(s) {', '.join(missing)} (truncated or edited?)")
        kwargs = {n: data[n] for n in names if n in data}
        raw_points = kwargs.get("points")
        if not isinstance(raw_points, list) or not raw_points:
            raise PomtValueError(f"{source}: `points` must be a non-empty list")
        point_fields = [f.name for f in fields(cls._point_type) if f.name != "values_ms"]
        points = []
        for i, raw in enumerate(raw_points):
            if not isinstance(raw, Mapping) or any(k not in raw for k in point_fields):
                raise PomtValueError(f"{source}: point {i} must be an object with {', '.join(point_fields)}")
            try:
                kwargs_i = {k: (int if k in ("n", "samples") else float)(raw[k]) for k in point_fields}
                if raw.get("values_ms"):  # the samples themselves (optional: older files lack them)
                    kwargs_i["values_ms"] = tuple(float(v) for v in raw["values_ms"])
                points.append(cls._point_type(**kwargs_i))
            except (TypeError, ValueError) as err:
                raise PomtValueError(f"{source}: point {i} has a bad value ({err})") from err
        kwargs["points"] = sorted(points, key=lambda p: p.n)
        if isinstance(kwargs.get("img_size"), list):
            kwargs["img_size"] = tuple(kwargs["img_size"])
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise PomtValueError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None) -> Any:
        """Read a profile; with ``expect``, reject one whose fields differ (naming the field).

        ``expect`` maps field names (e.g. ``model``, ``device``, ``batch_size``, ``dtype``,
        ``img_size``, ``layer``) to the values of the current setup; dtypes may be given as
        ``torch.float16`` or ``"float16"``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{cls.kind} profile not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise PomtValueError(f"{path} is not a text JSON profile ({err})") from err
        except json.JSONDecodeError as err:
            raise PomtValueError(f"{path} is not valid JSON (corrupt or truncated?): {err}") from err
        profile = cls.from_dict(data, source=str(path))
        if expect:
            profile.check(expect, source=str(path))
        return profile

    def mismatch(self, expect: Mapping[str, Any]) -> str | None:
        """None when every field in ``expect`` has the expected value, else why not (the first
        field that differs, e.g. ``it was measured with precision='32-true', the current
        precision is 'bf16-mixed'``). A field the profile does not record (a profile written by
        an older pomt) never matches."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        for key, wanted in expect.items():
            if key not in names or key == "points":
                raise PomtValueError(
                    f"cannot check {key!r}: {self.kind} profiles have {', '.join(sorted(names))}"
                )
            have = normalise(getattr(self, key))
            if have == "" and normalise(wanted) != "":
                return (
                    f"it does not record its {key} (written by an older pomt), so it cannot be checked "
                    f"against the current {key} {normalise(wanted)!r}"
                )
            if key == "device" and (
                isinstance(wanted, torch.device) or str(wanted).split(":")[0] in ("cpu", "cuda")
            ):
                wanted = device_name(wanted)  # compare hardware names, not "cuda:0"
            if have != normalise(wanted):
                if key == "threads":  # CPU latency depends on the thread count
                    return (
                        f"it was timed on {have} CPU thread(s), this process runs {normalise(wanted)} "
                        "(torch.get_num_threads())"
                    )
                return f"it was measured with {key}={have!r}, now {key}={normalise(wanted)!r}"
        return None

    def check(self, expect: Mapping[str, Any], source: str = "profile") -> None:
        """Raise ValueError naming the first field whose value differs from ``expect``."""
        why = self.mismatch(expect)
        if why is not None:
            raise PomtValueError(f"{source} does not match: {why}. Measure a new profile for this setup.")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def timm_version() -> str:
    try:
        import timm

        return str(timm.__version__)
    except ImportError:  # pragma: no cover - timm is a dependency
        return ""


@dataclass(frozen=True, kw_only=True)
class LatencyProfile(_Profile):
    """L(n) of one model on one device, batch size, dtype and input size.

    ``points`` are sorted by ``n`` (the tokens leaving the pruning block ``layer``; n ==
    ``n_total`` is the unpruned model) and keep the spread of the samples. ``architecture``
    (depth, width, heads, patch) and the other fields say which setups the profile is valid
    for: latency does not depend on the weights, so it is reused across weights, never across
    architectures, devices, dtypes or batch sizes.
    """

    kind: ClassVar[str] = "latency"
    _point_type: ClassVar[type] = LatencyPoint
    _old_keys: ClassVar[dict[str, str]] = {"search": "sampling"}

    device_type: str
    batch_size: int
    dtype: str
    layer: int
    threads: int | None
    cuda_graphs: bool
    sampling: (
        str  # how the token counts were chosen: "grid", "fast", "fast-guided(...)", "..., relative to N"
    )
    points: list[LatencyPoint]
    architecture: str = ""
    precision: str = ""
    kernels: str = ""  # the implementation POMT's block ran while timed (pomt.method.ops.kernel_backend)
    # what ran the model (pomt.deploy.runtimes): torch, or the exported graph in onnxruntime/openvino,
    # its version and session options; ``precision`` is then ``<runtime>:<the precision it ran in>``
    runtime: str = "torch"
    runtime_version: str = ""
    runtime_options: str = ""
    # the sawtooth period the search found (0: none): the latency fit never joins a multiple of it
    # to the count after it (``pomt.offline.curves.step_fit``)
    period: int = 0

    @property
    def latency_ms(self) -> dict[int, float]:
        """Median latency per token count."""
        return {p.n: p.median_ms for p in self.points}


@dataclass(frozen=True, kw_only=True)
class AccuracyProfile(_Profile):
    """A(n): top-1 with n random tokens kept after the embedding, on a seeded sample.

    ``weights`` is a fingerprint of the parameters it was measured with: accuracy depends on
    them, so the profile is reused only for the same weights.
    """

    kind: ClassVar[str] = "accuracy"
    _point_type: ClassVar[type] = AccuracyPoint

    num_samples: int
    num_classes: int
    seed: int
    class_balanced: bool
    dataset: str
    points: list[AccuracyPoint]
    weights: str = ""

    @property
    def accuracy(self) -> dict[int, float]:
        return {p.n: p.accuracy for p in self.points}
