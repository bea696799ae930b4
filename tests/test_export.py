"""Export of pruned ViTs to ONNX (checked in ONNX Runtime) and OpenVINO IR: ``pomt.deploy.export``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit

import pomt
from pomt import Target
from pomt.deploy.export import ExportMismatch, export_onnx, export_token_graph, require, run_onnxruntime

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")


@pytest.mark.parametrize("method,r", [("none", 0), ("pomt", 5), ("topk", 2), ("tome", 2)])
def test_export_of_each_method_is_checked_in_onnxruntime_and_records_what_it_is(tmp_path, method, r):
    model = make_tiny_vit()
    pomt.apply_pruning(model, method, r=r, layer=1)
    x = torch.randn(3, 3, 32, 32)
    path = tmp_path / f"{method}.onnx"
    record = pomt.export_onnx(model, path, example=x)
    assert record.max_abs_diff is not None and record.max_abs_diff <= record.tolerance
    assert (record.method, record.r, record.batch_size, record.export_s > 0) == (method, r, 3, True)
    # the file really computes the pruned model (not the unpruned one), at the static batch size
    with torch.inference_mode():
        expected = model(x).numpy()
    got = run_onnxruntime(path, {"x": x.numpy()})
    assert np.abs(got - expected).max() <= 1e-4
    proto = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert (meta["pomt.method"], meta["pomt.r"], meta["pomt.layer"]) == (
        method,
        r,
        1 if method != "none" else -1,
    )
    assert meta["pomt.max_abs_diff"] == record.max_abs_diff
    assert json.loads((tmp_path / f"{method}.onnx.json").read_text())["method"] == method
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3  # static batch
    # the model is left as it was: pruned, in eval mode, and still runs eagerly
    assert pomt.pruning_config(model).method == method if method != "none" else True
    assert torch.allclose(model(x), torch.from_numpy(expected), atol=1e-6)


def test_export_fails_loudly_when_the_file_differs_from_pytorch(tmp_path, monkeypatch):
    model = make_tiny_vit()
    pomt.apply_pruning(model, "pomt", r=4, layer=1)
    import pomt.deploy.export as export

    monkeypatch.setattr(export, "run_onnxruntime", lambda path, feeds: np.zeros((2, 10), np.float32) + 5)
    with pytest.raises(ExportMismatch, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", target=Target(batch_size=2))


def test_export_rejects_bad_arguments_naming_them(tmp_path):
    model = make_tiny_vit()
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, tmp_path / "m.onnx", target=Target(batch_size=0))
    with pytest.raises(ValueError, match="example must be an image batch"):
        export_onnx(model, tmp_path / "m.onnx", example=torch.randn(3, 32, 32))


def test_a_missing_runtime_names_the_deploy_extra():
    with pytest.raises(ImportError, match=r"pomt\[deploy\]"):
        require("pomt_no_such_runtime")


@pytest.mark.parametrize("method,r", [("none", 0), ("pomt", 6), ("topk", 2), ("tome", 2)])
def test_openvino_compiles_each_export_and_computes_the_same(tmp_path, method, r):
    """All four kinds compile in OpenVINO, from the IR and from the ONNX file, and equal PyTorch
    and ONNX Runtime (ToMe's protected rows once exported as a ScatterND OpenVINO rejected)."""
    ov = pytest.importorskip("openvino")
    model = make_tiny_vit()
    pomt.apply_pruning(model, method, r=r, layer=1)
    x = torch.randn(2, 3, 32, 32)
    record = export_onnx(model, tmp_path / "m.onnx", target=Target(runtime="openvino"), example=x)
    core = ov.Core()
    with torch.inference_mode():
        expected = model(x).numpy()
    onnxruntime = run_onnxruntime(record.path, {"x": x.numpy()})
    for source in (record.converted_path, record.path):
        compiled = core.compile_model(core.read_model(source), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled({0: x.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-4, source
        assert np.abs(got - onnxruntime).max() <= 1e-4, source


@pytest.mark.parametrize("method", ["pomt", "tome", "token graph"])
def test_an_export_leaves_no_traced_tensor_in_the_caches(tmp_path, method):
    """A model exported before it ever ran eagerly still runs eagerly afterwards (a cache once
    kept the exporter's FakeTensor, and the next forward returned one)."""
    import pomt.method.functional

    for cache in (
        pomt.method.functional._LAST,
        pomt.method.functional._ROWS,
        pomt.method.functional._PROTECTED,
    ):
        cache.clear()
    model = make_tiny_vit()
    if method == "token graph":
        export_token_graph(model, tmp_path / "m.onnx", layer=1, batch_size=2)
    else:
        pomt.apply_pruning(model, method, r=2, layer=1)
        export_onnx(model, tmp_path / "m.onnx", target=Target(batch_size=2), check=False)
    pomt.apply_pruning(model, method if method != "token graph" else "pomt", r=2, layer=1)
    with torch.inference_mode():
        assert type(model(torch.randn(2, 3, 32, 32))) is torch.Tensor


def test_token_graph_is_pomt_at_every_n_it_is_run_at(tmp_path):
    """One export with the kept token count as an input axis equals POMT at r = N - n for each n."""
    model = make_tiny_vit()
    path = export_token_graph(model, tmp_path / "tokens.onnx", layer=1, batch_size=2)
    assert pomt.pruning_config(model) is None  # left unpruned, as it was
    x = torch.randn(2, 3, 32, 32)
    for n in (2, 9, 16):
        pomt.apply_pruning(model, "pomt", r=17 - n, layer=1)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = run_onnxruntime(path, {"x": x.numpy(), "kept_tokens": np.zeros(n, np.float32)})
        assert np.abs(got - expected).max() <= 1e-4, n


def test_pomt_export_command_writes_a_checked_file(tmp_path, capsys):
    from pomt.cli import main

    out = tmp_path / "cli.onnx"
    args = ["export", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]
    args += ["--method", "pomt", "--r", "2", "--layer", "1", "-o", str(out), "--batch-size", "2"]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    assert "max |diff|" in capsys.readouterr().out
    record = json.loads((tmp_path / "cli.onnx.json").read_text())
    assert (record["method"], record["r"], record["batch_size"]) == ("pomt", 2, 2)
    assert (
        main(["export", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--r", "999", "-o", str(out)])
        == 2
    )


def test_the_token_graph_takes_its_block_from_chunked_blocks_too(tmp_path):
    """The DINOv2 authors' blocks come in chunks (``blocks[0]`` holds them all): the token graph
    prunes the block ``layer`` counts in execution order, and equals PyTorch there."""
    from test_pruning import HubDinoV2

    from pomt.deploy.export import TOKENS_INPUT

    torch.manual_seed(0)
    model = HubDinoV2().eval()
    path = export_token_graph(model, tmp_path / "tokens.onnx", layer=1, batch_size=1)
    x, n = torch.randn(1, 3, 56, 56), 10
    got = run_onnxruntime(path, {"x": x.numpy(), TOKENS_INPUT: np.zeros(n, np.float32)})
    with pomt.pruned(model, "pomt", r=21 - n, layer=1), torch.inference_mode():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4
