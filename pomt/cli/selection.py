"""``pomt select-r``: choose R from saved profiles (from any machines), verify it, print it."""

from __future__ import annotations

import argparse

from pomt.cli.common import build_model, command_parser, save_plot
from pomt.deploy.targets import RUNTIMES
from pomt.errors import PomtValueError

__all__ = ["select_parser", "select_r"]


def select_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = command_parser(
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


def select_r(args: argparse.Namespace) -> int:
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
        sel = verify_selection(sel, lat, args)
    else:
        why = "--no-verify" if args.model else "no --model to time"
        print(f"not verified ({why}): the speed-up below is the profile's prediction only")
    print(sel.summary())
    if args.json:
        write_json(args.json, sel.to_dict())
    if args.plot:
        from pomt.plots import plot_profiles

        save_plot(plot_profiles(lat, acc, sel), args.plot)
    print(f"R={sel.r}")
    return 0


def verify_selection(sel, lat, args: argparse.Namespace):
    """``sel`` timed against the unpruned model as the profile was measured (``pomt.offline.verify_profile``)."""
    from pomt.offline.verify_profile import verify_for_profile

    if not args.model:
        raise PomtValueError(
            "select-r --verify needs --model (the timm model the latency profile was measured for)"
        )
    if args.img_size is None and getattr(lat, "img_size", None):
        args.img_size = lat.img_size[0]
    model = build_model(args)
    return verify_for_profile(
        sel, model, lat, verify_max_time=args.verify_max_time, candidates=args.verify_candidates, log=print
    )
