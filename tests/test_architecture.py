"""The house rules, read from the code itself (``scripts/import_graph.py``, every import counted,
the ones inside functions included): imports run one way (no cycle), no module imports another
module's private names, runtimes are named and branched on only in ``pomt.deploy``, the entry
points stay readable, no DeprecationWarning keeps an old name alive, every error for bad input
is a PomtError, and each file imports under one name."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRAPH = _graph_module()


@pytest.fixture(scope="module")
def report() -> dict:
    return GRAPH.report(ROOT)


def test_the_graph_sees_every_folder_and_function_level_imports(report):
    folders = report["modules_per_folder"]
    for folder in ("pomt", "pomt/method", "pomt/offline", "pomt/deploy", "pomt/lightning", "callbacks"):
        assert folders.get(folder, 0) >= 2, folder
    # a function-level import is an edge: pomt.deploy.export imports pomt.deploy.placement at module
    # level, and the graph must also see imports made inside functions (dispatch's _triton)
    known = GRAPH.modules(ROOT)
    edges, _ = GRAPH.graph(known)
    assert "pomt.method._triton" in edges["pomt.method.dispatch"]


def test_no_import_cycle_counting_imports_inside_functions(report):
    assert report["cycles"] == []


def test_a_cycle_is_found_where_there_is_one(tmp_path):
    for folder in ("pomt", "callbacks", "datamodules"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "pomt" / "a.py").write_text("from pomt.b import f\n")
    (tmp_path / "pomt" / "b.py").write_text("def f():\n    from pomt import a\n    return a._x\n")
    result = GRAPH.report(tmp_path)
    assert result["cycles"] == [["pomt.a", "pomt.b"]]
    assert result["private_imports"] == ["pomt.b:3 imports pomt.a._x"]


def test_no_module_imports_another_modules_private_names(report):
    assert report["private_imports"] == []


def test_runtimes_are_named_and_branched_on_only_in_the_deploy_package(report):
    assert report["runtime_strings"] == []
    assert report["runtime_branches"] == []


def test_no_deprecation_shims_and_no_bare_value_or_type_errors(report):
    assert report["deprecation_warnings"] == []
    assert report["bare_value_type_errors"] == []


def test_entry_points_take_at_most_eight_parameters():
    import pomt
    from pomt.callbacks import POMTCallback
    from pomt.lightning.sweep import TradeoffEvaluation

    entry = [getattr(pomt, name) for name in pomt.__all__ if inspect.isfunction(getattr(pomt, name))]
    assert {"profile_latency", "find_r", "verify", "estimate_accuracy", "export_onnx"} <= {
        f.__name__ for f in entry
    }
    for fn in [*entry, TradeoffEvaluation]:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        assert len(params) <= 8, f"{fn.__qualname__} takes {len(params)} parameters"
    assert len(inspect.signature(POMTCallback).parameters) <= 15  # a Lightning callback's flat YAML options


def test_entry_points_are_short_or_say_why():
    """No public function of the package runs over ~60 lines of body (its docstring aside)."""
    import pomt

    for name in pomt.__all__:
        fn = getattr(pomt, name)
        if not inspect.isfunction(fn):
            continue
        node = ast.parse(inspect.getsource(fn).lstrip()).body[0]
        body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body
        lines = body[-1].end_lineno - body[0].lineno + 1
        assert lines <= 60, f"{name}: {lines} lines"


def test_a_new_runtime_is_one_new_class():
    import torch

    import pomt
    from pomt.deploy.targets import RUNTIMES, Runtime

    class Doubled(pomt.deploy.runtimes.Eager):  # a runtime of its own: registered by being defined
        name = "doubled_for_test"

    try:
        target = pomt.Target(runtime="doubled_for_test", batch_size=2)
        assert isinstance(target.backend, Runtime) and "doubled_for_test" in RUNTIMES
        from conftest import make_tiny_vit

        search = pomt.SearchConfig(grid=(17, 9))
        lat = pomt.profile_latency(
            make_tiny_vit(), target, search=search, timing=pomt.Timing(warmup=0, repeats=2)
        )
        assert lat.runtime == "doubled_for_test" and lat.grid == [9, 17] and lat.batch_size == 2
        assert lat.device_type == "cpu" and lat.threads == torch.get_num_threads()
    finally:
        RUNTIMES.pop("doubled_for_test", None)


def test_each_file_imports_under_one_name_from_the_repository_root_too():
    code = (
        "import importlib, pomt.callbacks.stage_support as s, pomt.datamodules.digits as d\n"
        "for name in ('callbacks', 'callbacks.stage_support', 'datamodules.digits'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:\n"
        "        assert 'import pomt.' in str(err), err\n"
        "    else:\n"
        "        raise SystemExit(f'{name} imported as a second module object')\n"
        "print('one')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "one"
