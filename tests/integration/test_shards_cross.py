"""``chatd serve --shards 2`` with users placed on known shards: private and
group messages cross between shard processes exactly once and in id order,
and a group join through the HTTP API is ordered with the messages that
follow it (the member gets them live, and a resume from before the join
returns exactly them).

Placement is deterministic: with ``shard_base_port`` set, shard *i* also
listens alone on base + *i*; each test connects there and checks with the
admin socket's ``online`` which shard holds each user.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import UNIT, Client, ServerProcess, close_clients, connect, free_port_range

#: messages per stream (a sender's private messages to one user, its group messages)
N = 100
#: join / send / resume / leave rounds of the join race
ROUNDS = 20
#: the frames that carry a message id: an ack, a private copy, a group copy
ID_FRAMES = (1, 10, 11)

pytestmark = pytest.mark.slow


@dataclass
class User:
    uid: int
    token: str


class Served:
    """A ``chatd serve --shards N`` process with one port per shard, and an HTTP
    client for its API."""

    def __init__(self, server: ServerProcess, base: int, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.base = base
        self.http = http
        self.clients: list[Client] = []
        self._mobiles = 0

    async def call(self, path: str, token: str | None = None, **fields: Any) -> Any:
        """The ``data`` of an API call that must succeed."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"http://127.0.0.1:{self.server.api_port}{path}"
        async with self.http.post(url, data=fields, headers=headers) as resp:
            body = await resp.json()
            assert (resp.status, body["code"]) == (200, 0), (path, body)
            return body["data"]

    async def register(self) -> User:
        self._mobiles += 1
        data = await self.call(
            "/user/register", mobile=f"1370000{self._mobiles:04d}", passwd="secret1"
        )
        return User(int(data["id"]), str(data["token"]))

    async def live(self, user: User, shard: int, last: int = 0) -> tuple[Client, list[Any]]:
        """A connection of ``user`` to shard ``shard`` alone, resumed from ``last``,
        once it is live (its replay answered with cmd 4); the replayed frames."""
        client = await connect(
            f"ws://127.0.0.1:{self.base + shard}/chat?id={user.uid}&token={user.token}&last={last}"
        )
        self.clients.append(client)
        replayed: list[Any] = []

        async def go() -> None:
            while (frame := await client.frames.get()).get("cmd") != 4:
                replayed.append(frame)

        await asyncio.wait_for(go(), 10 * UNIT)
        return client, replayed

    async def placed(self, user: User, shard: int) -> None:
        """The admin socket says ``user``'s one connection is on ``shard``."""
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(None, self.server.admin, "online", str(user.uid))
        assert [r["shard"] for r in rows] == [shard], rows


@pytest.fixture
async def served(tmp_path: Path, server_procs: list[ServerProcess]) -> Any:
    base = free_port_range(2)
    server = ServerProcess(
        tmp_path / "data",
        "--shards",
        "2",
        env={"CHATD_RATE_LIMIT": "false", "CHATD_SHARD_BASE_PORT": str(base)},
    )
    server_procs.append(server)
    await server.started()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20 * UNIT)) as http:
        served = Served(server, base, http)
        yield served
        # what a failed test left open
        await close_clients(*(c for c in served.clients if not c.closed.is_set()))


async def take(client: Client, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``n`` frames of ``client``; each must carry a message id (an ack
    or a copy): an error frame or any other frame fails the test."""
    frames: list[dict[str, Any]] = []

    async def go() -> None:
        while len(frames) < n:
            frame = await client.frames.get()
            assert frame.get("cmd") in ID_FRAMES, f"unexpected frame {frame}"
            frames.append(frame)

    try:
        await asyncio.wait_for(go(), timeout * UNIT)
    except TimeoutError:
        raise AssertionError(f"{len(frames)} of {n} frames arrived") from None
    return frames


def ascending(frames: list[dict[str, Any]]) -> None:
    ids = [f["id"] for f in frames]
    assert all(a < b for a, b in zip(ids, ids[1:], strict=False)), f"ids out of order: {ids}"


def acks(frames: list[dict[str, Any]]) -> dict[str, int]:
    """cid -> id of the acks among ``frames`` (each cid acked once)."""
    got = [(f["cid"], f["id"]) for f in frames if f["cmd"] == 1]
    assert len(got) == len({c for c, _ in got}), "a message acked twice"
    return dict(got)


def copies(frames: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """content -> (cmd, sender, id) of the copies among ``frames`` (no duplicates)."""
    got = [(f["content"], (f["cmd"], f["userid"], f["id"])) for f in frames if f["cmd"] != 1]
    assert len(got) == len({c for c, _ in got}), "a message delivered twice"
    return dict(got)


async def test_private_and_group_messages_between_shards_arrive_once_in_order(
    served: Served,
) -> None:
    """alice on shard 0; bob and carol on shard 1. alice writes to bob, to carol
    and to the group; bob writes to alice and to the group (its copies go to
    both shards). Every connection gets exactly its messages, in id order."""
    a, b, c = [await served.register() for _ in range(3)]
    gid = (await served.call("/contact/createcommunity", a.token, name="cross"))["id"]
    await served.call("/contact/joincommunity", b.token, dstid=gid)
    alice, _ = await served.live(a, 0)
    bob, _ = await served.live(b, 1)
    carol, _ = await served.live(c, 1)
    for user, shard in ((a, 0), (b, 1), (c, 1)):
        await served.placed(user, shard)
    # carol joins with her connection open, on the other shard from the owner's
    await served.call("/contact/joincommunity", c.token, dstid=gid)

    for i in range(N):
        for sender, cmd, dst, cid in (
            (alice, 10, b.uid, f"ab{i}"),
            (alice, 10, c.uid, f"ac{i}"),
            (alice, 11, gid, f"ag{i}"),
            (bob, 10, a.uid, f"ba{i}"),
            (bob, 11, gid, f"bg{i}"),
        ):
            sender.send(cmd=cmd, dstid=dst, media=1, content=cid, cid=cid)
    got_a, got_b, got_c = await asyncio.gather(
        take(alice, 5 * N), take(bob, 4 * N), take(carol, 3 * N)
    )
    for client, frames in ((alice, got_a), (bob, got_b), (carol, got_c)):
        ascending(frames)
        await client.assert_quiet()  # nothing more (a late duplicate) was on its way

    sent = {**acks(got_a), **acks(got_b)}
    assert sent.keys() == {f"{p}{i}" for p in ("ab", "ac", "ag", "ba", "bg") for i in range(N)}

    def expect(*streams: tuple[str, int, int]) -> dict[str, tuple[int, int, int]]:
        return {
            f"{p}{i}": (cmd, sender, sent[f"{p}{i}"])
            for p, cmd, sender in streams
            for i in range(N)
        }

    assert copies(got_a) == expect(("ba", 10, b.uid), ("bg", 11, b.uid))
    assert copies(got_b) == expect(("ab", 10, a.uid), ("ag", 11, a.uid))
    assert copies(got_c) == expect(("ac", 10, a.uid), ("ag", 11, a.uid), ("bg", 11, b.uid))
    await close_clients(alice, bob, carol)


async def ack_of(client: Client, cid: str) -> int:
    """The id of the ack of ``cid``, the next frame ``client`` gets."""
    [frame] = await take(client, 1)
    assert (frame["cmd"], frame["cid"]) == (1, cid), frame
    return int(frame["id"])


async def test_a_join_through_the_api_is_ordered_with_the_messages_sent_right_after(
    served: Served,
) -> None:
    """The member (shard 1) joins through the API; as soon as the reply is in,
    the group's owner sends to the group and another user sends the member a
    private message (both on shard 0). The member's open connection gets both,
    in id order; a fresh connection resuming from the highest id it held
    before the join gets exactly those two. Then it leaves, and a group
    message after the leave reaches it neither live nor by a later resume.
    Twenty rounds, to give the join and the sends a chance to race: in the
    first half the member is the group's only one on shard 1 (the join must
    send the group there), in the second a bystander member is there too (the
    group's messages reach shard 1 anyway: the join must come first)."""
    s, p, m, o = [await served.register() for _ in range(4)]
    gid = (await served.call("/contact/createcommunity", s.token, name="race"))["id"]
    owner, _ = await served.live(s, 0)
    writer, _ = await served.live(p, 0)
    member, _ = await served.live(m, 1)
    bystander, _ = await served.live(o, 1)
    for user, shard in ((s, 0), (p, 0), (m, 1), (o, 1)):
        await served.placed(user, shard)

    held: list[int] = []  # every id the member's open connection got
    sent: dict[str, int] = {}  # the owner's group messages: cid -> id
    seen: list[dict[str, Any]] = []  # what the bystander got
    for r in range(ROUNDS):
        if r == ROUNDS // 2:
            await served.call("/contact/joincommunity", o.token, dstid=gid)
        before = max(held, default=0)
        await served.call("/contact/joincommunity", m.token, dstid=gid)
        owner.send(cmd=11, dstid=gid, media=1, content=f"g{r}", cid=f"g{r}")
        writer.send(cmd=10, dstid=m.uid, media=1, content=f"p{r}", cid=f"p{r}")
        sent[f"g{r}"] = await ack_of(owner, f"g{r}")
        want = {
            f"g{r}": (11, s.uid, sent[f"g{r}"]),
            f"p{r}": (10, p.uid, await ack_of(writer, f"p{r}")),
        }

        live = await take(member, 2)
        ascending(live)
        assert copies(live) == want, f"round {r}"
        held += [f["id"] for f in live]

        # a second device resumes from before the join (on either shard)
        device, replayed = await served.live(m, r % 2, last=before)
        assert all(f["cmd"] in ID_FRAMES for f in replayed), replayed
        ascending(replayed)
        assert copies(replayed) == want, f"round {r}"
        await close_clients(device)

        await served.call("/contact/quitcommunity", m.token, dstid=gid)
        owner.send(cmd=11, dstid=gid, media=1, content=f"x{r}", cid=f"x{r}")
        sent[f"x{r}"] = await ack_of(owner, f"x{r}")
        # not for the member: the next round's take() and resume would show it
        if r >= ROUNDS // 2:
            seen += await take(bystander, 2)

    ascending([{"id": i} for i in held])
    assert len(held) == 2 * ROUNDS
    ascending(seen)
    assert copies(seen) == {
        cid: (11, s.uid, mid) for cid, mid in sent.items() if int(cid[1:]) >= ROUNDS // 2
    }
    for client in (owner, writer, member, bystander):
        await client.assert_quiet()
    await close_clients(owner, writer, member, bystander)
