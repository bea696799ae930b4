"""The errors ``pomt`` raises on purpose, for callers who want to catch them, and the one int
check its validation shares.

Each is also the built-in error it refines (``PruningError`` is a ``ValueError``), so code
that catches the built-in keeps working. Anything else that escapes (out of memory, a shape
bug) is not ours and keeps its traceback: the command line turns only these, ``ValueError``
and ``FileNotFoundError`` into exit status 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "PomtError",
    "PomtValueError",
    "PomtTypeError",
    "PruningError",
    "TargetError",
    "UnavailableError",
    "MissingExtraError",
    "is_int",
    "is_fraction",
    "require",
]

# What to pip install for each optional module, when it is not the module's own name.
_PIP_NAMES = {"sklearn": "scikit-learn", "jsonargparse": "'jsonargparse[signatures]'"}


class PomtError(Exception):
    """Base of the errors ``pomt`` raises on purpose."""


class PomtValueError(PomtError, ValueError):
    """A value ``pomt`` cannot take (a setting out of range, a file that is not a profile); the
    message names the value and what would be valid."""


class PomtTypeError(PomtError, TypeError):
    """An argument of the wrong type (the message names what was given and what is taken)."""


class PruningError(PomtValueError):
    """A pruning request this model cannot take: an unknown method, or an r or layer out of
    its range (the message names the value, the valid range and the fix)."""


class TargetError(PomtValueError):
    """A target the model cannot run on: an unknown runtime, a device that runtime does not
    run on, a bad dtype, thread count or batch size (``pomt.deploy.targets``)."""


class UnavailableError(PomtError, RuntimeError):
    """What was asked needs something this machine lacks (Triton, network access for
    pretrained weights); the message says what to install or pass instead."""


class MissingExtraError(PomtError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install 'pomt[deploy]'``)."""


def is_int(value: object) -> bool:
    """An ``int`` and not a ``bool`` (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_fraction(value: object) -> bool:
    """A real number (not a ``bool``) in [0, 1): a share of something, such as a tolerance."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def require(module: str, extra: str) -> ModuleType:
    """Import the optional ``module``, or raise :class:`MissingExtraError` naming the ``extra``
    of ``pomt`` that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = _PIP_NAMES.get(module.split(".")[0], module.split(".")[0])
        raise MissingExtraError(
            f"{module} is not installed: it is part of the {extra} extra, `pip install 'pomt[{extra}]'` "
            f"(or `pip install {package}`)"
        ) from err
