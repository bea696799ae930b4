"""Verify a selection made from saved profiles (``pomt select-r``): the model timed as its
latency profile was measured, on the Target the profile records (runtime, device, batch size,
dtype, CPU threads) and at its layer, pruned at each candidate against the unpruned model
(``pomt.offline.verify``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pomt.deploy.targets import Target
from pomt.errors import PomtValueError
from pomt.models import find_vit, token_layout
from pomt.offline.config import SearchConfig
from pomt.offline.profiles import LatencyProfile
from pomt.offline.selection import Selection
from pomt.offline.verify import verify

__all__ = ["verify_for_profile", "profile_target"]


def profile_target(latency: LatencyProfile) -> Target:
    """The Target ``latency`` was timed on, as far as it records it: runtime, device type,
    dtype, batch size, image size and (on a CPU) threads."""
    return Target(
        runtime=latency.runtime or Target().runtime, device=latency.device_type or None, dtype=latency.dtype,
        threads=latency.threads if latency.device_type == "cpu" else None, batch_size=latency.batch_size,
        img_size=tuple(latency.img_size),
    )  # fmt: skip


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
    ``find_r`` verifies it, on the Target ``latency`` was measured on. A runtime that is not
    installed, or a model whose token count is not the profile's, is an error naming the fix."""
    target = profile_target(latency).on(model)
    vit = find_vit(model)[1]
    n_total = token_layout(vit, target.img_size).n_total
    if n_total != latency.n_total:
        raise PomtValueError(
            f"the model has N={n_total} tokens at its input size, the latency profile N={latency.n_total}: "
            f"build it at the profile's input size {latency.img_size}"
        )
    version = target.backend.version()
    if latency.runtime_version and version != latency.runtime_version:
        log(
            f"note: the profile was measured in {target.runtime} {latency.runtime_version}, verifying in {version}"
        )
    log(
        f"verifying in {target.runtime} on {target.torch_device}, batch {target.batch_size}, layer {latency.layer}, "
        f"{target.threads or 'default'} thread(s)"
    )
    search = SearchConfig(verify_max_time=verify_max_time, verify_candidates=candidates)
    return verify(model, selection, target, layer=latency.layer, search=search, vit=vit, log=log)
