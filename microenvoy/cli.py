"""Command line: ``microenvoy run | validate | demo | version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from microenvoy import __version__

__all__ = ["main"]

LOG_FORMAT = "[%(asctime)s.%(msecs)03d][%(levelname)s][%(name)s] %(message)s"


def _setup_logging(level: str) -> None:
    from microenvoy.admin.logging import parse_level

    # Libraries (aioquic, h2, hpack) stay at WARNING: their DEBUG output is per frame and would drown ours.
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S",
                        stream=sys.stderr)  # fmt: skip
    logging.getLogger("microenvoy").setLevel(parse_level(level))


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where available (Linux), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _cmd_validate(args: argparse.Namespace) -> int:
    from microenvoy.config.loader import load_bootstrap
    from microenvoy.core.errors import ConfigError

    try:
        b = load_bootstrap(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        print(f"{args.config}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    sr = b.static_resources
    print(f"{args.config}: OK ({len(sr.listeners)} listeners, {len(sr.clusters)} clusters)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from microenvoy.config.loader import load_bootstrap
    from microenvoy.core.errors import ConfigError
    from microenvoy.io.server import Server

    _setup_logging(args.log_level)
    try:
        bootstrap = load_bootstrap(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return 1

    async def main() -> None:
        server = Server(bootstrap, config_path=args.config, admin_address_path=args.admin_address_path)
        await server.run()

    try:
        run_async(main())
    except OSError as exc:
        logging.getLogger("microenvoy").error("cannot start: %s", exc)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from microenvoy.demo import run_demo

    _setup_logging(args.log_level)
    return int(run_async(run_demo(args)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="microenvoy", description="A small Envoy-style mesh agent.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the agent with a config file")
    r.add_argument("-c", "--config", required=True, help="bootstrap YAML or JSON")
    r.add_argument("--log-level", default="info", help="trace|debug|info|warning|error|critical|off")
    r.add_argument("--admin-address-path", help="write the bound admin address (host:port) to this file")
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate", help="check a config file; prints every error with its path")
    v.add_argument("-c", "--config", required=True)
    v.set_defaults(func=_cmd_validate)
    d = sub.add_parser("demo", help="run the built-in demo (no files needed)")
    d.add_argument("--http-port", type=int, default=10000, help="HTTP/1.1 + h2c listener (TCP)")
    d.add_argument("--https-port", type=int, default=10443, help="HTTP/3 (UDP) and TLS (TCP) listeners")
    d.add_argument("--admin-port", type=int, default=9901)
    d.add_argument("--mqtt-port", type=int, default=1883, help="MQTT 3.1.1 / 5.0 listener (TCP)")
    d.add_argument("--coap-port", type=int, default=5683, help="CoAP listener (UDP)")
    d.add_argument("--log-level", default="info")
    d.add_argument("--admin-address-path", help="write the bound admin address (host:port) to this file")
    d.set_defaults(func=_cmd_demo)
    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=lambda a: print(f"microenvoy {__version__}") or 0)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
