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
from collections.abc import Callable, Sequence

from pomt.cli.common import run_command, select_device
from pomt.cli.export import export, export_parser
from pomt.cli.profiling import accuracy_parser, estimate_accuracy, latency_parser, profile_latency
from pomt.cli.selection import select_parser, select_r

__all__ = [
    "profile_latency_main",
    "estimate_accuracy_main",
    "select_r_main",
    "export_main",
    "main",
    "parser",
    "select_device",
    "COMMANDS",
]

# each command: its parser and what it does with the parsed arguments
COMMANDS = {
    "profile-latency": (latency_parser, profile_latency),
    "estimate-accuracy": (accuracy_parser, estimate_accuracy),
    "select-r": (select_parser, select_r),
    "export": (export_parser, export),
}


def _entry_point(command: str) -> Callable[[Sequence[str] | None], int]:
    make, fn = COMMANDS[command]

    def entry_point(argv: Sequence[str] | None = None) -> int:
        return run_command(fn, make().parse_args(argv))

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
    return run_command(args.run, args)
