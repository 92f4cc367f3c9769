"""``chatd-bench report`` over JSON lines made here: medians, spreads, ratios,
warnings, grouping, bad files; and the ``--procs`` default."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from chatd_bench import summary
from chatd_bench.cli import _parser, _procs, default_procs, generator_cpus, report_main
from chatd_bench.report import by_thread_line
from chatd_bench.run import Options, by_thread
from chatd_bench.servers import thread_role

from chatd.threads import name_this_thread


def _run(target: str, srv_us: float, p99: float = 5.0, rnd: int = 1,
         **extra: Any) -> dict[str, Any]:
    """A run's JSON line with the fields the report reads (as ``--json`` writes them)."""
    r: dict[str, Any] = {
        "target": target, "scenario": "private", "label": f"{target} private #{rnd}",
        "unit": "message", "procs": 1, "users": 200, "rate": 0.0, "window": 8,
        "round": rnd, "rounds": 3, "duration_s": 10.0,
        "throughput_per_s": 1e6 / srv_us, "server_cpu_us_per_unit": srv_us,
        "total_cpu_us_per_unit": srv_us,
        "latency_ms": {"p50": p99 / 4, "p99": p99, "p999": p99 * 2, "n": 1000},
        "rss_kib_per_conn": 8.0, "server_util": 0.9, "server_side_util": 0.9,
        "client_cpu_s": 5.0, "client_util": 0.5, "client_util_max": 0.5,
        "client_bound": False, "problems": [], "ok": True, "warnings": [],
    }
    r.update(extra)
    return r


def _write(path: Path, runs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    return path


def _report(tmp_path: Path, runs: list[dict[str, Any]], *args: str,
            capsys: pytest.CaptureFixture[str]) -> str:
    rc = report_main([str(_write(tmp_path / "runs.jsonl", runs)), *args])
    assert rc == 0
    return capsys.readouterr().out


def _tables(text: str) -> list[dict[str, dict[str, str]]]:
    """Each group's table read back: row name -> column title -> cell, the
    columns cut where the dashes under the titles say. A min–max line is
    ``"<row> min–max"``; a ratio line is ``"<row> / <base>"``."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("target"):
            continue
        spans, at = [], 0
        for dashes in lines[i + 1].split("  "):
            spans.append((at, at + len(dashes)))
            at += len(dashes) + 2
        head = [line[a:b].strip() for a, b in spans]
        rows: dict[str, dict[str, str]] = {}
        last = ""
        for body in lines[i + 2:]:
            if not body.strip() or body.startswith("=="):
                break
            if body.startswith("ratios to "):
                continue
            cells = dict(zip(head, (body.ljust(at)[a:b].strip() for a, b in spans),
                             strict=True))
            name = cells["target"]
            if name == "min–max":
                name = f"{last} min–max"
            elif " / " not in name:
                last = name
            rows[name] = cells
        out.append(rows)
    return out


def _table(text: str) -> dict[str, dict[str, str]]:
    [table] = _tables(text)
    return table


def test_medians_spreads_and_ratios_to_the_first_chatd(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    runs = [_run("chatd", 10.0, 9.0, 1), _run("picows", 6.0, 2.0, 1),
            _run("chatd", 30.0, 3.0, 2), _run("picows", 4.0, 4.0, 2),
            _run("chatd", 14.0, 4.0, 3), _run("picows", 5.0, 3.0, 3)]
    out = _report(tmp_path, runs, capsys=capsys)
    assert "== private, window 8, 200 users" in out
    t = _table(out)
    # runs, procs, then the medians over the three rounds, and their spread
    chatd = t["chatd"]
    assert (chatd["runs"], chatd["procs"], chatd["flags"]) == ("3", "1", "")
    # (medians, not means: 14 of 10, 14, 30; 4 of 3, 4, 9)
    assert (chatd["srv µs/unit"], chatd["p99 ms"], chatd["p99.9 ms"]) == ("14.0", "4.00", "8.00")
    assert (chatd["thru/s"], chatd["gen %"], chatd["gen max %"]) == ("71,429", "50", "50")
    spread = t["chatd min–max"]
    assert (spread["srv µs/unit"], spread["p99 ms"]) == ("10.0–30.0", "3.00–9.00")
    assert spread["KiB/conn"] == "8.0–8.0"
    # picows over chatd, median over median: 5 / 14 µs, 3 / 4 ms, 200k / 71.4k
    ratio = t["picows / chatd"]
    assert (ratio["srv µs/unit"], ratio["p99 ms"], ratio["thru/s"]) == ("x0.36", "x0.75", "x2.80")
    assert ratio["gen %"] == ""  # no ratio for shares of a CPU
    assert "chatd / picows" not in t and "ratios to chatd" in out
    assert "!!" not in out  # every run clean, no generator limit


def test_base_can_be_a_peer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [_run("chatd", 20.0), _run("node", 10.0), _run("picows", 5.0)]
    out = _report(tmp_path, runs, "--base", "picows", capsys=capsys)
    t = _table(out)
    assert t["chatd / picows"]["srv µs/unit"] == "x4.00"
    assert t["node / picows"]["srv µs/unit"] == "x2.00"
    assert "picows / " not in out


def test_unknown_base_is_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "runs.jsonl", [_run("chatd", 20.0)])
    with pytest.raises(SystemExit) as exc:
        report_main([str(path), "--base", "nginx"])
    assert exc.value.code == 2
    assert "no target 'nginx'" in capsys.readouterr().err


def test_a_peer_missing_in_one_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # round 2 of node failed to start: two chatd runs, one node run
    runs = [_run("chatd", 10.0, rnd=1), _run("node", 8.0, rnd=1), _run("chatd", 14.0, rnd=2)]
    out = _report(tmp_path, runs, capsys=capsys)
    t = _table(out)
    assert t["node"]["runs"] == "1/2"  # one run of the two the group has
    assert "node min–max" not in t
    assert (t["chatd"]["runs"], t["chatd"]["srv µs/unit"]) == ("2", "12.0")  # 10 and 14
    assert t["node / chatd"]["srv µs/unit"] == "x0.67"  # 8 / 12


def test_generator_limit_and_unclean_runs_are_warned_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bound = _run("chatd", 10.0, rnd=1, client_bound=True, client_util_max=0.97,
                 server_side_util=0.4, warnings=["the load generator was the limit (...)",
                                                 "chatd exited with 1"])
    # an older line without client_bound: the same test on its figures
    old = _run("chatd", 12.0, rnd=2, client_util_max=0.9, server_side_util=0.5)
    del old["client_bound"]
    dirty = _run("picows", 5.0, ok=False, problems=["LOST 3 of 100 copies"])
    fine = _run("chatd", 11.0, rnd=3)
    out = _report(tmp_path, [bound, old, dirty, fine], capsys=capsys)
    gen = [ln for ln in out.splitlines() if ln.startswith("!! GENERATOR WAS THE LIMIT")]
    assert len(gen) == 2
    assert "chatd private #1" in gen[0] and "runs.jsonl:1" in gen[0] and "97%" in gen[0]
    assert "chatd private #2" in gen[1] and "runs.jsonl:2" in gen[1]
    [unclean] = [ln for ln in out.splitlines() if ln.startswith("!! NOT CLEAN")]
    assert "runs.jsonl:3" in unclean and "LOST 3 of 100 copies" in unclean
    # the run's own generator note is not repeated; its other notes are shown
    assert "the load generator was the limit (...)" not in out
    assert "note: chatd private #1 (" in out and "chatd exited with 1" in out
    t = _table(out)
    assert t["chatd"]["flags"] == "gen-limited 2/3"
    assert t["picows"]["flags"] == "NOT CLEAN 1/1"


def test_unknown_fields_and_older_lines(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    new = _run("chatd", 10.0, some_future_field={"nested": [1, 2]}, another=None)
    # a line from before the report: no client_util, rate, window, users, round
    old = _run("chatd", 10.0, client_cpu_s=3.0)
    for key in ("client_util", "rate", "window", "users", "round", "rounds"):
        del old[key]
    out = _report(tmp_path, [new, old], capsys=capsys)
    # two groups: the new line's shape, and the older line's scenario alone
    assert "== private, window 8, 200 users" in out and "== private  (unit" in out
    new_t, old_t = _tables(out)
    assert new_t["chatd"]["gen %"] == "50"
    assert old_t["chatd"]["gen %"] == "30"  # 3.0 s of load-process CPU over 10 s


def test_shapes_and_set_ups_are_kept_apart(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    runs = [_run("chatd", 10.0, placement="same", store="sqlite"),
            _run("chatd", 15.0, placement="cross", store="sqlite"),
            _run("chatd", 40.0, rate=20000.0, window=None),
            _run("group-peer", 1.0, scenario="group", members=100, groups=2, window=10)]
    out = _report(tmp_path, runs, capsys=capsys)
    assert "== private, rate 20000/s, 200 users" in out
    assert "== group, M=100, 2 groups, window 10" in out
    setups, rate, groups = _tables(out)
    assert setups["chatd [placement=same]"]["srv µs/unit"] == "10.0"
    assert setups["chatd [placement=cross] / chatd [placement=same]"]["srv µs/unit"] == "x1.50"
    assert list(rate) == ["chatd"] and list(groups) == ["group-peer"]
    # a group with no chatd run has no base, and says so
    assert "(no chatd run in this group: no ratios)" not in out  # group-peer is alone
    runs.append(_run("other-peer", 2.0, scenario="group", members=100, groups=2, window=10))
    out = _report(tmp_path, runs, capsys=capsys)
    assert "(no chatd run in this group: no ratios)" in out


def test_engines_columns_only_where_a_run_had_engines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _report(tmp_path, [_run("chatd", 10.0)], capsys=capsys)
    assert "pg µs/unit" not in out and "all µs/unit" not in out
    pg = _run("chatd/postgres", 10.0, postgres_cpu_us_per_unit=30.0, total_cpu_us_per_unit=40.0)
    out = _report(tmp_path, [_run("chatd", 10.0), pg], capsys=capsys)
    t = _table(out)
    assert t["chatd/postgres"]["pg µs/unit"] == "30.0" and "nats µs/unit" not in t["chatd"]
    assert t["chatd/postgres / chatd"]["all µs/unit"] == "x4.00"  # with engines: 40 / 10
    assert t["chatd/postgres / chatd"]["srv µs/unit"] == "x1.00"


def test_bad_files_are_named_with_their_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mixed.jsonl"
    # the table printed beside --json - is skipped, a broken JSON line is not
    path.write_text("target  scenario\n" + json.dumps(_run("chatd", 1.0)) + "\n{oops\n")
    with pytest.raises(summary.ReportError, match=r"mixed.jsonl:3: not a JSON line"):
        summary.load([path])
    path.write_text("target  scenario\n\n" + json.dumps(_run("chatd", 1.0)) + "\n")
    runs, skipped = summary.load([path])
    assert len(runs) == 1 and skipped == 1 and runs[0]["_src"].endswith("mixed.jsonl:3")
    path.write_text(json.dumps({"hello": 1}) + "\n")
    with pytest.raises(SystemExit) as exc:
        report_main([str(path)])
    assert exc.value.code == 2
    assert "mixed.jsonl:1: not a chatd-bench run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in capsys.readouterr().err


def test_plot_draws_grouped_bars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    png = tmp_path / "bars.png"
    runs = [_run("chatd", 10.0, rnd=1), _run("picows", 5.0), _run("chatd", 12.0, rnd=2),
            _run("chatd", 40.0, rate=20000.0, window=None)]
    _report(tmp_path, runs, "--plot", str(png), capsys=capsys)
    with Image.open(png) as img:
        assert img.format == "PNG"
        colors = {c for _, c in img.getcolors(1 << 20) or []}
    # a bar of each target's colour: chatd's blue, picows' orange
    assert (31, 119, 180) in colors and (255, 127, 14) in colors


def test_generator_cpus_rule() -> None:
    assert generator_cpus("0:1", usable=2) == 1  # this box: --pin 0:1
    assert generator_cpus("0-1:2-7", usable=16) == 6  # --pin's generator set
    assert generator_cpus("0", usable=4) == 3  # the rest of the CPUs
    assert generator_cpus(None, usable=2) == 1  # chatd takes a shard per CPU
    assert generator_cpus(None, usable=16, shards=[1, 2]) == 14
    assert generator_cpus(None, usable=8, remote=True) == 8  # a server elsewhere
    assert generator_cpus("0-3", usable=2) == 1  # at least one


def test_default_procs_never_exceeds_the_load_to_split() -> None:
    assert default_procs(6, [Options("private", users=8)]) == 4  # 4 pairs
    assert default_procs(6, [Options("group", groups=2, members=10),
                             Options("group", groups=2, members=100)]) == 2
    assert default_procs(6, [Options("connect", conns=3)]) == 3
    assert default_procs(6, [Options("mixed", users=1000)]) == 6
    assert default_procs(1, [Options("private", users=200)]) == 1


def test_procs_flag_and_default_from_the_command_line() -> None:
    phases = [Options("private", users=200)]
    args = _parser().parse_args(["private", "--pin", "0:1", "--quiet"])
    assert _procs(args, phases) == 1  # unchanged on a 2-core box pinned 0:1
    args = _parser().parse_args(["private", "--pin", "0:1-3", "--quiet"])
    assert _procs(args, phases) == 3
    args = _parser().parse_args(["private", "--pin", "0:1-3", "--procs", "2", "--quiet"])
    assert _procs(args, phases) == 2  # given: taken as it is


def test_the_cpu_split_by_thread_is_per_unit_biggest_first_and_drops_idle_threads() -> None:
    split = by_thread({"chatd-shard": 1.0, "chatd-writer": 0.5, "chatd-reader": 0.2},
                      {"chatd-shard": 1.9, "chatd-writer": 1.1, "chatd-reader": 0.2,
                       "chatd-checkpt": 0.01}, 100_000)
    assert split == {"chatd-shard": 9.0, "chatd-writer": 6.0, "chatd-checkpt": 0.1}
    assert list(split) == ["chatd-shard", "chatd-writer", "chatd-checkpt"]
    line = by_thread_line({"target": "chatd", "scenario": "private", "unit": "message",
                           "server_cpu_us_per_unit_by_thread": split})
    assert line == ("threads: chatd private: chatd-shard 9.0, chatd-writer 6.0, "
                    "chatd-checkpt 0.1 µs/message")
    # a thread that would print as 0.0 is left out of the line
    assert by_thread_line({"target": "chatd", "scenario": "private", "unit": "message",
                           "server_cpu_us_per_unit_by_thread": {**split, "python3": 0.01}}
                          ) == line
    # one busy thread (a bare relay): nothing to split
    assert by_thread_line({"target": "picows", "scenario": "private",
                           "server_cpu_us_per_unit_by_thread": {"python3": 10.0}}) is None


def test_thread_role_drops_the_index_and_says_so_when_unreadable() -> None:
    got: list[str] = []

    def named() -> None:
        assert name_this_thread("chatd-shard-12")
        got.append(thread_role(os.getpid(), threading.get_native_id()))
        # the kernel keeps 15 bytes of a name
        assert name_this_thread("chatd-a-very-long-name")
        got.append(thread_role(os.getpid(), threading.get_native_id()))

    t = threading.Thread(target=named)
    t.start()
    t.join()
    assert got == ["chatd-shard", "chatd-a-very-lo"]
    assert thread_role(os.getpid(), 2**22 + 12345) == "?"
