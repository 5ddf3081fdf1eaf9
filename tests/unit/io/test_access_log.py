"""Access log formatting (Envoy command operators, default text format, JSON fields) on hand-made
exchanges, and the logger's bounded buffer.

No ``__init__.py`` here on purpose: a ``tests/unit/io`` package would be imported as ``io`` and shadow the
standard library module."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from microenvoy.admin.stats import Store
from microenvoy.config.model import AccessLog
from microenvoy.core.exchange import DownstreamInfo, Exchange
from microenvoy.core.headers import Headers
from microenvoy.io.access_log import DEFAULT_FORMAT, AccessLogger, compile_format, compile_json_format
from microenvoy.tracing import Span

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


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling the loop) until ``cond()`` holds."""
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - the state is set by a worker thread's callback, no event to await
            await asyncio.sleep(0.005)


DEFAULT_LINE = re.compile(
    r'\[2023-11-14T22:13:20\.125Z\] "POST /v1/items\?x=1 HTTP/2" 201 UT,URX 11 2048 (\d+) '
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
        ("%RESPONSE_FLAGS%", "UT,URX"),  # Envoy's order, not alphabetical
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
    assert isinstance(duration, int)
    assert 250 <= duration < 60_000
    assert first == {
        "method": "POST",
        "path": "/v1/items?x=1",
        "code": 201,
        "flags": "UT,URX",
        "content_type": "application/json",
        "upstream": "10.0.0.5:8080",
        "client": "192.0.2.10",
        "start": "2023-11-14T22:13:20.125Z",
        "route": 'edge "quoted" literal',
        "xff": None,  # a lone operator that yields nothing is null in typed JSON
    }
    second = json.loads(lines[1])
    assert (second["code"], second["flags"]) == (503, "UH")
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
    assert not path.exists()
    assert logger._flush_handle is not None
    assert store.value("access_log.dropped") == 40  # only the newest 100 bytes are kept
    logger.flush()
    assert logger._writing is not None  # handed to the worker thread
    await until(lambda: store.value("access_log.written") == 20)
    assert path.read_text(encoding="utf-8").split() == [f"{i:04d}" for i in range(40, 60)]
    await logger.aclose()


def test_unwritable_path_counts_dropped_lines(tmp_path: pathlib.Path) -> None:
    store = Store()
    logger = AccessLogger(AccessLog(name="f", path=str(tmp_path)), store)  # a directory
    logger.log(exchange())
    assert store.value("access_log.dropped") == 1
    assert store.value("access_log.written") == 0
    assert "pending=0" in repr(logger)
    logger.close()


# ------------------------------------------------------------------------------------- response flags
@pytest.mark.parametrize("flag", ["UH", "UF", "UO", "URX", "UT", "NR"])
def test_each_upstream_flag_renders(flag: str) -> None:
    assert compile_format("%RESPONSE_FLAGS%")(exchange(response_flags={flag})) == flag


def test_flags_follow_envoys_order() -> None:
    # Envoy's ResponseFlagUtils order: UH, UT, UF, UO, NR, ..., URX; codes Envoy lacks (RBAC) come last.
    flags = {"URX", "NR", "UO", "UF", "UT", "UH", "RBAC"}
    assert compile_format("%RESPONSE_FLAGS%")(exchange(response_flags=flags)) == "UH,UT,UF,UO,NR,URX,RBAC"


# ------------------------------------------------------------------------------------- typed JSON
def test_typed_json_numbers_literals_and_nesting() -> None:
    fmt = compile_json_format(
        {
            "code": "%RESPONSE_CODE%",
            "bytes": {"in": "%BYTES_RECEIVED%", "out": "%BYTES_SENT%"},
            "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
            "duration": "%DURATION%",
            "text": "%RESPONSE_CODE% via %UPSTREAM_CLUSTER%",  # not a lone operator: a string
            "missing_in_text": "x=%REQ(x-none)%",
            "missing": "%REQ(x-none)%",
            "details_missing": "%RESPONSE_CODE_DETAILS%",
            "percent": "100%%",
            "int": 7,
            "float": 0.5,
            "bool": True,
            "null": None,
            "deep": {"a": {"b": {"c": "%PROTOCOL%", "d": 1}}},
            "static": {"k": "v"},
        }
    )
    ex = exchange(response_code_details="")
    out = json.loads(json.dumps(fmt(ex)))
    duration = out.pop("duration")
    assert isinstance(duration, int)
    assert out == {
        "code": 201,
        "bytes": {"in": 11, "out": 2048},
        "attempts": 3,
        "text": "201 via items",
        "missing_in_text": "x=-",
        "missing": None,
        "details_missing": None,
        "percent": "100%",
        "int": 7,
        "float": 0.5,
        "bool": True,
        "null": None,
        "deep": {"a": {"b": {"c": "HTTP/2", "d": 1}}},
        "static": {"k": "v"},
    }


def test_typed_json_accepts_the_frozen_config_shape() -> None:
    """The config keeps nested mappings as tuples of pairs (hashable, frozen)."""
    fmt = compile_json_format((("code", "%RESPONSE_CODE%"), ("up", (("host", "%UPSTREAM_HOST%"),))))
    assert fmt(exchange()) == {"code": 201, "up": {"host": "10.0.0.5:8080"}}


def test_typed_json_all_constant() -> None:
    assert compile_json_format({"a": 1, "b": {"c": "d"}})(exchange()) == {"a": 1, "b": {"c": "d"}}


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"a": {"b": "%NOPE%"}}, "a.b"),
        ({"x": "50% off"}, "x"),
        ({"y": object()}, "y"),
    ],
)
def test_typed_json_errors_name_the_key(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(where)}: "):
        compile_json_format(fields)


def test_json_format_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="mapping"):
        compile_json_format("%RESPONSE_CODE%")


def test_json_logger_writes_typed_lines(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t.log"
    fields = (
        ("code", "%RESPONSE_CODE%"),
        ("nested", (("n", 1), ("flags", "%RESPONSE_FLAGS%"))),
        ("ok", True),
    )
    logger = AccessLogger(AccessLog(name="f", path=str(path), json_format=fields), Store())
    logger.log(exchange(response_flags=set()))
    logger.close()
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "code": 201,
        "nested": {"n": 1, "flags": "-"},
        "ok": True,
    }


# ------------------------------------------------------------------------------------- START_TIME, TRACE_ID
@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%START_TIME(%Y/%m/%d %H:%M:%S)%", "2023/11/14 22:13:20"),
        ("%START_TIME(%H:%M:%E3S)%", "22:13:20.125"),
        ("%START_TIME(%s.%3f)%", "1700000000.125"),
        ("%START_TIME%", "2023-11-14T22:13:20.125Z"),
    ],
)
def test_start_time_with_a_format(fmt: str, expected: str) -> None:
    assert compile_format(fmt)(exchange()) == expected


def test_trace_id() -> None:
    span = Span(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 0, 1, None, 0)
    assert compile_format("%TRACE_ID%")(exchange(span=span)) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert compile_format("%TRACE_ID%")(exchange()) == "-"
    assert compile_json_format({"t": "%TRACE_ID%"})(exchange()) == {"t": None}
    assert compile_json_format({"t": "%TRACE_ID%"})(exchange(span=Span(1, 2, 0, 0, None, 0))) == {
        "t": f"{1:032x}"
    }


# ------------------------------------------------------------------------------------- non-blocking writes
class SlowDisk:
    """Wraps a logger's blocking write: each write waits until the test opens the gate."""

    def __init__(self, logger: AccessLogger) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self._inner = logger._write_blocking
        logger._write_blocking = self  # type: ignore[method-assign]

    def __call__(self, data: str) -> bool:
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return self._inner(data)


async def test_a_stalled_disk_never_blocks_the_loop(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "slow.log"
    store = Store()
    logger = AccessLogger(AccessLog(name="f", path=str(path), text_format="%REQ(X-N)%\n"), store)
    logger.MAX_PENDING = 100
    logger.FLUSH_BYTES = 10
    disk = SlowDisk(logger)
    loop = asyncio.get_running_loop()
    ex = exchange()
    ex.request_headers.set(b"x-n", b"0000")
    logger.log(ex)
    logger.log(ex)  # 10 bytes pending: handed to the worker thread, which now blocks
    await until(disk.entered.is_set)
    started = loop.time()
    for i in range(1, 200):  # the request path keeps logging while the disk is stuck
        ex = exchange()
        ex.request_headers.set(b"x-n", b"%04d" % i)
        logger.log(ex)
        await asyncio.sleep(0)  # the loop keeps running
    assert loop.time() - started < 5.0
    assert disk.calls == 1  # one write at a time: the rest waits in the (bounded) buffer
    assert logger._pending_bytes <= logger.MAX_PENDING
    assert store.value("access_log.dropped") == 199 - 20  # only the newest 100 bytes (20 lines) kept
    disk.gate.set()
    await until(lambda: store.value("access_log.written") == 22)
    assert path.read_text(encoding="utf-8").split() == ["0000", "0000"] + [
        f"{i:04d}" for i in range(180, 200)
    ]
    await logger.aclose()
    assert "pending=0" in repr(logger)


async def test_close_waits_for_the_running_write(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.log"
    store = Store()
    logger = AccessLogger(AccessLog(name="f", path=str(path), text_format="%RESPONSE_CODE%\n"), store)
    disk = SlowDisk(logger)
    logger.log(exchange())
    logger.flush()
    await until(disk.entered.is_set)
    logger.log(exchange(response_code=500))
    closing = asyncio.ensure_future(logger.aclose())
    await asyncio.sleep(0)
    assert not closing.done()
    disk.gate.set()
    await asyncio.wait_for(closing, 10)
    assert path.read_text(encoding="utf-8") == "201\n500\n"
    assert store.value("access_log.written") == 2


async def test_stdout_sink_is_written_by_the_worker(capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    logger = AccessLogger(
        AccessLog(name="envoy.access_loggers.stdout", text_format="%RESPONSE_CODE%\n"), store
    )
    logger.log(exchange())
    logger.flush()
    await until(lambda: store.value("access_log.written") == 1)
    await logger.aclose()
    assert capsys.readouterr().out == "201\n"
