"""The GPU acceptance command: a clear exit without CUDA, the whole script at toy sizes on the
CPU (kernels under Triton's interpreter), and the real run where a GPU is present."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"
FINAL = re.compile(
    r"^gpu: kernels=(ok|FAIL) targets=(ok|unchecked\(cpu\)|missed:\S+) backend=\S+ pruned/ideal=\d+\.\d{3} "
    r"topk/ideal=\d+\.\d{3} tome/ideal=\d+\.\d{3} pomt100=x\d+\.\d{3}(,x\d+\.\d{3})* search_ratio=\d+\.\d{3} "
    r"search_gap=-?\d+\.\d{4} verified=(R=0|x\d+\.\d{3}) verified_gap=[+-](\d+\.\d{3}|nan)$"
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
    assert table.count("| ok |") == 8  # the eight toy kernel checks (prefix 0, keep=0, bf16 at 50x included)
    assert "pruned/ideal <= 1.03" in table and "POMT block backend (auto) | torch" in table
    assert "| search gap (utility" in table and "| verified gap (measured / predicted" in table


def _script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_acceptance", module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["gpu_acceptance"])
    return sys.modules["gpu_acceptance"]


def test_device_parsing_with_a_mocked_cuda(monkeypatch):
    script = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert script.parse_device("cuda") == torch.device("cuda", 1)  # the current device, with its index
    assert script.parse_device("cuda:0") == torch.device("cuda", 0)
    assert script.parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has CUDA devices 0..1"):
        script.parse_device("cuda:2")
    for bad in ("mps", "gpu"):
        with pytest.raises(ValueError, match=f"--device must be cuda, cuda:N or cpu, got '{bad}'"):
            script.parse_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.parse_device("cuda") is None and script.parse_device("cuda:0") is None


def test_the_exit_status_names_each_target_missed():
    script = _script()
    assert script.missed_targets({"pomt": 1.02, "topk": 1.08, "tome": 1.3}, [1.4, 1.6]) == []
    missed = script.missed_targets({"pomt": 1.05, "topk": 1.12}, [0.98, 1.2])
    assert missed == [
        "pruned/ideal=1.050>1.03",
        "topk/ideal=1.120>1.10",
        "pomt(r=100)/unpruned:x0.980,x1.200<=x1",
    ]
    assert len(script.missed_targets({}, [1.1, 1.1])) == 2  # a target not measured is missed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_acceptance_passes_on_this_gpu(tmp_path):
    done = _run("--out", str(tmp_path / "table.md"))
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and FINAL.match(last) and "kernels=ok targets=ok" in last, done.stdout[-3000:]
