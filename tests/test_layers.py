"""The layers: the method (every ``pomt`` module but the Lightning layer and the sweep) imports
with Lightning, datasets and wandb absent, and imports nothing from either; nothing in the
package but the sweep itself imports the sweep (``pomt.lightning.sweep``, the driver of evaluate.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pomt"
SWEEP = "pomt.lightning.sweep"
LIGHTNING_LAYER = ("pomt.lightning", "pomt.callbacks", "pomt.datamodules", SWEEP)
LIGHTNING = ("lightning", "pytorch_lightning")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _core_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if not name.startswith(LIGHTNING_LAYER) and name != "pomt.method._triton":  # _triton needs triton
            names.append(name)
    return names


def _imported(path: Path) -> list[str]:
    """Every module ``path`` imports, by absolute name (``from pomt import sweep`` -> pomt.lightning.sweep)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_the_method_imports_without_lightning_datasets_or_wandb():
    modules = _core_modules()
    assert "pomt.offline.finder" in modules and "pomt.method.ops" in modules
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


def test_nothing_in_the_method_imports_the_lightning_layer_or_the_sweep():
    core = _core_modules()
    assert "pomt.plots" in core and not any(name.startswith(SWEEP) for name in core)
    for name in core:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        for imported in _imported(path):
            assert not imported.startswith(LIGHTNING_LAYER), f"{name} imports {imported}"


def test_no_core_module_imports_lightning_anywhere_in_its_code():
    """Not at module level and not inside a function: Lightning glue lives in the layer."""
    core = _core_modules()
    assert {"pomt", "pomt.models", "pomt.offline.profiling", "pomt.cli"} <= set(core)
    for name in core:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        for imported in _imported(path):
            assert imported.split(".")[0] not in LIGHTNING, f"{name} imports {imported}"


def test_moved_modules_and_functions_have_one_name_only():
    import importlib

    import pytest

    import pomt.lightning.loggers

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pomt.loggers")  # the old name is gone, not aliased
    with pytest.raises(ImportError):
        from pomt.models import load_weights  # noqa: F401  (it lives in pomt.weights)
    from pomt.lightning import ViTClassifier
    from pomt.lightning.classifier import ViTClassifier as defined

    assert ViTClassifier is defined  # pomt.lightning.ViTClassifier, the configs' class path
    assert pomt.lightning.loggers.OfflineWandbLogger.__module__ == "pomt.lightning.loggers"


def test_importing_pomt_imports_no_lightning_module():
    code = "import sys, pomt; print(sorted(m for m in sys.modules if m.split('.')[0] in {'lightning', 'pytorch_lightning'} or m.startswith('pomt.lightning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_sweep_and_the_entry_points_import_the_sweep():
    sweep = [_module_name(path) for path in (PACKAGE / "lightning" / "sweep").glob("*.py")]
    assert {
        "pomt.lightning.sweep.evaluation",
        "pomt.lightning.sweep.report",
        "pomt.lightning.sweep.rundir",
    } <= set(sweep)
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _module_name(path).startswith(SWEEP):
            for imported in _imported(path):
                assert not imported.startswith(SWEEP), f"{_module_name(path)} imports {imported}"


def _sweep_graph() -> dict[str, set[str]]:
    """Each module of ``pomt.lightning.sweep`` and the ``pomt.lightning.sweep`` modules it imports, under
    ``TYPE_CHECKING`` or in a function included (``from pomt.lightning.sweep import x``: the submodule x
    when there is one, else the package)."""
    modules = {_module_name(path): path for path in (PACKAGE / "lightning" / "sweep").glob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imported(path):
            if imported in modules:
                edges.add(imported)
            elif imported.rpartition(".")[0] in modules:  # from pomt.lightning.sweep.x import Name
                edges.add(imported.rpartition(".")[0])
        graph[name] = edges - {name}
    return graph


def test_the_sweep_imports_form_a_dag():
    graph = _sweep_graph()
    assert {
        "pomt.lightning.sweep.evaluation",
        "pomt.lightning.sweep.plan",
        "pomt.lightning.sweep.settings",
    } <= set(graph)
    assert "pomt.lightning.sweep.settings" in graph["pomt.lightning.sweep.plan"]  # the graph sees real edges
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path[path.index(name) :], name))}"
        if name not in done:
            for imported in sorted(graph[name]):
                visit(imported, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_no_sweep_step_imports_the_driver():
    """The steps take the frozen settings (``pomt.lightning.sweep.settings``), not the driver."""
    graph = _sweep_graph()
    for name, edges in graph.items():
        if name not in ("pomt.lightning.sweep", "pomt.lightning.sweep.evaluation"):
            assert "pomt.lightning.sweep.evaluation" not in edges and "pomt.lightning.sweep" not in edges, (
                name
            )
