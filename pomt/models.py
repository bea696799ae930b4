"""The ViT contract: find the ViT inside a model, check it is one we can prune, and describe
its token layout, input size, device and dtype (building a ViT and its weights: ``pomt.weights``).

Supported: timm ``VisionTransformer`` models (``vit_*``, ``deit_*`` including distilled,
``vit_*_patch14_dinov2*`` with and without registers) and any model that looks like one:
a ``blocks`` sequence whose blocks have timm's attribute names (``norm1``, ``attn`` with
``qkv``/``num_heads``/``proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``,
``drop_path2``) and a ``patch_embed``, such as the DINOv2 authors' hub models; and timm ``Eva``
models with rotary positions (DINOv3, EVA02, RoPE-ViT, Perception Encoder: ``pomt.rope``).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pomt.errors import PomtValueError

__all__ = [
    "TokenLayout",
    "token_layout",
    "image_size",
    "device_of",
    "dtype_of",
    "vit_blocks",
    "unsupported_reason",
    "is_eva",
    "eva_block_unsupported_reason",
    "require_supported",
    "is_supported_vit",
    "find_vit",
    "uncompiled",
    "unwrap_compiled",
    "architecture",
    "model_name",
    "train_modes",
    "restore_train_modes",
]

BLOCK_ATTRIBUTES = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTENTION_ATTRIBUTES = ("qkv", "num_heads", "proj")


@dataclass(frozen=True)
class TokenLayout:
    """How many tokens a ViT carries through its blocks.

    ``n_total`` (N) tokens enter the first block: ``prefix`` (p) tokens (CLS, distillation
    token, registers), which are never pruned, followed by ``n_patches`` ordinary tokens
    from a ``patch_grid`` of patches.
    """

    n_total: int
    prefix: int
    depth: int
    embed_dim: int
    num_heads: int
    patch_grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.n_total - self.prefix


def _flatten_blocks(blocks: nn.Module) -> Iterator[nn.Module]:
    for child in blocks.children() if not hasattr(blocks, "attn") else [blocks]:
        if hasattr(child, "attn"):
            yield child
        elif isinstance(child, nn.Identity):
            continue  # padding inside the DINOv2 authors' chunked blocks
        elif isinstance(child, (nn.ModuleList, nn.Sequential)):
            yield from _flatten_blocks(child)
        else:
            yield child  # reported as unsupported by unsupported_reason


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` in execution order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise PomtValueError(f"{type(model).__name__} has no `blocks` module: it is not a supported ViT")
    return list(_flatten_blocks(blocks))


def _prefix_tokens(model: nn.Module) -> int | None:
    if isinstance(getattr(model, "num_prefix_tokens", None), int):
        return int(model.num_prefix_tokens)
    if hasattr(model, "cls_token") or hasattr(model, "register_tokens"):
        cls = 1 if getattr(model, "cls_token", None) is not None else 0
        regs = int(getattr(model, "num_register_tokens", 0) or 0)
        dist = 1 if getattr(model, "dist_token", None) is not None else 0
        return cls + regs + dist
    return None


def is_eva(vit: nn.Module) -> bool:
    """Whether the blocks of ``vit`` are timm's Eva blocks (which take a rotary table)."""
    from timm.models.eva import EvaBlock, EvaBlockPostNorm  # timm is imported where it is needed

    blocks = getattr(vit, "blocks", None)
    eva = (EvaBlock, EvaBlockPostNorm)
    return isinstance(blocks, nn.Module) and any(isinstance(b, eva) for b in blocks.children())


def eva_block_unsupported_reason(where: str, block: nn.Module, prefix: int) -> str | None:
    """Why an Eva block cannot be pruned (``where`` names it), or None."""
    attn = getattr(block, "attn", None)
    if attn is None:
        return f"{where} ({type(block).__name__}) has no attn"
    missing = [
        a for a in ("num_heads", "proj", "q_norm", "k_norm", "num_prefix_tokens") if not hasattr(attn, a)
    ]
    if getattr(attn, "qkv", None) is None and getattr(attn, "q_proj", None) is None:
        missing.append("qkv or q_proj/k_proj/v_proj")
    if missing:
        return f"{where}.attn ({type(attn).__name__}) lacks {', '.join(missing)}"
    if attn.num_prefix_tokens != prefix:
        return (
            f"{where}.attn rotates all but {attn.num_prefix_tokens} prefix tokens, the model has {prefix}: "
            "the rotary table would not line up with the tokens"
        )
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be pruned, or None when it can."""
    name = type(model).__name__
    if name == "NaFlexVit":
        return (
            "NaFlexVit (variable resolution and aspect ratio) is not supported yet: its tokens come from "
            "`embeds` with a per-image padding mask (`patch_valid`) that every block's attention takes as "
            "`attn_mask`, and pruning would have to keep real patches over padded ones and leave padded "
            "ones out of POMT's fused token; use a fixed-size ViT (e.g. vit_base_patch16_siglip_224)"
        )
    if not isinstance(getattr(model, "blocks", None), nn.Module):
        return f"{name} has no `blocks` attribute"
    if not isinstance(getattr(model, "patch_embed", None), nn.Module):
        return f"{name} has no `patch_embed` attribute"
    if _prefix_tokens(model) is None:
        return f"{name} has neither `num_prefix_tokens` nor `cls_token`/`register_tokens`"
    blocks = vit_blocks(model)
    if not blocks:
        return f"{name}.blocks is empty"
    eva = is_eva(model)  # Eva blocks (rotary positions) have their own contract
    for i, block in enumerate(blocks):
        if eva:
            why = eva_block_unsupported_reason(f"{name}.blocks[{i}]", block, _prefix_tokens(model))
            if why is not None:
                return why
            continue
        missing = [a for a in BLOCK_ATTRIBUTES if not hasattr(block, a)]
        if missing:
            return f"{name}.blocks[{i}] ({type(block).__name__}) lacks {', '.join(missing)}"
        missing = [a for a in ATTENTION_ATTRIBUTES if not hasattr(block.attn, a)]
        if missing:
            return f"{name}.blocks[{i}].attn ({type(block.attn).__name__}) lacks {', '.join(missing)}"
    return None


def is_supported_vit(model: nn.Module) -> bool:
    return unsupported_reason(model) is None


def require_supported(model: nn.Module) -> None:
    reason = unsupported_reason(model)
    if reason is not None:
        raise PomtValueError(
            f"unsupported model {type(model).__name__}: {reason}. Supported are timm VisionTransformer "
            "models (vit_*, deit_*, vit_*_dinov2*), timm Eva models (vit_*_dinov3*, eva02_*, vit_*_rope_*, "
            "vit_pe_*) and models whose blocks use timm's attribute names "
            f"({', '.join(BLOCK_ATTRIBUTES)}; attn with {', '.join(ATTENTION_ATTRIBUTES)})."
        )


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def token_layout(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> TokenLayout:
    """Token layout of the ViT in ``model`` for inputs of ``img_size`` (default: its own size)."""
    model = find_vit(model)[1]
    pe = model.patch_embed
    if img_size is not None:
        patch = getattr(pe, "patch_size", None)
        if patch is None:
            raise PomtValueError(
                f"{type(pe).__name__} has no `patch_size`: cannot derive tokens for img_size"
            )
        ph, pw = _pair(patch)
        h, w = _pair(img_size)
        if h < ph or w < pw:
            raise PomtValueError(f"img_size {img_size} is smaller than the patch size {(ph, pw)}")
        grid = (h // ph, w // pw)
    elif getattr(pe, "grid_size", None) is not None:
        grid = _pair(pe.grid_size)
    elif getattr(pe, "patches_resolution", None) is not None:  # DINOv2 authors' PatchEmbed
        grid = _pair(pe.patches_resolution)
    elif isinstance(getattr(pe, "num_patches", None), int):
        side = int(pe.num_patches**0.5)
        grid = (side, pe.num_patches // max(side, 1))
    else:
        raise PomtValueError(f"{type(pe).__name__} has no grid_size/patches_resolution/num_patches")
    prefix = _prefix_tokens(model)
    blocks = vit_blocks(model)
    embed_dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if embed_dim is None:
        embed_dim = blocks[0].attn.qkv.in_features
    return TokenLayout(
        n_total=grid[0] * grid[1] + prefix,
        prefix=prefix,
        depth=len(blocks),
        embed_dim=int(embed_dim),
        num_heads=int(blocks[0].attn.num_heads),
        patch_grid=grid,
    )


def image_size(vit: nn.Module, img_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """The input size ``(height, width)`` of ``vit``: ``img_size`` when given, else the size its
    patch embedding was built for, else its patch grid times its patch size."""
    if img_size is not None:
        return _pair(img_size)
    size = getattr(vit.patch_embed, "img_size", None)
    if size is not None:
        return _pair(size)
    layout = token_layout(vit)
    ph, pw = _pair(getattr(vit.patch_embed, "patch_size", 16))
    return (layout.patch_grid[0] * ph, layout.patch_grid[1] * pw)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter (or buffer); the CPU without either."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def train_modes(model: nn.Module) -> dict[str, bool]:
    """Each submodule's ``training`` flag, by name: what :func:`restore_train_modes` puts back
    (a model may hold modules in eval mode on purpose, e.g. a frozen normalisation)."""
    return {name: module.training for name, module in model.named_modules()}


def restore_train_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Put back the ``training`` flags of :func:`train_modes` (modules not recorded are left)."""
    for name, module in model.named_modules():
        if name in modes:
            module.training = modes[name]


def dtype_of(model: nn.Module) -> torch.dtype | None:
    """The dtype ``model`` computes in: that of its first floating parameter (or buffer); None
    without one."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _vit_candidates(root: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(path, module, why it is unsupported or None)`` of every submodule of ``root`` with a
    ``patch_embed`` and ``blocks``, outermost first."""
    for name, module in root.named_modules():
        if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            yield name, module, unsupported_reason(module)


def find_vit(root: nn.Module, path: str | None = None) -> tuple[str, nn.Module]:
    """The ViT inside ``root``: the submodule at dotted ``path``, or the first supported one.

    Returns ``(path, module)`` (path ``""`` when ``root`` itself is the ViT). Every public
    function of ``pomt`` that takes a model finds its ViT this way, so a LightningModule, a
    wrapper or a ``torch.compile``'d module works wherever a bare ViT does.
    """
    if path:
        try:
            module = root.get_submodule(path)
        except AttributeError as err:
            found = [name for name, _, why in _vit_candidates(root) if why is None]
            names = [name for name, _ in root.named_modules() if name]
            close = found[:1] or difflib.get_close_matches(path, names, n=1)
            hint = f"; did you mean vit_path={close[0]!r}?" if close else ""
            raise PomtValueError(f"{type(root).__name__} has no submodule at path {path!r}{hint}") from err
        require_supported(module)
        return path, module
    if is_supported_vit(root):
        return "", root
    searched = []
    for name, module, why in _vit_candidates(root):
        if why is None:
            return name, module
        searched.append(f"{name or '<root>'} ({type(module).__name__}: {why})")
    detail = "; candidates rejected: " + "; ".join(searched) if searched else ""
    raise PomtValueError(
        f"no supported ViT found inside {type(root).__name__}: {unsupported_reason(root)}; searched all "
        f"submodules for one with `patch_embed` and `blocks` of timm-style blocks{detail}. Supported are "
        "timm VisionTransformer models (vit_*, deit_*, vit_*_dinov2*), timm Eva models (vit_*_dinov3*, "
        "eva02_*, vit_*_rope_*, vit_pe_*) and models whose blocks use timm's "
        f"attribute names ({', '.join(BLOCK_ATTRIBUTES)}); pass the ViT's attribute path explicitly."
    )


def _compiled(module: nn.Module) -> nn.Module | None:
    original = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    return original if isinstance(original, nn.Module) else None


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` wrapped, or ``module`` itself when it is not compiled."""
    return _compiled(module) or module


@contextlib.contextmanager
def uncompiled(model: nn.Module) -> Iterator[tuple[nn.Module, list[str]]]:
    """While active, ``torch.compile``'d submodules of ``model`` are swapped for their originals.

    Yields ``(eager model, paths of the compiled modules)``. Timing a compiled module at many
    token counts would recompile it for every shape; the search times the eager original
    instead, and the user's compiled wrapper is put back as it was afterwards.
    """
    root = _compiled(model) or model
    paths = ["<model>"] if root is not model else []
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            original = _compiled(child)
            if original is not None:
                setattr(module, child_name, original)
                swapped.append((module, child_name, child))
                paths.append(f"{name}.{child_name}" if name else child_name)
    try:
        yield root, paths
    finally:
        for module, child_name, child in reversed(swapped):
            setattr(module, child_name, child)


def model_name(model: nn.Module) -> str:
    """timm architecture name of ``model`` (or of the ViT inside it), else its class name."""
    for module in (model, *model.modules()):
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(model).__name__


def architecture(vit: nn.Module, img_size: int | tuple[int, int] | None = None) -> str:
    """What latency depends on besides the device: the class, depth, width, heads, patch size,
    token count and prefix, as one string (equal strings: same shapes in every kernel)."""
    layout = token_layout(vit, img_size)
    patch = _pair(getattr(vit.patch_embed, "patch_size", 0) or 0)
    return (
        f"{type(vit).__name__} depth={layout.depth} embed_dim={layout.embed_dim} heads={layout.num_heads} "
        f"patch={patch[0]}x{patch[1]} n_total={layout.n_total} prefix={layout.prefix}"
    )
