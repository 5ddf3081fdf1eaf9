"""Command line: ``controlplane-lite serve | push | status | rollout | keys | token``.

``--data DIR`` (default ``./controlplane-data``) holds the SQLite store (``store.sqlite``) and the Ed25519
signing key (``signing-key.pem``, created with mode 0600 on first use); every command takes it.

* ``serve --dir DIR [--listen ADDR] [--api ADDR]`` serves the delta xDS stream (default
  ``127.0.0.1:18000``; port 0 picks a free port), watches DIR and applies every valid change; prints
  ``serving on HOST:PORT`` and writes the port to ``DATA/serve.port``. It also serves the REST API
  (``rest.py``; default ``127.0.0.1:0``, ``--api off`` disables it), prints ``api on HOST:PORT`` and writes
  the port to ``DATA/api.port``.
* ``push FILE`` validates the file's resources against the stored set and stores them; a running ``serve``
  sees the change within its poll interval and pushes it. A bad file is refused with the place of every
  error and exit status 1.
* ``status`` prints the fleet: agent, profile, connected since, how many of its resources run the current
  version, and the last NACK with its message (``-v`` adds one line per resource); then every rollout:
  resource, version, stage, ACK/NACK counts, state and why.
* ``rollout list`` prints the rollouts table; ``rollout promote ID|[TYPE/]NAME [--force]`` sends a running
  rollout's version to everyone (``--force``: a halted one too).
* ``keys`` prints the public key (base64 of the raw 32 bytes) to pin in agent bootstraps; ``keys --ca``
  prints the CA certificate (PEM, ``DATA/ca.pem``) agents trust for the control plane's TLS.
* ``token --node ID [--ttl 1h]`` prints a one-time bootstrap token bound to that node id (stored hashed in
  ``DATA/identity.sqlite``); ``token --api`` prints the REST API bearer token (``DATA/api-token``, generated
  on first use).
* ``serve --tls`` serves mutual TLS with certificates of the control plane's CA (``DATA/ca-key.pem``,
  created on first use); ``--enroll-listen ADDR`` adds the TLS port where agents enroll with a token
  (written to ``DATA/enroll.port``). Without ``--tls`` (or with ``--insecure``) the stream is h2c.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from microenvoy.core.errors import ConfigError
from microenvoy.xds import cose

from controlplane_lite import __version__
from controlplane_lite.store import Store
from controlplane_lite.validate import describe

if TYPE_CHECKING:
    from controlplane_lite.identity import Enroller

__all__ = ["load_or_create_key", "main", "render_status"]

LOG_FORMAT = "[%(asctime)s.%(msecs)03d][%(levelname)s][%(name)s] %(message)s"
DEFAULT_DATA = "controlplane-data"
DEFAULT_LISTEN = "127.0.0.1:18000"
DEFAULT_API = "127.0.0.1:0"


def load_or_create_key(data_dir: str) -> Ed25519PrivateKey:
    """The signing key under ``data_dir`` (generated and written with mode 0600 on first use)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "signing-key.pem")
    try:
        with open(path, "rb") as f:
            return cose.load_private_key(f.read())
    except FileNotFoundError:
        pass
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def _open_store(data_dir: str) -> Store:
    os.makedirs(data_dir, exist_ok=True)
    return Store(os.path.join(data_dir, "store.sqlite"))


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def render_rollouts(store: Store) -> str:
    """The rollouts table (empty string when there is none)."""
    from controlplane_lite.rollout import progress

    rows = [["ROLLOUT", "RESOURCE", "VERSION", "STAGE", "ACKED", "NACKED", "STATE", "REASON"]]
    for p in progress(store):
        ro = p.rollout
        stage_acked = sum(1 for n in p.stage if n in p.acked)
        acked = f"{stage_acked}/{len(p.stage)} stage" if ro.active else f"{len(p.acked)}/{p.matching}"
        rows.append(
            [
                str(ro.id),
                describe((ro.type_url, ro.name)),
                ro.version,
                p.stage_label,
                acked,
                str(len(p.nacked)),
                ro.state,
                ro.reason or "-",
            ]
        )
    return _table(rows) if len(rows) > 1 else ""


def render_status(store: Store, *, verbose: bool = False) -> str:
    """The fleet table ``status`` prints (and the rollouts, if any)."""
    current = {(r.type_url, r.name): r.version for r in store.resources()}
    rows = [["AGENT", "PROFILE", "CONNECTED SINCE", "VERSIONS", "LAST NACK"]]
    details: list[str] = []
    for agent in store.agents():
        md = agent.metadata
        profile = str(md.get("firmware_profile") or md.get("profile") or "-")
        res = [r for r in store.agent_resources(agent.node_id) if r.sent_version]
        up_to_date = sum(
            1 for r in res if r.acked_version and r.acked_version == current.get((r.type_url, r.name))
        )
        nacks = [r for r in res if r.nack_version and r.nack_at is not None]
        last = max(nacks, key=lambda r: r.nack_at or 0.0, default=None)
        nack = "-"
        if last is not None:
            nack = f"{describe((last.type_url, last.name))} {last.nack_version}: {last.nack_message}"
        since = (
            _when(agent.connected_since) if agent.connected else f"offline (seen {_when(agent.last_seen)})"
        )
        rows.append([agent.node_id, profile, since, f"{up_to_date}/{len(res)} current", nack])
        if verbose:
            for r in res:
                want = current.get((r.type_url, r.name), "(deleted)")
                details.append(
                    f"  {agent.node_id}  {describe((r.type_url, r.name))}: sent {r.sent_version}, "
                    f"acked {r.acked_version or '-'}, current {want}"
                    + (f", NACKed {r.nack_version}: {r.nack_message}" if r.nack_version else "")
                )
    out = _table(rows) if len(rows) > 1 else "no agents yet"
    if details:
        out += "\n\n" + "\n".join(details)
    rollouts = render_rollouts(store)
    if rollouts:
        out += "\n\n" + rollouts
    return out


# ============================================================================================ commands
def _write_port(path: str, port: int) -> None:
    with open(path, "w") as f:
        f.write(f"{port}\n")


def _cmd_serve(args: argparse.Namespace) -> int:
    from controlplane_lite.server import ControlPlane

    logging.basicConfig(
        level=logging.WARNING, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr
    )
    logging.getLogger("controlplane_lite").setLevel(args.log_level.upper())
    if not os.path.isdir(args.dir):
        print(f"controlplane-lite: --dir {args.dir}: not a directory", file=sys.stderr)
        return 2
    key = load_or_create_key(args.data)
    store = _open_store(args.data)

    enroller = _enroller(args) if args.tls and not args.insecure else None

    async def serve() -> None:
        from controlplane_lite.rest import RestApi, load_or_create_api_token

        cp = ControlPlane(
            store,
            key,
            directory=args.dir,
            poll_interval=args.poll_interval,
            enroller=enroller,
            server_names=tuple(args.server_name),
        )
        port = await cp.start(args.listen, args.enroll_listen if enroller is not None else None)
        host = args.listen.rpartition(":")[0] or "127.0.0.1"
        if enroller is not None:
            _write_port(os.path.join(args.data, "enroll.port"), cp.enroll_port)
            print(f"controlplane-lite: mutual TLS, CA {enroller.ca.path}", flush=True)
            if cp.enroll_port:
                ehost = args.enroll_listen.rpartition(":")[0] or "127.0.0.1"
                print(f"controlplane-lite: enrollment on {ehost}:{cp.enroll_port}", flush=True)
        _write_port(os.path.join(args.data, "serve.port"), port)
        for e in cp.directory_errors:
            print(f"controlplane-lite: refused: {e}", file=sys.stderr)
        print(f"controlplane-lite: serving on {host}:{port}", flush=True)
        print(f"controlplane-lite: public key {cose.encode_public_key(key.public_key())}", flush=True)
        api: RestApi | None = None
        if args.api != "off":
            api = RestApi(store, load_or_create_api_token(args.data), on_change=cp.refresh)
            api_port = await api.start(args.api)
            _write_port(os.path.join(args.data, "api.port"), api_port)
            api_host = args.api.rpartition(":")[0] or "127.0.0.1"
            print(f"controlplane-lite: api on {api_host}:{api_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            if api is not None:
                await api.stop()
            await cp.stop(1.0)

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
        if enroller is not None:
            enroller.tokens.close()
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from controlplane_lite.apply import apply_change
    from controlplane_lite.sources import load_file

    store = _open_store(args.data)
    try:
        specs = []
        for path in args.files:
            specs.extend(load_file(path, path, f"push:{path}"))
        change = apply_change(store, specs, source="push")
        active = store.active_rollouts()
    except ConfigError as exc:
        for e in exc.errors:
            print(f"controlplane-lite: refused: {e}", file=sys.stderr)
        print("controlplane-lite: nothing was stored", file=sys.stderr)
        return 1
    finally:
        store.close()
    for key, spec in sorted(change.upserts.items()):
        ro = active.get(key)
        staged = ""
        if ro is not None and ro.version == spec.version:
            staged = f" (rollout {ro.id}: first {ro.percent}% of the matching agents)"
        print(f"stored {describe(key)} version {spec.version}{staged}")
    unchanged = len(specs) - len(change.upserts)
    if unchanged:
        print(f"{unchanged} unchanged")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    store = _open_store(args.data)
    try:
        print(render_status(store, verbose=args.verbose))
    finally:
        store.close()
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.ca:
        from controlplane_lite.ca import CertificateAuthority

        ca = CertificateAuthority.load_or_create(args.data, now=time.time())
        print(ca.ca_pem.decode("ascii"), end="")
        print(f"controlplane-lite: CA certificate {ca.path}", file=sys.stderr)
        return 0
    key = load_or_create_key(args.data)
    print(cose.encode_public_key(key.public_key()))
    return 0


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds (argparse type)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    scale = units.get(text[-1:], 1.0)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 15m, 1h, 7d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be greater than 0")
    return value


def _enroller(args: argparse.Namespace) -> Enroller:
    """The CA (created on first use) and the token store under ``--data``, as an ``Enroller``."""
    from controlplane_lite.ca import CertificateAuthority
    from controlplane_lite.identity import Enroller, TokenStore

    ca = CertificateAuthority.load_or_create(
        args.data, trust_domain=args.trust_domain, cert_ttl=args.cert_ttl, now=time.time()
    )
    return Enroller(ca, TokenStore(os.path.join(args.data, "identity.sqlite")))


def _cmd_token(args: argparse.Namespace) -> int:
    if args.api:
        from controlplane_lite.rest import load_or_create_api_token

        print(load_or_create_api_token(args.data))
        return 0
    if not args.node:
        print("controlplane-lite token: --node ID (a bootstrap token) or --api is required", file=sys.stderr)
        return 2
    from controlplane_lite.identity import TokenStore

    os.makedirs(args.data, exist_ok=True)
    tokens = TokenStore(os.path.join(args.data, "identity.sqlite"))
    try:
        token = tokens.create(args.node, args.ttl)
    except ValueError as exc:
        print(f"controlplane-lite token: {exc}", file=sys.stderr)
        return 2
    finally:
        tokens.close()
    print(token)
    print(f"controlplane-lite: one-time token for node {args.node}, valid {args.ttl:g}s", file=sys.stderr)
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from controlplane_lite.rollout import find_rollout

    store = _open_store(args.data)
    try:
        if args.action == "list":
            print(render_rollouts(store) or "no rollouts")
            return 0
        if not args.ref:
            print("controlplane-lite rollout promote: say which rollout (ID or [TYPE/]NAME)", file=sys.stderr)
            return 2
        try:
            ro = find_rollout(store, args.ref)
            done = store.promote_rollout(ro.id, force=args.force)
        except (LookupError, ValueError) as exc:
            print(f"controlplane-lite: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 1
        print(f"rollout {done.id} of {describe((done.type_url, done.name))} version {done.version}: complete")
        return 0
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="controlplane-lite", description="A delta-xDS control plane for microenvoy."
    )
    p.add_argument("--version", action="version", version=f"controlplane-lite {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--data", default=DEFAULT_DATA, help=f"data directory (default {DEFAULT_DATA})")
        return sp

    s = cmd("serve", "serve the delta xDS stream from a watched resource directory")
    s.add_argument("--dir", required=True, help="directory of YAML resource files")
    s.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN}; port 0 = free)"
    )
    s.add_argument("--poll-interval", type=float, default=0.5, help="seconds between directory/store polls")
    s.add_argument(
        "--api", default=DEFAULT_API, help=f"REST API HOST:PORT (default {DEFAULT_API}; 'off' disables it)"
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--tls", action="store_true", help="mutual TLS with the control plane's CA (node identity)"
    )
    s.add_argument("--insecure", action="store_true", help="plain h2c (the default; overrides --tls)")
    s.add_argument("--enroll-listen", default=None, help="HOST:PORT of the enrollment port (with --tls)")
    s.add_argument(
        "--server-name", action="append", default=[], help="extra SAN of the server certificate (repeatable)"
    )
    s.add_argument(
        "--trust-domain", default=None, help="SPIFFE trust domain of a new CA (default microenvoy)"
    )
    s.add_argument("--cert-ttl", type=_seconds, default=86400.0, help="agent certificate lifetime (24h)")
    s.set_defaults(func=_cmd_serve)
    pu = cmd("push", "validate and store the resources of YAML files")
    pu.add_argument("files", nargs="+", metavar="FILE")
    pu.set_defaults(func=_cmd_push)
    st = cmd("status", "show agents, their versions and NACKs")
    st.add_argument("-v", "--verbose", action="store_true", help="one line per agent and resource")
    st.set_defaults(func=_cmd_status)
    ke = cmd("keys", "print the resource signing public key (base64) for agent bootstraps")
    ke.add_argument("--ca", action="store_true", help="print the CA certificate (PEM) instead")
    ke.set_defaults(func=_cmd_keys)
    tk = cmd("token", "issue a one-time bootstrap token for an agent's first certificate")
    tk.add_argument("--node", help="the agent's node id the token is bound to")
    tk.add_argument("--api", action="store_true", help="print the REST API bearer token instead")
    tk.add_argument("--ttl", type=_seconds, default=3600.0, help="validity (default 1h)")
    tk.set_defaults(func=_cmd_token)
    ro = cmd("rollout", "list staged rollouts, or promote one to every agent")
    ro.add_argument("action", choices=["list", "promote"])
    ro.add_argument("ref", nargs="?", help="rollout id, or the resource as NAME or TYPE/NAME")
    ro.add_argument("--force", action="store_true", help="promote a halted rollout too")
    ro.set_defaults(func=_cmd_rollout)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
