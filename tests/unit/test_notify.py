"""sd_notify against a real datagram socket standing in for systemd's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from chatd.notify import notify, watchdog_interval_s


def test_without_systemd_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_sends_the_state_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1\nSTATUS=0 connections") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=0 connections"


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None


def test_a_reader_that_falls_behind_never_blocks_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Datagrams queue up to net.unix.max_dgram_qlen at a reader that does not
    read; past that the send would block the supervisor's loop. It gives up
    at once instead, and sends again once the reader has read."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sent = [notify(f"STATUS={i}") for i in range(1000)]
        assert sent[0] is True and sent[-1] is False
        first_refused = sent.index(False)
        assert all(not ok for ok in sent[first_refused:])
        assert sock.recv(100) == b"STATUS=0"
        assert notify("STATUS=again") is True
