"""``pruned`` / ``pruning_restored``: temporary pruning with one restore rule, the pruning the
model had on entry (none, or the user's), also after an error."""

from __future__ import annotations

import pytest
import torch

from pomt import apply_pruning, pruned, pruning_config, pruning_restored, token_schedule
from pomt.errors import PruningError


def test_pruned_prunes_inside_and_restores_no_pruning(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = tiny_vit(x)
        with pruned(tiny_vit, "pomt", r=8, layer=1) as model:
            assert model is tiny_vit and pruning_config(tiny_vit).r == 8
            assert token_schedule(tiny_vit, "pomt", 8, 1)[-1] == 9
            assert not torch.allclose(tiny_vit(x), reference)
        assert pruning_config(tiny_vit) is None
        torch.testing.assert_close(tiny_vit(x), reference)


def test_pruned_puts_the_users_pruning_back_also_after_an_error(tiny_vit):
    apply_pruning(tiny_vit, "tome", r=[2, 1, 0, 3], layer=2)
    with pytest.raises(KeyError), pruned(tiny_vit, "topk", r=1):
        assert pruning_config(tiny_vit).method == "topk"
        raise KeyError("inside")
    config = pruning_config(tiny_vit)
    assert (config.method, config.r, config.layer) == ("tome", (2, 1, 0, 3), 2)


def test_a_bad_request_changes_nothing(tiny_vit):
    apply_pruning(tiny_vit, "pomt", r=4, layer=1)
    with pytest.raises(PruningError, match="r must be an int in 0..15"), pruned(tiny_vit, "pomt", r=99):
        pass
    assert pruning_config(tiny_vit).r == 4


def test_pruning_restored_undoes_any_number_of_changes(tiny_vit):
    with pruning_restored(tiny_vit):
        for r in (1, 5, 9):
            apply_pruning(tiny_vit, "pomt", r=r, layer=1)
    assert pruning_config(tiny_vit) is None
