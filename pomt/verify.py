"""Check a selection before deploying it: time the pruned model against the unpruned one.

A latency profile times each n once, minutes apart from its neighbours; on a busy machine a
single fast measurement can make an n look like a step that is not there. So before R is
used, the model pruned at R and the unpruned model are timed side by side, call by call
(``pomt.timing.time_paired``), and R is kept only when

- the speed-up is significantly above 1 (the lower end of a 95 % confidence interval of the
  median paired speed-up is above 1), and
- in utility mode, the utility with the *measured* speed-up beats R = 0; with a latency
  budget, the measured latency meets the budget.

Otherwise the next candidate of the selection (in the order the objective ranks them) is
tried, and if none passes, the unpruned model (R = 0) is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from pomt.measure import image_size, on_device, random_batch
from pomt.pruning import apply_pruning, remove_pruning
from pomt.selection import Selection
from pomt.timing import cuda_graph_or_eager, median_interval, time_paired

__all__ = ["verify", "speedup_samples"]


def speedup_samples(
    model: nn.Module,
    vit: nn.Module,
    r: int,
    *,
    layer: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    cuda_graphs: bool = False,
    warmup: int = 3,
    min_run_time: float = 1.0,
    min_pairs: int = 20,
) -> tuple[list[float], float]:
    """Per-pair speed-ups ``t_unpruned / t_pruned`` of POMT at ``r``, timed call by call against
    the unpruned model (CUDA-graph replays when ``cuda_graphs``), and the unpruned median (ms)."""
    x = random_batch(vit, batch_size, image_size(vit, None), device, dtype)

    def call() -> object:
        return model(x)

    with on_device(model, vit, device, dtype), torch.inference_mode():
        graphs = cuda_graphs and device.type == "cuda"
        if graphs:  # both as graph replays, or both eager
            apply_pruning(vit, "pomt", r=r, layer=layer)
            pruned, mode = cuda_graph_or_eager(call, device, f"verifying r={r}: ")
            remove_pruning(vit)
            if mode == "cuda_graphs":
                unpruned, mode = cuda_graph_or_eager(call, device, f"verifying r={r}: ")
            graphs = mode == "cuda_graphs"
        if graphs:
            ratios, reference = time_paired(
                pruned, unpruned, device=device, warmup=warmup, min_run_time=min_run_time, min_pairs=min_pairs
            )
        else:
            ratios, reference = time_paired(
                call,
                call,
                device=device,
                warmup=warmup,
                min_run_time=min_run_time,
                min_pairs=min_pairs,
                prepare=lambda: apply_pruning(vit, "pomt", r=r, layer=layer),
                prepare_reference=lambda: remove_pruning(vit),
            )
    return [1.0 / max(ratio, 1e-12) for ratio in ratios], median_interval(reference)[0]


def _passes(selection: Selection, n: int, speedup: float, low: float, unpruned_ms: float) -> str | None:
    """None when n passes, else why not."""
    if low <= 1.0:
        return "not significantly faster than the unpruned model"
    if selection.mode == "utility":
        top = max(selection.curve_accuracy) or 1.0
        accuracy = dict(zip(selection.curve_n, selection.curve_accuracy, strict=True))
        a = selection.alpha
        measured = a * (1.0 - 1.0 / speedup) + (1.0 - a) * accuracy[n] / top
        unpruned = (1.0 - a) * accuracy.get(selection.n_total, top) / top
        if measured <= unpruned:
            return f"its measured utility {measured:.4f} does not beat R = 0 ({unpruned:.4f})"
    if selection.mode == "latency_budget" and unpruned_ms / speedup > selection.latency_budget_ms:
        return f"measured {unpruned_ms / speedup:.3f} ms, over the budget of {selection.latency_budget_ms} ms"
    return None


def verify(
    selection: Selection,
    measure: Callable[[int], tuple[Sequence[float], float]],
    *,
    candidates: int = 3,
    log: Callable[[str], object] = print,
) -> Selection:
    """The first of the selection's candidates (at most ``candidates`` of them) whose measured
    speed-up passes (see the module docstring), with the measurement recorded; else R = 0.

    ``measure(r)`` returns the per-pair speed-ups of POMT at ``r`` and the unpruned model's
    median latency (:func:`speedup_samples`, or a fake in tests).
    """
    if selection.n_star == selection.n_total:
        return replace(selection, verification="R=0 (the unpruned model): nothing to verify")
    rejected: list[int] = []
    reasons: list[str] = []
    for n in selection.candidates[:candidates]:
        if n == selection.n_total:
            break  # the objective prefers R = 0 to every candidate left
        r = selection.n_total - n
        samples, unpruned_ms = measure(r)
        speedup, low, high = median_interval(samples)
        predicted = selection.at(n).speedup
        line = f"R={r}: " + (f"predicted x{predicted:.3f}, " if predicted else "")
        line += f"measured x{speedup:.3f} [{low:.3f}, {high:.3f}] (95% CI, {len(samples)} paired calls)"
        why = _passes(selection, n, speedup, low, unpruned_ms)
        if why is None:
            note = f"{line}: verified" + (f" (rejected before: {'; '.join(reasons)})" if reasons else "")
            log(note)
            return replace(
                selection.at(n),
                measured_speedup=speedup,
                measured_speedup_interval=(low, high),
                rejected=tuple(rejected),
                verification=note,
            )
        log(f"{line}: {why}; trying the next candidate")
        rejected.append(n)
        reasons.append(f"R={r} {why}")
    note = "keeping the unpruned model (R=0): no candidate was measurably worth pruning"
    if reasons:
        note += f" ({'; '.join(reasons)})"
    log(note)
    fallback = selection.at(selection.n_total) if selection.n_total in selection.curve_n else selection
    return replace(fallback, rejected=tuple(rejected), verification=note)
