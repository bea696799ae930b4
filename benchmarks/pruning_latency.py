"""How much does POMT's scoring and fusion cost over simply having fewer tokens?

DeiT-S (random weights: latency does not depend on the weights) at batch sizes 1 and 4,
r in {28, 56, 100}, pruning at block 3, on the current device. In one run, interleaved
(A B C A B C ...), it times:

- ``unpruned``: the model as timm builds it;
- ``pomt``: the POMT-pruned model;
- ``ideal``: the same model with the sequence simply cut to N - r tokens at the point where
  POMT prunes (after block 3's attention), with no scoring and fused attention: the cost
  of POMT minus its scoring and fusion;
- ``cut_before``: the sequence cut to N - r tokens *before* block 3 (block 3's attention
  also runs on fewer tokens), a lower bound no method that scores tokens in block 3 reaches;
- ``unfused``: POMT with explicit (unfused) attention in every block, as the authors'
  release computes it.

It ends with ``pruned/ideal=X.XXX``: the worst pomt/ideal ratio over the table.

On Linux CPUs, glibc returns large freed buffers to the OS and page-faults them back in on
the next forward; explicit attention allocates two (B, H, N, N) buffers, so it pays more
for this than fused attention. ``--malloc-tuned`` keeps such buffers in the heap (as
jemalloc/tcmalloc or ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` would), which
makes every variant faster and shows the cost of POMT's own work.

    python benchmarks/pruning_latency.py            # about 2-4 minutes on a 2-core CPU
    python benchmarks/pruning_latency.py --quick    # a smaller run
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

import pomt
from pomt.models import vit_blocks
from pomt.timing import device_name, time_interleaved


def build_variants(base: torch.nn.Module, r: int, layer: int) -> dict[str, torch.nn.Module]:
    n = pomt.token_layout(base).tokens
    variants = {
        "pomt": pomt.apply_pruning(copy.deepcopy(base), "pomt", r=r, layer=layer),
        "ideal": pomt.apply_pruning(copy.deepcopy(base), "cut", r=r, layer=layer),
    }
    cut_before = copy.deepcopy(base)
    vit_blocks(cut_before)[layer].register_forward_pre_hook(lambda m, args: (args[0][:, : n - r],))
    variants["cut_before"] = cut_before
    unfused = pomt.apply_pruning(copy.deepcopy(base), "pomt", r=r, layer=layer)
    for block in vit_blocks(unfused):
        block.attn.fused_attn = False
    variants["unfused"] = unfused
    return variants


def tune_glibc_malloc(threshold: int = 64 << 20) -> bool:
    """Keep freed buffers below ``threshold`` bytes in the heap instead of unmapping them."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(
        libc.mallopt(m_trim_threshold, 2 * threshold)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--r", type=int, nargs="+", default=[28, 56, 100])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (samples per variant)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, r=56, 15 rounds")
    parser.add_argument("--malloc-tuned", action="store_true", help="keep large buffers in glibc's heap")
    args = parser.parse_args()
    malloc = "default malloc"
    if args.malloc_tuned:
        malloc = "glibc malloc tuned" if tune_glibc_malloc() else "default malloc (mallopt unavailable)"
    if args.quick:
        args.batch_sizes, args.r, args.rounds = [1], [56], 15

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval().to(device)
    n = pomt.token_layout(base).tokens
    print(
        f"# {args.model} (N={n}) on {device_name(device)}, threads={torch.get_num_threads()}, "
        f"layer={args.layer}, {args.rounds} interleaved rounds, {malloc}, median ms"
    )
    header = (
        f"{'batch':>5} {'r':>4} {'tokens':>6} {'unpruned':>9} {'pomt':>8} {'ideal':>8} {'cut_bef':>8} "
        f"{'unfused':>8} {'speedup':>8} {'pomt/ideal':>10} {'pomt/cut_bef':>12} {'unfused/ideal':>13}"
    )
    print(header)
    worst = 0.0
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, 224, 224, device=device)
            for r in args.r:
                models = {"unpruned": base, **build_variants(base, r, args.layer)}
                stats = time_interleaved(
                    {k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, device=device, rounds=args.rounds
                )
                med = {k: s.median_ms for k, s in stats.items()}
                ratio = med["pomt"] / med["ideal"]
                worst = max(worst, ratio)
                print(
                    f"{batch:>5} {r:>4} {n - r:>6} {med['unpruned']:>9.2f} {med['pomt']:>8.2f} "
                    f"{med['ideal']:>8.2f} {med['cut_before']:>8.2f} {med['unfused']:>8.2f} "
                    f"{med['unpruned'] / med['pomt']:>8.3f} {ratio:>10.3f} "
                    f"{med['pomt'] / med['cut_before']:>12.3f} {med['unfused'] / med['ideal']:>13.3f}"
                )
    print(f"pruned/ideal={worst:.3f}")


if __name__ == "__main__":
    main()
