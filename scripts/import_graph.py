"""The import graph of the package, measured: modules per folder, import cycles, the longest
import chain, imports of another module's private names, and runtime names spelled outside the
deploy package.

Every ``import``/``from ... import`` is counted, the ones inside functions included (a cycle
hidden in a function is still a cycle). ``callbacks/`` and ``datamodules/`` are read as
``pomt.callbacks`` and ``pomt.datamodules``, the names they install under.

    python scripts/import_graph.py            # the report
    python scripts/import_graph.py --json     # the same, as JSON
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pomt": "pomt", "callbacks": "pomt.callbacks", "datamodules": "pomt.datamodules"}
# the runtimes' names: spelled (as a string) only in the package that defines the runtimes
RUNTIME_NAMES = ("onnxruntime", "openvino", "tensorrt", "cuda_graphs", "torch_compile")
DEPLOY_PACKAGE = "pomt.deploy"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by its import name (``pomt.callbacks.logs``)."""
    found: dict[str, Path] = {}
    for folder, package in SOURCES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # ``from pomt import plots``: the module itself
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return out


def graph(known: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str, int]]]:
    """Edges between the package's modules, and the private names imported across modules."""
    edges: dict[str, set[str]] = {name: set() for name in known}
    private: list[tuple[str, str, str, int]] = []
    for name, path in known.items():
        for target, imported, line in imports(name, path, known):
            if target not in known:
                continue
            if target != name:
                edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                private.append((name, target, imported, line))
            if target.split(".")[-1].startswith("_") and target.rsplit(".", 1)[0] != name.rsplit(".", 1)[0]:
                if not target.endswith("__init__") and not name.startswith(target.rsplit(".", 1)[0]):
                    private.append((name, target, "<module>", line))
    return edges, private


def private_attributes(known: dict[str, Path]) -> list[tuple[str, str, str, int]]:
    """``other._name`` where ``other`` is a module of the package bound by an import."""
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in known:
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and bound[node.value.id] != name
            ):
                out.append((name, bound[node.value.id], node.attr, node.lineno))
    return out


def _is_runtime(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "runtime") or (
        isinstance(node, ast.Attribute) and node.attr == "runtime"
    )


def code_checks(known: dict[str, Path]) -> dict[str, list[str]]:
    """The rest of the bar, per module: ``runtime ==``/``!=`` a name, outside the deploy package,
    public functions with more than 8 parameters or more than 60 lines of body,
    ``DeprecationWarning``, and bare ``raise ValueError``/``TypeError``."""
    found: dict[str, list[str]] = defaultdict(list)
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_deploy = name == DEPLOY_PACKAGE or name.startswith(DEPLOY_PACKAGE + ".")
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Compare) and not in_deploy:
                sides = [node.left, *node.comparators]
                named = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
                if (
                    named
                    and any(_is_runtime(s) for s in sides)
                    and any(isinstance(o, ast.Eq | ast.NotEq) for o in node.ops)
                ):
                    found["runtime_branches"].append(where)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                params = [p for p in params if p.arg not in ("self", "cls")]
                if len(params) > 8:
                    found["over_8_parameters"].append(f"{where} {node.name}({len(params)})")
                first = node.body[0]
                start = (
                    first.end_lineno + 1
                    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
                    else first.lineno
                )
                lines = node.end_lineno - start + 1
                if lines > 60:
                    found["over_60_lines"].append(f"{where} {node.name}({lines} lines)")
            elif isinstance(node, ast.Name) and node.id == "DeprecationWarning":
                found["deprecation_warnings"].append(where)
            elif (
                isinstance(node, ast.Raise)
                and node.exc is not None
                and name.startswith("pomt")
                and not (name.startswith("pomt.callbacks") or name.startswith("pomt.datamodules"))
            ):
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError"):
                    found["bare_value_type_errors"].append(where)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain (a path in the graph with its cycles collapsed): the number of
    floors the package has."""
    comp_of: dict[str, int] = {}
    for i, component in enumerate(cycles(edges)):
        for v in component:
            comp_of[v] = i
    key = {v: comp_of.get(v, v) for v in edges}
    memo: dict[object, list[str]] = {}

    def longest(v: str, seen: frozenset) -> list[str]:
        if key[v] in memo:
            return memo[key[v]]
        best: list[str] = []
        for w in sorted(edges[v]):
            if key[w] == key[v] or key[w] in seen:
                continue
            chain = longest(w, seen | {key[w]})
            if len(chain) > len(best):
                best = chain
        memo[key[v]] = [v, *best]
        return memo[key[v]]

    return max((longest(v, frozenset({key[v]})) for v in sorted(edges)), key=len)


def runtime_strings(known: dict[str, Path]) -> list[tuple[str, int, str]]:
    """String constants naming a runtime outside the deploy package (docstrings left out)."""
    out = []
    for name, path in known.items():
        if name == DEPLOY_PACKAGE or name.startswith(DEPLOY_PACKAGE + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    docstrings.add(id(body[0].value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value.strip() in RUNTIME_NAMES:
                    out.append((name, node.lineno, node.value))
    return out


def report(root: Path = ROOT) -> dict:
    known = modules(root)
    edges, private = graph(known)
    per_folder: dict[str, int] = defaultdict(int)
    for path in known.values():
        per_folder[str(path.parent.relative_to(root))] += 1
    chain = longest_chain(edges)
    private += private_attributes(known)
    checks = code_checks(known)
    return {
        "modules": len(known),
        "modules_per_folder": dict(sorted(per_folder.items())),
        "edges": sum(len(v) for v in edges.values()),
        "cycles": cycles(edges),
        "longest_chain": chain,
        "private_imports": [f"{a}:{line} imports {t}.{n}" for a, t, n, line in private],
        "runtime_strings": [f"{m}:{line} {s!r}" for m, line, s in runtime_strings(known)],
        **{key: checks.get(key, []) for key in CHECKS},
    }


CHECKS = (
    "runtime_branches",
    "over_8_parameters",
    "over_60_lines",
    "deprecation_warnings",
    "bare_value_type_errors",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    result = report()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"modules: {result['modules']}  import edges: {result['edges']}")
    for folder, count in result["modules_per_folder"].items():
        print(f"  {folder + '/':<22} {count}")
    print(f"cycles: {len(result['cycles'])}")
    for component in result["cycles"]:
        print("  " + " <-> ".join(component))
    chain = result["longest_chain"]
    print(f"longest import chain: {len(chain)} modules")
    print("  " + " -> ".join(chain))
    print(f"private cross-module imports: {len(result['private_imports'])}")
    for line in result["private_imports"]:
        print("  " + line)
    print(f"runtime-name strings outside {DEPLOY_PACKAGE}: {len(result['runtime_strings'])}")
    for line in result["runtime_strings"]:
        print("  " + line)
    for key in CHECKS:
        print(f"{key.replace('_', ' ')}: {len(result[key])}")
        if key != "bare_value_type_errors" and key != "deprecation_warnings":
            for line in result[key]:
                print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
