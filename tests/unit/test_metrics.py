"""Prometheus text from a node snapshot."""

from __future__ import annotations

import re

from chatd.metrics import FAMILIES, render

SAMPLE = re.compile(r'^([a-z_]+)(\{child="([^"\\]|\\.)*"\})? (-?[0-9.e+]+)$')


def samples(text: str) -> dict[str, float]:
    """name{labels} -> value; every non-comment line must be a valid sample."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        found[line.rsplit(" ", 1)[0]] = float(m.group(4))
    return found


def test_an_empty_snapshot_still_says_up() -> None:
    assert samples(render({})) == {"chatd_up": 1.0}


def test_each_child_reports_under_its_name() -> None:
    text = render({"children": [
        {"name": "shard-0", "restarts": 1, "rss_bytes": 1000, "cpu_seconds": 1.5,
         "open_fds": 12, "status": {"connections": 3, "users": 2, "committed": 40,
                                    "batches": 5, "queued": 0, "delivered": 70}},
        {"name": "api-0", "restarts": 0, "rss_bytes": 2000, "cpu_seconds": 0.25,
         "open_fds": 9, "status": {}},
    ]})
    got = samples(text)
    assert got['chatd_connections{child="shard-0"}'] == 3
    assert got['chatd_messages_stored_total{child="shard-0"}'] == 40
    assert got['chatd_deliveries_total{child="shard-0"}'] == 70
    assert got['chatd_process_cpu_seconds_total{child="api-0"}'] == 0.25
    assert got['chatd_child_restarts_total{child="shard-0"}'] == 1
    assert 'chatd_connections{child="api-0"}' not in got  # not reported, not invented
    for name, kind, _, _ in FAMILIES:
        assert f"# TYPE {name} {kind}" in text


def test_odd_names_and_values_cannot_break_the_format() -> None:
    text = render({"children": [{"name": 'we"ird\\\nname', "restarts": True,
                                 "rss_bytes": "12", "status": {"connections": None}}]})
    samples(text)  # parses: the label is escaped, non-numbers are left out
    assert "restarts" not in text and "resident" not in text
