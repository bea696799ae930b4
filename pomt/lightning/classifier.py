"""``ViTClassifier``: a LightningModule that trains, validates, tests and predicts with a ViT.

It builds a timm ViT by name (random, pretrained or from a local weights file), wraps a
model the user passes, or puts a DINOv2 backbone under the linear head layout of the
DINOv2 authors. It logs top-1/top-5 accuracy and the per-batch forward latency, so a
pruned and an unpruned run can be compared from their logged metrics alone.

Part of the Lightning layer (with ``pomt.lightning.loggers``, ``pomt.lightning.sweep``, ``pomt.callbacks`` and
``pomt.datamodules``), which the method core does not import; ``pomt/__init__`` does not
import it either.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pomt.data import split_batch
from pomt.errors import PomtValueError
from pomt.timing import Stopwatch, TimingStats
from pomt.weights import create_model, load_weights

__all__ = ["ViTClassifier", "HEADS", "dinov2_linear_features"]

HEADS = ("dinov2_linear",)
_STAGES = ("train", "val", "test")


def dinov2_linear_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """concat(CLS token, mean of the patch tokens) of the backbone's normalised last tokens.

    This is the input of the DINOv2 authors' one-block linear heads, so their head files
    (``weight``/``bias`` of shape ``[classes, 2 * embed_dim]``) load as they are. Register
    tokens are neither CLS nor patch tokens and stay out of the mean; after POMT pruning the
    fused token counts as one patch token.
    """
    tokens = backbone.forward_features(x)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def _existing_file(path: str | os.PathLike[str], what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    return str(path)


class ViTClassifier(pl.LightningModule):
    """Image classification with a ViT: fine-tune, validate, test (with latency) and predict.

    Build a timm model by ``model_name`` (``model_kwargs`` are extra timm arguments, e.g.
    ``patch_size``/``embed_dim``/``depth``/``num_heads`` for a tiny ViT) or pass ``model``.
    ``weights`` is a local ``.safetensors``/``torch.save`` file (a Lightning checkpoint of
    this module works too). ``head="dinov2_linear"`` builds the backbone with no classifier
    and adds the DINOv2 linear head (``head_weights``: a local head file).

    The ViT the POMT callback prunes is ``self.model`` (timm classifier) or
    ``self.backbone`` (DINOv2 head); ``forward(x)`` returns logits.

    Latency: each validation/test batch's forward pass is timed with
    :class:`pomt.timing.Stopwatch` (CUDA synchronised); the first ``latency_warmup_batches``
    and batches of another size than the first are left out. Logged at epoch end as
    ``{stage}/latency_ms`` (median), ``{stage}/latency_p90_ms`` and ``{stage}/latency_batch_size``.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int | None = None,
        img_size: int | None = None,
        *,
        pretrained: bool = False,
        weights: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        head: str | None = None,
        head_weights: str | None = None,
        freeze_backbone: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        latency_warmup_batches: int = 2,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if head is not None and head not in HEADS:
            raise PomtValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)} or None")
        if head_weights is not None and head is None:
            raise PomtValueError("head_weights given without head: set head='dinov2_linear'")
        if not 0.0 <= label_smoothing < 1.0:
            raise PomtValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if latency_warmup_batches < 0:
            raise PomtValueError(f"latency_warmup_batches must be >= 0, got {latency_warmup_batches}")
        if lr <= 0:
            raise PomtValueError(f"lr must be > 0, got {lr}")

        if head == "dinov2_linear":
            backbone = model if model is not None else self._build(num_classes=0)
            if num_classes is None:
                raise PomtValueError("head='dinov2_linear' needs num_classes (e.g. 1000 for ImageNet-1k)")
            self.backbone = backbone
            embed_dim = int(getattr(backbone, "embed_dim", None) or backbone.num_features)
            self.head = nn.Linear(2 * embed_dim, num_classes)
            if head_weights is not None:
                load_weights(self.head, _existing_file(head_weights, "head weights"))
            if freeze_backbone:
                backbone.requires_grad_(False)
        else:
            self.model = model if model is not None else self._build(num_classes=num_classes)
            if freeze_backbone:
                for name, p in self.model.named_parameters():
                    p.requires_grad_(name.startswith("head"))
            if num_classes is None:
                num_classes = getattr(self.model, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise PomtValueError(f"cannot tell the number of classes ({num_classes!r}): pass num_classes")
        self.num_classes = num_classes
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_acc{k}": MulticlassAccuracy(num_classes, top_k=top, average="micro")
                for stage in _STAGES
                for k, top in ((1, 1), (5, top5))
            }
        )
        self._latency: dict[str, list[tuple[int, float]]] = {}
        self._batches_seen: dict[str, int] = {}
        self.last_latency: dict[str, TimingStats] = {}

    # ----------------------------------------------------------------- building
    def _build(self, num_classes: int | None) -> nn.Module:
        hp = self.hparams
        return create_model(
            hp.model_name,
            pretrained=hp.pretrained,
            weights=hp.weights,
            num_classes=num_classes,
            img_size=hp.img_size,
            **dict(hp.model_kwargs or {}),
        )

    @property
    def vit(self) -> nn.Module:
        """The ViT that pruning acts on."""
        return self.backbone if self.hparams.head == "dinov2_linear" else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.head == "dinov2_linear":
            return self.head(dinov2_linear_features(self.backbone, x))
        return self.model(x)

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = split_batch(batch)
        if y is None:
            raise PomtValueError("training batches need labels: (images, labels)")
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.metrics["train_acc1"](logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log(
            "train/acc1", self.metrics["train_acc1"], on_step=False, on_epoch=True, batch_size=x.shape[0]
        )
        return loss

    def _timed_forward(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        seen = self._batches_seen.get(stage, 0)
        self._batches_seen[stage] = seen + 1
        with Stopwatch(self.device) as sw:
            logits = self(x)
        if seen >= self.hparams.latency_warmup_batches:
            self._latency.setdefault(stage, []).append((int(x.shape[0]), sw.elapsed_ms))
        return logits

    def _eval_step(self, stage: str, batch: Any) -> torch.Tensor:
        x, y = split_batch(batch)
        logits = self._timed_forward(stage, x)
        if y is not None:
            n = x.shape[0]
            loss = F.cross_entropy(logits, y)
            self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)
            # the images behind the accuracy, summed over batches and processes
            self.log(
                f"{stage}/images", float(n), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True
            )
            for k in (1, 5):
                metric = self.metrics[f"{stage}_acc{k}"]
                metric(logits, y)
                self.log(f"{stage}/acc{k}", metric, on_epoch=True, batch_size=n, prog_bar=k == 1)
        return logits

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._eval_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Logits of the batch's images."""
        x, _ = split_batch(batch)
        return self._timed_forward("predict", x)

    # ----------------------------------------------------------------- latency
    def _log_latency(self, stage: str) -> None:
        """At the end of a stage's epoch: log (and keep in ``last_latency``) the epoch's latency,
        then start counting the next epoch's batches afresh."""
        samples = self._latency.pop(stage, [])
        self._batches_seen[stage] = 0
        if not samples:
            return
        batch_size = samples[0][0]  # the loader's batch size; a smaller last batch is left out
        stats = TimingStats.from_samples([ms for b, ms in samples if b == batch_size])
        self.last_latency[stage] = stats
        if stage == "predict":
            return  # self.log is not available in predict; read `last_latency`
        # this process's own device, and no collective call: under DDP a process may have seen
        # too few batches to time any
        for key, value in (("latency_ms", stats.median_ms), ("latency_p90_ms", stats.p90_ms)):
            self.log(f"{stage}/{key}", value, rank_zero_only=True)
        self.log(f"{stage}/latency_batch_size", float(batch_size), rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_latency("val")

    def on_test_epoch_end(self) -> None:
        self._log_latency("test")

    def on_predict_epoch_end(self) -> None:
        self._log_latency("predict")

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no weight decay on biases, norms, tokens and position embeddings), then
        per-step linear warm-up for ``warmup_epochs`` and cosine decay to ``min_lr_ratio * lr``."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "dist_token"))
            (no_decay if skip else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)

        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if math.isfinite(total) and max_epochs and max_epochs > 0:
            total = max(1, int(total))
            warmup = int(round(total * hp.warmup_epochs / max_epochs))
        else:
            total, warmup = None, 0
        schedule = _warmup_cosine(warmup, total, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _warmup_cosine(warmup: int, total: int | None, min_ratio: float):
    """LR factor per step: linear from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total is None or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
