"""A node's figures as Prometheus metrics, through ``prometheus_client``.

The supervisor builds a snapshot every ``METRICS_PERIOD_S`` from what each
child reports (its ``status`` dict) and what psutil reads of each child
process, and hands it to the API workers. Each API app has its own
``CollectorRegistry`` (never the library's global one) holding a
``SnapshotCollector`` over the latest snapshot; ``GET /metrics`` renders it
with ``generate_latest``. A scrape therefore sees figures at most a couple of
seconds old; counters only grow (a restarted child's counters start again
from 0, which Prometheus' ``rate()`` handles as a reset).

Snapshot shape (``Supervisor.snapshot``)::

    {"children": [{"name": "shard-0", "restarts": 0, "rss_bytes": ..., "cpu_seconds": ...,
                   "open_fds": ..., "status": {"connections": ..., "committed": ..., ...}}]}

Every per-process sample carries ``process="<child name>"`` (``shard-0``,
``api-0``, ...); the node's figure is ``sum without (process) (...)``. Only
``chatd_up`` is the node's own.

What the collector reads. Child fields, set by the supervisor:

=============== ===== ====================================================
key             type  metric
=============== ===== ====================================================
``restarts``    int   ``chatd_child_restarts_total`` (counter)
``rss_bytes``   int   ``chatd_process_resident_bytes`` (gauge)
``cpu_seconds`` float ``chatd_process_cpu_seconds_total`` (counter)
``open_fds``    int   ``chatd_process_open_fds`` (gauge)
=============== ===== ====================================================

Keys of a child's ``status`` dict, reported by the child itself:

================== ========= =====================================================
key                type      metric
================== ========= =====================================================
``connections``    int       ``chatd_connections`` (gauge)
``users``          int       ``chatd_online_users`` (gauge)
``committed``      int       ``chatd_messages_stored_total`` (counter)
``batches``        int       ``chatd_store_batches_total`` (counter)
``queued``         int       ``chatd_store_queue`` (gauge)
``deliveries``     int       ``chatd_deliveries_total`` (counter); the older name
                             ``delivered`` is read when ``deliveries`` is absent
``frames_in``      int       ``chatd_frames_received_total`` (counter)
``frames_out``     int       ``chatd_frames_sent_total`` (counter)
``bytes_in``       int       ``chatd_received_bytes_total`` (counter)
``bytes_out``      int       ``chatd_sent_bytes_total`` (counter)
``auth_failures``  int       ``chatd_auth_failures_total`` (counter)
``store_ok``       bool      ``chatd_store_up`` (gauge, 1/0)
``chain_w``        int       ``chatd_chain_position`` (gauge; cluster)
``chain_pending``  int       ``chatd_chain_waiting_units`` (gauge; cluster)
``remote_units``   int       ``chatd_cluster_remote_units_total`` (counter; cluster)
``store_reads``    int       ``chatd_cluster_store_reads_total`` (counter; cluster)
``bus_up``         bool      ``chatd_bus_up`` (gauge, 1/0; cluster)
``bus_published``  int       ``chatd_bus_published_total`` (counter; cluster)
``bus_dropped``    int       ``chatd_bus_dropped_total`` (counter; cluster)
``bus_subscriptions`` int    ``chatd_bus_subscriptions`` (gauge; cluster)
``closes``         {int:int} ``chatd_closes_total{code=...}`` (counter): close code
                             (an int, or its decimal text) -> connections closed so
``batch_size``     histogram ``chatd_store_batch_size`` (histogram): messages per
                             store transaction
``commit_seconds`` histogram ``chatd_store_commit_seconds`` (histogram): time from
                             a transaction's start to its commit, in seconds
================== ========= =====================================================

A histogram is ``{"buckets": [[le, count], ...], "sum": s, "count": n}``:
upper bounds ``le`` positive and strictly increasing (a last ``inf`` is allowed),
each ``count`` cumulative (observations <= ``le``, as Prometheus counts them),
``count`` the number of observations (the ``+Inf`` bucket is added from it when
the buckets stop short of it) and ``sum`` their total.

Tolerance: a key that is absent, or whose value has the wrong type (a string,
``None``, a bool, a negative counter, a malformed histogram), produces no
sample; a second child of the same name is skipped; nothing in a snapshot can
make the collector raise. Figures a child does not report are left out, never
invented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import utils
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

#: what ``generate_latest`` writes: the classic text format (the library's
#: ``CONTENT_TYPE_LATEST`` names 1.0.0 in recent releases, 0.0.4 in older ones)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: the label that says which child a sample is from
PROCESS_LABEL: Final = "process"

Snapshot = Mapping[str, Any]

_go_float: Callable[[float], str] = utils.floatToGoString


@dataclass(frozen=True)
class Family:
    """One metric read from one key of each child (the first of ``keys`` present)."""

    name: str
    kind: str  # "gauge", "counter" or "flag" (a bool, as a gauge of 1 or 0)
    help: str
    keys: tuple[str, ...]
    #: True: the key is in the child's ``status`` dict; False: a field of the child
    in_status: bool = True


#: scalar figures, one sample per child that reports them
FAMILIES: Final = (
    Family("chatd_connections", "gauge", "Open websocket connections.", ("connections",)),
    Family("chatd_online_users", "gauge", "Users with at least one connection.", ("users",)),
    Family(
        "chatd_messages_stored_total", "counter", "Messages committed to the store.",
        ("committed",),
    ),
    Family(
        "chatd_store_batches_total", "counter", "Store transactions (group commits).",
        ("batches",),
    ),
    Family("chatd_store_queue", "gauge", "Messages waiting for the store.", ("queued",)),
    Family(
        "chatd_deliveries_total", "counter", "Message copies written to connections.",
        ("deliveries", "delivered"),
    ),
    Family(
        "chatd_frames_received_total", "counter", "Websocket data frames received.",
        ("frames_in",),
    ),
    Family(
        "chatd_frames_sent_total", "counter", "Websocket data frames sent.", ("frames_out",),
    ),
    Family(
        "chatd_received_bytes_total", "counter", "Websocket payload bytes received.",
        ("bytes_in",),
    ),
    Family(
        "chatd_sent_bytes_total", "counter", "Websocket payload bytes sent.", ("bytes_out",),
    ),
    Family(
        "chatd_auth_failures_total", "counter",
        "Handshakes refused for a missing, bad, expired or revoked token.",
        ("auth_failures",),
    ),
    Family(
        "chatd_store_up", "flag",
        "1 while the store answers the node's log; 0: not ready (PostgreSQL unreachable, "
        "disk full).", ("store_ok",),
    ),
    Family(
        "chatd_chain_position", "gauge",
        "Cluster: the chain position up to which this node has released everything.",
        ("chain_w",),
    ),
    Family(
        "chatd_chain_waiting_units", "gauge",
        "Cluster: units heard or committed above the release point, not released yet.",
        ("chain_pending",),
    ),
    Family(
        "chatd_cluster_remote_units_total", "counter",
        "Cluster: units of other nodes released to this node's shards.", ("remote_units",),
    ),
    Family(
        "chatd_cluster_store_reads_total", "counter",
        "Cluster: reads of the chain from the store (what the bus did not bring).",
        ("store_reads",),
    ),
    Family("chatd_bus_up", "flag", "Cluster: 1 while the NATS link is up.", ("bus_up",)),
    Family(
        "chatd_bus_published_total", "counter", "Cluster: units published on NATS.",
        ("bus_published",),
    ),
    Family(
        "chatd_bus_dropped_total", "counter",
        "Cluster: publishes dropped (NATS away, or too big); the others read them from "
        "the store.", ("bus_dropped",),
    ),
    Family(
        "chatd_bus_subscriptions", "gauge",
        "Cluster: NATS interest subscriptions (online users and groups of this node).",
        ("bus_subscriptions",),
    ),
    Family(
        "chatd_process_resident_bytes", "gauge", "Resident memory of the process.",
        ("rss_bytes",), in_status=False,
    ),
    Family(
        "chatd_process_cpu_seconds_total", "counter", "User + system CPU of the process.",
        ("cpu_seconds",), in_status=False,
    ),
    Family(
        "chatd_process_open_fds", "gauge", "Open file descriptors of the process.",
        ("open_fds",), in_status=False,
    ),
    Family(
        "chatd_child_restarts_total", "counter",
        "Times the supervisor restarted the process.", ("restarts",), in_status=False,
    ),
)

#: (metric, help, status key): a dict of close code -> count
CLOSES: Final = (
    "chatd_closes_total",
    "Websocket connections closed, by close code.",
    "closes",
)

#: (metric, help, status key) of the histograms
HISTOGRAMS: Final = (
    ("chatd_store_batch_size", "Messages per store transaction.", "batch_size"),
    (
        "chatd_store_commit_seconds",
        "Time from a store transaction's start to its commit.",
        "commit_seconds",
    ),
)


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        return None


def _flag(value: Any) -> float | None:
    """A yes/no figure as 1 or 0; None when it is not a bool."""
    return float(value) if isinstance(value, bool) else None


def _count(value: Any) -> float | None:
    """A counter's value: a number that is not negative (NaN and +Inf pass as they are)."""
    number = _number(value)
    return None if number is None or number < 0 else number


def _histogram(value: Any) -> tuple[list[tuple[str, float]], float] | None:
    """A reported histogram as (buckets with ``+Inf`` last, sum), or None if malformed."""
    if not isinstance(value, Mapping):
        return None
    raw, total, count = value.get("buckets"), _number(value.get("sum")), _count(value.get("count"))
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or total is None:
        return None
    buckets: list[tuple[str, float]] = []
    last_le, last_n = 0.0, 0.0  # bounds are positive: a batch size, a duration
    for item in raw:
        if not isinstance(item, Sequence) or isinstance(item, str | bytes) or len(item) != 2:
            return None
        le, n = _number(item[0]), _count(item[1])
        if le is None or n is None or math.isnan(n) or not last_le < le or n < last_n:
            return None
        buckets.append((_go_float(le), n))
        last_le, last_n = le, n
    if count is not None and math.isnan(count):
        return None
    if last_le == math.inf:
        if count is not None and count != last_n:
            return None
    elif count is None or count < last_n:
        return None
    else:
        buckets.append(("+Inf", count))
    return buckets, total


def _children(snapshot: Any) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """(process label, child fields, status dict) of each well-formed child."""
    children = snapshot.get("children") if isinstance(snapshot, Mapping) else None
    if not isinstance(children, Sequence) or isinstance(children, str | bytes):
        return []
    found = []
    seen: set[str] = set()
    for child in children:
        if not isinstance(child, Mapping):
            continue
        name = str(child.get("name", "?"))
        if name in seen:
            continue  # a sample twice would make Prometheus refuse the whole scrape
        seen.add(name)
        status = child.get("status")
        found.append((name, child, status if isinstance(status, Mapping) else {}))
    return found


class SnapshotCollector(Collector):
    """Metric families from the snapshot that ``source`` returns at each scrape."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        children = _children(self._source())
        yield GaugeMetricFamily("chatd_up", "1 while the node serves.", value=1)
        for fam in FAMILIES:
            metric: CounterMetricFamily | GaugeMetricFamily
            if fam.kind == "counter":
                metric = CounterMetricFamily(fam.name, fam.help, labels=[PROCESS_LABEL])
            else:
                metric = GaugeMetricFamily(fam.name, fam.help, labels=[PROCESS_LABEL])
            read = _count if fam.kind == "counter" else _flag if fam.kind == "flag" else _number
            for process, child, status in children:
                source = status if fam.in_status else child
                key = next((k for k in fam.keys if k in source), None)
                value = read(source.get(key)) if key is not None else None
                if value is not None:
                    metric.add_metric([process], value)
            if metric.samples:
                yield metric
        yield from self._closes(children)
        for name, text, key in HISTOGRAMS:
            hist = HistogramMetricFamily(name, text, labels=[PROCESS_LABEL])
            for process, _, status in children:
                parsed = _histogram(status.get(key))
                if parsed is not None:
                    hist.add_metric([process], parsed[0], parsed[1])
            if hist.samples:
                yield hist

    @staticmethod
    def _closes(
        children: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]],
    ) -> Iterator[Metric]:
        name, text, key = CLOSES
        metric = CounterMetricFamily(name, text, labels=[PROCESS_LABEL, "code"])
        for process, _, status in children:
            closes = status.get(key)
            if not isinstance(closes, Mapping):
                continue
            counts: dict[int, float] = {}
            for code, value in closes.items():
                if isinstance(code, str) and code.isascii() and code.isdigit():
                    code = int(code)
                count = _count(value)
                if type(code) is int and code >= 0 and count is not None:
                    counts.setdefault(code, count)  # 1000 and "1000": the first one
            for code, count in sorted(counts.items()):
                metric.add_metric([process, str(code)], count)
        if metric.samples:
            yield metric


def make_registry(source: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry of its own (not the library's global one) over ``source``'s snapshots."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
