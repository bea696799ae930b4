"""The report's sentences are true of its numbers: every comparison of POMT with ToMe and Top-K
(both ways, ties below the test set's standard error) and the recommendation, checked by
reading each sentence back and testing every claim in it against the rows."""

from __future__ import annotations

import math
import re

import pytest

from pomt.lightning.sweep.report import ReportRow, format_table, mark_pareto
from pomt.lightning.sweep.sentences import accuracy_se, comparisons, recommendation

IMAGES = 400  # s.e. of 89 %: 100 * sqrt(0.89 * 0.11 / 400) = 1.56 points


def row(method, r, acc1, ms, runtime="torch", **kw):
    return ReportRow(
        method,
        r,
        10,
        10.0,
        acc1,
        1.0,
        ms,
        ms,
        None,
        8,
        "cpu",
        "float32",
        images=IMAGES,
        runtime=runtime,
        **kw,
    )


NAMES = {"ToMe": "tome", "Top-K": "topk"}


def numbers(side: str) -> str:
    return rf"r=(?P<{side}_r>\d+) \((?P<{side}_acc>[\d.]+) %, (?P<{side}_ms>[\d.]+) ms\)"


SENTENCE = re.compile(
    rf"^batch (\d+), (\w+): (?P<lead>.*?)(?P<name>ToMe|Top-K)(?P<lead2>.*?), {numbers('theirs')}, is "
    rf"(?:x(?P<factor>[\d.]+) (?P<dir>faster|slower) than|(?P<same>as fast as)) POMT {numbers('ours')}, and "
    r"(?:(?P<equal>equally accurate)|(?P<tie>tied in accuracy \((?P<apart>[\d.]+) points apart, less than "
    r"the s\.e\. of (?P<se>[\d.]+) points on (?P<n>\d+) test images\))|(?P<points>[\d.]+) points "
    r"(?P<more>more|less) accurate)$"
)


def check(sentence: str, rows: list[ReportRow]) -> str:
    """Every claim of one comparison sentence, tested against ``rows``; returns its kind."""
    m = SENTENCE.match(sentence)
    assert m, sentence
    runtime = m.group(2)
    method = NAMES[m.group("name")]
    (theirs_r, theirs_acc, theirs_ms), (ours_r, ours_acc, ours_ms) = (
        (int(m.group(f"{side}_r")), float(m.group(f"{side}_acc")), float(m.group(f"{side}_ms")))
        for side in ("theirs", "ours")
    )
    ours = next(r for r in rows if r.selected and r.runtime == runtime and r.r == ours_r)
    group = [
        r for r in rows if r.method == method and r.runtime == runtime and r.batch_size == ours.batch_size
    ]
    theirs = next(r for r in group if r.r == theirs_r)
    for got, row_ in ((theirs_acc, theirs), (ours_acc, ours)):  # the numbers shown are the rows'
        assert got == round(100 * row_.acc1, 2)
    assert (theirs_ms, ours_ms) == (round(theirs.latency_ms, 2), round(ours.latency_ms, 2))
    lead = m.group("lead") + m.group("name") + m.group("lead2")
    if lead.endswith("fastest setting at least as accurate as POMT"):
        kind = "accurate"
        assert theirs.acc1 >= ours.acc1
        assert theirs.latency_ms == min(r.latency_ms for r in group if r.acc1 >= ours.acc1)
    elif lead.startswith("no ") and "at least as accurate" in lead:
        kind = "none accurate"
        assert all(r.acc1 < ours.acc1 for r in group) and theirs.acc1 == max(r.acc1 for r in group)
    elif lead.endswith("most accurate setting at most as slow as POMT"):
        kind = "fast"
        assert theirs.latency_ms <= ours.latency_ms
        assert theirs.acc1 == max(r.acc1 for r in group if r.latency_ms <= ours.latency_ms)
    else:
        assert lead.startswith("no ") and "at most as slow" in lead, lead
        kind = "none fast"
        assert all(r.latency_ms > ours.latency_ms for r in group)
        assert theirs.latency_ms == min(r.latency_ms for r in group)
    ratio = theirs.latency_ms / ours.latency_ms
    if m.group("same"):
        assert round(max(ratio, 1 / ratio), 2) == 1.0
    else:
        assert float(m.group("factor")) == round(max(ratio, 1 / ratio), 2)
        assert (m.group("dir") == "faster") == (ratio < 1)
    diff = 100 * (theirs.acc1 - ours.acc1)
    se = accuracy_se(ours.acc1, ours.images)
    if m.group("equal"):
        assert diff == 0
    elif m.group("tie"):
        assert 0 < abs(diff) < se and int(m.group("n")) == ours.images
        assert float(m.group("apart")) == round(abs(diff), 2) and float(m.group("se")) == round(se, 2)
    else:
        assert abs(diff) >= se and float(m.group("points")) == round(abs(diff), 2)
        assert (m.group("more") == "more") == (diff > 0)
    return kind


def test_the_standard_error_is_the_binomial_one_of_the_test_set():
    assert accuracy_se(0.89, 400) == pytest.approx(100 * math.sqrt(0.89 * 0.11 / 400))
    assert accuracy_se(0.5, 100) == pytest.approx(5.0)
    assert accuracy_se(0.9, 0) == 0.0  # the number of images not known: only equal is a tie


@pytest.mark.parametrize(
    "case, others",
    [
        # POMT faster but less accurate: ToMe's as-accurate setting is slower, its as-fast one less accurate
        (
            "pomt faster, less accurate",
            [("tome", 2, 0.93, 9.0), ("tome", 4, 0.84, 5.0), ("topk", 2, 0.95, 12.0)],
        ),
        # the reverse: POMT slower but more accurate than everything as fast
        (
            "pomt slower, more accurate",
            [("tome", 2, 0.80, 4.0), ("tome", 4, 0.70, 3.0), ("topk", 2, 0.82, 5.5)],
        ),
        # ties: within the s.e. (1.56 points at 89 % on 400 images), both ways
        ("ties", [("tome", 2, 0.895, 7.0), ("tome", 4, 0.88, 5.0), ("topk", 2, 0.89, 6.0)]),
    ],
)
def test_every_comparison_sentence_is_true_of_its_numbers(case, others):
    pomt_acc = {"pomt faster, less accurate": 0.89, "pomt slower, more accurate": 0.89, "ties": 0.89}[case]
    rows = mark_pareto(
        [row("none", None, 0.91, 10.0), row("pomt", 8, pomt_acc, 6.0, selected=True)]
        + [row(m, r, acc, ms) for m, r, acc, ms in others]
    )
    sentences = comparisons(rows)
    assert len(sentences) == 4  # two per other method
    kinds = [check(sentence, rows) for sentence in sentences]
    text = " | ".join(sentences)
    if case == "pomt faster, less accurate":
        assert kinds == ["accurate", "fast", "accurate", "none fast"]
        assert (
            "r=2 (93.00 %, 9.00 ms), is x1.50 slower than POMT r=8 (89.00 %, 6.00 ms), and 4.00 points more"
            in text
        )
        assert (
            "r=4 (84.00 %, 5.00 ms), is x1.20 faster than POMT r=8 (89.00 %, 6.00 ms), and 5.00 points less"
            in text
        )
    elif case == "pomt slower, more accurate":
        assert kinds == ["none accurate", "fast", "none accurate", "fast"]
        assert (
            "no ToMe setting is at least as accurate as POMT; its most accurate, r=2 (80.00 %, 4.00 ms)"
            in text
        )
        assert "is x1.50 faster than POMT r=8 (89.00 %, 6.00 ms), and 9.00 points less accurate" in text
    else:
        assert kinds == ["accurate", "fast", "accurate", "fast"]
        assert (
            "and tied in accuracy (0.50 points apart, less than the s.e. of 1.56 points on 400 test images)"
            in text
        )
        assert "and tied in accuracy (1.00 points apart" in text  # ToMe r=4, 88 % at 5 ms: a tie
        assert (
            "Top-K's fastest setting at least as accurate as POMT, r=2 (89.00 %, 6.00 ms), is as fast as"
            in text
        )
        assert text.endswith("and equally accurate")


def test_one_sentence_per_runtime_and_one_recommendation_within_the_allowed_loss():
    rows = mark_pareto(
        [
            row("none", None, 0.910, 10.0, "torch"),
            row("pomt", 8, 0.905, 7.0, "torch", selected=True, verified_speedup=1.4),
            row("tome", 4, 0.900, 6.0, "torch"),
            row("none", None, 0.910, 6.0, "onnxruntime"),
            row("pomt", 12, 0.890, 3.0, "onnxruntime", selected=True),  # 2 points below: not allowed
            row("tome", 4, 0.900, 4.0, "onnxruntime"),  # 1.0 below: allowed at 1.0, not at 0.5
            row("topk", 2, 0.907, 5.0, "onnxruntime"),  # 0.3 below: allowed at 0.5
        ]
    )
    assert [r.pareto for r in rows] == [False, False, False, True, True, True, True]  # over runtime x method
    for sentence in comparisons(rows):
        check(sentence, rows)
    lines = recommendation(rows, 0.5)
    assert lines[0] == (
        "batch 8, torch: POMT chose r=8 (verified x1.400); the fastest within 0.5 points of the unpruned "
        "model's top-1 is POMT r=8 (90.50 %, 7.00 ms, x1.43 against unpruned here)"
    )
    assert lines[1].startswith("batch 8, onnxruntime: POMT chose r=12; the fastest within 0.5 points")
    assert "is Top-K r=2 (90.70 %, 5.00 ms, x1.20 against unpruned here)" in lines[1]
    assert lines[2] == (
        "batch 8: recommended: onnxruntime, Top-K r=2: 5.00 ms, x2.00 against the slowest unpruned "
        "(torch, 10.00 ms); top-1 90.70 %, 0.30 points below the unpruned model's 91.00 % (allowed: 0.5)"
    )
    assert "recommended: onnxruntime, ToMe r=4: 4.00 ms" in recommendation(rows, 1.0)[-1]
    assert "recommended: onnxruntime, POMT r=12: 3.00 ms" in recommendation(rows, 2.0)[-1]
    table = format_table(rows, {"torch": "eager", "onnxruntime": "exports"}, max_drop=0.5)
    assert table.splitlines()[:2] == ["latency (torch): eager", "latency (onnxruntime): exports"]
    assert table.splitlines()[2].split()[:2] == ["runtime", "configuration"]
    assert lines[2] in table and "(batch 8, torch: verified before use, x1.400" in table
