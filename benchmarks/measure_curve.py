"""Measure one full-grid latency profile L(n) with its rounds (every sample of every point) for
``benchmarks/selection_replay.py``: DeiT-S with random weights (latency does not depend on the
weights), batch 1 by default, one thread, every n from N down to p + 1 in a seeded random order,
with pomt's own profiler (relative to N on the CPU). The JSON profile keeps each point's samples
(``values_ms``); the load average before and after is written beside it (``<out>.txt``).

    python benchmarks/measure_curve.py --runtime torch --out benchmarks/results/replay_eager_fp32_b1.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pomt import SearchConfig, Target, Timing  # noqa: E402
from pomt.models import token_layout  # noqa: E402
from pomt.offline.grid import full_grid  # noqa: E402
from pomt.offline.profiling import profile_latency  # noqa: E402
from pomt.weights import create_model  # noqa: E402


def load() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--runtime", default="torch", choices=["torch", "openvino", "onnxruntime"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, pretrained=False).eval()
    layout = token_layout(model)
    grid = full_grid(layout.prefix + 1, layout.n_total)
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0)).tolist()
    before, t0 = load(), time.time()
    profile = profile_latency(
        model,
        target=Target(batch_size=args.batch_size, runtime=args.runtime),
        progress=False,
        search=SearchConfig(grid=[grid[i] for i in order]),
        timing=Timing(min_run_time=args.min_run_time),
    )
    after = load()
    profile.save(args.out)
    note = (
        f"{args.model} random weights, {profile.precision}, batch {args.batch_size}, {profile.threads} thread(s), "
        f"{profile.device}, full grid of {len(grid)} points in a seeded random order, min_run_time "
        f"{args.min_run_time}s, {profile.sampling}; {time.time() - t0:.0f} s; before: {before}; after: {after} "
        "(2-core VM shared with other work)\n"
    )
    Path(args.out).with_suffix(".txt").write_text(note)
    print(note, end="")


if __name__ == "__main__":
    main()
