"""``pomt export``: a pruned ViT as ONNX (checked in ONNX Runtime) and OpenVINO IR."""

from __future__ import annotations

import argparse

from pomt.cli.common import add_model_args, build_model, command_parser
from pomt.deploy.targets import RUNTIMES

__all__ = ["export_parser", "export"]


def export_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = command_parser(
        "pomt-export",
        "Write a ViT pruned with POMT at --r (or Top-K, ToMe) as ONNX (dynamo exporter, static shapes), "
        "checked in ONNX Runtime against PyTorch, optionally also as OpenVINO IR (docs/deploy.md).",
        parser,
    )
    add_model_args(parser)
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


def export(args: argparse.Namespace) -> int:
    from pomt.deploy.export import export_onnx
    from pomt.deploy.targets import Target
    from pomt.method.pruning import apply_pruning

    model = build_model(args)
    apply_pruning(model, args.method, r=args.r, layer=args.layer)
    target = Target(runtime=args.runtime, batch_size=args.batch_size)
    record = export_onnx(model, args.output, target, tolerance=args.tolerance)
    ir = f"; for {args.runtime}: {record.converted_path}" if record.converted_path else ""
    print(
        f"wrote {record.path} ({record.method} r={record.r}, batch {record.batch_size}, {record.export_s:.1f} s{ir})"
    )
    print(f"ONNX Runtime vs PyTorch: max |diff| {record.max_abs_diff:.3g} <= {record.tolerance:g}")
    return 0
