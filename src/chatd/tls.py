"""TLS for the chat port (``wss://``) and the api port (HTTPS).

``tls_cert`` and ``tls_key`` (PEM files) turn it on for both ports of every
process. One ``ssl.SSLContext`` per process; ``reload`` reads the files again
into that same context on SIGHUP, so connections already open keep their
session and every handshake after it gets the new certificate (renewals
without a restart and without dropping anyone). The alternative, a reverse
proxy that terminates TLS, is in the README.
"""

from __future__ import annotations

import ssl

from chatd.config import Config
from chatd.errors import ConfigError


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The server context for ``cfg``'s certificate (None when TLS is off)."""
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    reload(context, cfg)
    return context


def reload(context: ssl.SSLContext, cfg: Config) -> None:
    """Read the certificate chain and key again; ``ConfigError`` if they do not load."""
    try:
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load {cfg.tls_cert}: {exc}") from None
