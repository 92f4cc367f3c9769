"""The admin socket: how ``chatd admin`` talks to a running node.

The supervisor listens on ``admin.sock`` in the node's run folder (mode 0600,
in a folder of mode 0700: only the user chatd runs as, and root, may connect).
One request per line, one answer per line, both JSON:

    {"cmd": "shards"}                  → the shards: index, pid, connections, ...
    {"cmd": "scale", "n": 4}           → start or retire shards until 4 serve
    {"cmd": "drain", "index": 2}       → retire shard 2 (clients get 1012)
    {"cmd": "online", "uid": 7}        → where user 7 is connected, since when
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

from chatd.errors import ChatdError

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
                except (AdminError, ValueError, KeyError, TypeError) as exc:
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
        if cmd == "online":
            uid = int(request["uid"])
            rows = []
            for child in sup.shards():
                sessions = await sup.ask(child, "online", uid)
                for sess in sessions or ():
                    rows.append({"shard": child.index, **sess})
            return rows
        if cmd == "stats":
            return sup.snapshot()
        raise AdminError(f"unknown command {cmd!r}")

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


class AdminClient:
    """``chatd admin``'s end: one request, one answer."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    async def request(self, **request: Any) -> Any:
        """Send one request; its ``data``, or ``AdminError`` with the node's reason."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path))
        except FileNotFoundError:
            raise AdminError(f"no node is running here (no {self.path})") from None
        except PermissionError:
            raise AdminError(f"no permission to use {self.path}") from None
        except ConnectionRefusedError:
            raise AdminError(f"the node at {self.path} is not running") from None
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            line = await asyncio.wait_for(reader.readline(), self.timeout_s)
        except TimeoutError:
            raise AdminError("the node did not answer in time") from None
        finally:
            writer.close()
        if not line:
            raise AdminError("the node closed the admin connection")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise AdminError(str(answer.get("error")))
        return answer.get("data")
