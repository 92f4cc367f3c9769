"""Configuration: one ``Config`` built from defaults, a TOML file, ``CHATD_*``
environment variables and command-line flags, in that order of precedence
(a flag beats the environment, which beats the file).

Keys are the field names below; in the environment they are upper-cased with a
``CHATD_`` prefix (``chat_port`` -> ``CHATD_CHAT_PORT``); a list is written
comma-separated there. Every value, whatever its source, is checked by one
mechanism: ``msgspec.convert`` against the field's annotated type (ranges
included), strictly for TOML values, which are typed already, and with text
conversion for the environment and string flags. A setting with a fixed set
of values is a ``Literal`` type, written in any case (``INFO``, ``normal``):
it is brought to the case of its values before the check. Unknown keys and
values of the wrong type are refused with a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import socket
import tempfile
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from chatd.errors import ConfigError

ENV_PREFIX = "CHATD_"
#: longest run folder: its sockets' paths must fit in a sockaddr_un (108 bytes)
_RUN_PATH_MAX = 90

_SQLITE = "sqlite://"
_POSTGRES = ("postgresql://", "postgres://")
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
_Positive = Annotated[int, msgspec.Meta(gt=0)]
_PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
LogLevel = Literal["debug", "info", "warning", "error"]
LogProcess = Literal["auto", "own", "shard"]
DbSynchronous = Literal["NORMAL", "FULL"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a chatd node. Units are in the names."""

    host: str = "0.0.0.0"
    chat_port: _Port = 8080
    api_port: _Port = 8081
    data_dir: str = "./data"
    log_level: LogLevel = "info"
    #: shard processes on the chat port; 0 = one per CPU
    shards: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    #: where the node's log runs: "own" (a process of its own), "shard" (inside
    #: shard 0: no hop between processes), "auto" (inside with one shard)
    log_process: LogProcess = "auto"
    #: the node's sockets (the log's, the admin's): "" = DATA_DIR/run
    run_dir: str = ""
    #: if set, shard i also listens on this port + i, alone (diagnostics and the
    #: bench's placement of users on chosen shards; clients use chat_port)
    shard_base_port: _Port = 0
    #: connections one shard accepts; past it the upgrade gets 503 + Retry-After
    max_conns: _Positive = 100_000
    #: upgraded connections one shard holds from one address (IPv6: one /64);
    #: past it the upgrade gets 429 + Retry-After; 0 = no limit
    max_conns_per_ip: Annotated[int, msgspec.Meta(ge=0)] = 1000
    #: time from accepting a connection to its upgrade (the whole HTTP
    #: handshake; TLS's too, on its own clock); past it the connection is dropped
    handshake_timeout_s: _PositiveFloat = 10.0
    #: largest HTTP request head (request line and headers) on the chat port;
    #: past it 431 (picows' own limit, 16 KiB, is the ceiling)
    max_handshake_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16_000)] = 8192
    #: a test aid, off ("") in production: a path (e.g. "/echo") that answers every
    #: websocket message with itself, through the chat frame handling (Autobahn)
    echo_path: str = ""
    #: PEM certificate chain and key: wss:// on the chat port, HTTPS on the api port
    tls_cert: str = ""
    tls_key: str = ""
    #: browser origins allowed to open a chat connection: empty = same-origin
    #: (the websocket's own origin or the api port's web client), "*" = any
    allowed_origins: tuple[str, ...] = ()
    #: largest websocket frame (or reassembled message) accepted; past it, close 1009
    max_frame_bytes: _Positive = 65_536
    #: per-connection token bucket; rate_limit=false switches it off (the bench does)
    rate_limit: bool = True
    rate_per_s: _PositiveFloat = 300.0
    rate_burst: _Positive = 600
    #: the seed client beats every 30 s; silence this long closes the connection
    idle_timeout_s: _PositiveFloat = 75.0
    #: unsent bytes on one connection past which it is closed as a slow consumer
    slow_consumer_bytes: _Positive = 262_144
    #: SIGTERM: time to commit queued messages and close clients before exiting
    drain_timeout_s: _PositiveFloat = 10.0
    #: a child process whose loop has not reported for this long is stuck: the
    #: supervisor kills it (and restarts it)
    stuck_after_s: _PositiveFloat = 20.0
    #: messages per page when a client syncs
    sync_page: _Positive = 500
    #: most messages in one store transaction
    batch_max: _Positive = 2048
    #: under load, the least time between the starts of two commits: batches
    #: grow, each page is written once for more messages (0: commit at once)
    commit_interval_ms: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    #: messages waiting for the store past which new ones are refused (503 error frame)
    queue_max: _Positive = 100_000
    #: SQLite synchronous mode for messages: NORMAL survives process crashes, FULL power loss
    db_synchronous: DbSynchronous = "NORMAL"
    #: how long a store statement waits for a lock held by another connection (a
    #: backup, a sqlite3 shell) before the message is refused with error 503
    db_busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    token_ttl_s: _Positive = 30 * 24 * 3600
    #: where the data lives: "" = SQLite in DATA_DIR/chatd.db, "sqlite:///abs/path.db",
    #: or "postgresql://user@host:port/db" (the nodes of a cluster share one)
    store: str = ""
    #: the NATS servers between the nodes of a cluster (nats:// URLs); empty = one node
    bus: tuple[str, ...] = ()
    #: this node's name in the cluster (its headers, its logs); "" = the host name
    node_id: str = ""
    #: the token secret: "" = DATA_DIR/secret (made at the first start); the nodes
    #: of a cluster must share one file, or a token of one node fails on the others
    secret_file: str = ""
    #: PostgreSQL connections a process keeps (the log's writer and readers)
    pg_pool: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def db_path(self) -> Path:
        """The SQLite file (``store`` "" or "sqlite://…")."""
        if self.store.startswith(_SQLITE):
            return Path(self.store[len(_SQLITE):])
        return self.data_path / "chatd.db"

    @property
    def store_is_postgres(self) -> bool:
        return self.store.startswith(_POSTGRES)

    @property
    def clustered(self) -> bool:
        """Whether this node is one of a cluster (``bus`` is set)."""
        return bool(self.bus)

    @property
    def node_name(self) -> str:
        return self.node_id or socket.gethostname()

    @property
    def secret_path(self) -> Path:
        return Path(self.secret_file) if self.secret_file else self.data_path / "secret"

    @property
    def shard_count(self) -> int:
        """How many shards ``chatd serve`` starts with (``shards``, or the CPU count)."""
        return self.shards or os.cpu_count() or 1

    @property
    def log_in_shard(self) -> bool:
        """Whether shard 0 runs the node's log (see ``log_process``)."""
        if self.log_process == "auto":
            return self.shard_count == 1
        return self.log_process == "shard"

    @property
    def run_path(self) -> Path:
        """The folder of the node's Unix sockets (mode 0700).

        A socket's path must fit in 108 bytes: a folder too deep for that is
        replaced by one in the temp folder named after it, so every process
        (and ``chatd admin``) finds the same one.
        """
        folder = Path(self.run_dir) if self.run_dir else self.data_path / "run"
        folder = folder.resolve()
        if len(str(folder)) > _RUN_PATH_MAX:
            digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
            folder = Path(tempfile.gettempdir()) / f"chatd-{os.getuid()}-{digest}"
        return folder


_TYPES: dict[str, Any] = typing.get_type_hints(Config, include_extras=True)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _from_text(key: str, text: str) -> Any:
    """A value written as text (environment, string flag) in the shape
    ``msgspec.convert`` takes from text: lists comma-separated, bools in the
    usual spellings, ``_`` as a digit separator."""
    default = getattr(Config, key)
    if isinstance(default, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(default, bool):
        low = text.strip().lower()
        return "true" if low in _TRUE else "false" if low in _FALSE else text
    if isinstance(default, int | float):
        return text.strip().replace("_", "")
    return text


def _choices(key: str) -> tuple[str, ...]:
    """The values of a ``Literal`` setting; () for any other."""
    kind = _TYPES[key]
    return get_args(kind) if get_origin(kind) is Literal else ()


def _coerce(key: str, value: Any, from_text: bool) -> Any:
    if from_text:
        value = _from_text(key, str(value))
    choices = _choices(key)
    if choices and isinstance(value, str):
        # the values of one setting share a case (log levels lower, SQLite's
        # modes upper); any case is accepted, as logging and SQLite do
        value = value.strip()
        value = value.upper() if choices[0].isupper() else value.lower()
    try:
        return msgspec.convert(value, _TYPES[key], strict=not from_text)
    except msgspec.ValidationError as exc:
        if choices:
            listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            raise ConfigError(f"{key}: must be {listed}") from None
        raise ConfigError(f"{key}: {exc}".replace(" - at `$`", "")) from None


def _check(cfg: Config) -> Config:
    """The rules that the field types cannot say."""
    for key in ("rate_per_s", "idle_timeout_s", "drain_timeout_s", "stuck_after_s",
                "handshake_timeout_s"):
        if not math.isfinite(getattr(cfg, key)):
            raise ConfigError(f"{key}: must be a finite number")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert and tls_key: give both, or neither")
    if cfg.echo_path and (
        not cfg.echo_path.startswith("/") or cfg.echo_path in ("/chat", "/healthz")
        or "?" in cfg.echo_path
    ):
        raise ConfigError("echo_path: must be a path like /echo, other than /chat and /healthz")
    if cfg.store and not (cfg.store.startswith(_SQLITE) or cfg.store_is_postgres):
        raise ConfigError(
            f"store: {cfg.store!r} is not sqlite:///path/chatd.db or postgresql://user@host/db"
        )
    for url in cfg.bus:
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"bus: {url!r} is not a nats:// URL")
    if cfg.bus and not cfg.store_is_postgres:
        raise ConfigError("bus: the nodes of a cluster share one store: "
                          "set store = postgresql://user@host:port/db")
    if cfg.bus and not cfg.secret_file:
        raise ConfigError("secret_file: the nodes of a cluster must share one token secret: "
                          "set secret_file to a file every node reads")
    if cfg.node_id and not _NODE_ID.fullmatch(cfg.node_id):
        raise ConfigError("node_id: letters, digits, '_', '.', '-' (at most 64)")
    for origin in cfg.allowed_origins:
        if origin != "*" and "://" not in origin:
            raise ConfigError(
                f"allowed_origins: {origin!r} is not an origin (scheme://host[:port]) or *"
            )
    return cfg


_FIELDS = {f.name for f in dataclasses.fields(Config)}


def load(
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the ``Config``: defaults < TOML ``file`` < ``env`` < ``flags``.

    ``file`` may also come from ``CHATD_CONFIG``. ``flags`` holds only the
    flags the user gave (``None`` values are ignored).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = file or env.get(ENV_PREFIX + "CONFIG") or None
    if file is not None:
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config file {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
        for key, value in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {file}: unknown key {key!r}")
            values[key] = _coerce(key, value, from_text=False)
    for key in _FIELDS:
        text = env.get(ENV_PREFIX + key.upper())
        if text is not None:
            values[key] = _coerce(key, text, from_text=True)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value, from_text=isinstance(value, str))
    return _check(Config(**values))
