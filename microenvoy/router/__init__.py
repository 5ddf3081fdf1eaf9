"""Route tables and matching (sans-IO): virtual hosts, routes, header matchers and mutations, retries.

``RouteTable(config).match_entry(headers)`` is the per-request entry point for HTTP fronts; see
``microenvoy.router.table`` for the matching rules and ``microenvoy.router.headers`` for header options.
"""

from microenvoy.router.headers import HeaderMutation, compile_value, rewrite_host, rewrite_path
from microenvoy.router.matchers import (
    compile_header_matcher,
    compile_header_matchers,
    compile_string_matcher,
    parse_header_matcher,
    parse_string_matcher,
)
from microenvoy.router.retry import RETRY_ON_VALUES, RetryState
from microenvoy.router.table import RouteEntry, RouteTable, split_host_port
from microenvoy.router.weighted import WeightedClusterPicker

__all__ = [
    "RETRY_ON_VALUES",
    "HeaderMutation",
    "RetryState",
    "RouteEntry",
    "RouteTable",
    "WeightedClusterPicker",
    "compile_header_matcher",
    "compile_header_matchers",
    "compile_string_matcher",
    "compile_value",
    "parse_header_matcher",
    "parse_string_matcher",
    "rewrite_host",
    "rewrite_path",
    "split_host_port",
]
