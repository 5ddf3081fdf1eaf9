"""Log level names and the microenvoy logger tree (admin /logging helpers)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from microenvoy.admin import logging as admin_logging


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    names = admin_logging.known_loggers()
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n in admin_logging.known_loggers():
        logging.getLogger(n).setLevel(saved.get(n, logging.NOTSET))


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("trace", 5),
        ("debug", logging.DEBUG),
        ("INFO", logging.INFO),
        (" warn ", logging.WARNING),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
        ("critical", logging.CRITICAL),
        ("off", logging.CRITICAL + 10),
    ],
)
def test_parse_level(name: str, level: int) -> None:
    assert admin_logging.parse_level(name) == level


@pytest.mark.parametrize("name", ["", "loud", "10", "debugx"])
def test_parse_level_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        admin_logging.parse_level(name)


def test_level_name_round_trips_and_rounds_down() -> None:
    for name in ("trace", "debug", "info", "warning", "error", "critical", "off"):
        assert admin_logging.level_name(admin_logging.parse_level(name)) == name
    assert admin_logging.level_name(15) == "debug"
    assert admin_logging.level_name(1) == "trace"
    assert admin_logging.level_name(100) == "off"


def test_logger_name() -> None:
    assert admin_logging.logger_name("io") == "microenvoy.io"
    assert admin_logging.logger_name("microenvoy") == "microenvoy"
    assert admin_logging.logger_name("microenvoy.codecs.h2") == "microenvoy.codecs.h2"
    assert admin_logging.logger_name("codecs.h2") == "microenvoy.codecs.h2"
    for bad in ("nosuchlayer", "", "io..x", "io x", "../etc", "microenvoyx"):
        with pytest.raises(ValueError, match="logger"):
            admin_logging.logger_name(bad)
    logging.getLogger("microenvoy.custom_thing")  # an existing logger is accepted even outside the layers
    assert admin_logging.logger_name("custom_thing") == "microenvoy.custom_thing"


def test_set_level_one_logger() -> None:
    text = admin_logging.set_level("debug", "io")
    assert logging.getLogger("microenvoy.io").level == logging.DEBUG
    assert "  microenvoy.io: debug\n" in text
    assert text.startswith("active loggers:\n")
    assert admin_logging.levels_text() == text
    child = logging.getLogger("microenvoy.io.something")
    assert child.getEffectiveLevel() == logging.DEBUG


def test_set_level_all_resets_children() -> None:
    admin_logging.set_level("debug", "io")
    admin_logging.set_level("off")
    assert logging.getLogger("microenvoy").level == admin_logging.OFF
    assert logging.getLogger("microenvoy.io").level == logging.NOTSET
    text = admin_logging.levels_text()
    levels = {line.split(": ")[1] for line in text.splitlines()[1:]}
    assert levels == {"off"}
    assert not logging.getLogger("microenvoy.io").isEnabledFor(logging.CRITICAL)


def test_set_level_rejects_without_changing() -> None:
    before = admin_logging.levels_text()
    with pytest.raises(ValueError, match="log level"):
        admin_logging.set_level("loud")
    with pytest.raises(ValueError, match="logger"):
        admin_logging.set_level("debug", "nosuchlayer")
    assert admin_logging.levels_text() == before


def test_known_loggers_lists_root_and_layers() -> None:
    names = admin_logging.known_loggers()
    assert names[0] == "microenvoy"
    assert {f"microenvoy.{x}" for x in admin_logging.LAYERS} <= set(names)
    assert names == sorted(names)


def test_parse_logging_query() -> None:
    q = admin_logging.parse_logging_query
    assert q([]) == []
    assert q([("level", "DEBUG")]) == [(None, "debug")]
    assert q([("io", "info")]) == [("microenvoy.io", "info")]
    assert q([("paths", "io:debug, codecs.h2:trace,")]) == [
        ("microenvoy.io", "debug"),
        ("microenvoy.codecs.h2", "trace"),
    ]
    for bad in ([("paths", "io")], [("io", "")], [("io", "loud")], [("zzz", "debug")]):
        with pytest.raises(ValueError, match=r"level|logger|paths"):
            q(bad)
