"""What the callback guarantees a user: the model put back after every exit (errors included),
latency profiles reused only at the precision they were timed at, a ``search`` that takes a
Hydra/OmegaConf mapping, verification that does not confirm a burst of noise, results that a
checkpoint without POMT state does not wipe, and lines that reach the application's log files."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import cpu_trainer, image_loader, make_tiny_vit, staircase_profile, tiny_classifier
from torch import nn

import pomt.timing
from pomt import Console, Reuse, SearchConfig, Target, find_r
from pomt.callbacks import POMTCallback
from pomt.method.pruning import apply_pruning, pruning_config
from pomt.offline.finder import _check_accuracy_kept
from pomt.offline.profiles import LatencyProfile
from pomt.offline.selection import select_r

N, LAYER = 17, 1
FAST = dict(accuracy_samples=16, accuracy_grid=(17, 9, 5), min_run_time=0.0, warmup=1, verify=False)


class TokenProbe:
    """Records how many tokens leave block ``index`` on every forward pass."""

    def __init__(self, vit: nn.Module, index: int) -> None:
        self.seen: list[int] = []
        vit.blocks[index].register_forward_hook(lambda _m, _i, out: self.seen.append(int(out.shape[1])))


class Failing(pl.LightningModule):
    """A ViTClassifier-like module whose test/validation/predict step raises on its second batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_classifier(latency_warmup_batches=0)
        self.model = self.inner.model
        self.train_tokens: list[int] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _step(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("step failed")
        return self(batch[0])

    test_step = validation_step = predict_step = _step


def _outputs(vit: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return vit(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- restore on every exit


@pytest.mark.parametrize("stage", ["test", "validate", "predict"])
def test_an_error_in_a_pruned_stage_leaves_the_model_as_it_was_and_fit_trains_it_whole(stage):
    module = Failing()
    before = _outputs(module.model)
    callback = POMTCallback(r=6, layer=LAYER, stages=("validate", "test", "predict"))
    probe = TokenProbe(module.model, LAYER)
    with pytest.raises(RuntimeError, match="step failed"):
        getattr(cpu_trainer(callbacks=[callback]), stage)(module, image_loader())
    assert probe.seen[-1] == N - 6  # the stage did run pruned
    assert pruning_config(module.model) is None
    assert torch.equal(_outputs(module.model), before)

    # the same callback again, restore=True: still put back; then fit trains the whole model
    with pytest.raises(RuntimeError, match="step failed"):
        getattr(cpu_trainer(callbacks=[callback]), stage)(module, image_loader())
    assert pruning_config(module.model) is None
    probe.seen.clear()
    cpu_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=2).fit(module, image_loader())
    assert probe.seen == [N, N]  # two training steps at all 17 tokens


def test_a_stage_that_died_without_on_exception_is_undone_at_the_next_start():
    class NoExceptionHook(POMTCallback):  # as if the process skipped on_exception
        def on_exception(self, *args):
            pass

    module = Failing()
    callback = NoExceptionHook(r=6, layer=LAYER)
    with pytest.raises(RuntimeError):
        cpu_trainer(callbacks=[callback]).test(module, image_loader())
    assert pruning_config(module.model) is not None  # left pruned by the dead stage...
    probe = TokenProbe(module.model, LAYER)
    cpu_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=2).fit(module, image_loader())
    assert probe.seen == [N, N] and pruning_config(module.model) is None  # ...undone before training


def test_a_model_pruned_by_someone_else_is_reported_at_the_start_of_a_stage_and_of_training(caplog):
    module = tiny_classifier(latency_warmup_batches=0)
    apply_pruning(module.model, "topk", r=1)
    caplog.set_level("WARNING", logger="pomt.callbacks")  # logging is configured (by pytest)
    cpu_trainer(callbacks=[POMTCallback(r=4, layer=LAYER)]).test(module, image_loader())
    assert re.search(r"already pruned before test, not by this callback: .*method='topk'", caplog.text)
    assert pruning_config(module.model).method == "topk"  # put back as found, and said so
    caplog.clear()
    cpu_trainer(callbacks=[POMTCallback(r=4, layer=LAYER)], max_epochs=1, limit_train_batches=1).fit(
        module, image_loader()
    )
    assert re.search(r"already pruned before training.*Training runs on that pruned", caplog.text)

    # pruning the callback itself left (restore=False) is no surprise before the next stage
    module = tiny_classifier(latency_warmup_batches=0)
    callback = POMTCallback(r=4, layer=LAYER, restore=False)
    cpu_trainer(callbacks=[callback]).test(module, image_loader())
    caplog.clear()
    cpu_trainer(callbacks=[callback]).test(module, image_loader())
    assert "already pruned" not in caplog.text


# ----------------------------------------------------------------------------- precision


def _lines(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pomt"))


def test_the_callback_never_reuses_a_profile_timed_at_another_precision(tmp_path, caplog):
    path = tmp_path / "latency.json"
    search = SearchConfig(**FAST, grid=(17, 9))
    first = POMTCallback(layer=LAYER, latency_profile_path=str(path), search=search)
    cpu_trainer(callbacks=[first], precision="32-true").test(tiny_classifier(), image_loader())
    assert first.latency_profile.precision == "32-true" and first.result.precision == "32-true"
    assert first.selection.precision == "32-true" and "(timed at 32-true)" in first.selection.summary()
    assert json.loads(path.read_text())["precision"] == "32-true"

    second = POMTCallback(layer=LAYER, latency_profile_path=str(path), search=search)
    with caplog.at_level(logging.INFO):
        cpu_trainer(callbacks=[second], precision="bf16-mixed").test(tiny_classifier(), image_loader())
    assert "it was measured with precision='32-true', now precision='bf16-mixed'" in _lines(caplog)
    assert second.latency_profile.precision == "bf16-mixed"
    assert json.loads(path.read_text())["precision"] == "bf16-mixed"  # measured again and saved

    # the same callback, back at 32-true: its earlier (bf16) results and the file are both passed over
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cpu_trainer(callbacks=[second], precision="32-true").test(tiny_classifier(), image_loader())
    assert second.latency_profile.precision == "32-true"
    lines = [line for line in _lines(caplog).splitlines() if "not reusing the latency profile" in line]
    assert len(lines) == 1, lines  # one decision, one line, naming both sources passed over
    assert "measured earlier or the latency profile" in lines[0]
    assert "it was measured with precision='bf16-mixed', now precision='32-true'" in lines[0]


def test_find_r_keys_the_latency_profile_to_the_precision(tmp_path):
    model, path = tiny_classifier(), tmp_path / "latency.json"
    config = SearchConfig(**FAST, grid=(17, 9))

    def run(precision: str | None = None) -> tuple[object, list[str]]:
        lines: list[str] = []
        result = find_r(model, image_loader(), Target(batch_size=4, precision=precision), layer=LAYER, search=config,
                        reuse=Reuse(latency_path=path), console=Console(progress=False, log=lines.append))  # fmt: skip
        return result, lines

    result, _ = run()
    assert result.latency.precision == "32-true"  # no autocast, float32 parameters
    assert any(line.startswith("reusing the latency profile") for line in run(precision="32-true")[1])
    for precision in ("16-mixed", "bf16-mixed", "16-true"):
        LatencyProfile.load(path)  # a 32-true profile...
        result, lines = run(precision=precision)
        assert result.latency.precision == precision  # ...is never reused at another precision
        assert any(f"precision='32-true', now precision='{precision}'" in x for x in lines)
        run(precision="32-true")  # back to a 32-true file

    with torch.autocast("cpu", dtype=torch.bfloat16):  # find_r's own autocast is the precision
        result, lines = run()
    assert result.latency.precision == "bf16-mixed"

    # a profile written before profiles recorded their precision never matches
    data = json.loads(path.read_text())
    del data["precision"]
    path.write_text(json.dumps(data))
    result, lines = run(precision="bf16-mixed")
    assert any("does not record its precision" in line for line in lines)
    assert result.latency.precision == "bf16-mixed"


# ----------------------------------------------------------------------------- search from Hydra


def test_search_accepts_a_dict_or_omegaconf_mapping_and_rejects_unknown_keys():
    omegaconf = pytest.importorskip("omegaconf")
    for given in (
        {"alpha": 0.5, "grid": [17, 9]},
        omegaconf.OmegaConf.create({"alpha": 0.5, "grid": [17, 9]}),
    ):
        callback = POMTCallback(search=given)
        assert callback.search_config == SearchConfig(alpha=0.5, grid=(17, 9))
    target = {"_target_": "pomt.SearchConfig", "alpha": 0.25}
    assert POMTCallback(search=omegaconf.OmegaConf.create(target)).search_config.alpha == 0.25
    with pytest.raises(ValueError, match=r"unknown key\(s\) alphaa; valid keys: alpha, latency_budget_ms"):
        POMTCallback(search=omegaconf.OmegaConf.create({"alphaa": 0.5}))
    with pytest.raises(ValueError, match="alpha must be a number"):
        POMTCallback(search={"alpha": 2})


def test_hydra_instantiates_the_callback_with_a_plain_search_mapping():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create(
        {
            "_target_": "pomt.callbacks.POMTCallback",
            "layer": LAYER,
            "search": {
                **{k: list(v) if isinstance(v, tuple) else v for k, v in FAST.items()},
                "grid": [17, 9],
            },
        }
    )
    callback = hydra_utils.instantiate(config)
    assert isinstance(callback.search_config, SearchConfig) and callback.search_config.grid == (17, 9)
    cpu_trainer(callbacks=[callback]).test(tiny_classifier(), image_loader())  # the search runs
    assert callback.selection is not None
    with pytest.raises(Exception, match="alphaa"):
        hydra_utils.instantiate(omegaconf.OmegaConf.merge(config, {"search": {"alphaa": 0.5}}))


def test_constructor_options_are_keyword_only_after_method_r_layer():
    params = list(inspect.signature(POMTCallback).parameters.values())
    # target= (issue 28: where and how R is chosen, one Target) replaced runtime= and batch_size=
    assert [p.name for p in params[:3]] == ["method", "r", "layer"] and len(params) <= 16
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])
    source = Path(inspect.getsourcefile(POMTCallback)).read_text()
    assert len(source.splitlines()) < 300


# ----------------------------------------------------------------------------- verification under noise


class Clock:
    """A fake ``time`` module: only the model's calls move it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Bursty(nn.Module):
    """A ViT that costs 10 ms whatever n is (pruning gains nothing), inside a machine where a
    burst starts with the profile of one token count and slows the unpruned calls for
    ``burst`` seconds (it ends inside the verification's first round of groups)."""

    def __init__(self, clock: Clock, burst_r: int, burst: float) -> None:
        super().__init__()
        self.vit, self.clock, self.burst_r, self.burst = make_tiny_vit(), clock, burst_r, burst
        self.start: float | None = None

    def forward(self, x):
        out = self.vit(x)
        config = pruning_config(self.vit)
        if config is not None and config.r == self.burst_r and self.start is None:
            self.start = self.clock.now
        bursting = self.start is not None and self.clock.now < self.start + self.burst
        self.clock.now += 0.020 if bursting and config is None else 0.010
        return out


def test_verification_does_not_confirm_a_burst_that_made_one_profile_point_fast(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(pomt.timing, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    model = Bursty(clock, burst_r=N - 5, burst=1.0)
    config = SearchConfig(
        alpha=1.0, grid=(17, 13, 9, 5), min_run_time=0.2, warmup=1, accuracy_samples=16,
        accuracy_grid=(17, 9, 5), verify_max_time=1.2, verify_pairs=12, verify_groups=6,
    )  # fmt: skip
    lines: list[str] = []
    result = find_r(model, image_loader(), Target(batch_size=2), layer=LAYER, search=config,
                    console=Console(progress=False, log=lines.append))  # fmt: skip
    profile = result.latency.latency_ms
    assert profile[5] == pytest.approx(profile[17] / 2)  # the burst drew a false step at n = 5...
    (r, speedup, low, high), *_ = result.selection.measurements
    assert r == N - 5 and 1.0 <= speedup <= 2.0  # ...that the first verification groups repeat,
    assert low <= 1.0 and high == pytest.approx(2.0)  # but the groups after the burst widen the interval to 1
    assert result.selection.r == 0 and "not significantly faster" in result.selection.verification
    assert "undecided when the verification's cap was reached" in result.selection.verification
    # pooled call by call instead of by block, the same calls would have confirmed R = 12
    pairs = [2.0] * 4 + [1.0] * 2  # four blocks in the burst, two after it, about 7 pairs each
    assert pomt.timing.median_interval([b for b in pairs for _ in range(7)])[1] > 1.0


def test_a_warning_names_accuracy_floor_when_r_leaves_most_of_the_accuracy():
    latency = {17: 10.0, 9: 6.0, 3: 2.0}
    selection = select_r(latency, {17: 0.85, 9: 0.7, 3: 0.10}, alpha=0.95)
    assert selection.n_star == 3
    said: list[str] = []
    _check_accuracy_kept(selection, said.append)
    assert len(said) == 1 and "accuracy_floor" in said[0] and "0.100" in said[0] and "0.850" in said[0]
    said.clear()
    _check_accuracy_kept(select_r(latency, {17: 0.85, 9: 0.84, 3: 0.80}, alpha=0.95), said.append)
    _check_accuracy_kept(select_r(latency, {17: 0.85, 9: 0.7, 3: 0.1}, accuracy_floor=0.6), said.append)
    assert said == []  # close to the unpruned accuracy, or bounded by a floor: nothing to say


# ----------------------------------------------------------------------------- checkpoints, keys, logs


def test_a_checkpoint_without_pomt_state_keeps_the_results_in_memory(tmp_path, caplog):
    module = tiny_classifier(latency_warmup_batches=0)
    path = staircase_profile(module, tmp_path / "latency.json")
    callback = POMTCallback(
        layer=LAYER, latency_profile_path=str(path), search=SearchConfig(**FAST, alpha=0.9)
    )
    t = cpu_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1, default_root_dir=tmp_path)
    t.fit(module, image_loader())
    ckpt = tmp_path / "trained.ckpt"
    t.save_checkpoint(ckpt)  # saved before any search: no POMT results in it
    t.test(module, image_loader())
    measured = callback.result
    with caplog.at_level(logging.INFO):
        t.test(module, image_loader(), ckpt_path=str(ckpt))  # the same weights
    text = _lines(caplog)
    assert "the checkpoint holds no POMT results: keeping the ones measured here" in text
    assert "reusing the accuracy profile measured earlier" in text  # not estimated again
    assert callback.result.accuracy == measured.accuracy


def test_two_callbacks_keep_separate_checkpoint_state():
    a, b = POMTCallback(r=2, layer=1), POMTCallback(r=2, layer=2)
    assert a.state_key != b.state_key and "layer" in a.state_key and "method" in a.state_key


def test_the_callback_lines_reach_a_log_file_the_application_configured(tmp_path):
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        cpu_trainer(callbacks=[POMTCallback(r=3, layer=LAYER)]).test(tiny_classifier(), image_loader())
    finally:
        root.removeHandler(handler)
        handler.close()
    assert "POMTCallback: pomt r=3" in log_file.read_text()


def test_under_a_trainer_the_search_draws_no_bar_of_its_own(monkeypatch):
    import pomt.offline.profiling

    bars: list[bool] = []
    real = pomt.offline.profiling._progress
    monkeypatch.setattr(
        pomt.offline.profiling,
        "_progress",
        lambda total, desc, enabled: bars.append(enabled) or real(total, desc, enabled),
    )
    cpu_trainer(callbacks=[POMTCallback(layer=LAYER, search=SearchConfig(**FAST, grid=(17, 9)))]).test(
        tiny_classifier(), image_loader()
    )
    assert bars and not any(bars)


def test_a_wrong_vit_path_names_where_the_vit_is():
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Module()
            self.net.backbone = make_tiny_vit(num_classes=0)
            self.net.head = nn.Sequential(nn.Linear(64, 10))

        def test_step(self, batch, batch_idx):
            return None

    with pytest.raises(ValueError, match="the module's ViT is at vit_path='net.backbone'"):
        cpu_trainer(callbacks=[POMTCallback(r=1, vit_path="net.head")]).test(Net(), image_loader())


def test_unlabelled_predict_data_is_an_error_without_the_held_out_warning_first(caplog):
    caplog.set_level("WARNING", logger="pomt.callbacks")
    with pytest.raises(ValueError, match="needs labelled images"):
        cpu_trainer(callbacks=[POMTCallback(search=SearchConfig(**FAST))]).predict(
            tiny_classifier(), image_loader(labels=False)
        )
    assert "not held out" not in caplog.text
