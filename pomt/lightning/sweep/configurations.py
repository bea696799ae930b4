"""What the sweep compares, and how: the configurations (unpruned, POMT at R, ToMe and Top-K
at matching r), their side-by-side timing on one batch, and their token maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import pomt
from pomt.deploy.targets import Target
from pomt.plots import plot_token_groups
from pomt.timing import time_interleaved

__all__ = [
    "Configuration",
    "configurations",
    "matching_r_values",
    "time_configurations",
    "runtime_accuracy",
    "runtime_accuracy",
    "SideBySide",
    "token_maps_figure",
]


@dataclass(frozen=True)
class Configuration:
    """One evaluated way of running the model: ``method`` with ``r`` (``selected``: POMT at the
    R chosen for this device); ``heal_epochs`` > 0: fine-tuned that many epochs at this r first."""

    method: str
    r: int
    selected: bool = False
    heal_epochs: int = 0

    @property
    def label(self) -> str:
        """How tables, figures and logs name it: ``unpruned``, ``tome r=4``, ``tome r=4 healed``."""
        name = "unpruned" if self.method == "none" else f"{self.method} r={self.r}"
        return f"{name} healed" if self.heal_epochs else name

    @property
    def key(self) -> str:
        """How files and records name it (stable, no spaces): ``unpruned``, ``tome-r4``,
        ``tome-r4-healed2`` (2 epochs)."""
        name = "unpruned" if self.method == "none" else f"{self.method}-r{self.r}"
        return f"{name}-healed{self.heal_epochs}" if self.heal_epochs else name

    @property
    def base(self) -> Configuration:
        """The training-free configuration with the same method and r (its latency is this one's)."""
        return replace(self, heal_epochs=0)


def mean_n(vit: nn.Module, config: Configuration, layer: int) -> float:
    """Mean tokens per block: the first-order compute of a ViT under ``config``."""
    schedule = pomt.token_schedule(vit, config.method, config.r, layer)
    return sum(schedule) / len(schedule)


def matching_r_values(
    vit: nn.Module, method: str, target_mean_n: Sequence[float], layer: int = 3
) -> list[int]:
    """For each target, the per-block ``r`` of ``method`` whose mean tokens per block is closest,
    so that ToMe and Top-K land in the latency range of the POMT configuration they meet."""
    layout = pomt.token_layout(vit)
    candidates: dict[int, float] = {}
    for r in range(1, layout.n_patches):
        try:
            candidates[r] = mean_n(vit, Configuration(method, r), layer)
        except ValueError:
            break
    chosen: list[int] = []
    if not candidates:
        return chosen
    tolerance = 0.05 * layout.n_total
    lowest, highest = min(candidates.values()) - tolerance, max(candidates.values()) + tolerance
    for target in target_mean_n:
        if not lowest <= target <= highest:
            continue  # out of this method's reach (e.g. more than ToMe can merge)
        best = min(candidates, key=lambda r: (abs(candidates[r] - target), r))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def configurations(
    vit: nn.Module,
    methods: Sequence[str],
    r: int | None,
    layer: int,
    span: Sequence[float],
    explicit: dict[str, list[int] | None],
    heal_epochs: int = 0,
) -> list[Configuration]:
    """Unpruned, POMT at ``r`` (None: not evaluated), and ToMe/Top-K at ``explicit[method]`` or at
    r values whose mean token counts span ``span`` times POMT's reduction (a quarter of the
    patches when POMT removes nothing); with ``heal_epochs`` > 0, then every pruned one again,
    healed for that many epochs, and the unpruned model fine-tuned the same way (the control:
    what the epochs give without pruning)."""
    layout = pomt.token_layout(vit)
    configs = [Configuration("none", 0)] if "none" in methods else []
    reduction = 0.0
    if r is not None:
        configs.append(Configuration("pomt", r, selected=True))
        reduction = layout.n_total - mean_n(vit, configs[-1], layer)
    if reduction <= 0:
        reduction = 0.25 * layout.n_patches
    targets = [layout.n_total - s * reduction for s in span]
    for method in ("tome", "topk"):
        if method in methods:
            values = explicit.get(method)
            values = values if values is not None else matching_r_values(vit, method, targets, layer)
            configs.extend(Configuration(method, int(v)) for v in values)
    if heal_epochs > 0:
        configs += [replace(c, heal_epochs=heal_epochs) for c in configs if c.method == "none" or c.r > 0]
    return configs


@dataclass(frozen=True)
class SideBySide:
    """How the configurations are timed against each other: ``rounds`` interleaved rounds on
    one test batch after ``warmup`` untimed calls each, on the sweep's Target (CUDA-graph
    replays, an exported runtime: its runtime decides how each configuration runs)."""

    rounds: int
    warmup: int

    def describe(self, target: Target) -> str:
        """In words, for the table header, the report, the W&B config and the records' conditions
        (``target``: resolved, with its precision)."""
        return f"{target.describe_timing()}, warm-up {self.warmup}, {self.rounds} interleaved rounds on one test batch"


def time_configurations(
    model: nn.Module,
    vit: nn.Module,
    images: torch.Tensor,
    configs: Sequence[Configuration],
    *,
    layer: int,
    target: Target,
    how: SideBySide,
    accuracy_on: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Latency of every configuration of ``vit`` (the ViT in ``model``, found once by the
    caller) on ``images`` on ``target``, interleaved round by round (call this under the
    precision the profile used). Each configuration runs as the Target's runtime runs it (eager,
    a captured CUDA graph replayed, an exported graph compiled by an exported runtime), and its
    ``mode`` says how; one the runtime cannot run is left out, with a warning saying why.
    ``accuracy_on``: test batches to measure each configuration's accuracy on, as the runtime
    computes it (a runtime that computes in another precision than PyTorch). Returns
    ``{key: stats + mode [+ accuracy]}``."""
    accuracy: dict[str, dict[str, float]] = {}
    with target.prepare(model, layer=layer, vit=vit, example=images) as prepared:
        calls = {c.key: prepared.configured(c.method, c.r, c.label) for c in configs}
        calls = {key: call for key, call in calls.items() if call is not None}
        for key, call in calls.items():
            if accuracy_on is not None and call.infer is not None:
                accuracy[key] = runtime_accuracy(call.infer, accuracy_on, len(images))

        def setup(key: str) -> None:
            if calls[key].setup is not None:
                calls[key].setup()

        stats = time_interleaved(
            {key: call.run for key, call in calls.items()},
            device=prepared.device,
            rounds=how.rounds,
            warmup=how.warmup,
            prepare=setup,
            progress=f"timing {len(calls)} configurations",
        )
    extra = {key: {"accuracy": value} for key, value in accuracy.items()}
    return {key: {**s.to_dict(), "mode": calls[key].mode, **extra.get(key, {})} for key, s in stats.items()}


def runtime_accuracy(
    infer: Callable[[torch.Tensor], torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    size: int,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of a compiled configuration ``infer`` (images -> logits, compiled
    at batch ``size``) on ``batches``; a smaller last batch is padded with its last image to the
    compiled shape and the padding's outputs dropped."""
    top1 = top5 = images = 0
    for x, y in batches:
        x = x.detach().to("cpu", torch.float32)
        count = len(x)
        if count < size:
            x = torch.cat([x, x[-1:].expand(size - count, *x.shape[1:])])
        logits = infer(x)[:count].float()
        y = y.to("cpu")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(-1).sum())
        images += count
    return {"acc1": top1 / max(images, 1), "acc5": top5 / max(images, 1), "images": images}


def token_maps_figure(
    vit: nn.Module, images: torch.Tensor, configs: Sequence[Configuration], layer: int
) -> Any:
    """The same images unpruned, with POMT at its R, and with the ToMe and Top-K settings whose
    mean token count is closest to POMT's: one column each, titled by the configuration's
    label (``pomt.plots.plot_token_groups``)."""
    configs = [c for c in configs if not c.heal_epochs]  # the tokens of the starting weights
    chosen = next((c for c in configs if c.selected), None)
    target = mean_n(vit, chosen, layer) if chosen else 0.0
    shown = [c for c in configs if c.method in ("none", "pomt")]
    for method in ("tome", "topk"):
        group = [c for c in configs if c.method == method]
        if group:
            shown.append(min(group, key=lambda c: (abs(mean_n(vit, c, layer) - target), c.r)))
    columns = {}
    for config in shown:
        with pomt.pruned(vit, config.method, r=config.r, layer=layer):
            columns[config.label] = pomt.token_groups(vit, images)
    layout = pomt.token_layout(vit)
    return plot_token_groups(images, columns, prefix=layout.prefix, patch_grid=layout.patch_grid)
