"""How much one pair's ratio L(n)/L(N) spreads, within a timing and between timings.

Times each of a few n against N the way a latency profile times a point (3 warm-up pairs, then
0.2 s and at least 5 pairs), ``--rounds`` times each, round-robin in a seeded order. Prints, per
n, the spread of the timings' medians, the median IQR within a timing (as a profile point's:
p75 - p25, linear between samples), and the 95 % interval
of the pooled median. If timings were independent draws of their pairs, the spread of their
medians would be about 1.25 * (IQR / 1.35) / sqrt(pairs per timing); more than that is noise
shared by the pairs of one timing, which pooling samples as if independent would hide.

    python benchmarks/timing_spread.py --runtime openvino --batch 1 --rounds 12
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pomt import Target  # noqa: E402
from pomt.timing import TimingStats, median_interval, time_paired  # noqa: E402
from pomt.weights import create_model  # noqa: E402


def round_robin(
    model: torch.nn.Module, target: Target, ns: list[int], rounds: int, seed: int = 0
) -> dict[int, list[list[float]]]:
    """n -> the ratios L(n)/L(N) of each of ``rounds`` timings (one per round, every n once a round,
    in a seeded order), each timed as a profile point is."""
    timings: dict[int, list[list[float]]] = {n: [] for n in ns}
    with target.prepare(model, layer=3) as prepared:
        reference = prepared.at(prepared.n_total)
        rng = random.Random(seed)
        for _ in range(rounds):
            for n in rng.sample(ns, len(ns)):
                call = prepared.at(n)
                ratios, _ = time_paired(call.run, reference.run, device=prepared.device, prepare=call.setup,
                                        prepare_reference=reference.setup)  # fmt: skip
                timings[n].append(ratios)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--n", type=int, nargs="+", default=[81, 84, 87, 90, 106])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224", pretrained=False).eval()
    t0 = time.time()
    groups = round_robin(model, Target(batch_size=args.batch, runtime=args.runtime), args.n, args.rounds)
    print(f"{args.runtime} batch {args.batch}: {args.rounds} timings per n, {time.time() - t0:.0f} s")
    for n, timings in groups.items():
        medians = [statistics.median(g) for g in timings]
        iqr = statistics.median(TimingStats.from_samples(g).iqr_ms / statistics.median(g) for g in timings)
        pairs = statistics.median(len(g) for g in timings)
        spread = statistics.stdev(medians) / statistics.fmean(medians)
        iid = 1.25 * (iqr / 1.35) / pairs**0.5
        m, low, high = median_interval([r for g in timings for r in g])
        print(
            f"n={n}: timings' medians spread {100 * spread:.2f} % (independent pairs would give {100 * iid:.2f} %; "
            f"{pairs:g} pairs per timing), IQR within a timing {100 * iqr:.2f} %, pooled median {m:.4f} "
            f"[{low:.4f}, {high:.4f}] (+-{50 * (high - low) / m:.2f} %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
