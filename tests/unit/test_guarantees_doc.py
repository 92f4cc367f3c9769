"""docs/guarantees.md names, after each promise, the tests that check it:
every path it names must exist, and every test it names (``path::name``)
must be defined in that file (a renamed or deleted test breaks the doc)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_named_in_the_guarantees_exists() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    assert len(named) >= 20, named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
    tests = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(tests) >= 10, tests
    undefined = sorted(
        f"{path}::{name}" for path, name in tests
        if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M))
    assert not undefined, f"docs/guarantees.md names tests that do not exist: {undefined}"
