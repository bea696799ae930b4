"""Putting a model where it runs and feeding it: its device and dtype while it is timed or
exported (:func:`on_device`, everything put back afterwards), the precision that makes in
Lightning's names (:func:`precision_name`), and the seeded input batch the timers feed it
(:func:`random_batch`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pomt.errors import PomtValueError
from pomt.method.pruning import pruning_restored
from pomt.models import device_of, dtype_of

__all__ = ["resolve_dtype", "precision_name", "on_device", "random_batch", "DTYPE_BITS"]

# Lightning's names of the bits of a dtype (``32-true``, ``bf16-mixed``)
DTYPE_BITS = {torch.float32: "32", torch.float16: "16", torch.bfloat16: "bf16", torch.float64: "64"}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as a floating torch dtype (``"float16"``, ``"torch.bfloat16"``), else a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise PomtValueError(
            f"dtype must be a floating torch dtype such as float32, float16, bfloat16; got {dtype!r}"
        )
    return value


def precision_name(device: torch.device | str, dtype: torch.dtype | str) -> str:
    """The precision a model runs at, in Lightning's names: ``16-mixed``/``bf16-mixed`` when
    autocast is on for ``device`` right now (its dtype), else ``<dtype>-true`` (``32-true``,
    ``16-true``, ``bf16-true``) from the dtype of the parameters and inputs."""
    kind = torch.device(device).type
    dtype = resolve_dtype(dtype)
    if torch.is_autocast_enabled(kind):
        return f"{DTYPE_BITS.get(torch.get_autocast_dtype(kind), 'autocast')}-mixed"
    return f"{DTYPE_BITS.get(dtype, str(dtype).removeprefix('torch.'))}-true"


def _in_chans(vit: nn.Module) -> int:
    proj = getattr(vit.patch_embed, "proj", None)
    return int(getattr(proj, "in_channels", 3))


@contextlib.contextmanager
def on_device(
    model: nn.Module, vit: nn.Module, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[None]:
    """While active, ``model`` is in eval mode on ``device`` (and in ``dtype`` when given);
    afterwards its pruning, train/eval flags, device, dtype and weights (bit for bit, also
    after a cast to a narrower dtype) are what they were."""
    training = {m: m.training for m in model.modules()}
    old_device, old_dtype = device_of(model), dtype_of(model)
    cast = dtype is not None and old_dtype is not None and dtype != old_dtype
    # casting to a narrower dtype and back rounds the weights: keep the originals to put back
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if cast else None
    try:
        with pruning_restored(vit):
            model.eval()
            model.to(device=device, dtype=dtype) if cast else model.to(device=device)
            yield
    finally:
        model.to(device=old_device, dtype=old_dtype) if cast else model.to(device=old_device)
        if saved is not None:
            model.load_state_dict(saved)
        for module, flag in training.items():
            module.training = flag


def random_batch(
    vit: nn.Module, batch_size: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A seeded random input batch for timing (latency does not depend on the pixels)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, _in_chans(vit), *size, generator=gen, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)
