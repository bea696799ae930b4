"""Four ``find_r`` runs in a row per setup: which R each chooses, how good each is on one common
measurement, and how stable each run says its choice is.

DeiT-S with random weights (latency does not depend on the weights), one thread, the default
search (fast search guided by A, re-timing pass, stability over 100 resamples), verification
off (to fit the time of a shared machine; it times R, it does not choose it). Accuracy: a FIXED
SYNTHETIC smooth A(n) (``selection_speed.synthetic_accuracy``, saved as this model's accuracy
profile), because random weights have no accuracy to estimate: the same A(n) for every run.

After the four runs of a setup, one judge times every n* chosen against N, call by call:
``--judge-rounds`` rounds, each timing every n* once (as a profile point is timed: 3 warm-up
pairs, then 0.2 s and at least 5 pairs) in a seeded random order, so that the machine's slow
changes spread over all of them alike. Each run's utility (U at alpha 0.5, normalised by L(N)
and A(N)) is read from the pooled median ratio L(n*)/L(N), with the 95 % interval of that
median: a spread of the four below the intervals' width is not resolved by the judge.
``--judge SETUP N...`` judges given n* only (e.g. those of an earlier run).

    python benchmarks/find_r_runs.py --setups torch:1 openvino:1 torch:4 openvino:4
    python benchmarks/find_r_runs.py --judge openvino:1 87 82 75 78 --judge-rounds 48
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.selection_speed import synthetic_accuracy  # noqa: E402
from benchmarks.timing_spread import round_robin  # noqa: E402
from pomt import Console, Reuse, Target, Timing  # noqa: E402
from pomt.models import token_layout  # noqa: E402
from pomt.offline.curves import interpolate, isotonic_increasing  # noqa: E402
from pomt.offline.finder import SearchConfig, find_r  # noqa: E402
from pomt.offline.grid import full_grid  # noqa: E402
from pomt.offline.profiles import AccuracyPoint, AccuracyProfile  # noqa: E402
from pomt.offline.profiling import profile_latency  # noqa: E402
from pomt.offline.selection import utility  # noqa: E402
from pomt.timing import median_interval  # noqa: E402
from pomt.weights import create_model, weights_fingerprint  # noqa: E402


def load() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def judge(
    model: torch.nn.Module, target: Target, ns: list[int], rounds: int
) -> dict[int, tuple[float, float, float]]:
    """n -> (median, low, high) of L(n)/L(N) over ``rounds`` round-robin timings of every n."""
    timings = round_robin(model, target, ns, rounds, seed=1)
    return {n: median_interval([r for ratios in timings[n] for r in ratios]) for n in ns}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setups", nargs="+", default=["torch:1", "openvino:1", "torch:4", "openvino:4"])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument(
        "--judge-rounds", type=int, default=40, help="round-robin timings of every n* when judging"
    )
    parser.add_argument(
        "--judge", nargs="+", default=None, metavar="X", help="SETUP N...: only judge these n*"
    )
    parser.add_argument("--full-grid", action="store_true", help="judge on every n, not only the chosen ones")
    parser.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="SETUP:N,N",
        help="judge these n beside a setup's choices (e.g. an earlier version's: torch:1:106,85)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write the rows (JSON) and each run's latency profile under this file stem",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224", pretrained=False).eval()
    layout = token_layout(model)
    acc = synthetic_accuracy(layout.n_total, layout.prefix)
    acc_path = Path(f"/tmp/find_r_runs_accuracy_{os.getpid()}.json")
    AccuracyProfile(
        model="deit_small_patch16_224", device="synthetic", img_size=(224, 224), n_total=layout.n_total,
        prefix=layout.prefix, num_samples=0, num_classes=1000, seed=0, class_balanced=False,
        dataset="FIXED SYNTHETIC smooth A(n)", weights=weights_fingerprint(model),
        points=[AccuracyPoint(n=n, accuracy=a, samples=1) for n, a in sorted(acc.items())],
    ).save(acc_path)  # fmt: skip
    a_max, xs = max(acc.values()), sorted(acc)

    def judged(runtime: str, batch: str, ns: list[int]) -> dict[int, tuple[float, float, float]]:
        """n -> U(n) with the interval from the judge's ratio interval (a higher ratio: a lower U)."""
        t0 = time.time()
        found = judge(model, Target(batch_size=int(batch), runtime=runtime), ns, args.judge_rounds)
        a = {n: interpolate(xs, [acc[x] for x in xs], n) for n in ns}
        out = {n: tuple(utility(q, a[n], args.alpha, 1.0, a_max) for q in found[n]) for n in ns}
        print(f"judge ({runtime} batch {batch}, {args.judge_rounds} rounds, {time.time() - t0:.0f} s, load {load()}): "
              + ", ".join(f"n={n}: L/L(N) {found[n][0]:.4f} [{found[n][1]:.4f}, {found[n][2]:.4f}], "
                          f"U {out[n][0]:.4f} [{out[n][2]:.4f}, {out[n][1]:.4f}]" for n in ns), flush=True)  # fmt: skip
        return out

    if args.judge:
        runtime, batch = args.judge[0].split(":")
        u = judged(runtime, batch, [int(n) for n in args.judge[1:]])
        best = max(v[0] for v in u.values())
        print(" ".join(f"n={n}: gap {100 * (best - v[0]) / best:.2f} % (+-{50 * (v[1] - v[2]) / best:.2f})" for n, v in u.items()))  # fmt: skip
        return 0
    config = SearchConfig(alpha=args.alpha, verify=False)
    rows = []
    print("| setup | run | R | n* | stability (as the run reports it) | U (judge) | gap to best of the runs (+- judge) "
          "| U, full grid (isotonic) | gap to the grid's best | predicted / re-timed at n* | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def utilities(lat: dict[int, float], ns: list[int]) -> dict[int, float]:
        return {n: utility(lat[n], interpolate(xs, [acc[x] for x in xs], n), args.alpha, lat[layout.n_total], a_max)
                for n in ns}  # fmt: skip

    for setup in args.setups:
        runtime, batch = setup.split(":")
        target = Target(batch_size=int(batch), runtime=runtime)
        runs = []
        for _ in range(args.runs):
            t0, before = time.time(), load()
            found = find_r(model, None, target=target, search=config, reuse=Reuse(accuracy_path=acc_path), console=Console(progress=False, log=lambda _line: None))  # fmt: skip
            runs.append((found, before, load(), time.time() - t0))
            if args.out:  # every run's profile, with each point's samples: what it timed and how often
                found.latency.save(Path(f"{args.out}_{runtime}_b{batch}_run{len(runs)}.json"))
            sel = found.selection
            print(f"  {setup} run {len(runs)}: R={sel.r} n*={sel.n_star} {sel.stability_line} "
                  f"({runs[-1][3]:.0f} s, load {before} -> {runs[-1][2]})", flush=True)  # fmt: skip
        chosen = sorted({f.selection.n_star for f, *_ in runs}, reverse=True)
        also = [
            int(n) for a in args.also if a.rsplit(":", 1)[0] == setup for n in a.rsplit(":", 1)[1].split(",")
        ]
        judgement = judged(runtime, batch, sorted(set(chosen) | set(also), reverse=True))
        u = {n: v[0] for n, v in judgement.items()}
        best = max(u[n] for n in chosen)  # the runs' own best: their spread is what is judged
        if also:
            print("also judged (gap to the runs' best): " + ", ".join(
                f"n={n}: {100 * (best - u[n]) / best:+.2f} % (+-{50 * (judgement[n][1] - judgement[n][2]) / best:.2f})"
                for n in sorted(set(also) - set(chosen))), flush=True)  # fmt: skip
        iso, grid_best = {}, None
        if args.full_grid:  # context: the whole curve at 1 s per point, made monotone in n
            grid = full_grid(layout.prefix + 1, layout.n_total)
            grid_profile = profile_latency(model, target=target, progress=False, search=SearchConfig(grid=random.Random(0).sample(grid, len(grid))), timing=Timing(min_run_time=1.0))  # fmt: skip
            if args.out:
                grid_profile.save(Path(f"{args.out}_{runtime}_b{batch}_full_grid.json"))
            ns = sorted(grid_profile.latency_ms)
            fitted = dict(zip(ns, isotonic_increasing([grid_profile.latency_ms[n] for n in ns]), strict=True))
            iso = utilities(fitted, ns)
            grid_best = max(iso, key=iso.get)
        for i, (found, before, after, seconds) in enumerate(runs, 1):
            sel, n = found.selection, found.selection.n_star
            gap = 100 * (best - u[n]) / best
            width = 100 * (judgement[n][1] - judgement[n][2]) / 2 / best
            row = dict(setup=f"{runtime} batch {batch}", precision=found.latency.precision, run=i, r=sel.r, n_star=n,
                       stability=sel.stability_line, utility=u[n], gap_pct=gap, judge_half_width_pct=width,
                       utility_full_grid=iso.get(n), gap_full_grid_pct=None if not iso else 100 * (iso[grid_best] - iso[n]) / iso[grid_best],
                       predicted_speedup=sel.speedup, retimed_speedup=sel.retimed_speedup,
                       load=f"{before} -> {after}", seconds=seconds, points=len(found.latency.points),
                       sampling=found.latency.sampling)  # fmt: skip
            rows.append(row)
            grid_cols = "| - | -" if not iso else f"| {iso[n]:.4f} | {row['gap_full_grid_pct']:.2f} %"
            retimed = "-" if sel.retimed_speedup is None else f"x{sel.retimed_speedup:.3f}"
            print(f"| {row['setup']} ({row['precision']}) | {i} | {sel.r} | {n} | {sel.stability_line} "
                  f"| {u[n]:.4f} | {gap:.2f} % (+-{width:.2f}) {grid_cols} | x{sel.speedup or 0:.3f} / {retimed} | {row['load']} |", flush=True)  # fmt: skip
        if iso:
            print(f"full grid, isotonic: best n = {grid_best} (U = {iso[grid_best]:.4f})", flush=True)
        print(flush=True)
        if args.out:
            Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
