"""Fixtures and helpers for the web client's tests in a real browser.

Playwright drives Debian's chromium (``/usr/bin/chromium``, headless; never a
browser that ``playwright install`` downloads) against a real ``chatd serve``
child process (``ServerProcess``), so the page talks to a real server over
real sockets. Without chromium the tests fail with the reason: CI installs
it (``.ci/run``).

Import the fixtures into a test module with
``from browser_helpers import browser, chatd  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import UNIT, ServerProcess
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

CHROMIUM = Path(os.environ.get("CHATD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
#: screenshots land here (ignored by git); CI may keep the folder as an artifact
ARTIFACTS = Path(os.environ.get("CHATD_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
WAIT_MS = 10_000 * UNIT
PHONE = {"viewport": {"width": 390, "height": 780}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 2}

#: console errors a page may log while the server is away (a restart test)
OFFLINE_NOISE = re.compile(r"WebSocket connection to .* failed|net::ERR_CONNECTION_REFUSED")


class Chatd:
    """A ``chatd serve`` child process whose log is read all along (so that its
    pipe never fills), and that can be stopped and started again on the same
    data folder and ports."""

    def __init__(self, data_dir: Path, procs: list[ServerProcess]) -> None:
        self.data_dir = data_dir
        self._procs = procs
        self.proc: ServerProcess | None = None
        self.chat_port = 0
        self.api_port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def start(self, chat_port: int = 0, api_port: int = 0) -> None:
        proc = ServerProcess(self.data_dir, "--chat-port", str(chat_port),
                             "--api-port", str(api_port))
        self._procs.append(proc)
        self.chat_port = await proc.started()
        self.api_port = proc.api_port
        self.proc = proc
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()

    @staticmethod
    def _drain(proc: ServerProcess) -> None:
        assert proc.proc.stdout is not None
        try:
            for line in proc.proc.stdout:
                proc.lines.append(line)
        except ValueError:
            pass  # the pipe was closed at teardown

    async def stop(self) -> int:
        """SIGTERM, and the exit status once the node has drained."""
        assert self.proc is not None
        self.proc.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        rc = await asyncio.wait_for(loop.run_in_executor(None, self.proc.proc.wait), 20 * UNIT)
        return rc


@pytest.fixture
async def chatd(tmp_path: Path, server_procs: list[ServerProcess]) -> Chatd:
    node = Chatd(tmp_path / "data", server_procs)
    await node.start()
    return node


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
                    "(apt-get install -y chromium; .ci/run installs it)")
    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     timeout=60_000 * UNIT)
        yield b
        await b.close()


class ChatPage:
    """One user's tab of the web client, driven through its UI."""

    def __init__(self, page: Page, base: str, name: str) -> None:
        self.page = page
        self.base = base
        self.name = name
        self.uid = 0
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)

    def real_errors(self, offline_ok: bool = False) -> list[str]:
        """Errors the page logged (a CSP violation is one), less the expected ones."""
        return [e for e in self.errors if not (offline_ok and OFFLINE_NOISE.search(e))]

    @classmethod
    async def open(cls, browser: Browser, base: str, name: str,
                   **context: Any) -> ChatPage:
        ctx: BrowserContext = await browser.new_context(**context)
        ctx.set_default_timeout(WAIT_MS)
        page = await ctx.new_page()
        chat = cls(page, base, name)
        await page.goto(base + "/")
        return chat

    async def _signed_in(self) -> int:
        await expect(self.page.locator("#conn")).to_have_attribute("data-state", "open")
        text = await self.page.locator("#me").inner_text()
        m = re.search(r"#(\d+)$", text)
        assert m, text
        self.uid = int(m.group(1))
        return self.uid

    async def register(self, mobile: str, passwd: str = "secret1") -> int:
        p = self.page
        await p.click("#tab-register")
        await p.fill("#mobile", mobile)
        await p.fill("#passwd", passwd)
        await p.fill("#nickname", self.name)
        await p.click("#auth-submit")
        return await self._signed_in()

    async def login(self, mobile: str, passwd: str = "secret1") -> int:
        p = self.page
        await p.fill("#mobile", mobile)
        await p.fill("#passwd", passwd)
        await p.click("#auth-submit")
        return await self._signed_in()

    async def side(self, panel: str) -> None:
        """Show a side panel (on a phone: leave the conversation first)."""
        back = self.page.locator("#back")
        if await back.is_visible():
            await back.click()
        await self.page.click(f".side .tab[data-panel={panel}]")

    async def add_friend(self, uid: int) -> None:
        await self.side("friends")
        await self.page.fill("#find-id", str(uid))
        await self.page.click("#find-form button")
        await expect(self.page.locator("#found-name")).to_contain_text(f"#{uid}")
        await self.page.click("#add-friend")
        await expect(self.page.locator(f"#friend-list li[data-friend='{uid}']")).to_be_visible()

    async def open_friend(self, uid: int) -> None:
        await self.side("friends")
        await self.page.click(f"#friend-list li[data-friend='{uid}']")

    async def open_conv(self, key: str) -> None:
        await self.side("chats")
        await self.page.click(f"#conv-list li[data-key='{key}']")

    async def create_group(self, name: str) -> int:
        await self.side("groups")
        await self.page.fill("#group-name", name)
        await self.page.click("#create-group-form button")
        item = self.page.locator("#group-list li", has_text=name)
        await expect(item).to_be_visible()
        return int(await item.get_attribute("data-gid") or 0)

    async def join_group(self, gid: int) -> None:
        await self.side("groups")
        await self.page.fill("#join-id", str(gid))
        await self.page.click("#join-group-form button")
        await expect(self.page.locator(f"#group-list li[data-gid='{gid}']")).to_be_visible()

    async def open_group(self, gid: int) -> None:
        await self.side("groups")
        await self.page.click(f"#group-list li[data-gid='{gid}']")

    async def send(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    def bodies(self) -> Any:
        """Every message's body in the open conversation, in the order shown."""
        return self.page.locator("#msg-list .msg .text, #msg-list .msg .emoji, "
                                 "#msg-list .msg .thumb")

    async def expect_texts(self, texts: list[str]) -> None:
        """Exactly these messages, in this order, none pending."""
        await expect(self.page.locator("#msg-list .msg .text")).to_have_text(texts)
        await expect(self.page.locator("#msg-list .msg.pending")).to_have_count(0)

    async def shot(self, test: str, name: str) -> Path:
        folder = ARTIFACTS / test
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def close(self) -> None:
        await self.page.context.close()
