"""Tokens, the server secret and password hashes."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd import auth
from chatd.auth import TokenChecker, issue_token
from chatd.errors import AuthError

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
NOW = 1_700_000_000.0


def refused(checker: TokenChecker, token: str, uid: int | None = None,
            now: float | None = NOW) -> str:
    with pytest.raises(AuthError) as info:
        checker.check(token, uid, now=now)
    return str(info.value)


def test_issued_token_is_accepted_for_its_uid() -> None:
    token = issue_token(SECRET, 42, 0, ttl_s=60, now=NOW)
    checker = TokenChecker(SECRET)
    assert checker.check(token, 42, now=NOW) == 42
    assert checker.check(token, now=NOW + 59) == 42


def test_token_is_url_safe() -> None:
    token = issue_token(SECRET, 2**40, 7, now=NOW)
    assert all(c.isalnum() or c in "-_." for c in token)
    assert token.count(".") == 3


def test_expired_token_is_refused() -> None:
    token = issue_token(SECRET, 1, 0, ttl_s=60, now=NOW)
    assert "expired" in refused(TokenChecker(SECRET), token, 1, now=NOW + 61)


def test_token_for_another_uid_is_refused() -> None:
    token = issue_token(SECRET, 1, 0, now=NOW)
    assert "another user" in refused(TokenChecker(SECRET), token, 2)


@pytest.mark.parametrize("token", ["", "abc", "1.2.3", "1.2.3.4.5", "....", "1.2.3."])
def test_malformed_token_is_refused(token: str) -> None:
    refused(TokenChecker(SECRET), token, 1)


def test_token_signed_with_another_secret_is_refused() -> None:
    token = issue_token(OTHER_SECRET, 1, 0, now=NOW)
    assert "signature" in refused(TokenChecker(SECRET), token, 1)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_tampered_token_is_refused(part: int) -> None:
    pieces = issue_token(SECRET, 5, 0, ttl_s=60, now=NOW).split(".")
    pieces[part] = str(int(pieces[part]) + 1000)
    refused(TokenChecker(SECRET), ".".join(pieces), None)


def test_revoke_refuses_older_versions_only() -> None:
    checker = TokenChecker(SECRET)
    old = issue_token(SECRET, 9, 0, now=NOW)
    new = issue_token(SECRET, 9, 1, now=NOW)
    other = issue_token(SECRET, 10, 0, now=NOW)
    checker.revoke(9, 1)
    assert "revoked" in refused(checker, old, 9)
    assert checker.check(new, 9, now=NOW) == 9
    assert checker.check(other, 10, now=NOW) == 10
    checker.revoke(9, 0)  # a lower version never un-revokes
    refused(checker, old, 9)


def test_versions_given_at_start_revoke() -> None:
    checker = TokenChecker(SECRET, {9: 2})
    refused(checker, issue_token(SECRET, 9, 1, now=NOW), 9)
    assert checker.check(issue_token(SECRET, 9, 2, now=NOW), 9, now=NOW) == 9


@given(st.text(max_size=80))
def test_arbitrary_text_is_refused_with_auth_error(token: str) -> None:
    with pytest.raises(AuthError):
        TokenChecker(SECRET).check(token, None, now=NOW)


@given(st.text(alphabet="0123456789abc-_ ", max_size=12), st.text(max_size=12),
       st.text(max_size=12))
def test_signed_but_non_numeric_fields_give_auth_error(uid: str, exp: str, ver: str) -> None:
    """``check`` returns the uid or raises AuthError, even for a body that
    the secret signed but that is not three integers."""
    body = f"{uid}.{exp}.{ver}"
    if body.count(".") != 2 or not body.isascii():
        return
    token = f"{body}.{auth._sign(SECRET, body)}"
    try:
        got = TokenChecker(SECRET).check(token, None, now=0)
    except AuthError:
        return
    assert isinstance(got, int)


def test_secret_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    secret = auth.load_or_create_secret(tmp_path)
    assert len(secret) >= auth.SECRET_BYTES
    mode = stat.S_IMODE(os.stat(tmp_path / "secret").st_mode)
    assert mode == 0o600
    assert auth.load_or_create_secret(tmp_path) == secret


def test_short_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"short")
    with pytest.raises(AuthError):
        auth.load_or_create_secret(tmp_path)


def test_tokens_survive_a_new_checker_with_the_stored_secret(tmp_path: Path) -> None:
    token = issue_token(auth.load_or_create_secret(tmp_path), 3, 0)
    assert TokenChecker(auth.load_or_create_secret(tmp_path)).check(token, 3) == 3
    expiry = int(token.split(".")[1])
    assert expiry > time.time()  # issued with a lifetime ahead of it


def test_password_hash_and_verify() -> None:
    hashed = auth.hash_password("correct horse")
    assert hashed.startswith("scrypt$") and "correct horse" not in hashed
    assert auth.verify_password("correct horse", hashed)
    assert not auth.verify_password("wrong", hashed)
    assert auth.hash_password("correct horse") != hashed  # salted


@pytest.mark.parametrize("stored", ["", "plain", "md5$x$y$z$a$b", "scrypt$x$8$1$AA$BB",
                                    "scrypt$16384$8$1$!!$BB"])
def test_verify_against_garbage_hash_is_false(stored: str) -> None:
    assert auth.verify_password("pw", stored) is False
