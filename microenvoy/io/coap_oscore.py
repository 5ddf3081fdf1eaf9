"""OSCORE (RFC 8613) for the CoAP front, server side, with aiocoap's security-context crypto.

The front calls, per datagram it has decoded (and deduplicated: a retransmission answered from the
deduplication cache must not reach ``unprotect``, or it is a replay)::

    if oscore.is_protected(msg):
        try:
            req = oscore.unprotect(msg)            # OscoreRequest: .inner is routed like a plain request
        except OscoreError as err:                 # never routed: answer err.to_message(msg), count err.stat
            ...
        ...
        outer = oscore.protect(req, response)      # 2.04/2.05 + OSCORE option + ciphertext; keep req's token
    elif oscore.require:
        err = oscore.plain_refusal()               # 4.01, stat oscore_required

Theory of operation
-------------------
* One in-memory aiocoap security context per configured device (``_ServerContext``: aiocoap's
  ``CanProtect``/``CanUnprotect``/``SecurityContextUtils`` mixins, as its own ``FilesystemSecurityContext``),
  keys derived at start from master secret and salt (RFC 8613 §3.2), looked up by (kid, kid context).
* Replay protection (§7.4) is aiocoap's ``ReplayWindow``. The window cannot be known after a restart, so it
  starts uninitialized and the first request of each device is answered with a *protected* 4.01 carrying
  an Echo option (Appendix B.1.2, aiocoap's ``echo_recovery``): the server uses its own Partial IV for it
  and the client repeats the request with the Echo value, which initializes the window. (The Echo option is
  Class E: an unprotected 4.01 could not carry it to an OSCORE client, so this one error *is* protected.)
  Only a context that has never been used (``state_dir`` set and no state file yet) starts with an empty
  window.
* The agent's own sequence numbers (used for the Echo response and for Observe notifications) must never
  repeat under one key. With ``state_dir`` they are persisted in chunks as in Appendix B.1.1 (a restart
  continues after the last persisted bound); without it every start picks a random point in the first half
  of the 40-bit space, which makes a repetition unlikely but not impossible (a WARNING says so).
* Failures map as aiocoap's own OSCORE server does (RFC 8613 §8.2): unknown context 4.01 "Security context
  not found", undecodable option/COSE 4.02, decryption failure 4.00, replay 4.01 "Replay detected" with
  Max-Age 0, outer method other than POST/FETCH 4.05. These answers are plain (unprotected) CoAP. For a
  non-confirmable request aiocoap answers nothing; the front may do the same.
* Outer blockwise (Block options outside the OSCORE ciphertext) is not supported: OSCORE clients (aiocoap
  included) do blockwise inside the protection, which the front sees in ``inner``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import Any

import aiocoap  # type: ignore[import-untyped]
from aiocoap import error as coap_error
from aiocoap import oscore

from microenvoy.codecs.coap.message import (
    CoapFormatError,
    Message,
    Opt,
    decode,
    encode,
    encode_uint,
    sort_options,
)
from microenvoy.config.coap_oscore import HKDF_HASHES, OscoreConfig, OscoreContextConfig

__all__ = ["OscoreError", "OscoreRequest", "OscoreServer", "OscoreStateError"]

log = logging.getLogger(__name__)

_POST, _FETCH = 2, 5
_UNAUTHORIZED, _BAD_REQUEST, _BAD_OPTION, _METHOD_NOT_ALLOWED = 0x81, 0x80, 0x82, 0x85
_SERVICE_UNAVAILABLE = 0xA3
_OUTER_U = frozenset({Opt.URI_HOST, Opt.URI_PORT, Opt.PROXY_URI, Opt.PROXY_SCHEME})
"""Class U request options (RFC 8613 §4.1) the inner request takes from the outer message."""
_SEQNO_CHUNK = 1024
"""Sender sequence numbers reserved per write of the state file (Appendix B.1.1's K)."""
_RANDOM_START_SPACE = 2**39
"""Without persisted state, a context's first sequence number is random below this (half of 2**40)."""


class OscoreError(Exception):
    """An OSCORE request that cannot be processed; answer it with ``code``/``options``/``payload``.

    ``stat`` names the counter (``oscore_unknown_context``, ``oscore_decode_failed``,
    ``oscore_decrypt_failed``, ``oscore_replay``, ``oscore_method``, ``oscore_required``). ``protected`` is
    True only for the Echo recovery answer (Appendix B.1.2): then code/options/payload are an OSCORE outer
    message (2.04 or 2.05 + OSCORE option + ciphertext around the inner 4.01 + Echo), sent with the
    request's token like any response.
    """

    def __init__(
        self,
        code: int,
        stat: str,
        payload: bytes = b"",
        options: list[tuple[int, bytes]] | None = None,
        *,
        protected: bool = False,
    ) -> None:
        super().__init__(f"{stat}: {payload.decode('ascii', 'replace') or code}")
        self.code = code
        self.stat = stat
        self.payload = payload
        self.options: list[tuple[int, bytes]] = options or []
        self.protected = protected

    def to_message(self, request: Message) -> Message:
        """The answer as a Message carrying ``request``'s token, mid and a type mirroring it (ACK for CON,
        NON for NON; the caller picks a fresh mid for a NON answer)."""
        return Message(
            2 if request.mtype == 0 else 1,
            self.code,
            request.mid,
            request.token,
            sort_options(self.options),
            self.payload,
        )


class OscoreStateError(Exception):
    """The persisted sequence-number state of a context cannot be read or written (startup fails)."""


@dataclass(slots=True, repr=False)
class OscoreRequest:
    """An unprotected request: ``inner`` is routed; the rest is needed to protect its response(s)."""

    inner: Message
    """The decrypted request: inner code, Class E options plus the outer Uri-Host/Uri-Port/Proxy-*,
    payload; the outer token, message id and type."""
    principal: str
    """The context's configured name (the authenticated device)."""
    kid: bytes
    """The device's Sender ID as it appeared in the request."""
    _context: Any = field(default=None)
    _request_id: Any = field(default=None)

    def __repr__(self) -> str:
        return f"<OscoreRequest {self.principal} kid={self.kid.hex()} {self.inner!r}>"


class OscoreServer:
    """The configured OSCORE security contexts of one CoAP listener (server role)."""

    def __init__(self, config: OscoreConfig) -> None:
        self.require = config.require
        """Plain requests are refused (``plain_refusal``)."""
        self._by_id: dict[tuple[bytes, bytes | None], _ServerContext] = {}
        self._failures: dict[str, int] = {}
        for cfg in config.contexts:
            ctx = _ServerContext(cfg, config.state_dir)
            self._by_id[(cfg.recipient_id, cfg.id_context)] = ctx
        if config.contexts and not config.state_dir:
            log.warning(
                "OSCORE: no state_dir, so the agent's sender sequence numbers start at a random point on "
                "each start (RFC 8613 Appendix B.1.1 wants them persisted); set oscore.state_dir"
            )

    # -- requests ----------------------------------------------------------------------------------
    @staticmethod
    def is_protected(msg: Message) -> bool:
        """The message carries the OSCORE option."""
        return msg.has(Opt.OSCORE)

    def plain_refusal(self) -> OscoreError:
        """The answer to a plain request when ``require`` is set: 4.01 Unauthorized."""
        return OscoreError(_UNAUTHORIZED, "oscore_required", b"OSCORE required")

    def unprotect(self, msg: Message) -> OscoreRequest:
        """Verify and decrypt an OSCORE request (RFC 8613 §8.2); raises ``OscoreError`` on any failure."""
        if msg.code not in (_POST, _FETCH):
            raise self._fail(OscoreError(_METHOD_NOT_ALLOWED, "oscore_method"), None, "outer method")
        try:
            outer = aiocoap.Message.decode(encode(msg))
            unprotected_bag = oscore.verify_start(outer)
        except (coap_error.Error, ValueError, IndexError) as exc:
            raise self._fail(
                OscoreError(_BAD_OPTION, "oscore_decode_failed", b"Failed to decode COSE"), None, str(exc)
            ) from None
        if oscore.COSE_COUNTERSIGNATURE0 in unprotected_bag:  # Group OSCORE flag: not for these contexts
            err = OscoreError(_BAD_OPTION, "oscore_decode_failed", b"Failed to decode COSE")
            raise self._fail(err, None, "group flag set")
        kid = unprotected_bag.get(oscore.COSE_KID)
        ctx = (
            self._by_id.get((kid, unprotected_bag.get(oscore.COSE_KID_CONTEXT))) if kid is not None else None
        )
        if ctx is None:
            err = OscoreError(_UNAUTHORIZED, "oscore_unknown_context", b"Security context not found")
            raise self._fail(err, None, f"kid {kid.hex() if kid is not None else '(none)'}")
        ctx.last_plaintext = b""
        try:
            _, request_id = ctx.unprotect(outer)
        except oscore.ReplayErrorWithEcho as exc:
            raise self._fail(_echo_answer(exc), ctx, "replay window uninitialized, Echo sent") from None
        except oscore.ReplayError:
            err = OscoreError(_UNAUTHORIZED, "oscore_replay", b"Replay detected", [(Opt.MAX_AGE, b"")])
            raise self._fail(err, ctx, "sequence number already seen") from None
        except oscore.DecodeError as exc:
            err = OscoreError(_BAD_OPTION, "oscore_decode_failed", b"Failed to decode COSE")
            raise self._fail(err, ctx, str(exc)) from None
        except oscore.ProtectionInvalid as exc:
            err = OscoreError(_BAD_REQUEST, "oscore_decrypt_failed", b"Decryption failed")
            raise self._fail(err, ctx, str(exc)) from None
        except (coap_error.Error, ValueError) as exc:  # the authenticated plaintext is not CoAP
            err = OscoreError(_BAD_OPTION, "oscore_decode_failed", b"Failed to decode inner message")
            raise self._fail(err, ctx, str(exc)) from None
        inner = self._inner(msg, ctx)
        return OscoreRequest(inner, ctx.name, kid, ctx, request_id)

    def _inner(self, outer: Message, ctx: _ServerContext) -> Message:
        """The inner request as our Message, from the plaintext aiocoap authenticated (§8.2 step 7)."""
        plaintext = ctx.last_plaintext
        head = bytes(
            (0x40 | (outer.mtype << 4) | len(outer.token), plaintext[0], outer.mid >> 8, outer.mid & 0xFF)
        )
        try:
            dec = decode(head + outer.token + plaintext[1:])
        except CoapFormatError as exc:
            err = OscoreError(_BAD_OPTION, "oscore_decode_failed", b"Failed to decode inner message")
            raise self._fail(err, ctx, exc.args[0] if exc.args else "inner message") from None
        options = [
            (n, v)
            for n, v in dec.options
            if not (n == Opt.ECHO and v == ctx.echo_recovery) and n not in _OUTER_U
        ]
        options += [(n, v) for n, v in outer.options if n in _OUTER_U]
        if not dec.has(Opt.OBSERVE) and outer.has(Opt.OBSERVE):
            options.append((Opt.OBSERVE, outer.opt(Opt.OBSERVE) or b""))
        return Message(outer.mtype, dec.code, outer.mid, outer.token, sort_options(options), dec.payload)

    # -- responses ---------------------------------------------------------------------------------
    def protect(self, req: OscoreRequest, response: Message, *, observe: bool = False) -> Message:
        """Protect ``response`` (its code, options, payload) for ``req``'s device (RFC 8613 §8.3).

        The result is the outer message: 2.04 Changed (2.05 Content for a FETCH request), the OSCORE
        option, the ciphertext, and Observe when the inner response has one; its token, mid and type are the
        request's (the caller adjusts mid/type). The first response of a request reuses the request's nonce;
        later ones (and every one with ``observe=True``, which notifications must use, §4.1.3.5) carry a
        fresh Partial IV from the agent's sequence number. Raises ``OscoreError`` (5.03,
        ``oscore_context_unavailable``) when the context cannot send (sequence numbers exhausted, or the
        state file cannot be written); answer the request with it, unprotected.
        """
        ctx: _ServerContext = req._context
        request_id = req._request_id
        if observe:
            request_id.can_reuse_nonce = False
        plain = aiocoap.Message(code=response.code, payload=response.payload)
        if response.options:
            plain.opt.decode(encode(Message(0, response.code, options=response.options))[4:])
        try:
            outer, _ = ctx.protect(plain, request_id)
        except oscore.ContextUnavailable as exc:
            err = OscoreError(
                _SERVICE_UNAVAILABLE, "oscore_context_unavailable", b"Security context exhausted"
            )
            raise self._fail(err, ctx, str(exc)) from None
        option: bytes = outer.opt.oscore
        options: list[tuple[int, bytes]] = [(Opt.OSCORE, option)]
        if response.has(Opt.OBSERVE):
            n = option[0] & 0x7 if option else 0
            piv = int.from_bytes(option[1 : 1 + n], "big")
            options.append((Opt.OBSERVE, encode_uint(piv & 0xFFFFFF)))
        return Message(
            req.inner.mtype,
            int(outer.code),
            req.inner.mid,
            req.inner.token,
            sort_options(options),
            outer.payload,
        )

    # -- plumbing ----------------------------------------------------------------------------------
    def _fail(self, err: OscoreError, ctx: _ServerContext | None, detail: str) -> OscoreError:
        """Log a failure (1st, 2nd, 4th, 8th ... of each kind, so a flood cannot flood the log)."""
        n = self._failures.get(err.stat, 0) + 1
        self._failures[err.stat] = n
        if n & (n - 1) == 0:
            who = ctx.name if ctx is not None else "-"
            level = logging.INFO if err.protected else logging.WARNING
            log.log(level, "OSCORE %s (context %s, occurrence %d): %s", err.stat, who, n, detail)
        return err

    def __repr__(self) -> str:
        return f"<OscoreServer contexts={len(self._by_id)} require={self.require}>"


def _echo_answer(exc: Any) -> OscoreError:
    """The protected 4.01 + Echo of Appendix B.1.2 as an OscoreError (outer code/options/payload)."""
    try:
        outer = exc.to_message()
    except oscore.ContextUnavailable:
        return OscoreError(
            _UNAUTHORIZED, "oscore_replay", b"Security context exhausted", [(Opt.MAX_AGE, b"")]
        )
    return OscoreError(
        int(outer.code), "oscore_replay", outer.payload, [(Opt.OSCORE, outer.opt.oscore)], protected=True
    )


# aiocoap ships no type information: its mixins are Any to mypy.
class _ServerContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):  # type: ignore[misc]
    """One device's security context, in memory (sequence numbers optionally persisted)."""

    def __init__(self, cfg: OscoreContextConfig, state_dir: str) -> None:
        self.name = cfg.name
        self.sender_id = cfg.sender_id
        self.recipient_id = cfg.recipient_id
        self.id_context = cfg.id_context
        self.alg_aead = oscore.algorithms[cfg.algorithm]
        self.hashfun = oscore.hashfunctions[HKDF_HASHES[cfg.hkdf]]
        self.derive_keys(cfg.master_salt, cfg.master_secret)
        self.recipient_replay_window = oscore.ReplayWindow(cfg.replay_window, lambda: None)
        self.echo_recovery = secrets.token_bytes(8)
        self.last_plaintext = b""
        self._state_path = ""
        self._persisted = 0
        if not state_dir:
            self.sender_sequence_number = secrets.randbelow(_RANDOM_START_SPACE)
            return
        sid, rid = cfg.sender_id.hex(), cfg.recipient_id.hex()
        ctxid = "none" if cfg.id_context is None else cfg.id_context.hex()
        self._state_path = os.path.join(state_dir, f"oscore-s{sid}-r{rid}-c{ctxid}.json")
        try:
            with open(self._state_path, encoding="utf-8") as f:
                start = json.load(f)["next-to-send"]
            if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= oscore.MAX_SEQNO:
                raise ValueError(f"bad next-to-send {start!r}")
        except FileNotFoundError:
            start = 0
            self.recipient_replay_window.initialize_empty()  # a context never used before
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OscoreStateError(f"OSCORE context {cfg.name}: {self._state_path}: {exc}") from None
        self.sender_sequence_number = start
        self._persisted = start
        self._reserve()

    def _reserve(self) -> None:
        """Persist a new upper bound for the sender sequence number before any number below it is used."""
        bound = min(self.sender_sequence_number + _SEQNO_CHUNK, oscore.MAX_SEQNO)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self._state_path), prefix=".oscore-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"next-to-send": bound}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._state_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OscoreStateError(f"OSCORE context {self.name}: {self._state_path}: {exc}") from None
        self._persisted = bound

    # aiocoap hooks
    def post_seqnoincrease(self) -> None:
        if self._state_path and self.sender_sequence_number >= self._persisted:
            try:
                self._reserve()
            except OscoreStateError as exc:
                # The number just taken is not covered by the persisted bound: a restart could use it again.
                self.sender_sequence_number = oscore.MAX_SEQNO
                log.error("%s; the context stops sending until restarted", exc)
                raise oscore.ContextUnavailable(str(exc)) from None

    def _post_decrypt_checks(
        self, aad: bytes, plaintext: bytes, protected_message: Any, request_id: Any
    ) -> None:
        self.last_plaintext = plaintext

    def __repr__(self) -> str:
        return f"<_ServerContext {self.name} rid={self.recipient_id.hex()} seq={self.sender_sequence_number}>"
