"""Pieces shared by the HTTP filter extensions: Envoy's ``FractionalPercent`` / ``RuntimeFractionalPercent``
(parsed and sampled with an injected random), ``HeaderValueOption`` parsing, and gRPC status codes.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass

from microenvoy.config.model import HeaderValueOption
from microenvoy.config.reader import Reader
from microenvoy.router.headers import APPEND_ACTIONS, HeaderMutation

__all__ = [
    "DENOMINATORS",
    "FractionalPercent",
    "check_header_options",
    "parse_fractional_percent",
    "parse_header_value_option",
    "parse_runtime_fractional_percent",
]

DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


@dataclass(frozen=True, slots=True)
class FractionalPercent:
    """``numerator / denominator`` of requests (Envoy's ``type.v3.FractionalPercent``)."""

    numerator: int = 0
    denominator: int = 100
    """100, 10000 or 1000000 (``HUNDRED``, ``TEN_THOUSAND``, ``MILLION``)."""

    def sample(self, random: _random.Random) -> bool:
        """Is this request in the fraction? (Envoy: ``random % denominator < numerator``.)"""
        if self.numerator <= 0:
            return False
        if self.numerator >= self.denominator:
            return True
        return random.randrange(self.denominator) < self.numerator

    def capped(self, numerator: int) -> FractionalPercent:
        """The same denominator with ``min(numerator, self.numerator)`` (header-controlled percentages)."""
        return FractionalPercent(min(max(numerator, 0), self.numerator), self.denominator)


def parse_fractional_percent(r: Reader) -> FractionalPercent:
    """``{numerator, denominator: HUNDRED|TEN_THOUSAND|MILLION}``; a numerator above the denominator is
    clamped (as Envoy does)."""
    numerator = r.integer("numerator", 0, min=0)
    denominator = DENOMINATORS[r.enum("denominator", tuple(DENOMINATORS), "HUNDRED")]
    return FractionalPercent(min(numerator, denominator), denominator)


def parse_runtime_fractional_percent(r: Reader) -> FractionalPercent:
    """``{default_value: FractionalPercent, runtime_key}``: there is no runtime layer, so ``runtime_key``
    is accepted and the default value is what applies."""
    r.string("runtime_key")
    value = r.object("default_value", parse_fractional_percent, required=True)
    return value if value is not None else FractionalPercent()


def parse_header_value_option(r: Reader) -> HeaderValueOption:
    """Envoy's ``HeaderValueOption``: ``{header: {key, value}, append_action | append}``."""
    header = r.mapping("header", required=True)
    key = value = ""
    if header is not None:
        key = header.string("key", required=True)
        value = header.string("value")
        header.finish()
    if r.has("append") and r.has("append_action"):
        r.error("only one of append, append_action may be set")
    action = r.enum("append_action", APPEND_ACTIONS, "APPEND_IF_EXISTS_OR_ADD")
    if r.has("append"):
        action = "APPEND_IF_EXISTS_OR_ADD" if r.boolean("append", True) else "OVERWRITE_IF_EXISTS_OR_ADD"
    if r.boolean("keep_empty_value"):
        r.error("not supported by microenvoy (empty values are never added)", "keep_empty_value")
    return HeaderValueOption(key=key.lower(), value=value, append_action=action)


def check_header_options(r: Reader, key: str, options: tuple[HeaderValueOption, ...], what: str) -> None:
    """Report header options ``HeaderMutation`` would refuse (bad formatter, protected name) at
    ``<path>.<key>[i]...``."""
    try:
        HeaderMutation(options, what=what)
    except ValueError as exc:
        msg = str(exc)
        i = msg.find("[")
        r.errors.append(r.sub(key) + (msg[i:] if i >= 0 else ": " + msg))
