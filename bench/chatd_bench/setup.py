"""Users, groups and tokens for a run, made through chatd's own Python API.

One CLI process per user is far too slow for 10,000 users, so the bench opens
the node's store through chatd's ``Store`` interface (SQLite in the data
folder, or the PostgreSQL database it runs chatd on) and signs tokens with
``chatd.auth`` (one password hash for every bench user). What it made is
remembered in ``bench-users.json`` in the data folder, so later runs (and
``--url`` runs against a server on that folder) reuse it; ``--users-file``
reads the same format for a server whose data folder is out of reach.

Groups are made per layout ``GxL``: G groups where group g holds the users
i < L with i % G == g (the peer relays' rule, see ``plan``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

MANIFEST = "bench-users.json"
PASSWORD = "bench-password"
TOKEN_TTL_S = 24 * 3600


@dataclasses.dataclass
class Users:
    """Server ids and tokens by logical user index; group ids by layout."""

    uids: list[int]
    tokens: list[str]
    groups: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"uids": self.uids, "tokens": self.tokens, "groups": self.groups}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Users:
        uids = [int(u) for u in data["uids"]]
        tokens = [str(t) for t in data.get("tokens") or []]
        if tokens and len(tokens) != len(uids):
            raise ValueError("users file: uids and tokens differ in length")
        groups = {str(k): [int(g) for g in v] for k, v in (data.get("groups") or {}).items()}
        return cls(uids, tokens, groups)

    def require(self, users: int, layouts: list[tuple[int, int]]) -> None:
        if len(self.uids) < users:
            raise SetupError(f"{users} users needed, only {len(self.uids)} known")
        for n_groups, limit in layouts:
            if layout_key(n_groups, limit) not in self.groups:
                raise SetupError(f"group layout {layout_key(n_groups, limit)} is missing")


class SetupError(Exception):
    """The set-up cannot give what the run needs."""


def layout_key(n_groups: int, limit: int) -> str:
    return f"{n_groups}x{limit}"


def peer_users(users: int, n_groups: int) -> Users:
    """Ids for a peer relay: user i is ``i + G`` so that ``uid % G == i % G``."""
    g = max(1, n_groups)
    return Users([i + g for i in range(users)], ["bench"] * users, {})


def load_users_file(path: str | Path) -> Users:
    return Users.from_json(json.loads(Path(path).read_text()))


async def _prepare(data_dir: Path, users: int, layouts: list[tuple[int, int]],
                   log: Any, store_url: str, secret_file: Path | None) -> Users:
    from chatd import auth
    from chatd.store import Store, open_store

    data_dir.mkdir(parents=True, exist_ok=True)
    # a PostgreSQL database is the bench's own, fresh each run: nothing to reuse
    manifest = data_dir / MANIFEST if not store_url else None
    known = (Users.from_json(json.loads(manifest.read_text()))
             if manifest and manifest.exists() else None)
    uids = list(known.uids) if known else []
    groups = dict(known.groups) if known else {}
    store: Store
    if store_url:
        from chatd.store.postgres import PostgresStore

        store = await PostgresStore.open(store_url)  # creates the schema
    else:
        store = await open_store(data_dir / "chatd.db")
    try:
        if len(uids) < users:
            t0 = time.monotonic()
            hashed = auth.hash_password(PASSWORD)  # once: scrypt costs ~50 ms
            for i in range(len(uids), users):
                uids.append(await store.create_user(f"bench{i:08d}", hashed, f"bench {i}"))
            log(f"set-up: {users - (len(known.uids) if known else 0)} users created "
                f"in {time.monotonic() - t0:.1f}s")
        for n_groups, limit in layouts:
            key = layout_key(n_groups, limit)
            if key in groups:
                continue
            t0 = time.monotonic()
            gids = []
            for g in range(n_groups):
                members = range(g, limit, n_groups)
                gid = await store.create_group(f"bench {key} #{g}", uids[members[0]])
                for i in members[1:]:
                    await store.join_group(gid, uids[i])
                gids.append(gid)
            groups[key] = gids
            log(f"set-up: {n_groups} groups of {len(range(0, limit, n_groups))} members "
                f"in {time.monotonic() - t0:.1f}s")
        versions = await store.token_versions()
    finally:
        await store.close()
    secret = (auth.read_secret(secret_file) if secret_file
              else auth.load_or_create_secret(data_dir))
    tokens = [auth.issue_token(secret, uid, versions.get(uid, 0), TOKEN_TTL_S) for uid in uids]
    out = Users(uids, tokens, groups)
    if manifest:
        manifest.write_text(json.dumps({"uids": uids, "groups": groups}))
    return out


def prepare_chatd(data_dir: str | Path, users: int, layouts: list[tuple[int, int]],
                  log: Any = print, store_url: str = "",
                  secret_file: str | Path | None = None) -> Users:
    """Make sure the store holds ``users`` bench users and the group ``layouts``
    (G, L); return their ids and fresh tokens.

    The store is SQLite in ``data_dir`` (what was made is remembered there and
    reused), or with ``store_url`` a PostgreSQL database (through chatd's
    ``PostgresStore``, the same interface), which the bench makes fresh for
    each invocation. Tokens are signed with ``secret_file`` when given (the
    secret every node of a cluster shares), else with ``data_dir/secret``.
    """
    return asyncio.run(_prepare(Path(data_dir), users, layouts, log, store_url,
                                Path(secret_file) if secret_file else None))


def make_secret_file(path: str | Path) -> Path:
    """A new 32-byte token secret at ``path`` (mode 0600), for ``CHATD_SECRET_FILE``."""
    import os
    import secrets

    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path
