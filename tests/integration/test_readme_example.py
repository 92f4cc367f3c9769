"""The README's Python SDK example, run as it is written against a real
``chatd serve``, so that it cannot rot: the code block is taken from
README.md, only its API address is pointed at the test's node. User 1 talks
to it ("hi", then "bye"), and its output must be exactly what it promises.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from conftest import UNIT, ServerProcess

from chatd.client import ChatClient

README = Path(__file__).resolve().parents[2] / "README.md"
#: the address the example is written for
EXAMPLE_API = "http://127.0.0.1:8081"


def readme_example() -> str:
    """The first ``python`` code block of the README's "Python SDK" section."""
    text = README.read_text()
    section = re.search(r"^## Python SDK\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Python SDK' section"
    block = re.search(r"^```python\n(.*?)^```$", section[1], re.M | re.S)
    assert block, "the README's Python SDK section has no python code block"
    return block[1]


@pytest.mark.slow
async def test_the_readme_python_sdk_example_runs(tmp_path: Path,
                                                   server_procs: list[ServerProcess]) -> None:
    code = readme_example()
    assert code.count(EXAMPLE_API) == 1, f"the example no longer calls {EXAMPLE_API}"
    # the example logs in as 13800000002 and writes to user 1: a fresh node's
    # first two users
    logins = dict(re.findall(r'login\("(\d+)", "([^"]+)"\)', code))
    assert list(logins) == ["13800000002"], "the example's login changed"

    server = ServerProcess(tmp_path / "data")
    server_procs.append(server)
    await server.started()
    base = f"http://127.0.0.1:{server.api_port}"
    script = tmp_path / "example.py"
    script.write_text(code.replace(EXAMPLE_API, base))

    alice = ChatClient(base)
    proc: asyncio.subprocess.Process | None = None
    try:
        a = await alice.register("13800000001", "secret1", nickname="alice")
        async with ChatClient(base) as bob:
            b = await bob.register("13800000002", logins["13800000002"], nickname="bob")
        assert (a.id, b.id) == (1, 2), "a fresh node numbers its users from 1"
        await asyncio.wait_for(alice.connect(), 10 * UNIT)

        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        # the example says hello first: then it is connected and reading
        hello = await asyncio.wait_for(alice.recv(), 20 * UNIT)
        assert (hello.userid, hello.dstid, hello.content) == (2, 1, "hi alice")
        hi = await asyncio.wait_for(alice.send_text(2, "hi"), 10 * UNIT)
        bye = await asyncio.wait_for(alice.send_text(2, "bye"), 10 * UNIT)
        assert hello.id < hi.id < bye.id
        out, err = await asyncio.wait_for(proc.communicate(), 20 * UNIT)
        assert proc.returncode == 0, err.decode()
        assert out.decode() == f"sent {hello.id}\n1 hi\n1 bye\n", err.decode()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await alice.close()
