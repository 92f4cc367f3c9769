"""Fake /proc trees and unit files for ``chatd tune check`` tests, and the
files the project ships that they are compared with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "sysctl" / "99-chatd.conf"
UNIT = REPO / "systemd" / "chatd.service"
BIG_MEM_KIB = 64 * 1024 * 1024


def conf_values() -> dict[str, str]:
    """key -> value of every setting in sysctl/99-chatd.conf."""
    values = {}
    for line in CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = " ".join(value.split())
    return values


#: the settings of a stock kernel on a 24 GiB box (as the development machine has them)
STOCK: Mapping[str, str] = {
    "fs.file-max": "2466116",
    "fs.nr_open": "1048576",
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_max_syn_backlog": "2048",
    "net.core.netdev_max_backlog": "1000",
    "net.ipv4.ip_local_port_range": "32768 60999",
    "net.ipv4.tcp_mem": "287892 383858 575784",
    "net.ipv4.tcp_rmem": "4096 131072 33554432",
    "net.ipv4.tcp_wmem": "4096 16384 4194304",
}


def make_proc(root: Path, sysctl: Mapping[str, str], mem_kib: int | None = BIG_MEM_KIB) -> Path:
    """A /proc tree with ``sysctl`` under sys/ (tab-separated, as the kernel
    writes triples) and a meminfo that has ``MemAvailable``."""
    for key, value in sysctl.items():
        path = root / "sys" / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\t".join(value.split()) + "\n")
    root.mkdir(parents=True, exist_ok=True)
    if mem_kib is not None:
        (root / "meminfo").write_text(
            f"MemTotal:       {mem_kib * 2} kB\nMemFree:        {mem_kib // 2} kB\n"
            f"MemAvailable:   {mem_kib} kB\nBuffers:        1000 kB\n")
    return root


def make_unit(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[Unit]\nDescription=chatd\n\n[Service]\n" + "".join(f"{x}\n" for x in lines))
    return path


#: the checks, in the order the report gives them
ALL_NAMES = [
    "rlimit.nofile.soft", "rlimit.nofile.hard", "unit.LimitNOFILE", "fs.nr_open", "fs.file-max",
    "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.core.netdev_max_backlog",
    "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem", "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem", "memory.available",
]
