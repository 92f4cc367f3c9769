"""Every bench scenario end to end against a real chatd, tiny sizes: nothing
may be lost, duplicated or misrouted. No timing is asserted (STYLE: benchmarks
are not tests); this checks that the harness and the server agree, on one
node with SQLite or PostgreSQL and on a cluster of two nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chatd_bench.plan import Plan, pairs
from chatd_bench.run import Options, Target, placement_urls

UNIT = float(os.environ.get("CHATD_TEST_UNIT", "1.0"))

SCENARIOS = {
    "connect": ["--conns", "40", "--conn-rate", "400", "--hold", "0.5"],
    "private": ["--users", "8", "--window", "4"],
    "private-open": ["--users", "8", "--rate", "200"],
    "group": ["--members", "3,10", "--groups", "2", "--senders", "2", "--window", "2"],
    "mixed": ["--users", "40", "--groups", "2", "--rate", "100", "--churn", "4"],
    "soak": ["--users", "20", "--groups", "2", "--rate", "50", "--churn", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_runs_clean(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    png = tmp_path / "out.png"
    argv = [sys.executable, "-m", "chatd_bench.cli", name.split("-")[0], *SCENARIOS[name],
            "--duration", "1", "--drain", str(5 * UNIT), "--procs", "2", "--quiet",
            "--data-dir", str(tmp_path / "data"), "--json", str(out), "--plot", str(png)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert results and all(r["ok"] for r in results), done.stdout
    for r in results:
        t = r["tally"]
        assert t["delivered"] == t["expected"]
        assert t["dups"] == t["misroutes"] == 0
        if r["scenario"] != "connect":
            assert t["sent"] > 0 and t["acked"] == t["sent"]
        if name in ("private", "group"):
            # closed loops keep the shards' loops busy for the whole window
            assert "chatd-shard" in r["server_cpu_us_per_unit_by_thread"], r
    assert png.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["upload", "login"])
def test_api_scenario_runs_clean(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "chatd_bench.cli", name, "--duration", "1", "--window", "2",
            "--quiet", "--data-dir", str(tmp_path / "data"), "--json", str(out),
            "--plot", str(tmp_path / "out.png")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["ok"] and result["done"] > 0 and result["errors"] == []
    assert result["server_cpu_us_per_unit"] > 0


@pytest.mark.slow
async def test_url_points_the_bench_at_a_running_server(tmp_path: Path) -> None:
    from conftest import ServerProcess

    data = tmp_path / "data"
    server = ServerProcess(data, env={"CHATD_RATE_LIMIT": "false"})
    try:
        port = await server.started()
        out = tmp_path / "out.jsonl"
        argv = [sys.executable, "-m", "chatd_bench.cli", "private", "--users", "8",
                "--window", "4", "--duration", "1", "--drain", str(5 * UNIT), "--quiet",
                "--url", f"ws://127.0.0.1:{port}/chat", "--server-pid", str(server.proc.pid),
                "--data-dir", str(data), "--json", str(out)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120 * UNIT)
        assert done.returncode == 0, done.stdout + done.stderr
        [result] = [json.loads(line) for line in out.read_text().splitlines()]
        assert result["ok"] and result["tally"]["delivered"] == result["tally"]["expected"] > 0
        assert result["server_cpu_us_per_unit"] > 0  # measured through --server-pid
    finally:
        server.kill()


def _bench(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    """Run the bench (private, 4 pairs, a 1 s window); its JSON lines, once it
    exited 0 (every run clean)."""
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "chatd_bench.cli", "private", "--users", "8",
            "--window", "4", "--duration", "1", "--drain", str(5 * UNIT), "--quiet",
            "--data-dir", str(tmp_path / "data"), "--json", str(out), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    for r in results:
        t = r["tally"]
        assert r["ok"] and r["problems"] == [], r["problems"]
        assert t["sent"] > 0 and t["acked"] == t["sent"]
        assert t["delivered"] == t["expected"] > 0
        assert t["dups"] == t["misroutes"] == t["errors"] == 0
    return results


@pytest.mark.slow
def test_cluster_of_two_nodes_runs_clean_across_nodes(tmp_path: Path) -> None:
    [r] = _bench(tmp_path, "--nodes", "2", "--placement", "cross")
    assert (r["target"], r["nodes"], r["placement"], r["store"]) == (
        "chatd/n2", 2, "cross", "postgres")
    assert r["conns_per_slot"] == [4, 4]  # every pair split over both nodes
    # chatd's CPU over both nodes, and the engines' beside it
    assert r["server_cpu_us_per_unit"] > 0
    assert r["nats_cpu_s"] > 0 and r["postgres_cpu_s"] > 0


@pytest.mark.slow
def test_postgres_store_runs_clean(tmp_path: Path) -> None:
    [r] = _bench(tmp_path, "--store", "postgres")
    assert (r["target"], r["store"]) == ("chatd/postgres", "postgres")
    assert r["postgres_cpu_s"] > 0 and "nats_cpu_s" not in r


def _placed(placement: str, scenario: str, n: int, groups: int = 0) -> list[int]:
    """The slot each user gets on a 2-node cluster, by ``placement_urls``."""
    slots = ["ws://a/chat", "ws://b/chat"]
    target = Target("chatd/n2", slots[0], False, shard_urls=slots, round_robin=True)
    plan = Plan(uids=list(range(n)), gids=list(range(groups)), group_limit=n if groups else 0)
    urls = placement_urls(Options(scenario, users=n, placement=placement), n, target, plan)
    assert urls is not None
    return [slots.index(u) for u in urls]


def test_placement_puts_pairs_and_groups_where_asked() -> None:
    cross = _placed("cross", "private", 8)
    assert all(cross[s] != cross[r] for s, r in pairs(8))
    same = _placed("same", "private", 8)
    assert all(same[s] == same[r] for s, r in pairs(8)) and set(same) == {0, 1}
    # two groups on two nodes: each group's members over both (by user index
    # alone, group 0 = users 0, 2, 4 ... would all sit on node 0)
    for placement in ("cross", "kernel"):
        where = _placed(placement, "group", 12, groups=2)
        for g in range(2):
            assert {where[i] for i in range(g, 12, 2)} == {0, 1}, placement
    where = _placed("same", "group", 12, groups=2)
    assert [{where[i] for i in range(g, 12, 2)} for g in range(2)] == [{0}, {1}]


@pytest.mark.slow
def test_report_reads_what_a_run_wrote(tmp_path: Path) -> None:
    # two rounds, --procs left to its default (with --shards 1: the CPUs this
    # process may use less the server's one, at most the 4 pairs)
    runs = _bench(tmp_path, "--shards", "1", "--rounds", "2")
    assert [r["round"] for r in runs] == [1, 2] and {r["rounds"] for r in runs} == {2}
    usable = len(os.sched_getaffinity(0))
    assert {r["procs"] for r in runs} == {min(max(1, usable - 1), 4)}
    for r in runs:
        # what the report needs: the generator's own CPU and its verdict, the shape
        assert r["client_util"] > 0 and r["client_util_max"] > 0
        assert isinstance(r["client_bound"], bool)
        assert (r["rate"], r["window"], r["users"], r["shards"]) == (0.0, 4, 8, 1)
    done = subprocess.run([sys.executable, "-m", "chatd_bench.cli", "report",
                           str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, timeout=60 * UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("== private, window 4, 8 users  (unit: message")
    assert lines[1].split()[:3] == ["target", "runs", "procs"] and "gen %" in lines[1]
    row = lines[3].split()
    assert row[:2] == ["chatd", "2"]  # one row, both rounds
    assert lines[4].split()[0] == "min–max"
    # a generator-limited round is warned about by the report too
    bound = sum(r["client_bound"] for r in runs)
    assert done.stdout.count("!! GENERATOR WAS THE LIMIT") == bound
    assert "NOT CLEAN" not in done.stdout


def test_store_floor_stores_every_row_it_times(tmp_path: Path) -> None:
    """``chatd_bench.stores --floor``: the store and SQLite alone, each row counted
    (the floor asserts its count itself; a short count fails the run)."""
    out = subprocess.run(
        [sys.executable, "-m", "chatd_bench.stores", "--batch", "7,50", "--n", "350",
         "--users", "20", "--floor"],
        capture_output=True, text=True, timeout=120 * UNIT, cwd=tmp_path, check=True,
    ).stdout
    # one floor line per batch size, each with its two figures (their values
    # are the bench's to report, not this test's to judge)
    floors = [line for line in out.splitlines() if "floor, sqlite3 alone" in line]
    assert len(floors) == 2, out
    for line in floors:
        figures = [x.split()[0] for x in line.split(":")[1:]]
        assert len(figures) == 2 and all(f.replace(".", "", 1).isdigit() for f in figures), line
