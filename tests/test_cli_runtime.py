"""The command line end to end in a runtime: ``profile-latency``, ``estimate-accuracy``,
``select-r`` (verifying in the profile's runtime) and ``export``, on a tiny model in ONNX Runtime."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pomt.cli import main
from pomt.offline.profiles import LatencyProfile

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # two exports and an ONNX Runtime profile: minutes on a loaded 2-core CPU

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "3"]  # N = 17


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    for label in ("cat", "dog", "eel"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    lat, acc = tmp_path / "lat.json", tmp_path / "acc.json"
    assert main(["estimate-accuracy", *MODEL, "--data", str(tmp_path / "images"), "-o", str(acc),
                 "--num-samples", "6", "--batch-size", "6", "--grid", "2,9,17", "--no-progress"]) == 0  # fmt: skip
    assert main(["profile-latency", *MODEL, "--runtime", "onnxruntime", "--grid", "2,9,17", "--batch-size", "2",
                 "--layer", "1", "--min-run-time", "0.05", "--threads", "1", "--no-progress", "-o", str(lat)]) == 0  # fmt: skip
    return lat, acc


def test_select_r_verifies_in_the_profiles_runtime_and_the_choice_exports(profiles, tmp_path, capsys):
    lat, acc = profiles
    capsys.readouterr()
    assert LatencyProfile.load(lat).runtime == "onnxruntime"
    selection = tmp_path / "sel.json"
    args = [
        "select-r",
        "--latency",
        str(lat),
        "--accuracy",
        str(acc),
        "--alpha",
        "0.9",
        "--json",
        str(selection),
    ]
    assert main([*args, *MODEL, "--runtime", "onnxruntime", "--verify-max-time", "0.2"]) == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    chosen = json.loads(selection.read_text())
    assert "verifying in onnxruntime on cpu, batch 2, layer 1, 1 thread(s)" in out
    assert chosen["verification"]  # measured, or R = 0 said to need no verification
    if chosen["n_star"] < 17 or chosen["measurements"]:
        assert chosen["measurements"] and "(95% CI over 6 groups)" in out
    assert out.strip().endswith(f"R={chosen['r']}")
    onnx = tmp_path / "pomt.onnx"
    assert main(["export", *MODEL, "--r", str(chosen["r"]), "--layer", "1", "-o", str(onnx)]) == 0
    assert onnx.is_file() and "ONNX Runtime vs PyTorch" in capsys.readouterr().out


def test_select_r_without_a_model_says_it_did_not_verify_and_refuses_another_runtime(profiles, capsys):
    lat, acc = profiles
    capsys.readouterr()
    args = ["select-r", "--latency", str(lat), "--accuracy", str(acc)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "not verified (no --model to time)" in out and "measured x" not in out
    assert main([*args, "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "runtime" in err and "onnxruntime" in err
    assert main([*args, "--verify"]) == 2 and "needs --model" in capsys.readouterr().err
