"""The whole pipeline through POMT's Triton kernels, as a GPU runs it: the latency profile over
every token count (keep = 0 included), the search with its verification, the pruned model at
every r, the callback's test stage and a digits-sized sweep of ``evaluate.py``.

The kernels are forced (``POMT_KERNELS=triton``) on CPU tensors and run by Triton's
interpreter, in a child pytest (``_interpreter.py``); every test checks that they ran."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _interpreter import INTERPRETING, needs_interpreter, run_interpreted
from conftest import cpu_trainer, image_loader, make_tiny_vit, staircase_profile, tiny_classifier

import pomt
from pomt import Console, SearchConfig, Target, Timing
from pomt.method import ops

pytest.importorskip("triton")

N, PREFIX, LAYER = 17, 1, 1  # the tiny ViT: 16 patches + CLS
QUICK = dict(min_run_time=0.0, warmup=1, accuracy_samples=16, verify_max_time=0.0, verify_pairs=6)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="this is the parent")
def test_the_pipeline_under_the_triton_interpreter():
    run_interpreted(__file__, 5)


def _count_selections(monkeypatch) -> list[int]:
    """The r of every token selection the kernels make, in order (keep = 0: r = N - prefix - 1)."""
    module = ops._triton()
    seen: list[int] = []
    select = module.select_tokens

    def counted(x, col, val, prefix, keep):
        seen.append(x.shape[1] - prefix - keep - 1)
        return select(x, col, val, prefix, keep)

    monkeypatch.setattr(module, "select_tokens", counted)
    return seen


@pytest.fixture
def forced(monkeypatch):
    """The kernels forced on CPU tensors; the r of each selection they made."""
    seen = _count_selections(monkeypatch)
    with ops.kernels("triton"):
        yield seen


@pytest.fixture
def auto_picks_kernels(monkeypatch):
    """``auto`` as on a CUDA device where the kernels measure faster: it checks them for
    equality for real and is told they win; the r of each selection the kernels made."""
    from pomt.method import dispatch

    seen = _count_selections(monkeypatch)
    monkeypatch.setattr(ops, "_auto_device", lambda t: True)
    monkeypatch.setattr(ops, "scores_from_probabilities", lambda x: False)  # the block's CUDA path
    monkeypatch.setattr(ops, "_CHOICES", {})
    monkeypatch.setattr(dispatch, "_faster", lambda fn, reference, device: (True, 0.6))
    with ops.kernels("auto"):
        yield seen


@needs_interpreter
def test_auto_picks_the_kernels_then_the_search_runs_every_r_through_them(auto_picks_kernels):
    # the first GPU run's crash: auto chose the kernels at one r, then the profile reached
    # keep = 0 (n = prefix + 1) and the search died there
    model = make_tiny_vit()
    profile = pomt.profile_latency(model, target=Target(batch_size=2), layer=LAYER, progress=False, search=SearchConfig(grid=range(PREFIX + 1, N + 1)), timing=Timing(warmup=1, repeats=2, min_run_time=0.0))  # fmt: skip
    assert profile.grid == list(range(PREFIX + 1, N + 1))
    choices = ops.kernel_choices()
    assert choices and all(c.backend == "triton" for c in choices.values()), choices
    assert N - PREFIX - 1 in auto_picks_kernels  # keep = 0 ran through the kernels
    config = SearchConfig(grid=(17, 13, 9, 5, 2), accuracy_grid=(17, 13, 9, 5, 2), **QUICK)
    search = pomt.find_r(model, image_loader(n=16, batch_size=8), target=Target(batch_size=2), layer=LAYER, search=config, console=Console(progress=False, log=lambda s: None))  # fmt: skip
    assert search.selection.verification and search.selection.r == N - search.selection.n_star


@needs_interpreter
def test_latency_profile_over_every_token_count(forced):
    model = make_tiny_vit()
    profile = pomt.profile_latency(model, target=Target(batch_size=2), layer=LAYER, progress=False, search=SearchConfig(grid=range(PREFIX + 1, N + 1)), timing=Timing(warmup=1, repeats=2, min_run_time=0.0))  # fmt: skip
    assert profile.grid == list(range(PREFIX + 1, N + 1)) and all(ms > 0 for ms in profile.latency_ms)
    assert profile.kernels == "triton"
    assert set(forced) == set(range(1, N - PREFIX))  # every r that prunes, keep = 0 (r = 15) too


@needs_interpreter
def test_find_r_verifies_and_the_model_runs_at_every_r(forced):
    model = make_tiny_vit()
    data = image_loader(n=16, batch_size=8)
    config = SearchConfig(grid=(17, 13, 9, 5, 2), accuracy_grid=(17, 13, 9, 5, 2), **QUICK)
    search = pomt.find_r(
        model,
        data,
        target=Target(batch_size=2),
        layer=LAYER,
        search=config,
        console=Console(progress=False, log=lambda s: None),
    )
    assert search.selection.r == N - search.selection.n_star
    assert search.selection.verification and N - PREFIX - 1 in forced  # verified; keep = 0 timed
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for r in range(N - PREFIX):
        pomt.apply_pruning(model, "pomt", r=r, layer=LAYER)
        with torch.no_grad():
            got = model(images)
            with ops.kernels("torch"):
                torch.testing.assert_close(got, model(images), atol=1e-5, rtol=1e-5)
    assert forced[-(N - PREFIX - 1) :] == list(range(1, N - PREFIX))  # r = 0 prunes nothing


@needs_interpreter
def test_the_callbacks_test_stage(forced, tmp_path):
    from pomt.callbacks import POMTCallback

    module = tiny_classifier(latency_warmup_batches=0)
    search = SearchConfig(grid=(17, 9, 2), accuracy_grid=(17, 9, 2), verify=False, **QUICK)
    callback = POMTCallback(layer=LAYER, search=search)
    result = cpu_trainer(callbacks=[callback]).test(module, image_loader(n=16, batch_size=8))[0]
    assert result["pomt/r"] == callback.selection.r and "test/acc1" in result
    assert N - PREFIX - 1 in forced  # the profile timed keep = 0 through the kernels
    # a profile whose staircase makes R = 6: the test loop runs the pruned model through them
    path = staircase_profile(module, tmp_path / "latency.json", layer=LAYER)
    callback = POMTCallback(layer=LAYER, latency_profile_path=str(path), search=replace(search, alpha=0.9))
    forced.clear()
    result = cpu_trainer(callbacks=[callback]).test(module, image_loader(n=16, batch_size=8))[0]
    assert result["pomt/r"] == callback.selection.r == 6
    # without verification n* is timed afresh before it is reported (through the kernels too),
    # then the 2 test batches run pruned: every forward ran the kernels at r = 6
    assert set(forced) == {6} and len(forced) > 2 and callback.selection.retimed_speedup is not None


@needs_interpreter
def test_a_digits_sweep(forced, tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = [
        "--model.model_name=vit_tiny_patch16_224",
        "--model.num_classes=10",
        "--model.img_size=16",
        '--model.model_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}',
        "--data=pomt.datamodules.DigitsDataModule",
        "--data.img_size=16",
        "--data.batch_size=16",
        "--data.holdout_size=16",
        "--data.augment=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--sweep.limit_test_batches=1",
        "--sweep.layer=1",
        "--sweep.methods=[none, pomt]",
        "--sweep.wandb=false",
        '--sweep.search={"grid": [17, 9, 2], "accuracy_grid": [17, 9, 2], "accuracy_samples": 16, '
        '"min_run_time": 0.0, "warmup": 1, "verify_max_time": 0.0, "verify_pairs": 6}',
        "--sweep.latency_rounds=2",
        f"--sweep.out_dir={tmp_path}",
        "--sweep.run_name=kernels",
    ]
    result = evaluate.main(args)
    pomt_row = next(row for row in result.rows if row.method == "pomt")
    assert pomt_row.selected and 0.0 <= pomt_row.acc1 <= 1.0
    assert 15 in forced  # 17 tokens -> 2: keep = 0, through the kernels
    assert '"kernels": "triton"' in (tmp_path / "kernels" / "report.json").read_text()
