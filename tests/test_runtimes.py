"""R chosen in the runtime a model is deployed with (``pomt.deploy.runtimes``): ONNX Runtime and OpenVINO
time the exported graph, and a profile is never reused across runtimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import image_loader, make_tiny_vit

import pomt
from pomt import Console, Reuse, SearchConfig, Target
from pomt.deploy.graphs import RuntimeModel
from pomt.deploy.runtimes import OpenVINO, compile_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAST = dict(min_run_time=0.02, warmup=1, accuracy_samples=16, verify_max_time=0.05, verify_pairs=6,
            verify_groups=2, grid=(17, 13, 9, 5))  # fmt: skip


def _find(model, runtime, path, lines):
    return pomt.find_r(model, image_loader(), Target(runtime=runtime, batch_size=2), layer=1, search=SearchConfig(**FAST),
                       reuse=Reuse(latency_path=path), console=Console(progress=False, log=lines.append))  # fmt: skip


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_find_r_in_a_runtime_times_the_exported_graph_and_keys_the_profile_to_it(tmp_path, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    model, path, lines = make_tiny_vit(), tmp_path / "latency.json", []
    search = _find(model, runtime, path, lines)
    lat = search.latency
    real = Target(runtime=runtime).backend.default_precision(torch.device("cpu"))
    assert (lat.runtime, lat.precision, lat.threads) == (runtime, f"{runtime}:{real}", 1)
    assert lat.runtime_version and "export_s" in lat.runtime_options and lat.kernels == f"{runtime} graph"
    assert lat.grid == [5, 9, 13, 17]
    assert any(line.startswith("exporting") for line in lines)
    assert search.selection.verification  # R was verified in the runtime, or R = 0 kept
    assert pomt.pruning_config(model) is None  # the model is left as it was
    # the same runtime reuses the profile; torch and the other runtime never do
    lines.clear()
    _find(model, runtime, path, lines)
    assert any(line.startswith("reusing the latency profile") for line in lines)
    other = "onnxruntime" if runtime == "openvino" else "torch"
    lines.clear()
    again = _find(model, other, path, lines)
    assert any(f"runtime={runtime!r}, now runtime={other!r}" in line for line in lines)
    assert again.latency.runtime == other


def test_openvino_records_the_precision_it_really_runs_in():
    pytest.importorskip("openvino")
    model = make_tiny_vit()
    graphs = RuntimeModel(model, "openvino", layer=1, batch_size=1)
    real = OpenVINO().default_precision(torch.device("cpu"))
    assert graphs.info.precision == real  # bf16 on CPUs with bf16 units
    f32 = RuntimeModel(model, OpenVINO(precision="f32"), layer=1, batch_size=1)
    assert f32.info.precision == "f32"
    # each n is the static graph of POMT at r = N - n, equal to PyTorch in f32
    x = graphs._x
    for n in (3, 10, 17):
        run = f32.session(n)
        feeds = {"x": x} | ({} if n == 17 else {"kept_tokens": np.zeros(n, np.float32)})
        if n == 17:
            pomt.remove_pruning(model)
        else:
            pomt.apply_pruning(model, "pomt", r=17 - n, layer=1)
        with torch.inference_mode():
            assert np.abs(run(feeds) - model(torch.from_numpy(x)).numpy()).max() <= 1e-4, n
    assert graphs.compile_s and graphs.export_s > 0


def test_onnxruntime_fixes_the_token_axis_per_n(tmp_path):
    model = make_tiny_vit()
    graphs = RuntimeModel(model, "onnxruntime", layer=1, batch_size=2, workdir=tmp_path)
    run, info = compile_onnx(graphs.token_graph, "onnxruntime", threads=1, tokens=7)
    pomt.apply_pruning(model, "pomt", r=10, layer=1)
    with torch.inference_mode():
        expected = model(torch.from_numpy(graphs._x)).numpy()
    assert np.abs(run({"x": graphs._x, "kept_tokens": np.zeros(7, np.float32)}) - expected).max() <= 1e-4
    assert info.precision == "f32" and info.threads == 1


def test_bad_runtimes_are_named():
    with pytest.raises(ValueError, match="runtime must be one of torch, cuda_graphs, onnxruntime, openvino"):
        Target(runtime="tensorrt")
    with pytest.raises(ValueError, match="use device='cpu'"):
        Target(runtime="openvino", device="cuda")
    with pytest.raises(ValueError, match="dtype=float32"):
        pomt.profile_latency(
            make_tiny_vit(),
            target=Target(runtime="openvino", dtype="bfloat16"),
            progress=False,
            search=SearchConfig(grid=[17]),
        )


def test_onnxruntime_gpu_providers_are_used_where_installed_else_the_test_says_why():
    ort = pytest.importorskip("onnxruntime")
    from pomt.deploy.runtimes import _providers

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                raise ValueError("onnxruntime-gpu present but no CUDA device")
            _providers(torch.device("cuda"))
        pytest.skip("no CUDA device or CUDA/TensorRT provider here: the GPU path of onnxruntime is untested")
    assert _providers(torch.device("cuda"))[-1] == "CPUExecutionProvider"


def test_the_callback_chooses_r_in_a_runtime(tmp_path):
    from conftest import cpu_trainer, tiny_classifier

    from pomt.callbacks import POMTCallback

    with pytest.raises(ValueError, match="runtime must be one of"):
        POMTCallback(target="tensorrt")
    search = {k: v for k, v in FAST.items()} | {"accuracy_grid": (17, 9, 5)}
    callback = POMTCallback(layer=1, search=search, target="onnxruntime", accuracy_data=image_loader())
    cpu_trainer(callbacks=[callback]).test(tiny_classifier(), image_loader())
    assert callback.result.latency.runtime == "onnxruntime"
    assert callback.result.latency.precision == "onnxruntime:f32"


def test_profile_latency_command_takes_a_runtime(tmp_path, capsys):
    from pomt.cli import main
    from pomt.offline.profiles import LatencyProfile

    out = tmp_path / "lat.json"
    args = [
        "profile-latency",
        "--model",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--runtime",
        "onnxruntime",
    ]
    args += ["--grid", "2,3,5", "--min-run-time", "0", "--batch-size", "1", "--layer", "1", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    lat = LatencyProfile.load(out)
    assert (lat.runtime, lat.precision, lat.grid) == ("onnxruntime", "onnxruntime:f32", [2, 3, 5])


def test_a_configuration_the_runtime_cannot_compile_is_left_out_with_a_warning(monkeypatch):
    import pomt.deploy.runtimes as runtimes
    from pomt.lightning.sweep.configurations import Configuration, SideBySide, time_configurations

    real = runtimes.OnnxRuntime.compile

    def refuses_tome(self, path, **kwargs):
        if "tome" in str(path):
            raise RuntimeError("Exception from core.cpp\n-- Conversion is failed for: ScatterND-20")
        return real(self, path, **kwargs)

    monkeypatch.setattr(runtimes.OnnxRuntime, "compile", refuses_tome)
    configs = [Configuration("none", 0), Configuration("tome", 2)]
    how, target = SideBySide(rounds=2, warmup=1), Target(runtime="onnxruntime")
    with pytest.warns(
        UserWarning, match=r"tome r=2: onnxruntime cannot compile its export \(-- Conversion is failed"
    ):
        model = make_tiny_vit()
        timed = time_configurations(
            model, model, torch.randn(2, 3, 32, 32), configs, layer=1, target=target, how=how
        )
    assert list(timed) == ["unpruned"] and timed["unpruned"]["mode"].startswith("onnxruntime:f32 export")
