"""Access log formatting (Envoy command operators, default text format, JSON fields) on hand-made
exchanges, and the logger's bounded buffer.

No ``__init__.py`` here on purpose: a ``tests/unit/io`` package would be imported as ``io`` and shadow the
standard library module."""

from __future__ import annotations

import json
import pathlib
import re
import time

import pytest

from microenvoy.admin.stats import Store
from microenvoy.config.model import AccessLog
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.io.access_log import DEFAULT_FORMAT, AccessLogger, compile_format

WALL = 1700000000.125  # 2023-11-14T22:13:20.125Z (exact in binary: no float rounding at the ms digit)


def exchange(**kw: object) -> Exchange:
    ex = Exchange(
        request_headers=Headers(
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"api.example.com"),
                (b":path", b"/v1/items?x=1"),
                (b"user-agent", b"curl/8.5"),
                (b"x-request-id", b"4f1c-9a"),
                (b"x-forwarded-for", b"198.51.100.7"),
            ]
        ),
        downstream=DownstreamInfo(
            protocol="HTTP/2",
            remote_address=("192.0.2.10", 51234),
            local_address=("10.0.0.1", 10000),
            listener_name="ingress",
        ),
        start_time=time.monotonic() - 0.25,
        wall_start=WALL,
        response_headers=Headers([(b":status", b"201"), (b"content-type", b"application/json")]),
        response_code=201,
        response_flags={"UT", "URX"},
        response_code_details="via_upstream",
        upstream_host="10.0.0.5:8080",
        upstream_cluster="items",
        request_body_bytes=11,
        response_body_bytes=2048,
        attempts=3,
    )
    for k, v in kw.items():
        setattr(ex, k, v)
    return ex


DEFAULT_LINE = re.compile(
    r'\[2023-11-14T22:13:20\.125Z\] "POST /v1/items\?x=1 HTTP/2" 201 URX,UT 11 2048 (\d+) '
    r'"198\.51\.100\.7" "curl/8\.5" "4f1c-9a" "api\.example\.com" "10\.0\.0\.5:8080"\n'
)


def test_default_format() -> None:
    line = compile_format(DEFAULT_FORMAT)(exchange())
    m = DEFAULT_LINE.fullmatch(line)
    assert m is not None, line
    assert 250 <= int(m.group(1)) < 60_000  # DURATION in ms since start_time (monotonic)


def test_missing_single_operator_values_are_dashes() -> None:
    ex = exchange(response_flags=set(), upstream_host=None)
    assert compile_format("%RESPONSE_FLAGS%")(ex) == "-"
    assert compile_format("%REQ(x-nope)%")(ex) == "-"
    assert compile_format("%UPSTREAM_HOST%")(ex) == "-"


def test_default_format_with_missing_values_uses_dashes() -> None:
    ex = exchange(
        request_headers=Headers([(b":method", b"GET"), (b":path", b"/")]),
        response_flags=set(),
        upstream_host=None,
        response_code=0,
    )
    line = compile_format(DEFAULT_FORMAT)(ex)
    assert line.startswith('[2023-11-14T22:13:20.125Z] "GET / HTTP/2" 0 - 11 2048 ')
    assert line.endswith(' "-" "-" "-" "-" "-"\n')


def test_original_path_wins_over_path() -> None:
    ex = exchange()
    ex.request_headers.add(b"x-envoy-original-path", b"/api/v1/items?x=1")
    assert '"POST /api/v1/items?x=1 HTTP/2"' in compile_format(DEFAULT_FORMAT)(ex)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%RESPONSE_CODE%", "201"),
        ("%RESPONSE_CODE_DETAILS%", "via_upstream"),
        ("%RESPONSE_FLAGS%", "URX,UT"),
        ("%BYTES_RECEIVED%/%BYTES_SENT%", "11/2048"),
        ("%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "3"),
        ("%RESP(CONTENT-TYPE)%", "application/json"),
        ("%RESP(x-missing)%", "-"),
        ("%REQ(:AUTHORITY)%", "api.example.com"),
        ("%REQ(USER-AGENT):4%", "curl"),
        ("%PROTOCOL%", "HTTP/2"),
        ("%DOWNSTREAM_REMOTE_ADDRESS%", "192.0.2.10:51234"),
        ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "192.0.2.10"),
        ("%DOWNSTREAM_LOCAL_ADDRESS%", "10.0.0.1:10000"),
        ("%UPSTREAM_HOST% %UPSTREAM_CLUSTER%", "10.0.0.5:8080 items"),
        ("%START_TIME(%s)%", "1700000000"),
        ("%START_TIME(%Y-%m-%d)%", "2023-11-14"),
        ("100%% %RESPONSE_CODE%", "100% 201"),
        ("plain text", "plain text"),
        ("", ""),
    ],
)
def test_operators(fmt: str, expected: str) -> None:
    assert compile_format(fmt)(exchange()) == expected


def test_response_header_operator_before_any_response() -> None:
    assert compile_format("%RESP(content-type)%")(exchange(response_headers=None)) == "-"


@pytest.mark.parametrize("fmt", ["%NOT_AN_OPERATOR%", "%REQ()%", "%PROTOCOL(x)%", "50% off"])
def test_unknown_or_malformed_operators_are_rejected(fmt: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        compile_format(fmt)


def test_json_format(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "access.log"
    fields = (
        ("method", "%REQ(:METHOD)%"),
        ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
        ("code", "%RESPONSE_CODE%"),
        ("flags", "%RESPONSE_FLAGS%"),
        ("content_type", "%RESP(CONTENT-TYPE)%"),
        ("duration", "%DURATION%"),
        ("upstream", "%UPSTREAM_HOST%"),
        ("client", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
        ("start", "%START_TIME%"),
        ("route", 'edge "quoted" literal'),
        ("xff", "%REQ(X-NOT-THERE)%"),
    )
    store = Store()
    logger = AccessLogger(
        AccessLog(name="envoy.access_loggers.file", path=str(path), json_format=fields), store
    )
    logger.log(exchange())  # no running loop: written at once
    logger.log(exchange(response_code=503, response_flags={"UH"}))
    logger.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first) == [k for k, _ in fields]
    duration = first.pop("duration")
    assert 250 <= int(duration) < 60_000
    assert first == {
        "method": "POST",
        "path": "/v1/items?x=1",
        "code": "201",
        "flags": "URX,UT",
        "content_type": "application/json",
        "upstream": "10.0.0.5:8080",
        "client": "192.0.2.10",
        "start": "2023-11-14T22:13:20.125Z",
        "route": 'edge "quoted" literal',
        "xff": "-",
    }
    second = json.loads(lines[1])
    assert (second["code"], second["flags"]) == ("503", "UH")
    assert store.value("access_log.written") == 2
    assert store.value("access_log.dropped") == 0


def test_text_format_override(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.log"
    logger = AccessLogger(
        AccessLog(name="f", path=str(path), text_format="%REQ(:METHOD)% %RESPONSE_CODE%\n"), Store()
    )
    logger.log(exchange())
    logger.close()
    assert path.read_text(encoding="utf-8") == "POST 201\n"


async def test_buffer_is_bounded_and_flushed_off_the_request_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.log"
    store = Store()
    logger = AccessLogger(AccessLog(name="f", path=str(path), text_format="%REQ(X-N)%\n"), store)
    logger.MAX_PENDING = 100  # a tiny buffer for the test
    for i in range(60):
        ex = exchange()
        ex.request_headers.set(b"x-n", b"%04d" % i)  # 5 bytes per line
        logger.log(ex)
    # Inside a running loop nothing is written synchronously: a flush is scheduled.
    assert not path.exists() or path.read_text() == ""
    assert logger._flush_handle is not None
    assert store.value("access_log.dropped") == 40  # only the newest 100 bytes are kept
    logger.flush()
    assert path.read_text(encoding="utf-8").split() == [f"{i:04d}" for i in range(40, 60)]
    assert store.value("access_log.written") == 20
    logger.close()


def test_unwritable_path_counts_dropped_lines(tmp_path: pathlib.Path) -> None:
    store = Store()
    logger = AccessLogger(AccessLog(name="f", path=str(tmp_path)), store)  # a directory
    logger.log(exchange())
    assert store.value("access_log.dropped") == 1
    assert store.value("access_log.written") == 0
    assert "pending=0" in repr(logger)
    logger.close()
