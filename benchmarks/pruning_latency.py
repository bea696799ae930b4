"""What do the pruning blocks cost over simply having fewer tokens?

For each method, the pruned model is timed side by side (interleaved rounds, shuffled order)
with its *ideal*: the same model with the sequence cut to the same token counts at the same
points, with no scoring (``apply_ideal`` below), so a ratio of 1 means the
scoring, ranking and gathering are free.

- ``pomt`` (r in ``--r``, pruned once at ``--layer``) against ``ideal``: N - r tokens after
  that block's attention;
- ``topk`` and ``tome`` (r per block in ``--topk-r``/``--tome-r``) against their ideal: the
  same per-block token counts (ToMe's clamped schedule included);
- ``unpruned``, for the speed-up; with ``--legacy``, also the blocks as this project first
  built them (``pomt_v1``/``topk_v1``: explicit softmax attention, so the attention matrix is
  written, in one block for POMT, in every block for Top-K); ``v1/pruned`` is how much faster
  the current blocks are.

Ratios are medians of round-by-round ratios (each pair timed moments apart), so a drifting
machine cancels out. ``ops`` counts what one eager forward launches (torch.profiler): aten
operators on the CPU, CUDA kernels on a GPU. ``kernels:`` says which implementation POMT's
block ran (``pomt.method.ops.kernel_backend``). The last line is
``pruned/ideal=X.XXX topk/ideal=Y.YYY tome/ideal=Z.ZZZ``: the worst ratio of each method.

    python benchmarks/pruning_latency.py                  # CPU: batch 1 and 4, about 5 minutes on 2 cores
    python benchmarks/pruning_latency.py --quick          # batch 1, r=56, 15 rounds
    # DeiT-S and a DINOv3-S (timm's Eva: rotary tables gathered per image) in one run
    python benchmarks/pruning_latency.py --model deit_small_patch16_224,vit_small_patch16_dinov3
    # GPU (H100/H200): fp16, CUDA graphs, batch 1/16/64; kernels=auto measures the Triton kernels
    # against the torch path on each shape and runs them only where they are equal and faster
    python benchmarks/pruning_latency.py --device cuda --dtype float16 --cuda-graphs --batch-sizes 1 16 64 --legacy
    # the same with the plain torch path forced (or --kernels triton: the kernels forced)
    python benchmarks/pruning_latency.py --device cuda --dtype float16 --cuda-graphs --batch-sizes 1 16 64 --kernels torch

On Linux CPUs, glibc returns large freed buffers to the OS and page-faults them back in on
the next forward. ``--malloc-tuned`` keeps such buffers in the heap (as jemalloc/tcmalloc or
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` would), which makes every variant
faster and steadier.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
import torch
from torch import nn

import pomt
from pomt.method import ops
from pomt.method import rope as eva
from pomt.method.blocks import BlockSpec, attention_residual, check_room, mlp_residual, qkv_heads
from pomt.models import vit_blocks
from pomt.timing import cuda_graph, device_name, interleaved_samples, paired_ratio

# ----------------------------------------------------------------------------- the ideal


class _Cut(nn.Module):
    """Keep the first N - r tokens after the attention, with no scoring: the latency floor of a
    method that removes r tokens at this block."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        check_room(x.shape[1], self._pomt_spec.prefix, self._pomt_spec.r, "ideal")
        x = attention_residual(self, x)[0]
        return mlp_residual(self, x[:, : x.shape[1] - self._pomt_spec.r])


class _EvaCut(nn.Module):
    """An Eva block of the ideal: its rotary table sliced to the tokens it gets (no gather), and
    where ``r`` > 0 the first N - r tokens kept after the attention, with no scoring."""

    def forward(self, x: torch.Tensor, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        spec = self._pomt_spec
        if rope is not None:
            rope = rope[..., : x.shape[1] - spec.prefix, :]
        if spec.r == 0:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        check_room(x.shape[1], spec.prefix, spec.r, "ideal")
        x = eva.attention_residual(self, x, rope)[0]
        return eva.mlp_residual(self, x[:, : x.shape[1] - spec.r])


def _patch(block: nn.Module, mixin: type[nn.Module], name: str) -> None:
    """Put ``mixin`` in front of the block's class (``pomt.remove_pruning`` undoes it)."""
    base = getattr(type(block), "_pomt_base_class", type(block))
    block.__class__ = type(f"{name}{base.__name__}", (mixin, base), {"_pomt_base_class": base})


def apply_ideal(model: nn.Module, method: str, r: int, layer: int) -> nn.Module:
    """``model`` with its sequence cut, unscored, to the token counts that ``method`` at ``r``
    leaves after each block (its ideal)."""
    pomt.remove_pruning(model)
    schedule = pomt.token_schedule(model, method, r, layer)
    layout = pomt.token_layout(model)
    before = [layout.n_total, *schedule[:-1]]
    for block, n_in, n_out in zip(vit_blocks(model), before, schedule, strict=True):
        if eva.is_eva(model):  # every block: the rotary table must shrink with the tokens
            _patch(block, _EvaCut, "Cut")
            block._pomt_spec = BlockSpec(r=n_in - n_out, prefix=layout.prefix, has_cls=True)
        elif n_out < n_in:
            _patch(block, _Cut, "Cut")
            block._pomt_spec = BlockSpec(r=n_in - n_out, prefix=layout.prefix, has_cls=True)
    return model


# ----------------------------------------------------------------------------- the first blocks (--legacy)


def _explicit(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention residual through an explicit softmax, exactly as the first version computed it."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv_heads(attn, h)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # in place: one (B, H, N, N) buffer
    probs = probs.div_(probs.sum(dim=-1, keepdim=True))
    out = attn.proj((probs @ v).transpose(1, 2).reshape(x.shape))
    return x + block.ls1(out), probs, v


class _LegacyPOMT(nn.Module):
    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        spec = self._pomt_spec
        x, probs, v = _explicit(self, x)
        p = spec.prefix
        attn_term = probs.amax(dim=1)[:, p:, p:].sum(dim=1, dtype=torch.float32)
        attn_term = attn_term / attn_term.amax(dim=1, keepdim=True)
        scores = attn_term + v.amax(dim=1).sum(dim=-1, dtype=torch.float32).softmax(dim=-1)[:, p:]
        keep = x.shape[1] - p - spec.r - 1
        order = scores.argsort(dim=1, descending=True)
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        ordinary = x[:, p:]
        fused = ordinary[rows, order[:, keep:]].mean(dim=1, keepdim=True)
        x = torch.cat([x[:, :p], ordinary[rows, order[:, :keep]], fused], dim=1)
        return x + self.ls2(self.mlp(self.norm2(x)))


class _LegacyTopK(nn.Module):
    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        spec = self._pomt_spec
        x, probs, _ = _explicit(self, x)
        p = spec.prefix
        importance = probs[:, :, 0, p:].mean(dim=1)
        keep = importance.topk(x.shape[1] - p - spec.r, dim=1).indices.sort(dim=1).values
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        x = torch.cat([x[:, :p], x[:, p:][rows, keep]], dim=1)
        return x + self.ls2(self.mlp(self.norm2(x)))


def apply_legacy(model: nn.Module, method: str, r: int, layer: int) -> nn.Module:
    """Prune ``model`` in place by ``method`` with the first version's explicit-attention blocks."""
    pomt.apply_pruning(model, method, r=r, layer=layer)
    mixin = {"pomt": _LegacyPOMT, "topk": _LegacyTopK}[method]
    for block in vit_blocks(model):
        if hasattr(block, "_pomt_spec"):
            _patch(block, mixin, "Legacy")
    return model


# ----------------------------------------------------------------------------- variants


def configurations(
    model: nn.Module, method: str, r: int, layer: int, with_legacy: bool
) -> dict[str, Callable[[], object]]:
    """Functions that put ``model`` into each variant: unpruned, pruned, its ideal (cut to the
    same token counts) and, optionally, the first version. One instance serves all, so that
    no variant gains from where its copy of the weights happens to lie in memory."""
    out = {
        "unpruned": lambda: pomt.remove_pruning(model),
        method: lambda: pomt.apply_pruning(model, method, r=r, layer=layer),
        "ideal": lambda: apply_ideal(model, method, r, layer),
    }
    if with_legacy and method in ("pomt", "topk"):
        out[f"{method}_v1"] = lambda: apply_legacy(model, method, r, layer)
    return out


def ops_per_forward(fn: Callable[[], object], device: torch.device) -> int:
    """Top-level aten operators (CPU) or CUDA kernels (GPU) that one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)


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


def measure(
    base: nn.Module, x: torch.Tensor, method: str, r: int, args: argparse.Namespace
) -> tuple[str, float, float]:
    """One table row (after the batch column), its pruned/ideal ratio and its speed-up."""
    device = x.device
    configure = configurations(base, method, r, args.layer, args.legacy)

    def call() -> object:
        return base(x)

    counts, calls = {}, {}
    for name, setup in configure.items():
        setup()
        call()  # untimed: on CUDA, kernels=auto checks POMT's kernels on this shape here, not in the count
        counts[name] = ops_per_forward(call, device)
        calls[name] = cuda_graph(call, device) if args.cuda_graphs else call
    prepare = None if args.cuda_graphs else (lambda name: configure[name]())
    samples = interleaved_samples(calls, device=device, rounds=args.rounds, prepare=prepare)
    med = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    ratio = paired_ratio(samples[method], samples["ideal"])
    legacy_name = method + "_v1"
    v1 = f"{paired_ratio(samples[legacy_name], samples[method]):.3f}" if legacy_name in samples else "-"
    tokens = pomt.token_schedule(base, method, r, args.layer)[-1]
    speedup = paired_ratio(samples["unpruned"], samples[method])
    row = (
        f"{method:>6} {r:>4} {tokens:>6} {med['unpruned']:>9.3f} {med[method]:>8.3f} {med['ideal']:>8.3f} "
        f"{speedup:>8.3f} {ratio:>12.3f} {v1:>9} {counts[method]:>5} {counts['ideal']:>9}"
    )
    return row, ratio, speedup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="deit_small_patch16_224", help="a timm name; several: comma-separated"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 4 (CPU), 1 16 64 (CUDA)")
    parser.add_argument(
        "--methods", nargs="+", default=["pomt", "topk", "tome"], choices=["pomt", "topk", "tome"]
    )
    parser.add_argument("--r", type=int, nargs="+", default=[28, 56, 100], help="POMT's r values")
    parser.add_argument("--topk-r", type=int, nargs="+", default=[8], help="Top-K's r per block")
    parser.add_argument("--tome-r", type=int, nargs="+", default=[8], help="ToMe's r per block")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (samples per variant)")
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA-graph replays (CUDA only)")
    parser.add_argument(
        "--kernels", choices=ops.KERNEL_MODES, default="auto", help="pomt.method.ops implementation"
    )
    parser.add_argument("--legacy", action="store_true", help="also time the first version's blocks")
    parser.add_argument("--quick", action="store_true", help="batch 1, r=56, 15 rounds")
    parser.add_argument("--malloc-tuned", action="store_true", help="keep large buffers in glibc's heap")
    args = parser.parse_args(argv)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    return args


@dataclass
class Result:
    """What one run measured: the printed lines, each method's worst pruned/ideal ratio, and
    the speed-up over the unpruned model per (method, r, batch)."""

    lines: list[str] = field(default_factory=list)
    worst: dict[str, float] = field(default_factory=dict)
    speedup: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def run(args: argparse.Namespace) -> Result:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    batch_sizes = args.batch_sizes or ([1, 16, 64] if cuda else [1, 4])
    if args.quick:
        batch_sizes, args.r, args.rounds = [1], [56], 15
    malloc = ""
    if args.malloc_tuned:
        malloc = ", glibc malloc tuned" if tune_glibc_malloc() else ", mallopt unavailable"

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval().to(device=device, dtype=dtype)
    n = pomt.token_layout(base).n_total
    threads = f", threads={torch.get_num_threads()}" if not cuda else ""
    result = Result()
    result.say(
        f"# {args.model} (N={n}) on {device_name(device)}, {str(dtype).removeprefix('torch.')}{threads}, "
        f"layer={args.layer}, {args.rounds} interleaved rounds, "
        f"{'CUDA graphs' if args.cuda_graphs else 'eager'}, kernels={args.kernels}{malloc}; median ms, "
        "ratios are medians of per-round ratios"
    )
    result.say(
        f"{'batch':>5} {'method':>6} {'r':>4} {'tokens':>6} {'unpruned':>9} {'pruned':>8} {'ideal':>8} "
        f"{'speedup':>8} {'pruned/ideal':>12} {'v1/pruned':>9} {'ops':>5} {'ideal ops':>9}"
    )
    with torch.inference_mode(), ops.kernels(args.kernels):
        for batch in batch_sizes:
            x = torch.randn(batch, 3, *base.patch_embed.img_size, device=device, dtype=dtype)
            groups = [("pomt", r) for r in args.r] + [("topk", r) for r in args.topk_r]
            groups += [("tome", r) for r in args.tome_r]
            for method, r in groups:
                if method not in args.methods:
                    continue
                row, ratio, speedup = measure(base, x, method, r, args)
                result.worst[method] = max(result.worst.get(method, 0.0), ratio)
                result.speedup[(method, r, batch)] = speedup
                result.say(f"{batch:>5} {row}")
    result.say(f"kernels: {ops.kernel_backend(device, dtype)}")
    names = {"pomt": "pruned", "topk": "topk", "tome": "tome"}
    result.say(
        " ".join(
            f"{names[m]}/ideal={result.worst[m]:.3f}" for m in ("pomt", "topk", "tome") if m in result.worst
        )
    )
    return result


def main() -> None:
    args = parse_args()
    for name in args.model.split(","):  # several models, one after the other, in one process
        run(argparse.Namespace(**{**vars(args), "model": name}))


if __name__ == "__main__":
    main()
