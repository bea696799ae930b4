"""The runtimes a pruned ViT is timed and deployed in, each one class of one small protocol.

A :class:`Runtime` prepares a model once (:meth:`Runtime.prepare`, a context: the model is put
back afterwards) and then gives, per token count n, a :class:`Call` that runs it pruned to n
(POMT at r = N - n; n = N is the unpruned model) on a fixed input batch. What runs is kept
apart from how it is timed: ``pomt.offline`` times the calls with ``pomt.timing``.

- ``torch``: the module itself, eager;
- ``cuda_graphs``: the module captured in a CUDA graph per n and replayed (eager, with a
  warning, where a graph cannot be captured);
- ``onnxruntime``, ``openvino``: what would be deployed, the exported ONNX graph compiled by
  that runtime at a static shape and in the precision it really runs at (OpenVINO's CPU plugin
  defaults to bf16 on CPUs with bf16 units, and says so).

Exporting once per token count costs seconds each (DeiT-S: ~8 s), so :class:`RuntimeModel`
exports twice: the unpruned model, and one POMT graph whose kept-token count is a symbolic axis
(``pomt.deploy.export.export_token_graph``); per n, the runtime fixes that axis before it
compiles (ONNX Runtime's free-dimension override, OpenVINO's ``reshape``): a static graph at n,
from one export, checked against PyTorch once.

A new runtime (TensorRT, ``torch.compile``) is one new subclass with a ``name``: it registers
itself, and a :class:`pomt.deploy.targets.Target` can name it. ONNX Runtime's CUDA and TensorRT
providers are used for ``device="cuda"`` where installed (untested here: no GPU).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pomt.deploy.export import (
    TOKENS_INPUT,
    require,
    to_openvino,
)
from pomt.deploy.graphs import ExportedModel, RuntimeInfo, token_dim
from pomt.deploy.placement import on_device, random_batch
from pomt.deploy.targets import Call, Prepared, Runtime, runtime_named
from pomt.errors import TargetError
from pomt.method.ops import kernel_backend
from pomt.method.pruning import apply_pruning, remove_pruning
from pomt.models import image_size, token_layout
from pomt.timing import cuda_graph

__all__ = [
    "Eager",
    "CudaGraphs",
    "Exported",
    "OnnxRuntime",
    "OpenVINO",
    "compile_onnx",
    "cuda_graph_or_eager",
]

# --------------------------------------------------------------------------- PyTorch


class _EagerModel(Prepared):
    def __init__(self, model: nn.Module, vit: nn.Module, x: torch.Tensor, layer: int, target: Any) -> None:
        self.model, self.vit, self.x, self.layer, self.target = model, vit, x, layer, target
        self.n_total = token_layout(vit, tuple(x.shape[-2:])).n_total
        self.device = x.device

    def prune_to(self, n: int) -> None:
        if n == self.n_total:
            remove_pruning(self.vit)
        else:
            apply_pruning(self.vit, "pomt", r=self.n_total - n, layer=self.layer)

    def at(self, n: int) -> Call:
        return Call(lambda: self.model(self.x), lambda: self.prune_to(n), "eager")

    def configured(self, method: str, r: int | tuple[int, ...], label: str) -> Call | None:
        setup = lambda: apply_pruning(self.vit, method, r=r, layer=self.layer)  # noqa: E731
        return Call(lambda: self.model(self.x), setup, "eager")

    def record(self) -> dict[str, Any]:
        device = torch.device(self.target.device)
        return dict(
            threads=torch.get_num_threads() if device.type == "cpu" else None,
            cuda_graphs=False,
            kernels=kernel_backend(device, self.x.dtype),
            precision=self.target.precision,
        )


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` while active (None: left as it is)."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Eager(Runtime):
    """The module itself, eager, on the Target's device, in its dtype and with its threads."""

    name = "torch"
    devices = ("cpu", "cuda", "mps")
    marker = "o"
    model_class: ClassVar[type[_EagerModel]] = _EagerModel

    def key(self, device: torch.device) -> dict[str, Any]:
        return {"cuda_graphs": False} if device.type == "cuda" else {}

    def kernels(self, device: torch.device, dtype: torch.dtype | None) -> str:
        return kernel_backend(device, dtype)

    @contextlib.contextmanager
    def prepare(
        self, model: nn.Module, vit: nn.Module, layer: int, target: Any, example: torch.Tensor | None
    ) -> Iterator[Prepared]:
        device, dtype = torch.device(target.device), target.torch_dtype
        size = image_size(vit, target.img_size)
        with _threads(target.threads), on_device(model, vit, device, dtype), torch.inference_mode():
            if example is None:
                x = random_batch(vit, target.batch_size, size, device, dtype)
            else:
                x = example.to(device=device, dtype=dtype)
            yield self.model_class(model, vit, x, layer, target)

    def describe_timing(self, device: torch.device, precision: str) -> str:
        return f"eager calls, precision {precision}"


def cuda_graph_or_eager(
    fn: Callable[[], object], device: torch.device | str, what: str = ""
) -> tuple[Callable[[], object], str]:
    """``(replay, "cuda_graphs")`` where ``fn`` can be captured, else ``(fn, "eager (...)")`` with
    a warning (a model with data-dependent shapes or host syncs cannot be captured)."""
    try:
        return cuda_graph(fn, device), "cuda_graphs"
    except Exception as err:
        warnings.warn(f"{what}CUDA graph capture failed ({err}); timing eager calls", stacklevel=3)
        return fn, f"eager (graph capture failed: {type(err).__name__})"


class _GraphModel(_EagerModel):
    """Each n captured in a CUDA graph; after a failed capture, the remaining n run eagerly."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.graphs = torch.device(self.target.device).type == "cuda"
        if not self.graphs:
            warnings.warn("runtime 'cuda_graphs' ignored: CUDA graphs need a CUDA device", stacklevel=5)

    def at(self, n: int) -> Call:
        eager = super().at(n)
        if not self.graphs:
            return eager
        self.prune_to(n)
        replay, mode = cuda_graph_or_eager(eager.run, self.x.device, f"n={n}: ")
        self.graphs = mode == "cuda_graphs"
        return Call(replay, None, mode) if self.graphs else eager

    def configured(self, method: str, r: int | tuple[int, ...], label: str) -> Call | None:
        eager = super().configured(method, r, label)
        if torch.device(self.target.device).type != "cuda":
            return eager
        eager.setup()
        replay, mode = cuda_graph_or_eager(eager.run, self.x.device, f"{label}: ")
        return Call(replay, None, mode) if mode == "cuda_graphs" else replace(eager, mode=mode)

    def record(self) -> dict[str, Any]:
        return super().record() | dict(cuda_graphs=self.graphs)


class CudaGraphs(Eager):
    """The module captured in a CUDA graph per token count and replayed (CUDA only; elsewhere,
    and where a capture fails, eager calls with a warning)."""

    name = "cuda_graphs"
    model_class = _GraphModel
    marker = "s"

    def check(self, device: torch.device) -> None:
        """Any device: off CUDA it times eager calls, with a warning (a config for a GPU runs anywhere)."""

    def key(self, device: torch.device) -> dict[str, Any]:
        return {"cuda_graphs": device.type == "cuda"}

    def describe_timing(self, device: torch.device, precision: str) -> str:
        replays = "CUDA-graph replays" if device.type == "cuda" else "eager calls"
        return f"{replays}, precision {precision}"


# --------------------------------------------------------------------------- exported graphs


def _type_name(value: Any) -> str:
    """OpenVINO's ``<Type: 'bfloat16'>`` as ``bf16`` (``f32``, ``f16``)."""
    return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)


class Exported(Runtime):
    """The exported ONNX graph compiled by a runtime (subclasses: :meth:`compile`); the model is
    exported in fp32 and run in the precision the runtime chooses."""

    exported = True

    def computes_as_pytorch(self, precision: str) -> bool:
        return precision.endswith(":f32")  # the checked fp32 export, computed in fp32

    def version(self) -> str:
        module = require(self.name)
        return str(getattr(module, "__version__", None) or module.get_version()).split("-")[0]

    def default_precision(self, device: torch.device) -> str:
        raise NotImplementedError

    def precision(self, device: torch.device, asked: str) -> str:
        return f"{self.name}:{self.default_precision(device)}"

    def key(self, device: torch.device) -> dict[str, Any]:
        return {"runtime_version": self.version()}

    def announce(self, model: str, layer: int) -> str | None:
        return f"exporting {model} for {self.name} (unpruned, and POMT at block {layer} per token count)"

    def compile(
        self, path: Path, *, threads: int, tokens: int | None, device: torch.device
    ) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], RuntimeInfo]:
        """``path`` compiled (static at ``tokens`` kept tokens for a token graph): feeds -> output."""
        raise NotImplementedError

    @contextlib.contextmanager
    def prepare(
        self, model: nn.Module, vit: nn.Module, layer: int, target: Any, example: torch.Tensor | None
    ) -> Iterator[Prepared]:
        if target.torch_dtype != torch.float32:
            raise TargetError(
                f"runtime {self.name!r} times the fp32 export in the precision the runtime chooses; got dtype "
                f"{target.torch_dtype}: use dtype=float32"
            )
        cpu = torch.device("cpu")
        size = image_size(vit, target.img_size)
        x = random_batch(vit, target.batch_size, size, cpu, torch.float32) if example is None else example
        with (
            tempfile.TemporaryDirectory(prefix="pomt-runtime-") as folder,
            on_device(model, vit, cpu, torch.float32),
            torch.autocast("cpu", enabled=False),
        ):
            prepared = ExportedModel(
                model, vit, x.detach().to(cpu, torch.float32), layer, target, Path(folder)
            )
            try:
                yield prepared
            finally:
                prepared.close()

    def describe_timing(self, device: torch.device, precision: str) -> str:
        return (
            f"{self.name} ({precision}): each configuration exported to ONNX, checked against PyTorch, "
            "compiled; accuracy from PyTorch after the equality check"
        )


def _providers(device: torch.device) -> list[str]:
    """ONNX Runtime providers for ``device``: the CPU one, or TensorRT/CUDA where installed."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    available = require("onnxruntime").get_available_providers()
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not gpu:
        raise TargetError(
            f"device 'cuda' with runtime 'onnxruntime' needs onnxruntime-gpu (CUDA or TensorRT provider); "
            f"this onnxruntime has {', '.join(available)}"
        )
    return gpu + ["CPUExecutionProvider"]  # (untested here: no GPU on the CI machine)


class OnnxRuntime(Exported):
    """ONNX Runtime (the CPU provider; CUDA/TensorRT providers on ``cuda`` where installed)."""

    name = "onnxruntime"
    marker = "D"

    def default_precision(self, device: torch.device) -> str:
        return "f32"  # its CPU provider computes fp32 graphs in f32

    def compile(
        self, path: Path, *, threads: int, tokens: int | None, device: torch.device
    ) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], RuntimeInfo]:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if tokens is not None:
            options.add_free_dimension_override_by_name(token_dim(path), int(tokens))
        session = ort.InferenceSession(str(path), options, providers=_providers(device))
        record = {"providers": session.get_providers(), "graph_optimization": "ORT_ENABLE_ALL"}
        record |= {"execution_mode": "sequential", "inter_op_threads": 1}
        info = RuntimeInfo(self.name, self.version(), threads, "f32", record)
        return (lambda feeds: session.run(None, feeds)[0]), info


class OpenVINO(Exported):
    """OpenVINO's CPU plugin; option ``precision`` (``f32``, ``bf16``) asks for an inference
    precision, by default the plugin chooses and what it chose is recorded."""

    name = "openvino"
    devices = ("cpu",)
    marker = "P"
    option_names = ("precision",)

    def default_precision(self, device: torch.device) -> str:
        """Asked of the plugin itself: ``INFERENCE_PRECISION_HINT`` (bf16 on CPUs with AMX/AVX512-BF16)."""
        asked = self.options.get("precision")
        if asked:
            return str(asked)
        return _type_name(require("openvino").Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))

    def compile(
        self, path: Path, *, threads: int, tokens: int | None, device: torch.device
    ) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], RuntimeInfo]:
        ov = require("openvino")
        core = ov.Core()
        graph = core.read_model(str(path))
        if tokens is not None:
            graph.reshape({TOKENS_INPUT: [int(tokens)]})
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.options.get("precision"):
            config["INFERENCE_PRECISION_HINT"] = self.options["precision"]
        compiled = core.compile_model(graph, "CPU", config)
        real = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        record = {k: str(v) for k, v in config.items()} | {
            "NUM_STREAMS": str(compiled.get_property("NUM_STREAMS"))
        }
        info = RuntimeInfo(self.name, self.version(), threads, real, record)
        request = compiled.create_infer_request()

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            request.infer(feeds, share_inputs=True)
            return request.get_output_tensor(0).data

        return run, info

    def convert(self, onnx_path: Path) -> str | None:
        return str(to_openvino(onnx_path))


def compile_onnx(
    path: str | Path,
    runtime: str | Exported,
    *,
    threads: int,
    tokens: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], RuntimeInfo]:
    """``path`` compiled by ``runtime`` (a name or an :class:`Exported` runtime; static at
    ``tokens`` kept tokens for a token graph): a function feeds -> first output, and what it
    runs at (version, threads, real precision, session options)."""
    runtime = runtime_named(runtime) if isinstance(runtime, str) else runtime
    if not isinstance(runtime, Exported):
        raise TargetError(f"compile_onnx compiles for an exported runtime, not {runtime.name!r}")
    return runtime.compile(Path(path), threads=threads, tokens=tokens, device=torch.device(device))
