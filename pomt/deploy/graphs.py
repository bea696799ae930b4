"""The exported graphs a runtime times: :class:`RuntimeModel` exports a ViT twice (the unpruned
model, and one POMT graph whose kept-token count is a symbolic axis) and has the runtime
compile it per token count n; :class:`ExportedModel` is what an exported runtime's ``prepare``
gives (the token graph for any n, one static export per sweep configuration)."""

from __future__ import annotations

import json
import re
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pomt.deploy.export import (
    DEFAULT_TOLERANCE,
    TOKENS_INPUT,
    ExportMismatch,
    export_onnx,
    export_token_graph,
    input_name,
    require,
    run_onnxruntime,
)
from pomt.deploy.placement import on_device, random_batch
from pomt.deploy.targets import Call, Prepared, Runtime, runtime_named
from pomt.errors import TargetError
from pomt.method.pruning import apply_pruning, pruned, pruning_restored, remove_pruning
from pomt.models import find_vit, image_size, token_layout

__all__ = ["RuntimeInfo", "RuntimeModel", "ExportedModel", "token_dim"]


@dataclass(frozen=True)
class RuntimeInfo:
    """What a runtime timing is valid for (part of a latency profile's identity)."""

    name: str
    version: str
    threads: int
    precision: str
    options: dict[str, Any]

    @property
    def label(self) -> str:
        """``openvino:bf16`` (the precision the profile records)."""
        return f"{self.name}:{self.precision}"


_DIMS: dict[str, str] = {}


def token_dim(path: str | Path) -> str:
    """The symbolic name the exporter gave the kept-token axis of a token graph."""
    key = str(path)
    if key not in _DIMS:
        onnx = require("onnx")
        graph = onnx.load(key, load_external_data=False).graph
        tokens = next((i for i in graph.input if i.name == TOKENS_INPUT), None)
        if tokens is None:
            raise TargetError(f"{path} is not a token graph: it has no {TOKENS_INPUT!r} input")
        _DIMS[key] = tokens.type.tensor_type.shape.dim[0].dim_param
    return _DIMS[key]


class RuntimeModel:
    """A ViT exported for an :class:`Exported` runtime once, compiled per token count n (POMT
    at r = N - n at ``layer``; n = N is the unpruned model) at ``batch_size``, each a
    zero-argument call on a fixed random batch for the timers. Compiled sessions are kept for
    N and the last few n."""

    def __init__(
        self,
        model: nn.Module,
        runtime: str | Runtime,
        *,
        layer: int,
        batch_size: int,
        vit: nn.Module | None = None,
        img_size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        runtime = runtime_named(runtime) if isinstance(runtime, str) else runtime
        if not callable(getattr(runtime, "compile", None)):
            raise TargetError(
                f"RuntimeModel is for exported runtimes; {runtime.name!r} runs the module itself"
            )
        self.runtime, self.device = runtime, torch.device(device)
        runtime.check(self.device)
        vit = find_vit(model)[1] if vit is None else vit
        size = image_size(vit, img_size)
        layout = token_layout(vit, size)
        self.n_total, self.prefix, self.layer = layout.n_total, layout.prefix, layer
        self.threads = int(threads or torch.get_num_threads())
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="pomt-runtime-")
        folder = Path(workdir if workdir is not None else self._tmp.name)
        start = time.perf_counter()
        x = random_batch(vit, batch_size, size, torch.device("cpu"), torch.float32)
        with pruning_restored(vit):
            remove_pruning(vit)
            self.unpruned_record = export_onnx(model, folder / "unpruned.onnx", example=x, vit=vit)
        self.token_graph = export_token_graph(
            model, folder / "pomt_tokens.onnx", layer=layer, batch_size=batch_size, vit=vit, img_size=size
        )
        self.export_s = time.perf_counter() - start
        self.check = self._check_token_graph(model, vit, x)
        self._x = x.numpy()
        self._sessions: OrderedDict[int, Callable[[dict[str, np.ndarray]], np.ndarray]] = OrderedDict()
        self._keep = 3
        self.compile_s: dict[int, float] = {}
        self.info: RuntimeInfo | None = None
        self.call(self.n_total)  # compiles the unpruned model: its info is what the runtime runs at

    def _check_token_graph(self, model: nn.Module, vit: nn.Module, x: torch.Tensor) -> float:
        """|ONNX Runtime - PyTorch| of the token graph at one n (fp32 on both sides)."""
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
            raise TargetError(f"n must be in {self.prefix + 1}..{self.n_total}, got {n!r}")
        if n in self._sessions:
            self._sessions.move_to_end(n)
            return self._sessions[n]
        start = time.perf_counter()
        path, tokens = (Path(self.unpruned_record.path), None) if n == self.n_total else (self.token_graph, n)
        run, info = self.runtime.compile(path, threads=self.threads, tokens=tokens, device=self.device)
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

    def close(self) -> None:
        """Drop the compiled sessions and the exported files (a ``workdir`` is left as it is)."""
        self._sessions.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


class ExportedModel(Prepared):
    """The model exported for an :class:`Exported` runtime: the token graph for any n (exported
    on first use), and one static export per configuration."""

    def __init__(
        self, model: nn.Module, vit: nn.Module, x: torch.Tensor, layer: int, target: Any, folder: Path
    ) -> None:
        self.model, self.vit, self.x, self.layer, self.target, self.folder = (
            model,
            vit,
            x,
            layer,
            target,
            folder,
        )
        self.runtime = target.backend
        self.n_total = token_layout(vit, tuple(x.shape[-2:])).n_total
        self.device = torch.device("cpu")  # the runtime's own calls return when done
        self._graphs: RuntimeModel | None = None

    @property
    def graphs(self) -> RuntimeModel:
        if self._graphs is None:
            self._graphs = RuntimeModel(
                self.model, self.runtime, layer=self.layer, batch_size=int(self.x.shape[0]), vit=self.vit,
                img_size=tuple(self.x.shape[-2:]), device=self.target.device, threads=self.target.threads,
            )  # fmt: skip
        return self._graphs

    def at(self, n: int) -> Call:
        call = self.graphs.call(n)
        return Call(call, None, f"{self.graphs.info.label} graph")

    def configured(self, method: str, r: int | tuple[int, ...], label: str) -> Call | None:
        """Exported as pruned (checked against PyTorch in ONNX Runtime), compiled at the batch's
        shape; ``mode`` records the check and how often the runtime's top-1 agrees with PyTorch's."""
        path = self.folder / (re.sub(r"\W+", "_", label).strip("_") + ".onnx")
        with pruning_restored(self.vit):
            apply_pruning(self.vit, method, r=r, layer=self.layer)
            record = export_onnx(self.model, path, example=self.x, vit=self.vit)
            threads = self.target.threads or torch.get_num_threads()
            try:
                run, info = self.runtime.compile(path, threads=threads, tokens=None, device=self.device)
            except RuntimeError as err:  # e.g. an op the runtime's ONNX frontend rejects
                reason = next(
                    (line for line in str(err).splitlines() if "failed for" in line), str(err)[:200]
                )
                warnings.warn(
                    f"{label}: {self.runtime.name} cannot compile its export ({reason}); left out",
                    stacklevel=2,
                )
                return None
            feeds = {input_name(path): self.x.numpy()}
            with torch.inference_mode():
                expected = self.model(self.x).float()
        got = torch.from_numpy(np.array(run(feeds)))
        agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
        mode = (
            f"{info.label} export (ONNX Runtime f32 |diff| {record.max_abs_diff:.1e}; in {info.precision} "
            f"top-1 = PyTorch's on {agree:.0%} of the batch, max |diff| {float((got - expected).abs().max()):.2g})"
        )
        name = input_name(path)

        def infer(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.array(run({name: images.detach().to("cpu", torch.float32).numpy()})))

        return Call(lambda: run(feeds), None, mode, infer)

    def record(self) -> dict[str, Any]:
        info = self.graphs.info
        return dict(
            threads=self.graphs.threads,
            cuda_graphs=False,
            kernels=f"{self.runtime.name} graph",
            precision=info.label,
            runtime_version=info.version,
            runtime_options=self.graphs.describe_json(),
        )

    def close(self) -> None:
        if self._graphs is not None:
            self._graphs.close()
