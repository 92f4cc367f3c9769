"""The Python SDK (``chatd.client``) against a real node: typed HTTP calls,
the send queue, acks and error frames, resume with ``last=``, dedupe,
retries by cid, final closes, a server restart; and, against a scripted
websocket peer (an aiohttp server in the test, not chatd), the heartbeat,
the dead-connection watch and the retry of 503 answers.

Every check counts messages: a test collects up to a marker message that is
sent last, so a lost or a doubled message fails it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import api_helpers
import pytest
from aiohttp import web
from api_helpers import Api, image_bytes
from conftest import UNIT, Node, ServerProcess
from net_helpers import free_port

from chatd.client import (
    ChatClient,
    ClosedError,
    HttpError,
    Message,
    Options,
    SendError,
    State,
    backoff_delay,
    new_cid,
)

# the API fixtures (api_helpers)
api_factory = api_helpers.api_factory

FAST = Options(backoff_min_s=0.05 * UNIT, backoff_max_s=0.5 * UNIT)


@pytest.fixture
async def api(api_factory: Callable[..., Awaitable[Api]], node: Node) -> Api:
    # /config.json tells the SDK the in-process shard's real port
    return await api_factory(chat_port=node.port)


@pytest.fixture
async def clients() -> AsyncIterator[list[ChatClient]]:
    made: list[ChatClient] = []
    yield made
    for c in made:
        await c.close()


def sdk(api: Api, made: list[ChatClient], **kwargs: Any) -> ChatClient:
    c = ChatClient(api.base, options=kwargs.pop("options", FAST), **kwargs)
    made.append(c)
    return c


async def until(client: ChatClient, content: str, timeout: float = 10.0) -> list[Message]:
    """Every message ``client`` receives up to and including one with ``content``."""
    got: list[Message] = []

    async def go() -> None:
        while True:
            msg = await client.recv()
            got.append(msg)
            if msg.content == content:
                return

    await asyncio.wait_for(go(), timeout * UNIT)
    return got


def test_a_new_cid_starts_with_the_time_in_ms() -> None:
    """Time-ordered cids are what the server's cid index stores cheaply."""
    start = time.time_ns() // 1_000_000
    cids = [new_cid() for _ in range(200)]
    end = time.time_ns() // 1_000_000
    assert len(set(cids)) == len(cids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", cid) for cid in cids)
    stamps = [int(cid[:12], 16) for cid in cids]
    assert start <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= end


async def test_typed_http_calls(api: Api, clients: list[ChatClient]) -> None:
    alice = sdk(api, clients)
    me = await alice.register("13700000001", "secret1", nickname="alice", sex="w")
    assert (me.nickname, me.sex, me.mobile) == ("alice", "W", "13700000001")
    assert alice.token == me.token and alice.uid == me.id
    bob = sdk(api, clients)
    with pytest.raises(HttpError) as refused:
        await bob.register("13700000001", "secret1")
    assert refused.value.status == 409
    with pytest.raises(HttpError) as bad:
        await bob.register("13700000002", "short")
    assert bad.value.status == 400 and "passwd" in bad.value.msg
    with pytest.raises(HttpError) as wrong:
        await bob.login("13700000001", "not it!")
    assert wrong.value.status == 401
    b = await bob.register("13700000002", "secret1", nickname="bob")
    assert (await bob.login("13700000002", "secret1")).id == b.id

    found = await alice.find(b.id)
    assert (found.id, found.nickname) == (b.id, "bob")
    assert not hasattr(found, "mobile")
    with pytest.raises(HttpError) as missing:
        await alice.find(999_999)
    assert missing.value.status == 404
    assert (await alice.add_friend(b.id)).added is True
    assert (await alice.add_friend(b.id)).added is False
    assert [u.id for u in await bob.friends()] == [me.id]

    group = await alice.create_group("hikers", memo="we walk")
    assert (group.name, group.ownerid, group.memo) == ("hikers", me.id, "we walk")
    assert (await bob.join_group(group.id)).joined is True
    assert [u.nickname for u in await alice.members(group.id)] == ["alice", "bob"]
    assert [g.id for g in await bob.groups()] == [group.id]
    assert (await bob.quit_group(group.id)).id == group.id
    assert await bob.groups() == []

    png = image_bytes("PNG", (400, 200))
    up = await alice.upload(png, "x.png", "image/png")
    assert (up.media, up.width, up.height, up.size) == (4, 400, 200, len(png))
    assert up.url.endswith(".png") and up.pic.endswith(".preview.jpg") and up.data == up.url

    info = await alice.refresh()
    assert alice.token == info.token and info.id == me.id and info.expires_in > 0
    cfg = await alice.config()
    assert cfg.chat_port == api.node.port and cfg.ws_path == "/chat"
    page = await alice.history(dstid=b.id)
    assert (page.rows, page.total, page.more) == ([], 0, False)


async def test_queued_messages_go_out_in_order_and_arrive_once(api: Api,
                                                               clients: list[ChatClient]) -> None:
    alice, bob = sdk(api, clients), sdk(api, clients)
    a = await alice.register("13700000011", "secret1")
    b = await bob.register("13700000012", "secret1")
    await bob.connect()
    assert bob.state is State.OPEN
    # written before alice connects: they wait, in order
    futures = [alice.submit(Message(cmd=10, dstid=b.id, media=1, content=f"m{i}"))
               for i in range(20)]
    assert alice.pending == 20 and alice.state is State.IDLE
    await alice.connect()
    acks = await asyncio.wait_for(asyncio.gather(*futures), 10 * UNIT)
    ids = [ack.id for ack in acks]
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert all(ack.cmd == 1 and ack.ts > 0 for ack in acks)
    assert alice.pending == 0 and alice.last == ids[-1]
    got = await until(bob, "m19")
    assert [(m.id, m.content, m.userid) for m in got] == [
        (ids[i], f"m{i}", a.id) for i in range(20)]
    assert bob.last == ids[-1]
    assert (alice.connections, bob.connections) == (1, 1)
    # a group, both ways
    group = await alice.create_group("g")
    await bob.join_group(group.id)
    ack = await alice.send_text(group.id, "to the group", group=True)
    [msg] = await until(bob, "to the group")
    assert (msg.id, msg.cmd, msg.dstid) == (ack.id, 11, group.id)


async def test_messagepack_frames(api: Api, clients: list[ChatClient]) -> None:
    binary = Options(binary=True, backoff_min_s=0.05 * UNIT, backoff_max_s=0.5 * UNIT)
    alice, bob = sdk(api, clients, options=binary), sdk(api, clients)
    await alice.register("13700000015", "secret1")
    b = await bob.register("13700000016", "secret1")
    await alice.connect()
    await bob.connect()
    ack = await alice.send_text(b.id, "packed ✓")
    [msg] = await until(bob, "packed ✓")
    assert msg.id == ack.id and msg.userid == alice.uid
    await bob.send_text(alice.uid, "back")
    [back] = await until(alice, "back")
    assert back.dstid == alice.uid


async def test_error_frames_reject_the_send(api: Api, clients: list[ChatClient]) -> None:
    alice = sdk(api, clients)
    await alice.register("13700000021", "secret1")
    await alice.connect()
    with pytest.raises(SendError) as nobody:
        await asyncio.wait_for(alice.send_text(999_999, "hello?"), 5 * UNIT)
    assert nobody.value.code == 404
    other = await api.node.group(await api.node.user())
    with pytest.raises(SendError) as stranger:
        await asyncio.wait_for(alice.send_text(other, "let me in", group=True), 5 * UNIT)
    assert stranger.value.code == 403
    with pytest.raises(SendError) as meaningless:
        await asyncio.wait_for(alice.send(Message(cmd=10, dstid=alice.uid, media=4)), 5 * UNIT)
    assert meaningless.value.code == 422
    assert alice.pending == 0 and alice.state is State.OPEN


async def test_resume_from_last_gets_exactly_what_was_missed(api: Api,
                                                            clients: list[ChatClient]) -> None:
    alice, bob = sdk(api, clients), sdk(api, clients)
    await alice.register("13700000031", "secret1")
    b = await bob.register("13700000032", "secret1")
    await alice.connect()
    await bob.connect()
    await alice.send_text(b.id, "seen")
    await until(bob, "seen")
    resume = bob.last
    await bob.close()
    missed = [(await alice.send_text(b.id, f"away {i}")).id for i in range(5)]
    # a new client from the saved point (e.g. a restarted program)
    again = sdk(api, clients, token=b.token, uid=b.id, last=resume)
    await again.connect()  # returns after the replay
    await alice.send_text(b.id, "live")
    got = await until(again, "live")
    assert [m.id for m in got[:-1]] == missed
    assert [m.content for m in got] == [f"away {i}" for i in range(5)] + ["live"]


async def test_a_retried_cid_is_stored_once(api: Api, clients: list[ChatClient]) -> None:
    alice, phone, bob = sdk(api, clients), sdk(api, clients), sdk(api, clients)
    a = await alice.register("13700000041", "secret1")
    b = await bob.register("13700000042", "secret1")
    phone.token, phone.uid = a.token, a.id
    for c in (alice, phone, bob):
        await c.connect()
    first = await alice.send_text(b.id, "once", cid="the-cid")
    again = await phone.send_text(b.id, "once", cid="the-cid")
    assert (again.id, again.ts) == (first.id, first.ts)
    await alice.send_text(b.id, "end")
    assert [m.content for m in await until(bob, "end")] == ["once", "end"]
    # the same cid while still pending is the same send
    f1 = alice.submit(Message(cmd=10, dstid=b.id, media=1, content="x", cid="c2"))
    assert alice.submit(Message(cmd=10, dstid=b.id, media=1, content="x", cid="c2")) is f1
    await f1


async def test_a_revoked_token_is_final(api: Api, clients: list[ChatClient]) -> None:
    alice = sdk(api, clients)
    await alice.register("13700000051", "secret1")
    await alice.connect()
    await alice.revoke()
    await alice.wait_state(State.CLOSED, 5 * UNIT)
    assert alice.fatal is not None and alice.fatal.code == 4501
    with pytest.raises(ClosedError):
        await alice.send_text(alice.uid, "x")
    with pytest.raises(ClosedError):
        await alice.recv()
    # a new client with the old token is refused at the handshake, for good
    stale = sdk(api, clients, token=alice.token, uid=alice.uid)
    with pytest.raises(ClosedError) as refused:
        await asyncio.wait_for(stale.connect(), 5 * UNIT)
    assert refused.value.code == 401


@pytest.mark.slow
async def test_messages_sent_while_the_server_restarts_arrive_once_in_order(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    chat_port, api_port = free_port(), free_port()
    server = ServerProcess(tmp_path / "data", "--chat-port", str(chat_port),
                           "--api-port", str(api_port))
    server_procs.append(server)
    await server.started()
    base = f"http://127.0.0.1:{api_port}"
    alice = ChatClient(base, options=FAST)
    bob = ChatClient(base, options=FAST)
    try:
        a = await alice.register("13700000061", "secret1")
        b = await bob.register("13700000062", "secret1")
        await alice.connect()
        await bob.connect()
        await alice.send_text(b.id, "before")
        assert [m.content for m in await until(bob, "before")] == ["before"]
        assert (alice.connections, bob.connections) == (1, 1)

        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
        await alice.wait_state(State.WAITING, 10 * UNIT)
        futures = [alice.submit(Message(cmd=10, dstid=b.id, media=1, content=f"q{i}"))
                   for i in range(10)]
        server = ServerProcess(tmp_path / "data", "--chat-port", str(chat_port),
                               "--api-port", str(api_port))
        server_procs.append(server)
        await server.started()
        acks = await asyncio.wait_for(asyncio.gather(*futures), 20 * UNIT)
        ids = [x.id for x in acks]
        assert ids == sorted(ids) and len(set(ids)) == 10
        got = await until(bob, "q9", 20)
        assert [(m.id, m.content) for m in got] == [(ids[i], f"q{i}") for i in range(10)]
        page = await bob.history(dstid=a.id)
        assert [m.content for m in page.rows] == ["before"] + [f"q{i}" for i in range(10)]
        assert alice.connections >= 2 and bob.connections >= 2  # they came back
    finally:
        await alice.close()
        await bob.close()


# --- against a scripted peer ------------------------------------------------------------------


class Peer:
    """A websocket server that records what the SDK sends and answers by a script."""

    def __init__(self) -> None:
        self.connections: list[dict[str, str]] = []
        self.frames: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self.answer: Callable[[int, dict[str, Any]], list[dict[str, Any]]] = lambda n, f: []
        self.port = 0

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.connections.append(dict(request.query))
        n = len(self.connections)
        await ws.send_str(json.dumps({"cmd": 4, "id": int(request.query.get("last", "0"))}))
        async for msg in ws:
            frame = json.loads(msg.data)
            self.frames.put_nowait((n, frame))
            for out in self.answer(n, frame):
                await ws.send_str(json.dumps(out))
        return ws

    async def next(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        return await asyncio.wait_for(self.frames.get(), timeout * UNIT)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    app = web.Application()
    app.router.add_get("/chat", p.handle)
    runner = web.AppRunner(app, shutdown_timeout=UNIT)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    p.port = runner.addresses[0][1]
    yield p
    await runner.cleanup()


def peer_client(peer: Peer, made: list[ChatClient], **options: Any) -> ChatClient:
    opts = Options(**{"backoff_min_s": 0.05 * UNIT, "backoff_max_s": 0.2 * UNIT, **options})
    c = ChatClient("http://127.0.0.1:1", token="7.1.0.sig", uid=7, options=opts,
                   ws_url=f"ws://127.0.0.1:{peer.port}/chat")
    made.append(c)
    return c


async def test_heartbeat_after_silence(peer: Peer, clients: list[ChatClient]) -> None:
    c = peer_client(peer, clients, heartbeat_s=0.3 * UNIT)
    await c.connect()
    assert peer.connections == [{"id": "7", "token": "7.1.0.sig", "last": "0"}]
    assert await peer.next() == (1, {"cmd": 0})
    assert await peer.next() == (1, {"cmd": 0})
    assert len(peer.connections) == 1


async def test_a_silent_connection_is_replaced_and_the_message_sent_again(
        peer: Peer, clients: list[ChatClient]) -> None:
    # the first connection swallows everything; the second acks
    peer.answer = lambda n, f: [{"cmd": 1, "id": 5, "cid": f["cid"]}] if n == 2 else []
    c = peer_client(peer, clients, ack_timeout_s=0.3 * UNIT)
    await c.connect()
    future = c.submit(Message(cmd=10, dstid=2, media=1, content="hi", cid="k"))
    first = await peer.next()
    second = await peer.next()
    assert (first[0], first[1]["cid"]) == (1, "k")
    assert (second[0], second[1]["cid"]) == (2, "k")
    assert (await asyncio.wait_for(future, 5 * UNIT)).id == 5
    assert c.last == 5
    assert [q["last"] for q in peer.connections] == ["0", "0"]


async def test_busy_answers_are_sent_again_with_the_same_cid(
        peer: Peer, clients: list[ChatClient]) -> None:
    tries: list[str] = []

    def answer(n: int, f: dict[str, Any]) -> list[dict[str, Any]]:
        tries.append(f["cid"])
        if len(tries) < 3:
            return [{"cmd": 5, "amount": 503, "memo": "busy", "cid": f["cid"]}]
        return [{"cmd": 1, "id": 9, "cid": f["cid"]}]

    peer.answer = answer
    c = peer_client(peer, clients)
    await c.connect()
    ack = await asyncio.wait_for(c.send_text(2, "hi", cid="b"), 5 * UNIT)
    assert ack.id == 9 and tries == ["b", "b", "b"]


async def test_duplicate_copies_are_dropped(peer: Peer, clients: list[ChatClient]) -> None:
    copy = {"cmd": 10, "id": 3, "userid": 2, "dstid": 7, "media": 1, "content": "x"}
    peer.answer = lambda n, f: [copy, copy, {**copy, "id": 4, "content": "end"}]
    c = peer_client(peer, clients)
    await c.connect()
    c.submit(Message(cmd=10, dstid=2, media=1, content="go", cid="g"))
    assert [m.id for m in await until(c, "end")] == [3, 4]


async def test_close_fails_what_is_pending_and_stops(peer: Peer,
                                                    clients: list[ChatClient]) -> None:
    c = peer_client(peer, clients)
    await c.connect()
    future = c.submit(Message(cmd=10, dstid=2, media=1, content="never acked", cid="n"))
    assert (await peer.next())[1]["cid"] == "n"
    await c.close()
    assert c.state is State.CLOSED
    with pytest.raises(ClosedError):
        await future
    assert [m.cid for m in c.pending_messages()] == ["n"]  # kept, to submit again later
    with pytest.raises(ClosedError):
        await c.connect()
    assert len(peer.connections) == 1


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    assert [backoff_delay(i, 0.5, 30, lambda: 0.0) for i in range(9)] == [
        0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert backoff_delay(3, 0.5, 30, lambda: 1.0) == 4.0
