"""Convention 1 (protocol code does no I/O) and import cost, enforced.

* Every module under the sans-IO packages is parsed with ``ast`` (nothing is imported) and may not import
  ``asyncio``, ``socket``, ``ssl``, ``selectors`` or ``time``, in any spelling (``import x``, ``import x.y``,
  ``from x import y``, ``import x as z``, inside functions, ``importlib.import_module("x")``,
  ``__import__("x")``). Imports under ``if TYPE_CHECKING:`` never run and are allowed (type hints only).
  Exceptions go in ``ALLOWED`` with a reason.
* Importing those packages does not load the I/O modules transitively either (checked in a subprocess).
* ``import microenvoy`` stays cheap: no protocol stacks, no YAML, no cryptography.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "microenvoy"
SANS_IO_PACKAGES = (
    "core", "codecs", "filters", "router", "upstream", "config", "admin", "bridging", "mqtt", "xds",
)  # fmt: skip
BANNED = frozenset({"asyncio", "socket", "ssl", "selectors", "time"})

ALLOWED: dict[tuple[str, str], str] = {
    # ("microenvoy/<pkg>/<module>.py", "<banned module>"): "reason",
}
"""Explicit exceptions to the ban, each with the reason it is legitimate. Currently none."""

TRANSITIVE_EXEMPT: dict[str, str] = {
    "codecs": "aioquic.tls imports ssl (which imports socket and selectors) for its CERT_* constants; "
    "our codecs themselves import none of them (checked by the ast walk)",
}
"""Packages whose *third-party* dependencies load an I/O module on import."""

HEAVY = ("aioquic", "h2", "h11", "hpack", "hyperframe", "pylsqpack", "cryptography", "yaml", "grpc", "cbor2")


# ------------------------------------------------------------------------------------------- walker


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _dynamic_import_target(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")`` / ``__import__("x")``, if a literal."""
    func = node.func
    is_dynamic = (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")) or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )
    if (
        is_dynamic
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


def banned_imports(source: str) -> list[tuple[int, str]]:
    """(line, banned top-level module) for every runtime import of a banned module in ``source``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call):
            target = _dynamic_import_target(node)
            if target is not None:
                names = [target]
        for name in names:
            top = name.split(".")[0]
            if top in BANNED:
                found.append((getattr(node, "lineno", 0), top))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def sans_io_modules() -> list[pathlib.Path]:
    return sorted(p for pkg in SANS_IO_PACKAGES for p in (PACKAGE / pkg).rglob("*.py"))


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import time", ["time"]),
        ("import asyncio.events", ["asyncio"]),
        ("from asyncio import sleep", ["asyncio"]),
        ("import socket as s", ["socket"]),
        ("from ssl import *", ["ssl"]),
        ("import os, selectors", ["selectors"]),
        ("def f():\n    import time\n    return time.monotonic()", ["time"]),
        ("import importlib\nimportlib.import_module('socket')", ["socket"]),
        ("from importlib import import_module\nimport_module('ssl')", ["ssl"]),
        ("__import__('asyncio')", ["asyncio"]),
        ("try:\n    import ssl\nexcept ImportError:\n    ssl = None", ["ssl"]),
        ("if TYPE_CHECKING:\n    import ssl\nelse:\n    import time", ["time"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio", []),
        ("import typing\nif typing.TYPE_CHECKING:\n    import asyncio", []),
        ("import timeit, datetime, random, socketserver_like\nfrom .time import x\nfrom . import ssl", []),
        ("x = 'import time'", []),
    ],
)
def test_the_walker_itself(source: str, expected: list[str]) -> None:
    assert [name for _, name in banned_imports(source)] == expected


def test_sans_io_packages_exist_and_are_walked() -> None:
    for pkg in SANS_IO_PACKAGES:
        assert (PACKAGE / pkg / "__init__.py").is_file(), f"microenvoy/{pkg} is gone: update the test"
    modules = sans_io_modules()
    assert len(modules) >= 20
    # The modules we know do protocol work are among them.
    names = {_rel(p) for p in modules}
    assert {"microenvoy/codecs/http2.py", "microenvoy/codecs/quic.py", "microenvoy/core/events.py"} <= names


def test_sans_io_packages_import_no_io_modules() -> None:
    violations = []
    used_exceptions = set()
    for path in sans_io_modules():
        rel = _rel(path)
        for line, name in banned_imports(path.read_text(encoding="utf-8")):
            if (rel, name) in ALLOWED:
                used_exceptions.add((rel, name))
                continue
            violations.append(f"{rel}:{line}: imports {name}")
    assert violations == [], (
        "sans-IO code must not import asyncio/socket/ssl/selectors/time (CONVENTIONS.md 1): take `now` as "
        "an input and leave I/O to microenvoy/io/. Violations:\n  " + "\n  ".join(violations)
    )
    stale = set(ALLOWED) - used_exceptions
    assert not stale, f"exceptions no longer needed, remove them from ALLOWED: {sorted(stale)}"


def _loaded_after(code: str) -> set[str]:
    """Top-level module names present in sys.modules after running ``code`` in a fresh interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_sans_io_packages_do_not_load_io_modules_transitively() -> None:
    for pkg in SANS_IO_PACKAGES:
        if pkg in TRANSITIVE_EXEMPT:
            continue
        modules = [
            ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for p in sorted((PACKAGE / pkg).rglob("*.py"))
        ]
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
        loaded = _loaded_after(code) & (BANNED - {"time"})  # the interpreter itself loads `time`
        assert loaded == set(), f"importing microenvoy.{pkg} loads {sorted(loaded)}"


def test_importing_microenvoy_is_cheap() -> None:
    loaded = _loaded_after("import microenvoy")
    assert "microenvoy" in loaded
    heavy = loaded & set(HEAVY)
    assert heavy == set(), f"`import microenvoy` pulls {sorted(heavy)}; import them lazily where needed"
    assert loaded & {"asyncio", "ssl", "socket"} == set()


def test_importing_the_exchange_vocabulary_is_cheap() -> None:
    """Filters, bridges and tools import microenvoy.core; it must not drag in a protocol stack."""
    loaded = _loaded_after("import microenvoy.core, microenvoy.core.events, microenvoy.core.filter")
    assert loaded & set(HEAVY) == set()
