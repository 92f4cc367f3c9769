"""The snapshot collector: what a supervisor snapshot becomes in Prometheus text,
read back with prometheus_client's own parser."""

from __future__ import annotations

import math
from typing import Any

import prometheus_client
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from chatd import metrics

Key = tuple[str, frozenset[tuple[str, str]]]


def scrape(snapshot: Any) -> tuple[str, dict[str, str], dict[Key, float]]:
    """(text, family name -> type, (sample name, labels) -> value) of ``snapshot``."""
    text = metrics.render(metrics.make_registry(lambda: snapshot)).decode()
    types: dict[str, str] = {}
    values: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in values, f"duplicate sample {key}"
            values[key] = s.value
    return text, types, values


def at(values: dict[Key, float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def hist(buckets: list[list[float]], total: float, count: int) -> dict[str, Any]:
    return {"buckets": buckets, "sum": total, "count": count}


FULL_STATUS: dict[str, Any] = {
    "connections": 3, "users": 2, "committed": 40, "batches": 5, "queued": 1,
    "deliveries": 70, "frames_in": 45, "frames_out": 120, "bytes_in": 4500,
    "bytes_out": 16000, "auth_failures": 2, "closes": {1000: 4, 4009: 1, "1001": 2},
    "batch_size": hist([[1, 2], [8, 4], [64, 5]], 40, 5),
    "commit_seconds": hist([[0.001, 3], [0.01, 5], [math.inf, 5]], 0.012, 5),
    # a node of a cluster
    "store_ok": False, "chain_w": 900, "chain_pending": 2, "remote_units": 30,
    "store_reads": 1, "bus_up": True, "bus_published": 12, "bus_dropped": 3,
    "bus_subscriptions": 4,
}


def test_an_empty_snapshot_says_up_and_nothing_else() -> None:
    for snapshot in ({}, {"children": []}):
        _, types, values = scrape(snapshot)
        assert types == {"chatd_up": "gauge"}
        assert values == {("chatd_up", frozenset()): 1.0}


def test_every_figure_of_every_child_under_its_process_label() -> None:
    text, types, values = scrape({"children": [
        {"name": "shard-0", "restarts": 1, "rss_bytes": 1000, "cpu_seconds": 1.5,
         "open_fds": 12, "status": FULL_STATUS},
        {"name": "api-0", "restarts": 0, "rss_bytes": 2000, "cpu_seconds": 0.25,
         "open_fds": 9, "status": {}},
    ]})
    shard, api = {"process": "shard-0"}, {"process": "api-0"}
    assert at(values, "chatd_up") == 1
    assert at(values, "chatd_connections", **shard) == 3
    assert at(values, "chatd_online_users", **shard) == 2
    assert at(values, "chatd_messages_stored_total", **shard) == 40
    assert at(values, "chatd_store_batches_total", **shard) == 5
    assert at(values, "chatd_store_queue", **shard) == 1
    assert at(values, "chatd_deliveries_total", **shard) == 70
    assert at(values, "chatd_frames_received_total", **shard) == 45
    assert at(values, "chatd_frames_sent_total", **shard) == 120
    assert at(values, "chatd_received_bytes_total", **shard) == 4500
    assert at(values, "chatd_sent_bytes_total", **shard) == 16000
    assert at(values, "chatd_auth_failures_total", **shard) == 2
    assert at(values, "chatd_store_up", **shard) == 0
    assert at(values, "chatd_chain_position", **shard) == 900
    assert at(values, "chatd_chain_waiting_units", **shard) == 2
    assert at(values, "chatd_cluster_remote_units_total", **shard) == 30
    assert at(values, "chatd_cluster_store_reads_total", **shard) == 1
    assert at(values, "chatd_bus_up", **shard) == 1
    assert at(values, "chatd_bus_published_total", **shard) == 12
    assert at(values, "chatd_bus_dropped_total", **shard) == 3
    assert at(values, "chatd_bus_subscriptions", **shard) == 4
    assert at(values, "chatd_closes_total", code="1000", **shard) == 4
    assert at(values, "chatd_closes_total", code="1001", **shard) == 2
    assert at(values, "chatd_closes_total", code="4009", **shard) == 1
    assert at(values, "chatd_process_resident_bytes", **api) == 2000
    assert at(values, "chatd_process_cpu_seconds_total", **api) == 0.25
    assert at(values, "chatd_process_open_fds", **shard) == 12
    assert at(values, "chatd_child_restarts_total", **shard) == 1
    assert at(values, "chatd_child_restarts_total", **api) == 0
    # the API worker reports no shard figures: none are invented for it
    assert ("chatd_connections", frozenset(api.items())) not in values
    # every family has its declared type (the parser names counters without _total)
    for fam in metrics.FAMILIES:
        kind = "gauge" if fam.kind == "flag" else fam.kind
        assert types[fam.name.removesuffix("_total")] == kind
    assert types["chatd_closes"] == "counter"
    assert types["chatd_store_batch_size"] == types["chatd_store_commit_seconds"] == "histogram"
    assert "# TYPE chatd_messages_stored_total counter" in text


def test_histograms_are_cumulative_with_inf_added_from_the_count() -> None:
    _, _, values = scrape({"children": [{"name": "shard-0", "status": FULL_STATUS}]})
    shard = {"process": "shard-0"}
    buckets = {le: at(values, "chatd_store_batch_size_bucket", le=le, **shard)
               for le in ("1.0", "8.0", "64.0", "+Inf")}
    assert buckets == {"1.0": 2, "8.0": 4, "64.0": 5, "+Inf": 5}
    assert at(values, "chatd_store_batch_size_count", **shard) == 5
    assert at(values, "chatd_store_batch_size_sum", **shard) == 40
    # an explicit +Inf bucket is kept, not doubled
    assert at(values, "chatd_store_commit_seconds_bucket", le="0.001", **shard) == 3
    assert at(values, "chatd_store_commit_seconds_bucket", le="+Inf", **shard) == 5
    assert at(values, "chatd_store_commit_seconds_sum", **shard) == 0.012
    assert sum(1 for name, _ in values if name == "chatd_store_commit_seconds_bucket") == 3


def test_the_older_delivered_key_is_read_when_deliveries_is_absent() -> None:
    _, _, values = scrape({"children": [
        {"name": "shard-0", "status": {"delivered": 7}},
        {"name": "shard-1", "status": {"delivered": 7, "deliveries": 9}},
    ]})
    assert at(values, "chatd_deliveries_total", process="shard-0") == 7
    assert at(values, "chatd_deliveries_total", process="shard-1") == 9


def test_absent_and_mistyped_keys_produce_no_sample() -> None:
    bad: dict[str, Any] = {
        "connections": None, "users": "2", "committed": True, "batches": -1,
        "queued": [1], "deliveries": {"a": 1}, "frames_in": 10**400,
        "closes": {"x": 1, -1: 2, True: 3, 1000: "4", 1.5: 1, "٣": 1, 4008: 6},
        "batch_size": hist([[8, 4], [1, 2]], 1, 4),  # bounds not increasing
        "commit_seconds": hist([[0.1, 5], [1, 3]], 1, 5),  # counts falling
    }
    text, types, values = scrape({"children": [
        {"name": "shard-0", "restarts": "1", "rss_bytes": None, "status": bad},
        "not a child", {"status": "not a dict"},
    ]})
    assert set(types) == {"chatd_up", "chatd_closes"}
    assert values == {("chatd_up", frozenset()): 1.0,
                      ("chatd_closes_total", frozenset({("process", "shard-0"),
                                                        ("code", "4008")})): 6.0}
    assert "restarts" not in text and "resident" not in text


def test_malformed_histograms_are_left_out() -> None:
    cases: list[Any] = [
        None, 3, "x", [], {"buckets": "no", "sum": 1, "count": 1},
        {"buckets": [[1, 1]], "count": 1},  # no sum
        {"buckets": [[1, 2]], "sum": 1},  # no count and no +Inf bucket
        hist([[1, 2]], 1, 1),  # count below the last bucket
        hist([[1, 1], [math.inf, 2]], 1, 3),  # +Inf bucket disagrees with the count
        hist([[0, 1]], 0, 1),  # a bound that is not positive
        hist([[math.nan, 1]], 1, 1), hist([[1, math.nan]], 1, 1), hist([[1, 1]], 1, math.nan),
        hist([[1]], 1, 1), hist([[1, 1, 1]], 1, 1), hist([["1", 1]], 1, 1),
    ]
    for case in cases:
        _, types, _ = scrape({"children": [{"name": "shard-0", "status": {"batch_size": case}}]})
        assert "chatd_store_batch_size" not in types, case


def test_a_histogram_of_no_buckets_is_its_count_and_sum() -> None:
    _, _, values = scrape({"children": [
        {"name": "shard-0", "status": {"commit_seconds": hist([], 0.5, 2)}}]})
    assert at(values, "chatd_store_commit_seconds_bucket", le="+Inf", process="shard-0") == 2
    assert at(values, "chatd_store_commit_seconds_count", process="shard-0") == 2


def test_infinities_and_nan_are_written_as_prometheus_spells_them() -> None:
    text, _, values = scrape({"children": [
        {"name": "a", "status": {"queued": math.inf}},
        {"name": "b", "status": {"queued": -math.inf}},
        {"name": "c", "status": {"queued": math.nan}},
    ]})
    lines = set(text.splitlines())
    assert 'chatd_store_queue{process="a"} +Inf' in lines
    assert 'chatd_store_queue{process="b"} -Inf' in lines
    assert 'chatd_store_queue{process="c"} NaN' in lines
    assert "inf" not in text and "nan" not in text  # what repr(float) used to write
    assert at(values, "chatd_store_queue", process="a") == math.inf
    assert at(values, "chatd_store_queue", process="b") == -math.inf
    assert math.isnan(at(values, "chatd_store_queue", process="c"))


def test_a_second_child_of_the_same_name_is_skipped() -> None:
    _, _, values = scrape({"children": [{"name": "shard-0", "restarts": 1},
                                        {"name": "shard-0", "restarts": 2}]})
    assert at(values, "chatd_child_restarts_total", process="shard-0") == 1


def test_odd_process_names_are_escaped() -> None:
    name = 'we"ird\\\nname'
    _, _, values = scrape({"children": [{"name": name, "status": {"connections": 1}}]})
    assert at(values, "chatd_connections", process=name) == 1


def test_each_scrape_reads_the_latest_snapshot_and_the_global_registry_stays_clean() -> None:
    latest: dict[str, Any] = {}
    registry = metrics.make_registry(lambda: latest)
    assert b"chatd_connections" not in metrics.render(registry)
    latest["children"] = [{"name": "shard-0", "status": {"connections": 5}}]
    assert b'chatd_connections{process="shard-0"} 5.0' in metrics.render(registry)
    assert b"chatd_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4),
    max_leaves=20,
)
status_keys = st.sampled_from(["connections", "committed", "deliveries", "delivered", "closes",
                               "batch_size", "commit_seconds", "frames_in", "other"])
children = st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["shard-0", "api-0"]) | st.text(max_size=8),
    "restarts": json_values,
    "status": st.dictionaries(status_keys, json_values, max_size=6) | json_values,
}), max_size=3)


@given(st.fixed_dictionaries({"children": children}) | json_values)
def test_no_snapshot_breaks_the_collector_or_the_format(snapshot: Any) -> None:
    _, _, values = scrape(snapshot)  # parses, and no sample is written twice
    assert values[("chatd_up", frozenset())] == 1
