"""The two implementations of the pruning blocks' work agree: the plain torch path (CPU) and
the Triton kernels (CUDA), run here on the CPU by Triton's interpreter; and the kernels
compile for a Hopper GPU (sm_90) without spilling registers."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_vit

import pomt
from pomt import ops
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
    expected = ops.pomt_scores_from_probabilities(probs, v, prefix)
    for align in (False, True):  # True pads the 37 keys to 40, as on CUDA
        torch.testing.assert_close(ops.pomt_scores(q, k, v, prefix, scale, align=align), expected)
    assert expected.shape == (2, 37 - prefix) and (expected.amax(dim=1) > 1).all()


# Triton's interpreter must be on before triton is first imported, so the tests that run the
# kernels on the CPU run in a child pytest with TRITON_INTERPRET=1 (the first test below).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="this is the parent")
def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not sm90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) >= 12, summary  # every interpreter test ran, none was skipped


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


def _outputs(model, x, mode):
    with ops.kernels(mode), torch.no_grad():
        return model(x)


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
    has_cls = layout != "no prefix"
    assert interpreted["select_tokens"] == (
        0 if method == "topk" and not has_cls else 3 if method == "topk" else 1
    )


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
def test_triton_scores_equal_the_torch_scores(interpreted):
    from pomt import _triton

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 16) for _ in range(3))
    scale = 16**-0.5
    lse = _triton.row_lse(q, k, 2, scale)
    expected_lse = (q[:, :, 2:] @ k.transpose(-1, -2) * scale).logsumexp(-1)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
    col, val = _triton.column_scores(q, k, v, lse, 2, scale)
    x = torch.randn(2, 70, 8)
    _, scores = _triton.select_tokens(x, 2, 30, pomt=(col, val))
    torch.testing.assert_close(scores, ops.pomt_scores(q, k, v, 2, scale), atol=1e-5, rtol=1e-5)
    _, importance = _triton.select_tokens(x, 2, 30, qk=(q, k, scale))
    torch.testing.assert_close(importance, ops.cls_attention(q, k, 2, scale, True), atol=1e-6, rtol=1e-5)


@needs_interpreter
def test_training_uses_the_differentiable_torch_gather(interpreted):
    model = make_tiny_vit(patch_size=4, depth=2).train()
    pomt.apply_pruning(model, "pomt", r=10, layer=0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in vit_blocks(model)[0].parameters())


@pytest.mark.skipif(INTERPRETING, reason="needs the interpreter off")
def test_triton_without_interpreter_on_cpu_is_a_clear_error():
    model = make_tiny_vit()
    pomt.apply_pruning(model, "pomt", r=3, layer=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _outputs(model, torch.randn(1, 3, 32, 32), "triton")
    with pytest.raises(ValueError, match="kernels must be one of auto, torch, triton"):
        with ops.kernels("cuda"):
            pass


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
            signature[name] = "fp32" if name == "scale" else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except (RuntimeError, FileNotFoundError) as err:  # no ptxas in this Triton build
        if "ptxas" in str(err):
            pytest.skip(f"cannot build cubins here: {err}")
        raise


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="interpreted kernels cannot be compiled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_build_for_sm90_without_spills(dtype, tmp_path):
    from pomt import _triton as kernels

    ieee, d = dtype == torch.float32, 64
    builds = {
        "row_lse": (
            kernels._row_lse,
            dict(BLOCK_M=kernels._LSE_M, BLOCK_N=kernels._LSE_N, BLOCK_D=d, IEEE=ieee),
        ),
        "column_scores": (
            kernels._column_scores,
            dict(BLOCK_M=kernels._COL_M * (1 if ieee else 2), BLOCK_N=kernels._COL_N, BLOCK_D=d, IEEE=ieee),
        ),
    }
    for method in ("pomt", "topk"):
        select = dict(
            BLOCK_J=kernels._SEL_J, BLOCK_I=kernels._SEL_I, BLOCK_C=kernels._SEL_C, BLOCK_D=d, BLOCK_H=8
        )
        builds[f"select ({method})"] = (kernels._select, dict(POMT=method == "pomt", **select))
    for name, (kernel, constants) in builds.items():
        compiled = _compile_sm90(kernel, dtype, constants, kernels._WARPS)
        registers, stack = _cubin_usage(compiled.asm["cubin"], tmp_path)
        assert stack == 0, f"{name} spills {stack} bytes per thread ({registers} registers)"
