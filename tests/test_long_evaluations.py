"""evaluate.py at scale: resumable sweeps (reuse what is still valid, say why not), Ctrl-C
leaves every finished row, quick estimates on part of the split, one progress line, the
figures, and exact accuracy under DDP (2 CPU processes, gloo) equal to a single process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
import pytest
from test_evaluate import report_rows, tiny_args

import evaluate
from pomt import SearchConfig
from pomt.datamodules import DigitsDataModule
from pomt.lightning import ViTClassifier
from pomt.lightning.sweep import TradeoffEvaluation
from pomt.lightning.sweep.settings import SweepSettings

ROOT = Path(__file__).resolve().parents[1]
FULL_SPLIT = [a for a in tiny_args(Path("/unused")) if "limit_test_batches" not in a and "out_dir" not in a]


def _table(rows):
    return [(r.method, r.r, r.acc1, r.latency_ms) for r in rows]


def test_a_rerun_reuses_every_configuration_and_prints_the_same_table(tmp_path, capsys, caplog):
    args = tiny_args(tmp_path, "--sweep.wandb=false")
    first = evaluate.main(args)
    out = capsys.readouterr().out
    assert "sweep: " in out and "configurations x batch sizes [32]" in out  # the line before it runs
    assert first.reused == [] and all(row.wall_s > 0 and row.images == 64 for row in first.rows)
    table = out[out.index("configuration ") : out.index("report:")]

    caplog.clear()
    with caplog.at_level("INFO"):
        second = evaluate.main(args)
    out = capsys.readouterr().out
    assert len(second.reused) == len(first.rows) and not list(tmp_path.glob("tiny/wandb"))
    for step in ("selecting R", "timing ", "evaluating "):  # nothing measured or tested again
        assert step not in caplog.text
    assert _table(second.rows) == _table(first.rows)
    assert out[out.index("configuration ") : out.index("report:")] == table  # the same table
    # (how much faster a rerun is, is measured on the digits main job: see the README; a timed
    # assertion here would only measure this machine's noise on a tiny model)

    fresh = evaluate.main([*args, "--sweep.resume=false"])  # starts clean
    assert fresh.reused == []


def test_other_weights_are_never_reused_silently(tmp_path, caplog):
    args = tiny_args(tmp_path, "--sweep.wandb=false", "--sweep.methods=[none, tome]", "--sweep.tome_r=[2]")
    evaluate.main(args)
    with caplog.at_level("INFO"):
        other = evaluate.main([*args, "--seed_everything=1"])  # new random weights
    assert other.reused == []
    assert "not reusing unpruned" in caplog.text and "weights=" in caplog.text


def _tiny_sweep(tmp_path: Path, **kwargs) -> tuple[ViTClassifier, DigitsDataModule, TradeoffEvaluation]:
    pl.seed_everything(0)
    model = ViTClassifier(
        "vit_tiny_patch16_224",
        num_classes=10,
        img_size=16,
        model_kwargs=dict(patch_size=4, embed_dim=32, depth=3, num_heads=2),
    )
    data = DigitsDataModule(img_size=16, batch_size=32, holdout_size=40, augment=False)
    grid = (17, 9, 5)
    search = SearchConfig(
        grid=grid, accuracy_grid=grid, accuracy_samples=40, min_run_time=0.0, warmup=1, verify=False
    )
    sweep = TradeoffEvaluation(
        SweepSettings(
            layer=1, search=search, out_dir=str(tmp_path), run_name="cut", latency_rounds=2, **kwargs
        )
    )
    return model, data, sweep


def _cpu_trainer(cls: type[pl.Trainer] = pl.Trainer, **kwargs) -> pl.Trainer:
    return cls(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_ctrl_c_leaves_every_finished_row_and_closes_the_wandb_runs(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    model, data, sweep = _tiny_sweep(tmp_path, limit_test_batches=1, tome_r=[2], topk_r=[2])
    tests = []

    class Interrupt(pl.Callback):
        def on_test_start(self, trainer, pl_module):
            tests.append(1)
            if len(tests) == 3:
                raise KeyboardInterrupt

    def trainer_factory(**kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Interrupt()]
        return _cpu_trainer(**kwargs)

    with pytest.raises((KeyboardInterrupt, SystemExit)):
        sweep.run(model, data, trainer_factory)
    rows = report_rows(tmp_path / "cut" / "report.json")
    assert [row.method for row in rows] == ["none", "pomt"]  # the two that finished
    assert wandb.run is None  # the W&B runs of finished (and interrupted) configurations are closed
    runs = list((tmp_path / "cut" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 3


def test_a_quick_estimate_on_part_of_the_split_says_so(tmp_path):
    # 3 batches, not 1: in some environments LightningCLI reads "1" as 1.0, which is every batch
    result = evaluate.main(tiny_args(tmp_path, "--sweep.wandb=false", "--sweep.limit_test_batches=3"))
    assert {row.images for row in result.rows} == {96}  # three batches of 32 of the 359 test images
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["run"]["limit_test_batches"] == 3
    assert "eager calls, precision 32-true, warm-up 1" in report["timing"]["torch"]
    assert (tmp_path / "tiny" / "token_maps.png").stat().st_size > 5_000


DDP = [
    *FULL_SPLIT,
    "--sweep.wandb=false",
    "--sweep.token_maps=0",
    "--trainer.enable_progress_bar=false",
    "--data.batch_size=48",  # 359 images: neither 2 ranks nor 48 divide it
]


@pytest.mark.slow
def test_ddp_accuracy_equals_a_single_process_to_the_last_image(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1")

    def evaluate_py(*extra: str) -> str:
        command = [sys.executable, str(ROOT / "evaluate.py"), *DDP, f"--sweep.out_dir={tmp_path}", *extra]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    evaluate_py("--sweep.run_name=single")
    # the DDP run takes the single run's search and timing (rank 0 reuses them; the other
    # rank waits for them) and tests every configuration again on 2 processes
    shutil.copytree(
        tmp_path / "single", tmp_path / "ddp", ignore=shutil.ignore_patterns("results", "report.*")
    )
    log = evaluate_py("--sweep.run_name=ddp", "--trainer.devices=2", "--trainer.strategy=ddp")
    assert "MEMBER: 2/2" in log  # the second process joined
    assert "selecting R" not in log and "timing " not in log  # nobody measured again
    single = report_rows(tmp_path / "single" / "report.json")
    ddp = report_rows(tmp_path / "ddp" / "report.json")
    assert [(r.method, r.r) for r in ddp] == [(r.method, r.r) for r in single]  # the same R
    assert [(r.acc1, r.acc5, r.images) for r in ddp] == [(r.acc1, r.acc5, r.images) for r in single]
    assert {r.images for r in ddp} == {359}  # every image once, none repeated


def test_the_other_ranks_stop_with_rank_zeros_error_instead_of_waiting(tmp_path, monkeypatch):
    monkeypatch.setenv("POMT_SWEEP_SESSION", "one-run")  # as Lightning's processes share it
    model, _, sweep = _tiny_sweep(tmp_path, wandb=False, token_maps=0)

    class NoSelectionSplit(DigitsDataModule):
        holdout_dataloader = None  # rank 0 cannot choose R

    class OtherRank(pl.Trainer):
        @property
        def is_global_zero(self) -> bool:
            return False

    def data():
        return NoSelectionSplit(img_size=16, batch_size=32, holdout_size=40, augment=False)

    errors: list[BaseException] = []

    def rank_one() -> None:
        try:
            sweep.run(model, data(), lambda **kwargs: _cpu_trainer(OtherRank, **kwargs))
        except BaseException as err:
            errors.append(err)

    waiting = threading.Thread(target=rank_one, daemon=True)
    waiting.start()  # waits for rank 0's plan
    with pytest.raises(ValueError, match="NoSelectionSplit has no holdout_dataloader"):
        sweep.run(model, data(), _cpu_trainer)
    waiting.join(timeout=120)
    assert not waiting.is_alive(), "the other rank is still waiting for a plan that will never come"
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "global rank 0 stopped while measuring: PomtValueError: NoSelectionSplit has no" in str(errors[0])


def test_a_limited_run_is_never_reused_as_a_full_one(tmp_path, caplog):
    args = tiny_args(
        tmp_path,
        "--sweep.wandb=false",
        "--sweep.token_maps=0",
        "--sweep.methods=[none, tome]",
        "--sweep.tome_r=[2]",
    )
    quick = evaluate.main(
        [*args, "--sweep.limit_test_batches=3"]
    )  # (not 1: read as 1.0 in some environments)
    assert {row.images for row in quick.rows} == {96}
    caplog.clear()
    with caplog.at_level("INFO"):
        full = evaluate.main([*args, "--sweep.limit_test_batches=null"])
    assert full.reused == [] and {row.images for row in full.rows} == {359}  # tested again, on every image
    assert "not reusing unpruned" in caplog.text
    assert "it was made with limit_test_batches=3, now limit_test_batches=None" in caplog.text
    assert "timing " not in caplog.text  # the latency does not depend on the test limit: reused
    again = evaluate.main([*args, "--sweep.limit_test_batches=1.0"])  # a fraction of 1.0 is every batch
    assert again.reused == ["unpruned", "tome r=2"]
    assert [row.acc1 for row in again.rows] == [row.acc1 for row in full.rows]


def test_the_trainers_own_test_limit_is_rejected_for_the_sweeps(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.limit_test_batches=0.2 .*--sweep.limit_test_batches 0.2"):
        evaluate.main(tiny_args(tmp_path, "--trainer.limit_test_batches=0.2"))
    model, data, sweep = _tiny_sweep(tmp_path)
    with pytest.raises(ValueError, match="trainer.limit_test_batches=3 .*use sweep.limit_test_batches"):
        sweep.run(model, data, lambda **kwargs: _cpu_trainer(limit_test_batches=3, **kwargs))
    assert list(tmp_path.iterdir()) == []  # rejected before anything was measured or written
    with pytest.raises(ValueError, match=r"limit_test_batches must be a fraction in \(0, 1\] or a number"):
        SweepSettings(limit_test_batches=1.5)


def test_several_runtimes_in_one_evaluation_and_adding_a_runtime_times_only_that_one(
    tmp_path, capsys, caplog
):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    args = tiny_args(
        tmp_path, "--sweep.methods=[none, pomt, tome]", "--sweep.tome_r=[2]", "--sweep.token_maps=0"
    )
    with caplog.at_level("INFO"):
        first = evaluate.main([*args, "--sweep.targets=[torch, onnxruntime]"])
    out = capsys.readouterr().out
    run_dir = tmp_path / "tiny"
    assert [row.runtime for row in first.rows] == ["torch"] * 3 + ["onnxruntime"] * 3  # ordered by runtime
    for runtime in ("torch", "onnxruntime"):  # each runtime chose its own R, and its pieces are its own
        chosen = next(row for row in first.rows if row.selected and row.runtime == runtime)
        assert chosen.r == first.searches[runtime][32].selection.r
        assert {p.name for p in (run_dir / runtime).iterdir()} >= {"search.json", "timing.json"}
    onnx = [row for row in first.rows if row.runtime == "onnxruntime"]
    assert {row.precision for row in onnx} == {"onnxruntime:f32"}
    assert {row.accuracy_from for row in onnx} == {
        "PyTorch's (32-true), shared: onnxruntime:f32 computes the checked fp32 export in fp32"
    }
    torch_acc = {(row.method, row.r): row.acc1 for row in first.rows if row.runtime == "torch"}
    assert all(torch_acc[(row.method, row.r)] == row.acc1 for row in onnx if (row.method, row.r) in torch_acc)
    tested = [line for line in caplog.text.splitlines() if "evaluating " in line]
    assert len(tested) == len({(row.method, row.r) for row in first.rows})  # each configuration tested once
    table = out[out.index("runtime ") : out.index("report:")]
    assert "onnxruntime unpruned" in table.replace("  ", " ").replace("  ", " ")
    assert "batch 32: recommended: " in out and "(allowed: 0.5)" in out
    assert sum(1 for line in out.splitlines() if line.startswith("batch 32, onnxruntime: ")) >= 3
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["timing"]) == {"torch", "onnxruntime"} and report["recommendation"]
    assert set(report["run"]["runtimes"]) == {"torch", "onnxruntime"}
    # W&B: the runtimes in the group and in each configuration's config; the summary table has the column
    runs = [p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")]
    configurations = {(row.method, row.r) for row in first.rows}  # the runtimes' Rs may differ
    assert len(runs) == len(configurations) + 1  # one run per configuration (tested once) and the summary
    assert all(b"tradeoff-tiny-torch+onnxruntime" in run and b"runtimes" in run for run in runs)
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/tradeoff/table_*.json"))
    assert "runtime" in json.loads(tables[0].read_text())["columns"]
    assert (run_dir / "tradeoff.png").stat().st_size > 10_000

    caplog.clear()  # adding a runtime: only it chooses R and times; only its new configurations are tested
    with caplog.at_level("INFO"):
        second = evaluate.main(
            [*args, "--sweep.targets=[torch, onnxruntime, openvino]", "--sweep.wandb=false"]
        )
    log = caplog.text
    assert "selecting R in openvino" in log and "side by side in openvino" in log
    for runtime in ("torch", "onnxruntime"):
        assert f"selecting R in {runtime}" not in log and f"side by side in {runtime} " not in log
    assert [(r.runtime, r.method, r.r, r.acc1, r.latency_ms) for r in second.rows[:6]] == [
        (r.runtime, r.method, r.r, r.acc1, r.latency_ms) for r in first.rows
    ]
    known = {(row.method, row.r) for row in first.rows}
    new = {(row.method, row.r) for row in second.rows if row.runtime == "openvino"} - known
    assert len([line for line in log.splitlines() if "evaluating " in line]) == len(new)

    caplog.clear()  # a fourth configuration: every search and accuracy reused; only it is tested
    with caplog.at_level("INFO"):
        third = evaluate.main(
            [
                *args,
                "--sweep.targets=[torch, onnxruntime, openvino]",
                "--sweep.wandb=false",
                "--sweep.tome_r=[2, 3]",
            ]
        )
    log = caplog.text
    assert "selecting R" not in log
    assert [line.split("evaluating ")[1] for line in log.splitlines() if "evaluating " in line] == [
        "tome r=3"
    ]
    assert {row.runtime for row in third.rows if (row.method, row.r) == ("tome", 3)} == {
        "torch",
        "onnxruntime",
        "openvino",
    }
