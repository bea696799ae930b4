"""ViTClassifier: building, weights, metrics, latency logging and the optimiser schedule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import cpu_trainer, image_loader, tiny_classifier
from torch.utils.data import DataLoader, TensorDataset

from pomt.lightning.classifier import ViTClassifier, _warmup_cosine, dinov2_linear_features


def loader(n: int = 36, batch_size: int = 8, seed: int = 0):
    return image_loader(n=n, batch_size=batch_size, seed=seed)


def tiny_dinov2(**overrides) -> ViTClassifier:
    """A 2-block DINOv2 with 4 registers (16 patches of 14 px on 28x28) under the linear head."""
    kwargs = dict(img_size=28, head="dinov2_linear", model_kwargs=dict(embed_dim=64, depth=2, num_heads=2))
    return ViTClassifier("vit_small_patch14_reg4_dinov2", **(kwargs | overrides))


def trainer(**kwargs):
    return cpu_trainer(**({"num_sanity_val_steps": 0} | kwargs))


def test_test_metrics_are_micro_top1_top5_and_latency():
    module = tiny_classifier(latency_warmup_batches=2)
    dl = loader(n=36, batch_size=8)  # 4 full batches and one of 4
    result = trainer().test(module, dl)[0]

    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(x) for x, _ in dl])
    labels = torch.cat([y for _, y in dl])
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    assert result["test/acc1"] == pytest.approx(top1)
    assert result["test/acc5"] == pytest.approx(top5)
    # two warm-up batches and the short last batch are left out of the latency
    stats = module.last_latency["test"]
    assert stats.samples == 2
    assert result["test/latency_ms"] == pytest.approx(stats.median_ms)
    assert result["test/latency_p90_ms"] == pytest.approx(stats.p90_ms)
    assert result["test/latency_p90_ms"] >= result["test/latency_ms"] > 0
    assert result["test/latency_batch_size"] == 8


def test_fit_then_validate_and_predict():
    module = tiny_classifier(lr=1e-3, warmup_epochs=1, latency_warmup_batches=1)
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    t.fit(module, loader(), loader(seed=1))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert "train/loss" in t.callback_metrics and "val/acc1" in t.callback_metrics
    result = t.validate(module, loader(seed=1))[0]
    assert {"val/acc1", "val/acc5", "val/latency_ms", "val/latency_p90_ms"} <= set(result)

    images = torch.randn(5, 3, 32, 32)
    predictions = t.predict(module, DataLoader(TensorDataset(images), batch_size=5))
    module.eval()
    with torch.no_grad():
        expected = module(images)
    assert torch.allclose(predictions[0], expected, atol=1e-5)


def test_dict_batches_are_accepted():
    items = [{"image": torch.randn(3, 32, 32), "label": i % 10} for i in range(8)]
    result = trainer().test(tiny_classifier(latency_warmup_batches=0), DataLoader(items, batch_size=4))[0]
    assert 0.0 <= result["test/acc1"] <= 1.0


def test_wraps_a_given_model_and_reads_its_classes(tiny_vit):
    module = ViTClassifier(model=tiny_vit)
    assert module.model is tiny_vit and module.vit is tiny_vit
    assert module.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(module(x), tiny_vit(x))


def test_weights_file_round_trip_and_errors(tmp_path):
    source = tiny_classifier()
    path = tmp_path / "vit.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = tiny_classifier(weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    source.eval(), loaded.eval()
    assert torch.allclose(loaded(x), source(x))

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tiny_classifier(weights=str(tmp_path / "missing.pt"))
    state = source.model.state_dict()
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight") as err:
        tiny_classifier(weights=str(bad))
    assert "extra.weight" in str(err.value)


def test_lightning_checkpoint_reloads(tmp_path):
    module = tiny_classifier()
    t = trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path)
    t.fit(module, loader())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    again = ViTClassifier.load_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 32, 32)
    module.eval(), again.eval()
    assert torch.allclose(again(x), module(x))
    # the checkpoint also serves as a weights file (keys prefixed "model.")
    from_weights = tiny_classifier(weights=str(ckpt))
    assert torch.allclose(from_weights.eval()(x), module(x))


def test_dinov2_linear_head_layout_and_head_file(tmp_path):
    torch.manual_seed(0)
    module = tiny_dinov2(num_classes=7)
    backbone = module.vit
    assert backbone is module.backbone and backbone.num_prefix_tokens == 5  # CLS + 4 registers
    assert module.head.in_features == 2 * 64
    x = torch.randn(3, 3, 28, 28)
    module.eval()
    with torch.no_grad():
        tokens = backbone.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # registers left out
        assert torch.allclose(dinov2_linear_features(backbone, x), expected)

    head_file = tmp_path / "linear_head.pth"
    torch.save({"weight": torch.randn(7, 128), "bias": torch.randn(7)}, head_file)
    with_head = tiny_dinov2(num_classes=7, head_weights=str(head_file))
    assert torch.equal(with_head.head.weight, torch.load(head_file)["weight"])
    with pytest.raises(ValueError, match="head"):
        torch.save({"weight": torch.randn(7, 64), "bias": torch.randn(7)}, head_file)
        tiny_dinov2(num_classes=7, head_weights=str(head_file))


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown head"):
        tiny_classifier(head="mlp")
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny_classifier(label_smoothing=1.5)
    with pytest.raises(ValueError, match="unknown timm model"):
        tiny_classifier(model_name="not_a_vit_at_all")


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_lr_warms_up_linearly_then_decays_by_cosine():
    module = tiny_classifier(lr=0.01, warmup_epochs=1, min_lr_ratio=0.1)
    record = _RecordLR()
    t = trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=0, callbacks=[record])
    t.fit(module, loader(n=32))
    lrs = record.lrs
    assert len(lrs) == 12
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # one epoch of warm-up
    decay = lrs[4:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] > 0.001

    factor = _warmup_cosine(warmup=5, total=20, min_ratio=0.1)
    assert factor(4) == pytest.approx(1.0) and factor(5) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_tokens():
    module = tiny_classifier(weight_decay=0.1)
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    decayed_names = {names[i] for i in decayed}
    assert "model.blocks.0.attn.qkv.weight" in decayed_names
    assert not {n for n in decayed_names if n.endswith(("bias", "pos_embed", "cls_token")) or ".norm" in n}


def test_original_dinov2_key_names_load_through_timms_filter(tmp_path):
    torch.manual_seed(0)
    source = tiny_dinov2(num_classes=3)
    state = dict(source.backbone.state_dict())
    # the DINOv2 authors' layout: registers named register_tokens, a mask token, and the CLS
    # position inside pos_embed
    cls_pos = torch.randn(1, 1, 64)
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, 64)
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos
    path = tmp_path / "dinov2_original.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    loaded = tiny_dinov2(num_classes=3, weights=str(path))
    assert torch.equal(loaded.backbone.reg_token, source.backbone.reg_token)
    assert torch.allclose(loaded.backbone.cls_token, source.backbone.cls_token, atol=1e-6)
    assert torch.equal(loaded.backbone.blocks[1].mlp.fc2.weight, source.backbone.blocks[1].mlp.fc2.weight)
