"""Words with one meaning: the renamed public names still work under their old names, with a
DeprecationWarning (CPU, offline)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_vit

from pomt import SearchConfig
from pomt.offline.verify import paired_speedups, speedup_samples


def test_verify_groups_accepts_its_old_name_verify_blocks():
    with pytest.warns(DeprecationWarning, match="verify_groups"):
        old = SearchConfig(verify_blocks=2)
    assert old == SearchConfig(verify_groups=2) and "verify_blocks" not in old.to_dict()
    with pytest.warns(DeprecationWarning):
        assert SearchConfig.coerce({"verify_blocks": 3}).verify_groups == 3
    assert dataclasses.replace(old, alpha=0.3).verify_groups == 2
    with pytest.raises(ValueError, match="verify_groups must be a positive int"):
        SearchConfig(verify_groups=0)


def test_timing_groups_accept_their_old_keyword_blocks():
    vit = make_tiny_vit()
    with pytest.warns(DeprecationWarning, match="groups="):
        samples, _ = speedup_samples(
            vit, vit, 15, layer=0, batch_size=2, device=torch.device("cpu"), dtype=torch.float32,
            warmup=1, min_run_time=0.0, min_pairs=3, blocks=3,
        )  # fmt: skip
    assert len(samples) == 3
    with pytest.warns(DeprecationWarning):
        samples, _ = paired_speedups((lambda: 1, None), (lambda: 2, None), min_run_time=0.0, blocks=2)
    assert len(samples) == 2
