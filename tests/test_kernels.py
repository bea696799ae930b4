"""The two implementations of the pruning blocks' work agree: the plain torch path (CPU) and
the Triton kernels (CUDA), run here on the CPU by Triton's interpreter; and the kernels
compile for a Hopper GPU (sm_90) without spilling registers."""

from __future__ import annotations

import inspect
import os
import re
import subprocess

import pytest
import torch
from _interpreter import INTERPRETING, needs_interpreter, run_interpreted
from conftest import make_tiny_vit

import pomt
from pomt.method import dispatch, ops
from pomt.models import vit_blocks

triton = pytest.importorskip("triton")

PREFIX_LAYOUTS = {
    "cls": {},
    "cls+registers": {"reg_tokens": 4, "no_embed_class": True, "init_values": 0.5},
    "no prefix": {"class_token": False, "global_pool": "avg"},
}


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_the_torch_scoring_paths_agree(prefix):
    torch.manual_seed(prefix)
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    scale = 16**-0.5
    probs = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    expected = pomt.method.functional.pomt_scores_from_probabilities(probs, v, prefix)
    for align in (False, True):  # True pads the 37 keys to 40, as on CUDA
        torch.testing.assert_close(
            pomt.method.functional.pomt_scores(q, k, v, prefix, scale, align=align), expected
        )
    assert expected.shape == (2, 37 - prefix) and (expected.amax(dim=1) > 1).all()


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="this is the parent")
def test_kernels_under_the_triton_interpreter():
    run_interpreted(__file__, 55, "-k", "not sm90")  # every interpreter test ran, none was skipped


@pytest.fixture
def interpreted(monkeypatch):
    """Triton kernels forced (run on CPU tensors by the interpreter); counts the selections."""
    module = ops._triton()
    calls = {"select_tokens": 0}
    select = module.select_tokens

    def counted(*args, **kwargs):
        calls["select_tokens"] += 1
        return select(*args, **kwargs)

    monkeypatch.setattr(module, "select_tokens", counted)
    with ops.kernels("triton"):
        yield calls


@pytest.fixture
def guarded():
    """Guard rows around every kernel output; calling it checks them (see ``guarded_outputs``)."""
    from pomt.method import _triton

    with _triton.guarded_outputs() as check:
        yield check


def _outputs(model, x, mode):
    with ops.kernels(mode), torch.no_grad():
        return model(x)


def _qkvx(b=2, h=3, n=70, d=16, c=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    return q, k, v, torch.randn(b, n, c, generator=g).to(dtype)


def _both_paths(x, q, k, v, prefix, r):
    """(the kernels' (out, scores, positions), the torch path's output), both from these inputs."""
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        got = dispatch.launch_kernels(x, q, k, v, prefix, r, scale)
        expected = pomt.method.functional.pomt_select(
            x, pomt.method.functional.pomt_scores(q, k, v, prefix, scale), prefix, r
        )
    return got, expected


def _float32_scores(q, k, v, prefix):
    return pomt.method.functional.pomt_scores(q.float(), k.float(), v.float(), prefix, q.shape[-1] ** -0.5)


@needs_interpreter
@pytest.mark.parametrize("layout", list(PREFIX_LAYOUTS))
@pytest.mark.parametrize("method,r", [("pomt", 1), ("pomt", 40), ("topk", 3)])
def test_triton_kernels_equal_the_torch_path(interpreted, layout, method, r):
    # patch 4 on 32x32: 64 ordinary tokens, more than one tile of every kernel
    model = make_tiny_vit(patch_size=4, depth=3, **PREFIX_LAYOUTS[layout])
    pomt.apply_pruning(model, method, r=r, layer=1)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with ops.kernels("torch"), torch.no_grad():
        expected = model(x)
    got = _outputs(model, x, "triton")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert interpreted["select_tokens"] == (1 if method == "pomt" else 0)  # Top-K: the torch path


@needs_interpreter
def test_triton_block_keeps_exactly_the_chosen_tokens(interpreted):
    model = make_tiny_vit(patch_size=4, depth=2, reg_tokens=2)
    block = vit_blocks(model)[1]
    counts = []
    block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    pomt.apply_pruning(model, "pomt", r=17, layer=1)
    _outputs(model, torch.randn(2, 3, 32, 32), "triton")
    assert counts == [pomt.token_layout(model).n_total - 17]


@needs_interpreter
@pytest.mark.parametrize("d", [16, 40, 48, 80, 128])
def test_triton_scores_equal_the_torch_scores(guarded, d):
    from pomt.method import _triton

    q, k, v, x = _qkvx(d=d, n=70, seed=d)
    scale = d**-0.5
    lse = _triton.row_lse(q, k, 2, scale)
    expected_lse = (q[:, :, 2:] @ k.transpose(-1, -2) * scale).logsumexp(-1)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    col, val = _triton.column_scores(q, k, v, lse, 2, scale)
    out, scores, pos = _triton.select_tokens(x, col, val, 2, 30)
    guarded()
    torch.testing.assert_close(
        scores, pomt.method.functional.pomt_scores(q, k, v, 2, scale), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        out, pomt.method.functional.pomt_select(x, scores, 2, 70 - 2 - 30 - 1), atol=1e-6, rtol=1e-6
    )
    assert sorted(pos[pos >= 0].tolist()) == sorted(list(range(30)) * 2)


@needs_interpreter
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("n,r", [(9, 1), (70, 1), (70, 60), (131, 64)])
def test_every_output_row_is_written_once_and_nothing_outside(guarded, prefix, n, r):
    q, k, v, x = _qkvx(b=3, n=n, seed=n + r)
    (out, scores, pos), expected = _both_paths(x, q, k, v, prefix, r)
    guarded()
    assert out.shape == (3, n - r, x.shape[-1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("prefix", [1, 5])
def test_attention_sink_gives_finite_scores_on_both_paths(guarded, prefix):
    # every ordinary query puts all its attention on the prefix keys (a logit gap far above
    # 104, where float32 exp underflows): every column sum of the ordinary block is 0
    q, k, v, x = _qkvx(n=40, seed=prefix)
    sink = torch.zeros(16)
    sink[0] = 40.0
    q[:, :, prefix:] = sink
    k[:, :, :prefix] = sink
    k[:, :, prefix:, 0] = 0.0
    scale = 16**-0.5
    probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    assert (probs[:, :, prefix:, prefix:] == 0).all()  # the sink, as it appears in float32
    (out, scores, pos), expected = _both_paths(x, q, k, v, prefix, 12)
    guarded()
    reference = _float32_scores(q, k, v, prefix)
    assert torch.isfinite(reference).all() and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # the value term still ranks them


@needs_interpreter
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_every_r_gives_the_same_output_on_both_paths(guarded, prefix):
    # r = 0 (one token fused with itself) up to keep = 0 (the prefix and one mean token)
    for n, seed in ((9, 0), (40, 1)):
        q, k, v, x = _qkvx(b=2, n=n, seed=seed + prefix)
        no = n - prefix
        for r in range(no) if n == 9 else (0, 1, 17, no - 2, no - 1):
            (out, scores, pos), expected = _both_paths(x, q, k, v, prefix, r)
            guarded()
            assert out.shape == (2, n - r, x.shape[-1])
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (pos == -1).all()  # keep = 0: every ordinary token is fused
    torch.testing.assert_close(out[:, prefix], x[:, prefix:].mean(dim=1), atol=1e-6, rtol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_give_the_same_output_on_both_paths(guarded, where, bad):
    q, k, v, x = _qkvx(b=3, n=70, seed=1)
    clean, _ = _both_paths(x, q, k, v, 1, 20)
    guarded()
    tensors = {"q": q, "k": k, "v": v}
    tensors[where][1, 0, 7, 3] = bad  # image 1 only
    (out, scores, pos), expected = _both_paths(x, q, k, v, 1, 20)
    guarded()  # every row of every image written, nothing outside
    assert out.shape == (3, 70 - 20, 24) and torch.isfinite(out).all()  # x is finite
    assert not scores.isnan().any()  # non-finite scores rank as -inf
    # one NaN semantics: the same tokens on both paths, the image with NaN included
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for image in (0, 2):  # an image's result never depends on its batch-mates
        torch.testing.assert_close(out[image], clean[0][image], atol=0, rtol=0)
    keep = 70 - 1 - 20 - 1
    if scores[1].isneginf().all():  # a NaN reached the image's statistics: its first tokens
        assert pos[1].tolist() == list(range(keep)) + [-1] * (69 - keep)
        torch.testing.assert_close(out[1, 1 : 1 + keep], x[1, 1 : 1 + keep], atol=0, rtol=0)
    else:  # -inf in one head of v: the other heads' maximum, finite scores
        assert where == "v" and bad == float("-inf") and torch.isfinite(scores[1]).all()
    assert sorted(pos[1][pos[1] >= 0].tolist()) == list(range(keep))  # still a ranking


@needs_interpreter
def test_non_finite_scores_rank_last_with_ties_to_the_lower_index(guarded):
    from pomt.method import _triton

    g = torch.Generator().manual_seed(3)
    prefix, n, keep = 1, 40, 12
    col, val, x = torch.rand(2, 2, n, generator=g), torch.randn(2, n, generator=g), torch.randn(2, n, 8)
    col[0, 0, prefix + 20] = float("inf")  # image 0: inf / inf is not a number, that token only
    col[1, 1, prefix + 5] = float("nan")  # image 1: a NaN column sum makes every score NaN
    out, scores, pos = _triton.select_tokens(x, col, val, prefix, keep)
    guarded()
    assert not scores.isnan().any()
    assert scores[0, 20] == -torch.inf and torch.isfinite(scores[0, :20]).all()
    assert pos[0, 20] == -1 and (pos[0] >= 0).sum() == keep
    assert (scores[1] == -torch.inf).all()  # every token ties: the first ones, in order
    assert pos[1].tolist() == list(range(keep)) + [-1] * (n - prefix - keep)
    torch.testing.assert_close(out[1, prefix : prefix + keep], x[1, prefix : prefix + keep], atol=0, rtol=0)
    torch.testing.assert_close(
        out, pomt.method.functional.pomt_select(x, scores, prefix, n - prefix - keep - 1), atol=1e-6, rtol=0
    )
    # the torch path: a NaN makes the image's scores -inf as well, and keeps its first tokens
    probs = torch.rand(2, 2, n, n, generator=g)
    probs[0, :, :, prefix + 5] = float("nan")
    scores = pomt.method.functional.pomt_scores_from_probabilities(probs, torch.randn(2, 2, n, 4), prefix)
    assert not scores.isnan().any() and (scores[0] == -torch.inf).all()
    kept = pomt.method.functional.pomt_select(x, scores, prefix, n - prefix - keep - 1)
    torch.testing.assert_close(kept[0, prefix : prefix + keep], x[0, prefix : prefix + keep], atol=0, rtol=0)


@needs_interpreter
def test_tied_tokens_go_to_the_lower_index(guarded):
    q, k, v, x = _qkvx(b=2, n=50, seed=4)
    q.zero_()  # uniform attention: equal column sums
    v[:] = v[:, :, :1]  # equal values: every score ties
    (out, scores, pos), expected = _both_paths(x, q, k, v, 2, 20)
    guarded()
    keep = 50 - 2 - 20 - 1
    assert (scores == scores[:, :1]).all()
    assert (pos[:, :keep] == torch.arange(keep, dtype=torch.int32)).all() and (pos[:, keep:] == -1).all()
    torch.testing.assert_close(out[:, 2 : 2 + keep], x[:, 2 : 2 + keep], atol=0, rtol=0)
    # the torch path may break the tie otherwise, but keeps the same number of valid rows
    assert expected.shape == out.shape and torch.isfinite(expected).all()


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 64])
def test_low_precision_kernels_against_a_float32_reference(guarded, dtype, d):
    q, k, v, x = _qkvx(b=2, n=90, d=d, dtype=dtype, seed=d)
    (out, scores, pos), _ = _both_paths(x, q, k, v, 1, 33)
    guarded()
    reference = _float32_scores(q, k, v, 1)
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)  # fp32 accumulation
    keep = 90 - 1 - 33 - 1
    edge = reference.topk(keep, dim=1).values[:, -1:]
    kept = pos >= 0
    assert (kept.sum(1) == keep).all()
    assert (reference[kept] >= (edge.expand_as(reference)[kept] - 1e-4)).all()  # the best, ties aside
    order = pos.long().masked_fill(~kept, 999).argsort(dim=1)[:, :keep]
    torch.testing.assert_close(out[:, 1 : 1 + keep], x[:, 1:].gather(1, order[..., None].expand(-1, -1, 24)))
    mean = (x[:, 1:].float() * (~kept)[..., None]).sum(1) / (~kept).sum(1, keepdim=True)
    torch.testing.assert_close(out[:, -1].float(), mean, atol=1e-2, rtol=1e-2)
    assert choice_is_equal(x, q, k, v, 1, 33)


def choice_is_equal(x, q, k, v, prefix, r) -> bool:
    """What ``auto``'s check says of the kernels on this input (speed aside)."""
    got = dispatch.launch_kernels(x, q, k, v, prefix, r, q.shape[-1] ** -0.5)
    keep = x.shape[1] - prefix - r - 1
    return dispatch.mismatch(got, x, _float32_scores(q, k, v, prefix), prefix, keep, q.dtype) is None


@needs_interpreter
def test_offsets_past_two_to_the_31_elements(guarded):
    # q, k, v and x of 3 images whose batch stride (2**30 + 64 elements) fits in 32 bits,
    # inside one lazily allocated float16 storage: image 2 starts past 2**31 elements, where a
    # 32-bit offset wraps and reads before the tensor
    b, h, n, d, c, stride = 3, 2, 40, 16, 32, 2**30 + 64
    storage = torch.empty(2 * stride + 3 * h * n * d + n * c, dtype=torch.float16)
    q, k, v = (storage.as_strided((b, h, n, d), (stride, n * d, d, 1), i * h * n * d) for i in range(3))
    x = storage.as_strided((b, n, c), (stride, c, 1), 3 * h * n * d)
    g = torch.Generator().manual_seed(0)
    for t in (q, k, v, x):
        t.copy_(torch.randn(t.shape, generator=g))
    assert x[2].storage_offset() >= 2**31
    got, _ = _both_paths(x, q, k, v, 1, 10)
    guarded()
    compact, _ = _both_paths(*(t.contiguous() for t in (x, q, k, v)), 1, 10)
    guarded()
    for a, e in zip(got, compact, strict=True):
        assert torch.equal(a, e)


@needs_interpreter
def test_head_offsets_past_two_to_the_31_elements(guarded):
    # a head-major layout whose head stride (2**30 + 64 elements) fits in 32 bits, but head 2
    # starts past 2**31 elements: h * stride must be computed in 64 bits
    b, h, n, d, c, stride = 2, 3, 40, 16, 24, 2**30 + 64
    storage = torch.empty(2 * stride + 3 * b * n * d, dtype=torch.float16)
    q, k, v = (storage.as_strided((b, h, n, d), (n * d, stride, d, 1), i * b * n * d) for i in range(3))
    g = torch.Generator().manual_seed(0)
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=g))
    x = torch.randn(b, n, c, generator=g).half()
    assert q[:, 2].storage_offset() >= 2**31
    got, _ = _both_paths(x, q, k, v, 1, 10)
    guarded()
    compact, _ = _both_paths(x, *(t.contiguous() for t in (q, k, v)), 1, 10)
    guarded()
    for a, e in zip(got, compact, strict=True):
        assert torch.equal(a, e)


@needs_interpreter
def test_training_uses_the_differentiable_torch_path(interpreted):
    model = make_tiny_vit(patch_size=4, depth=2).train()
    pomt.apply_pruning(model, "pomt", r=10, layer=0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in vit_blocks(model)[0].parameters())
    assert interpreted["select_tokens"] == 0


@pytest.mark.skipif(INTERPRETING, reason="needs the interpreter off")
def test_triton_without_interpreter_on_cpu_is_a_clear_error():
    model = make_tiny_vit()
    pomt.apply_pruning(model, "pomt", r=3, layer=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _outputs(model, torch.randn(1, 3, 32, 32), "triton")
    with pytest.raises(ValueError, match="kernels must be one of auto, torch, triton"):
        with ops.kernels("cuda"):
            pass


def test_a_bad_pomt_kernels_value_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "_DEFAULT_MODE", "Triton")  # as if POMT_KERNELS=Triton
    model = make_tiny_vit()
    pomt.apply_pruning(model, "pomt", r=3, layer=1)
    with pytest.raises(ValueError, match="POMT_KERNELS must be one of auto, torch, triton, got 'Triton'"):
        ops.kernel_backend("cpu")
    q, k, v, x = _qkvx(b=2, n=40)
    with pytest.raises(ValueError, match="POMT_KERNELS must be one of"):
        ops.use_kernels(x, q, k, v, 1, 8, 0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_tensors_device():
    q, k, v, x = (t.to("cuda:1", torch.float16) for t in _qkvx(b=2, n=70))
    torch.cuda.set_device(0)
    with ops.kernels("triton"), torch.no_grad():
        out, scores, _ = dispatch.launch_kernels(x, q, k, v, 1, 20, 0.25)
    torch.testing.assert_close(scores.cpu(), _float32_scores(q, k, v, 1).cpu(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- sm_90 build


def _cubin_usage(cubin: bytes, tmp_path) -> tuple[int, int]:
    """(registers, stack bytes) per thread, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        pytest.skip("Triton's cuobjdump is not installed")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    assert match, out
    return int(match[1]), int(match[2])


# float32 outputs and scratch of the kernels; every other pointer has the inputs' dtype
_POINTERS = {"lse_ptr": torch.float32, "col_ptr": torch.float32, "val_ptr": torch.float32,
             "score_ptr": torch.float32, "pos_ptr": torch.int32}  # fmt: skip


def _compile_sm90(kernel, dtype: torch.dtype, constants: dict, num_warps: int):
    """Build ``kernel`` for sm_90 with ``dtype`` inputs, ints for sizes and strides, a float scale."""
    from triton.backends.compiler import GPUTarget

    codes = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + codes[_POINTERS.get(name, dtype)]
        else:
            signature[name] = "fp32" if name in ("scale", "TINY") else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except (RuntimeError, FileNotFoundError) as err:  # no ptxas in this Triton build
        if "ptxas" in str(err):
            pytest.skip(f"cannot build cubins here: {err}")
        raise


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="interpreted kernels cannot be compiled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_build_for_sm90_without_spills(dtype, tmp_path):
    from pomt.method import _triton as kernels

    flags = dict(IEEE=dtype == torch.float32, UPCAST=False)
    builds = {}
    for d in (16, 40, 64, 80, 128):  # head dims: BLOCK_D 16, 64, 64, 128, 128
        block_d = kernels._block_d(d)
        block_m, block_n = kernels._lse_tiles(block_d, dtype)
        builds[f"row_lse d={d}"] = (
            kernels._row_lse,
            dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags),
        )
        block_m = kernels._COL_M * (1 if dtype == torch.float32 else 2)
        builds[f"column_scores d={d}"] = (
            kernels._column_scores,
            dict(BLOCK_M=block_m, BLOCK_N=kernels._COL_N, BLOCK_D=block_d, WIDE=False, **flags),
        )
    small = {
        "scores": (kernels._scores, dict(BLOCK=kernels._SCORE_BLOCK)),
        "rank": (kernels._rank, dict(BLOCK_J=kernels._RANK_J, BLOCK_I=kernels._RANK_I)),
        "gather": (kernels._gather, dict(BLOCK_J=kernels._GATHER_J, BLOCK_C=kernels._GATHER_C)),
    }
    for name, (kernel, constants) in {**builds, **small}.items():
        warps = kernels._SMALL_WARPS if name in small else kernels._WARPS
        compiled = _compile_sm90(kernel, dtype, constants, warps)
        registers, stack = _cubin_usage(compiled.asm["cubin"], tmp_path)
        assert stack == 0, f"{name} spills {stack} bytes per thread ({registers} registers)"


def test_guard_rows_catch_a_row_left_unwritten_and_a_store_outside():
    from pomt.method import _triton

    with _triton.guarded_outputs() as check:
        buffer = _triton._empty((4, 3), torch.empty(0), torch.float32)
        buffer[:3] = 0.0  # row 3 never written
        with pytest.raises(AssertionError, match="left part of its"):
            check()
    with _triton.guarded_outputs() as check:
        buffer = _triton._empty((4, 3), torch.empty(0), torch.int32)
        buffer.fill_(0)
        buffer.as_strided((1, 3), (3, 1), buffer.storage_offset() + 12).fill_(1)  # the row after it
        with pytest.raises(AssertionError, match="wrote outside its"):
            check()
    assert _triton._empty((1,), torch.empty(0), torch.float32).shape == (1,)  # restored afterwards
