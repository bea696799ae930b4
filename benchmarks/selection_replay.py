"""Does the fast search choose as well as the full grid under the machine's own noise?

Replays measured full-grid latency profiles whose points keep their rounds (every sample,
``values_ms``, stored in ``benchmarks/results/replay/``). For each of ``--resamples``
bootstrap draws, every point's samples are drawn again with replacement: the full grid
chooses n* on that draw, and the fast search (``pomt.offline.grid.adaptive_grid`` guided by A,
then ``pomt.offline.grid.retime``) runs on the same draw, a point timed again getting a fresh draw
of its rounds. Both choices are judged on the deterministic curve (the stored medians, the
authors' raw argmax): gap = (max U - U(n*)) / max U, in %. The fast search is held to no
more than 0.5 points above the full grid's gap at the median and at p90 on every curve (exit
status 1 otherwise). ``--retime 0`` shows the search without its re-timing pass.

Accuracy: a FIXED SYNTHETIC smooth A(n) (as in ``selection_speed.py``: random weights have no
accuracy), alpha = 0.5.

    python benchmarks/selection_replay.py                 # every curve in benchmarks/results/replay
    python benchmarks/selection_replay.py --prepare-sawtooth   # (re)build the sawtooth's rounds, see below

The sawtooth (OpenVINO bf16 on an AMX Xeon, batch 1, one thread: the repository's
``deploy_runtimes_openvino_full_grid_quiet.json``) was stored before points kept their
samples. Each of its points holds 5 samples summarised by p10/p25/p50/p75/p90 with linear
interpolation, which determines the 5 samples exactly (x2, x3, x4 are p25, p50, p75; x1 and x5
follow from p10 and p90; the stored mean checks them). Its N point holds 980 samples, rebuilt
as 980 quantiles of the same piecewise-linear distribution (exact at p10-p90, not beyond).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.selection_speed import synthetic_accuracy  # noqa: E402
from pomt.offline.config import SearchConfig  # noqa: E402
from pomt.offline.grid import adaptive_grid, known_period, pooled, retime  # noqa: E402
from pomt.offline.profiles import LatencyProfile, SearchedPoints  # noqa: E402
from pomt.offline.selection import select_r  # noqa: E402
from pomt.timing import TimingStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPLAY = RESULTS / "replay"
SAWTOOTH_SOURCE = RESULTS / "deploy_runtimes_openvino_full_grid_quiet.json"
SAWTOOTH = REPLAY / "openvino_bf16_b1_amx_quiet.json"
BOUND = 0.5  # points of %: the fast search may be this much worse than the full grid


def five_rounds(p: dict) -> list[float]:
    """The 5 samples behind a 5-sample summary (linear-interpolated percentiles)."""
    x2, x3, x4 = p["p25_ms"], p["median_ms"], p["p75_ms"]
    x1, x5 = (p["p10_ms"] - 0.4 * x2) / 0.6, (p["p90_ms"] - 0.4 * x4) / 0.6
    values = [x1, x2, x3, x4, x5]
    if abs(statistics.fmean(values) - p["mean_ms"]) > 1e-6 * p["mean_ms"]:
        raise ValueError(f"n={p['n']}: the rebuilt samples do not give the stored mean")
    return values


def quantile_rounds(p: dict) -> list[float]:
    """``samples`` values spread like the stored percentiles (linear between them, the tails
    continued with the p10-p25 and p75-p90 slopes)."""
    k = p["samples"]
    qs = [(0.10, p["p10_ms"]), (0.25, p["p25_ms"]), (0.5, p["median_ms"]), (0.75, p["p75_ms"])]
    qs.append((0.90, p["p90_ms"]))
    lo_slope = (qs[1][1] - qs[0][1]) / 0.15
    hi_slope = (qs[4][1] - qs[3][1]) / 0.15
    qs = [(0.0, qs[0][1] - 0.10 * lo_slope), *qs, (1.0, qs[4][1] + 0.10 * hi_slope)]
    out = []
    for i in range(k):
        q = (i + 0.5) / k
        j = next(j for j in range(1, len(qs)) if q <= qs[j][0])
        (q0, v0), (q1, v1) = qs[j - 1], qs[j]
        out.append(v0 + (v1 - v0) * (q - q0) / (q1 - q0))
    return out


def prepare_sawtooth() -> Path:
    data = json.loads(SAWTOOTH_SOURCE.read_text())
    for p in data["points"]:
        p["values_ms"] = five_rounds(p) if p["samples"] == 5 else quantile_rounds(p)
    data["sampling"] = data.pop("search", data.get("sampling", "grid"))
    REPLAY.mkdir(parents=True, exist_ok=True)
    SAWTOOTH.write_text(json.dumps(data, indent=1) + "\n")
    return SAWTOOTH


def draw(values: tuple[float, ...], rng: random.Random) -> TimingStats:
    return TimingStats.from_samples([values[rng.randrange(len(values))] for _ in values])


def replay(lat: LatencyProfile, acc: dict[int, float], resamples: int, budget: int, alpha: float) -> dict:
    lo, hi = lat.prefix + 1, lat.n_total
    rounds = {p.n: p.values_ms for p in lat.points}
    missing = [n for n, v in rounds.items() if len(v) < 2]
    if missing:
        raise ValueError(f"points {missing[:5]} keep no samples: measure the curve with this pomt")
    truth = select_r(lat, acc, alpha=alpha, denoise=False)
    u = dict(zip(truth.curve_n, truth.curve_utility, strict=True))
    gaps: dict[str, list[float]] = {"full": [], "fast": [], "full_denoised": []}
    picks: dict[str, list[int]] = {"full": [], "fast": [], "full_denoised": []}
    timed = []
    for b in range(resamples):
        rng = random.Random(b)
        first = {n: draw(v, rng) for n, v in rounds.items()}
        full = select_r(first, acc, alpha=alpha, n_total=hi, denoise=False).n_star  # the authors' argmax
        denoised = select_r(first, acc, alpha=alpha, n_total=hi).n_star  # pomt's choice on the full grid
        calls: list[int] = []

        def measure(n: int, first=first, calls=calls, rng=rng) -> TimingStats:
            calls.append(n)  # the same draw first, a fresh one when timed again
            return first[n] if calls.count(n) == 1 else draw(rounds[n], rng)

        fn = pooled(measure)
        points = adaptive_grid(fn, lo, hi, accuracy=acc, alpha=alpha, period="auto")
        found = known_period(points, "auto")  # what the search detected, as the profile records it
        retime(
            fn,
            points,
            acc,
            alpha=alpha,
            budget=budget,
            tolerance=SearchConfig.retime_tolerance,
            period=found,
        )
        fast = select_r(SearchedPoints.of(points, found), acc, alpha=alpha, n_total=hi).n_star
        timed.append(len(calls))
        for key, n in (("full", full), ("fast", fast), ("full_denoised", denoised)):
            picks[key].append(n)
            gaps[key].append(100 * (truth.utility - u[n]) / truth.utility)
    out = {"truth_n_star": truth.n_star, "timings_mean": statistics.fmean(timed)}
    for key in gaps:
        ordered = sorted(gaps[key])
        out[key] = {
            "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
            "n_star_mode": statistics.mode(picks[key]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument(
        "--retime",
        type=int,
        default=SearchConfig.retime_points,
        help="re-timing budget (points) of the fast search",
    )
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--prepare-sawtooth", action="store_true")
    parser.add_argument(
        "curves", nargs="*", help="profiles to replay (default: every JSON in results/replay)"
    )
    args = parser.parse_args(argv)
    if args.prepare_sawtooth:
        print(f"wrote {prepare_sawtooth()}")
        return 0
    paths = [Path(p) for p in args.curves] or sorted(REPLAY.glob("*.json"))
    print(
        f"{args.resamples} bootstrap resamples per curve; fast search = guided adaptive search + re-timing "
        f"budget {args.retime}; gap = (max U - U(n*)) / max U on the stored medians, %; alpha={args.alpha}; "
        "A(n): FIXED SYNTHETIC"
    )
    print(
        "| curve | where measured | n* (stored medians) | fast search: median / p90 gap "
        "| full grid (raw argmax): median / p90 | full grid, pomt's denoised choice | fast: timings |"
    )
    print("|---|---|---|---|---|---|---|")
    failed = []
    for path in paths:
        lat = LatencyProfile.load(path)
        acc = synthetic_accuracy(lat.n_total, lat.prefix)
        r = replay(lat, acc, args.resamples, args.retime, args.alpha)
        where = f"{lat.device}, {lat.precision}, batch {lat.batch_size}, {lat.threads} thread(s)"
        fast, full, den = r["fast"], r["full"], r["full_denoised"]
        print(
            f"| {path.stem} | {where} | {r['truth_n_star']} | {fast['median']:.2f} % / {fast['p90']:.2f} % "
            f"| {full['median']:.2f} % / {full['p90']:.2f} % | {den['median']:.2f} % / {den['p90']:.2f} % "
            f"| {r['timings_mean']:.1f} (grid: {len(lat.points)}) |",
            flush=True,
        )
        for q in ("median", "p90"):
            if fast[q] > full[q] + BOUND:
                failed.append(
                    f"{path.stem}: fast {q} gap {fast[q]:.2f} % > full grid's {full[q]:.2f} % + {BOUND}"
                )
    for line in failed:
        print("FAIL", line)
    print("PASS: the fast search is within 0.5 points of the full grid on every curve" if not failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
