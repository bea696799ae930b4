"""evaluate.py with ``--sweep.heal_epochs``: every pruned configuration fine-tuned at its r for the
same epochs, tested again as a healed row next to the unchanged training-free rows, fronts and
comparison sentences for both, W&B runs marked healed, and healed checkpoints a rerun reuses."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
from test_evaluate import report_rows, tiny_args

import evaluate
from pomt.lightning.sweep.report import ReportRow, comparisons, format_table, front, mark_pareto
from pomt.lightning.sweep.settings import SweepSettings

HEAL = ("--sweep.heal_epochs=1", "--sweep.heal_batches=2")
TOME_TOPK = ("--sweep.tome_r=[2, 4]", "--sweep.topk_r=[2]")


def _wandb_runs(run_dir: Path) -> dict[str, bytes]:
    runs = {}
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        deadline = time.monotonic() + 10
        while b"heal_epochs" not in path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)  # the offline writer may still be flushing
        runs[path.name] = path.read_bytes()
    return runs


def test_healed_rows_fronts_wandb_and_a_rerun_that_reuses_the_healed_checkpoints(tmp_path, caplog):
    free = evaluate.main(tiny_args(tmp_path / "free", "--sweep.wandb=false", *TOME_TOPK))
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate.main(tiny_args(tmp_path, *TOME_TOPK, *HEAL))
    # every configuration heals in train mode, as fine-tuning does (Lightning warns otherwise)
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]
    run_dir = tmp_path / "tiny"
    healed = [row for row in result.rows if row.healed]
    training_free = [row for row in result.rows if not row.healed]

    # every pruned configuration healed once, for the same epochs, and the unpruned model as the
    # control; its latency is its training-free row's
    pruned = [(row.method, row.r) for row in training_free if row.method != "none" and row.r]
    assert sorted((row.method, row.r or 0) for row in healed) == sorted([*pruned, ("none", 0)])
    assert {("tome", 2), ("tome", 4), ("topk", 2)} <= set(pruned)
    by_config = {(row.method, row.r): row for row in training_free}
    for row in healed:
        assert row.heal_epochs == 1 and row.heal_s > 0 and row.wall_s >= row.heal_s
        assert row.latency_ms == by_config[row.method, row.r].latency_ms
        key = "unpruned" if row.method == "none" else f"{row.method}-r{row.r}"
        assert (run_dir / "healed" / f"{key}-healed1.pt").is_file()
    assert "healing tome r=2 healed: 1 epochs at r=2" in caplog.text
    # the training-free rows are those of a run without healing: same accuracy at the same r
    before = {(row.method, row.r): row.acc1 for row in free.rows}
    assert all(before[key] == row.acc1 for key, row in by_config.items() if key in before)
    assert ("tome", 2) in before and ("tome", 4) in before

    # the healed weights differ from the starting ones, whose fingerprint keys the record
    record = json.loads((run_dir / "healed" / "tome-r2-healed1.json").read_text())
    assert record["payload"]["fingerprint"] != record["conditions"]["weights"]

    # fronts: one among the training-free rows, one among the healed rows (with the unpruned model)
    assert any(row.pareto for row in healed)
    assert front(result.rows, 32, healed=True) and front(result.rows, 32, healed=False)
    assert report_rows(run_dir / "report.json") == result.rows
    # W&B: one run per configuration, healed ones named and configured as such
    runs = _wandb_runs(run_dir)
    assert len(runs) == len(result.rows) + 1
    healed_runs = [data for data in runs.values() if b" healed" in data]
    assert len(healed_runs) == len(healed) and all(b"heal_epochs" in data for data in healed_runs)

    # a rerun under another test limit tests again, on the healed checkpoints it reuses (and says so)
    caplog.clear()
    with caplog.at_level("INFO"):
        again = evaluate.main(
            tiny_args(tmp_path, *TOME_TOPK, *HEAL, "--sweep.wandb=false", "--sweep.limit_test_batches=3")
        )
    assert "healing " not in caplog.text.replace("healing and testing", "")
    assert "reusing the healed checkpoint of tome r=2 healed" in caplog.text
    assert "reused the healed checkpoints of" in caplog.text
    assert len([row for row in again.rows if row.healed]) == len(healed)
    assert all(row.images == 96 for row in again.rows)  # three batches of 32

    # other epochs are another healing, never the stored one
    caplog.clear()
    with caplog.at_level("INFO"):
        evaluate.main(
            tiny_args(
                tmp_path,
                "--sweep.wandb=false",
                "--sweep.methods=[none, tome]",
                "--sweep.tome_r=[2]",
                "--sweep.heal_epochs=2",
                "--sweep.heal_batches=1",
            )
        )
    assert "healing tome r=2 healed: 2 epochs at r=2" in caplog.text


def _row(method, r, acc1, latency, healed=False, selected=False) -> ReportRow:
    return ReportRow(
        method=method,
        r=r,
        n_last=0,
        mean_n=0.0,
        acc1=acc1,
        acc5=1.0,
        latency_ms=latency,
        latency_p90_ms=latency,
        loop_latency_ms=None,
        batch_size=64,
        device="cpu",
        dtype="float32",
        selected=selected,
        healed=healed,
        heal_epochs=2 if healed else 0,
    )


def test_fronts_and_sentences_for_training_free_and_healed_rows():
    rows = mark_pareto(
        [
            _row("none", None, 0.96, 40.0),
            _row("pomt", 25, 0.90, 30.0, selected=True),
            _row("tome", 13, 0.95, 23.0),
            _row("pomt", 25, 0.95, 30.0, healed=True, selected=True),
            _row("tome", 13, 0.94, 23.0, healed=True),
        ]
    )
    marked = {row.label: row.pareto for row in rows}
    assert marked == {
        "unpruned": True,
        "pomt r=25": False,  # ToMe training-free is faster and more accurate
        "tome r=13": True,
        "pomt r=25 healed": True,  # among the healed rows, POMT is the more accurate one
        "tome r=13 healed": True,
    }
    assert [row.label for row in front(rows, 64, healed=True)] == [
        "tome r=13 healed",
        "pomt r=25 healed",
        "unpruned",
    ]
    sentences = comparisons(rows)
    assert sentences[0].startswith(
        "batch 64, torch: ToMe's fastest setting at least as accurate as POMT, r=13 (95.00 %, 23.00 ms), "
        "is x1.30 faster than POMT r=25 (90.00 %, 30.00 ms)"
    )
    assert sentences[2] == (
        "batch 64, torch, healed 2 epochs: healing recovers 83 % of POMT's training-free accuracy loss against the "
        "unpruned model (unpruned 96.00 %, POMT r=25 training-free 90.00 %, healed 95.00 %)"
    )
    assert sentences[3].startswith(
        "batch 64, torch, healed 2 epochs: no ToMe setting is at least as accurate as POMT"
    )
    table = format_table(rows)
    assert "pomt r=25 healed *" in table and "healed: fine-tuned 2 epochs at its r" in table

    # with the unpruned model fine-tuned the same way (the control), the healed front is over healed rows
    control = mark_pareto([*rows, _row("none", None, 0.97, 40.0, healed=True)])
    assert [row.label for row in front(control, 64, healed=True)][-1] == "unpruned healed"
    assert {row.label: row.pareto for row in control}["unpruned"]  # still on the training-free front
    assert "; the unpruned model fine-tuned the same way: 97.00 %)" in comparisons(control)[2]


@pytest.mark.parametrize(("epochs", "batches"), [(-1, None), (1.5, None), (True, None), (1, 0)])
def test_bad_heal_settings_are_named(epochs, batches):
    with pytest.raises(ValueError, match="heal_epochs must be|heal_batches must be"):
        SweepSettings(heal_epochs=epochs, heal_batches=batches)
