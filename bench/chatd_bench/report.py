"""What a run shows: the end table, JSON lines, ratios to peers and a PNG plot."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from statistics import median
from typing import Any, TextIO

COLUMNS = ("target", "scenario", "unit", "thru/s", "srv µs/unit", "p50 ms", "p99 ms",
           "p99.9 ms", "KiB/conn", "srv %", "cli %", "ok")


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def row(r: dict[str, Any]) -> list[str]:
    lat = r.get("latency_ms") or {}
    if r["scenario"] == "group" and r.get("last_member_latency_ms", {}).get("n"):
        lat = r["last_member_latency_ms"]
    scen = r["scenario"] + (f" M={r['members']}" if "members" in r else "")
    return [r["target"], scen, r["unit"], _f(float(r["throughput_per_s"]), 0),
            _f(r.get("server_cpu_us_per_unit"), 1), _f(lat.get("p50"), 2),
            _f(lat.get("p99"), 2), _f(lat.get("p999"), 2), _f(r.get("rss_kib_per_conn"), 1),
            _f(100 * r.get("server_util", 0), 0),
            _f(100 * r["client_util_max"], 0) if r.get("client_util_max") is not None else "-",
            "yes" if r["ok"] else "NO"]


#: the engines beside chatd (a cluster's, or the PostgreSQL store's): their
#: CPU per unit gets a column of its own, after chatd's
ENGINES = (("nats", "nats µs/unit"), ("postgres", "pg µs/unit"))


def table(results: list[dict[str, Any]]) -> str:
    engines = [(key, title) for key, title in ENGINES
               if any(f"{key}_cpu_us_per_unit" in r for r in results)]
    at = COLUMNS.index("srv µs/unit") + 1
    columns = [*COLUMNS[:at], *(title for _, title in engines), *COLUMNS[at:]]
    rows = [columns]
    for r in results:
        cells = row(r)
        extra = [_f(r.get(f"{key}_cpu_us_per_unit"), 1) for key, _ in engines]
        rows.append([*cells[:at], *extra, *cells[at:]])
    widths = [max(len(x[i]) for x in rows) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in
                       enumerate(zip(x, widths, strict=True))) for x in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = "\n".join(lines)
    notes = []
    for r in results:
        for p in r.get("problems", []):
            notes.append(f"!! {r['target']} {r['scenario']}: {p}")
        for e in r.get("errors", [])[:3]:
            notes.append(f"   {r['target']} {r['scenario']}: {e}")
        for w in r.get("warnings", []):
            notes.append(f"note: {r['target']} {r['scenario']}: {w}")
    for r in results:
        split = by_thread_line(r)
        if split:
            notes.append(split)
    return out + ("\n" + "\n".join(notes) if notes else "")


def by_thread_line(r: dict[str, Any], top: int = 5) -> str | None:
    """Where a run's server CPU went, by thread name, per unit (None for a
    server with one busy thread: nothing to split)."""
    split = {k: v for k, v in (r.get("server_cpu_us_per_unit_by_thread") or {}).items()
             if v >= 0.05}  # what would print as 0.0 is left out
    if len(split) < 2:
        return None
    parts = ", ".join(f"{name} {us:.1f}" for name, us in list(split.items())[:top])
    return f"threads: {r['target']} {r['scenario']}: {parts} µs/{r.get('unit', 'unit')}"


#: the figures a ratio line compares
FIGURES: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("server CPU/unit", lambda r: r.get("server_cpu_us_per_unit")),
    ("with engines", lambda r: r.get("total_cpu_us_per_unit")),
    ("throughput", lambda r: r.get("throughput_per_s")),
    ("p50", lambda r: (r.get("latency_ms") or {}).get("p50")),
    ("p99", lambda r: (r.get("latency_ms") or {}).get("p99")),
    ("KiB/conn", lambda r: r.get("rss_kib_per_conn")))


def _scenario(r: dict[str, Any]) -> str:
    """The scenario part of a run's label, without its round (``private``, ``group M=10``)."""
    tail = r["label"].split(" ", 1)[1] if " " in r["label"] else r["scenario"]
    return re.sub(r" #\d+$", "", tail)


def _compare(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    parts = []
    for name, get in FIGURES:
        a = [v for v in map(get, mine) if v]
        b = [v for v in map(get, theirs) if v]
        if a and b:
            parts.append(f"{name} x{median(a) / median(b):.2f}")
    return ", ".join(parts)


def ratios(results: list[dict[str, Any]], base: str = "chatd") -> str:
    """``base``'s figures over each other target's (median over rounds), per scenario."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by[(r["target"], _scenario(r))].append(r)
    lines = []
    for (target, scen), mine in sorted(by.items()):
        if target != base:
            continue
        for (peer, pscen), theirs in sorted(by.items()):
            if peer == base or pscen != scen:
                continue
            lines.append(f"{scen}: {base} / {peer}: " + _compare(mine, theirs))
    if lines:
        lines.insert(0, f"ratios ({base} / the others; CPU, latency and KiB: lower is better "
                        "for chatd, throughput: higher):")
    return "\n".join(lines)


def placement_ratios(results: list[dict[str, Any]]) -> str:
    """Cross over same placement of each set-up (median over rounds), per
    scenario: what crossing shards or nodes costs (e.g. ``chatd/n2/cross /
    chatd/n2/same``)."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r.get("base") and r.get("placement") in ("same", "cross"):
            by[(r["base"], _scenario(r), r["placement"])].append(r)
    lines = []
    for (base, scen, place), cross in sorted(by.items()):
        same = by.get((base, scen, "same"))
        if place != "cross" or not same:
            continue
        lines.append(f"{scen}: {cross[0]['target']} / {same[0]['target']}: "
                     + _compare(cross, same))
    if lines:
        lines.insert(0, "cross / same placement (CPU and latency: the cost of crossing):")
    return "\n".join(lines)


def write_jsonl(results: list[dict[str, Any]], out: TextIO) -> None:
    for r in results:
        out.write(json.dumps(r, default=str) + "\n")


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Throughput, p50/p99 latency and server CPU over time, one line per run."""
    from PIL import Image, ImageDraw

    panels = (("deliveries/s", "delivered_per_s"), ("p99 latency ms (dashed: p50)", "p99_ms"),
              ("server CPU %", "server_cpu_pct"), ("server RSS MiB", "server_rss_mib"))
    w, ph, margin = 900, 200, 60
    img = Image.new("RGB", (w, len(panels) * (ph + 30) + 40 + 16 * len(results)), "white")
    d = ImageDraw.Draw(img)
    for k, (title, key) in enumerate(panels):
        top = 20 + k * (ph + 30)
        box = (margin, top, w - 20, top + ph)
        d.rectangle(box, outline=(0, 0, 0))
        d.text((margin, top - 14), title, fill=(0, 0, 0))
        series = [r.get("timeseries") or [] for r in results]
        tmax = max((s[-1]["t"] for s in series if s), default=1) or 1
        vmax = max((p.get(key, 0) or 0 for s in series for p in s), default=1) or 1
        d.text((4, top), f"{vmax:,.0f}" if vmax >= 10 else f"{vmax:.2f}", fill=(0, 0, 0))
        d.text((4, top + ph - 10), "0", fill=(0, 0, 0))
        d.text((w - 60, top + ph + 2), f"{tmax:.0f} s", fill=(0, 0, 0))
        for n, s in enumerate(series):
            color = _COLORS[n % len(_COLORS)]

            def xy(p: dict[str, Any], key: str = key, box: tuple[int, int, int, int] = box,
                   tmax: float = tmax, vmax: float = vmax) -> tuple[float, float]:
                x = box[0] + (box[2] - box[0]) * p["t"] / tmax
                y = box[3] - (box[3] - box[1]) * min(1.0, (p.get(key, 0) or 0) / vmax)
                return x, y

            if len(s) > 1:
                d.line([xy(p) for p in s], fill=color, width=2)
                if key == "p99_ms":
                    pts = [xy(p, "p50_ms") for p in s]
                    for a, b in zip(pts[::2], pts[1::2], strict=False):
                        d.line([a, b], fill=color, width=1)
    y = 20 + len(panels) * (ph + 30)
    for n, r in enumerate(results):
        d.rectangle((margin, y + 3, margin + 10, y + 11), fill=_COLORS[n % len(_COLORS)])
        d.text((margin + 16, y), r["label"], fill=(0, 0, 0))
        y += 16
    img.save(path)
