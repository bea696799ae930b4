"""Running a test file's kernel tests under Triton's CPU interpreter, in a child pytest.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so the tests that run the
kernels on CPU tensors are marked :data:`needs_interpreter` and run by a parent test that
starts ``pytest`` on its own file with the variable set (:func:`run_interpreted`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child")
parent_only = pytest.mark.skipif(INTERPRETING, reason="needs no interpreter: runs in the parent only")


def run_interpreted(path: str, at_least: int, *args: str, timeout: int = 600) -> None:
    """Run the tests of ``path`` in a child pytest with ``TRITON_INTERPRET=1``; fail unless it
    passes and at least ``at_least`` tests ran (none was skipped by mistake)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) >= at_least, summary
