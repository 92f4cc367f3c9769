"""Prometheus text exposition of a node's figures (pure: no I/O).

The supervisor builds a snapshot every ``STATUS_PERIOD_S`` from what each
child reports and what psutil reads of each child process, and hands it to the
API workers, which serve it at ``GET /metrics``. A scrape therefore sees
figures at most a couple of seconds old; counters only grow (a restarted
child's counters start again from 0, which Prometheus' ``rate()`` handles as
a reset).

Snapshot shape::

    {"children": [{"name": "shard-0", "restarts": 0, "rss_bytes": ..., "cpu_seconds": ...,
                   "open_fds": ..., "status": {"connections": ..., "committed": ..., ...}}]}
"""

from __future__ import annotations

from typing import Any, Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: (name, type, help, where the value is: "status.KEY" or a child field)
FAMILIES: Final = (
    ("chatd_connections", "gauge", "Open websocket connections.", "status.connections"),
    ("chatd_online_users", "gauge", "Users with at least one connection.", "status.users"),
    (
        "chatd_messages_stored_total",
        "counter",
        "Messages committed to the store.",
        "status.committed",
    ),
    (
        "chatd_store_batches_total",
        "counter",
        "Store transactions (group commits).",
        "status.batches",
    ),
    ("chatd_store_queue", "gauge", "Messages waiting for the store.", "status.queued"),
    (
        "chatd_deliveries_total",
        "counter",
        "Message copies written to connections.",
        "status.delivered",
    ),
    ("chatd_process_resident_bytes", "gauge", "Resident memory of the process.", "rss_bytes"),
    (
        "chatd_process_cpu_seconds_total",
        "counter",
        "User + system CPU of the process.",
        "cpu_seconds",
    ),
    ("chatd_process_open_fds", "gauge", "Open file descriptors of the process.", "open_fds"),
    (
        "chatd_child_restarts_total",
        "counter",
        "Times the supervisor restarted the process.",
        "restarts",
    ),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return repr(float(value)) if isinstance(value, float) else str(value)


def render(snapshot: dict[str, Any]) -> str:
    """The snapshot as Prometheus text; figures a child did not report are left out."""
    children = snapshot.get("children") or []
    lines = ["# HELP chatd_up 1 while the node serves.", "# TYPE chatd_up gauge", "chatd_up 1"]
    for name, kind, text, where in FAMILIES:
        samples = []
        for child in children:
            source = child.get("status", {}) if where.startswith("status.") else child
            value = _number(source.get(where.removeprefix("status.")))
            if value is not None:
                samples.append(f'{name}{{child="{_label(str(child.get("name", "?")))}"}} {value}')
        if samples:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"
