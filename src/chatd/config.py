"""Configuration: one ``Config`` built from defaults, a TOML file, ``CHATD_*``
environment variables and command-line flags, in that order of precedence
(a flag beats the environment, which beats the file).

Keys are the field names below; in the environment they are upper-cased with a
``CHATD_`` prefix (``chat_port`` -> ``CHATD_CHAT_PORT``). Unknown keys and values
of the wrong type are refused with a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatd.errors import ConfigError

ENV_PREFIX = "CHATD_"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a chatd node. Units are in the names."""

    host: str = "0.0.0.0"
    chat_port: int = 8080
    api_port: int = 8081
    data_dir: str = "./data"
    log_level: str = "info"
    #: connections one shard accepts; past it the upgrade gets 503 + Retry-After
    max_conns: int = 100_000
    #: largest websocket frame (or reassembled message) accepted; past it, close 1009
    max_frame_bytes: int = 65_536
    #: per-connection token bucket; rate_limit=false switches it off (the bench does)
    rate_limit: bool = True
    rate_per_s: float = 300.0
    rate_burst: int = 600
    #: the seed client beats every 30 s; silence this long closes the connection
    idle_timeout_s: float = 75.0
    #: unsent bytes on one connection past which it is closed as a slow consumer
    slow_consumer_bytes: int = 262_144
    #: SIGTERM: time to commit queued messages and close clients before exiting
    drain_timeout_s: float = 10.0
    #: messages per page when a client syncs
    sync_page: int = 500
    #: most messages in one store transaction
    batch_max: int = 2048
    #: messages waiting for the store past which new ones are refused (503 error frame)
    queue_max: int = 100_000
    #: SQLite synchronous mode for messages: NORMAL survives process crashes, FULL power loss
    db_synchronous: str = "NORMAL"
    token_ttl_s: int = 30 * 24 * 3600

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_path / "chatd.db"


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, from_text: bool) -> Any:
    kind = type(getattr(Config, key))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def _check(cfg: Config) -> Config:
    for key in ("chat_port", "api_port"):
        if not 0 <= getattr(cfg, key) <= 65535:
            raise ConfigError(f"{key}: {getattr(cfg, key)} is not a TCP port")
    for key in (
        "max_conns",
        "max_frame_bytes",
        "rate_burst",
        "slow_consumer_bytes",
        "sync_page",
        "batch_max",
        "queue_max",
        "token_ttl_s",
    ):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive")
    for key in ("rate_per_s", "idle_timeout_s", "drain_timeout_s"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: must be a positive number")
    if cfg.db_synchronous.upper() not in ("NORMAL", "FULL"):
        raise ConfigError("db_synchronous: must be NORMAL or FULL")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level: must be debug, info, warning or error")
    return cfg


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
