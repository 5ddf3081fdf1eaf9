"""MQTT authentication and authorization config: the ``auth`` block of the ``mqtt_proxy`` network filter.

::

    auth:
      password_file: mqtt.passwd          # "user:$scheme$params$salt$hash" lines (docs/mqtt-auth.md)
      allow_anonymous: false              # clients without credentials (default: refused)
      principal_from_certificate: none    # none | cn | san: a verified client certificate names the principal
      acl_file: mqtt.acl                  # mosquitto-style ACL file
      acl:                                # and/or inline rules
      - {access: readwrite, topic: "devices/%c/#"}              # every client
      - {access: read, topic: "public/#", anonymous: true}     # anonymous clients only
      - {access: readwrite, topic: "#", principals: [admin]}   # these principals only
      - {access: deny, topic: "admin/#"}                       # deny wins over any allow

Relative file names are resolved against the config file's directory (as the loader does for certificates).
Both files are read and checked while the config is parsed, so ``microenvoy validate`` reports a bad line as
``...auth.password_file: /etc/mqtt.passwd:3: <problem>``; the runtime (``microenvoy.mqtt.auth.
load_authenticator``) reads them again when the listener is built. With no ACL at all (no ``acl`` and no
``acl_file``) every authenticated client may publish and subscribe to everything; with any ACL, what no rule
allows is denied. The semantics are in ``microenvoy.mqtt.auth`` and ``docs/mqtt-auth.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from microenvoy.config.reader import Reader

__all__ = [
    "ACCESS_VALUES",
    "CERTIFICATE_MODES",
    "MqttAclRule",
    "MqttAuth",
    "parse_mqtt_acl_rule",
    "parse_mqtt_auth",
]

ACCESS_VALUES = ("read", "write", "readwrite", "deny")
"""``read``: subscribe and receive; ``write``: publish; ``readwrite``: both; ``deny``: neither (wins)."""
CERTIFICATE_MODES = ("none", "cn", "san")


@dataclass(frozen=True, slots=True)
class MqttAclRule:
    """One inline ACL rule: an access level on a topic filter pattern, for some clients."""

    access: str
    """One of ``read``, ``write``, ``readwrite``, ``deny``."""
    topic: str
    """A topic filter (``+``/``#`` allowed); ``%c`` is replaced by the client id, ``%u`` by the principal."""
    principals: tuple[str, ...] = ()
    """The rule applies to these principals only (usernames or certificate identities)."""
    anonymous: bool = False
    """The rule applies to anonymous clients only. Neither this nor ``principals``: every client."""


@dataclass(frozen=True, slots=True)
class MqttAuth:
    """How the MQTT listener authenticates clients and authorizes their publishes and subscriptions."""

    password_file: str = ""
    """Path of the password file (resolved); empty: no username/password authentication."""
    allow_anonymous: bool = False
    """Accept clients that present no credentials (no username and no certificate identity)."""
    principal_from_certificate: str = "none"
    """``cn``: the verified client certificate's subject CN is the principal; ``san``: its first URI SAN,
    else its first DNS SAN; ``none``: certificates do not name principals."""
    acl: tuple[MqttAclRule, ...] = ()
    """Inline ACL rules (combined with ``acl_file``'s)."""
    acl_file: str = ""
    """Path of a mosquitto-style ACL file (resolved); empty: none."""

    @property
    def has_acl(self) -> bool:
        """Whether any ACL is configured (without one, every authenticated client may do everything)."""
        return bool(self.acl or self.acl_file)


def parse_mqtt_acl_rule(r: Reader) -> MqttAclRule:
    """One entry of ``auth.acl``."""
    from microenvoy.mqtt.auth import check_acl_topic

    access: str = r.enum("access", ACCESS_VALUES, "deny", required=True)
    topic: str = r.string("topic", required=True)
    if isinstance(r.raw.get("topic"), str):
        problem = check_acl_topic(topic, substitute=True)
        if problem:
            r.error(problem, "topic")
    principals = r.strings("principals")
    for i, name in enumerate(principals):
        if not name:
            r.errors.append(f"{r.sub('principals')}[{i}]: must not be empty")
    if r.raw.get("principals") == []:
        r.error("must not be empty (omit it for every client)", "principals")
    anonymous = r.boolean("anonymous", False)
    if anonymous and principals:
        r.error("set principals or anonymous: true, not both", "anonymous")
    return MqttAclRule(access=access, topic=topic, principals=principals, anonymous=anonymous)


def _file(r: Reader, key: str) -> str:
    name: str = r.string(key, "")
    if not name:
        if r.raw.get(key) == "":
            r.error("must not be empty (omit it instead)", key)
        return ""
    from microenvoy.config.loader import resolve_path

    path = resolve_path(name)
    if not os.path.isfile(path):
        r.error(f"file not found: {path}", key)
        return path
    from microenvoy.mqtt.auth import parse_acl_file, parse_password_file

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        r.error(f"cannot read {path}: {exc}", key)
        return path
    errors: list[str] = []
    if key == "password_file":
        parse_password_file(text, path, errors)
    else:
        parse_acl_file(text, path, errors)
    for problem in errors:
        r.error(problem, key)
    return path


def parse_mqtt_auth(r: Reader) -> MqttAuth:
    """The ``auth`` block -> ``MqttAuth``; every problem goes to ``r`` with its path.

    Calls ``r.finish()`` itself (unknown fields are errors); wiring it through ``Reader.object`` is fine too
    (nothing is reported twice).
    """
    password_file = _file(r, "password_file")
    allow_anonymous = r.boolean("allow_anonymous", False)
    mode: str = r.enum("principal_from_certificate", CERTIFICATE_MODES, "none")
    acl = r.objects("acl", parse_mqtt_acl_rule)
    acl_file = _file(r, "acl_file")
    if not password_file and not allow_anonymous and mode == "none" and not r.has("password_file"):
        r.error(
            "no client can connect: set password_file, principal_from_certificate or allow_anonymous: true"
        )
    r.finish()
    r.ignore(*r.raw)  # reported once: a caller's own finish() (``Reader.object``) adds nothing
    return MqttAuth(
        password_file=password_file,
        allow_anonymous=allow_anonymous,
        principal_from_certificate=mode,
        acl=acl,
        acl_file=acl_file,
    )
