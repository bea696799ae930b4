"""The predicted speed-up is checked against the verified one before it is reported: where it
lies outside the verification's interval, the console line, the W&B summary and the plot say
so in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pomt.offline.selection import Selection, select_r
from pomt.offline.verify import check_candidates
from pomt.plots import plot_profiles

# n* = 9 on the profile: predicted x2.000 (10 ms at N = 17 against 5 ms)
STAIRCASE = {17: 10.0, 13: 10.0, 9: 5.0, 5: 4.0}
ACCURACY = {17: 0.9, 13: 0.9, 9: 0.88, 5: 0.5}


def _measured(speedup: float):
    def measure(r: int, decided=None) -> tuple[list[float], float]:
        return [speedup * (1 + 0.01 * (i % 5 - 2)) for i in range(20)], 10.0

    return measure


def _verified(speedup: float) -> Selection:
    return check_candidates(
        select_r(STAIRCASE, ACCURACY, alpha=0.5), _measured(speedup), log=lambda line: None
    )


def test_a_prediction_inside_the_measured_interval_passes_silently():
    sel = _verified(2.0)
    assert sel.verified and sel.speedup == pytest.approx(2.0)
    assert sel.prediction_check is None and "prediction off" not in sel.summary()
    assert sel.to_dict()["prediction_check"] is None


def test_a_prediction_outside_the_measured_interval_is_said_everywhere():
    sel = _verified(1.4)  # really faster, but by much less than the profile promised
    assert sel.verified and sel.r == 8
    line = sel.prediction_check
    assert line is not None and "\n" not in line
    assert "predicted x2.000" in line and "measured x1.400" in line and "R=8" in line
    # the console line, the saved selection, the plot's title
    assert line in sel.summary()
    assert Selection.from_dict(sel.to_dict()).prediction_check == line
    title = plot_profiles(STAIRCASE, ACCURACY, sel)._suptitle.get_text()
    assert title.splitlines()[-1] == line


def test_r0_kept_after_a_missed_prediction_still_says_so():
    sel = _verified(1.0)  # no gain at all: R = 0 kept; the first candidate's prediction was off
    assert sel.r == 0 and not sel.verified
    assert "R=8" in sel.prediction_check and "predicted x2.000" in sel.prediction_check


def test_the_wandb_summary_carries_the_line(monkeypatch):
    from pomt.callbacks import logs
    from pomt.method.pruning import PruningConfig

    logged: dict = {}
    monkeypatch.setattr(logs, "log_summary", lambda trainer, values: logged.update(values))
    monkeypatch.setattr(logs, "log_scalars", lambda *a, **k: None)
    monkeypatch.setattr(logs, "log_config", lambda *a, **k: None)
    monkeypatch.setattr(logs, "announce_wandb_runs", lambda trainer: None)
    trainer = SimpleNamespace(loggers=[object()], global_step=0)
    for speedup, off in ((1.4, True), (2.0, False)):
        logged.clear()
        result = SimpleNamespace(selection=_verified(speedup), latency=None, accuracy=None)
        pruning = PruningConfig(method="pomt", r=8, layer=3, schedule=(9,))
        scalars = logs.log_pomt(
            trainer, None, "fit", pruning, result=result, r_source="search", log_plots=False
        )
        assert scalars["pomt/prediction_off"] == float(off)
        assert ("pomt/prediction_check" in logged) == off
        if off:
            assert logged["pomt/prediction_check"] == result.selection.prediction_check
