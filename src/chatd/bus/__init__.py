"""The bus: how a node's shards and API workers reach its ordered log.

Two interfaces, each with an in-process implementation (``bus.local``, one
event loop: the embedded node and the tests) and a Unix-socket one
(``bus.unix``, between processes: ``chatd serve``):

- ``LogLink`` is a shard's end: it submits messages and reports presence;
  the log's answers come back to the shard's ``LogListener`` in order.
- ``Control`` is what the API (and the admin CLI) asks the log to do: the
  routing changes, each answered once it is committed and placed in the
  order of the messages. ``chatd.log.Log`` implements it directly.

Frames are in ``bus.frames``. The next engine (NATS between nodes) plugs in
behind the log, not here: shards and the API do not change.
"""

from __future__ import annotations

from typing import Protocol

from chatd.bus.frames import AnyItem, Welcome
from chatd.wire import Message


class LogListener(Protocol):
    """What a shard does with what its log sends."""

    def on_welcome(self, welcome: Welcome) -> None:
        """The link is (again) up; ``welcome`` says where the node is."""

    def on_batch(self, items: list[AnyItem], hw: int) -> None:
        """Items in the log's order; ``hw``: everything up to it is routed."""

    def on_lost(self) -> None:
        """The link is down: every submission not answered yet is lost."""


class LogLink(Protocol):
    """A shard's end of its link to the node's log."""

    @property
    def up(self) -> bool:
        """Whether submissions can be taken now."""

    def submit(self, seq: int, msg: Message) -> bool:
        """Hand ``msg`` to the log; False if it cannot take it now (retry later)."""

    def online(self, uid: int) -> None:
        """This shard holds its first connection of ``uid`` (answered by ``Here``)."""

    def offline(self, uid: int) -> None:
        """This shard holds no connection of ``uid`` any more."""

    async def close(self) -> None:
        """Stop the link."""


class Control(Protocol):
    """The routing changes, made by the log in the order of the messages.

    Each raises ``NotFoundError`` when a named user or group does not exist
    and ``StoreUnavailable`` when the log or its store cannot do it now.
    """

    async def create_group(
        self, name: str, owner: int, icon: str = "", cate: int = 0, memo: str = ""
    ) -> int:
        """Create a group owned (and joined) by ``owner``; its id."""

    async def join_group(self, gid: int, uid: int) -> bool:
        """``uid`` joins ``gid``; False if it was a member already."""

    async def leave_group(self, gid: int, uid: int) -> bool:
        """``uid`` leaves ``gid``; False if it was not a member."""

    async def revoke_tokens(self, uid: int) -> int:
        """Void every token of ``uid`` issued so far; the new token version."""

    async def set_banned(self, uid: int, banned: bool) -> bool:
        """Ban (or unban) ``uid``; False if it already was."""

    async def broadcast(self, text: str, gid: int | None = None) -> int:
        """A system message to every user (or group ``gid``); its id."""
