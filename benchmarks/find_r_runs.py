"""Four ``find_r`` runs in a row per setup: which R each chooses, how good each is on one common
measurement, and how stable each run says its choice is.

DeiT-S with random weights (latency does not depend on the weights), one thread, the default
search (fast search guided by A, re-timing pass, stability over 100 resamples), verification
off (to fit the time of a shared machine; it times R, it does not choose it). Accuracy: a FIXED
SYNTHETIC smooth A(n) (``selection_speed.synthetic_accuracy``, saved as this model's accuracy
profile), because random weights have no accuracy to estimate: the same A(n) for every run.

After the four runs of a setup, one judging profile times N and every n* chosen, together,
in a seeded random order, at 1 s per point: each run's utility is read on it (U at alpha 0.5,
normalised by L(N) and A(N)), so all four are judged on the same measurement.

    python benchmarks/find_r_runs.py --setups torch:1 openvino:1 torch:4 openvino:4
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
from pomt import Console, Reuse, Target, Timing  # noqa: E402
from pomt.models import token_layout  # noqa: E402
from pomt.offline.curves import interpolate  # noqa: E402
from pomt.offline.finder import SearchConfig, find_r  # noqa: E402
from pomt.offline.profiles import AccuracyPoint, AccuracyProfile  # noqa: E402
from pomt.offline.profiling import profile_latency  # noqa: E402
from pomt.offline.selection import utility  # noqa: E402
from pomt.weights import create_model, weights_fingerprint  # noqa: E402


def load() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setups", nargs="+", default=["torch:1", "openvino:1", "torch:4", "openvino:4"])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="append the table and rows (JSON) to this file stem")
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
    config = SearchConfig(alpha=args.alpha, verify=False)
    rows = []
    print(
        "| setup | run | R | n* | stability (as the run reports it) | U on the judging profile | gap to best of 4 | load |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for setup in args.setups:
        runtime, batch = setup.split(":")
        batch = int(batch)
        runs = []
        for _ in range(args.runs):
            t0, before = time.time(), load()
            found = find_r(model, None, target=Target(batch_size=batch, runtime=runtime), search=config, reuse=Reuse(accuracy_path=acc_path), console=Console(progress=False, log=lambda _line: None))  # fmt: skip
            runs.append((found, before, load(), time.time() - t0))
            sel = found.selection
            print(f"  {setup} run {len(runs)}: R={sel.r} n*={sel.n_star} {sel.stability_line} "
                  f"({runs[-1][3]:.0f} s, load {before} -> {runs[-1][2]})", flush=True)  # fmt: skip
        chosen = sorted({f.selection.n_star for f, *_ in runs} | {layout.n_total}, reverse=True)
        order = random.Random(0).sample(chosen, len(chosen))
        judge = profile_latency(model, target=Target(batch_size=batch, runtime=runtime), progress=False, search=SearchConfig(grid=order), timing=Timing(min_run_time=1.0))  # fmt: skip
        lat = judge.latency_ms
        a_max = max(acc.values())
        xs = sorted(acc)
        u = {
            n: utility(
                lat[n], interpolate(xs, [acc[x] for x in xs], n), args.alpha, lat[layout.n_total], a_max
            )
            for n in chosen
        }
        best = max(u[f.selection.n_star] for f, *_ in runs)
        for i, (found, before, after, seconds) in enumerate(runs, 1):
            sel = found.selection
            gap = 100 * (best - u[sel.n_star]) / best
            row = dict(setup=f"{runtime} batch {batch}", run=i, r=sel.r, n_star=sel.n_star,
                       stability=sel.stability_line, utility=u[sel.n_star], gap_pct=gap, load=f"{before} -> {after}",
                       seconds=seconds, precision=found.latency.precision, points=len(found.latency.points),
                       sampling=found.latency.sampling, retimed_speedup=sel.retimed_speedup,
                       predicted_speedup=sel.speedup)  # fmt: skip
            rows.append(row)
            print(f"| {row['setup']} ({row['precision']}) | {i} | {sel.r} | {sel.n_star} | {sel.stability_line} "
                  f"| {u[sel.n_star]:.4f} | {gap:.2f} % | {row['load']} |", flush=True)  # fmt: skip
        print(f"judging profile ({judge.precision}, {judge.device}, 1 s per point, load {load()}): "
              + ", ".join(f"L({n})={lat[n]:.2f} ms" for n in chosen), flush=True)  # fmt: skip
        if args.out:
            Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
