"""Every bench scenario end to end against a real chatd, tiny sizes: nothing
may be lost, duplicated or misrouted. No timing is asserted (STYLE: benchmarks
are not tests); this checks that the harness and the server agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
