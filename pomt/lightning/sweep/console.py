"""What the sweep says on the console while it runs: the line before it starts, its progress
bar (healing shown on it), and where the results went."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pomt.lightning.sweep.configurations import Configuration
from pomt.lightning.sweep.context import SweepRun
from pomt.lightning.sweep.plan import Plan
from pomt.lightning.sweep.settings import SweepSettings

__all__ = ["announce", "healing_shown", "print_where", "progress"]


@contextlib.contextmanager
def healing_shown(sweep: SweepRun, config: Configuration) -> Iterator[None]:
    """While a configuration heals, the progress bar says so; then the healing time so far."""
    bar = sweep.state.bar if config.heal_epochs else None
    if bar is None:
        yield
        return
    bar.set_postfix_str(f"healing {config.label} ({config.heal_epochs} epochs)", refresh=True)
    start = time.perf_counter()
    try:
        yield
    finally:
        sweep.state.heal_s += time.perf_counter() - start
        bar.set_postfix_str(f"healing and testing healed rows: {sweep.state.heal_s:.0f} s", refresh=True)


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[Any]:
    """The sweep's one progress bar (rank 0), counting configurations."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc="sweep", unit="config", position=0, leave=True, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def announce(sweep: SweepRun, settings: SweepSettings, plan: Plan, batch_sizes: list[int]) -> None:
    """The line before the sweep runs: what it compares, on what, and what is reused."""
    test = getattr(sweep.datamodule, "test_dataset", None)
    images = f"{len(test)} test images" if hasattr(test, "__len__") else "the test split"
    limit = (
        "" if settings.limit_test_batches is None else f" (limit_test_batches={settings.limit_test_batches})"
    )
    configs, to_test = plan.configs, len(plan.to_test)
    healed = sum(1 for c in plan.to_test if c.heal_epochs)
    heal = f" ({healed} healed for {settings.heal_epochs} epochs each first)" if healed else ""
    print(
        f"sweep: {len(configs)} configurations x batch sizes {batch_sizes} in {', '.join(plan.runs)}: "
        f"{', '.join(c.label for c in configs)}; accuracy on {images}{limit}; "
        f"{to_test} to test{heal}, {len(configs) - to_test} reused"
    )
    if sweep.state.bar is not None:
        sweep.state.bar.total = len(configs) * len(batch_sizes)
        sweep.state.bar.refresh()


def print_where(sweep: SweepRun) -> None:
    result = sweep.result
    print(f"report: {result.csv_path} and {result.json_path}; plot: {result.plot_path}")
    if result.wandb_dirs and sweep.state.wandb_offline:
        print(f"W&B offline runs (upload with `wandb sync DIR`): {Path(result.wandb_dirs[0]).parent}")
