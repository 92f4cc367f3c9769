"""The JavaScript client library (``src/chatd/web/chatd.js``) under node's own
test runner: its unit tests (``tests/js/chatd_unit.test.mjs``), and the same
library against a real ``chatd serve`` (``tests/js/chatd_live.test.mjs``,
with node's WebSocket).

node (20 or later) must be installed: without it these tests fail, they are
not skipped.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import UNIT, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = ROOT / "tests" / "js"


MIN_NODE_MAJOR = 20  # node's WebSocket (--experimental-websocket) and its mock timers


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the JavaScript client's tests need node >= 20")
    version = subprocess.run([node, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    if major is None or int(major[1]) < MIN_NODE_MAJOR:
        pytest.fail(f"node {version} is too old: the JavaScript client's tests need node >= 20")
    return node


async def _node_test(script: Path, env: dict[str, str], timeout: float) -> None:
    """Run ``node --test script``; fail with its whole report unless every test passed."""
    proc = await asyncio.create_subprocess_exec(
        _node(), "--experimental-websocket", "--test", "--test-force-exit",
        "--test-reporter=tap", str(script),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CHATD_TEST_UNIT": str(UNIT), **env})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout * UNIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    report = out.decode(errors="replace")
    assert proc.returncode == 0, f"node --test {script.name} failed:\n{report}"
    passed = re.search(r"^# pass (\d+)$", report, re.M)
    assert "\n# fail 0\n" in report and passed and int(passed[1]) > 0, report


async def test_js_library_unit() -> None:
    await _node_test(JS_TESTS / "chatd_unit.test.mjs", {}, 60)


@pytest.mark.slow
async def test_js_library_against_a_real_server(tmp_path: Path,
                                                server_procs: list[ServerProcess]) -> None:
    server = ServerProcess(tmp_path / "data")
    server_procs.append(server)
    port = await server.started()
    await _node_test(JS_TESTS / "chatd_live.test.mjs", {
        "CHATD_API": f"http://127.0.0.1:{server.api_port}",
        "CHATD_CHAT_PORT": str(port),
    }, 60)
