"""Re-timing where the decision is made, and the stability of the choice (pomt.offline.grid.retime,
pomt.offline.stability), on fake timers whose true curve is known."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from conftest import make_tiny_vit

import pomt
from pomt import Console, Reuse, SearchConfig, Target
from pomt.offline.grid import retime
from pomt.offline.profiles import LatencyPoint, LatencyProfile
from pomt.offline.profiling import profile_latency
from pomt.offline.stability import resample_points, stability, stability_text
from pomt.timing import TimingStats

ACC = {n: 0.8 * (1 - math.exp(-(n - 1) / 20)) for n in (2, 10, 20, 30, 40, 50, 60, 65)}


def samples(level: float, spread: float, rng: random.Random, k: int = 7) -> TimingStats:
    return TimingStats.from_samples([level * (1 + rng.uniform(-spread, spread)) for _ in range(k)])


def test_retime_times_the_points_whose_intervals_overlap_the_leader_and_no_other():
    rng = random.Random(0)
    true = {n: 10 + 0.1 * n for n in range(2, 66)}  # smooth: n* is decided by A(n) and L(n) together
    measured = {n: samples(true[n], 0.001, rng) for n in range(2, 66, 3)}
    leader = pomt.select_r(measured, ACC, alpha=0.5, n_total=65).n_star
    rival = leader + 3
    measured[rival] = samples(true[rival], 0.2, rng)  # too noisy to tell from the leader
    calls: list[int] = []

    def measure(n: int) -> TimingStats:  # tight samples: one more timing decides it
        calls.append(n)
        return samples(true[n], 0.001, rng)

    before = dict(measured)
    taken = retime(measure, measured, ACC, alpha=0.5, budget=10, tolerance=0.0)
    assert rival in taken and leader in taken  # no tolerance: until no interval overlaps the leader's
    # first the multiples of 16 next to the leader (32 and 48 for 41) that were not timed yet: one
    # timing each, so that the latency fit can see a ripple there
    assert leader == 41 and taken[0] == 48 and taken.count(48) == 1
    truth = pomt.select_r({n: true[n] for n in measured}, ACC, alpha=0.5, n_total=65)
    u = dict(zip(truth.curve_n, truth.curve_utility, strict=True))
    far = [n for n in taken[1:] if u[n] < u[leader] - 0.01]  # 1 % of utility: far outside the 0.1 % noise
    assert not far, f"re-timed {far}, whose utility is clearly below the leader {leader}'s"
    assert taken == calls and len(taken) <= 10
    assert taken[1] == rival  # then the widest interval first
    # the default tolerance (0.5 % of the leader's utility): once the rival's timing shows that it
    # cannot beat the leader by more than that, the leader is decided and the budget is kept
    calls.clear()
    assert retime(measure, dict(before), ACC, alpha=0.5, budget=10) == [48, rival] == calls


def test_retime_stops_at_the_budget_when_the_noise_never_decides():
    rng = random.Random(1)
    measured = {n: samples(20.0, 0.3, rng) for n in [*range(2, 66, 4), 65]}
    taken = retime(lambda n: samples(20.0, 0.3, rng), measured, ACC, alpha=0.9, budget=5)
    assert len(taken) == 5
    assert retime(lambda n: samples(20.0, 0.3, rng), measured, ACC, alpha=0.9, budget=0) == []
    with pytest.raises(ValueError, match="budget"):
        retime(lambda n: samples(20.0, 0.3, rng), measured, ACC, budget=-1)


def test_retime_takes_points_with_thousands_of_samples():
    # a fast model timed for 0.2 s per point: its unpruned point pools thousands of samples,
    # whose median interval once overflowed (2.0 ** m for m > 1023)
    rng = random.Random(2)
    true = {n: 0.05 + 0.001 * n for n in range(2, 66)}
    measured = {n: samples(true[n], 0.05, rng, k=3000 if n == 65 else 40) for n in range(2, 66, 3)}
    measured[65] = samples(true[65], 0.05, rng, k=3000)
    taken = retime(lambda n: samples(true[n], 0.05, rng, k=40), measured, ACC, alpha=0.5, budget=4)
    assert 0 < len(taken) <= 4
    median, low, high = pomt.timing.median_interval(measured[65].values_ms)
    assert low < median < high and (high - low) < 0.01 * median  # 3000 samples pin the median down


def sawtooth(n: int) -> float:
    """Multiples of 16 are 20 % faster than their neighbours (OpenVINO bf16 on AMX)."""
    return (10 + 0.15 * n) * (0.8 if n % 16 == 0 else 1.0)


def test_retime_on_a_sawtooth_times_both_sides_of_the_steps_next_to_the_leader():
    rng = random.Random(2)
    measured = {n: samples(sawtooth(n), 0.002, rng) for n in (2, 10, 20, 30, 40, 50, 60, 65)}
    taken = retime(lambda n: samples(sawtooth(n), 0.002, rng), measured, ACC, alpha=0.5, budget=12, period=16)
    leader = pomt.select_r(measured, ACC, alpha=0.5, n_total=65).n_star
    assert leader % 16 == 0  # the fast multiple was found, though the first pass never timed one
    base = leader - leader % 16
    for m in (base, base + 16):
        for n in (m - 1, m, m + 1):
            if 2 <= n <= 65:
                assert n in measured, f"{n} (beside the step at {m}) was not timed"
    assert len(taken) <= 12


def test_profile_latency_retimes_within_its_budget_and_lands_on_the_true_argmax():
    model = make_tiny_vit(img_size=64)  # N = 65

    def run(budget: int) -> tuple[LatencyProfile, list[int]]:
        rng, calls = random.Random(3), []

        def fake(n: int) -> TimingStats:  # 5 % noise: some points overlap the leader
            calls.append(n)
            return samples(sawtooth(n), 0.05, rng)

        lat = profile_latency(
            model,
            timing=fake,
            accuracy=ACC,
            progress=False,
            search=SearchConfig(alpha=0.5, retime_points=budget, retime_tolerance=0.0),
        )  # fmt: skip (0: the budget is the cap)
        return lat, calls

    first, first_calls = run(0)
    lat, calls = run(6)
    assert "re-timed" not in first.sampling and lat.sampling.endswith(", 6 re-timed")
    assert calls[: len(first_calls)] == first_calls and len(calls) == len(first_calls) + 6  # the cap
    truth = {n: TimingStats.from_samples([sawtooth(n)]) for n in range(2, 66)}
    assert pomt.select_r(lat, ACC).n_star == pomt.select_r(truth, ACC).n_star
    times = Counter(calls)
    assert any(k > 1 for k in times.values())
    assert all(p.samples == 7 * times[p.n] for p in lat.points)  # the samples of a re-timed n are pooled
    with pytest.raises(ValueError, match="retime_points"):
        profile_latency(
            model,
            timing=lambda n: truth[n],
            accuracy=ACC,
            search=SearchConfig(retime_points=-1),
            progress=False,
        )


def noisy_profile(levels: dict[int, list[float]]) -> LatencyProfile:
    points = [LatencyPoint.from_stats(n, TimingStats.from_samples(v)) for n, v in sorted(levels.items())]
    return LatencyProfile(
        model="m", device="cpu", img_size=(64, 64), n_total=65, prefix=1, points=points, device_type="cpu",
        batch_size=1, dtype="float32", layer=1, threads=1, cuda_graphs=False, sampling="grid",
    )  # fmt: skip


def test_stability_is_the_share_of_resamples_that_choose_n_star_and_names_the_runner_up(tmp_path):
    rng = random.Random(4)
    levels = {n: [10 + 0.1 * n + rng.gauss(0, 0.05) for _ in range(9)] for n in range(2, 66, 7)}
    levels[37] = [10 + 0.1 * 37 + rng.gauss(0, 1.0) for _ in range(9)]  # the noisy one
    lat = noisy_profile(levels)
    lat = LatencyProfile.load(lat.save(tmp_path / "lat.json"))  # the samples survive JSON
    assert all(len(p.values_ms) == 9 for p in lat.points)
    choose = lambda profile: pomt.select_r(profile, ACC, alpha=0.5)  # noqa: E731
    sel = choose(lat)
    got = stability(lat, choose, sel, resamples=60, seed=7)
    # as defined: the same resamples, drawn again here, choose n* this often
    draw = random.Random(7)
    from dataclasses import replace

    picks = Counter(choose(replace(lat, points=resample_points(lat.points, draw))).n_star for _ in range(60))
    assert got.share == picks[sel.n_star] / 60 and got.resamples == 60
    others = [(c, n) for n, c in picks.items() if n != sel.n_star]
    if others:
        assert (got.runner_up_chosen * 60, got.runner_up) == max(others)
    u = dict(zip(sel.curve_n, sel.curve_utility, strict=True))
    assert got.runner_up_gap == pytest.approx((u[sel.n_star] - u[got.runner_up]) / u[sel.n_star])
    text = got.text()
    assert text.startswith(f"n* = {sel.n_star} (chosen in {round(100 * got.share)} % of 60 resamples")
    assert f"runner-up n = {got.runner_up}" in text


def test_a_noiseless_choice_is_chosen_in_every_resample_and_its_runner_up_is_the_next_best():
    lat = noisy_profile({n: [10 + 0.1 * n] * 5 for n in range(2, 66, 7)})
    choose = lambda profile: pomt.select_r(profile, ACC, alpha=0.5)  # noqa: E731
    sel = choose(lat)
    got = stability(lat, choose, sel, resamples=10)
    u = dict(zip(sel.curve_n, sel.curve_utility, strict=True))
    best_other = max((v, n) for n, v in u.items() if n != sel.n_star)[1]
    assert got.share == 1.0 and got.runner_up == best_other and got.runner_up_chosen == 0
    assert "(never chosen)" in got.text()
    with pytest.raises(ValueError, match="resamples"):
        stability(lat, choose, sel, resamples=0)


def test_find_r_retimes_n_star_and_prints_logs_and_plots_the_stability(tmp_path):
    from conftest import image_loader

    from pomt.offline.finder import SearchConfig, find_r
    from pomt.plots import plot_profiles

    model = make_tiny_vit()
    config = SearchConfig(
        grid=(3, 5, 9, 13, 17), min_run_time=0.01, warmup=1, verify=False, accuracy_samples=16
    )
    lines: list[str] = []
    found = find_r(
        model,
        image_loader(),
        target=Target(batch_size=2),
        layer=1,
        search=config,
        console=Console(progress=False, log=lines.append),
    )
    sel = found.selection
    assert sel.stability is not None and 0 < sel.stability <= 1 and sel.stability_resamples == 100
    assert any(line == f"stability: {sel.stability_line}" for line in lines)
    assert sel.stability_line in sel.summary()
    if sel.n_star != sel.n_total:  # L(n*) was timed again after the choice
        assert sel.retimed_latency_ms > 0 and sel.retimed_speedup > 0
    again = pomt.Selection.from_dict(sel.to_dict())
    assert again.stability_line == sel.stability_line
    fig = plot_profiles(found.latency, found.accuracy, sel)
    assert sel.stability_line in [ax.get_title() for ax in fig.axes]
    off = find_r(model, image_loader(), target=Target(batch_size=2), layer=1, search=SearchConfig(**(config.to_dict() | {"stability_resamples": 0})), reuse=Reuse(previous=found), console=Console(progress=False, log=lines.append))  # fmt: skip
    assert off.selection.stability is None and "resamples" not in off.selection.summary()
    with pytest.raises(ValueError, match="stability_resamples"):
        SearchConfig(stability_resamples=-1)


def test_the_replay_rebuilds_five_samples_exactly_from_their_stored_percentiles():
    from benchmarks.selection_replay import five_rounds

    values = [9.7, 10.1, 10.2, 10.4, 13.0]
    point = LatencyPoint.from_stats(50, TimingStats.from_samples(values[::-1]))
    stored = {k: v for k, v in point.to_dict().items()} | {"n": 50}  # what an older file kept
    assert five_rounds(stored) == pytest.approx(values)
    stored["mean_ms"] += 0.5
    with pytest.raises(ValueError, match="n=50"):
        five_rounds(stored)


def spread_samples(level: float, repeats: int) -> TimingStats:
    """5 samples at level * (1 +- 3 %), ``repeats`` times over: IQR 3 % of the level, at any count."""
    return TimingStats.from_samples([level * (1 + d) for d in (-0.03, -0.015, 0.0, 0.015, 0.03)] * repeats)


def test_a_tie_on_a_gentle_rise_is_broken_by_timing_its_points_longer():
    # n = 93 and 100 differ by 1.4 %, well within their 3 % IQRs: at the profile's usual count they
    # are one level and 100 borrows 93's speed; timed 16 times as long (a median 4 times as precise)
    # they are two levels, each point its own latency
    rise = {2: 5.0, 30: 7.0, 60: 8.5, 93: 10.0, 100: 10.14, 130: 11.5, 160: 12.5, 197: 14.0}
    usual = {n: spread_samples(v, 1) for n, v in rise.items()}
    acc = {n: 0.8 * (1 - math.exp(-(n - 1) / 35)) for n in rise}
    tied = pomt.select_r(usual, acc, alpha=0.5, n_total=197)
    level = dict(zip(tied.curve_n, tied.curve_latency_ms, strict=True))
    assert level[93] == level[100] < 10.14
    longer = usual | {93: spread_samples(10.0, 16), 100: spread_samples(10.14, 16)}
    untied = pomt.select_r(longer, acc, alpha=0.5, n_total=197)
    level = dict(zip(untied.curve_n, untied.curve_latency_ms, strict=True))
    assert level[93] == pytest.approx(10.0) and level[100] == pytest.approx(10.14)
    tolerance = pomt.offline.curves.tie_tolerances(longer)
    assert tolerance[2] == pytest.approx(usual[2].iqr_ms) and tolerance[100] == pytest.approx(
        usual[100].iqr_ms / 4
    )


def test_a_bad_retime_tolerance_is_refused():
    measured = {n: spread_samples(10.0 + n / 20, 1) for n in (2, 30, 65)}
    with pytest.raises(ValueError, match="tolerance must be a fraction"):
        retime(lambda n: measured[n], measured, ACC, tolerance=1.5)
    with pytest.raises(ValueError, match="retime_tolerance"):
        SearchConfig(retime_tolerance=-0.1)


def test_between_timings_pools_the_spread_of_each_points_timings():
    # n = 10 timed 3 times (medians 1, e, e^2 in log: 0, 1, 2), n = 20 twice (medians e^0.5, e^1.5),
    # n = 30 once (no spread of its own)
    groups = {
        10: [[1.0] * 3, [math.e] * 5, [math.e**2] * 4],
        20: [[math.e**0.5] * 2, [math.e**1.5] * 2],
        30: [[7.0]],
    }
    measured = {n: TimingStats.from_samples([v for g in gs for v in g]) for n, gs in groups.items()}
    sizes = {n: [len(g) for g in gs] for n, gs in groups.items()}
    spread, df = pomt.offline.grid.between_timings(measured, sizes)
    assert df == 3  # (3 - 1) + (2 - 1)
    assert spread == pytest.approx((1 + 0 + 1 + 0.25 + 0.25) / 3)
    assert pomt.offline.grid.between_timings(measured, {n: s[:1] for n, s in sizes.items()}) == (0.0, 0)


def test_timings_that_move_together_are_not_taken_for_a_decided_leader():
    # every timing's samples agree to 0.1 %: on samples alone the first pass's leader is decided at
    # once. Re-timing first learns how far whole timings move (the leader and its runner-up timed
    # again): where they agree it stops there; where each timing lands up to 2 % off (the
    # machine's moment), the intervals widen to that and re-timing goes on
    true = {n: 10 + 0.1 * n for n in range(2, 66)}

    def run(shift: float) -> list[int]:
        rng = random.Random(4)

        def timing(n: int) -> TimingStats:
            moment = 1 + rng.uniform(-shift, shift)
            return TimingStats.from_samples(
                [true[n] * moment * (1 + rng.uniform(-0.001, 0.001)) for _ in range(7)]
            )

        first = {n: timing(n) for n in sorted({*range(2, 66, 2), 65})}
        pool = {n: list(s.values_ms) for n, s in first.items()}

        def measure(n: int) -> TimingStats:  # every timing of n so far, pooled (as the profiler's timers do)
            pool.setdefault(n, []).extend(timing(n).values_ms)
            return TimingStats.from_samples(pool[n])

        return retime(measure, dict(first), ACC, alpha=0.5, budget=60)

    still = run(0.0)
    assert len(still) == pomt.offline.grid.MIN_TIMING_DF and len(set(still)) == 2
    assert len(run(0.02)) > 2 * pomt.offline.grid.MIN_TIMING_DF


def test_the_stability_line_says_when_the_runner_up_is_better_on_the_profile():
    # verification can reject the utility's argmax and keep a smaller R: the runner-up's utility
    # is then above n*'s, and the line must not read "within -3.4 %"
    assert stability_text(81, 0.93, 200, 96, 0.05, 0.002) == (
        "n* = 81 (chosen in 93 % of 200 resamples; runner-up n = 96, utility within 0.2 %)"
    )
    assert stability_text(34, 0.24, 100, 41, 0.5, -0.034) == (
        "n* = 34 (chosen in 24 % of 100 resamples; runner-up n = 41, utility 3.4 % above n*'s)"
    )
