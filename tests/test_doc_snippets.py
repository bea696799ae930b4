"""The callback's attributes that the README and docs/callback.md read in their examples exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pomt.callbacks import POMTCallback

ROOT = Path(__file__).resolve().parents[1]


def callback_attributes(text: str) -> set[str]:
    """``pomt.<name>`` in Python blocks where ``pomt`` is a POMTCallback, and in the bullet
    list of docs/callback.md's results (``- `pomt.<name>` ...``)."""
    names: set[str] = set()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        made = re.search(r"^pomt = POMTCallback\(", block, flags=re.M)
        if made:  # what the example reads from the callback after making it
            names |= set(re.findall(r"\bpomt\.(\w+)", block[made.end() :]))
    names |= set(re.findall(r"^- `pomt\.(\w+)`", text, flags=re.M))
    return names


@pytest.mark.parametrize("doc", ["README.md", "docs/callback.md"])
def test_the_callback_attributes_the_docs_read_exist(doc):
    names = callback_attributes((ROOT / doc).read_text())
    assert names, f"{doc}: no callback attribute found: the example moved, update this test"
    callback = POMTCallback(r=4)
    missing = sorted(n for n in names if not hasattr(callback, n))
    assert not missing, f"{doc} reads POMTCallback attributes that do not exist: {missing}"
