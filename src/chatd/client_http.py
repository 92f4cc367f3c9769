"""chatd's Python SDK, HTTP half: ``ApiClient``, the API's calls, typed.

Each call sends a request Struct of ``chatd.api_schema`` as JSON (the server
validates with the same type) and decodes the reply into its reply Struct;
a refusal raises ``HttpError`` with the HTTP status and the server's reason.
``chatd.client.ChatClient`` adds the chat websocket to it.
"""

from __future__ import annotations

from typing import TypeVar

import aiohttp
import msgspec

from chatd.api_schema import (
    AuthRequest,
    Befriended,
    BefriendedReply,
    ClientConfig,
    CreateGroupRequest,
    ErrorReply,
    FindRequest,
    Group,
    GroupListReply,
    GroupReply,
    GroupRequest,
    HistoryPage,
    HistoryReply,
    HistoryRequest,
    Joined,
    JoinedReply,
    Left,
    LeftReply,
    LoginRequest,
    Me,
    MembersRequest,
    MeReply,
    RegisterRequest,
    Request,
    Revoked,
    RevokedReply,
    TokenInfo,
    TokenReply,
    UploadReply,
    User,
    UserListReply,
    UserReply,
    UserRequest,
)
from chatd.errors import ChatdError

R = TypeVar("R", bound=msgspec.Struct)

DEFAULT_HTTP_TIMEOUT_S = 30.0

_encode = msgspec.json.Encoder().encode
_error_reply = msgspec.json.Decoder(ErrorReply).decode


class ClientError(ChatdError):
    """Root of what the SDK raises."""


class HttpError(ClientError):
    """The API refused a call: ``status`` (HTTP) and ``msg`` (its reason)."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(f"{status}: {msg}")
        self.status = status
        self.msg = msg


class ApiClient:
    """One user's calls to a chatd node's HTTP API at ``api_url`` (``http://host:8081``).

    ``register`` and ``login`` keep the token and the user's id for every
    later call; give ``token`` and ``uid`` to go on with a saved session.
    ``session`` is an aiohttp session to use (default: one of its own,
    closed by ``close``).
    """

    def __init__(self, api_url: str, *, token: str = "", uid: int = 0,
                 session: aiohttp.ClientSession | None = None,
                 timeout_s: float = DEFAULT_HTTP_TIMEOUT_S) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.uid = uid
        self._own_session = session is None
        self._session = session
        self._timeout_s = timeout_s

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if it is this client's own."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _call(self, path: str, body: Request, reply: type[R]) -> R:
        headers = {"Content-Type": "application/json", **self._auth_headers()}
        async with self._http().post(self.api_url + path, data=_encode(body),
                                     headers=headers) as resp:
            return self._decode(resp.status, await resp.read(), reply)

    @staticmethod
    def _decode(status: int, raw: bytes, reply: type[R]) -> R:
        if status != 200:
            try:
                msg = _error_reply(raw).msg
            except msgspec.DecodeError:
                msg = raw[:200].decode("utf-8", "replace")
            raise HttpError(status, msg)
        try:
            out = msgspec.json.decode(raw, type=reply)
        except msgspec.DecodeError as exc:
            raise HttpError(status, f"unexpected reply: {exc}") from None
        code = getattr(out, "code", 0)
        if code != 0:
            raise HttpError(status, getattr(out, "msg", ""))
        return out

    def _signed_in(self, me: Me) -> Me:
        self.token = me.token
        self.uid = me.id
        return me

    async def register(self, mobile: str, passwd: str, *, nickname: str = "",
                       avatar: str = "", sex: str = "U") -> Me:
        """Create an account and sign in as it."""
        req = RegisterRequest(mobile=mobile, passwd=passwd, nickname=nickname, avatar=avatar,
                              sex=sex)
        return self._signed_in((await self._call("/user/register", req, MeReply)).data)

    async def login(self, mobile: str, passwd: str) -> Me:
        """Sign in; the token is kept for every later call and the websocket."""
        req = LoginRequest(mobile=mobile, passwd=passwd)
        return self._signed_in((await self._call("/user/login", req, MeReply)).data)

    async def refresh(self) -> TokenInfo:
        """A new token (later expiry), used from now on (the next connect too)."""
        info = (await self._call("/user/refresh", AuthRequest(), TokenReply)).data
        self.token = info.token
        return info

    async def revoke(self) -> Revoked:
        """Void every token of this user; live connections are closed with 4501."""
        return (await self._call("/user/revoke", AuthRequest(), RevokedReply)).data

    async def find(self, uid: int) -> User:
        return (await self._call("/user/find", FindRequest(id=uid), UserReply)).data

    async def add_friend(self, uid: int) -> Befriended:
        return (await self._call("/contact/addfriend", UserRequest(dstid=uid),
                                 BefriendedReply)).data

    async def friends(self) -> list[User]:
        return (await self._call("/contact/loadfriend", AuthRequest(), UserListReply)).rows

    async def create_group(self, name: str, *, icon: str = "", cate: int = 0,
                           memo: str = "") -> Group:
        req = CreateGroupRequest(name=name, icon=icon, cate=cate, memo=memo)
        return (await self._call("/contact/createcommunity", req, GroupReply)).data

    async def join_group(self, gid: int) -> Joined:
        return (await self._call("/contact/joincommunity", GroupRequest(dstid=gid),
                                 JoinedReply)).data

    async def quit_group(self, gid: int) -> Left:
        return (await self._call("/contact/quitcommunity", GroupRequest(dstid=gid),
                                 LeftReply)).data

    async def groups(self) -> list[Group]:
        return (await self._call("/contact/loadcommunity", AuthRequest(), GroupListReply)).rows

    async def members(self, gid: int) -> list[User]:
        return (await self._call("/contact/members", MembersRequest(dstid=gid),
                                 UserListReply)).rows

    async def history(self, *, dstid: int | None = None, gid: int | None = None,
                      before: int | None = None, after: int | None = None,
                      limit: int = 50) -> HistoryPage:
        """A page of the conversation with user ``dstid`` or of group ``gid``, oldest first."""
        req = HistoryRequest(dstid=dstid, gid=gid, before=before, after=after, limit=limit)
        return (await self._call("/chat/history", req, HistoryReply)).data

    async def upload(self, data: bytes, filename: str = "file",
                     content_type: str = "application/octet-stream") -> UploadReply:
        """Store a file; an image's reply has its preview in ``pic``."""
        form = aiohttp.FormData()
        form.add_field("file", data, filename=filename, content_type=content_type)
        async with self._http().post(self.api_url + "/attach/upload", data=form,
                                     headers=self._auth_headers()) as resp:
            return self._decode(resp.status, await resp.read(), UploadReply)

    async def config(self) -> ClientConfig:
        """``/config.json``: where the chat websocket listens."""
        async with self._http().get(self.api_url + "/config.json") as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise HttpError(resp.status, raw[:200].decode("utf-8", "replace"))
        return msgspec.json.decode(raw, type=ClientConfig)
