"""What the commands share: the model options, the device, saving, and clear errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pomt.errors import PomtError, PomtValueError

__all__ = [
    "token_list",
    "add_model_args",
    "build_model",
    "select_device",
    "command_parser",
    "save_plot",
    "save_profile",
    "run_command",
]


def token_list(text: str) -> list[int]:
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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="timm model name, e.g. deit_small_patch16_224")
    group.add_argument("--weights", help="local weights file (.safetensors or a torch state dict)")
    group.add_argument(
        "--pretrained", action="store_true", help="download timm's pretrained weights (needs network)"
    )
    group.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    group.add_argument("--img-size", type=int, help="input size (default: the model's)")


def build_model(args: argparse.Namespace):
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


def command_parser(
    prog: str, description: str, parser: argparse.ArgumentParser | None
) -> argparse.ArgumentParser:
    """A command's parser: stand-alone as ``prog`` (its console script), or ``parser`` (``pomt``'s)."""
    if parser is None:
        return argparse.ArgumentParser(prog=prog, description=description)
    parser.description, parser.epilog = description, f"Also installed as {prog}."
    return parser


def save_plot(figure: Any, path: str) -> None:
    from pomt.plots import save_figure

    save_figure(figure, path)
    print(f"saved plot to {path}")


def save_profile(profile, output: str, what: str, point_line: Callable[[Any], str]) -> None:
    """Save ``profile`` at ``output`` and print what it holds, one line per point."""
    path = profile.save(output)
    print(f"saved {profile.kind} profile ({what}) to {path}")
    for point in profile.points:
        print(f"  n={point.n:5d}  {point_line(point)}")


def run_command(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        if getattr(args, "device", None):
            select_device(args.device)
        return fn(args)
    except (ValueError, FileNotFoundError, PomtError) as err:  # ours; anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
