"""Exceptions raised by chatd.

The tree::

    ChatdError                 root of everything chatd raises on purpose
    ├── ConfigError            bad configuration (flag, environment, TOML file)
    ├── StoreError             the database is missing, newer than us, or broken
    │   ├── NotFoundError      a user, group or row that the caller named is absent
    │   └── StoreUnavailable   the store cannot answer now (busy, full, gone, the
    │                          node's log unreachable): nothing was done, retry
    ├── AuthError              a token or password that does not check out
    ├── FrameError             a client sent a frame we cannot act on; carries the
    │                          error code and reason for the cmd-5 error frame
    ├── ApiError               (api_common) an HTTP request refused: status + message
    └── MediaError             (media) an upload refused: too big, unknown type,
                               damaged or a decompression bomb

A client's fault (``FrameError``, ``AuthError``) becomes an error frame, an HTTP
status or a close code and is not logged as our error. Anything else that
escapes a handler is our bug and is logged with its traceback.
"""

from __future__ import annotations


class ChatdError(Exception):
    """Root of the errors chatd raises on purpose."""


class ConfigError(ChatdError):
    """The configuration is invalid; the message says which key and why."""


class StoreError(ChatdError):
    """The store cannot do what was asked."""


class NotFoundError(StoreError):
    """A named user, group or row does not exist."""


class StoreUnavailable(StoreError):
    """The store (or the node's log in front of it) cannot answer now; retry."""


class AuthError(ChatdError):
    """A token or password was refused."""


class FrameError(ChatdError):
    """A client frame that is refused, answered with a cmd-5 error frame."""

    def __init__(self, code: int, reason: str, cid: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.cid = cid
