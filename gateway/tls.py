"""TLS contexts: one per https upstream (private CA, client certificate, verification) and the listener's.

The config checks call `check_*` at load, so a missing file, a file that is not PEM or a key that does
not match its certificate is a config error naming the key, never a traceback at start-up. Keys must
be unencrypted PEM (OpenSSL is never let to prompt for a passphrase).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from yarl import URL

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, Upstream

_ALPN = ("http/1.1",)
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


def _no_passphrase() -> bytes:
    """Given to load_cert_chain so an encrypted key fails instead of prompting on the terminal."""
    return b""


def upstream_context(upstream: Upstream) -> ssl.SSLContext | None:
    """The context for an https upstream (None for http): its `tls` block, else the system's CAs.

    Loads files (and the system store): call it off the event loop.
    """
    if URL(upstream.url).scheme != "https":
        return None
    tls = upstream.tls
    if tls is None:
        return client_context()
    return client_context(
        ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file, verify=tls.verify
    )


def client_context(
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """Verify the server against `ca_file` only (else the system's CAs), or not at all with
    `verify=False`; present `cert_file` + `key_file` when the server asks for a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    context.set_alpn_protocols(_ALPN)
    return context


def server_name(upstream: Upstream) -> str | None:
    """The name sent as SNI and verified in the upstream's certificate, when not the URL's host."""
    return upstream.tls.server_name if upstream.tls is not None else None


def listener_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The context to serve the gateway over TLS (`listen.tls`), or None for plain HTTP.

    For `web.TCPSite(runner, host, port, ssl_context=listener_context(config))`. Loads the
    certificate and key from disk: call it before the site starts (once per process).
    """
    tls = config.listen.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    context.set_alpn_protocols(_ALPN)
    return context


# Checks for the config models: each raises ValueError with a one-line problem.


def check_readable(path: str) -> str:
    try:
        with Path(path).open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return path


def check_ca_file(path: str) -> str:
    check_readable(path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ValueError(f"{path!r} holds no PEM certificate") from None
    return path


def check_cert_file(path: str) -> str:
    return check_ca_file(path)  # at least one PEM certificate: the same test


def check_key_pair(key_file: str | None, cert_file: str | None) -> str | None:
    """Both or neither (the error is on key_file); with both, the key must be cert_file's."""
    if key_file is None and cert_file is None:
        return None
    if key_file is None:
        raise ValueError("required with cert_file (a client certificate needs its key)")
    if cert_file is None:
        raise ValueError("given without cert_file: give both or neither")
    return check_key_file(key_file, cert_file)


def check_server_name(name: str) -> str:
    """A DNS name (ASCII, punycode for IDNs) or an IP address, as SNI and certificate checks take it."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not _DNS_NAME.fullmatch(name):
            raise ValueError(f"must be a DNS name such as upstream.internal, got {name!r}") from None
    return name


def check_key_file(key_file: str, cert_file: str) -> str:
    """`key_file` is readable, an unencrypted PEM private key, and the key of `cert_file`."""
    check_readable(key_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            cert_file, key_file, password=_no_passphrase
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{key_file!r} is not the key of cert_file {cert_file!r}") from None
        raise ValueError(
            f"{key_file!r} holds no unencrypted PEM private key (encrypted keys are not supported)"
        ) from None
    return key_file
