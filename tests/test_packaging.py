"""The repository's top-level callbacks/ and datamodules/ install as ``pomt.callbacks`` and
``pomt.datamodules``, and nothing but ``pomt`` lands at the top level of site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("callbacks", "datamodules")


@pytest.mark.slow
def test_the_wheel_holds_pomt_only_with_the_top_level_folders_inside(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("pomt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pomt", f"{wheel.name.split('-py')[0]}.dist-info"}
    for folder in TOP_LEVEL:
        sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob("*.py"))
        assert sources, folder
        assert all(f"pomt/{name}" in names for name in sources), (folder, sources)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import pomt.callbacks, pomt.datamodules; print(pomt.callbacks.__file__, pomt.datamodules.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [
        str(target / "pomt" / f / "__init__.py") for f in ("callbacks", "datamodules")
    ]


def test_the_source_tree_imports_the_top_level_folders_as_pomt_subpackages():
    import pomt.datamodules

    assert Path(pomt.datamodules.__file__).resolve().parent == ROOT / "datamodules"
