"""What the entry points (``train.py``, ``evaluate.py``) share: a console that shows what a user
can act on, and LightningCLI run on arguments given from Python.

Only the entry points call this: a library user's warnings and logs are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

__all__ = ["quiet_console", "command_line"]

# Lightning's own pytree helper trips over a deprecation in newer torch, once per evaluation
# loop; nothing a user of Lightning can change.
_LIBRARY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _OncePerMessage(logging.Filter):
    """Every Trainer prints its device lines and a tip: show the device lines once, no tips."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip"):
            return False
        if not message.startswith(("GPU available", "TPU available")):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_console() -> None:
    """Silence W&B's banner, Lightning's repeated lines and the library warnings above."""
    os.environ.setdefault("WANDB_SILENT", "true")
    for message in _LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _OncePerMessage) for f in log.filters):
        log.addFilter(_OncePerMessage())


@contextlib.contextmanager
def command_line(args: Sequence[str] | None) -> Iterator[None]:
    """While active, ``sys.argv`` holds ``args`` (when given), so that LightningCLI reads them
    from the command line instead of being handed both (which it warns about)."""
    if args is None:
        yield
        return
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pomt", *args]
    try:
        yield
    finally:
        sys.argv = saved
