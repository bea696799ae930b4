"""The layers: the method (every ``pomt`` module but the Lightning layer) imports with
Lightning, datasets and wandb absent, and imports nothing from the Lightning layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pomt"
LIGHTNING_LAYER = ("pomt.lightning", "pomt.callbacks", "pomt.datamodules", "pomt.evaluation")


def _core_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if not name.startswith(LIGHTNING_LAYER) and name != "pomt._triton":  # _triton needs triton
            names.append(name)
    return names


def test_the_method_imports_without_lightning_datasets_or_wandb():
    modules = _core_modules()
    assert "pomt.finder" in modules and "pomt.ops" in modules
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'lightning', 'pytorch_lightning', 'datasets', 'wandb', 'torchmetrics'}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from pomt import apply_pruning, find_r, profile_latency, select_r, token_layout\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_nothing_in_the_method_imports_the_lightning_layer():
    for name in _core_modules():
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(LIGHTNING_LAYER), f"{name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(LIGHTNING_LAYER), f"{name} imports {alias.name}"
