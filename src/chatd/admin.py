"""The admin socket: how ``chatd admin`` talks to a running node.

The supervisor listens on ``admin.sock`` in the node's run folder (mode 0600,
in a folder of mode 0700: only the user chatd runs as, and root, may connect).
One request per line, one answer per line, both JSON:

    {"cmd": "shards"}                  → the shards: index, pid, connections, ...
    {"cmd": "scale", "n": 4}           → start or retire shards until 4 serve
    {"cmd": "drain", "index": 2}       → retire shard 2 (clients get 1012)
    {"cmd": "online", "uid": 7}        → where user 7 is connected, since when
    {"cmd": "kick", "uid": 7, "code": 4001}   → close user 7's connections
    {"cmd": "broadcast", "text": "...", "gid": null}   → a system message to all
    {"cmd": "user", "action": "ban|unban|revoke|show", "uid": 7}
    {"cmd": "group", "action": "members", "gid": 3}
    {"cmd": "stats"}                   → every child's last status report

Answers are ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": "why"}``.
``AdminClient`` is the CLI's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from chatd.bus.unix import UnixControl
from chatd.errors import ChatdError, NotFoundError, StoreError
from chatd.store import Store, UserRecord, open_configured
from chatd.wire import CLOSE_KICKED, CLOSE_SERVICE_RESTART, MAX_CONTENT_CHARS

if TYPE_CHECKING:
    from chatd.supervisor import Supervisor

log = logging.getLogger("chatd.admin")

#: longest request line accepted
MAX_REQUEST_BYTES: Final = 64 << 10


class AdminError(ChatdError):
    """The node refused an admin request, or cannot be reached."""


class AdminServer:
    """The supervisor's end of the admin socket."""

    def __init__(self, supervisor: Supervisor, path: Path) -> None:
        self.supervisor = supervisor
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        #: the node's log, for the routing changes an operator makes
        self.control: UnixControl | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(self.path), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old)
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.control is not None:
            await self.control.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise AdminError("a request is a JSON object")
                    answer = {"ok": True, "data": await self.handle(request)}
                except (AdminError, StoreError, ValueError, KeyError, TypeError) as exc:
                    answer = {"ok": False, "error": str(exc) or type(exc).__name__}
                except Exception as exc:  # our bug: say so, keep serving
                    log.exception("admin request %r failed", line[:200])
                    answer = {"ok": False, "error": f"internal error: {exc}"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> Any:
        """The answer to one request (``AdminError`` if it is refused)."""
        sup = self.supervisor
        cmd = request.get("cmd")
        if cmd == "shards":
            return [await self._shard_row(c) for c in sup.shards()]
        if cmd == "scale":
            n = request["n"]
            if not isinstance(n, int) or isinstance(n, bool):
                raise AdminError("n must be a number of shards")
            try:
                return {"shards": await sup.scale(n)}
            except ValueError as exc:
                raise AdminError(str(exc)) from None
        if cmd == "drain":
            index = request["index"]
            if not await sup.retire_shard(int(index)):
                raise AdminError(
                    f"no shard {index} to drain (or it is the last one, or it runs the log)"
                )
            return {"drained": int(index), "shards": [c.index for c in sup.shards()]}
        if cmd == "node_drain":
            sup.leave()
            return {"node": sup.cfg.node_name, "draining": True,
                    "close_code": CLOSE_SERVICE_RESTART}
        if cmd == "online":
            uid = int(request["uid"])
            await self._known_user(uid)
            rows = []
            for child in sup.shards():
                sessions = await sup.ask(child, "online", uid)
                for sess in sessions or ():
                    rows.append({"shard": child.index, **sess})
            return rows
        if cmd == "stats":
            return sup.snapshot()
        if cmd == "kick":
            uid, code = int(request["uid"]), int(request.get("code", CLOSE_KICKED))
            if not 4000 <= code <= 4999:
                raise AdminError("a kick's close code is 4000-4999 (4500+: do not reconnect)")
            await self._known_user(uid)
            closed = 0
            for child in sup.shards():
                closed += int(await sup.ask(child, "kick", uid, code) or 0)
            return {"uid": uid, "closed": closed, "code": code}
        if cmd == "broadcast":
            text = request["text"]
            gid = request.get("gid")
            if not isinstance(text, str) or not text or len(text) > MAX_CONTENT_CHARS:
                raise AdminError(f"the text is 1 to {MAX_CONTENT_CHARS} characters")
            control = self._control()
            try:
                mid = await control.broadcast(text, None if gid is None else int(gid))
            except NotFoundError as exc:
                raise AdminError(str(exc)) from None
            return {"id": mid, "gid": gid}
        if cmd == "user":
            return await self._user(str(request["action"]), int(request["uid"]))
        if cmd == "group":
            if request.get("action") != "members":
                raise AdminError("group actions: members")
            store = await self._store()
            try:
                gid = int(request["gid"])
                if await store.group_by_id(gid) is None:
                    raise AdminError(f"no group {gid}")
                return [_public(u) for u in await store.members_of(gid)]
            finally:
                await store.close()
        raise AdminError(f"unknown command {cmd!r}")

    async def _user(self, action: str, uid: int) -> Any:
        control = self._control()
        try:
            if action == "ban":
                return {"uid": uid, "banned": True, "changed": await control.set_banned(uid, True)}
            if action == "unban":
                changed = await control.set_banned(uid, False)
                return {"uid": uid, "banned": False, "changed": changed}
            if action == "revoke":
                return {"uid": uid, "token_version": await control.revoke_tokens(uid)}
        except NotFoundError as exc:
            raise AdminError(str(exc)) from None
        if action != "show":
            raise AdminError("user actions: ban, unban, revoke, show")
        store = await self._store()
        try:
            user = await store.user_by_id(uid)
            if user is None:
                raise AdminError(f"no user {uid}")
            groups = await store.groups_of(uid)
        finally:
            await store.close()
        online = await self.handle({"cmd": "online", "uid": uid})
        return {**_public(user), "token_version": user.token_version,
                "banned": bool(user.banned), "groups": [g.id for g in groups],
                "online": online}

    async def _known_user(self, uid: int) -> None:
        """``AdminError`` if there is no user ``uid``: a mistyped id is an error,
        not a user who happens to have no connection."""
        store = await self._store()
        try:
            if await store.user_by_id(uid) is None:
                raise AdminError(f"no user {uid}")
        finally:
            await store.close()

    def _control(self) -> UnixControl:
        if self.control is None:
            self.control = UnixControl(self.supervisor.cfg.run_path / "log.sock")
        return self.control

    async def _store(self) -> Store:
        return await open_configured(self.supervisor.cfg, writable=False)

    async def _shard_row(self, child: Any) -> dict[str, Any]:
        status = child.status
        return {
            "index": child.index,
            "pid": child.proc.pid if child.proc is not None else None,
            "ready": child.ready.is_set(),
            "connections": status.get("connections", 0),
            "users": status.get("users", 0),
            "uptime_s": round(time.monotonic() - child.started_at, 1),
            "restarts": child.restarts,
        }


def _public(user: UserRecord) -> dict[str, Any]:
    """A user without its password hash."""
    return {k: getattr(user, k) for k in ("id", "mobile", "nickname", "avatar", "sex",
                                          "created_ms")}


#: where the systemd unit's RuntimeDirectory puts the sockets
SYSTEMD_RUN_DIR: Final = Path("/run/chatd")


class AdminClient:
    """``chatd admin``'s end: one request, one answer.

    The socket is the configured one; when that does not exist, the systemd
    unit's (``/run/chatd``), so that an operator's shell finds the service.
    """

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        fallback = SYSTEMD_RUN_DIR / path.name
        # os.path.exists, not Path.exists: a folder this user may not enter is
        # "not here" (the connect then says why), not a traceback
        here = os.path.exists(path) or not os.path.exists(fallback)
        self.path = path if here else fallback
        self.timeout_s = timeout_s

    async def request(self, **request: Any) -> Any:
        """Send one request; its ``data``, or ``AdminError`` with the node's reason."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path))
        except FileNotFoundError:
            raise AdminError(f"no node is running here (no {self.path})") from None
        except PermissionError:
            raise AdminError(
                f"no permission to use {self.path} (run as the user chatd runs as, or root)"
            ) from None
        except ConnectionRefusedError:
            # a socket file left behind by a node that died without removing it
            raise AdminError(f"the node at {self.path} is not running") from None
        except OSError as exc:
            raise AdminError(f"cannot reach the node at {self.path}: {exc.strerror}") from None
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            line = await asyncio.wait_for(reader.readline(), self.timeout_s)
        except TimeoutError:
            raise AdminError("the node did not answer in time") from None
        finally:
            writer.close()
        if not line:
            raise AdminError("the node closed the admin connection")
        try:
            answer = json.loads(line)
        except ValueError:
            raise AdminError(f"{self.path} did not answer as a chatd node does") from None
        if not isinstance(answer, dict):
            raise AdminError(f"{self.path} did not answer as a chatd node does")
        if not answer.get("ok"):
            raise AdminError(str(answer.get("error")))
        return answer.get("data")
