"""Real setups: Lightning's true-precision modes, TF32, context-local kernels, one console channel."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_trainer, image_loader, tiny_classifier

from pomt import SearchConfig, Target
from pomt.callbacks import POMTCallback
from pomt.method.pruning import pruning_config

N = 17
FAST = dict(accuracy_samples=32, accuracy_grid=(17, 13, 9, 5), min_run_time=0.0, warmup=1)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_the_callback_searches_under_lightnings_true_precision(precision):
    """Lightning's true-precision context makes the default dtype 16 bits during the stage: the
    search must still sample weights, time and select, and leave the default dtype as it was."""
    module = tiny_classifier(latency_warmup_batches=0)
    callback = POMTCallback(layer=1, search=SearchConfig(grid=(17, 13, 9, 5), verify_max_time=0.05, **FAST))
    trainer = cpu_trainer(callbacks=[callback], precision=precision)
    result = trainer.test(module, image_loader())[0]
    # one name for one number: the console's "selection estimate A(n*)"
    assert result["pomt/selection_estimate"] == pytest.approx(callback.selection.predicted_accuracy)
    assert "pomt/predicted_accuracy" not in result
    sel = callback.selection
    assert sel.n_star in (17, 13, 9, 5) and sel.r == N - sel.n_star
    assert pruning_config(module.model) is None
    assert torch.get_default_dtype() == torch.float32


def _reference_precisions(monkeypatch):
    """Run ``dispatch.measure`` with kernels that fail after the reference; return the float32
    matmul precision the reference was computed at."""
    from pomt.method import dispatch
    from pomt.method import functional as method

    seen = []
    scores = method.pomt_scores

    def recording(*args):
        seen.append(torch.get_float32_matmul_precision())
        return scores(*args)

    def no_kernels(*args):
        raise RuntimeError("no kernels in this test")

    monkeypatch.setattr(method, "pomt_scores", recording)
    monkeypatch.setattr(dispatch, "launch_kernels", no_kernels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    choice = dispatch.measure(x, q, k, v, 1, 2, 8**-0.5)
    assert choice.backend == "torch" and "no kernels in this test" in choice.reason
    return seen


@pytest.mark.parametrize("setting", ["high", "medium"])
def test_autos_float32_reference_runs_at_highest_and_the_users_setting_comes_back(monkeypatch, setting):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert _reference_precisions(monkeypatch) == ["highest"]
        assert torch.get_float32_matmul_precision() == setting  # restored
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_per_backend_fp32_setting_is_honoured_and_restored(monkeypatch):
    from pomt.method.dispatch import full_float32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # torch's newer API: the legacy getter raises from now on
    try:
        with full_float32():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_kernels_is_context_local_a_thread_started_inside_keeps_the_default():
    import threading

    from pomt.method import ops

    default = ops.kernel_backend("cpu")
    seen = {}

    def look(name):
        seen[name] = ops.kernel_backend("cpu")

    with ops.kernels("triton"):
        assert ops.kernel_backend("cpu") == "triton"
        inside = threading.Thread(target=look, args=("inside",))
        inside.start()
        inside.join()
    assert seen["inside"] == default != "triton"
    assert ops.kernel_backend("cpu") == default

    # and the other way round: a thread's choice does not leak into this one
    def choose_in_thread():
        with ops.kernels("triton"):
            ready.set()
            release.wait(5)

    ready, release = threading.Event(), threading.Event()
    other = threading.Thread(target=choose_in_thread)
    other.start()
    ready.wait(5)
    try:
        assert ops.kernel_backend("cpu") == default
    finally:
        release.set()
        other.join()


LIGHT_INSTALL = r"""
import importlib.abc, sys
from importlib.machinery import PathFinder

BLOCKED = ("wandb", "datasets", "matplotlib", "sklearn", "jsonargparse")

class Hiding(importlib.abc.MetaPathFinder):
    # sys.path's finder, blind to the blocked packages: they look not installed (find_spec
    # returns None, import raises ModuleNotFoundError), also to other packages' checks
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [Hiding() if f is PathFinder else f for f in sys.meta_path]
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]

import csv, glob, os
import torch
from conftest import cpu_trainer, image_loader, tiny_classifier
from lightning.pytorch.loggers import CSVLogger
from pomt import SearchConfig
from pomt.callbacks import POMTCallback
from pomt.errors import MissingExtraError

torch.set_num_threads(1)
out = sys.argv[1]
search = SearchConfig(grid=(17, 13, 9, 5), accuracy_samples=32, accuracy_grid=(17, 13, 9, 5),
                      min_run_time=0.0, warmup=1, verify=False)
callback = POMTCallback(layer=1, search=search)
trainer = cpu_trainer(callbacks=[callback], logger=CSVLogger(out, name="light"))
trainer.test(tiny_classifier(latency_warmup_batches=0), image_loader())
(metrics,) = glob.glob(os.path.join(out, "light", "*", "metrics.csv"))
row = next(csv.DictReader(open(metrics)))
print("LOGGED r", int(float(row["pomt/r"])), callback.selection.r)
assert not any(name.split(".")[0] in BLOCKED for name in sys.modules)

def extra_of(call):
    try:
        call()
    except MissingExtraError as err:
        return str(err)
    raise AssertionError("no MissingExtraError")

from pomt.plots import plot_latency
print("EXTRA plots", extra_of(lambda: plot_latency(callback.latency_profile)))
from pomt.lightning.loggers import wandb_logger
print("EXTRA wandb", extra_of(lambda: wandb_logger(save_dir=out)))
from pomt.datamodules.digits import load_digit_images
print("EXTRA digits", extra_of(lambda: load_digit_images(8)))
from pomt.datamodules.sources import load_hub_split
print("EXTRA imagenet", extra_of(lambda: load_hub_split("some/dataset", "train", False, {})))
import evaluate, train
print("EXTRA cli", extra_of(lambda: evaluate.main(["--help"])), "|", extra_of(lambda: train.main(["--help"])))
"""


def test_the_callback_runs_on_the_core_install_and_a_missing_extra_names_itself(tmp_path):
    """wandb, datasets, matplotlib, scikit-learn and jsonargparse unimportable: the callback
    searches and logs through the project's CSVLogger; each optional feature says its extra."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{root}:{root / 'tests'}"}
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_INSTALL, str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = dict(
        line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("LOGGED", "EXTRA"))
    )
    logged, chosen = lines["LOGGED"].split()[1:]
    assert logged == chosen
    for extra, module in [
        ("plots", "matplotlib"),
        ("wandb", "wandb"),
        ("digits", "sklearn"),
        ("imagenet", "datasets"),
    ]:
        text = [
            v
            for k, v in (
                line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.startswith("EXTRA")
            )
            if k == extra
        ][0]
        assert f"pip install 'pomt[{extra}]'" in text and module in text, text
    assert done.stdout.count("pip install 'pomt[cli]'") == 2


CONSOLE = r"""
import logging, sys, warnings
hydra_like = sys.argv[2] == "hydra"
if hydra_like:  # as Hydra configures the root logger: a console handler and the job's log file
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for handler in (logging.StreamHandler(), logging.FileHandler(sys.argv[1])):
        handler.setFormatter(fmt)
        root.addHandler(handler)
warnings.simplefilter("default")

import torch
from conftest import cpu_trainer, image_loader, tiny_classifier
from lightning.pytorch.callbacks import EarlyStopping
from pomt import apply_pruning
from pomt.callbacks import POMTCallback

torch.set_num_threads(1)
module = tiny_classifier(latency_warmup_batches=0)
apply_pruning(module.model, "tome", r=1, layer=1)  # pruned by someone else
stopping = EarlyStopping(monitor="val/acc1", mode="max", strict=False)
trainer = cpu_trainer(callbacks=[POMTCallback(r=2, layer=1, stages=("fit",)), stopping], max_epochs=1,
                      limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
trainer.fit(module, image_loader(n=8), image_loader(n=8, seed=1))  # THE USER'S LINE
"""
SAID = [
    "val/acc1 will be the pruned model's",
    "already pruned before training",
    "already pruned before validate",
]


def _console(tmp_path, mode):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "job.py"
    script.write_text(CONSOLE)
    log_file = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"}
    done = subprocess.run(
        [sys.executable, str(script), str(log_file), mode],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr, log_file.read_text() if log_file.exists() else "", script


def test_under_a_hydra_like_logging_setup_each_warning_is_said_once_on_the_console_and_once_in_the_file(
    tmp_path,
):
    console, log, _ = _console(tmp_path, "hydra")
    for words in SAID:
        assert console.count(words) == 1, console
        assert log.count(words) == 1, log
    assert "UserWarning: POMTCallback" not in console


def test_without_logging_configured_each_warning_is_one_userwarning_at_the_users_line(tmp_path):
    console, _, script = _console(tmp_path, "plain")
    for words in SAID:
        assert console.count(words) == 1, console
    warned = [line for line in console.splitlines() if "UserWarning: POMTCallback" in line]
    assert len(warned) == len(SAID) and all(line.startswith(f"{script}:") for line in warned), console


def test_r0_leaves_no_mark_a_later_callback_does_not_call_the_net_pruned(caplog):
    import pickle

    module = tiny_classifier(latency_warmup_batches=0)
    fit = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    callback = POMTCallback(r=0, layer=1, stages=("train",), restore=False)  # healed at R = 0
    cpu_trainer(callbacks=[callback], **fit).fit(module, image_loader(n=8))
    assert callback.trained_r == 0 and pruning_config(module.model) is None
    again = pickle.loads(pickle.dumps(module))
    assert pruning_config(again.model) is None
    caplog.set_level("WARNING", logger="pomt.callbacks")
    cpu_trainer(callbacks=[POMTCallback(r=4, layer=1)]).test(again, image_loader(n=8))
    assert "already pruned" not in caplog.text


def test_the_near_chance_warning_never_suggests_r0(caplog):
    from types import SimpleNamespace

    from pomt.callbacks.stage_support import warn_if_near_chance

    chance = SimpleNamespace(accuracy={17: 0.1, 9: 0.1}, n_total=17, num_classes=10, num_samples=64)
    caplog.set_level("WARNING", logger="pomt.callbacks")
    for r, suggestion in [
        (0, "the R a search chooses on trained weights"),
        (1, "on trained weights"),
        (8, "r=4"),
    ]:
        caplog.clear()
        warn_if_near_chance(chance, r)
        assert f"R={r} was chosen for training on weights at chance" in caplog.text
        assert f"(e.g. {suggestion}" in caplog.text or suggestion in caplog.text
        assert "e.g. r=0" not in caplog.text


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_runtime_runs_record_does_not_name_torchs_kernels(runtime):
    from types import SimpleNamespace

    from pomt.lightning.sweep.evaluation import TradeoffEvaluation

    evaluation = SimpleNamespace(settings=SimpleNamespace(max_accuracy_drop=0.5, limit_test_batches=1.0))
    evaluation._kernels = lambda sweep, name: TradeoffEvaluation._kernels(evaluation, sweep, name)
    conditions = {"runtime": runtime, "precision": f"{runtime}:f32"}
    sweep = SimpleNamespace(
        device=torch.device("cpu"),
        conditions={},
        runtimes={
            "torch": SimpleNamespace(conditions={}, target=Target()),
            runtime: SimpleNamespace(conditions=conditions, target=Target(runtime=runtime)),
        },
    )
    info = TradeoffEvaluation._run_info(evaluation, sweep)
    kernels = info["runtimes"][runtime]["kernels"]
    assert "torch" not in kernels and runtime in kernels
    assert info["runtimes"]["torch"]["kernels"] == "torch"  # PyTorch on the CPU: the torch path
    assert info["kernels"] == "torch"


def test_a_flat_profile_is_said_in_one_line_and_a_staircase_is_not():
    from types import SimpleNamespace

    from pomt.offline.finder import flat_profile

    flat = flat_profile(SimpleNamespace(latency_ms={17: 10.0, 13: 10.02, 9: 9.95, 5: 9.98}))
    assert flat.startswith("L(n) is flat on this device") and "n=9" in flat and "\n" not in flat
    assert flat_profile(SimpleNamespace(latency_ms={17: 10.0, 13: 10.0, 9: 5.0, 5: 5.0})) is None


def test_one_not_reusing_line_per_decision(tmp_path):
    from conftest import make_tiny_vit, staircase_profile

    from pomt.offline.finder import _reuse
    from pomt.offline.profiles import LatencyProfile

    path = staircase_profile(make_tiny_vit(), tmp_path / "latency.json")
    earlier = LatencyProfile.load(path)
    notes: list[str] = []
    assert (
        _reuse(LatencyProfile, path, earlier, {"precision": "bf16-mixed"}, notes, "measured earlier") is None
    )
    lines = [line for line in notes if line.startswith("not reusing")]
    assert len(lines) == 1, notes
    assert "measured earlier or the latency profile" in lines[0] and "now precision='bf16-mixed'" in lines[0]
