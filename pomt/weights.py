"""Weights in and out: build a timm ViT by name with hub or local weights, load a state-dict
file into a model, and fingerprint the weights a record was measured with. What a ViT must
look like is ``pomt.models``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pomt.errors import PomtValueError, UnavailableError
from pomt.models import require_supported

__all__ = ["create_model", "load_weights", "read_state_dict", "weights_fingerprint"]

WRAPPER_PREFIXES = ("model.", "module.", "vit.")


def weights_fingerprint(model: nn.Module, samples: int = 1024) -> str:
    """A cheap fingerprint of ``model``'s weights: for every tensor of its state dict, the shape
    and up to ``samples`` evenly spaced values rounded to float16. Names are left out (a
    LightningModule and the ViT it wraps agree), and so are the device and the dtype the
    weights are held in (a float16 copy of float32 weights agrees with them)."""
    digest = hashlib.sha1()
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > samples:
            # float32 whatever the default dtype (Lightning's "16-true" makes it 16 bits, whose
            # rounding would index past the end); float32 keeps the saved fingerprints valid
            at = torch.linspace(0, flat.numel() - 1, samples, dtype=torch.float32, device=flat.device)
            flat = flat[at.long()]
        values = flat.to(torch.float16) if flat.is_floating_point() else flat.to(torch.int64)
        digest.update(values.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or ``torch.save`` file (``weights_only``: never
    unpickles code), unnested from ``state_dict``/``model``/``module`` checkpoint keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt file or pickled code
            raise PomtValueError(f"cannot read weights from {path}: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PomtValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _unwrapped(state: dict[str, torch.Tensor], own: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``state`` without a wrapper's prefix (``model.``, ``module.``, ``vit.``; e.g. a Lightning
    checkpoint of ``pomt.lightning.ViTClassifier``) that every key carries, unless a key
    already matches one of ``own``."""
    if set(state) & set(own):
        return state
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Load a ``.safetensors`` or ``torch.save`` state dict into ``model`` (never unpickles code).

    Accepts plain state dicts and checkpoints that nest them under ``state_dict``/``model``;
    a missing file or mismatched keys raise an error naming the file and a few offending keys.
    """
    path = Path(path)
    own = model.state_dict()
    state = _unwrapped(read_state_dict(path), own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if shape or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        if shape:
            parts.append(f"{len(shape)} with other shapes (e.g. {', '.join(shape[:5])})")
        raise PomtValueError(f"weights in {path} do not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=strict)
    return model


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """A timm ViT by name, optionally with pretrained (hub) or local weights.

    ``weights`` is a local file (see :func:`read_state_dict`) loaded by timm's own pretrained
    loading (``pretrained_cfg_overlay``), through the model's checkpoint filter: timm key
    names, original release key names (DeiT, DINOv2) and pomt's Lightning checkpoints all
    load. Keys that do not match are a ValueError naming the file and the keys.
    """
    import timm

    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('.')[0]}*")][:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise PomtValueError(f"unknown timm model {name!r}.{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if weights is not None:
        overlay: dict[str, object] = dict(file=str(weights), state_dict=_unwrapped(read_state_dict(weights)))
        if num_classes is not None:  # the file's classifier is loaded, not dropped as timm's 1000-class one
            overlay["num_classes"] = num_classes
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if weights is not None:
            raise PomtValueError(f"weights in {weights} do not match {name}: {err}") from err
        if pretrained:
            raise UnavailableError(
                f"could not fetch pretrained weights for {name!r} ({err}). Without network access, "
                "download them elsewhere and pass `weights=PATH`, or set pretrained=False."
            ) from err
        raise
    require_supported(model)
    return model
