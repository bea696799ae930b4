"""Everything downstream of pruning on tiny random-weight DINOv3-style and EVA02-style models,
unchanged for the user: the ViT contract, the accuracy estimate, the latency profile, find_r
with verification, the callback in a LightningModule, token maps, healing (training through a
pruned model), ONNX Runtime and OpenVINO, torch.compile, and the sweep (evaluate.py)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _eva_models import image_batch, make_eva
from conftest import cpu_trainer, image_loader
from torch import nn

import pomt
from pomt import Console, SearchConfig, Target, Timing
from pomt.callbacks import POMTCallback
from pomt.deploy.export import export_onnx, run_onnxruntime
from pomt.lightning.sweep.configurations import Configuration, token_maps_figure
from pomt.models import unsupported_reason
from pomt.offline.verify import speedups

QUICK = dict(min_run_time=0.0, warmup=1, accuracy_samples=16, verify_max_time=0.0, verify_pairs=6)


class Project(pl.LightningModule):
    """Someone's module with the Eva ViT nested at ``net.backbone``."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.backbone = make_eva(family)
        with torch.no_grad():
            self.net.backbone.head.weight.normal_()  # logits of the features' scale

    def forward(self, x):
        return self.net.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture(params=["dinov3", "eva02"])
def project(request):
    return Project(request.param)


def test_contract_search_callback_maps_and_healing(project):
    vit = project.net.backbone
    size = vit.patch_embed.img_size[0]
    path, found = pomt.find_vit(project)
    assert path == "net.backbone" and found is vit
    layout = pomt.token_layout(project)
    n, p = layout.n_total, layout.prefix
    loader = image_loader(n=16, size=size)

    accuracy = pomt.estimate_accuracy(
        project,
        loader,
        search=SearchConfig(accuracy_samples=16, accuracy_grid=[n, n - 8, p + 1]),
        progress=False,
    )
    assert sorted(accuracy.accuracy) == sorted([n, n - 8, p + 1])

    latency = pomt.profile_latency(project, target=Target(batch_size=2), layer=1, progress=False, search=SearchConfig(grid=[n, n - 8]), timing=Timing(min_run_time=0.0, warmup=1))  # fmt: skip
    assert latency.grid == [n - 8, n] and all(ms > 0 for ms in latency.latency_ms)
    assert pomt.pruning_config(project) is None

    lines: list[str] = []
    config = SearchConfig(**QUICK, grid=(n, n - 8, n - 16), accuracy_grid=(n, n - 8, n - 16), verify=True)
    result = pomt.find_r(
        project,
        loader,
        target=Target(batch_size=2),
        layer=1,
        search=config,
        console=Console(progress=False, log=lines.append),
    )
    assert result.selection.r in (0, 8, 16) and pomt.pruning_config(project) is None
    assert result.selection.verification  # verified, or R = 0 said to need none
    search = SearchConfig(warmup=1, verify_max_time=0.0, verify_pairs=4, verify_groups=2)
    with Target(batch_size=2, device="cpu", dtype="float32").prepare(vit, layer=1) as prepared:
        samples, unpruned_ms = speedups(prepared, 16, search)
    assert len(samples) == 2 and unpruned_ms > 0 and all(s > 0 for s in samples)  # what verify() times
    assert pomt.pruning_config(vit) is None

    callback = POMTCallback(r=8, layer=1)
    cpu_trainer(callbacks=[callback]).test(project, loader)
    assert callback.found_vit_path == "net.backbone"

    with pomt.pruned(project, "pomt", r=8, layer=1):  # healing: the pruned model trains
        before = vit.head.weight.detach().clone()
        x, y = next(iter(loader))
        loss = F.cross_entropy(project(x), y)
        loss.backward()
        assert all(prm.grad is not None for prm in vit.blocks[3].parameters() if prm.requires_grad)
        assert vit.blocks[0].attn.proj.weight.grad.abs().sum() > 0
        torch.optim.SGD(vit.parameters(), lr=0.1).step()
        assert not torch.equal(vit.head.weight, before)

    configs = [Configuration("none", 0), Configuration("pomt", 8, selected=True), Configuration("tome", 2),
               Configuration("topk", 2)]  # fmt: skip
    fig = token_maps_figure(vit, image_batch(vit), configs, layer=1)
    assert len(fig.axes) == 2 * 5


def test_broken_eva_is_named():
    model = make_eva("dinov3")
    model.blocks[2].attn.num_prefix_tokens = 1
    assert "Eva.blocks[2].attn rotates all but 1 prefix tokens, the model has 5" in unsupported_reason(model)
    del model.blocks[1].attn.q_norm
    assert "Eva.blocks[1].attn (EvaAttention) lacks q_norm" in unsupported_reason(model)


@pytest.mark.parametrize("family", ["dinov3", "eva02"])
@pytest.mark.parametrize("method,r", [("pomt", 8), ("topk", 2), ("tome", 3)])
def test_onnx_runtime_openvino_and_compile(tmp_path, family, method, r):
    ov = pytest.importorskip("openvino")
    model = make_eva(family)
    with torch.no_grad():
        model.head.weight.normal_()
    pomt.apply_pruning(model, method, r=r, layer=1)
    x = image_batch(model)
    with torch.no_grad():
        expected = model(x).numpy()
    record = export_onnx(
        model, tmp_path / "m.onnx", target=Target(runtime="openvino"), example=x, tolerance=1e-4
    )
    assert record.max_abs_diff <= 1e-4
    onnxruntime = run_onnxruntime(record.path, {"x": x.numpy()})
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(record.converted_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    assert np.abs(compiled({0: x.numpy()})[0] - expected).max() <= 1e-4
    assert np.abs(onnxruntime - expected).max() <= 1e-4
    with torch.no_grad():
        got = torch.compile(model, backend="eager")(x)
    torch.testing.assert_close(got, torch.from_numpy(expected), atol=1e-5, rtol=1e-5)


def test_the_sweep_runs_on_a_dinov3_style_model(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    n = 16 + 5  # 4x4 patches, CLS and 4 registers
    args = [
        "--model.model_name=vit_small_patch16_dinov3",
        "--model.num_classes=10",
        "--model.img_size=16",
        '--model.model_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}',
        "--data=pomt.datamodules.DigitsDataModule",
        "--data.img_size=16",
        "--data.batch_size=16",
        "--data.holdout_size=32",
        "--data.augment=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--sweep.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
        "--sweep.layer=1",
        json.dumps(
            {
                "grid": [n, 17, 13, 9],
                "accuracy_grid": [n, 17, 13, 9],
                "accuracy_samples": 32,
                "min_run_time": 0.0,
                "warmup": 1,
                "verify_max_time": 0.0,
                "verify_pairs": 6,
            }
        ).join(["--sweep.search=", ""]),  # fmt: skip
        "--sweep.latency_rounds=2",
        f"--sweep.out_dir={tmp_path}",
        "--sweep.run_name=dinov3",
    ]
    result = evaluate.main(args)
    methods = {row.method for row in result.rows}
    assert methods == {"none", "pomt", "tome", "topk"}
    pomt_row = next(row for row in result.rows if row.method == "pomt")
    assert pomt_row.n_last == n - pomt_row.r
    assert all(0.0 <= row.acc1 <= 1.0 and row.latency_ms > 0 for row in result.rows)
