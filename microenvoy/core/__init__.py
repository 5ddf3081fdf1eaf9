"""Neutral vocabulary shared by every protocol front and upstream: headers, events, exchange, errors.

Nothing in ``microenvoy.core`` does I/O.
"""

from microenvoy.core.errors import CodecError, ConfigError
from microenvoy.core.exchange import METADATA_PREFIX, DownstreamInfo, Exchange, ResponseFlag
from microenvoy.core.headers import Headers

__all__ = [
    "METADATA_PREFIX",
    "CodecError",
    "ConfigError",
    "DownstreamInfo",
    "Exchange",
    "Headers",
    "ResponseFlag",
]
