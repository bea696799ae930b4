"""``POMT_KERNELS=auto``: the kernels run only where they were checked equal and faster, the
choice covers every r, the check cannot break the user's forward, threads measure a key once
and every rank of a process group runs the same backend.

The tests that run the kernels do so on CPU tensors under Triton's interpreter (in a child
pytest, see ``_interpreter.py``), with ``auto`` made to treat the CPU as it treats CUDA."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from _interpreter import INTERPRETING, needs_interpreter, parent_only, run_interpreted
from conftest import make_tiny_vit

import pomt
from pomt.method import dispatch, ops

pytest.importorskip("triton")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="this is the parent")
def test_auto_under_the_triton_interpreter():
    run_interpreted(__file__, 6)


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """``auto`` as on a CUDA device, for CPU tensors; records the lines it logs."""
    monkeypatch.setattr(ops, "_auto_device", lambda t: True)
    monkeypatch.setattr(ops, "scores_from_probabilities", lambda x: False)  # the block's CUDA path
    monkeypatch.setattr(ops, "_CHOICES", {})
    lines = []
    monkeypatch.setattr(dispatch._log, "info", lambda msg, *args: lines.append(msg % args))
    with ops.kernels("auto"):
        yield lines


@pytest.fixture
def kernels_win(monkeypatch):
    """The timing made to favour the kernels; counts the timings and the kernels' selections."""
    from pomt.method import _triton

    calls = {"timed": 0, "select_tokens": 0}
    select = _triton.select_tokens

    def faster(fn, reference, device):
        calls["timed"] += 1
        return True, 0.61

    def counted(*args, **kwargs):
        calls["select_tokens"] += 1
        return select(*args, **kwargs)

    monkeypatch.setattr(dispatch, "_faster", faster)
    monkeypatch.setattr(_triton, "select_tokens", counted)
    return calls


def _inputs(b=2, n=40, h=3, d=16, c=24, dtype=torch.float32, seed=0, scale_x=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    x = (torch.randn(b, n, c, generator=g) * scale_x).to(dtype)
    return x, q, k, v, 1, 8, d**-0.5


@needs_interpreter
def test_auto_uses_kernels_only_when_equal_and_faster(auto_on_cpu, kernels_win, monkeypatch):
    inputs = _inputs()
    with torch.no_grad():
        assert ops.use_kernels(*inputs)
        assert ops.use_kernels(*inputs) and kernels_win["timed"] == 1  # measured once, then cached
    line = auto_on_cpu[0]
    assert len(auto_on_cpu) == 1 and "triton path for every r" in line, line
    assert "x (2, 40, 24) float32" in line and "3 heads of dim 16" in line and "no autocast" in line
    assert "equal to the float32 torch path at r=0, 8, 19, 38 (keep=0 at r=38)" in line  # 39 ordinary
    assert "faster at r=19 (x0.61 its time)" in line
    assert ops.kernel_backend("cpu") == "auto: triton"

    monkeypatch.setattr(dispatch, "_faster", lambda fn, ref, device: (False, 1.08))
    x, q, k, v, prefix, r, scale = inputs
    with torch.no_grad():  # another batch size: another key, measured again
        assert not ops.use_kernels(x[:1], q[:1], k[:1], v[:1], prefix, r, scale)
    assert "torch path for every r" in auto_on_cpu[1] and "but not faster at r=19 (x1.08" in auto_on_cpu[1]
    assert ops.kernel_backend("cpu") == "auto: torch+triton"


@needs_interpreter
def test_kernels_win_then_every_r_runs_through_them(auto_on_cpu, kernels_win):
    # the choice made at the first r covers every r, keep = 0 included, with the torch path's output
    model = make_tiny_vit(patch_size=4, depth=3)  # 64 patches + CLS
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for r in (20, 63, 1, 62, 0):
        pomt.apply_pruning(model, "pomt", r=r, layer=1)
        with torch.no_grad():
            got = model(images)
            with ops.kernels("torch"):
                torch.testing.assert_close(got, model(images), atol=1e-5, rtol=1e-5)
    assert len(auto_on_cpu) == 1 and kernels_win["timed"] == 1  # one check, at the first r
    assert kernels_win["select_tokens"] == 4 + 4  # the check's 4 r, then 4 forwards (r=0 prunes nothing)


@needs_interpreter
def test_auto_rejects_kernels_that_differ(auto_on_cpu, kernels_win, monkeypatch):
    from pomt.method import _triton

    select = _triton.select_tokens

    def wrong(x, col, val, prefix, keep):
        out, score, pos = select(x, col, val, prefix, keep)
        return out, score, pos.flip(1)  # the wrong tokens

    monkeypatch.setattr(_triton, "select_tokens", wrong)
    with torch.no_grad():
        assert not ops.use_kernels(*_inputs())
    assert "torch path for every r (the kernels differ from the float32 torch path at r=0" in auto_on_cpu[0]

    def broken(*args):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(_triton, "select_tokens", broken)
    with torch.no_grad():
        assert not ops.use_kernels(*_inputs(b=1))  # a shape not measured yet
    assert "the kernels failed at r=0: RuntimeError: no kernel image for this device" in auto_on_cpu[1]
    assert kernels_win["timed"] == 0


@needs_interpreter
def test_an_error_during_the_check_falls_back_to_the_torch_path(auto_on_cpu, monkeypatch):
    def out_of_memory(fn, reference, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dispatch, "_faster", out_of_memory)
    model = make_tiny_vit(patch_size=4, depth=2)
    pomt.apply_pruning(model, "pomt", r=20, layer=1)
    with torch.no_grad():
        got = model(torch.ones(1, 3, 32, 32))  # the user's forward goes on
        with ops.kernels("torch"):
            torch.testing.assert_close(got, model(torch.ones(1, 3, 32, 32)))
    assert "torch path for every r (the check failed: OutOfMemoryError: CUDA out of memory" in auto_on_cpu[0]


@needs_interpreter
def test_under_autocast_the_reference_is_float32_and_the_key_says_so(auto_on_cpu, kernels_win, monkeypatch):
    model = make_tiny_vit(patch_size=4, depth=2, embed_dim=64, num_heads=2)
    pomt.apply_pruning(model, "pomt", r=20, layer=1)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scored_under = []
    scores = pomt.method.functional.pomt_scores

    def spy(q, k, v, *args, **kwargs):
        if q.dtype == torch.float32:
            scored_under.append(torch.is_autocast_enabled("cpu"))
        return scores(q, k, v, *args, **kwargs)

    monkeypatch.setattr(pomt.method.functional, "pomt_scores", spy)
    with torch.no_grad():
        model(images)  # float32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)  # q, k, v in bfloat16: another key, checked again
    keys = list(ops.kernel_choices())
    assert len(keys) == 2 and {key[3] for key in keys} == {torch.float32, torch.bfloat16}
    assert {key[-1] for key in keys} == {None, torch.bfloat16}
    assert scored_under and not any(scored_under)  # the float32 reference: never under autocast
    assert all(c.backend == "triton" for c in ops.kernel_choices().values()), auto_on_cpu
    assert "autocast bfloat16" in auto_on_cpu[1] and "q bfloat16" in auto_on_cpu[1]


@needs_interpreter
def test_bfloat16_at_residual_stream_magnitudes():
    # x as a residual stream: |x| up to ~200, where bfloat16's rounding (2**-8 relative) alone
    # puts the fused mean far more than 2e-3 from the float32 mean
    x, q, k, v, prefix, r, scale = _inputs(b=3, n=90, d=64, c=96, dtype=torch.bfloat16, seed=2, scale_x=50.0)
    keep = x.shape[1] - prefix - r - 1
    reference = pomt.method.functional.pomt_scores(q.float(), k.float(), v.float(), prefix, scale)
    with torch.no_grad():
        got = dispatch.launch_kernels(x, q, k, v, prefix, r, scale)
    assert dispatch.mismatch(got, x, reference, prefix, keep, q.dtype) is None  # a correct kernel passes
    kept = got[2] >= 0
    mean32 = (x[:, prefix:].float() * (~kept)[..., None]).sum(1) / (~kept).sum(1, keepdim=True)
    assert (got[0][:, prefix + keep].float() - mean32).abs().max() > 2e-3  # the old tolerance failed here

    # a wrong kernel: its mean leaves out one of the fused tokens
    out, scores, pos = got
    last = (pos == -1).long().cumsum(1).argmax(1)  # the last fused token of each image
    wrong = out.clone()
    for b in range(x.shape[0]):
        fused = (pos[b] == -1).nonzero().flatten()
        fused = fused[fused != last[b]]
        wrong[b, prefix + keep] = x[b, prefix + fused].float().mean(0).to(x.dtype)
    problem = dispatch.mismatch((wrong, scores, pos), x, reference, prefix, keep, q.dtype)
    assert problem and "the new sequence is not the kept tokens and the mean of the others" in problem


@parent_only
def test_differences_with_nan_are_printed_as_nan():
    got = torch.tensor([[0.5, float("nan"), 1.0]])
    assert dispatch._worst(got, torch.tensor([[0.5, 0.25, 1.0]])) == "nan"
    assert dispatch._worst(got, torch.tensor([[0.5, float("nan"), 1.25]])) == "0.25"
    pos = torch.tensor([[0, -1, -1]], dtype=torch.int32)
    x = torch.ones(1, 4, 2)
    problem = dispatch.mismatch((torch.ones(1, 3, 2), got, pos), x, torch.ones(1, 3), 1, 1, torch.float32)
    assert problem == "scores differ by up to nan (tolerance 0.0001)"


@parent_only
def test_faster_compares_side_by_side():
    def slow():
        time.sleep(0.002)

    def fast():
        pass

    assert dispatch._faster(fast, slow, torch.device("cpu"))[0]
    assert not dispatch._faster(slow, fast, torch.device("cpu"))[0]


@parent_only
def test_auto_on_the_cpu_is_the_torch_path():
    with ops.kernels("auto"), torch.no_grad():
        assert ops.kernel_backend("cpu") == "torch"
        assert not ops.use_kernels(*_inputs())
    with ops.kernels("torch"):
        assert ops.kernel_backend("cuda") == "torch"


def _slow_measure(calls: list, seconds: float = 0.3, backend: str = "triton"):
    def measure(x, q, k, v, prefix, r, scale, **timer):
        calls.append(tuple(x.shape))
        time.sleep(seconds)
        return dispatch.KernelChoice(backend, "as measured")

    return measure


@parent_only
def test_two_threads_measure_a_key_once(auto_on_cpu, monkeypatch):
    calls: list = []
    monkeypatch.setattr(dispatch, "measure", _slow_measure(calls))
    inputs, results = _inputs(), []

    def forward():
        with ops.kernels("auto"), torch.no_grad():
            results.append(ops.use_kernels(*inputs))

    threads = [threading.Thread(target=forward) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [(2, 40, 24)] and results == [True, True] and len(auto_on_cpu) == 1


@parent_only
def test_a_model_run_under_auto_copies_pickles_and_reuses_the_choice(auto_on_cpu, monkeypatch):
    """The choice is the process's, not the model's: a deepcopy or a torch.save/load round trip
    of a model that ``auto`` has measured runs equal, and the same input is not measured again."""
    import copy
    import io

    calls: list = []
    monkeypatch.setattr(dispatch, "measure", _slow_measure(calls, 0.0, "torch"))
    model = pomt.apply_pruning(make_tiny_vit(patch_size=4, depth=2), "pomt", r=20, layer=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert len(calls) == 1 and len(ops.kernel_choices()) == 1
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert pomt.pruning_config(other) == pomt.pruning_config(model)
        with torch.no_grad():
            assert torch.equal(other(x), expected)
    assert len(calls) == 1  # the copies ran on the choice already made


def _rank(rank: int, init: str, out: str) -> None:
    """One rank of a two-rank gloo group: its own timing would pick another backend than
    rank 0's; the choice it runs must be the shared one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    ops._auto_device = lambda t: True
    calls: list = []
    dispatch.measure = _slow_measure(calls, 0.2, "triton" if rank == 0 else "torch")
    used = {}
    with ops.kernels("auto"), torch.no_grad():
        time.sleep(0.3 * rank)  # rank 0 reaches this shape first
        used["both"] = ops.use_kernels(*_inputs(b=2))
        if rank == 1:  # a last batch only this rank has: it decides alone, no one waits
            used["alone"] = ops.use_kernels(*_inputs(b=1))
        dist.barrier()
        time.sleep(0.3 * (1 - rank))  # rank 1 reaches this shape first
        used["later"] = ops.use_kernels(*_inputs(b=3))
    reasons = {str(key[2][0]): choice.reason for key, choice in ops.kernel_choices().items()}
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"used": used, "measured": calls, "reasons": reasons}, f)
    dist.barrier()
    dist.destroy_process_group()


@parent_only
def test_two_ranks_run_the_same_backend(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["used"]["both"] == ranks[1]["used"]["both"]
    assert ranks[0]["used"]["later"] == ranks[1]["used"]["later"]
    measured = [tuple(s) for rank in ranks for s in rank["measured"]]
    assert sorted(measured) == [(1, 40, 24), (2, 40, 24), (3, 40, 24)]  # each shape once, in all
    assert (1, 40, 24) in [tuple(s) for s in ranks[1]["measured"]]  # the lone shape: by rank 1
    followers = [r["reasons"][b] for r in ranks for b in ("2", "3") if "decided by rank" in r["reasons"][b]]
    assert len(followers) == 2  # for each shared shape, one rank took the other's choice


@parent_only
def test_the_method_and_the_kernel_dispatch_do_not_import_the_timer():
    import ast
    from pathlib import Path

    for name in ("method/functional.py", "method/ops.py"):
        tree = ast.parse((Path(pomt.__file__).parent / name).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and "timing" in m], (name, imported)
    # auto's check takes its timer (and its cache) as arguments
    cache: dict = {}
    inputs = _inputs()
    choice = dispatch.choose(
        ("key",), inputs, cache, decide=lambda *args: dispatch.KernelChoice("torch", "given")
    )
    assert cache == {("key",): choice} and choice.reason == "given"
