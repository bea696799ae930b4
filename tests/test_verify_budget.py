"""The verification's budget is sized by the answer it needs: groups of pairs are timed until
the interval is decided or until the user's cap (``verify_max_time``, ``verify_max_pairs``), on a
fake clock that only the calls move (as in the burst test of ``test_callback_guarantees``)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

import pomt.timing
from pomt import SearchConfig
from pomt.deploy.targets import Call
from pomt.offline.selection import select_r
from pomt.offline.verify import ROUND_TIME, check_candidates, paired_speedups

# n* = 9 on the profile (R = 8 of N = 17), predicted x2.000
STAIRCASE = {17: 10.0, 13: 10.0, 9: 5.0, 5: 4.0}
ACCURACY = {17: 0.9, 13: 0.9, 9: 0.88, 5: 0.5}


class Machine:
    """A fake ``time`` module and two calls that cost ``pruned`` and ``unpruned`` seconds, each
    scaled by a seeded noise factor drawn from [1 - noise, 1 + noise]."""

    def __init__(self, pruned: float, unpruned: float, noise: float = 0.0, seed: int = 0) -> None:
        self.now, self.calls = 0.0, 0
        self.rng = random.Random(seed)
        self.pruned, self.unpruned, self.noise = pruned, unpruned, noise

    def perf_counter(self) -> float:
        return self.now

    def _call(self, seconds: float):
        def call() -> None:
            self.now += seconds * self.rng.uniform(1 - self.noise, 1 + self.noise)
            self.calls += 1

        return call

    def sides(self):
        return Call(self._call(self.pruned)), Call(self._call(self.unpruned))

    def pairs(self, warmup: int) -> int:
        return self.calls // 2 - warmup


@pytest.fixture
def machine(monkeypatch):
    def make(*args, **kwargs) -> Machine:
        m = Machine(*args, **kwargs)
        monkeypatch.setattr(pomt.timing, "time", SimpleNamespace(perf_counter=m.perf_counter))
        return m

    return make


def test_fast_calls_stop_as_soon_as_the_interval_is_decided(machine):
    m = machine(0.0008, 0.001, noise=0.05)
    speedups, unpruned_ms = paired_speedups(*m.sides(), warmup=3, max_time=30.0)
    low = pomt.timing.median_interval(speedups)[1]
    assert len(speedups) == 6 and low > 1.0  # decided after the first round of groups...
    assert m.now < ROUND_TIME + 0.01  # ...about a second, not the 30 s cap
    assert unpruned_ms == pytest.approx(1.0, rel=0.06)


def test_slow_pairs_get_enough_pairs_to_decide_within_the_cap(machine):
    # 180 ms a pair, x1.25 faster, noisy: the first round's six groups (one pair each) do not decide
    m = machine(0.08, 0.1, noise=0.3, seed=1)
    speedups, _ = paired_speedups(*m.sides(), warmup=3, max_time=30.0)
    first = pomt.timing.median_interval(speedups[:6])
    assert first[1] <= 1.0 < first[2]  # what the old 1 s budget ended with: undecided
    median, low, high = pomt.timing.median_interval(speedups)
    assert low > 1.0 and 1.1 < median < 1.4  # decided, and around the true x1.25
    assert 6 < len(speedups) == m.pairs(3) and m.now < 30.0  # more groups, stopped before the cap


def test_a_noisy_undecidable_candidate_stops_at_the_cap_and_keeps_r0_saying_why(machine):
    m = machine(0.09, 0.09, noise=0.3, seed=2)  # pruning gains nothing
    calls_per_candidate: list[float] = []

    def measure(r: int, decided):
        began = m.now
        out = paired_speedups(*m.sides(), warmup=3, max_time=5.0, decided=decided)
        calls_per_candidate.append(m.now - began)
        return out

    lines: list[str] = []
    sel = check_candidates(select_r(STAIRCASE, ACCURACY, alpha=0.5), measure, log=lines.append)
    assert sel.r == 0 and not sel.verified and sel.rejected == (9, 5)
    assert "undecided when the verification's cap was reached" in sel.verification
    at_r8, at_r12 = calls_per_candidate
    assert 5.0 - 0.3 < at_r8 <= 5.0  # R = 8 (x2 predicted): timed up to the cap, to within a pair
    assert "R=8" in lines[0] and "undecided when the verification's cap was reached" in lines[0]
    # R = 12 keeps half the accuracy: even the interval's upper bound loses to R = 0, decided at once
    assert at_r12 < ROUND_TIME + 0.7 and "over 6 groups" in lines[1] and "undecided" not in lines[1]


def test_the_time_cap_and_the_pair_cap_hold_exactly(machine):
    m = machine(0.1, 0.1)  # 200 ms a pair, no gain: never decided against 1 when each group is exactly 1
    never = lambda speedups, ms: False  # noqa: E731
    speedups, _ = paired_speedups(*m.sides(), warmup=1, max_time=7.0, decided=never)
    assert m.now == pytest.approx(7.0) and m.pairs(1) == 34  # 1 warm-up pair + 34 pairs of 0.2 s
    m2 = machine(0.001, 0.001)
    speedups, _ = paired_speedups(*m2.sides(), warmup=1, max_time=30.0, max_pairs=40, decided=never)
    assert m2.pairs(1) == 40  # the pair cap, exactly (the first round's 6 groups fit inside it)
    assert m2.now == pytest.approx(41 * 0.002)


def test_the_cap_never_cuts_the_stated_minimum(machine):
    m = machine(0.1, 0.1)
    speedups, _ = paired_speedups(*m.sides(), warmup=1, max_time=0.0, min_pairs=12, groups=6)
    assert len(speedups) == 6 and m.pairs(1) == 12


def test_the_caps_are_checked_in_the_search_config():
    assert (SearchConfig().verify_max_time, SearchConfig().verify_max_pairs) == (30.0, None)
    with pytest.raises(ValueError, match="verify_max_time must be >= 0"):
        SearchConfig(verify_max_time=-1.0)
    with pytest.raises(ValueError, match="verify_max_pairs must be a positive int or None"):
        SearchConfig(verify_max_pairs=0)
