"""Three chatd nodes on one PostgreSQL store and a 3-server NATS cluster:
messages between users on different nodes, devices of one user on several
nodes, routing changes through one node ordered with messages through
another, and the faults — a node, a NATS server, PostgreSQL — with every
acked message present once and every client's view equal to the store's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import Cluster, clean, open_cluster, run_devices, settle, stop
from conftest import UNIT
from fault_helpers import check_devices

pytestmark = pytest.mark.slow

#: messages each device sends in the traffic tests
PER_DEVICE = 60


@pytest.fixture
async def cluster(tmp_path: Path, pg_server: Any, pg_dsn: str) -> AsyncIterator[Cluster]:
    async with open_cluster(tmp_path, pg_server, pg_dsn) as c:
        yield c


async def test_private_and_group_messages_between_nodes_once_and_in_order(
    cluster: Cluster,
) -> None:
    a, b, c, d = await cluster.users(4)
    assert cluster.store is not None
    gid = await cluster.store.create_group("all", a)
    for uid in (b, c, d):
        await cluster.store.join_group(gid, uid)
    n0, n1, n2 = (cluster.start(f"n{i}", "--shards", "1") for i in range(3))
    await cluster.started(n0, n1, n2)
    # d has two devices, on two nodes; each of the others is on a node of its own
    devices = [
        cluster.device("a", a, n0), cluster.device("b", b, n1), cluster.device("c", c, n2),
        cluster.device("d0", d, n0), cluster.device("d2", d, n2),
    ]
    await run_devices(devices)
    rng = random.Random(7)
    users = [a, b, c, d]

    def targets(me: int):  # type: ignore[no-untyped-def]
        def pick() -> tuple[int, int]:
            if rng.random() < 0.3:
                return 11, gid
            return 10, rng.choice([u for u in users if u != me])
        return pick

    await asyncio.gather(*(dev.pump(targets(dev.uid), PER_DEVICE) for dev in devices))
    await settle(devices)
    counts = check_devices(devices, await cluster.snapshot())
    clean(counts)
    assert counts["sent"] == PER_DEVICE * len(devices)
    # the copies really crossed nodes: each node released units of the others
    for node in (n0, n1, n2):
        assert (await cluster.log_figures(node))["remote_units"] > 0
    # d's two devices each hold everything of d's, including what the other sent
    d0, d2 = devices[3], devices[4]
    assert d0.view == d2.view
    await stop(devices)


async def test_a_join_through_one_node_orders_a_group_message_through_another(
    cluster: Cluster,
) -> None:
    """M (on n1) joins through n0's API; at once O (on n2) sends to the group and
    P (on n0) sends M a private message: M gets both live, in id order, and a
    resume from what M held before the join returns exactly them. Then M
    leaves through n2's API, and a group message after the leave reaches M
    neither live nor by sync."""
    m, o, p = await cluster.users(3)
    assert cluster.store is not None
    gid = await cluster.store.create_group("g", o)
    n0, n1, n2 = (cluster.start(f"n{i}", "--shards", "1") for i in range(3))
    await cluster.started(n0, n1, n2)
    dm, do, dp = (cluster.device("m", m, n1), cluster.device("o", o, n2),
                  cluster.device("p", p, n0))
    await run_devices([dm, do, dp])
    for round_ in range(8):
        before = dm.top
        await cluster.call(n0, "/contact/joincommunity", m, dstid=gid)
        cid_g = do.send(gid, cmd=11, content=f"g{round_}")
        cid_p = dp.send(m, content=f"p{round_}")
        await do.all_acked()
        await dp.all_acked()
        want = sorted([do.acked[cid_g], dp.acked[cid_p]])
        await dm.until(lambda w=want: set(w) <= set(dm.copies), 10)
        live = sorted(i for i in dm.copies if i > before)
        assert live == want, (round_, live, want)
        # a fresh device of M resuming from before the join: exactly those two
        fresh = cluster.device(f"m{round_}", m, n2)
        fresh.top = before
        await run_devices([fresh])
        assert sorted(fresh.copies) == want, (round_, sorted(fresh.copies), want)
        await fresh.stop()
        await cluster.call(n2, "/contact/quitcommunity", m, dstid=gid)
        cid_after = do.send(gid, cmd=11, content=f"after{round_}")
        await do.all_acked()
        after = do.acked[cid_after]
        # a marker after it, to M: once it is here, the group message would be too
        cid_mark = dp.send(m, content=f"mark{round_}")
        await dp.all_acked()
        await dm.until(lambda i=dp.acked[cid_mark]: i in dm.copies, 10)
        assert after not in dm.copies
    await settle([dm, do, dp])
    snap = await cluster.snapshot()
    clean(check_devices([do, dp], snap))
    # M is no member now: the store no longer says it was owed the group
    # messages of its rounds, which it got; apart from those, exactly its view
    rounds = {do.acked[c] for c in do.acked if c.startswith("o-")} & set(dm.copies)
    assert len(rounds) == 8
    assert dm.view - rounds == snap.view(m) and not dm.dups and not dm.disorder
    await stop([dm, do, dp])


async def test_tokens_revocations_and_bans_reach_every_node(cluster: Cluster) -> None:
    """A token made for one node works on every node (one shared secret); a
    revocation through n0 closes the user's connection on n2 with 4501 and its
    old token is refused there; a ban through n1 closes it with 4502 everywhere."""
    from conftest import connect
    from picows import WSError

    u, v = await cluster.users(2)
    n0, n1, n2 = (cluster.start(f"n{i}", "--shards", "1") for i in range(3))
    await cluster.started(n0, n1, n2)
    tok = cluster.token(u)
    clients = [await connect(f"ws://127.0.0.1:{n.port}/chat?id={u}&token={tok}")
               for n in (n0, n1, n2)]
    await cluster.call(n0, "/user/revoke", u)
    codes = await asyncio.gather(*(c.wait_closed(10 * UNIT) for c in clients))
    assert codes == [4501, 4501, 4501]
    for node in (n0, n1, n2):
        with pytest.raises(WSError, match="401"):
            await connect(f"ws://127.0.0.1:{node.port}/chat?id={u}&token={tok}")
    # a token of the new version, from the store's version (what /user/login issues)
    assert cluster.store is not None
    version = await cluster.store.token_version(v)
    fresh = auth_token(cluster, v, version)
    vc = [await connect(f"ws://127.0.0.1:{n.port}/chat?id={v}&token={fresh}") for n in (n0, n2)]
    done = n1.admin("user", "ban", str(v))
    assert done["banned"] is True
    codes = await asyncio.gather(*(c.wait_closed(10 * UNIT) for c in vc))
    assert codes == [4502, 4502]
    for node in (n0, n1, n2):
        with pytest.raises(WSError, match="403"):
            await connect(f"ws://127.0.0.1:{node.port}/chat?id={v}&token={fresh}")


def auth_token(cluster: Cluster, uid: int, version: int) -> str:
    from chatd import auth

    return auth.issue_token(cluster.secret, uid, version, 3600)


async def _traffic_setup(cluster: Cluster, nodes: int = 3,  # type: ignore[no-untyped-def]
                         env_of: dict[int, dict[str, str]] | None = None):
    """Four users in a group, five devices spread over the nodes, each
    preferring another node first (and going to the next when it is gone)."""
    a, b, c, d = await cluster.users(4)
    assert cluster.store is not None
    gid = await cluster.store.create_group("all", a)
    for uid in (b, c, d):
        await cluster.store.join_group(gid, uid)
    ns = [cluster.start(f"n{i}", "--shards", "1", env=(env_of or {}).get(i))
          for i in range(nodes)]
    await cluster.started(*ns)
    order = [ns[i:] + ns[:i] for i in range(len(ns))]
    devices = [
        cluster.device("a", a, *order[0]), cluster.device("b", b, *order[1 % nodes]),
        cluster.device("c", c, *order[2 % nodes]), cluster.device("d0", d, *order[0]),
        cluster.device("d1", d, *order[1 % nodes]),
    ]
    await run_devices(devices)
    rng = random.Random(11)
    users = [a, b, c, d]

    def targets(me: int):  # type: ignore[no-untyped-def]
        def pick() -> tuple[int, int]:
            if rng.random() < 0.3:
                return 11, gid
            return 10, rng.choice([u for u in users if u != me])
        return pick

    def pump(count: int) -> asyncio.Future[list[None]]:
        return asyncio.gather(*(dev.pump(targets(dev.uid), count) for dev in devices))

    return ns, devices, pump


async def _acked(devices, n: int) -> None:  # type: ignore[no-untyped-def]
    """Wait until the devices hold ``n`` acks between them."""
    async def go() -> None:
        while sum(len(d.acked) for d in devices) < n:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(go(), 30 * UNIT)


async def test_a_node_killed_under_traffic_loses_nothing_acked(cluster: Cluster) -> None:
    (n0, n1, n2), devices, pump = await _traffic_setup(cluster)
    traffic = pump(150)
    await _acked(devices, 150)
    n0.kill_all()  # every process of the node at once, as a crash does
    await traffic
    await settle(devices)
    counts = check_devices(devices, await cluster.snapshot())
    print("kill -9 of a node:", counts)
    clean(counts)
    # the devices that were on n0 reconnected to another node and resumed
    assert all(d.connects >= 2 for d in devices if d.name in ("a", "d0"))
    await stop(devices)


async def test_a_nats_server_killed_under_traffic_fails_over(cluster: Cluster) -> None:
    (n0, n1, n2), devices, pump = await _traffic_setup(cluster)
    traffic = pump(150)
    await _acked(devices, 150)
    cluster.nats.servers[0].kill()
    cluster.nats.servers[1].kill()  # whatever server a node was on, most must move
    await traffic
    await settle(devices)
    counts = check_devices(devices, await cluster.snapshot())
    print("kill -9 of two NATS servers:", counts)
    clean(counts)
    await stop(devices)


async def test_postgres_restarted_under_traffic_answers_retry_and_loses_nothing(
    cluster: Cluster,
) -> None:
    import socket

    import aiohttp

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(cluster.folder / "notify.sock"))
    notify.setblocking(False)
    env = {"NOTIFY_SOCKET": str(cluster.folder / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    (n0, n1, n2), devices, pump = await _traffic_setup(cluster, env_of={1: env})
    traffic = pump(200)
    await _acked(devices, 100)
    acked_before = {(d.name, c): i for d in devices for c, i in d.acked.items()}
    cluster.pg.stop("immediate")  # a crash of the database, not a clean shutdown
    # the devices' messages in flight get 503 "retry", never an ack
    refused = sum(d.retryable for d in devices)

    async def refusals() -> None:
        while sum(d.retryable for d in devices) <= refused:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(refusals(), 30 * UNIT)
    # not ready: /healthz on the api port says so, and so does the log (STATUS)
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{n1.api_port}/healthz"
    ) as resp:
        assert resp.status == 503
    assert (await cluster.log_figures(n1))["store_ok"] is False
    # and the unit's STATUS line (systemd's notify socket)
    loop = asyncio.get_running_loop()

    async def status_says(words: str) -> None:
        while words not in (await loop.sock_recv(notify, 4096)).decode():
            pass
    await asyncio.wait_for(status_says("store unreachable: not ready"), 10 * UNIT)
    cluster.pg.start()
    await traffic
    await settle(devices)
    counts = check_devices(devices, await cluster.snapshot())
    print("PostgreSQL restarted:", counts)
    clean(counts)
    assert counts["retryable_errors"] > 0
    # what was acked before the crash is there with the same ids
    after = {(d.name, c): i for d in devices for c, i in d.acked.items()}
    assert all(after[k] == v for k, v in acked_before.items())
    assert (await cluster.log_figures(n1))["store_ok"] is True
    notify.close()
    await stop(devices)


async def test_a_node_joins_a_running_cluster_and_another_drains(cluster: Cluster) -> None:
    (n0, n1), devices, pump = await _traffic_setup(cluster, nodes=2)
    traffic = pump(150)
    await _acked(devices, 100)
    # a third node joins by starting with the same store and bus
    n2 = cluster.start("n2", "--shards", "1")
    await cluster.started(n2)
    for d in devices:  # n0's clients will go to n2 first
        d._url = cluster.url_of(d.uid, n0, n2, n1) if d.name in ("a", "d0") else d._url
    done = await asyncio.get_running_loop().run_in_executor(
        None, n0.admin, "node", "drain")
    assert done["draining"] is True
    assert await n0.wait_exit(30) == 0
    await traffic
    await settle(devices)
    counts = check_devices(devices, await cluster.snapshot())
    print("node drain:", counts)
    clean(counts)
    moved = [d for d in devices if d.name in ("a", "d0")]
    assert all(1012 in d.closes for d in moved), [d.closes for d in moved]
    # the moved devices are on the new node now: n1's users reach them there
    a, b = devices[0], devices[1]
    cid = b.send(a.uid, content="to the new node")
    await b.all_acked()
    await a.until(lambda: b.acked[cid] in a.copies, 10)
    assert (await cluster.log_figures(n2))["remote_units"] > 0
    await stop(devices)


async def test_check_config_tries_the_store_and_each_nats_server(cluster: Cluster) -> None:
    import subprocess
    import sys

    from net_helpers import free_port

    def check(*args: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**__import__("os").environ,
               "CHATD_SECRET_FILE": secret or str(cluster.secret_file)}
        return subprocess.run(
            [sys.executable, "-m", "chatd", "check-config", "--data-dir",
             str(cluster.folder / "cc"), *args],
            capture_output=True, text=True, timeout=60 * UNIT, env=env)

    bus = ",".join(cluster.nats.urls)
    ok = check("--store", cluster.dsn, "--bus", bus)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": reachable") == 4 and "node " in ok.stdout
    cluster.nats.servers[1].kill()
    down = check("--store", cluster.dsn, "--bus", bus)
    assert down.returncode == 1
    assert f"bus {cluster.nats.urls[1]}" in down.stderr
    assert cluster.nats.urls[0] not in down.stderr
    no_pg = cluster.dsn.rsplit(":", 1)[0] + f":{free_port()}/nothing"
    bad = check("--store", no_pg, "--bus", cluster.nats.urls[0])
    assert bad.returncode == 1 and "unreachable: store postgresql://" in bad.stderr
    missing = check("--store", cluster.dsn, "--bus", bus,
                    secret=str(cluster.folder / "no-such-secret"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    # a cluster without a shared store or secret is refused before anything is tried
    alone = check("--bus", bus)
    assert alone.returncode == 1 and "share one store" in alone.stderr


async def test_the_http_api_runs_on_postgresql(cluster: Cluster) -> None:
    """Accounts, friends, groups and history through three nodes' APIs, on one store."""
    import aiohttp

    n0, n1, n2 = (cluster.start(f"n{i}", "--shards", "1") for i in range(3))
    await cluster.started(n0, n1, n2)
    async with aiohttp.ClientSession() as http:
        async def post(node, path: str, token: str = "", **fields):  # type: ignore[no-untyped-def]
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.post(f"http://127.0.0.1:{node.api_port}{path}", data=fields,
                                 headers=headers) as resp:
                body = await resp.json()
                return resp.status, body

        st, alice = await post(n0, "/user/register", mobile="13900000001", passwd="secret1",
                               nickname="alice")
        assert (st, alice["code"]) == (200, 0)
        st, bob = await post(n1, "/user/register", mobile="13900000002", passwd="secret1")
        st, dup = await post(n2, "/user/register", mobile="13900000001", passwd="secret1")
        assert dup["code"] == -1  # the mobile is taken, whichever node is asked
        st, login = await post(n2, "/user/login", mobile="13900000001", passwd="secret1")
        assert (st, login["data"]["id"]) == (200, alice["data"]["id"])
        a_tok, b_tok = login["data"]["token"], bob["data"]["token"]
        b_id = bob["data"]["id"]
        st, added = await post(n1, "/contact/addfriend", a_tok, dstid=b_id)
        assert (st, added["code"]) == (200, 0)
        st, friends = await post(n2, "/contact/loadfriend", b_tok)
        assert [f["id"] for f in friends["rows"]] == [alice["data"]["id"]]
        st, group = await post(n0, "/contact/createcommunity", a_tok, name="pg")
        gid = group["data"]["id"]
        st, joined = await post(n2, "/contact/joincommunity", b_tok, dstid=gid)
        assert joined["code"] == 0
        # a message through n1's websocket, read back through n2's history
        dev = cluster.device("b", b_id, n1)
        await run_devices([dev])
        cid = dev.send(gid, cmd=11, content="hello pg")
        await dev.all_acked()
        st, hist = await post(n2, "/chat/history", a_tok, gid=gid)
        assert [m["id"] for m in hist["rows"]] == [dev.acked[cid]], hist
        assert hist["rows"][0]["content"] == "hello pg"
        await stop([dev])


def test_db_commands_say_they_are_for_sqlite_on_a_postgresql_store(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "chatd", "db", "check", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60 * UNIT,
        env={**__import__("os").environ, "CHATD_STORE": "postgresql://u@127.0.0.1:1/x"})
    assert done.returncode == 1
    assert done.stderr.startswith("chatd: chatd db check works on the SQLite store")
    assert "pg_dump" in done.stderr
