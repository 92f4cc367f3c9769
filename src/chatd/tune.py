"""``chatd tune check``: is this box ready to carry N connections?

It reads the kernel's settings (``/proc/sys``), the memory available
(``/proc/meminfo``), the open-file limits of this process (those a
``chatd serve`` started from the same shell gets) and the installed systemd
unit's ``LimitNOFILE``, and says of each: pass, warn or fail, with the fix.
Every threshold derives from N, the connections the box should carry, all
shards together (default 100,000: one full shard).

- **fail**: the box cannot carry N connections as it is set up;
- **warn**: it can, but not robustly (a reconnect storm, busy connections, a
  load generator on the same box), or a value could not be read here;
- **pass**.

The exit status says whether the box is ready: 0 when nothing fails
(warnings alone still give 0), 1 when something does.

The values recommended agree with ``sysctl/99-chatd.conf`` (``RECOMMENDED``;
a test holds the two together). The module is a pure core, ``assess``, over
what ``read_box`` reads; tests feed it fake ``/proc`` trees and limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PASS: Final = "pass"
WARN: Final = "warn"
FAIL: Final = "fail"

DEFAULT_CONNECTIONS: Final = 100_000
DEFAULT_PROC_ROOT: Final = "/proc"
DEFAULT_UNIT: Final = "/etc/systemd/system/chatd.service"

#: KiB of chatd's own memory per idle connection: the bench's figure, 6.2 KiB
#: of server RSS per connection measured with ``chatd-bench connect --conns
#: 10000 --conn-rate 2000 --hold 2 --pin 0:1 --shards 1`` (docs/design.md,
#: "Idle connections are kept small"). The kernel's socket buffers are not in
#: RSS; they come on top (from ``tcp_rmem`` / ``tcp_wmem``).
KIB_PER_CONNECTION: Final = 6.2
#: files a chatd process holds besides its connections: database, WAL,
#: listeners, the supervisor's pipes, logs
FD_HEADROOM: Final = 1024
#: files the rest of the box holds (counted against ``fs.file-max``)
SYSTEM_FD_HEADROOM: Final = 65_536
#: the deepest queue worth asking for: a reconnect storm of N clients needs
#: room for N handshakes, but the kernel caps a listener's backlog at 65535
#: and chatd accepts thousands per second
BACKLOG_CAP: Final = 65_535
#: an open-file limit without bound (``resource.RLIM_INFINITY`` is -1 in Python)
UNLIMITED: Final = (1 << 63) - 1
#: the kernel's own per-socket buffer minimum, when tcp_rmem/tcp_wmem cannot be read
DEFAULT_BUFFER_MIN: Final = 4096

#: what sysctl/99-chatd.conf sets, for the fixes (a test holds them to the file)
RECOMMENDED: Final[Mapping[str, str]] = {
    "fs.file-max": "4194304",
    "fs.nr_open": "4194304",
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.core.netdev_max_backlog": "65535",
    "net.ipv4.ip_local_port_range": "10000 65535",
    "net.ipv4.tcp_mem": "786432 1048576 1572864",
    "net.ipv4.tcp_rmem": "4096 16384 4194304",
    "net.ipv4.tcp_wmem": "4096 16384 4194304",
}
#: what systemd/chatd.service sets
RECOMMENDED_NOFILE: Final = 1_048_576

#: the sysctl keys read (``read_box``)
SYSCTL_KEYS: Final = (
    "fs.file-max",
    "fs.nr_open",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
)

_PERSIST: Final = "to keep it across boots: sysctl/99-chatd.conf (sysctl/check.sh --apply)"


@dataclass(frozen=True)
class Unit:
    """What the systemd unit says of open files.

    ``limit`` is the last ``LimitNOFILE=`` value of the unit and its drop-ins
    (None: not set); ``error`` says why the unit could not be read.
    """

    path: str
    found: bool
    #: True when the path was asked for (``--unit``), not the default place
    explicit: bool = False
    limit: str | None = None
    error: str = ""


@dataclass(frozen=True)
class Box:
    """What ``assess`` judges: raw sysctl text (None: unreadable), the
    memory available in KiB, this process's (soft, hard) open-file limits,
    the unit, and the page size that ``tcp_mem`` counts in."""

    sysctl: Mapping[str, str | None]
    mem_available_kib: int | None
    nofile: tuple[int, int]
    unit: Unit
    page_bytes: int = 4096


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    have: str
    want: str
    #: why it matters, and what the figures mean
    detail: str = ""
    #: what to do; empty when it passes
    fix: str = ""


# --- reading the box ----------------------------------------------------------------


def read_sysctl(proc_root: Path, key: str) -> str | None:
    """``/proc/sys`` text of ``key`` with runs of blanks made one space; None if unreadable."""
    try:
        text = (proc_root / "sys" / key.replace(".", "/")).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return " ".join(text.split()) or None


def read_mem_available_kib(proc_root: Path) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo``, in KiB; None if unreadable."""
    try:
        lines = (proc_root / "meminfo").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key.strip() == "MemAvailable":
            fields = rest.split()
            if fields and fields[0].isdigit() and fields[1:] in ([], ["kB"]):
                return int(fields[0])
    return None


def unit_limit(texts: Iterable[str]) -> str | None:
    """The last ``LimitNOFILE=`` of a unit's ``[Service]`` section in ``texts``
    (the unit, then its drop-ins in order); None if none sets it, or if the
    last one is empty (which resets it to systemd's default)."""
    value: str | None = None
    for text in texts:
        section = ""
        # a line ending in a backslash goes on on the next line
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, sep, rest = line.partition("=")
            if sep and section == "Service" and key.strip() == "LimitNOFILE":
                value = rest.strip() or None
    return value


def read_unit(path: Path, explicit: bool = False) -> Unit:
    """The unit at ``path`` and its drop-ins (``PATH.d/*.conf``)."""
    if not path.is_file():
        return Unit(str(path), False, explicit)
    try:
        texts = [path.read_text()]
        dropins = path.with_name(path.name + ".d")
        if dropins.is_dir():
            texts += [p.read_text() for p in sorted(dropins.glob("*.conf"))]
    except (OSError, UnicodeDecodeError) as exc:
        return Unit(str(path), True, explicit, error=str(exc))
    return Unit(str(path), True, explicit, unit_limit(texts))


def read_box(
    proc_root: Path,
    unit: Path | None = None,
    *,
    nofile: tuple[int, int] | None = None,
    page_bytes: int | None = None,
) -> Box:
    """Read the box: sysctls and meminfo under ``proc_root``, the unit at
    ``unit`` (default: ``DEFAULT_UNIT``), and this process's open-file limits
    unless ``nofile`` gives them."""
    if nofile is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = (soft, hard)
    return Box(
        sysctl={key: read_sysctl(proc_root, key) for key in SYSCTL_KEYS},
        mem_available_kib=read_mem_available_kib(proc_root),
        nofile=nofile,
        unit=read_unit(unit, True) if unit is not None else read_unit(Path(DEFAULT_UNIT)),
        page_bytes=page_bytes or os.sysconf("SC_PAGE_SIZE"),
    )


# --- judging it -----------------------------------------------------------------------


def _ints(text: str | None, count: int) -> list[int] | None:
    """``count`` non-negative integers from ``text``, or None."""
    fields = (text or "").split()
    if len(fields) != count or not all(f.isascii() and f.isdigit() for f in fields):
        return None
    return [int(f) for f in fields]


def _rlimit(value: int) -> int:
    return UNLIMITED if value == resource.RLIM_INFINITY or value < 0 else value


def _limit_text(value: int) -> str:
    return "unlimited" if value >= UNLIMITED else str(value)


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 20):,.0f} MiB"


def _sysctl_fix(key: str, value: int | str) -> str:
    """``sysctl -w`` of ``value``; of the recommended value instead when that
    is a number at least as high."""
    rec = RECOMMENDED.get(key)
    if rec is not None and isinstance(value, int) and int(rec.split()[-1]) >= value:
        value = rec
    shown = f"'{value}'" if " " in str(value) else str(value)
    return f"sysctl -w {key}={shown}; {_PERSIST}"


def _unreadable(name: str, why: str) -> Check:
    return Check(name, WARN, "unreadable", "", f"could not read it here ({why})",
                 "run the check where chatd runs (on the host, not in a container)")


def _at_least(
    box: Box, key: str, want: int, *, short: str, detail: str, warn_below: int | None = None
) -> Check:
    """A sysctl that must be >= ``want`` (``short``: WARN or FAIL below it);
    with ``warn_below``, a value in ``want..warn_below`` warns."""
    values = _ints(box.sysctl.get(key), 1)
    if values is None:
        return _unreadable(key, f"/proc/sys/{key.replace('.', '/')}")
    have = values[0]
    if have < want:
        return Check(key, short, str(have), f">= {want}", detail, _sysctl_fix(key, want))
    if warn_below is not None and have < warn_below:
        return Check(key, WARN, str(have), f">= {warn_below}", detail,
                     _sysctl_fix(key, warn_below))
    return Check(key, PASS, str(have), f">= {want}")


def _nofile(box: Box, n: int, need: int) -> list[Check]:
    soft, hard = (_rlimit(v) for v in box.nofile)
    unit_soft = _unit_soft(box)
    unit_ok = unit_soft is not None and unit_soft >= need
    # with a unit that gives enough, chatd runs under it: a low limit here
    # then concerns only a chatd started from this shell, and warns
    short = WARN if unit_ok else FAIL
    where = (" (the installed unit sets its own: this matters only to a chatd started "
             "from this shell)" if unit_ok else "")
    checks = []
    if soft >= need:
        checks.append(Check("rlimit.nofile.soft", PASS, _limit_text(soft), f">= {need}"))
    else:
        checks.append(Check(
            "rlimit.nofile.soft", short, _limit_text(soft), f">= {need}",
            f"a chatd serve started from this shell could hold about {max(0, soft - FD_HEADROOM)}"
            f" connections, one file each{where}",
            f"ulimit -n {need} before chatd serve (up to the hard limit, {_limit_text(hard)})"
            if hard >= need else "raise the hard limit first (below)",
        ))
    if hard >= need:
        checks.append(Check("rlimit.nofile.hard", PASS, _limit_text(hard), f">= {need}"))
    else:
        checks.append(Check(
            "rlimit.nofile.hard", short, _limit_text(hard), f">= {need}",
            f"no process started from this shell may open more than {hard} files{where}",
            f"raise nofile in /etc/security/limits.conf (and log in again) to {need} or more, "
            f"or run chatd under systemd/chatd.service (LimitNOFILE={RECOMMENDED_NOFILE})",
        ))
    return checks


def _nr_open(box: Box) -> int | None:
    values = _ints(box.sysctl.get("fs.nr_open"), 1)
    return values[0] if values else None


def _unit_soft(box: Box) -> int | None:
    """The soft limit a chatd under the unit gets; None if the unit gives none."""
    parsed = _parse_limit(box.unit.limit, _nr_open(box)) if box.unit.limit else None
    return parsed[0] if parsed else None


def _parse_limit(value: str, nr_open: int | None) -> tuple[int, int] | None:
    """``LimitNOFILE`` as (soft, hard) as systemd applies it: ``N``, ``S:H`` or
    ``infinity``; a value above ``fs.nr_open`` is lowered to it (systemd
    sets the closest limit the kernel allows). None if not a limit."""
    parts = value.split(":")
    if len(parts) > 2:
        return None
    limits = []
    for part in parts:
        part = part.strip()
        if part == "infinity":
            number = nr_open if nr_open is not None else UNLIMITED
        elif part.isascii() and part.isdigit():
            number = int(part)
        else:
            return None
        limits.append(min(number, nr_open) if nr_open is not None else number)
    soft, hard = limits[0], limits[-1]
    return None if soft > hard else (soft, hard)


def _unit(box: Box, need: int) -> Check:
    name, unit = "unit.LimitNOFILE", box.unit
    want = f">= {need}"
    fix_set = (f"set LimitNOFILE={max(need, RECOMMENDED_NOFILE)} in [Service] of {unit.path} "
               "(systemd/chatd.service has it), then systemctl daemon-reload and restart chatd")
    if not unit.found:
        if unit.explicit:
            return Check(name, FAIL, "not found", want, f"no unit file at {unit.path}",
                         "give the path of the installed unit, or install it (README, Operate)")
        return Check(name, WARN, "not installed", want,
                     f"no unit at {unit.path}: a chatd started from a shell has that shell's "
                     "limits (rlimit.nofile above)",
                     "install systemd/chatd.service (README, Operate), or --unit FILE")
    if unit.error:
        return Check(name, FAIL, "unreadable", want, f"{unit.path}: {unit.error}",
                     "make the unit readable")
    if unit.limit is None:
        return Check(name, FAIL, "not set", want,
                     f"{unit.path} does not set it: systemd's default soft limit is 1024 files",
                     fix_set)
    nr_open = _nr_open(box)
    parsed = _parse_limit(unit.limit, nr_open)
    if parsed is None:
        return Check(name, FAIL, unit.limit, want, "not a limit systemd accepts", fix_set)
    soft, hard = parsed
    applied = str(soft) if soft == hard else f"{soft}:{hard}"
    have = unit.limit if applied == unit.limit else f"{unit.limit} (applied: {applied})"
    if soft < need:
        lowered = (f"; systemd lowers it to fs.nr_open ({nr_open})"
                   if nr_open is not None and soft == nr_open else "")
        return Check(name, FAIL, have, want,
                     f"chatd under the unit could hold about {max(0, soft - FD_HEADROOM)} "
                     f"connections{lowered}", fix_set)
    return Check(name, PASS, have, want)


def _ports(port_range: str) -> int:
    low, high = (int(v) for v in port_range.split())
    return high - low + 1


def _port_range(box: Box, n: int) -> Check:
    key = "net.ipv4.ip_local_port_range"
    values = _ints(box.sysctl.get(key), 2)
    if values is None or values[0] > values[1]:
        return _unreadable(key, f"/proc/sys/{key.replace('.', '/')}")
    ports = _ports(f"{values[0]} {values[1]}")
    have = f"{values[0]} {values[1]} ({ports} ports)"
    if ports >= n:
        return Check(key, PASS, have, f">= {n} ports")
    sources = -(-n // ports)
    return Check(
        key, WARN, have, f">= {n} ports",
        f"chatd takes no ephemeral port for a connection it accepts; but a load generator "
        f"(or a proxy) on this box opens each connection to one chat address:port from a "
        f"local port of this range, so one source address reaches at most {ports} "
        f"connections. chatd-bench spreads its connections over 127.0.x.y source "
        f"addresses on loopback; other clients need {sources} source addresses for {n}",
        f"give the load generator {sources} or more source addresses"
        + (f", or widen the range: sysctl -w {key}='{RECOMMENDED[key]}' gives "
           f"{_ports(RECOMMENDED[key])} ports per address; {_PERSIST}"
           if _ports(RECOMMENDED[key]) > ports else ""),
    )


def _buffers(box: Box) -> tuple[list[int] | None, list[int] | None]:
    return _ints(box.sysctl.get("net.ipv4.tcp_rmem"), 3), _ints(
        box.sysctl.get("net.ipv4.tcp_wmem"), 3
    )


def _tcp_mem(box: Box, n: int) -> Check:
    key = "net.ipv4.tcp_mem"
    values = _ints(box.sysctl.get(key), 3)
    if values is None:
        return _unreadable(key, f"/proc/sys/{key.replace('.', '/')}")
    rmem, wmem = _buffers(box)
    per_conn = (rmem[0] if rmem else DEFAULT_BUFFER_MIN) + (wmem[0] if wmem else DEFAULT_BUFFER_MIN)
    need = math.ceil(n * per_conn / box.page_bytes)
    low, pressure, high = values
    have = f"{low} {pressure} {high} pages"
    detail = (f"{n} connections at their minimum buffers ({per_conn} bytes each: tcp_rmem "
              f"+ tcp_wmem minimum) take {need} pages of {box.page_bytes} bytes "
              f"({_mib(need * box.page_bytes)})")
    fix = _sysctl_fix(key, _tcp_mem_triple(need * box.page_bytes, box.page_bytes))
    if high < need:
        return Check(key, FAIL, have, f"max >= {need} pages",
                     detail + ": past the maximum the kernel refuses socket memory and "
                     "drops connections", fix)
    if pressure < need:
        return Check(key, WARN, have, f"pressure >= {need} pages",
                     detail + ": past the pressure point the kernel squeezes every "
                     "socket's buffers", fix)
    return Check(key, PASS, have, f"pressure >= {need} pages", detail)


def _tcp_mem_triple(need_bytes: int, page_bytes: int = 4096) -> str:
    """tcp_mem whose pressure point holds ``need_bytes``: the recommended
    triple when it is enough, else one in the same proportions."""
    need = math.ceil(need_bytes / page_bytes)
    rec = [int(v) for v in RECOMMENDED["net.ipv4.tcp_mem"].split()]
    if rec[1] < need:
        rec = [math.ceil(need * 3 / 4), need, math.ceil(need * 3 / 2)]
    return " ".join(map(str, rec))


def _socket_buffer(box: Box, n: int, key: str) -> Check:
    """A direction's default buffer, for N connections, against its half of
    tcp_mem's pressure point (a connection has one of each)."""
    values = _ints(box.sysctl.get(key), 3)
    if values is None:
        return _unreadable(key, f"/proc/sys/{key.replace('.', '/')}")
    have = f"{values[0]} {values[1]} {values[2]} bytes"
    mem = _ints(box.sysctl.get("net.ipv4.tcp_mem"), 3)
    if mem is None:
        return Check(key, WARN, have, "", "cannot be judged: net.ipv4.tcp_mem is unreadable",
                     "run the check where chatd runs")
    busy = n * values[1]
    share = mem[1] * box.page_bytes // 2
    want = f"default <= {share // n} bytes"
    detail = (f"{n} connections each holding the default buffer ({values[1]} bytes) take "
              f"{_mib(busy)}; this direction's half of tcp_mem's pressure point is "
              f"{_mib(share)}")
    if busy <= share:
        return Check(key, PASS, have, want, detail)
    rec_default = int(RECOMMENDED[key].split()[1])
    fixes = []
    if values[1] > rec_default:
        fixes.append(f"sysctl -w {key}='{RECOMMENDED[key]}'")
    if n * min(values[1], rec_default) > share:  # a small default alone is not enough
        triple = _tcp_mem_triple(2 * n * rec_default, box.page_bytes)
        fixes.append(f"sysctl -w net.ipv4.tcp_mem='{triple}'")
    fix = " and ".join(fixes) + f"; {_PERSIST}"
    return Check(key, WARN, have, want,
                 detail + ": busy connections would put the kernel under memory pressure", fix)


def _memory(box: Box, n: int) -> Check:
    name = "memory.available"
    if box.mem_available_kib is None:
        return _unreadable(name, "MemAvailable in /proc/meminfo")
    rmem, wmem = _buffers(box)
    least = ((rmem[0] if rmem else DEFAULT_BUFFER_MIN)
             + (wmem[0] if wmem else DEFAULT_BUFFER_MIN)) / 1024
    busy = (rmem[1] + wmem[1]) / 1024 if rmem and wmem else least
    need_kib = math.ceil(n * (KIB_PER_CONNECTION + least))
    busy_kib = math.ceil(n * (KIB_PER_CONNECTION + busy))
    have_kib = box.mem_available_kib
    have = f"{have_kib // 1024:,} MiB"
    detail = (f"{KIB_PER_CONNECTION} KiB of chatd per connection (the bench's figure) plus "
              f"{least:g} KiB of socket buffers at their minimum, {busy:g} KiB at their default")
    if have_kib < need_kib:
        fit = int(have_kib / (KIB_PER_CONNECTION + least))
        return Check(name, FAIL, have, f">= {need_kib // 1024:,} MiB", detail,
                     f"this box holds about {fit} connections: add memory or plan fewer")
    if have_kib < busy_kib:
        return Check(name, WARN, have, f">= {busy_kib // 1024:,} MiB",
                     detail + ": enough while they are idle, not if all are busy",
                     "lower the tcp_rmem/tcp_wmem defaults (16384, as in "
                     "sysctl/99-chatd.conf) or add memory")
    return Check(name, PASS, have, f">= {busy_kib // 1024:,} MiB", detail)


def assess(box: Box, connections: int = DEFAULT_CONNECTIONS) -> list[Check]:
    """Judge ``box`` for ``connections`` connections: one ``Check`` per figure."""
    n = connections
    need = n + FD_HEADROOM
    backlog = min(n, BACKLOG_CAP)
    storm = ("a reconnect storm after a restart brings up to {} handshakes at once; "
             "past this queue clients wait for SYN retries (1 s, 3 s, ...)")
    return [
        *_nofile(box, n, need),
        _unit(box, need),
        _at_least(box, "fs.nr_open", need, short=FAIL,
                  detail="no process may raise its open-file limit above it"),
        _at_least(box, "fs.file-max", n + SYSTEM_FD_HEADROOM, short=FAIL,
                  warn_below=2 * n + SYSTEM_FD_HEADROOM,
                  detail=f"open files of the whole box: chatd's {n} connections and the rest "
                  f"of the system ({SYSTEM_FD_HEADROOM}); a load generator on this box "
                  f"holds {n} more"),
        _at_least(box, "net.core.somaxconn", backlog, short=WARN,
                  detail=storm.format(n) + " (each listener's accept queue)"),
        _at_least(box, "net.ipv4.tcp_max_syn_backlog", backlog, short=WARN,
                  detail=storm.format(n) + " (half-open connections per listener)"),
        _at_least(box, "net.core.netdev_max_backlog", backlog, short=WARN,
                  detail=storm.format(n) + " (packets queued per CPU before the stack)"),
        _port_range(box, n),
        _tcp_mem(box, n),
        _socket_buffer(box, n, "net.ipv4.tcp_rmem"),
        _socket_buffer(box, n, "net.ipv4.tcp_wmem"),
        _memory(box, n),
    ]


def exit_status(checks: Sequence[Check]) -> int:
    """0 when the box is ready (nothing fails; warnings are allowed), else 1."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def format_text(checks: Sequence[Check], connections: int) -> str:
    """The report for people: a line per check; a warning or failure adds why and the fix."""
    lines = [f"chatd tune check for {connections} connections"]
    for c in checks:
        want = f"  (want {c.want})" if c.want else ""
        lines.append(f"{c.status.upper():<4}  {c.name:<29} {c.have}{want}")
        if c.status != PASS:
            if c.detail:
                lines.append(f"      {c.detail}")
            if c.fix:
                lines.append(f"      fix: {c.fix}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    verdict = "not ready" if fails else "ready"
    lines.append(f"{verdict}: {fails} fail, {warns} warn, "
                 f"{len(checks) - fails - warns} pass")
    return "\n".join(lines) + "\n"


def format_json(checks: Sequence[Check], connections: int) -> str:
    """The report for scripts: ``{"connections", "ready", "checks": [...]}``."""
    return json.dumps({
        "connections": connections,
        "ready": exit_status(checks) == 0,
        "checks": [dataclasses.asdict(c) for c in checks],
    }, indent=2) + "\n"
