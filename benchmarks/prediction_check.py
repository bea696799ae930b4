"""Does pomt's predicted speed-up hold? ``find_r`` three times in each runtime, prediction
against verification.

DeiT-S with random weights (``timm.create_model("deit_small_patch16_224")``; latency does
not depend on the weights), batch 1, POMT at block 3, one thread, this CPU. ``find_r`` is
run ``--runs`` times (default 3) in eager PyTorch (fp32), ONNX Runtime and OpenVINO, each
run measuring its own latency profile. For every run the table gives R, the speed-up the
profile predicted for the R that was kept (``Selection.speedup``), the speed-up the
verification measured (the pruned model against the unpruned one, side by side, with its
95 % interval) and their difference; a miss above 5 % is flagged ``MISS``.

Accuracy: the FIXED SYNTHETIC smooth A(n) of ``benchmarks/selection_speed.py`` stands for a
small labelled set (random weights have no accuracy to measure): it only steers where n*
falls; the latency, the prediction and the verification are all measured.

The header prints the CPU, its bf16 units, the versions, the thread count and the load
(``os.getloadavg``) before and after: on a shared machine, read the numbers with it.

    PYTHONPATH=. python benchmarks/prediction_check.py [--runs 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_runtimes import accuracy_profile  # noqa: E402

from pomt import Console, Reuse, SearchConfig, Target, find_r  # noqa: E402
from pomt.deploy.targets import RUNTIMES as ALL_RUNTIMES  # noqa: E402
from pomt.timing import device_name  # noqa: E402

RUNTIMES = ("torch", "onnxruntime", "openvino")
assert set(RUNTIMES) <= set(ALL_RUNTIMES)
MISS = 0.05


def cpu_flags() -> str:
    """The CPU's matrix/bf16 units, from /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ["avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"]
    have = [flag for flag in wanted if flag in flags]
    missing = [flag for flag in wanted if flag not in flags]
    return f"has {' '.join(have) or '-'}; lacks {' '.join(missing) or '-'}"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def header() -> list[str]:
    versions = [f"torch {torch.__version__}"]
    for runtime in RUNTIMES[1:]:
        try:
            versions.append(f"{runtime} {Target(runtime=runtime).backend.version()}")
        except Exception as err:  # noqa: BLE001 - a missing runtime is reported, not fatal
            versions.append(f"{runtime} unavailable ({err})")
    import timm

    return [
        f"CPU: {device_name('cpu')} ({os.cpu_count()} logical cores; {cpu_flags()})",
        f"versions: {', '.join(versions)}, timm {timm.__version__}, python {platform.python_version()}",
        "model: deit_small_patch16_224 (random weights), batch 1, POMT at block 3, 1 thread, "
        "SearchConfig() defaults; A(n): fixed synthetic curve (benchmarks/selection_speed.py)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    import timm

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    lines = header()
    lines.append(f"load average (1, 5, 15 min) at the start: {load()}")
    for line in lines:
        print(line, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        acc_path = Path(tmp) / "accuracy.json"
        accuracy_profile(model).save(acc_path)
        for runtime in args.runtimes:
            for run in range(1, args.runs + 1):
                start = time.perf_counter()
                target = Target(runtime=runtime, device="cpu", batch_size=1)
                search = find_r(model, None, target, layer=3, search=SearchConfig(), reuse=Reuse(accuracy_path=acc_path),
                                console=Console(progress=False, log=lambda line: None))  # fmt: skip
                sel = search.selection
                row = {
                    "runtime": runtime, "run": run, "precision": search.latency.precision, "r": sel.r,
                    "n_star": sel.n_star, "points": len(search.latency.points), "predicted": sel.speedup,
                    "verified": sel.measured_speedup, "retimed": sel.retimed_speedup, "interval": sel.measured_speedup_interval,
                    "first_choice_r": sel.n_total - sel.candidates[0] if sel.candidates else None,
                    "wall_s": round(time.perf_counter() - start, 1), "load": load(),
                    "prediction_check": sel.prediction_check,
                }  # fmt: skip
                rows.append(row)
                print(format_row(row), flush=True)
    lines.append(f"load average at the end: {load()}")
    print(lines[-1])
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"header": lines, "rows": rows}, indent=1))


def format_row(row: dict) -> str:
    return f"{row['runtime']} run {row['run']}: R={row['r']} n*={row['n_star']} ({row['wall_s']} s, load {row['load']})"


def table(rows: list[dict]) -> str:
    out = ["| runtime (precision) | run | R | n* | points | predicted | re-timed at n* | verified [95 % CI] | diff | load (1 min) |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    misses = 0
    for row in rows:
        if row["verified"] is None:
            verified, diff = "not verified (R = 0 kept)", "-"
        else:
            low, high = row["interval"]
            verified = f"x{row['verified']:.3f} [{low:.3f}, {high:.3f}]"
            rel = row["predicted"] / row["verified"] - 1
            miss = abs(rel) > MISS
            misses += miss
            diff = f"{rel:+.1%}" + (" **MISS**" if miss else "")
        predicted = "-" if row["predicted"] is None else f"x{row['predicted']:.3f}"
        retimed = "-" if row.get("retimed") is None else f"x{row['retimed']:.3f}"
        out.append(f"| {row['runtime']} ({row['precision']}) | {row['run']} | {row['r']} | {row['n_star']} | "
                   f"{row['points']} | {predicted} | {retimed} | {verified} | {diff} | {row['load'].split()[0]} |")  # fmt: skip
    out.append(f"\npredictions off by more than {MISS:.0%}: {misses} of {len(rows)}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
