"""Timing a pruned ViT in the runtime it is deployed with: ``torch``, ``onnxruntime``, ``openvino``.

``torch`` is eager PyTorch (or CUDA-graph replays), as everywhere else in pomt. In the other
two, what is timed is what would be deployed: the exported ONNX graph, compiled by that
runtime at a static shape (a token count n, a batch size) and in the precision it really
runs at (OpenVINO's CPU plugin defaults to bf16 on CPUs with bf16 units, and says so).

Exporting once per token count costs seconds each (DeiT-S: ~8 s), so :class:`RuntimeModel`
exports twice: the unpruned model, and one POMT graph whose kept-token count is a symbolic
axis (``pomt.deploy.export.export_token_graph``). Per n, the runtime fixes that axis before it
compiles (ONNX Runtime's free-dimension override, OpenVINO's ``reshape``): a static graph at
n, from one export, checked against PyTorch once. ``benchmarks/deploy_runtimes.py`` times it
against a per-n static export side by side.

ONNX Runtime's CUDA and TensorRT providers are used for ``device="cuda"`` where installed;
those paths are untested here (no GPU); ``openvino`` runs on the CPU.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pomt.deploy.export import DEFAULT_TOLERANCE, TOKENS_INPUT, export_onnx, export_token_graph, require
from pomt.models import find_vit, image_size, token_layout

__all__ = [
    "RUNTIMES",
    "check_runtime",
    "RuntimeInfo",
    "RuntimeModel",
    "runtime_precision",
    "runtime_version",
    "compile_onnx",
]

RUNTIMES = ("torch", "onnxruntime", "openvino")


def check_runtime(runtime: object, device: torch.device | str = "cpu") -> str:
    """``runtime`` if valid for ``device``, else a ValueError naming the valid ones."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    kind = torch.device(device).type
    if runtime == "openvino" and kind != "cpu":
        raise ValueError(
            f"runtime 'openvino' times on the CPU here; got device {str(device)!r}: use device='cpu'"
        )
    if runtime == "onnxruntime" and kind not in ("cpu", "cuda"):
        raise ValueError(f"runtime 'onnxruntime' runs on cpu or cuda; got device {str(device)!r}")
    return str(runtime)


def _providers(device: torch.device) -> list[str]:
    """ONNX Runtime providers for ``device``: the CPU one, or TensorRT/CUDA where installed."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    available = require("onnxruntime").get_available_providers()
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not gpu:
        raise ValueError(
            f"device 'cuda' with runtime 'onnxruntime' needs onnxruntime-gpu (CUDA or TensorRT provider); "
            f"this onnxruntime has {', '.join(available)}"
        )
    return gpu + ["CPUExecutionProvider"]  # (untested here: no GPU on the CI machine)


def runtime_precision(runtime: str, device: torch.device | str = "cpu") -> str:
    """The precision ``runtime`` computes an fp32 graph in on ``device`` by default, asked of the
    runtime itself (OpenVINO: the CPU plugin's ``INFERENCE_PRECISION_HINT``, bf16 on CPUs with
    AMX/AVX512-BF16); ONNX Runtime's CPU provider computes fp32 graphs in f32."""
    if runtime == "openvino":
        ov = require("openvino")
        return _type_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    if runtime == "onnxruntime":
        return "f32"
    raise ValueError(f"runtime_precision is for exported runtimes, not {runtime!r}")


def runtime_conditions(runtime: str, device: torch.device | str = "cpu") -> dict[str, str]:
    """What a record timed in ``runtime`` is valid for: ``precision`` (``openvino:bf16``) and
    ``runtime`` (name and version)."""
    check_runtime(runtime, device)
    return {
        "precision": f"{runtime}:{runtime_precision(runtime, device)}",
        "runtime": f"{runtime} {runtime_version(runtime)}",
    }


def _type_name(value: Any) -> str:
    """OpenVINO's ``<Type: 'bfloat16'>`` as ``bf16`` (``f32``, ``f16``)."""
    return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)


@dataclass(frozen=True)
class RuntimeInfo:
    """What a runtime timing is valid for (part of a latency profile's identity)."""

    name: str
    version: str
    threads: int
    precision: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``openvino:bf16`` (the precision the profile records)."""
        return f"{self.name}:{self.precision}"


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime`` (torch's for ``torch``)."""
    if runtime == "torch":
        return str(torch.__version__)
    module = require(runtime)
    return str(getattr(module, "__version__", None) or module.get_version()).split("-")[0]


def compile_onnx(
    path: str | Path,
    runtime: str,
    *,
    threads: int,
    tokens: int | None = None,
    device: torch.device | str = "cpu",
    precision: str | None = None,
) -> tuple[Callable[[dict[str, np.ndarray]], np.ndarray], RuntimeInfo]:
    """``path`` compiled by ``runtime`` (static at ``tokens`` kept tokens for a token graph):
    a function feeds -> first output, and what it runs at (version, threads, real precision,
    session options). ``precision`` asks OpenVINO for an inference precision (``f32``,
    ``bf16``); by default the runtime chooses, and what it chose is recorded."""
    device = torch.device(device)
    if runtime == "onnxruntime":
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if tokens is not None:
            options.add_free_dimension_override_by_name(_token_dim(path), int(tokens))
        providers = _providers(device)
        session = ort.InferenceSession(str(path), options, providers=providers)
        record = {"providers": session.get_providers(), "graph_optimization": "ORT_ENABLE_ALL"}
        record |= {"execution_mode": "sequential", "inter_op_threads": 1}
        info = RuntimeInfo(runtime, runtime_version(runtime), threads, precision or "f32", record)
        return (lambda feeds: session.run(None, feeds)[0]), info
    if runtime == "openvino":
        ov = require("openvino")
        core = ov.Core()
        graph = core.read_model(str(path))
        if tokens is not None:
            graph.reshape({TOKENS_INPUT: [int(tokens)]})
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(graph, "CPU", config)
        real = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        streams = compiled.get_property("NUM_STREAMS")
        record = {k: str(v) for k, v in config.items()} | {"NUM_STREAMS": str(streams)}
        info = RuntimeInfo(runtime, runtime_version("openvino"), threads, real, record)
        request = compiled.create_infer_request()

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            request.infer(feeds, share_inputs=True)
            return request.get_output_tensor(0).data

        return run, info
    raise ValueError(f"compile_onnx runs onnxruntime or openvino, not {runtime!r}")


_DIMS: dict[str, str] = {}


def _token_dim(path: str | Path) -> str:
    """The symbolic name the exporter gave the kept-token axis of a token graph."""
    key = str(path)
    if key not in _DIMS:
        onnx = require("onnx")
        graph = onnx.load(key, load_external_data=False).graph
        tokens = next((i for i in graph.input if i.name == TOKENS_INPUT), None)
        if tokens is None:
            raise ValueError(f"{path} is not a token graph: it has no {TOKENS_INPUT!r} input")
        _DIMS[key] = tokens.type.tensor_type.shape.dim[0].dim_param
    return _DIMS[key]


class RuntimeModel:
    """A ViT exported for ``runtime`` once, compiled per token count n (POMT at r = N - n at
    ``layer``; n = N is the unpruned model) at ``batch_size``, each a zero-argument call on a
    fixed random batch for the timers. Compiled sessions are kept for N and the last few n."""

    def __init__(
        self,
        model: nn.Module,
        runtime: str,
        *,
        layer: int,
        batch_size: int,
        vit: nn.Module | None = None,
        img_size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        precision: str | None = None,
        workdir: str | Path | None = None,
        keep: int = 3,
    ) -> None:
        from pomt.offline.profiling import random_batch

        self.runtime = check_runtime(runtime, device)
        if runtime == "torch":
            raise ValueError("RuntimeModel is for exported runtimes; runtime 'torch' times the module itself")
        self.device = torch.device(device)
        vit = find_vit(model)[1] if vit is None else vit
        size = image_size(vit, img_size)
        layout = token_layout(vit, size)
        self.n_total, self.prefix, self.layer = layout.n_total, layout.prefix, layer
        self.threads = int(threads or torch.get_num_threads())
        self.precision_request = precision
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="pomt-runtime-")
        folder = Path(workdir if workdir is not None else self._tmp.name)
        start = time.perf_counter()
        x = random_batch(vit, batch_size, size, torch.device("cpu"), torch.float32)
        from pomt.method.pruning import pruning_restored, remove_pruning

        with pruning_restored(vit):
            remove_pruning(vit)
            self.unpruned_record = export_onnx(model, folder / "unpruned.onnx", x, vit=vit)
        self.token_graph = export_token_graph(
            model, folder / "pomt_tokens.onnx", layer=layer, batch_size=batch_size, vit=vit, img_size=size
        )
        self.export_s = time.perf_counter() - start
        self.check = self._check_token_graph(model, vit, x)
        self._x = x.numpy()
        self._sessions: OrderedDict[int, Callable[[dict[str, np.ndarray]], np.ndarray]] = OrderedDict()
        self._keep = max(1, keep)
        self.compile_s: dict[int, float] = {}
        self.info: RuntimeInfo | None = None
        self.call(self.n_total)  # compiles the unpruned model: its info is what the runtime runs at

    def _check_token_graph(self, model: nn.Module, vit: nn.Module, x: torch.Tensor) -> float:
        """|ONNX Runtime - PyTorch| of the token graph at one n (fp32 on both sides)."""
        from pomt.deploy.export import ExportMismatch, run_onnxruntime
        from pomt.method.pruning import pruned
        from pomt.offline.profiling import on_device

        n = (self.prefix + 1 + self.n_total - 1) // 2
        with (
            on_device(model, vit, torch.device("cpu"), torch.float32),
            torch.inference_mode(),
            torch.autocast("cpu", enabled=False),
            pruned(vit, "pomt", r=self.n_total - n, layer=self.layer),
        ):
            expected = model(x).float().numpy()
        got = run_onnxruntime(self.token_graph, self._feeds_for(x.numpy(), n), threads=self.threads)
        diff = float(np.abs(got - expected).max())
        if not diff <= DEFAULT_TOLERANCE:
            raise ExportMismatch(f"the token graph differs from PyTorch by {diff:.3g} at n={n}")
        return diff

    @staticmethod
    def _feeds_for(x: np.ndarray, n: int | None) -> dict[str, np.ndarray]:
        feeds = {"x": x}
        if n is not None:
            feeds[TOKENS_INPUT] = np.zeros(n, np.float32)
        return feeds

    def session(self, n: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """The compiled graph at ``n`` kept tokens (compiled on first use; N is the unpruned one)."""
        if not self.prefix + 1 <= n <= self.n_total:
            raise ValueError(f"n must be in {self.prefix + 1}..{self.n_total}, got {n!r}")
        if n in self._sessions:
            self._sessions.move_to_end(n)
            return self._sessions[n]
        start = time.perf_counter()
        if n == self.n_total:
            path, tokens = Path(self.unpruned_record.path), None
        else:
            path, tokens = self.token_graph, n
        run, info = compile_onnx(
            path, self.runtime, threads=self.threads, tokens=tokens, device=self.device,
            precision=self.precision_request,
        )  # fmt: skip
        self.compile_s[n] = time.perf_counter() - start
        if self.info is None:
            self.info = info
        self._sessions[n] = run
        while len(self._sessions) > self._keep + 1:
            oldest = next(k for k in self._sessions if k != self.n_total)
            del self._sessions[oldest]
        return run

    def call(self, n: int) -> Callable[[], object]:
        """A zero-argument call of the graph at ``n`` on the fixed batch (what the timers take)."""
        run = self.session(n)
        feeds = self._feeds_for(self._x, None if n == self.n_total else n)
        return lambda: run(feeds)

    def describe(self) -> dict[str, Any]:
        """How the timing runs, for the profile: runtime, options, export and compile costs."""
        info = self.info
        assert info is not None
        return {
            "options": info.options,
            "export": "unpruned static + one POMT graph with the kept-token axis fixed per n at compile",
            "export_s": round(self.export_s, 2),
            "token_graph_max_abs_diff": self.check,
            "compile_s_mean": round(float(np.mean(list(self.compile_s.values()))), 3),
        }

    def describe_json(self) -> str:
        return json.dumps(self.describe(), sort_keys=True)
