"""``chatd-bench report``: the JSON lines of earlier runs, side by side.

Runs are grouped by the shape of their load (scenario, group size, open-loop
rate or closed-loop window, users); in each group a row per target (each chatd
set-up, each peer) gives the median of every figure over the runs it has (its
rounds, from one file or several), the spread (min–max) when there are several,
and a row per other target with each figure's ratio to the base target's. Every
run where the load generator was the limit, or that was not clean, gets a
warning line of its own. ``bar_plot`` draws the two figures the issue weighs
(server CPU per unit, p99) as grouped bars. Pure functions over dicts: the
tests feed them lines made by hand.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from statistics import median
from typing import Any

from chatd_bench.run import generator_bound

#: the fields that tell two set-ups of one target name apart (runs from
#: different files, e.g. ``--placement same`` and ``--placement cross``)
SETUP_FIELDS = ("store", "placement", "shards", "nodes")

#: the generator warning the run itself adds (the report words its own)
_GEN_WARNING = "the load generator was the limit"


class ReportError(Exception):
    """A file cannot be read as chatd-bench JSON lines."""


def _latency(r: dict[str, Any]) -> dict[str, Any]:
    lat = r.get("latency_ms") or {}
    last = r.get("last_member_latency_ms") or {}
    # a group message's latency is the last member's (as the run's own table)
    if r.get("scenario") == "group" and last.get("n"):
        return dict(last)
    return dict(lat)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _pct(v: Any) -> float | None:
    n = _num(v)
    return None if n is None else 100 * n


def gen_util(r: dict[str, Any]) -> float | None:
    """The load processes' CPU together over the measured window (1.0 = one
    CPU): ``client_util``, or worked out from an older line's
    ``client_cpu_s`` / ``duration_s``."""
    if _num(r.get("client_util")) is not None:
        return float(r["client_util"])
    cpu, dur = _num(r.get("client_cpu_s")), _num(r.get("duration_s"))
    return cpu / dur if cpu is not None and dur else None


def side_util(r: dict[str, Any]) -> float | None:
    """The server side's CPU (chatd or the peer, with its engines) over the window."""
    if _num(r.get("server_side_util")) is not None:
        return float(r["server_side_util"])
    cpu, dur = _num(r.get("server_cpu_s")), _num(r.get("duration_s"))
    if cpu is None or not dur:
        return _num(r.get("server_util"))
    engines = r.get("engines_cpu_s") or {}
    spent = [_num(v) for v in engines.values()]
    return (cpu + sum(v for v in spent if v is not None)) / dur


def was_generator_bound(r: dict[str, Any]) -> bool:
    """The run's own verdict (``client_bound``), or the same test
    (``run.generator_bound``) on an older line's figures."""
    if isinstance(r.get("client_bound"), bool):
        return bool(r["client_bound"])
    return generator_bound(_num(r.get("client_util_max")), side_util(r))


@dataclasses.dataclass(frozen=True)
class Figure:
    """One column: its title, how to read it from a run, its digits, and
    whether a ratio to the base means something for it."""

    title: str
    get: Callable[[dict[str, Any]], float | None]
    digits: int
    ratio: bool = True


FIGURES: tuple[Figure, ...] = (
    Figure("thru/s", lambda r: _num(r.get("throughput_per_s")), 0),
    Figure("srv µs/unit", lambda r: _num(r.get("server_cpu_us_per_unit")), 1),
    Figure("nats µs/unit", lambda r: _num(r.get("nats_cpu_us_per_unit")), 1),
    Figure("pg µs/unit", lambda r: _num(r.get("postgres_cpu_us_per_unit")), 1),
    Figure("all µs/unit", lambda r: _num(r.get("total_cpu_us_per_unit")), 1),
    Figure("p50 ms", lambda r: _num(_latency(r).get("p50")), 2),
    Figure("p99 ms", lambda r: _num(_latency(r).get("p99")), 2),
    Figure("p99.9 ms", lambda r: _num(_latency(r).get("p999")), 2),
    Figure("KiB/conn", lambda r: _num(r.get("rss_kib_per_conn")), 1),
    Figure("srv %", lambda r: _pct(r.get("server_util")), 0, ratio=False),
    Figure("gen %", lambda r: _pct(gen_util(r)), 0, ratio=False),
    Figure("gen max %", lambda r: _pct(r.get("client_util_max")), 0, ratio=False),
)
#: shown only where some run has them (a store or cluster's engines)
_ENGINES = ("nats µs/unit", "pg µs/unit")


def load(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], int]:
    """The runs in ``paths`` (JSON lines, as ``--json`` writes them), each
    tagged with ``_src`` (``file:line``), and how many lines were skipped for
    not being JSON objects at all (a table printed beside ``--json -``).
    Fields the report does not know are kept and ignored. A line that starts
    like JSON but does not parse, or an object that is not a run (no
    ``target`` or ``scenario``), raises ``ReportError`` naming the line."""
    runs: list[dict[str, Any]] = []
    skipped = 0
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ReportError(f"{path}: {exc.strerror or exc}") from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if not line.startswith("{"):
                skipped += 1
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("target"), str) or not (
                    isinstance(r.get("scenario"), str)):
                raise ReportError(f"{path}:{n}: not a chatd-bench run (no target or scenario)")
            r["_src"] = f"{path}:{n}"
            runs.append(r)
    return runs, skipped


def shape(r: dict[str, Any]) -> str:
    """What a group of comparable runs has in common: the scenario, the group
    size (and groups, senders), the open-loop rate or closed-loop window, and
    users (or connections and their rate); an older line without those fields
    gives what it has."""
    scen = r["scenario"]
    parts = [scen]
    if r.get("members") is not None:
        parts.append(f"M={r['members']}")
    if r.get("groups") is not None and scen == "group":
        senders = f" × {r['senders']} senders" if r.get("senders") is not None else ""
        parts.append(f"{r['groups']} groups{senders}")
    rate = _num(r.get("rate"))
    if rate:
        parts.append(f"rate {rate:g}/s")
    elif r.get("window") is not None:
        parts.append(f"window {r['window']}")
    if r.get("users") is not None and scen in ("private", "mixed", "soak"):
        parts.append(f"{r['users']} users")
    elif r.get("users") is not None and scen == "connect":
        at = f" at {_num(r.get('conn_rate')):g}/s" if _num(r.get("conn_rate")) else ""
        parts.append(f"{r['users']} conns{at}")
    return ", ".join(parts)


def _setup(r: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(r[k])) for k in SETUP_FIELDS if r.get(k) is not None)


@dataclasses.dataclass
class Row:
    """One target in a group: its runs, in the order read."""

    name: str
    runs: list[dict[str, Any]]

    def values(self, fig: Figure) -> list[float]:
        return [v for v in map(fig.get, self.runs) if v is not None]

    def median(self, fig: Figure) -> float | None:
        vals = self.values(fig)
        return median(vals) if vals else None


@dataclasses.dataclass
class Group:
    """Runs with one load shape: a row per target, in the order first seen."""

    shape: str
    unit: str
    rows: list[Row]


def group(runs: list[dict[str, Any]]) -> list[Group]:
    """Runs grouped by ``shape``, then by target. A target name that stands for
    several set-ups in a group (runs from files made with different
    ``--store`` or ``--placement``) gets a row per set-up, named with what
    differs (``chatd [placement=cross]``)."""
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_shape.setdefault(shape(r), []).append(r)
    out = []
    for key, members in by_shape.items():
        setups: dict[str, list[tuple[tuple[str, str], ...]]] = {}
        for r in members:
            seen = setups.setdefault(r["target"], [])
            if _setup(r) not in seen:
                seen.append(_setup(r))
        rows: dict[str, Row] = {}
        for r in members:
            name = r["target"]
            if len(setups[name]) > 1:
                mine = dict(_setup(r))
                differ = [k for k in SETUP_FIELDS
                          if len({dict(s).get(k) for s in setups[name]}) > 1]
                name += " [" + ", ".join(f"{k}={mine.get(k, '-')}" for k in differ) + "]"
            rows.setdefault(name, Row(name, [])).runs.append(r)
        unit = next((str(r["unit"]) for r in members if r.get("unit")), "unit")
        out.append(Group(key, unit, list(rows.values())))
    return out


def pick_base(g: Group, base: str | None) -> Row | None:
    """The row the ratios divide by: the one named ``base`` (a row's name, or a
    target's, whose first row is taken), else the first chatd row."""
    if base:
        return next((row for row in g.rows if row.name == base), None) or next(
            (row for row in g.rows if row.runs[0]["target"] == base), None)
    return next((row for row in g.rows if row.runs[0]["target"].startswith("chatd")), None)


def _cell(vals: list[float], digits: int) -> str:
    return f"{median(vals):,.{digits}f}" if vals else "-"


def _span(vals: list[float], digits: int) -> str:
    if len(vals) < 2:
        return ""
    return f"{min(vals):,.{digits}f}–{max(vals):,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"x{a / b:.2f}"


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(x, widths, strict=True))).rstrip()
             for x in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def run_warnings(r: dict[str, Any]) -> list[str]:
    """The warning lines for one run: the generator was the limit, the run
    was not clean, and the run's own notes (a server that exited badly, a
    leak)."""
    where = f"{r.get('label') or r['target'] + ' ' + r['scenario']} ({r.get('_src', '?')})"
    out = []
    if was_generator_bound(r):
        busiest, side = _num(r.get("client_util_max")), side_util(r)
        detail = (f": a load process at {100 * busiest:.0f}% CPU, server side at "
                  f"{100 * side:.0f}%" if busiest is not None and side is not None else "")
        out.append(f"!! GENERATOR WAS THE LIMIT: {where}{detail}; its throughput is a "
                   "lower bound, compare server CPU per unit (more --procs, or more "
                   "generator CPUs in --pin)")
    if r.get("ok") is False or r.get("problems"):
        problems = "; ".join(str(p) for p in r.get("problems") or []) or "not ok"
        out.append(f"!! NOT CLEAN: {where}: {problems}")
    for w in r.get("warnings") or []:
        if not str(w).startswith(_GEN_WARNING):
            out.append(f"note: {where}: {w}")
    return out


def render(runs: list[dict[str, Any]], base: str | None = None) -> str:
    """The report: per group a table (medians, spreads), the ratios to the
    base, and the warning lines of its runs."""
    blocks = []
    for g in group(runs):
        # the engines' columns where a run had engines; "all" (chatd with them)
        # only then, since without engines it repeats chatd's own
        engines = [f.title for f in FIGURES
                   if f.title in _ENGINES and any(row.values(f) for row in g.rows)]
        figs = [f for f in FIGURES if (f.title not in _ENGINES or f.title in engines)
                and (f.title != "all µs/unit" or engines)]
        most = max(len(row.runs) for row in g.rows)
        head = ["target", "runs", "procs", *(f.title for f in figs), "flags"]
        table = [head]
        for row in g.rows:
            n = len(row.runs)
            procs = sorted({str(r["procs"]) for r in row.runs if r.get("procs") is not None})
            bound = sum(was_generator_bound(r) for r in row.runs)
            dirty = sum(1 for r in row.runs if r.get("ok") is False or r.get("problems"))
            flags = ", ".join([*([f"gen-limited {bound}/{n}"] if bound else []),
                               *([f"NOT CLEAN {dirty}/{n}"] if dirty else [])])
            table.append([row.name, str(n) if n == most else f"{n}/{most}",
                          ",".join(procs) or "-",
                          *(_cell(row.values(f), f.digits) for f in figs), flags])
            if n > 1:
                # the spread on a line of its own, under the medians
                table.append(["  min–max", "", "",
                              *(_span(row.values(f), f.digits) for f in figs), ""])
        lines = [f"== {g.shape}  (unit: {g.unit}; medians over runs, and their min–max)"]
        ref = pick_base(g, base)
        others = [row for row in g.rows if row is not ref]
        ratios = []
        if ref is not None:
            # in the same grid as the figures, so that each ratio sits under its figure
            for row in others:
                ratios.append([f"{row.name} / {ref.name}", "", "",
                               *(_ratio(row.median(f), ref.median(f)) if f.ratio else ""
                                 for f in figs), ""])
        grid = _grid(table + ratios)
        lines += grid[:len(table) + 1]
        if ratios:
            lines += [f"ratios to {ref.name if ref else ''} (median over median; CPU, "
                      "latency, KiB: below x1 costs less than the base)",
                      *grid[len(table) + 1:]]
        elif ref is None and len(g.rows) > 1:
            lines.append(f"(no {base or 'chatd'} run in this group: no ratios)")
        notes = [w for row in g.rows for r in row.runs for w in run_warnings(r)]
        if notes:
            lines += ["", *notes]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
#: the plot's panels: a figure and its title in ASCII (Pillow's default font has no µ)
_PANELS = (("srv µs/unit", "server CPU us per unit"), ("p99 ms", "p99 latency ms"))


def bar_plot(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Grouped bars, one panel per figure (server CPU µs per unit, p99 ms): a
    cluster of bars per group of runs, each on its own scale, a bar per target
    (its median, written above it; a whisker from min to max where it has
    several runs), one colour per target across the clusters, numbered
    clusters named in the legend.
    Drawn with Pillow, which the bench's ``--plot`` uses too (matplotlib is
    no dependency)."""
    from PIL import Image, ImageDraw

    groups = group(runs)
    names: list[str] = []
    for g in groups:
        for row in g.rows:
            if row.name not in names:
                names.append(row.name)
    color = {n: _COLORS[i % len(_COLORS)] for i, n in enumerate(names)}
    figs = {f.title: f for f in FIGURES}
    bar_w, margin, ph, black = 40, 70, 260, (0, 0, 0)
    slots = sum(len(g.rows) for g in groups)
    w = max(640, margin + 20 + slots * bar_w + len(groups) * 40)
    # the clusters spread evenly over the panel's width
    gap = (w - margin - 20 - slots * bar_w) / len(groups)
    h = len(_PANELS) * (ph + 60) + 16 * (len(names) + len(groups)) + 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for k, (key, title) in enumerate(_PANELS):
        fig = figs[key]
        top = 40 + k * (ph + 60)
        box = (margin, top, w - 20, top + ph)
        d.text((margin, top - 30), f"{title} (bar: median; whisker: min-max; each cluster "
               "scaled to its tallest)", fill=black)
        d.rectangle(box, outline=black)
        d.text((4, top + ph - 10), "0", fill=black)
        x = margin + gap / 2
        for n, g in enumerate(groups, 1):
            # a scale per cluster: the shapes' units differ (a handshake costs
            # far more than a message), the bars within one compare
            vmax = max((v for row in g.rows for v in row.values(fig)), default=0.0) or 1.0

            def y(v: float, box: tuple[int, int, int, int] = box, vmax: float = vmax) -> float:
                return box[3] - (box[3] - box[1] - 14) * min(1.0, v / vmax)

            x0 = x
            for row in g.rows:
                vals = row.values(fig)
                if vals:
                    mid = median(vals)
                    d.rectangle((x + 3, y(mid), x + bar_w - 3, box[3]), fill=color[row.name])
                    d.text((x + 3, min(y(mid), y(max(vals))) - 12),
                           f"{mid:,.{fig.digits}f}", fill=black)
                    if len(vals) > 1:
                        cx = x + bar_w / 2
                        d.line([(cx, y(min(vals))), (cx, y(max(vals)))], fill=black)
                        for v in (min(vals), max(vals)):
                            d.line([(cx - 4, y(v)), (cx + 4, y(v))], fill=black)
                x += bar_w
            d.text(((x0 + x) / 2 - 3, box[3] + 4), str(n), fill=black)
            x += gap
    yl = 40 + len(_PANELS) * (ph + 60) - 30
    for name in names:
        d.rectangle((margin, yl + 3, margin + 10, yl + 11), fill=color[name])
        d.text((margin + 16, yl), name, fill=black)
        yl += 16
    for n, g in enumerate(groups, 1):
        d.text((margin, yl), f"{n}: {g.shape} (unit: {g.unit})", fill=black)
        yl += 16
    img.save(str(path))
