"""evaluate.py end to end on a tiny config (embedded digits, random weights, seconds), the
report/plot/W&B outputs, the configs that ship with the project, and the sweep's r matching."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_vit

import evaluate
import pomt
from pomt.lightning.sweep.configurations import matching_r_values
from pomt.lightning.sweep.report import ReportRow, comparisons, format_table, mark_pareto, write_report

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--model.model_name=vit_tiny_patch16_224",
        "--model.num_classes=10",
        "--model.img_size=16",
        '--model.model_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}',
        "--data=pomt.datamodules.DigitsDataModule",
        "--data.img_size=16",
        "--data.batch_size=32",
        "--data.holdout_size=40",
        "--data.augment=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--sweep.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
        "--sweep.layer=1",
        '--sweep.search={"grid": [17, 13, 9, 5], "accuracy_grid": [17, 13, 9, 5], '
        '"accuracy_samples": 40, "min_run_time": 0.0, "warmup": 1, "verify_max_time": 0.0, "verify_pairs": 6}',
        "--sweep.latency_rounds=3",
        f"--sweep.out_dir={tmp_path}",
        "--sweep.run_name=tiny",
        *extra,
    ]


def report_rows(path: Path) -> list[ReportRow]:
    """The rows of a report JSON as written (NaN as None)."""
    return [ReportRow(**row) for row in json.loads(Path(path).read_text())["rows"]]


def test_evaluate_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = evaluate.main(tiny_args(tmp_path))
    out = capsys.readouterr().out
    run_dir = tmp_path / "tiny"
    methods = [row.method for row in result.rows]
    assert methods[:2] == ["none", "pomt"] and "tome" in methods and "topk" in methods
    pomt_row = next(row for row in result.rows if row.method == "pomt")
    assert pomt_row.selected and pomt_row.r == result.searches["torch"][32].selection.r
    assert pomt_row.n_last == 17 - pomt_row.r
    assert result.rows[0].r is None and all(isinstance(row.r, int) for row in result.rows[1:])
    for row in result.rows:
        assert 0.0 <= row.acc1 <= row.acc5 <= 1.0
        assert row.latency_ms > 0 and row.latency_p90_ms >= row.latency_ms
        assert row.batch_size == 32
    assert report_rows(run_dir / "report.json") == result.rows
    assert (run_dir / "report.csv").read_text().splitlines()[0].startswith("method,r,n_last")
    assert (run_dir / "tradeoff.png").stat().st_size > 10_000
    assert (run_dir / "config.yaml").is_file()
    assert "R chosen by POMT for this device" in out and "unpruned" in out
    # one offline W&B run per configuration plus the summary run, in one folder
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(result.rows) + 1
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/tradeoff/table_*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == len(result.rows)
    assert {"method", "acc1", "latency_ms"} <= set(table["columns"])


def test_evaluate_sweeps_batch_sizes_and_reuses_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = tiny_args(
        tmp_path, "--sweep.batch_sizes=[4, 8]", "--sweep.wandb=false", "--sweep.methods=[none, pomt, tome]"
    )
    result = evaluate.main(args)
    assert sorted({row.batch_size for row in result.rows}) == [4, 8]
    for batch in (4, 8):
        assert (tmp_path / "tiny" / f"bs{batch}" / "report.csv").is_file()
        assert (tmp_path / "tiny" / f"bs{batch}" / "torch" / "latency_profile.json").is_file()
    # one accuracy profile, shared: accuracy does not depend on the batch size
    assert len(list((tmp_path / "tiny").glob("**/accuracy_profile.json"))) == 1
    unpruned = [row for row in result.rows if row.method == "none"]
    assert unpruned[0].acc1 == unpruned[1].acc1
    assert {row.batch_size for row in report_rows(tmp_path / "tiny" / "report.json")} == {4, 8}


def test_missing_checkpoint_without_train_config_is_explained(tmp_path):
    args = tiny_args(tmp_path, f"--model.weights={tmp_path / 'nope.ckpt'}")
    with pytest.raises(FileNotFoundError, match="does not exist: train first"):
        evaluate.main(args)


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_help(script):
    out = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--model" in out.stdout
    if script == "evaluate.py":  # the sweep's own arguments, beside the Trainer's
        for argument in ("--sweep.methods", "--sweep.limit_test_batches", "--sweep.resume", "--sweep.search"):
            assert argument in out.stdout, argument
    else:
        assert "--checkpoint.dirpath" in out.stdout and "--sweep." not in out.stdout


@pytest.mark.parametrize(
    "config",
    sorted(
        p.name
        for p in (ROOT / "configs").glob("*.yaml")
        if "train" not in p.name and not re.search(r"^checkpoint:", p.read_text(), re.M)  # train.py's own
    ),
)
def test_shipped_evaluate_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "sweep:" in capsys.readouterr().out


def test_matching_r_values_span_the_pomt_range():
    vit = make_tiny_vit(depth=4)  # 17 tokens, 16 ordinary
    pomt_mean = sum(pomt.token_schedule(vit, "pomt", 8, 1)) / 4  # (17 + 3 * 9) / 4 = 11
    r_values = matching_r_values(vit, "topk", [17 - 6 * s for s in (0.5, 1.0)], layer=1)
    means = [sum(pomt.token_schedule(vit, "topk", r, 1)) / 4 for r in r_values]
    assert r_values == sorted(r_values) and len(r_values) == 2
    assert abs(means[-1] - pomt_mean) <= 1.0
    assert matching_r_values(vit, "tome", [-50.0]) == []  # out of reach: skipped, not clamped


def test_report_files_and_table(tmp_path):
    rows = [
        ReportRow("none", None, 17, 17.0, 0.9, 1.0, 10.0, 11.0, 10.5, 4, "cpu", "float32"),
        ReportRow("pomt", 8, 9, 11.0, 0.85, 1.0, 6.0, 6.5, 6.2, 4, "cpu", "float32", selected=True),
    ]
    csv_path, json_path = write_report(rows, tmp_path)
    assert report_rows(json_path) == rows
    assert [line.split(",")[:2] for line in csv_path.read_text().splitlines()[1:]] == [
        ["none", ""],
        ["pomt", "8"],
    ]
    table = format_table(rows)
    assert "pomt r=8 *" in table and "1.667" in table  # 10 ms / 6 ms
    assert table.splitlines()[2].startswith("unpruned ")


def test_online_wandb_without_login_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    args = tiny_args(tmp_path, "--sweep.wandb_offline=false", "--sweep.methods=[none, pomt]")
    with pytest.warns(UserWarning, match="W&B online mode needs credentials"):
        result = evaluate.main(args)
    assert [row.method for row in result.rows] == ["none", "pomt"]
    assert (tmp_path / "tiny" / "report.json").is_file()
    assert len(list((tmp_path / "tiny" / "wandb").glob("offline-run-*"))) == 3


def test_report_marks_the_front_and_compares_pomt_with_tome_and_topk():
    def row(method, r, acc1, ms, **kw):
        return ReportRow(method, r, 10, 10.0, acc1, 1.0, ms, ms, None, 8, "cpu", "float32", **kw)

    rows = mark_pareto(
        [
            row("none", None, 0.90, 10.0),
            row("pomt", 8, 0.89, 6.0, selected=True),
            row("tome", 4, 0.89, 9.0),  # as accurate, slower: POMT is x1.50 faster
            row("tome", 8, 0.80, 5.0),  # faster, less accurate: also on the front
            row("topk", 4, 0.85, 7.0),  # dominated by POMT
        ]
    )
    assert [r.pareto for r in rows] == [True, True, False, True, False]
    sentences = comparisons(rows)  # (checked against their numbers in test_sentences.py)
    assert sentences[0] == (
        "batch 8, torch: ToMe's fastest setting at least as accurate as POMT, r=4 (89.00 %, 9.00 ms), "
        "is x1.50 slower than POMT r=8 (89.00 %, 6.00 ms), and equally accurate"
    )
    assert sentences[2].startswith("batch 8, torch: no Top-K setting is at least as accurate as POMT")
    table = format_table(rows, how_timed="eager calls, precision 32-true")
    assert table.splitlines()[0] == "latency: eager calls, precision 32-true" and " yes" in table
    from pomt.plots import plot_tradeoff

    lines = plot_tradeoff(rows).axes[0].get_lines()
    front = [line for line in lines if line.get_label() == "Pareto front"]
    assert len(front) == 1 and list(front[0].get_xdata()) == [5.0, 6.0, 10.0]  # the front, by latency


def test_evaluate_trains_first_with_the_train_py_beside_it_from_any_directory(tmp_path, monkeypatch):
    """Loaded from a copy elsewhere (the root on ``sys.path`` holds another train.py),
    evaluate.py takes the train.py beside it, not an ``import train`` that depends on sys.path."""
    import importlib.util
    import shutil

    root = Path(evaluate.__file__).resolve().parent
    for name in ("evaluate.py", "train.py"):
        shutil.copy(root / name, tmp_path / name)
    monkeypatch.chdir(tmp_path.parent)
    spec = importlib.util.spec_from_file_location("evaluate_copy", tmp_path / "evaluate.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    train = copy.train_script()
    assert Path(train.__file__) == tmp_path / "train.py"
    assert callable(train.main)


def test_the_sweep_in_a_runtime_chooses_r_and_times_every_configuration_there(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = tiny_args(
        tmp_path,
        "--sweep.targets=[onnxruntime]",
        "--sweep.wandb=false",
        "--sweep.methods=[none, pomt, tome]",
    )
    result = evaluate.main(args)
    # the table's header says what ran: the runtime and its precision (no POMT block path)
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("latency: "))
    assert header.startswith("latency: onnxruntime (onnxruntime:f32)") and "POMT block" not in header
    search = result.searches["onnxruntime"][32]
    assert search.latency.runtime == "onnxruntime" and search.latency.precision == "onnxruntime:f32"
    for row in result.rows:  # named by the runtime, timed as checked exports
        assert row.precision == "onnxruntime:f32"
        assert row.timer_mode.startswith("onnxruntime:f32 export") and "top-1 = PyTorch's" in row.timer_mode
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["timing"]["onnxruntime"].startswith("onnxruntime (onnxruntime:f32)")
    assert "accuracy from PyTorch after the equality check" in report["timing"]["onnxruntime"]


def test_a_test_limit_reads_the_same_whatever_the_parser_made_of_it():
    """'--sweep.limit_test_batches=2' is two batches whether the command-line parser produced
    2 or 2.0 (jsonargparse's reading of a float/int union depends on the environment); a
    fraction stays a fraction, 1.0 is every batch, and a fractional count is refused."""
    from pomt.errors import PomtValueError
    from pomt.lightning.sweep.context import check_limit

    assert check_limit(2) == 2 and check_limit(2.0) == 2 and isinstance(check_limit(2.0), int)
    assert check_limit(0.5) == 0.5 and check_limit(1.0) is None and check_limit(None) is None
    with pytest.raises(PomtValueError, match="got 2.5"):
        check_limit(2.5)
