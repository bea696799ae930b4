"""The GPU acceptance command: a clear exit without CUDA, the whole script at toy sizes on the
CPU (kernels under Triton's interpreter), and the real run where a GPU is present."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"
FINAL = re.compile(
    r"^gpu: kernels=(ok|FAIL) backend=\S+ pruned/ideal=\d+\.\d{3} topk/ideal=\d+\.\d{3} tome/ideal=\d+\.\d{3} "
    r"search_ratio=\d+\.\d{3} gap=-?\d+\.\d{4} verified=(R=0|x\d+\.\d{3})$"
)

pytest.importorskip("triton")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_without_cuda_it_says_so():
    done = _run(timeout=300)
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr


@pytest.mark.slow
def test_the_whole_script_at_toy_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "table.md"
    done = _run("--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert FINAL.match(last) and "kernels=ok" in last, last
    table = out.read_text()
    assert table.count("| ok |") == 5  # the five toy kernel checks
    assert "pruned/ideal <= 1.03" in table and "POMT block backend (auto) | torch" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_acceptance_passes_on_this_gpu(tmp_path):
    done = _run("--out", str(tmp_path / "table.md"))
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and FINAL.match(last) and "kernels=ok" in last, done.stdout[-3000:]
