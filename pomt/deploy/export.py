"""Export a (pruned) ViT to ONNX for the runtime it will be deployed with, checked on the way.

``export_onnx`` writes the model as it is pruned now (POMT at R, Top-K, ToMe, or unpruned)
through torch's dynamo exporter, with static shapes at the example's batch size; runs the
file in ONNX Runtime against PyTorch on the example and raises :class:`ExportMismatch`
beyond the tolerance; optionally converts it to OpenVINO IR; and records what it is (method,
r, layer, batch, the check) in the ONNX metadata and in a JSON file beside it.

``export_token_graph`` is the one export that latency profiling in a runtime uses (see
``pomt.deploy.runtimes``): POMT at block ``layer`` with the number of tokens it keeps as a symbolic
axis, read from the length of a second input, so that a runtime fixes it per token count
when it compiles (a static graph at each n) without exporting again.

onnx, onnxscript, onnxruntime and openvino are the ``pomt[deploy]`` extra, imported when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pomt.deploy.placement import on_device, random_batch
from pomt.deploy.targets import Target
from pomt.errors import PomtError, PomtValueError
from pomt.errors import require as require_extra
from pomt.method.pruning import pruned, pruning_config
from pomt.models import find_vit, image_size, model_name, token_layout, vit_blocks

__all__ = [
    "ExportMismatch",
    "ExportRecord",
    "export_onnx",
    "export_token_graph",
    "require",
    "input_name",
    "run_onnxruntime",
    "to_openvino",
    "DEFAULT_TOLERANCE",
    "TOKENS_INPUT",
]

# Largest |ONNX Runtime - PyTorch| accepted on the example's logits (fp32 on both sides; the
# measured difference is ~2e-6 on DeiT-S).
DEFAULT_TOLERANCE = 1e-4
TOKENS_INPUT = "kept_tokens"  # the second input of the token graph: its length is n


class ExportMismatch(PomtError, RuntimeError):
    """The exported file's outputs differ from PyTorch's beyond the tolerance."""


def require(module: str) -> ModuleType:
    """Import ``module`` (onnx, onnxscript, onnxruntime, openvino), or say which extra has it."""
    return require_extra(module, "deploy")


@dataclass(frozen=True)
class ExportRecord:
    """What an exported file is and how it was checked (also in its metadata and JSON)."""

    path: str
    model: str
    method: str
    r: int | list[int]
    layer: int
    batch_size: int
    img_size: tuple[int, int]
    n_total: int
    exporter: str
    torch_version: str
    export_s: float
    checked_against: str
    max_abs_diff: float | None
    tolerance: float
    converted_path: str | None = None  # the runtime's own file beside it (OpenVINO IR)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@contextlib.contextmanager
def _quiet() -> Any:
    """The dynamo exporter prints its progress; a library call keeps it off the console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _dynamo_export(module: nn.Module, args: tuple, path: Path, **kwargs: Any) -> None:
    require("onnx")
    require("onnxscript")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        program = torch.onnx.export(module, args, dynamo=True, verbose=False, **kwargs)
        program.save(str(path))


def run_onnxruntime(path: str | os.PathLike[str], inputs: dict[str, Any], threads: int = 1) -> Any:
    """The first output of ``path`` on ``inputs`` in ONNX Runtime's CPU provider."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def _write_metadata(path: Path, record: ExportRecord) -> None:
    onnx = require("onnx")
    proto = onnx.load(str(path))
    props = {f"pomt.{k}": json.dumps(v) for k, v in record.to_dict().items() if k != "path"}
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def to_openvino(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``, weights kept in fp32)."""
    ov = require("openvino")
    path = Path(path)
    output = Path(output) if output is not None else path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(path)), str(output), compress_to_fp16=False)
    return output


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    target: Target | str | None = None,
    *,
    example: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check: bool = True,
    vit: nn.Module | None = None,
) -> ExportRecord:
    """Write ``model`` (as it is pruned now) to ``path`` as ONNX and check it in ONNX Runtime.

    ``target`` (a :class:`pomt.Target` or a runtime's name): what the file is for: its batch
    size and image size are the graph's static input shape, and its runtime may write its own
    file beside it (``openvino``: OpenVINO IR, ``.xml``/``.bin``). ``example``: the input the
    graph is traced and checked on (its shape then fixes the graph's; default: a seeded random
    batch at the Target's shape, on the CPU in fp32). The model is exported in eval mode on the
    CPU in fp32 and put back as it was. With ``check`` the file's output on the example must be
    within ``tolerance`` (max abs) of PyTorch's, else :class:`ExportMismatch`. The record is
    returned, written beside the file as ``<path>.json`` and stored in the ONNX metadata
    (``pomt.*`` keys).
    """
    target = Target.coerce(target)
    path = Path(path)
    if path.suffix != ".onnx":
        raise PomtValueError(f"the export path must end in .onnx, got {str(path)!r}")
    if not tolerance > 0:
        raise PomtValueError(f"tolerance must be > 0, got {tolerance!r}")
    vit = find_vit(model)[1] if vit is None else vit
    size = image_size(vit, target.img_size)
    if example is None:
        example = random_batch(vit, target.batch_size or 1, size, torch.device("cpu"), torch.float32)
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise PomtValueError(f"example must be an image batch (B, C, H, W), got {shape}")
    example = example.detach().to("cpu", torch.float32)
    config = pruning_config(vit)
    with on_device(model, vit, torch.device("cpu"), torch.float32), torch.autocast("cpu", enabled=False):
        with torch.inference_mode():
            expected = model(example).float().numpy()
        start = time.perf_counter()
        _dynamo_export(model, (example,), path)
        export_s = time.perf_counter() - start
    diff = None
    if check:
        got = run_onnxruntime(path, {input_name(path): example.numpy()})
        diff = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    ort_version = getattr(require("onnxruntime"), "__version__", "?") if check else ""
    record = ExportRecord(
        path=str(path),
        model=model_name(vit),
        method=config.method if config else "none",
        r=(list(config.r) if isinstance(config.r, tuple) else config.r) if config else 0,
        layer=config.layer if config else -1,
        batch_size=int(example.shape[0]),
        img_size=(int(example.shape[2]), int(example.shape[3])),
        n_total=token_layout(vit, (int(example.shape[2]), int(example.shape[3]))).n_total,
        exporter="torch.onnx.export(dynamo=True), static shapes",
        torch_version=str(torch.__version__),
        export_s=round(export_s, 3),
        checked_against=f"PyTorch fp32 on the example, in onnxruntime {ort_version} (CPU)" if check else "",
        max_abs_diff=diff,
        tolerance=float(tolerance),
    )
    if diff is not None and not diff <= tolerance:
        raise ExportMismatch(
            f"{path}: ONNX Runtime differs from PyTorch by {diff:.3g} (max abs) on the example, over the "
            f"tolerance {tolerance:g}; this export of {record.method} r={record.r} is not faithful"
        )
    converted = target.backend.convert(path)
    if converted is not None:
        record = dataclasses.replace(record, converted_path=converted)
    _write_metadata(path, record)
    path.with_name(path.name + ".json").write_text(json.dumps(record.to_dict(), indent=1) + "\n")
    return record


def input_name(path: str | os.PathLike[str]) -> str:
    """The name of the first input of an ONNX file (the images)."""
    onnx = require("onnx")
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


class _TokenGraph(nn.Module):
    """``model`` with POMT at ``block`` keeping ``len(kept)`` tokens: a symbolic count to export."""

    def __init__(self, model: nn.Module, block: nn.Module, n_total: int) -> None:
        super().__init__()
        self.model, self.n_total = model, n_total
        self.__dict__["block"] = block  # not a submodule: it is inside ``model`` already

    def forward(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        spec = self.block._pomt_spec
        self.block._pomt_spec = dataclasses.replace(spec, r=self.n_total - kept.shape[0])
        try:
            return self.model(x)
        finally:
            self.block._pomt_spec = spec


def export_token_graph(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    layer: int,
    batch_size: int,
    vit: nn.Module | None = None,
    img_size: tuple[int, int] | None = None,
) -> Path:
    """Export ``model`` with POMT at ``layer`` and a symbolic number of kept tokens n.

    The graph has two inputs: the images (static, ``batch_size``) and ``kept_tokens``, a
    float vector of length n (its values are not used) in p + 1 .. N - 1. A runtime that fixes
    n when it compiles (ONNX Runtime's free-dimension override, OpenVINO's ``reshape``) gets
    the static graph of POMT at r = N - n; ``pomt.deploy.runtimes`` checks it against PyTorch.
    The model's pruning is restored afterwards.
    """
    vit = find_vit(model)[1] if vit is None else vit
    size = image_size(vit, img_size)
    layout = token_layout(vit, size)
    n_total, prefix = layout.n_total, layout.prefix
    if n_total - prefix < 3:
        raise PomtValueError(
            f"a token graph needs at least 3 ordinary tokens, this model has {n_total - prefix}"
        )
    x = random_batch(vit, batch_size, size, torch.device("cpu"), torch.float32)
    n0 = (prefix + 1 + n_total - 1) // 2
    with (
        on_device(model, vit, torch.device("cpu"), torch.float32),
        torch.autocast("cpu", enabled=False),
        pruned(vit, "pomt", r=n_total - n0, layer=layer),
    ):
        block = vit_blocks(vit)[layer]
        wrapper = _TokenGraph(model, block, n_total).eval()
        dim = torch.export.Dim("tokens", min=prefix + 1, max=n_total - 1)
        _dynamo_export(
            wrapper,
            (x, torch.zeros(n0, dtype=torch.float32)),
            Path(path),
            input_names=["x", TOKENS_INPUT],
            dynamic_shapes={"x": None, "kept": {0: dim}},
        )
    return Path(path)
