"""One word, one meaning, and no old names kept alive (the package is unreleased): the renamed
settings and keywords are gone, and using one is a clear error naming the valid ones (CPU, offline)."""

from __future__ import annotations

import pytest

from pomt import SearchConfig
from pomt.deploy.targets import Call
from pomt.errors import PomtValueError
from pomt.offline.verify import paired_speedups


def test_verify_groups_has_no_old_name():
    with pytest.raises(TypeError, match="verify_blocks"):
        SearchConfig(verify_blocks=2)
    with pytest.raises(PomtValueError, match="unknown key.*verify_blocks.*verify_groups"):
        SearchConfig.coerce({"verify_blocks": 3})
    assert SearchConfig(verify_groups=2).verify_groups == 2
    with pytest.raises(ValueError, match="verify_groups must be a positive int"):
        SearchConfig(verify_groups=0)


def test_timing_groups_take_no_old_keyword():
    with pytest.raises(TypeError, match="blocks"):
        paired_speedups(Call(lambda: 1), Call(lambda: 2), max_time=0.0, blocks=2)
    samples, _ = paired_speedups(Call(lambda: 1), Call(lambda: 2), max_time=0.0, groups=2)
    assert len(samples) == 2


def test_search_is_the_search_and_selection_the_selection():
    import pomt

    assert not hasattr(pomt, "Search")  # the result of find_r is a SearchResult
    assert pomt.SearchResult.__name__ == "SearchResult" and pomt.SearchConfig.__name__ == "SearchConfig"
    from pomt.offline import grid

    assert not hasattr(grid, "adaptive_search")  # the token counts it picks are the adaptive grid
