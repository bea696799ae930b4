"""Packaging from any checkout: the repository's top-level callbacks/ and datamodules/ install
as ``pomt.callbacks`` and ``pomt.datamodules`` (``package-dir`` in pyproject.toml, no link in
the tree), nothing but ``pomt`` lands at the top level of site-packages, an sdist builds the
same wheel, each file imports under one name, and ``python evaluate.py`` runs from a checkout
with the package installed (wheel or editable)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("callbacks", "datamodules")


def _tracked() -> list[str]:
    """``git ls-files -s`` lines (mode, hash, stage, tab, path), with the untracked files that
    git does not ignore as regular files."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    staged, others = (
        subprocess.run(["git", "ls-files", *args], cwd=ROOT, capture_output=True, text=True)
        for args in (["-s"], ["--others", "--exclude-standard"])
    )
    if staged.returncode != 0:
        pytest.skip(f"not a git checkout: {staged.stderr.strip()}")
    return staged.stdout.splitlines() + [f"100644 0 0\t{path}" for path in others.stdout.splitlines()]


def _link_free_copy(dest: Path) -> Path:
    """The tracked files as a checkout without symlink support leaves them (Windows'
    ``core.symlinks=false``): a link becomes a small text file holding its target."""
    for line in _tracked():
        meta, path = line.split("\t", 1)
        source, target = ROOT / path, dest / path
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target.parent.mkdir(parents=True, exist_ok=True)
        if meta.startswith("120000"):
            target.write_text(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return dest


def _build(kind: str, source: Path, out: Path) -> Path:
    """``kind`` ("wheel" or "sdist") of ``source``, through setuptools' PEP 517 hooks."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _expected_modules(source: Path) -> set[str]:
    """Each ``.py`` of ``pomt/``, ``callbacks/`` and ``datamodules/`` at its installed path."""
    names = {p.relative_to(source).as_posix() for p in (source / "pomt").rglob("*.py")}
    for folder in TOP_LEVEL:
        names |= {f"pomt/{folder}/{p.name}" for p in (source / folder).glob("*.py")}
    return names


def _modules(wheel: Path) -> dict[str, bytes]:
    archive = zipfile.ZipFile(wheel)
    return {n: archive.read(n) for n in archive.namelist() if ".dist-info/" not in n}


def _run(args: list[str], cwd: Path, site: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


IMPORT_BOTH = "import pomt, pomt.callbacks, pomt.datamodules; print(pomt.__file__, pomt.callbacks.__file__, pomt.datamodules.__file__)"


def test_the_tree_holds_no_link():
    links = [line.split("\t", 1)[1] for line in _tracked() if line.startswith("120000")]
    assert links == [], f"symlinks break wheels built on checkouts without link support: {links}"


@pytest.mark.slow
def test_a_link_free_checkout_builds_a_complete_wheel_and_runs_installed(tmp_path):
    source = _link_free_copy(tmp_path / "src")
    wheel = _build("wheel", source, tmp_path / "dist")
    names = _modules(wheel)
    assert {n.split("/")[0] for n in names} == {"pomt"}
    assert set(names) == _expected_modules(source)
    site = tmp_path / "site"
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        tmp_path,
    )
    # installed, from elsewhere: the wheel's own subpackages
    assert _run([sys.executable, "-c", IMPORT_BOTH], tmp_path, site).split() == [
        str(site / "pomt" / "__init__.py"),
        *(str(site / "pomt" / f / "__init__.py") for f in TOP_LEVEL),
    ]
    # from the checkout's root, where ./pomt shadows the wheel: the checkout's folders
    assert _run([sys.executable, "-c", IMPORT_BOTH], source, site).split() == [
        str(source / "pomt" / "__init__.py"),
        *(str(source / f / "__init__.py") for f in TOP_LEVEL),
    ]
    assert "--sweep.methods" in _run([sys.executable, "evaluate.py", "--help"], source, site)
    assert "--checkpoint.dirpath" in _run(
        [sys.executable, str(source / "train.py"), "--help"], tmp_path, site
    )


@pytest.mark.slow
def test_an_sdist_builds_the_same_wheel_as_the_checkout(tmp_path):
    source = _link_free_copy(tmp_path / "src")
    wheel = _modules(_build("wheel", source, tmp_path / "dist"))
    sdist = _build("sdist", source, tmp_path / "sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert _modules(_build("wheel", unpacked, tmp_path / "dist2")) == wheel


def _venv_seeing_this_environment(venv: Path) -> Path:
    """A venv without pip whose ``sys.path`` ends with this interpreter's site-packages (the
    environment running the tests, where ``pip install -e '.[dev]'`` put the build backend and
    the dependencies), not the base interpreter's (which ``--system-site-packages`` gives, and
    which on a fresh machine holds only what Python ships: setuptools 65.5, no wheel)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", code], venv).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "tests_environment.pth").write_text("".join(f"{path}\n" for path in ours))
    return python


@pytest.mark.slow
def test_an_editable_install_imports_the_checkout_from_anywhere(tmp_path):
    source = _link_free_copy(tmp_path / "src")
    python = _venv_seeing_this_environment(tmp_path / "venv")
    # built by the setuptools of the environment under test ([dev] asks for one with bdist_wheel)
    assert _run([str(python), "-c", "import setuptools; print(setuptools.__file__)"], tmp_path).startswith(
        sysconfig.get_paths()["purelib"]
    )
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    _run([*pip, "--no-build-isolation", "-e", str(source)], tmp_path)
    assert _run([str(python), "-c", IMPORT_BOTH], tmp_path).split() == [
        str(source / "pomt" / "__init__.py"),
        *(str(source / f / "__init__.py") for f in TOP_LEVEL),
    ]
    assert "--sweep.methods" in _run([str(python), "evaluate.py", "--help"], source)


def test_each_file_of_the_top_level_folders_imports_under_one_name():
    import importlib
    import pkgutil

    import pomt.callbacks
    import pomt.datamodules

    for package in (pomt.callbacks, pomt.datamodules):
        folder = ROOT / package.__name__.split(".")[-1]
        assert Path(package.__file__).resolve() == folder / "__init__.py"
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    # one module object per file (an alias is the same object); the project's own folders only: a
    # virtual environment made inside the clone (.venv/) holds extension modules that are several
    # modules of one file by design
    ours = [ROOT / folder for folder in ("pomt", *TOP_LEVEL)]
    by_file: dict[Path, dict[int, str]] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and any(Path(file).resolve().is_relative_to(folder) for folder in ours):
            by_file.setdefault(Path(file).resolve(), {})[id(module)] = name
    assert {ROOT / "callbacks" / "pomt_callback.py", ROOT / "datamodules" / "imagenet.py"} <= set(by_file)
    assert {f: sorted(names.values()) for f, names in by_file.items() if len(names) > 1} == {}
    assert not [name for name in sys.modules if name.split(".")[0] in TOP_LEVEL]
