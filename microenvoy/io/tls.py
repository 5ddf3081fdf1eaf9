"""TLS contexts for upstream connections (client) and downstream TCP listeners (server), from config.

Certificates and keys come from ``DataSource`` values. ``ssl`` can load a certificate chain and key only from
files, so inline material is written to a private temporary file (mode 0600 in a 0700 directory), loaded and
deleted at once; CA bundles load from memory (``cadata``).

Verification policy (upstream): the peer certificate is always verified, against ``trusted_ca`` when set,
otherwise against the system's default CA store (stricter than Envoy, which skips verification without a
validation context). The host name is checked against ``sni`` when one is set; ``match_subject_alt_names``
is checked after the handshake with ``check_subject_alt_names``.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from typing import Any

from microenvoy.config.model import (
    CommonTlsContext,
    DataSource,
    DownstreamTlsContext,
    StringMatcher,
    UpstreamTlsContext,
)

__all__ = [
    "check_subject_alt_names",
    "client_context",
    "match_string",
    "peer_sans",
    "server_context",
]

_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS_AUTO": ssl.TLSVersion.MINIMUM_SUPPORTED,
    "TLSv1_0": ssl.TLSVersion.TLSv1,
    "TLSv1_1": ssl.TLSVersion.TLSv1_1,
    "TLSv1_2": ssl.TLSVersion.TLSv1_2,
    "TLSv1_3": ssl.TLSVersion.TLSv1_3,
}


def _version(name: str, *, maximum: bool) -> ssl.TLSVersion:
    if name == "TLS_AUTO":
        return ssl.TLSVersion.MAXIMUM_SUPPORTED if maximum else ssl.TLSVersion.TLSv1_2
    try:
        return _VERSIONS[name]
    except KeyError:
        raise ValueError(f"unknown TLS protocol version {name!r}") from None


def _apply_common(sslctx: ssl.SSLContext, common: CommonTlsContext, alpn: Sequence[str]) -> None:
    sslctx.minimum_version = _version(common.tls_minimum_protocol_version, maximum=False)
    sslctx.maximum_version = _version(common.tls_maximum_protocol_version, maximum=True)
    protocols = list(common.alpn_protocols) or list(alpn)
    if protocols:
        sslctx.set_alpn_protocols(protocols)
    for cert in common.tls_certificates[:1]:
        _load_cert_chain(sslctx, cert.certificate_chain, cert.private_key)
    if common.trusted_ca is not None:
        _load_ca(sslctx, common.trusted_ca)


def _load_ca(sslctx: ssl.SSLContext, ca: DataSource) -> None:
    if ca.inline is not None:
        sslctx.load_verify_locations(cadata=ca.inline.decode("ascii", "replace"))
    else:
        assert ca.filename is not None
        sslctx.load_verify_locations(cafile=ca.filename)


def _load_cert_chain(sslctx: ssl.SSLContext, chain: DataSource, key: DataSource) -> None:
    if chain.inline is None and key.inline is None:
        assert chain.filename is not None
        assert key.filename is not None
        sslctx.load_cert_chain(chain.filename, key.filename)
        return
    with tempfile.TemporaryDirectory(prefix="microenvoy-tls-") as tmp:  # created 0700
        paths = []
        for i, src in enumerate((chain, key)):
            if src.inline is None:
                assert src.filename is not None
                paths.append(src.filename)
                continue
            path = os.path.join(tmp, f"m{i}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, src.inline)
            finally:
                os.close(fd)
            paths.append(path)
        try:
            sslctx.load_cert_chain(paths[0], paths[1])
        finally:
            for p in paths:
                if p.startswith(tmp):
                    os.unlink(p)


def client_context(ctx: UpstreamTlsContext, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """An ``SSLContext`` for connecting to an upstream (pass ``server_hostname=ctx.sni or None``).

    ``alpn`` is what the cluster's protocol needs (``["h2"]`` or ``["http/1.1"]``) unless the config names
    ``alpn_protocols`` itself.
    """
    sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sslctx.verify_mode = ssl.CERT_REQUIRED
    sslctx.check_hostname = bool(ctx.sni)
    common = ctx.common_tls_context
    if common.trusted_ca is None:
        sslctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _apply_common(sslctx, common, alpn)
    return sslctx


def server_context(ctx: DownstreamTlsContext, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """An ``SSLContext`` for a TLS listener: certificate chain + key, ALPN, optional client certificates.

    ``require_client_certificate`` makes client certificates mandatory (verified against ``trusted_ca``);
    with only ``trusted_ca`` set, a client certificate is requested and verified when offered.
    """
    common = ctx.common_tls_context
    if not common.tls_certificates:
        raise ValueError("a downstream TLS context needs tls_certificates")
    sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_common(sslctx, common, alpn)
    if ctx.require_client_certificate:
        if common.trusted_ca is None:
            raise ValueError("require_client_certificate needs validation_context.trusted_ca")
        sslctx.verify_mode = ssl.CERT_REQUIRED
    elif common.trusted_ca is not None:
        sslctx.verify_mode = ssl.CERT_OPTIONAL
    return sslctx


def peer_sans(ssl_object: Any) -> tuple[str, ...]:
    """DNS and URI subject alternative names of the verified peer certificate (``()`` when none).

    ``ssl_object`` is an ``ssl.SSLObject``/``ssl.SSLSocket`` (``transport.get_extra_info("ssl_object")``);
    an unverified certificate yields nothing because ``getpeercert()`` is empty then.
    """
    if ssl_object is None:
        return ()
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):
        return ()
    if not cert:
        return ()
    return tuple(str(v) for kind, v in cert.get("subjectAltName", ()) if kind in ("DNS", "URI"))


def match_string(matcher: StringMatcher, value: str) -> bool:
    """Envoy's StringMatcher semantics (exact / prefix / suffix / contains / safe_regex full match)."""
    pattern, subject = matcher.value, value
    if matcher.ignore_case and matcher.kind != "safe_regex":
        pattern, subject = pattern.lower(), subject.lower()
    if matcher.kind == "exact":
        return subject == pattern
    if matcher.kind == "prefix":
        return subject.startswith(pattern)
    if matcher.kind == "suffix":
        return subject.endswith(pattern)
    if matcher.kind == "contains":
        return pattern in subject
    if matcher.kind == "safe_regex":
        flags = re.IGNORECASE if matcher.ignore_case else 0
        return re.fullmatch(pattern, value, flags) is not None
    return False


def check_subject_alt_names(ssl_object: Any, matchers: Sequence[StringMatcher]) -> bool:
    """True when no matchers are configured or one SAN of the peer matches one matcher."""
    if not matchers:
        return True
    return any(match_string(m, san) for san in peer_sans(ssl_object) for m in matchers)
