"""How much faster is our default R search than the authors' full grid, and how good is its R?

Runs, in one process and with the same per-point timer settings (``warmup``,
``min_run_time``): the authors' full grid (every n from N down to p + 1, plus N itself)
(measured in a seeded random order, so that drift of the machine cannot fake steps) and our
default search (coarse grid + refinement guided by the accuracy profile; the latency-only
variant is shown too). The model is DeiT-S with random weights (latency does
not depend on the weights) at batch size 4 on this CPU.

Accuracy: a FIXED SYNTHETIC smooth A(n) = A_N (1 - exp(-(n - p)/tau)) / (1 - exp(-(N - p)/tau)),
A_N = 0.798 (DeiT-S top-1), tau = N / 5, sampled on a 16-point grid as ``estimate_accuracy``
would be, because random weights have no accuracy to measure.

The last line is ``time_ratio=X.XXX utility_gap=Y.YYYY``: our search's wall time over the
full grid's, and how far the utility of our n* on the full grid's curve (the raw medians,
as the authors use them) is below that curve's optimum, as a fraction of the optimum.
Targets: <= 0.10 and <= 0.01. The table also shows the gap on the denoised full-grid curve.
``--repeat-full`` times the full grid twice: the second full grid's gap on the first is what
the machine's run-to-run drift alone costs, the floor below which no search can be judged.

    PYTHONPATH=. python benchmarks/selection_speed.py            # DeiT-S, minutes on a 2-core CPU
    PYTHONPATH=. python benchmarks/selection_speed.py --quick    # smaller run, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pomt import SearchConfig, Target, Timing  # noqa: E402
from pomt.models import token_layout  # noqa: E402
from pomt.offline.grid import coarse_grid, full_grid  # noqa: E402
from pomt.offline.profiling import profile_latency  # noqa: E402
from pomt.offline.selection import select_r  # noqa: E402
from pomt.weights import create_model  # noqa: E402


def synthetic_accuracy(n_total: int, prefix: int, top1: float = 0.798, points: int = 16) -> dict[int, float]:
    """A smooth, saturating A(n) on the grid ``estimate_accuracy`` uses by default."""
    tau = n_total / 5
    norm = 1 - math.exp(-(n_total - prefix) / tau)
    return {
        n: top1 * (1 - math.exp(-(n - prefix) / tau)) / norm for n in coarse_grid(prefix + 1, n_total, points)
    }


def shuffled(grid: list[int], seed: int = 0) -> list[int]:
    """The grid in a seeded random order: slow drift of a shared machine during the long
    full-grid run then shows as noise, not as fake steps in n."""
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(seed)).tolist()
    return [grid[i] for i in order]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="DeiT-Ti at 112 px, short timings: under a minute"
    )
    parser.add_argument("--model", default=None, help="timm model (default deit_small_patch16_224)")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (CUDA only)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per point (default 3; quick 1)"
    )
    parser.add_argument(
        "--min-run-time", type=float, default=None, help="s per point (default 0.5; quick 0.05)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--relative",
        action="store_true",
        help="time every point call by call against the unpruned model (profile_latency(relative=True))",
    )
    parser.add_argument(
        "--repeat-full",
        action="store_true",
        help="time the full grid a second time: its gap on the first full grid is the noise floor of the gap",
    )
    parser.add_argument("--output-dir", default=None, help="save the profiles (JSON) and plots (PNG) here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Time the searches, print the table; per search: points, seconds, time_ratio, n_star, r,
    utility_gap, utility_gap_denoised, and (``"profile"``/``"selection"``) what it measured."""

    model_name = args.model or ("deit_tiny_patch16_224" if args.quick else "deit_small_patch16_224")
    img_size = args.img_size or (160 if args.quick else None)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.5)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(model_name, pretrained=False, img_size=img_size).eval()
    layout = token_layout(model)
    n_total, prefix = layout.n_total, layout.prefix
    acc = synthetic_accuracy(n_total, prefix)
    runtime = "cuda_graphs" if args.cuda_graphs else "torch"
    target = Target(runtime=runtime, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    timing = Timing(warmup=warmup, min_run_time=min_run_time, relative=args.relative)
    timer = dict(layer=args.layer, progress=False)
    print(
        f"model={model_name} (random weights) N={n_total} p={prefix} batch={args.batch_size} device={args.device} "
        f"threads={torch.get_num_threads()} warmup={warmup} min_run_time={min_run_time}s alpha={args.alpha}"
        f"{' timing=relative-to-N' if args.relative else ''}"
    )
    print("accuracy: FIXED SYNTHETIC smooth A(n) (no trained weights), 16-point grid, interpolated")

    # one untimed warm-up of the whole process (allocator, kernel selection) so that the
    # run measured first does not pay for it
    warm = Timing(warmup=1, min_run_time=0.0, relative=args.relative)
    profile_latency(model, target, search=SearchConfig(grid=[n_total, prefix + 1]), timing=warm, **timer)
    runs = {}
    plan = [
        ("ours (guided by A)", dict(accuracy=acc, search=SearchConfig(alpha=args.alpha))),
        ("ours (latency only)", {}),
        ("full grid", dict(search=SearchConfig(grid=shuffled(full_grid(prefix + 1, n_total))))),
    ]
    if args.repeat_full:  # the noise floor: how far a second full grid's n* lands on the first's curve
        grid = shuffled(full_grid(prefix + 1, n_total), seed=1)
        plan.append(("full grid, again", dict(search=SearchConfig(grid=grid))))
    for label, kwargs in plan:
        start = time.perf_counter()
        lat = profile_latency(model, target, timing=timing, **timer, **kwargs)
        runs[label] = (lat, time.perf_counter() - start)
        print(f"  {label:<20} {len(lat.points):4d} points in {runs[label][1]:8.1f} s", flush=True)

    full_lat, full_time = runs["full grid"]
    authors = select_r(full_lat, acc, alpha=args.alpha, denoise=False)  # raw medians, argmax
    ours_on_full = select_r(full_lat, acc, alpha=args.alpha)  # our denoised selection on the full grid
    raw_u = dict(zip(authors.curve_n, authors.curve_utility, strict=True))
    denoised_u = dict(zip(ours_on_full.curve_n, ours_on_full.curve_utility, strict=True))

    print()
    print(
        f"{'search':<20} {'points':>6} {'time s':>8} {'ratio':>6} {'n*':>5} {'R':>4} {'gap':>7} {'gap(den)':>8}"
    )
    rows = {}
    for label, (lat, seconds) in runs.items():
        sel = select_r(lat, acc, alpha=args.alpha)
        gap = (authors.utility - raw_u[sel.n_star]) / authors.utility
        gap_denoised = (ours_on_full.utility - denoised_u[sel.n_star]) / ours_on_full.utility
        rows[label] = {"points": len(lat.points), "seconds": seconds, "time_ratio": seconds / full_time}
        rows[label] |= {
            "n_star": sel.n_star,
            "r": sel.r,
            "utility_gap": gap,
            "utility_gap_denoised": gap_denoised,
        }
        rows[label] |= {"profile": lat, "selection": sel}
        print(
            f"{label:<20} {len(lat.points):6d} {seconds:8.1f} {seconds / full_time:6.3f} {sel.n_star:5d} {sel.r:4d} "
            f"{gap:7.4f} {gap_denoised:8.4f}"
        )
    print(
        f"full grid raw argmax (authors): n*={authors.n_star} R={authors.r}; gap = (max U - U(n*)) / max U on the "
        "full grid's raw utility curve; gap(den) = the same on its denoised curve"
    )
    if args.output_dir:
        from pomt.plots import plot_profiles, save_figure

        out = Path(args.output_dir)
        for label, (lat, _) in runs.items():
            stem = label.split(" (")[0].replace(",", "").replace(" ", "_") + (
                "_guided" if "guided" in label else ""
            )
            stem += "_latency_only" if "latency only" in label else ""
            lat.save(out / f"selection_speed_{stem}.json")
            save_figure(plot_profiles(lat, acc, alpha=args.alpha), out / f"selection_speed_{stem}.png")
        numbers = {
            label: {k: v for k, v in row.items() if k not in ("profile", "selection")}
            for label, row in rows.items()
        }
        (out / "selection_speed.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
        print(f"profiles and plots saved under {out}")
    ours = rows["ours (guided by A)"]
    print(f"time_ratio={ours['time_ratio']:.3f} utility_gap={ours['utility_gap']:.4f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
