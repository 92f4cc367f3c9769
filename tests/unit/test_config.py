"""Config: defaults < TOML file < CHATD_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd.config import Config, load
from chatd.errors import ConfigError


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chatd.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = load(env={})
    assert cfg == Config()
    assert cfg.db_path == Path("./data") / "chatd.db"


def test_file_env_and_flag_precedence(tmp_path: Path) -> None:
    path = toml(tmp_path, 'chat_port = 1111\nhost = "10.0.0.1"\nsync_page = 7\nmax_conns = 5\n')
    env = {"CHATD_CHAT_PORT": "2222", "CHATD_SYNC_PAGE": "8"}
    cfg = load(path, env=env, flags={"chat_port": 3333, "host": None})
    assert cfg.chat_port == 3333  # flag beats env and file
    assert cfg.sync_page == 8  # env beats file
    assert cfg.host == "10.0.0.1"  # a None flag is "not given"
    assert cfg.max_conns == 5  # file beats default


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_frame_bytes = 1024\n")
    assert load(env={"CHATD_CONFIG": str(path)}).max_frame_bytes == 1024


@pytest.mark.parametrize(
    "text,value",
    [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False), ("off", False)],
)
def test_bool_from_environment(text: str, value: bool) -> None:
    assert load(env={"CHATD_RATE_LIMIT": text}).rate_limit is value


def test_numbers_from_environment() -> None:
    cfg = load(env={"CHATD_MAX_CONNS": "1_000", "CHATD_IDLE_TIMEOUT_S": "2.5",
                    "CHATD_RATE_PER_S": "3"})
    assert cfg.max_conns == 1000 and cfg.idle_timeout_s == 2.5 and cfg.rate_per_s == 3.0


def test_float_key_takes_an_integer_in_toml(tmp_path: Path) -> None:
    assert load(toml(tmp_path, "idle_timeout_s = 3\n"), env={}).idle_timeout_s == 3.0


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat_prot"):
        load(toml(tmp_path, "chat_prot = 1\n"), env={})


def test_unknown_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="nope"):
        load(env={}, flags={"nope": 1})


@pytest.mark.parametrize(
    "text",
    ['chat_port = "80"', "chat_port = true", "chat_port = 1.5", "rate_limit = 1",
     'rate_limit = "yes"', "host = 5", "idle_timeout_s = true", 'idle_timeout_s = "2"',
     "max_conns = [1]"],
)
def test_wrong_type_in_file_is_refused(tmp_path: Path, text: str) -> None:
    key = text.split()[0]
    with pytest.raises(ConfigError, match=key):
        load(toml(tmp_path, text + "\n"), env={})


@pytest.mark.parametrize(
    "key,text",
    [("CHATD_CHAT_PORT", "eighty"), ("CHATD_RATE_LIMIT", "maybe"), ("CHATD_MAX_CONNS", "1.5"),
     ("CHATD_RATE_PER_S", "fast")],
)
def test_wrong_type_in_environment_is_refused(key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=key.removeprefix("CHATD_").lower()):
        load(env={key: text})


@pytest.mark.parametrize(
    "overrides",
    [{"chat_port": 70000}, {"chat_port": -1}, {"max_conns": 0}, {"max_frame_bytes": -5},
     {"rate_per_s": 0}, {"idle_timeout_s": -1}, {"sync_page": 0}, {"db_synchronous": "OFF"},
     {"log_level": "loud"}, {"max_conns_per_ip": -1}, {"handshake_timeout_s": 0},
     {"max_handshake_bytes": 100}, {"max_handshake_bytes": 20_000}, {"echo_path": "echo"},
     {"echo_path": "/chat"}, {"echo_path": "/healthz"}, {"echo_path": "/echo?x=1"}],
)
def test_out_of_range_values_are_refused(overrides: dict) -> None:
    with pytest.raises(ConfigError):
        load(env={}, flags=overrides)


@pytest.mark.parametrize("key", ["CHATD_IDLE_TIMEOUT_S", "CHATD_RATE_PER_S",
                                 "CHATD_DRAIN_TIMEOUT_S", "CHATD_HANDSHAKE_TIMEOUT_S"])
def test_nan_is_refused(key: str) -> None:
    with pytest.raises(ConfigError):
        load(env={key: "nan"})


def test_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError):
        load(toml(tmp_path, "chat_port = = 1\n"), env={})


def test_string_flags_are_parsed_like_the_environment() -> None:
    cfg = load(env={}, flags={"chat_port": "9000", "rate_limit": "false"})
    assert cfg.chat_port == 9000 and cfg.rate_limit is False


def test_handshake_limits_and_the_echo_path_from_the_environment() -> None:
    assert Config().echo_path == ""  # the echo endpoint is off unless asked for
    cfg = load(env={"CHATD_MAX_CONNS_PER_IP": "0", "CHATD_HANDSHAKE_TIMEOUT_S": "2.5",
                    "CHATD_MAX_HANDSHAKE_BYTES": "4096", "CHATD_ECHO_PATH": "/echo"})
    assert (cfg.max_conns_per_ip, cfg.handshake_timeout_s, cfg.max_handshake_bytes,
            cfg.echo_path) == (0, 2.5, 4096, "/echo")


# Settings with a fixed set of values are Literal types: msgspec.convert checks
# them like every other value, in any case, from every source.
CHOICES = [
    ("log_level", "must be debug, info, warning or error"),
    ("log_process", "must be auto, own or shard"),
    ("db_synchronous", "must be NORMAL or FULL"),
]


@pytest.mark.parametrize("key,message", CHOICES)
@pytest.mark.parametrize("bad", ["loud", "", "info level"])
def test_a_value_outside_a_settings_choices_is_refused_everywhere(
    tmp_path: Path, key: str, message: str, bad: str
) -> None:
    expected = f"^{key}: {message}$"
    with pytest.raises(ConfigError, match=expected):
        load(toml(tmp_path, f'{key} = "{bad}"\n'), env={})
    with pytest.raises(ConfigError, match=expected):
        load(env={f"CHATD_{key.upper()}": bad})
    with pytest.raises(ConfigError, match=expected):
        load(env={}, flags={key: bad})


@pytest.mark.parametrize("key,message", CHOICES)
def test_a_choice_setting_of_the_wrong_type_in_toml_is_refused(
    tmp_path: Path, key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: {message}$"):
        load(toml(tmp_path, f"{key} = 3\n"), env={})


def test_choice_settings_take_any_case_and_keep_their_own(tmp_path: Path) -> None:
    cfg = load(toml(tmp_path, 'log_level = "WARNING"\ndb_synchronous = "full"\n'),
               env={"CHATD_LOG_PROCESS": " Own "})
    assert (cfg.log_level, cfg.db_synchronous, cfg.log_process) == ("warning", "FULL", "own")
    cfg = load(env={}, flags={"log_level": "Debug", "db_synchronous": "Normal"})
    assert (cfg.log_level, cfg.db_synchronous) == ("debug", "NORMAL")
