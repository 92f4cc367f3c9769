"""What the store's connections promise SQLite to do: the durability mode of
``db_synchronous`` and the wait of ``db_busy_timeout_ms`` (docs/guarantees.md)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from chatd.errors import StoreUnavailable
from chatd.store import STORED, open_store
from chatd.wire import CMD_PRIVATE, Message


@pytest.mark.parametrize(("mode", "level"), [("NORMAL", 1), ("FULL", 2)])
async def test_db_synchronous_sets_the_writers_sync_level(tmp_path: Path, mode: str,
                                                          level: int) -> None:
    store = await open_store(tmp_path / "chatd.db", synchronous=mode, busy_timeout_ms=1234)
    try:
        writer = store._w  # type: ignore[attr-defined]
        assert (await writer.execute_fetchall("PRAGMA synchronous")) == [(level,)]
        assert (await writer.execute_fetchall("PRAGMA journal_mode")) == [("wal",)]
        assert (await writer.execute_fetchall("PRAGMA busy_timeout")) == [(1234,)]
    finally:
        await store.close()


async def test_a_lock_held_past_the_busy_timeout_is_store_unavailable(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "chatd.db", busy_timeout_ms=50)
    holder = sqlite3.connect(tmp_path / "chatd.db", isolation_level=None, timeout=0)
    try:
        uid = await store.create_user("1", "x")
        holder.execute("BEGIN IMMEDIATE")
        msg = Message(userid=uid, cmd=CMD_PRIVATE, dstid=uid, media=1, content="x", cid="c")
        with pytest.raises(StoreUnavailable):
            await store.append([msg])
        assert msg.id == 0
        holder.execute("ROLLBACK")
        assert await store.append([msg]) == [STORED] and msg.id == 1
    finally:
        holder.close()
        await store.close()
