"""``chatd tune check`` as a command: its exit status, its two report forms,
``--proc-root`` and ``CHATD_PROC_ROOT``, and a run against this box's /proc."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import UNIT
from fake_proc import ALL_NAMES, conf_values, make_proc
from fake_proc import UNIT as REPO_UNIT


def tune_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "CHATD_PROC_ROOT"}
    return subprocess.run([sys.executable, "-m", "chatd", "tune", "check", *args],
                          capture_output=True, text=True, timeout=30 * UNIT,
                          env={**environ, **(env or {})})


HEAD = re.compile(r"^(PASS|WARN|FAIL)  (\S+) +(\S.*?)(  \(want (.+)\))?$")


def heads(text: str) -> list[tuple[str, str]]:
    """(status, name) of each check line; every other line must be a detail or a fix."""
    lines = text.splitlines()
    assert re.fullmatch(r"chatd tune check for \d+ connections", lines[0])
    assert re.fullmatch(r"(not ready|ready): \d+ fail, \d+ warn, \d+ pass", lines[-1])
    found = []
    for line in lines[1:-1]:
        m = HEAD.match(line)
        if m:
            found.append((m.group(1), m.group(2)))
        else:
            assert line.startswith("      "), f"not a report line: {line!r}"
    return found


def test_a_ready_box_exits_0_even_with_warnings(tmp_path: Path) -> None:
    proc = make_proc(tmp_path / "proc", conf_values())
    out = tune_check("--proc-root", str(proc), "--unit", str(REPO_UNIT))
    assert out.returncode == 0, out.stdout + out.stderr
    found = heads(out.stdout)
    assert [name for _, name in found] == ALL_NAMES
    assert ("WARN", "net.ipv4.ip_local_port_range") in found
    assert not any(status == "FAIL" for status, _ in found)
    assert out.stdout.splitlines()[-1].startswith("ready: 0 fail")


def test_a_failing_check_exits_1_and_says_the_fix(tmp_path: Path) -> None:
    proc = make_proc(tmp_path / "proc", {**conf_values(), "fs.nr_open": "1000"})
    out = tune_check("--proc-root", str(proc), "--unit", str(REPO_UNIT))
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("FAIL", "fs.nr_open") in heads(out.stdout)
    assert "      fix: sysctl -w fs.nr_open=4194304" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("not ready:")


def test_json_and_the_proc_root_from_the_environment(tmp_path: Path) -> None:
    proc = make_proc(tmp_path / "proc", {**conf_values(), "net.core.somaxconn": "128"})
    out = tune_check("--json", "--connections", "5000", "--unit", str(REPO_UNIT),
                     env={"CHATD_PROC_ROOT": str(proc)})
    report = json.loads(out.stdout)
    assert report["connections"] == 5000
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ALL_NAMES
    assert checks["net.core.somaxconn"]["have"] == "128"
    assert checks["net.core.somaxconn"]["status"] == "warn"
    assert checks["net.core.somaxconn"]["want"] == ">= 5000"
    assert report["ready"] is (out.returncode == 0)
    assert out.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)


def test_against_this_box(tmp_path: Path) -> None:
    text = tune_check()
    found = heads(text.stdout)
    assert [name for _, name in found] == ALL_NAMES
    assert text.returncode == (1 if any(s == "FAIL" for s, _ in found) else 0), text.stderr
    as_json = tune_check("--json")
    report = json.loads(as_json.stdout)
    assert [c["name"] for c in report["checks"]] == ALL_NAMES
    for check in report["checks"]:
        assert check["status"] in ("pass", "warn", "fail")
        assert check["have"]
        assert (check["fix"] == "") == (check["status"] == "pass"), check
    assert report["ready"] is (as_json.returncode == 0)
    # this box's values, as the kernel reports them
    nr_open = Path("/proc/sys/fs/nr_open").read_text().strip()
    assert {c["name"]: c["have"] for c in report["checks"]}["fs.nr_open"] == nr_open


def test_bad_usage_exits_2() -> None:
    for args in (["--connections", "0"], ["--connections", "many"], ["--frobnicate"]):
        out = tune_check(*args)
        assert out.returncode == 2 and out.stdout == "" and "usage:" in out.stderr, args
