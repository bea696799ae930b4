"""How ``pomt``'s subpackages are found when ``pomt`` is imported from a source checkout.

The repository's top-level ``callbacks/`` and ``datamodules/`` install as ``pomt.callbacks``
and ``pomt.datamodules`` (``package-dir`` in pyproject.toml). Run from a checkout
(``python evaluate.py`` puts the root first on ``sys.path``, so ``./pomt`` is imported even
when a wheel is installed), the two folders are found here instead, under those names only:
no link in the tree, and each file imports under one name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

SOURCE_FOLDERS = {"pomt.callbacks": "callbacks", "pomt.datamodules": "datamodules"}


def checkout_root(package_dir: Path) -> Path | None:
    """The repository root when ``package_dir`` (``pomt/``) lies in a source checkout whose
    top-level folders hold the subpackages, else None (an installed wheel holds them inside)."""
    root = package_dir.parent
    if not (root / "pyproject.toml").is_file():
        return None
    if all((root / folder / "__init__.py").is_file() for folder in SOURCE_FOLDERS.values()):
        return root
    return None


class _SourceFolders(importlib.abc.MetaPathFinder):
    """Finds ``pomt.callbacks`` / ``pomt.datamodules`` in the checkout's top-level folders."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        folder = SOURCE_FOLDERS.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install(package_dir: Path) -> None:
    """Put the finders first on ``sys.meta_path`` (once); they answer for their names only."""
    if any(isinstance(f, _SourceFolders) for f in sys.meta_path):
        return
    root = checkout_root(package_dir)
    if root is not None:
        sys.meta_path.insert(0, _SourceFolders(root))


install(Path(__file__).resolve().parent)
