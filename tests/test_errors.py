"""Our own errors: each is the built-in error it refines (callers that catch ``ValueError`` keep
working), the command line turns them into exit status 2 with the message, and anything else
(out of memory, a shape bug) keeps its traceback."""

from __future__ import annotations

import pytest
import torch

from pomt import apply_pruning, cli, pruning_config
from pomt.errors import PomtError, PruningError, UnavailableError, is_int


def test_a_bad_pruning_request_is_a_pruning_error_and_a_value_error(tiny_vit):
    apply_pruning(tiny_vit, "topk", r=2)
    for method, r, layer, match in (
        ("cut", 2, 1, "unknown pruning method 'cut'; valid: "),
        ("pomt", 17, 1, r"r must be an int in 0\.\.15"),
        ("pomt", 2, 4, r"layer must be an int in 0\.\.3"),
        ("tome", True, 1, "r must be an int or a list of 4 ints"),
    ):
        with pytest.raises(PruningError, match=match) as info:
            apply_pruning(tiny_vit, method, r=r, layer=layer)
        assert isinstance(info.value, ValueError) and isinstance(info.value, PomtError)
    assert pruning_config(tiny_vit).method == "topk"  # validated before anything changed


def test_the_int_check_refuses_bools():
    assert [is_int(v) for v in (0, 3, True, 2.0, "2", None)] == [True, True, False, False, False, False]


def _failing_latency_command(monkeypatch, error: BaseException) -> int:
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli.profiling, "build_model", fail)  # what profile-latency calls
    return cli.main(["profile-latency", "--model", "vit_tiny_patch16_224", "-o", "x.json"])


def test_our_errors_exit_2_with_the_message(monkeypatch, capsys):
    error = UnavailableError("could not fetch pretrained weights for 'm': pass weights=PATH")
    assert _failing_latency_command(monkeypatch, error) == 2
    assert "error: could not fetch pretrained weights for 'm': pass weights=PATH" in capsys.readouterr().err


def test_an_unexpected_runtime_error_keeps_its_traceback(monkeypatch):
    error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="out of memory"):
        _failing_latency_command(monkeypatch, error)


def test_cuda_without_cuda_is_explained_not_crashed(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["profile-latency", "--model", "m", "--device", "cuda", "-o", "x.json"]) == 2
    assert "--device 'cuda': CUDA is not available here; use --device cpu" in capsys.readouterr().err
