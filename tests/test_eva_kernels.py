"""POMT's Triton kernels in an Eva block (rotary positions), run under Triton's CPU interpreter
in a child pytest: the same tokens, rows and output as the plain torch path."""

from __future__ import annotations

import pytest
import torch
from _eva_models import image_batch, make_eva
from _interpreter import INTERPRETING, needs_interpreter, run_interpreted

import pomt
from pomt.method import dispatch, ops

pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETING, reason="the parent starts the interpreted child")
def test_eva_kernels_under_the_triton_interpreter():
    run_interpreted(__file__, 2)


@needs_interpreter
@pytest.mark.parametrize("family", ["dinov3", "eva02"])
def test_kernels_equal_the_torch_path_in_an_eva_model(family, monkeypatch):
    model = make_eva(family)
    with torch.no_grad():
        model.head.weight.normal_()
    x = image_batch(model)
    selections = []
    real = dispatch.launch_kernels
    monkeypatch.setattr(dispatch, "launch_kernels", lambda *a: selections.append(1) or real(*a))
    with torch.no_grad(), pomt.pruned(model, "pomt", r=8, layer=1):
        with ops.kernels("torch"):
            expected = model(x)
        with ops.kernels("triton"):
            got = model(x)
    assert selections == [1]  # the kernels chose the tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
