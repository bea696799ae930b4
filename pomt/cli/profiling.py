"""``pomt profile-latency`` and ``pomt estimate-accuracy``: measure L(n) and A(n), save them as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from pomt.cli.common import add_model_args, build_model, command_parser, save_plot, save_profile, token_list
from pomt.deploy.targets import RUNTIMES
from pomt.timing import MIN_RUN_TIME

__all__ = ["latency_parser", "profile_latency", "accuracy_parser", "estimate_accuracy"]


def latency_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = command_parser(
        "pomt-profile-latency",
        "Measure the latency profile L(n) of a ViT pruned with POMT on this device and save it as JSON. "
        "Run it on the deployment device (e.g. the Jetson) with the deployment batch size and dtype; "
        "weights do not matter for latency, so random weights are fine.",
        parser,
    )
    add_model_args(parser)
    parser.add_argument("--output", "-o", required=True, help="where to write the JSON profile")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("--layer", type=int, default=3, help="block where POMT prunes (0-based)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument(
        "--grid", "--tokens", type=token_list, help="the token counts n to time, e.g. '2,10,50-60,197'"
    )
    grid.add_argument("--full-grid", action="store_true", help="time every n from N down to p+1 (slow)")
    parser.add_argument(
        "--accuracy", help="accuracy profile (JSON) to guide the fast search towards n* at --alpha (optional)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="utility weight used with --accuracy")
    parser.add_argument("--coarse-points", type=int, default=9, help="coarse grid size of the fast search")
    parser.add_argument(
        "--max-points", type=int, help="point budget of the fast search (default 9%% of the grid)"
    )
    period = lambda v: v if v == "auto" else (None if v == "none" else int(v))  # noqa: E731
    parser.add_argument("--period", default="auto", type=period, help="sawtooth period: 16, auto, none")
    parser.add_argument(
        "--runtime", choices=list(RUNTIMES), default="torch", help="what runs the model (docs/deploy.md)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per point")
    parser.add_argument(
        "--min-run-time", type=float, default=MIN_RUN_TIME, help="seconds of timed calls per point"
    )
    parser.add_argument("--repeats", type=int, help="fixed number of timed calls per point instead")
    parser.add_argument(
        "--relative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time each n call by call against the unpruned model, so a drifting machine draws no fake "
        "steps (default: on the CPU, not on CUDA)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads (torch.set_num_threads); recorded in the profile"
    )
    parser.add_argument("--plot", help="also save a PNG of L(n)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def profile_latency(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from pomt.deploy.targets import Target
    from pomt.offline.config import SearchConfig
    from pomt.offline.grid import full_grid
    from pomt.offline.profiles import AccuracyProfile
    from pomt.offline.profiling import profile_latency
    from pomt.timing import Timing

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    accuracy = AccuracyProfile.load(args.accuracy) if args.accuracy else None
    grid = args.grid
    if args.full_grid:
        from pomt.models import token_layout

        layout = token_layout(model, args.img_size)
        grid = full_grid(layout.prefix + 1, layout.n_total)
    search = SearchConfig(
        grid=grid, alpha=args.alpha, coarse_points=args.coarse_points, max_points=args.max_points,
        period=args.period,
    )  # fmt: skip
    timing = Timing(
        warmup=args.warmup, min_run_time=args.min_run_time, repeats=args.repeats, relative=args.relative
    )
    target = Target(
        runtime=args.runtime, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        img_size=args.img_size,
    )  # fmt: skip
    lat = profile_latency(
        model, target, layer=args.layer, search=search, timing=timing, accuracy=accuracy,
        progress=not args.no_progress,
    )  # fmt: skip
    lat = dataclasses.replace(lat, model=args.model)
    what = f"{len(lat.points)} points, {lat.device}, batch {lat.batch_size}, POMT block: {lat.kernels} path"
    save_profile(lat, args.output, what, lambda p: f"median={p.median_ms:10.3f} ms  IQR={p.iqr_ms:8.3f} ms")
    if args.plot:
        from pomt.plots import plot_latency

        save_plot(plot_latency(lat), args.plot)
    return 0


# --------------------------------------------------------------------------- accuracy


def accuracy_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = command_parser(
        "pomt-estimate-accuracy",
        "Estimate the accuracy profile A(n) (top-1 with n random tokens kept after the embedding) on a "
        "seeded, class-balanced sample of an image folder, and save it as JSON. Accuracy does not depend "
        "on the device, so run it wherever it is fast (a server), with the real weights.",
        parser,
    )
    add_model_args(parser)
    parser.add_argument(
        "--data", required=True, help="image folder: one subfolder per class (ImageFolder layout)"
    )
    parser.add_argument("--output", "-o", required=True, help="where to write the JSON profile")
    parser.add_argument(
        "--class-map",
        choices=("auto", "folder", "imagenet"),
        default="auto",
        help="label of a class folder: its sorted position (folder), its ImageNet-1k index by wnid "
        "(imagenet), or imagenet when every folder is a wnid and the model has 1000 classes (auto)",
    )
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--grid", "--tokens", type=token_list, help="the token counts n (default: --points evenly spread)"
    )
    parser.add_argument(
        "--points", type=int, default=16, help="number of token counts when --grid is not given"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data loading workers")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def estimate_accuracy(args: argparse.Namespace) -> int:
    import dataclasses

    from pomt.data import image_folder
    from pomt.offline.config import SearchConfig
    from pomt.offline.profiling import estimate_accuracy

    model = build_model(args)
    dataset = image_folder(args.data, model, args.class_map)
    search = SearchConfig(
        accuracy_samples=args.num_samples, accuracy_grid=args.grid, accuracy_batch_size=args.batch_size,
        accuracy_points=args.points, accuracy_workers=args.num_workers, seed=args.seed,
    )  # fmt: skip
    acc = estimate_accuracy(
        model, dataset, search=search, device=args.device, progress=not args.no_progress,
        dataset=str(Path(args.data).resolve()),
    )  # fmt: skip
    acc = dataclasses.replace(acc, model=args.model)
    balanced = "class-balanced" if acc.class_balanced else "not class-balanced"
    what = f"{acc.num_samples} images, {balanced}, seed {acc.seed}"
    save_profile(acc, args.output, what, lambda p: f"top-1={p.accuracy:.4f} (± {p.stderr:.4f})")
    return 0
