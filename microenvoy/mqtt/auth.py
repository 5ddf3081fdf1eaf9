"""MQTT authentication and authorization (sans-IO): password files, principals, topic ACLs, reason codes.

Theory of operation
-------------------
The MQTT listener asks three questions, each answered here without I/O (files are read by
``load_authenticator`` once, when the listener is built):

1. **Who is this client?** ``Authenticator.authenticate(username, password, certificate)`` returns an
   ``AuthResult``: a ``Principal`` or an ``AuthFailure`` that ``connack_refusal`` turns into the CONNACK code.
   A verified client certificate names the principal when ``principal_from_certificate`` is ``cn`` or ``san``
   (then username and password are not looked at, like mosquitto's ``use_identity_as_username``); otherwise
   username + password are checked against the password file; a client with no credentials is anonymous if
   ``allow_anonymous``. Password hashing is deliberately slow (tens of milliseconds): the listener should run
   ``authenticate`` off the event loop (``loop.run_in_executor``); it is thread-safe (no mutable state).

2. **May it publish to this topic / subscribe to this filter?** ``Acl.bind(principal, client_id)`` returns a
   ``ClientAcl`` with ``%c``/``%u`` substituted once per connection; ``can_publish(topic)``,
   ``can_subscribe(filter)`` and ``can_read(topic)`` (delivery of one message) answer. Evaluation: the rules
   that apply to a client are the ``every client`` rules plus those of its principal (or the anonymous ones);
   **a matching ``deny`` rule wins** over any allow, whatever the order; otherwise an allow rule with the
   needed access (``write`` for PUBLISH, ``read`` for SUBSCRIBE and delivery) must match; what no rule allows
   is denied. With no ACL configured at all, everything is allowed.

   A subscription filter is allowed only if an allow pattern *covers* it (every topic the filter can match,
   the pattern matches too: ``a/#`` covers ``a/+/b``, ``+/b`` does not cover ``#``) and no deny pattern covers
   it. A deny pattern that only *overlaps* an allowed subscription (deny ``a/secret/#``, subscription
   ``a/#``) cannot refuse it, so such a subscription's messages are checked one by one:
   ``ClientAcl.delivery_check_needed(filter)`` tells the broker when ``can_read(topic)`` must be asked before
   each delivery (retained messages included). ``$share/<group>/<filter>`` is checked as ``<filter>``.

3. **What goes back on the wire when the answer is no?** ``connack_refusal``, ``publish_denial`` and
   ``subscribe_denied_code`` give the MQTT 5.0 reason codes and their 3.1.1 equivalents (docs/mqtt-auth.md).

``%c``/``%u`` substitution cannot widen access: a substituted value is *unsafe* when it is empty, absent
(``%u`` of an anonymous client), contains ``+``, ``#``, ``/`` or NUL, or starts with ``$``. An allow rule
with an unsafe value does not apply at all; a deny rule with an unsafe value applies more widely (fail
closed): the level holding the placeholder becomes ``+``, or ``#`` (and the levels after it are dropped)
when the value contains ``/``.

Password file: one ``username:hash`` line per user (``#`` comments and blank lines ignored). Hashes are
PHC-style strings, base64 (standard alphabet, ``=`` padding optional)::

    $scrypt$n=16384,r=8,p=1$<salt>$<hash>           hashlib.scrypt, 32-byte key (the default scheme)
    $pbkdf2-sha256$i=600000$<salt>$<hash>           hashlib.pbkdf2_hmac("sha256"), 32-byte key

mosquitto_passwd's ``$7$<iterations>$<salt>$<hash>`` (PBKDF2-SHA512) and ``$6$<salt>$<hash>`` (one SHA-512,
weak) are accepted too, so an existing mosquitto password file works unchanged. ``hash_password`` writes
new ones (``python -m microenvoy.tools.mqtt_passwd``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from microenvoy.core.errors import ConfigError

if TYPE_CHECKING:
    from microenvoy.config.mqtt_auth import MqttAclRule, MqttAuth

__all__ = [
    "ANONYMOUS",
    "CONNACK_V3_BAD_USERNAME_OR_PASSWORD",
    "CONNACK_V3_NOT_AUTHORIZED",
    "DEFAULT_PBKDF2_ITERATIONS",
    "DEFAULT_SCHEME",
    "DEFAULT_SCRYPT_N",
    "REASON_BAD_USERNAME_OR_PASSWORD",
    "REASON_NOT_AUTHORIZED",
    "SCHEMES",
    "SUBACK_V3_FAILURE",
    "Acl",
    "AclFileRules",
    "AclRule",
    "AuthFailure",
    "AuthResult",
    "Authenticator",
    "CertificateInfo",
    "ClientAcl",
    "PasswordFile",
    "PasswordHash",
    "Principal",
    "PublishDenial",
    "certificate_info",
    "check_acl_topic",
    "connack_refusal",
    "filter_covers",
    "filters_overlap",
    "hash_password",
    "load_authenticator",
    "parse_acl_file",
    "parse_password_file",
    "publish_denial",
    "subscribe_denied_code",
    "topic_matches",
    "verify_password",
]

# ----------------------------------------------------------------------------------------- reason codes
REASON_BAD_USERNAME_OR_PASSWORD = 0x86
"""MQTT 5.0 CONNACK reason code: Bad User Name or Password."""
REASON_NOT_AUTHORIZED = 0x87
"""MQTT 5.0 reason code Not authorized (CONNACK, PUBACK, PUBREC, SUBACK)."""
CONNACK_V3_BAD_USERNAME_OR_PASSWORD = 4
"""MQTT 3.1.1 CONNACK return code: Connection Refused, bad user name or password."""
CONNACK_V3_NOT_AUTHORIZED = 5
"""MQTT 3.1.1 CONNACK return code: Connection Refused, not authorized."""
SUBACK_V3_FAILURE = 0x80
"""MQTT 3.1.1 SUBACK return code: Failure."""

# --------------------------------------------------------------------------------------------- hashing
SCHEMES = ("scrypt", "pbkdf2-sha256")
"""Schemes ``hash_password`` writes (mosquitto's ``$6$``/``$7$`` are only read)."""
DEFAULT_SCHEME = "scrypt"
DEFAULT_SCRYPT_N = 16384
"""scrypt N = 2^14, r = 8, p = 1: 16 MiB, ~80 ms per check on a desktop core (libsodium's "interactive")."""
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
DEFAULT_PBKDF2_ITERATIONS = 600_000
"""OWASP's 2023 figure for PBKDF2-HMAC-SHA256."""
_KEY_LEN = 32
_SALT_LEN = 16
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
_MAX_ITERATIONS = 100_000_000


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One decoded password hash."""

    scheme: str
    """``scrypt``, ``pbkdf2-sha256``, ``mosquitto-pbkdf2-sha512`` (``$7$``) or ``mosquitto-sha512``."""
    params: tuple[int, ...]
    """``(n, r, p)`` for scrypt, ``(iterations,)`` for the PBKDF2 schemes, ``()`` for ``$6$``."""
    salt: bytes
    digest: bytes

    @classmethod
    def decode(cls, text: str) -> PasswordHash:
        """Parse an encoded hash; raises ValueError with a short reason."""
        if not text.startswith("$"):
            raise ValueError(
                "not a password hash (expected $scheme$...; plain-text passwords are not accepted)"
            )
        parts = text.split("$")[1:]
        scheme = parts[0]
        try:
            if scheme == "scrypt" and len(parts) == 4:
                kv = _params(parts[1], ("n", "r", "p"))
                n, r, p = kv["n"], kv["r"], kv["p"]
                if n < 2 or n & (n - 1):
                    raise ValueError("scrypt n must be a power of 2 greater than 1")
                if not 1 <= r <= 64 or not 1 <= p <= 64:
                    raise ValueError("scrypt r and p must be 1..64")
                if _scrypt_memory(n, r, p) > _MAX_SCRYPT_MEMORY:
                    raise ValueError("scrypt parameters need more than 256 MiB")
                h = cls("scrypt", (n, r, p), _b64decode(parts[2]), _b64decode(parts[3]))
            elif scheme == "pbkdf2-sha256" and len(parts) == 4:
                (i,) = _params(parts[1], ("i",)).values()
                h = cls("pbkdf2-sha256", (_iterations(i),), _b64decode(parts[2]), _b64decode(parts[3]))
            elif scheme == "7" and len(parts) == 4:
                if not parts[1].isdigit():
                    raise ValueError("iterations must be a number")
                i = _iterations(int(parts[1]))
                h = cls("mosquitto-pbkdf2-sha512", (i,), _b64decode(parts[2]), _b64decode(parts[3]))
            elif scheme == "6" and len(parts) == 3:
                h = cls("mosquitto-sha512", (), _b64decode(parts[1]), _b64decode(parts[2]))
            elif scheme in ("scrypt", "pbkdf2-sha256", "7", "6"):
                raise ValueError(f"malformed ${scheme}$ hash (wrong number of fields)")
            else:
                raise ValueError(f"unknown hash scheme {scheme!r} (expected scrypt or pbkdf2-sha256)")
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("salt or hash is not valid base64") from None
        if not h.salt or not h.digest:
            raise ValueError("empty salt or hash")
        return h

    def encode(self) -> str:
        """The text form ``decode`` reads."""
        salt, digest = _b64encode(self.salt), _b64encode(self.digest)
        if self.scheme == "scrypt":
            n, r, p = self.params
            return f"$scrypt$n={n},r={r},p={p}${salt}${digest}"
        if self.scheme == "pbkdf2-sha256":
            return f"$pbkdf2-sha256$i={self.params[0]}${salt}${digest}"
        pad = base64.b64encode
        if self.scheme == "mosquitto-pbkdf2-sha512":
            return f"$7${self.params[0]}${pad(self.salt).decode()}${pad(self.digest).decode()}"
        return f"$6${pad(self.salt).decode()}${pad(self.digest).decode()}"

    def derive(self, password: bytes) -> bytes:
        """The key this hash's scheme, parameters and salt derive from ``password``."""
        if self.scheme == "scrypt":
            n, r, p = self.params
            maxmem = _scrypt_memory(n, r, p) + 1024 * 1024
            return hashlib.scrypt(
                password, salt=self.salt, n=n, r=r, p=p, dklen=len(self.digest), maxmem=maxmem
            )
        if self.scheme == "pbkdf2-sha256":
            return hashlib.pbkdf2_hmac("sha256", password, self.salt, self.params[0], len(self.digest))
        if self.scheme == "mosquitto-pbkdf2-sha512":
            return hashlib.pbkdf2_hmac("sha512", password, self.salt, self.params[0], len(self.digest))
        return hashlib.sha512(password + self.salt).digest()

    def verify(self, password: bytes) -> bool:
        """Constant-time comparison of the derived key with the stored one."""
        return hmac.compare_digest(self.derive(password), self.digest)


def _scrypt_memory(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2)


def _iterations(i: int) -> int:
    if not 1 <= i <= _MAX_ITERATIONS:
        raise ValueError(f"iterations must be 1..{_MAX_ITERATIONS}")
    return i


def _params(text: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in names or key in out or not value.isdigit() or not value.isascii():
            raise ValueError(f"parameters must be {','.join(f'{n}=<number>' for n in names)}")
        out[key] = int(value)
    if set(out) != set(names):
        raise ValueError(f"parameters must be {','.join(f'{n}=<number>' for n in names)}")
    return {n: out[n] for n in names}


def hash_password(
    password: bytes | str,
    *,
    scheme: str = DEFAULT_SCHEME,
    iterations: int = DEFAULT_PBKDF2_ITERATIONS,
    n: int = DEFAULT_SCRYPT_N,
    r: int = DEFAULT_SCRYPT_R,
    p: int = DEFAULT_SCRYPT_P,
    salt: bytes | None = None,
) -> str:
    """A new encoded hash of ``password`` (str is UTF-8 encoded) with a fresh 16-byte random salt.

    ``scheme`` is ``scrypt`` (uses ``n``, ``r``, ``p``) or ``pbkdf2-sha256`` (uses ``iterations``).
    Raises ValueError for an unknown scheme or out-of-range parameters.
    """
    pw = password.encode("utf-8") if isinstance(password, str) else password
    salt = secrets.token_bytes(_SALT_LEN) if salt is None else salt
    if scheme == "scrypt":
        params: tuple[int, ...] = (n, r, p)
        text = f"$scrypt$n={n},r={r},p={p}${_b64encode(salt)}$"
    elif scheme == "pbkdf2-sha256":
        params = (iterations,)
        text = f"$pbkdf2-sha256$i={iterations}${_b64encode(salt)}$"
    else:
        raise ValueError(f"unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    # Validate the parameters exactly as a reader of the file would.
    PasswordHash.decode(text + _b64encode(b"\0" * _KEY_LEN))
    h = PasswordHash(scheme, params, salt, b"\0" * _KEY_LEN)
    return PasswordHash(scheme, params, salt, h.derive(pw)).encode()


def verify_password(encoded: str, password: bytes | str) -> bool:
    """Whether ``password`` matches the encoded hash (constant-time); raises ValueError if malformed."""
    pw = password.encode("utf-8") if isinstance(password, str) else password
    return PasswordHash.decode(encoded).verify(pw)


# ------------------------------------------------------------------------------------------ password file
class PasswordFile:
    """The users of one password file; ``verify`` does the same work for unknown users as for known ones."""

    __slots__ = ("_dummy", "entries", "source")

    def __init__(self, entries: Mapping[str, PasswordHash], source: str = "<memory>") -> None:
        self.entries = dict(entries)
        self.source = source
        # Unknown users are checked against a random hash with the file's most common scheme and parameters,
        # so that "no such user" costs the same time as "wrong password".
        common: Counter[tuple[str, tuple[int, ...], int]] = Counter(
            (h.scheme, h.params, len(h.digest)) for h in self.entries.values()
        )
        if common:
            (scheme, params, size), _ = common.most_common(1)[0]
        else:
            scheme, params, size = (
                DEFAULT_SCHEME,
                (DEFAULT_SCRYPT_N, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P),
                _KEY_LEN,
            )
        self._dummy = PasswordHash(scheme, params, secrets.token_bytes(_SALT_LEN), secrets.token_bytes(size))

    def verify(self, username: str, password: bytes) -> bool:
        """True when ``username`` exists and ``password`` matches its hash."""
        entry = self.entries.get(username)
        if entry is None:
            self._dummy.verify(password)
            return False
        return entry.verify(password)

    def verify_nothing(self, password: bytes) -> None:
        """Spend the time of one check (used when a request is refused for another reason)."""
        self._dummy.verify(password)

    def __contains__(self, username: object) -> bool:
        return username in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"<PasswordFile {self.source} users={len(self.entries)}>"


def _collect(errors: list[str] | None) -> tuple[list[str], bool]:
    return (errors, False) if errors is not None else ([], True)


def parse_password_file(text: str, source: str = "<memory>", errors: list[str] | None = None) -> PasswordFile:
    """Parse a password file's text. Problems read ``<source>:<line>: <problem>``; they are appended to
    ``errors`` if given, else raised together as ``ConfigError``. Bad lines are skipped."""
    errs, raise_ = _collect(errors)
    start = len(errs)
    entries: dict[str, PasswordHash] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, encoded = line.partition(":")
        where = f"{source}:{lineno}"
        if not sep:
            errs.append(f"{where}: expected username:hash")
            continue
        if not username:
            errs.append(f"{where}: empty username")
            continue
        if username in entries:
            errs.append(f"{where}: duplicate user {username!r}")
            continue
        try:
            entries[username] = PasswordHash.decode(encoded)
        except ValueError as exc:
            errs.append(f"{where}: user {username!r}: {exc}")
    if raise_ and len(errs) > start:
        raise ConfigError(errs)
    return PasswordFile(entries, source)


# ---------------------------------------------------------------------------------------------- topics
_WILD = ("+", "#")


def check_acl_topic(topic: str, *, substitute: bool) -> str | None:
    """Why ``topic`` is not a valid ACL topic filter (None if it is). With ``substitute``, ``%c`` and ``%u``
    are the only ``%`` sequences allowed."""
    if not topic:
        return "must not be empty"
    if "\0" in topic:
        return "must not contain NUL"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "longer than 65535 bytes"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' must be a whole level and the last one (level {i + 1}: {level!r})"
        if "+" in level and level != "+":
            return f"'+' must be a whole level (level {i + 1}: {level!r})"
    if substitute:
        j = topic.find("%")
        while j >= 0:
            if topic[j + 1 : j + 2] not in ("c", "u"):
                return f"unknown placeholder {topic[j : j + 2]!r} (only %c and %u)"
            j = topic.find("%", j + 2)
    return None


def _levels(text: str) -> tuple[str, ...]:
    return tuple(text.split("/"))


def topic_matches(topic_filter: str | Sequence[str], topic: str | Sequence[str]) -> bool:
    """MQTT matching of a topic name against a filter (``+``, ``#``; wildcards at the first level do not
    match topics starting with ``$`` [MQTT-4.7.2-1]). Either may be given as its list of levels."""
    f = _levels(topic_filter) if isinstance(topic_filter, str) else topic_filter
    t = _levels(topic) if isinstance(topic, str) else topic
    if t[0].startswith("$") and f[0] in _WILD:
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def filter_covers(pattern: str | Sequence[str], topic_filter: str | Sequence[str]) -> bool:
    """Whether every topic ``topic_filter`` can match is matched by ``pattern`` (both topic filters)."""
    p = _levels(pattern) if isinstance(pattern, str) else pattern
    f = _levels(topic_filter) if isinstance(topic_filter, str) else topic_filter
    if p[0] in _WILD and f[0] not in _WILD and f[0].startswith("$"):
        return False  # f matches only $-topics, which a leading wildcard never matches
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(f):
            return False
        if f[i] == "#":
            # f matches the prefix followed by any levels, including none when i > 0 (the parent); only
            # '#' matches all of those, or at the first level (at least one level) also '+/#'.
            return i == 0 and level == "+" and tuple(p[1:]) == ("#",)
        if level == "+":
            continue
        if f[i] == "+" or f[i] != level:
            return False
    return len(p) == len(f)


def filters_overlap(a: str | Sequence[str], b: str | Sequence[str]) -> bool:
    """Whether some topic matches both filters."""
    x = _levels(a) if isinstance(a, str) else a
    y = _levels(b) if isinstance(b, str) else b
    if (x[0] in _WILD and y[0] not in _WILD and y[0].startswith("$")) or (
        y[0] in _WILD and x[0] not in _WILD and x[0].startswith("$")
    ):
        return False
    for i in range(max(len(x), len(y))):
        u = x[i] if i < len(x) else None
        v = y[i] if i < len(y) else None
        if u == "#" or v == "#":
            return True
        if u is None or v is None:
            return False
        if u != "+" and v != "+" and u != v:
            return False
    return True


def _valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic


def _valid_filter(topic_filter: str) -> bool:
    return check_acl_topic(topic_filter, substitute=False) is None


# ------------------------------------------------------------------------------------------------- ACLs
ACCESS_READ = 1
ACCESS_WRITE = 2
_ACCESS = {"read": ACCESS_READ, "write": ACCESS_WRITE, "readwrite": ACCESS_READ | ACCESS_WRITE, "deny": 0}


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ACL rule as the authorizer uses it."""

    access: str
    """``read``, ``write``, ``readwrite`` or ``deny``."""
    topic: str
    """Topic filter pattern."""
    substitute: bool = True
    """Replace ``%c``/``%u`` (inline rules and mosquitto ``pattern`` lines; not mosquitto ``topic`` lines)."""


@dataclass(frozen=True, slots=True)
class AclFileRules:
    """The rules of one ACL file, by whom they apply to."""

    everyone: tuple[AclRule, ...] = ()
    """``pattern`` lines: every client."""
    anonymous: tuple[AclRule, ...] = ()
    """``topic`` lines before the first ``user`` line: anonymous clients."""
    users: Mapping[str, tuple[AclRule, ...]] = field(default_factory=dict)
    """``topic`` lines after ``user NAME``: that principal."""


def parse_acl_file(text: str, source: str = "<memory>", errors: list[str] | None = None) -> AclFileRules:
    """Parse a mosquitto-style ACL file (docs/mqtt-auth.md)::

        # comment
        topic read public/#             before any ``user`` line: anonymous clients
        user alice                      the following ``topic`` lines are alice's
        topic readwrite alice/#         (access optional, default readwrite; no substitution)
        pattern write devices/%c/up     every client, %c/%u substituted, wherever it appears

    Problems read ``<source>:<line>: <problem>``; appended to ``errors`` if given, else raised as ConfigError.
    """
    errs, raise_ = _collect(errors)
    start = len(errs)
    everyone: list[AclRule] = []
    anonymous: list[AclRule] = []
    users: dict[str, list[AclRule]] = {}
    current: list[AclRule] = anonymous
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                errs.append(f"{where}: 'user' needs a name")
                continue
            current = users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            errs.append(f"{where}: unknown keyword {keyword!r} (expected user, topic or pattern)")
            continue
        first, _, after = rest.partition(" ")
        after = after.strip()
        access, topic = (first, after) if first in _ACCESS and after else ("readwrite", rest)
        if not topic:
            errs.append(f"{where}: {keyword!r} needs a topic")
            continue
        substitute = keyword == "pattern"
        problem = check_acl_topic(topic, substitute=substitute)
        if problem:
            errs.append(f"{where}: topic {topic!r}: {problem}")
            continue
        (everyone if substitute else current).append(AclRule(access, topic, substitute))
    if raise_ and len(errs) > start:
        raise ConfigError(errs)
    return AclFileRules(tuple(everyone), tuple(anonymous), {k: tuple(v) for k, v in users.items()})


def _safe_value(value: str | None) -> bool:
    """May ``value`` be substituted into an allow rule?"""
    if not value or value.startswith("$"):
        return False
    return not any(c in value for c in "+#/\0")


def _deny_level(value: str | None) -> str | None:
    """How a deny rule's placeholder level widens for ``value`` (None: substitute it literally)."""
    if not value:
        return "+"
    if "/" in value:
        return "#"
    if any(c in value for c in "+#\0"):
        return "+"
    return None  # a literal value (even "$x") denies exactly what it names


def _bind(rule: AclRule, client_id: str, username: str | None) -> tuple[str, ...] | None:
    """The rule's pattern for one client as levels, or None when an allow rule does not apply."""
    levels = _levels(rule.topic)
    if not rule.substitute or "%" not in rule.topic:
        return levels
    deny = rule.access == "deny"
    out: list[str] = []
    for level in levels:
        if "%" not in level:
            out.append(level)
            continue
        pieces: list[str] = []
        widen = ""
        i = 0
        while i < len(level):
            c = level[i]
            if c == "%" and level[i + 1 : i + 2] in ("c", "u"):
                value = client_id if level[i + 1] == "c" else username
                if deny:
                    wide = _deny_level(value)
                    if wide is not None and widen != "#":
                        widen = wide
                elif not _safe_value(value):
                    return None
                pieces.append(value or "")
                i += 2
            else:
                pieces.append(c)
                i += 1
        if widen == "#":
            out.append("#")
            return tuple(out)
        out.append(widen or "".join(pieces))
    return tuple(out)


class ClientAcl:
    """The ACL of one connected client (``%c``/``%u`` already substituted); cheap to query."""

    __slots__ = ("_deny", "_read", "_write", "enabled")

    def __init__(
        self,
        enabled: bool,
        read: Sequence[tuple[str, ...]] = (),
        write: Sequence[tuple[str, ...]] = (),
        deny: Sequence[tuple[str, ...]] = (),
    ) -> None:
        self.enabled = enabled
        """False: no ACL configured, everything is allowed."""
        self._read = tuple(read)
        self._write = tuple(write)
        self._deny = tuple(deny)

    def _denied(self, topic: tuple[str, ...]) -> bool:
        return any(topic_matches(d, topic) for d in self._deny)

    def can_publish(self, topic: str) -> bool:
        """May this client PUBLISH to ``topic`` (a topic name)?"""
        if not self.enabled:
            return True
        if not _valid_topic_name(topic):
            return False
        t = _levels(topic)
        return not self._denied(t) and any(topic_matches(w, t) for w in self._write)

    def can_read(self, topic: str) -> bool:
        """May a message published to ``topic`` be delivered to this client?"""
        if not self.enabled:
            return True
        if not _valid_topic_name(topic):
            return False
        t = _levels(topic)
        return not self._denied(t) and any(topic_matches(r, t) for r in self._read)

    def can_subscribe(self, topic_filter: str) -> bool:
        """May this client SUBSCRIBE to ``topic_filter`` (``$share/<group>/`` is stripped first)?"""
        if not self.enabled:
            return True
        f = _unshare(topic_filter)
        if f is None or not _valid_filter(f):
            return False
        levels = _levels(f)
        if any(filter_covers(d, levels) for d in self._deny):
            return False
        return any(filter_covers(r, levels) for r in self._read)

    def delivery_check_needed(self, topic_filter: str) -> bool:
        """Whether messages matching this (allowed) subscription must each pass ``can_read`` before delivery:
        true when a deny rule overlaps the filter."""
        if not self.enabled:
            return False
        f = _unshare(topic_filter)
        if f is None:
            return True
        levels = _levels(f)
        return any(filters_overlap(d, levels) for d in self._deny)

    def __repr__(self) -> str:
        if not self.enabled:
            return "<ClientAcl allow-all>"
        return f"<ClientAcl read={len(self._read)} write={len(self._write)} deny={len(self._deny)}>"


def _unshare(topic_filter: str) -> str | None:
    if not topic_filter.startswith("$share/"):
        return topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        return None
    return parts[2]


class Acl:
    """All ACL rules of a listener, by whom they apply to. ``bind`` makes a client's ``ClientAcl``."""

    __slots__ = ("anonymous", "enabled", "everyone", "users")

    def __init__(
        self,
        everyone: Iterable[AclRule] = (),
        anonymous: Iterable[AclRule] = (),
        users: Mapping[str, Iterable[AclRule]] | None = None,
        *,
        enabled: bool = True,
    ) -> None:
        self.everyone = tuple(everyone)
        self.anonymous = tuple(anonymous)
        self.users = {k: tuple(v) for k, v in (users or {}).items()}
        self.enabled = enabled
        """False: no ACL configured, every client may do everything."""

    @classmethod
    def allow_all(cls) -> Acl:
        return cls(enabled=False)

    @classmethod
    def from_config(cls, rules: Sequence[MqttAclRule], file_rules: AclFileRules | None = None) -> Acl:
        """Inline rules (``MqttAuth.acl``) plus an ACL file's rules."""
        everyone = list(file_rules.everyone) if file_rules else []
        anonymous = list(file_rules.anonymous) if file_rules else []
        users = {k: list(v) for k, v in file_rules.users.items()} if file_rules else {}
        for rule in rules:
            r = AclRule(rule.access, rule.topic, True)
            if rule.anonymous:
                anonymous.append(r)
            elif rule.principals:
                for name in rule.principals:
                    users.setdefault(name, []).append(r)
            else:
                everyone.append(r)
        return cls(everyone, anonymous, users)

    def rules_for(self, principal: Principal) -> tuple[AclRule, ...]:
        """The rules that apply to ``principal``: every-client rules, then its own (or the anonymous ones)."""
        own = self.anonymous if principal.anonymous else self.users.get(principal.name or "", ())
        return self.everyone + own

    def bind(self, principal: Principal, client_id: str) -> ClientAcl:
        """The client's ACL with ``%c`` = ``client_id`` and ``%u`` = the principal's name substituted."""
        if not self.enabled:
            return ClientAcl(False)
        read: list[tuple[str, ...]] = []
        write: list[tuple[str, ...]] = []
        deny: list[tuple[str, ...]] = []
        for rule in self.rules_for(principal):
            levels = _bind(rule, client_id, principal.name)
            if levels is None:
                continue
            mask = _ACCESS[rule.access]
            if mask == 0:
                deny.append(levels)
            if mask & ACCESS_READ:
                read.append(levels)
            if mask & ACCESS_WRITE:
                write.append(levels)
        return ClientAcl(True, read, write, deny)

    def can_publish(self, principal: Principal, client_id: str, topic: str) -> bool:
        return self.bind(principal, client_id).can_publish(topic)

    def can_subscribe(self, principal: Principal, client_id: str, topic_filter: str) -> bool:
        return self.bind(principal, client_id).can_subscribe(topic_filter)

    def can_read(self, principal: Principal, client_id: str, topic: str) -> bool:
        return self.bind(principal, client_id).can_read(topic)

    def __repr__(self) -> str:
        if not self.enabled:
            return "<Acl allow-all>"
        return f"<Acl everyone={len(self.everyone)} anonymous={len(self.anonymous)} users={len(self.users)}>"


# ------------------------------------------------------------------------------------------- principals
@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connected client is."""

    name: str | None
    """The username or certificate identity; None for an anonymous client. ``%u`` in ACLs."""
    source: str
    """``password``, ``certificate`` or ``anonymous``."""

    @property
    def anonymous(self) -> bool:
        return self.name is None

    def __str__(self) -> str:
        return self.name if self.name is not None else ""


ANONYMOUS = Principal(None, "anonymous")


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """The verified client certificate's identities (the listener fills it from the TLS handshake)."""

    subject_cn: str | None = None
    """The subject's first commonName."""
    sans: tuple[str, ...] = ()
    """DNS and URI subject alternative names in certificate order (``DownstreamInfo.peer_sans``)."""

    def identity(self, mode: str) -> str | None:
        """The principal name for ``principal_from_certificate`` = ``mode`` (``cn`` or ``san``), or None.
        ``san``: the first URI SAN (URIs contain ``:``, DNS names never do), else the first DNS SAN."""
        if mode == "cn":
            return self.subject_cn or None
        if mode == "san":
            uris = [s for s in self.sans if ":" in s]
            pick = uris[0] if uris else (self.sans[0] if self.sans else None)
            return pick or None
        return None


def certificate_info(peercert: Mapping[str, Any] | None) -> CertificateInfo | None:
    """``ssl.SSLObject.getpeercert()``'s dict -> ``CertificateInfo`` (None when there is no verified
    certificate: ``getpeercert()`` returns ``{}`` for an unverified one)."""
    if not peercert:
        return None
    cn: str | None = None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and cn is None:
                cn = str(value)
    sans = tuple(str(v) for kind, v in peercert.get("subjectAltName", ()) if kind in ("DNS", "URI"))
    return CertificateInfo(cn, sans)


class AuthFailure(enum.Enum):
    """Why a CONNECT is refused."""

    BAD_CREDENTIALS = "bad_credentials"
    """Unknown user, wrong or missing password, password without username."""
    NOT_AUTHORIZED = "not_authorized"
    """No credentials and anonymous access is off (or a username but no password file)."""


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of ``Authenticator.authenticate``: exactly one of ``principal`` and ``failure``."""

    principal: Principal | None = None
    failure: AuthFailure | None = None

    @property
    def ok(self) -> bool:
        return self.principal is not None


class Authenticator:
    """A listener's authentication settings and ACL (immutable; safe to share between threads)."""

    __slots__ = ("acl", "allow_anonymous", "passwords", "principal_from_certificate")

    def __init__(
        self,
        *,
        passwords: PasswordFile | None = None,
        acl: Acl | None = None,
        allow_anonymous: bool = False,
        principal_from_certificate: str = "none",
    ) -> None:
        self.passwords = passwords
        self.acl = acl if acl is not None else Acl.allow_all()
        self.allow_anonymous = allow_anonymous
        self.principal_from_certificate = principal_from_certificate

    def authenticate(
        self,
        username: str | None,
        password: bytes | None,
        certificate: CertificateInfo | None = None,
    ) -> AuthResult:
        """Decide who the client is (see the module docstring). May take tens of milliseconds (hashing)."""
        if certificate is not None and self.principal_from_certificate != "none":
            identity = certificate.identity(self.principal_from_certificate)
            if identity:
                return AuthResult(Principal(identity, "certificate"))
        if username is None:
            if password is not None:
                if self.passwords is not None:
                    self.passwords.verify_nothing(password)
                return AuthResult(failure=AuthFailure.BAD_CREDENTIALS)
            if self.allow_anonymous:
                return AuthResult(ANONYMOUS)
            return AuthResult(failure=AuthFailure.NOT_AUTHORIZED)
        if self.passwords is None:
            # Nothing to check a username against: it names nobody.
            if self.allow_anonymous:
                return AuthResult(ANONYMOUS)
            return AuthResult(failure=AuthFailure.NOT_AUTHORIZED)
        if password is None:
            self.passwords.verify_nothing(b"")
            return AuthResult(failure=AuthFailure.BAD_CREDENTIALS)
        if self.passwords.verify(username, password):
            return AuthResult(Principal(username, "password"))
        return AuthResult(failure=AuthFailure.BAD_CREDENTIALS)

    def authorizer(self, principal: Principal, client_id: str) -> ClientAcl:
        """The ``ClientAcl`` to keep for the connection's lifetime."""
        return self.acl.bind(principal, client_id)

    def can_publish(self, principal: Principal, client_id: str, topic: str) -> bool:
        return self.acl.can_publish(principal, client_id, topic)

    def can_subscribe(self, principal: Principal, client_id: str, topic_filter: str) -> bool:
        return self.acl.can_subscribe(principal, client_id, topic_filter)

    def can_read(self, principal: Principal, client_id: str, topic: str) -> bool:
        return self.acl.can_read(principal, client_id, topic)

    def __repr__(self) -> str:
        users = len(self.passwords) if self.passwords is not None else 0
        return (
            f"<Authenticator users={users} anonymous={self.allow_anonymous} "
            f"cert={self.principal_from_certificate} {self.acl!r}>"
        )


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None


def load_authenticator(cfg: MqttAuth | None) -> Authenticator:
    """Build the listener's ``Authenticator`` from its ``auth`` config, reading the password and ACL files.
    ``None`` (no ``auth`` block): anonymous clients, no ACL. Raises ConfigError naming file and line."""
    if cfg is None:
        return Authenticator(allow_anonymous=True)
    errors: list[str] = []
    passwords = (
        parse_password_file(_read(cfg.password_file), cfg.password_file, errors)
        if cfg.password_file
        else None
    )
    file_rules = parse_acl_file(_read(cfg.acl_file), cfg.acl_file, errors) if cfg.acl_file else None
    if errors:
        raise ConfigError(errors)
    acl = Acl.from_config(cfg.acl, file_rules) if cfg.has_acl else Acl.allow_all()
    return Authenticator(
        passwords=passwords,
        acl=acl,
        allow_anonymous=cfg.allow_anonymous,
        principal_from_certificate=cfg.principal_from_certificate,
    )


# ------------------------------------------------------------------------------ denials on the wire
def connack_refusal(failure: AuthFailure, protocol_level: int) -> int:
    """The CONNACK code for a refused CONNECT: MQTT 5.0 (``protocol_level`` 5) reason code 0x86/0x87, MQTT
    3.1.1/3.1 (4/3) return code 4/5."""
    bad = failure is AuthFailure.BAD_CREDENTIALS
    if protocol_level >= 5:
        return REASON_BAD_USERNAME_OR_PASSWORD if bad else REASON_NOT_AUTHORIZED
    return CONNACK_V3_BAD_USERNAME_OR_PASSWORD if bad else CONNACK_V3_NOT_AUTHORIZED


@dataclass(frozen=True, slots=True)
class PublishDenial:
    """What to do with a PUBLISH the ACL refuses (the message itself is always dropped)."""

    send_ack: bool
    """Send the PUBACK (QoS 1) / PUBREC (QoS 2) anyway; False for QoS 0 (nothing is sent)."""
    reason_code: int
    """Its reason code: 0x87 Not authorized (MQTT 5), 0x00 (3.1.1 has no negative acknowledgement)."""


def publish_denial(protocol_level: int, qos: int) -> PublishDenial:
    """MQTT 5: QoS 1/2 get PUBACK/PUBREC 0x87 (a PUBREC >= 0x80 ends the QoS 2 flow), QoS 0 is dropped.
    MQTT 3.1.1 cannot signal it [MQTT-3.3.5-2]: like mosquitto, acknowledge normally and drop the message
    (closing instead would make the client redeliver the same refused message forever)."""
    if qos == 0:
        return PublishDenial(False, 0)
    return PublishDenial(True, REASON_NOT_AUTHORIZED if protocol_level >= 5 else 0)


def subscribe_denied_code(protocol_level: int) -> int:
    """SUBACK code for a refused subscription: 0x87 Not authorized (MQTT 5), 0x80 Failure (3.1.1)."""
    return REASON_NOT_AUTHORIZED if protocol_level >= 5 else SUBACK_V3_FAILURE
