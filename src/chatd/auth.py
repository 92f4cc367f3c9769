"""Tokens, passwords and the server secret.

A token is ``UID.EXPIRY.VERSION.SIGNATURE``: the user id, the expiry in unix
seconds, the user's token version, and an HMAC-SHA256 over the first three
(base64url, no padding). Every character is URL-safe, so a token travels in
the query string as it is. Checking one needs the secret and, for revocation,
the user's current token version; no database round trip: the shard keeps the
versions of users who ever revoked in memory (see ``TokenChecker``).

Passwords are hashed with scrypt (``scrypt$N$r$p$salt$hash``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from chatd.errors import AuthError

SECRET_BYTES = 32
DEFAULT_TOKEN_TTL_S = 30 * 24 * 3600
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def load_or_create_secret(data_dir: Path) -> bytes:
    """Read the server secret from ``data_dir/secret``, creating it (mode 0600)."""
    path = data_dir / "secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < SECRET_BYTES:
            raise AuthError(f"{path} is shorter than {SECRET_BYTES} bytes") from None
        return secret
    secret = secrets.token_bytes(SECRET_BYTES)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def read_secret(path: Path) -> bytes:
    """The token secret shared by a cluster's nodes (``secret_file``): it must
    exist, so that no node makes a secret of its own by mistake."""
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise AuthError(
            f"secret_file {path} does not exist: make it once "
            f"(head -c 32 /dev/urandom > {path}; chmod 600 {path}) and give every node a copy"
        ) from None
    except OSError as exc:
        raise AuthError(f"secret_file {path}: {exc.strerror}") from None
    if len(secret) < SECRET_BYTES:
        raise AuthError(f"{path} is shorter than {SECRET_BYTES} bytes")
    return secret


def node_secret(data_dir: Path, secret_file: str = "") -> bytes:
    """The token secret of a node: ``secret_file`` if set, else ``data_dir/secret``."""
    if secret_file:
        return read_secret(Path(secret_file))
    return load_or_create_secret(data_dir)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _sign(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, body.encode("ascii"), hashlib.sha256).digest())


def issue_token(
    secret: bytes,
    uid: int,
    version: int,
    ttl_s: int = DEFAULT_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """A signed token for ``uid`` at token ``version``, valid for ``ttl_s``."""
    expiry = int(now if now is not None else time.time()) + ttl_s
    body = f"{uid}.{expiry}.{version}"
    return f"{body}.{_sign(secret, body)}"


class TokenChecker:
    """Verifies tokens in constant time against the secret and revocations.

    ``versions`` maps uid to the user's current token version for every user
    whose version is above 0 (i.e. who revoked at least once); a token carrying
    an older version is revoked.
    """

    def __init__(self, secret: bytes, versions: dict[int, int] | None = None) -> None:
        self._secret = secret
        self.versions: dict[int, int] = dict(versions or {})
        #: banned users: the shard refuses their handshakes (``check`` does not look)
        self.banned: set[int] = set()

    def revoke(self, uid: int, version: int) -> None:
        """Record that tokens of ``uid`` below ``version`` are no longer valid."""
        if version > self.versions.get(uid, 0):
            self.versions[uid] = version

    def check(self, token: str, uid: int | None = None, now: float | None = None) -> int:
        """Return the token's uid, or raise ``AuthError`` saying why not."""
        return self.verify(token, uid, now)[0]

    def verify(
        self, token: str, uid: int | None = None, now: float | None = None
    ) -> tuple[int, int]:
        """The token's (uid, version), or ``AuthError`` saying why not."""
        parts = token.split(".")
        if len(parts) != 4:
            raise AuthError("malformed token")
        body = f"{parts[0]}.{parts[1]}.{parts[2]}"
        if not body.isascii() or not hmac.compare_digest(
            _sign(self._secret, body).encode(), parts[3].encode("ascii", "replace")
        ):
            raise AuthError("bad signature")
        try:
            token_uid, expiry, version = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            raise AuthError("malformed token") from None
        if uid is not None and uid != token_uid:
            raise AuthError("token is for another user")
        if expiry < (now if now is not None else time.time()):
            raise AuthError("token expired")
        if version < self.versions.get(token_uid, 0):
            raise AuthError("token revoked")
        return token_uid, version


def hash_password(password: str) -> str:
    """scrypt hash of ``password`` with a random salt, as one string."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a hash made by ``hash_password``."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        pad = "=" * (-len(salt) % 4)
        raw_salt = base64.urlsafe_b64decode(salt + pad)
        got = hashlib.scrypt(password.encode(), salt=raw_salt, n=int(n), r=int(r), p=int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(_b64(got), digest)
