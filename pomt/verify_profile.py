"""Verify a selection made from saved profiles (``pomt select-r``): the model timed as its
latency profile was measured, in the same runtime, device, batch size, dtype, layer and
CPU threads, pruned at each candidate against the unpruned model (``pomt.verify``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pomt.finder import SearchConfig
from pomt.models import find_vit, token_layout
from pomt.profiles import LatencyProfile
from pomt.profiling import resolve_dtype
from pomt.runtimes import RuntimeModel, check_runtime, runtime_version
from pomt.selection import Selection
from pomt.verify import paired_speedups, speedup_samples, verify

__all__ = ["verify_for_profile"]


def verify_for_profile(
    selection: Selection,
    model: nn.Module,
    latency: LatencyProfile,
    *,
    verify_max_time: float = 30.0,
    candidates: int = 3,
    log: Callable[[str], object] = print,
) -> Selection:
    """``selection`` (from ``latency`` and an accuracy profile) verified on ``model`` as
    ``find_r`` verifies it, set up as ``latency`` was measured. A runtime that is not installed,
    or a model whose token count is not the profile's, is a ValueError naming the fix."""
    device = torch.device(latency.device_type or "cpu")
    runtime = check_runtime(latency.runtime or "torch", device)
    vit = find_vit(model)[1]
    n_total = token_layout(vit).n_total
    if n_total != latency.n_total:
        raise ValueError(
            f"the model has N={n_total} tokens at its input size, the latency profile N={latency.n_total}: "
            f"build it at the profile's input size {latency.img_size}"
        )
    if latency.threads and device.type == "cpu":
        torch.set_num_threads(latency.threads)
    if runtime != "torch" and latency.runtime_version and runtime_version(runtime) != latency.runtime_version:
        log(
            f"note: the profile was measured in {runtime} {latency.runtime_version}, verifying in {runtime_version(runtime)}"
        )
    config = SearchConfig(verify_max_time=verify_max_time, verify_candidates=candidates)
    timing = dict(warmup=config.warmup, **config.verify_budget())
    log(
        f"verifying in {runtime} on {device}, batch {latency.batch_size}, layer {latency.layer}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    if runtime == "torch":
        dtype = resolve_dtype(latency.dtype)
        model.to(device=device, dtype=dtype)

        def measure(r: int, decided) -> tuple[list[float], float]:
            return speedup_samples(
                model, vit, r, layer=latency.layer, batch_size=latency.batch_size, device=device, dtype=dtype,
                cuda_graphs=latency.cuda_graphs, decided=decided, **timing,
            )  # fmt: skip
    else:
        graphs = RuntimeModel(
            model, runtime, layer=latency.layer, batch_size=latency.batch_size, vit=vit, device=device
        )

        def measure(r: int, decided) -> tuple[list[float], float]:
            n = graphs.n_total - r
            calls = (graphs.call(n), None), (graphs.call(graphs.n_total), None)
            return paired_speedups(*calls, decided=decided, **timing)

    with torch.inference_mode():
        return verify(selection, measure, candidates=config.verify_candidates, log=log)
