"""Command-line tools for the offline step of POMT.

Four commands, each with ``--help``: ``pomt <command> ...`` (also ``python -m pomt.cli
<command> ...``), each installed as its own console script too:

- ``pomt-profile-latency``: time L(n) of a timm ViT on this device and save a JSON profile;
- ``pomt-estimate-accuracy``: estimate A(n) on an image folder and save a JSON profile;
- ``pomt-select-r``: combine saved profiles (possibly from different machines), print R;
- ``pomt-export``: write a pruned ViT as ONNX (checked in ONNX Runtime) and OpenVINO IR.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pomt.deploy.targets import RUNTIMES
from pomt.errors import PomtError, PomtValueError
from pomt.timing import MIN_RUN_TIME

__all__ = ["profile_latency_main", "estimate_accuracy_main", "select_r_main", "export_main", "main", "parser"]


def _token_list(text: str) -> list[int]:
    """'2,10,50-60,197' -> token counts (ranges inclusive)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad token list {text!r}: use e.g. '2,10,50-60,197'") from err
    if not out:
        raise argparse.ArgumentTypeError("empty token list")
    return out


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="timm model name, e.g. deit_small_patch16_224")
    group.add_argument("--weights", help="local weights file (.safetensors or a torch state dict)")
    group.add_argument(
        "--pretrained", action="store_true", help="download timm's pretrained weights (needs network)"
    )
    group.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    group.add_argument("--img-size", type=int, help="input size (default: the model's)")


def _build_model(args: argparse.Namespace):
    from pomt.weights import create_model

    return create_model(
        args.model,
        pretrained=getattr(args, "pretrained", False),
        weights=getattr(args, "weights", None),
        num_classes=args.num_classes,
        img_size=args.img_size,
    ).eval()


def select_device(device: str) -> None:
    """Make ``cuda:N`` the current CUDA device, so that every launch, allocation and timing
    of the command goes to it (not to device 0); other devices need nothing."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise PomtValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...): {err}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PomtValueError(f"--device {device!r}: CUDA is not available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None:
        if parsed.index >= torch.cuda.device_count():
            raise PomtValueError(
                f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        torch.cuda.set_device(parsed)


def _parser(prog: str, description: str, parser: argparse.ArgumentParser | None) -> argparse.ArgumentParser:
    """A command's parser: stand-alone as ``prog`` (its console script), or ``parser`` (``pomt``'s)."""
    if parser is None:
        return argparse.ArgumentParser(prog=prog, description=description)
    parser.description, parser.epilog = description, f"Also installed as {prog}."
    return parser


def _plot(figure: Any, path: str) -> None:
    from pomt.plots import save_figure

    save_figure(figure, path)
    print(f"saved plot to {path}")


def _save(profile, output: str, what: str, point_line: Callable[[Any], str]) -> None:
    """Save ``profile`` at ``output`` and print what it holds, one line per point."""
    path = profile.save(output)
    print(f"saved {profile.kind} profile ({what}) to {path}")
    for point in profile.points:
        print(f"  n={point.n:5d}  {point_line(point)}")


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        if getattr(args, "device", None):
            select_device(args.device)
        return fn(args)
    except (ValueError, FileNotFoundError, PomtError) as err:  # ours; anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- latency


def latency_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = _parser(
        "pomt-profile-latency",
        "Measure the latency profile L(n) of a ViT pruned with POMT on this device and save it as JSON. "
        "Run it on the deployment device (e.g. the Jetson) with the deployment batch size and dtype; "
        "weights do not matter for latency, so random weights are fine.",
        parser,
    )
    _model_args(parser)
    parser.add_argument("--output", "-o", required=True, help="where to write the JSON profile")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("--layer", type=int, default=3, help="block where POMT prunes (0-based)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument(
        "--grid", "--tokens", type=_token_list, help="the token counts n to time, e.g. '2,10,50-60,197'"
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


def _profile_latency(args: argparse.Namespace) -> int:
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
    model = _build_model(args)
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
    _save(lat, args.output, what, lambda p: f"median={p.median_ms:10.3f} ms  IQR={p.iqr_ms:8.3f} ms")
    if args.plot:
        from pomt.plots import plot_latency

        _plot(plot_latency(lat), args.plot)
    return 0


# --------------------------------------------------------------------------- accuracy


def accuracy_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = _parser(
        "pomt-estimate-accuracy",
        "Estimate the accuracy profile A(n) (top-1 with n random tokens kept after the embedding) on a "
        "seeded, class-balanced sample of an image folder, and save it as JSON. Accuracy does not depend "
        "on the device, so run it wherever it is fast (a server), with the real weights.",
        parser,
    )
    _model_args(parser)
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
        "--grid", "--tokens", type=_token_list, help="the token counts n (default: --points evenly spread)"
    )
    parser.add_argument(
        "--points", type=int, default=16, help="number of token counts when --grid is not given"
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data loading workers")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _estimate_accuracy(args: argparse.Namespace) -> int:
    import dataclasses

    from pomt.data import image_folder
    from pomt.offline.config import SearchConfig
    from pomt.offline.profiling import estimate_accuracy

    model = _build_model(args)
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
    _save(acc, args.output, what, lambda p: f"top-1={p.accuracy:.4f} (± {p.stderr:.4f})")
    return 0


# --------------------------------------------------------------------------- selection


def select_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = _parser(
        "pomt-select-r",
        "Choose R (tokens POMT removes) from a saved latency profile and a saved accuracy profile, "
        "which may come from different machines, and print it. Default: maximise the utility "
        "U(n) = alpha (1 - L/max L) + (1 - alpha) A/max A; or the most accurate n under a latency "
        "budget; or the fastest n above an accuracy floor.",
        parser,
    )
    parser.add_argument("--latency", required=True, help="latency profile JSON (pomt-profile-latency)")
    parser.add_argument("--accuracy", required=True, help="accuracy profile JSON (pomt-estimate-accuracy)")
    parser.add_argument("--alpha", type=float, default=0.5, help="latency weight in [0, 1] (default 0.5)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--latency-budget-ms", type=float, help="most accurate n with latency <= this")
    mode.add_argument("--accuracy-floor", type=float, help="fastest n with accuracy >= this fraction (0.75)")
    parser.add_argument("--model", help="reject profiles measured for another model")
    parser.add_argument(
        "--batch-size", type=int, help="reject a latency profile measured at another batch size"
    )
    parser.add_argument("--dtype", help="reject a latency profile measured in another dtype")
    parser.add_argument("--no-denoise", action="store_true", help="use the raw medians (not recommended)")
    parser.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        help="the runtime the latency profile was measured in (pomt profile-latency --runtime); a profile "
        "from another runtime is refused (default: the profile's)",
    )
    check = parser.add_argument_group(
        "verification: with --model, the chosen R is timed against the unpruned model (random weights: "
        "latency does not depend on them) in the profile's runtime, device, batch size, layer and threads"
    )
    check.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    check.add_argument("--img-size", type=int, help="input size (default: the profile's)")
    check.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when --model is given",
    )
    check.add_argument(
        "--verify-max-time",
        type=float,
        default=30.0,
        help="cap on the paired timing per candidate (s): it stops earlier once the interval is decided",
    )
    check.add_argument("--verify-candidates", type=int, default=3, help="candidates tried before R = 0")
    parser.add_argument("--plot", help="save a PNG of L(n), A(n), U(n) with n* marked")
    parser.add_argument("--json", help="write the selection (with its curves) as JSON")
    return parser


def _select_r(args: argparse.Namespace) -> int:
    from pomt.offline.profiles import AccuracyProfile, LatencyProfile, write_json
    from pomt.offline.selection import select_r

    expect_lat = {
        k: v for k, v in (("model", args.model), ("batch_size", args.batch_size), ("dtype", args.dtype)) if v
    }
    if args.runtime:
        expect_lat["runtime"] = args.runtime
    lat = LatencyProfile.load(args.latency, expect=expect_lat)
    acc = AccuracyProfile.load(args.accuracy, expect={"model": args.model} if args.model else None)
    objective = {name: getattr(args, name) for name in ("alpha", "latency_budget_ms", "accuracy_floor")}
    sel = select_r(lat, acc, denoise=not args.no_denoise, **objective)
    kernels = f", POMT block: {lat.kernels} path" if lat.kernels else ""
    print(
        f"latency: {lat.model} on {lat.device}, batch {lat.batch_size}, {lat.dtype}, layer {lat.layer}{kernels}"
    )
    print(f"accuracy: {acc.num_samples} images, seed {acc.seed}")
    if args.verify is None:
        args.verify = bool(args.model)
    if args.verify:
        sel = _verify_selection(sel, lat, args)
    else:
        why = "--no-verify" if args.model else "no --model to time"
        print(f"not verified ({why}): the speed-up below is the profile's prediction only")
    print(sel.summary())
    if args.json:
        write_json(args.json, sel.to_dict())
    if args.plot:
        from pomt.plots import plot_profiles

        _plot(plot_profiles(lat, acc, sel), args.plot)
    print(f"R={sel.r}")
    return 0


def _verify_selection(sel, lat, args: argparse.Namespace):
    """``sel`` timed against the unpruned model as the profile was measured (``pomt.offline.verify_profile``)."""
    from pomt.offline.verify_profile import verify_for_profile

    if not args.model:
        raise PomtValueError(
            "select-r --verify needs --model (the timm model the latency profile was measured for)"
        )
    if args.img_size is None and getattr(lat, "img_size", None):
        args.img_size = lat.img_size[0]
    model = _build_model(args)
    return verify_for_profile(
        sel, model, lat, verify_max_time=args.verify_max_time, candidates=args.verify_candidates, log=print
    )


# --------------------------------------------------------------------------- export


def export_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = _parser(
        "pomt-export",
        "Write a ViT pruned with POMT at --r (or Top-K, ToMe) as ONNX (dynamo exporter, static shapes), "
        "checked in ONNX Runtime against PyTorch, optionally also as OpenVINO IR (docs/deploy.md).",
        parser,
    )
    _model_args(parser)
    parser.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    parser.add_argument("--method", choices=("none", "pomt", "topk", "tome"), default="pomt")
    parser.add_argument("--r", type=int, default=0, help="tokens removed (POMT) or per block (Top-K, ToMe)")
    parser.add_argument("--layer", type=int, default=3, help="block where POMT prunes (0-based)")
    parser.add_argument("--batch-size", type=int, default=1, help="the static batch size of the graph")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |ONNX Runtime - PyTorch|")
    parser.add_argument(
        "--runtime", choices=list(RUNTIMES), default="torch",
        help="the runtime the file is for (openvino: also writes OpenVINO IR, .xml/.bin)",
    )  # fmt: skip
    return parser


def _export(args: argparse.Namespace) -> int:
    from pomt.deploy.export import export_onnx
    from pomt.deploy.targets import Target
    from pomt.method.pruning import apply_pruning

    model = _build_model(args)
    apply_pruning(model, args.method, r=args.r, layer=args.layer)
    target = Target(runtime=args.runtime, batch_size=args.batch_size)
    record = export_onnx(model, args.output, target, tolerance=args.tolerance)
    ir = f"; for {args.runtime}: {record.converted_path}" if record.converted_path else ""
    print(
        f"wrote {record.path} ({record.method} r={record.r}, batch {record.batch_size}, {record.export_s:.1f} s{ir})"
    )
    print(f"ONNX Runtime vs PyTorch: max |diff| {record.max_abs_diff:.3g} <= {record.tolerance:g}")
    return 0


# each command: its parser and what it does with the parsed arguments
COMMANDS = {
    "profile-latency": (latency_parser, _profile_latency),
    "estimate-accuracy": (accuracy_parser, _estimate_accuracy),
    "select-r": (select_parser, _select_r),
    "export": (export_parser, _export),
}


def _entry_point(command: str) -> Callable[[Sequence[str] | None], int]:
    make, fn = COMMANDS[command]

    def entry_point(argv: Sequence[str] | None = None) -> int:
        return _run(fn, make().parse_args(argv))

    entry_point.__doc__ = f"Entry point of ``pomt-{command}``: exit status 0, or 2 after a clear error."
    return entry_point


profile_latency_main = _entry_point("profile-latency")
estimate_accuracy_main = _entry_point("estimate-accuracy")
select_r_main = _entry_point("select-r")
export_main = _entry_point("export")


def parser() -> argparse.ArgumentParser:
    """``pomt`` with one subcommand per tool (the same options as its ``pomt-*`` script)."""
    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(prog="pomt", description=__doc__, formatter_class=raw)
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (make, fn) in COMMANDS.items():
        make(commands.add_parser(name, prog=f"pomt {name}")).set_defaults(run=fn)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pomt <command>``: exit status 0, or 2 after a clear error or bad usage."""
    args = parser().parse_args(argv)
    return _run(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
