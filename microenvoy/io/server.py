"""The agent process: builds listeners, clusters and the admin server from a bootstrap, reloads, drains.

``Server`` is also the ``AdminHost`` the admin server talks to.

Reload (SIGHUP or ``reload()``) goes through the same validated path as start-up: the file is loaded and
cross-checked, every new HTTP front (route tables, filter factories) is built, and only when all of that
succeeded is anything swapped in, so a bad config never half-applies. Listeners with the same name and
address keep their socket: new connections get the new filter chain, open connections keep theirs.
Listeners that disappeared drain (GOAWAY / ``Connection: close``) and close after their drain timeout.
Clusters are handed to ``ClusterManager.update`` (unchanged ones keep their pools).

SIGTERM (and ``/quitquitquit``): stop accepting, drain every connection, wait up to the longest listener
``drain_timeout`` for open exchanges to finish, then close everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random as _random
import signal
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from microenvoy import __version__
from microenvoy.admin import logging as admin_logging
from microenvoy.admin.stats import Store
from microenvoy.config.dump import redact
from microenvoy.config.loader import load_bootstrap
from microenvoy.config.model import AccessLog, Bootstrap, FilterChain, HttpConnectionManager, Listener
from microenvoy.core.errors import ConfigError
from microenvoy.filters.http.health_check import HealthState
from microenvoy.io.access_log import AccessLogger
from microenvoy.io.admin_server import AdminServer
from microenvoy.io.http_front import HttpFront
from microenvoy.io.tcp_front import FilterChainRuntime, ListenerStats, TcpListener
from microenvoy.io.upstream import ClusterManager

if TYPE_CHECKING:  # QUIC (aioquic, ~12 MiB resident) is imported only when a UDP listener is configured
    from microenvoy.config.tracing import Tracing
    from microenvoy.io.coap_front import CoapListener
    from microenvoy.io.quic_front import QuicListener
    from microenvoy.io.trace_export import SpanExporter

__all__ = ["ListenerBindError", "Server"]

log = logging.getLogger("microenvoy.server")

HCM = "envoy.filters.network.http_connection_manager"


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _mqtt_proxy(chain: FilterChain) -> Any:
    for f in chain.filters:
        if f.name == "microenvoy.filters.network.mqtt_proxy":
            return f.config
    return None


def _coap_proxy(chain: FilterChain) -> Any:
    for f in chain.filters:
        if f.name == "microenvoy.filters.network.coap_proxy":
            return f.config
    return None


class ListenerBindError(ConfigError):
    """Listeners of an applied update could not bind (the rest applied): ``failed`` name -> why."""

    def __init__(self, failed: dict[str, str]) -> None:
        super().__init__([f"listener {n}: {why}" for n, why in failed.items()])
        self.failed = failed


def _kind(lc: Listener) -> str:
    """``tcp``, ``quic`` or ``coap``: a listener whose kind changes on reload is replaced, not updated."""
    if any(_coap_proxy(c) is not None for c in lc.filter_chains):
        return "coap"
    return "quic" if lc.address.protocol == "UDP" else "tcp"


def _hcm(chain: FilterChain) -> HttpConnectionManager:
    for f in chain.filters:
        if f.name == HCM:
            assert isinstance(f.config, HttpConnectionManager)
            return f.config
    raise ConfigError([f"filter_chains: no {HCM} filter (the only network filter supported so far)"])


class Server:
    """One microenvoy agent (see the module docstring)."""

    def __init__(
        self,
        bootstrap: Bootstrap,
        *,
        config_path: str | None = None,
        admin_address_path: str | None = None,
        rng: _random.Random | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.config_path = config_path
        self.admin_address_path = admin_address_path
        self.random = rng or _random.Random()
        self.stats = Store()
        self.health = HealthState()
        self.state = "PRE_INITIALIZING"
        self.started_at = time.time()
        self.clusters = ClusterManager(bootstrap.static_resources.clusters, self.stats, random=self.random)
        self._lst: dict[str, TcpListener | QuicListener | CoapListener] = {}
        self._listener_configs: dict[str, Listener] = {}
        self._brokers: dict[tuple[str, str, Any], Any] = {}
        """Local MQTT brokers by (listener, stat_prefix, bounds): sessions survive a reload."""
        self._access_loggers: dict[AccessLog, AccessLogger] = {}
        """One logger (one open file) per distinct access_log config, shared by fronts and kept across
        reloads, so reloading never leaks file handles."""
        self._exporters: dict[Tracing, SpanExporter | None] = {}
        """One span exporter per distinct tracing config, kept across reloads that keep the config."""
        self.admin: AdminServer | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._built: dict[str, tuple[Listener, list[FilterChainRuntime]]] = {}
        """Per listener: the config object its running fronts were built from (an update that keeps the
        object, as the control-plane client does for unchanged listeners, keeps the fronts)."""
        self.static_doc: dict[str, Any] = bootstrap.raw
        """The bootstrap document as written (file or demo); dynamic resources are composed onto it."""
        self.xds: Any = None
        """``microenvoy.io.xds.XdsSession`` when the bootstrap has ``dynamic_resources``."""
        self.reloads = self.stats.counter("server.reload_success")
        self.reloads_rejected = self.stats.counter("server.reload_rejected")
        self.stats.gauge("server.live")
        self.stats.gauge("server.uptime")

    def __repr__(self) -> str:
        return f"<Server {self.state} listeners={len(self._lst)}>"

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.state = "INITIALIZING"
        self._stopped = asyncio.get_running_loop().create_future()
        await self.clusters.start()
        if self.bootstrap.dynamic_resources is not None:
            from microenvoy.io.xds import XdsSession  # only agents with a control plane load it

            self.xds = XdsSession(self, self.bootstrap.dynamic_resources)
            await self.xds.initial()  # the first update, or the cache, or static only (bounded)
        fronts = self._build_fronts(self.bootstrap)
        for lc in self.bootstrap.static_resources.listeners:
            await self._start_listener(lc, fronts[lc.name])
        self.admin = AdminServer(self, self.bootstrap.admin.address)
        await self.admin.start()
        if self.admin_address_path:
            _write_atomically(self.admin_address_path, f"{self.admin.address[0]}:{self.admin.port}\n")
        self.state = "LIVE"
        self.stats.gauge("server.live").set(1)
        for name, lst in self._lst.items():
            proto = "tcp" if isinstance(lst, TcpListener) else "udp"
            log.info("listener %s on %s:%d/%s", name, lst.host, lst.bound_port, proto)

    async def run(self) -> None:
        """Start, then serve until SIGTERM/SIGINT or /quitquitquit; SIGHUP reloads."""
        await self.start()
        await self.serve()

    async def serve(self) -> None:
        """After ``start()``: wait for the end, with the signal handlers installed."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, self.quit)
            loop.add_signal_handler(signal.SIGINT, self.quit)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        assert self._stopped is not None
        await self._stopped

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        self.reload()

    def quit(self) -> None:
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self, drain: bool = True) -> None:
        self.state = "DRAINING"
        self.stats.gauge("server.live").set(0)
        timeout = max((lc.drain_timeout for lc in self._listener_configs.values()), default=5.0)
        for lst in self._lst.values():
            await lst.stop_accepting()
            if drain:
                lst.drain()
        if drain:
            deadline = time.monotonic() + timeout
            # Shutdown only: poll the two listener kinds' connection sets every 50 ms.
            while time.monotonic() < deadline and any(  # noqa: ASYNC110
                lst.connections for lst in self._lst.values()
            ):
                await asyncio.sleep(0.05)
        for lst in self._lst.values():
            lst.close_all()
        for al in self._access_loggers.values():
            await al.aclose()
        if self.xds is not None:
            await self.xds.close()
        for exporter in self._exporters.values():
            if exporter is not None:
                await exporter.close()  # the final flush goes through the collector's cluster: close it first
        await self.clusters.close()
        if self.admin is not None:
            await self.admin.close()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # --------------------------------------------------------------------------------- building
    def _build_fronts(self, b: Bootstrap) -> dict[str, list[FilterChainRuntime]]:
        """Every listener's filter chains (HTTP front + TLS context each), or ConfigError.

        Everything that can fail (route tables, filter configs, certificates) is built here, before anything
        is swapped in, so a bad config never half-applies.
        """
        fronts: dict[str, list[FilterChainRuntime]] = {}
        errors: list[str] = []
        names = {lc.name: lc for lc in b.static_resources.listeners}
        for i, lc in enumerate(b.static_resources.listeners):
            built = self._built.get(lc.name)
            if built is not None and built[0] is lc:  # the very same config object: its fronts are still good
                fronts[lc.name] = built[1]
                continue
            if lc.address.protocol == "UDP" and lc.quic_options is not None and len(lc.filter_chains) > 1:
                log.warning("listener %s: QUIC uses its first filter chain only", lc.name)
            chains: list[FilterChainRuntime] = []
            for j, chain in enumerate(lc.filter_chains):
                try:
                    mqtt = _mqtt_proxy(chain)
                    if mqtt is not None:
                        if lc.address.protocol == "UDP":
                            raise ConfigError(["filters: an MQTT listener needs a TCP address"])
                        chains.append(self._mqtt_chain(lc, chain, mqtt))
                        continue
                    coap = _coap_proxy(chain)
                    if coap is not None:
                        chains.append(self._coap_chain(lc, coap))
                        continue
                    hcm = _hcm(chain)
                    loggers = tuple(self._access_logger(a) for a in hcm.access_log)
                    if lc.quic_options is not None and chain.transport_socket is not None:
                        from microenvoy.io.quic_front import quic_configuration

                        quic_configuration(lc.quic_options, chain.transport_socket)  # certificate check
                    front = HttpFront(
                        hcm,
                        clusters=self.clusters,
                        stats=self.stats,
                        rng=self.random,
                        health=self.health,
                        alt_svc=self._alt_svc(lc, names),
                        access_loggers=loggers,
                        buffer_limit=lc.per_connection_buffer_limit_bytes,
                        exporter=self._exporter(hcm.tracing),
                    )
                    tls = None if lc.address.protocol == "UDP" else self._ssl_context(chain, hcm)
                    chains.append(FilterChainRuntime(chain.server_names, front, tls))
                except ConfigError as exc:
                    errors += [f"static_resources.listeners[{i}].filter_chains[{j}].{e}" for e in exc.errors]
                except (ValueError, OSError, ssl.SSLError) as exc:
                    errors.append(f"static_resources.listeners[{i}].filter_chains[{j}]: {exc}")
            fronts[lc.name] = chains
        if errors:
            raise ConfigError(errors)
        return fronts

    def _mqtt_chain(self, lc: Listener, chain: FilterChain, config: Any) -> FilterChainRuntime:
        from microenvoy.io.mqtt_front import MqttFront, broker_limits  # only agents with MQTT load it
        from microenvoy.io.tls import server_context

        # The broker (sessions, subscriptions, retained messages) outlives reloads while its bounds stay.
        key = (lc.name, config.stat_prefix, broker_limits(config))
        front = MqttFront(
            config,
            clusters=self.clusters,
            stats=self.stats,
            listener_name=lc.name,
            broker=self._brokers.get(key),
            rng=self.random,
            health=self.health,
        )
        self._brokers[key] = front.broker
        from microenvoy.io.mqtt_upstream import register_local_front

        register_local_front(self.clusters, lc.name, front)  # downlink from upstream MQTT broker clusters
        tls = server_context(chain.transport_socket, ["mqtt"]) if chain.transport_socket is not None else None
        return FilterChainRuntime(chain.server_names, None, tls, mqtt=front)

    def _coap_chain(self, lc: Listener, config: Any) -> FilterChainRuntime:
        from microenvoy.io.coap_front import CoapFront, coap_http_config  # only agents with CoAP load it

        hcm = coap_http_config(config)
        http = HttpFront(
            hcm,
            clusters=self.clusters,
            stats=self.stats,
            rng=self.random,
            health=self.health,
            access_loggers=tuple(self._access_logger(a) for a in hcm.access_log),
            buffer_limit=lc.per_connection_buffer_limit_bytes,
        )
        front = CoapFront(config, http, stats=self.stats, listener_name=lc.name)
        return FilterChainRuntime((), None, None, coap=front)

    def _access_logger(self, config: AccessLog) -> AccessLogger:
        logger = self._access_loggers.get(config)
        if logger is None:
            logger = self._access_loggers[config] = AccessLogger(config, self.stats)
        return logger

    def _exporter(self, tracing: Tracing | None) -> SpanExporter | None:
        if tracing is None:
            return None
        if tracing not in self._exporters:
            from microenvoy.io.trace_export import make_exporter  # only agents that export spans load it

            self._exporters[tracing] = make_exporter(tracing, self.clusters, self.stats)
        return self._exporters[tracing]

    def _alt_svc(self, lc: Listener, names: dict[str, Listener]) -> Any:
        adv = lc.advertise_http3
        if adv is None:
            return None
        target, max_age = adv.listener, adv.max_age

        def value() -> bytes | None:
            lst = self._lst.get(target)
            if lst is None or not lst.bound_port:
                return None
            return f'h3=":{lst.bound_port}"; ma={max_age}'.encode()

        return value

    async def _start_listener(self, lc: Listener, chains: list[FilterChainRuntime]) -> None:
        addr = lc.address
        scope = self.stats.scope(f"listener.{addr.address}_{addr.port_value}.")
        chain = lc.filter_chains[0]
        lst: TcpListener | QuicListener | CoapListener
        if chains and chains[0].coap is not None:
            from microenvoy.io.coap_front import CoapListener

            lst = CoapListener(lc.name, addr.address, addr.port_value, chains[0].coap, stats=scope)
            lst.export_stats(self.stats)
        elif addr.protocol == "UDP":
            assert lc.quic_options is not None
            assert chain.transport_socket is not None
            from microenvoy.io.quic_front import QuicListener

            lst = QuicListener(
                lc.name, addr.address, addr.port_value, chains[0].front, options=lc.quic_options,
                tls=chain.transport_socket, stats=scope, max_connections=lc.max_connections,
            )  # fmt: skip
        else:
            lst = TcpListener(
                lc.name, addr.address, addr.port_value, chains, stats=scope,
                max_connections=lc.max_connections, buffer_limit=lc.per_connection_buffer_limit_bytes,
            )  # fmt: skip
        await lst.start()
        if addr.port_value == 0:
            # Name the stats after the bound port, as Envoy does.
            lst.stats = ListenerStats(self.stats.scope(f"listener.{addr.address}_{lst.bound_port}."))
        self._lst[lc.name] = lst
        self._listener_configs[lc.name] = lc
        self._built[lc.name] = (lc, chains)

    @staticmethod
    def _ssl_context(chain: FilterChain, hcm: HttpConnectionManager) -> Any:
        if chain.transport_socket is None:
            return None
        from microenvoy.io.tls import server_context

        alpn = {"HTTP1": ["http/1.1"], "HTTP2": ["h2"]}.get(hcm.codec_type, ["h2", "http/1.1"])
        return server_context(chain.transport_socket, alpn)

    # ---------------------------------------------------------------------------------- reload
    def reload(self) -> bool:
        """Reload the config file; True if applied. A bad file changes nothing."""
        if self.config_path is None:
            return False
        try:
            b = load_bootstrap(self.config_path)
            if self.xds is not None:  # the new static part, with the dynamic resources composed onto it
                b = self.xds.recompose(b)
            fronts = self._build_fronts(b)
        except ConfigError as exc:
            self.reloads_rejected.inc()
            log.error("reload rejected, keeping the running config:\n  %s", "\n  ".join(exc.errors))
            return False
        except OSError as exc:
            self.reloads_rejected.inc()
            log.error("reload rejected: %s", exc)
            return False
        self.static_doc = self.xds.static_doc if self.xds is not None else b.raw  # b may be recomposed
        asyncio.get_running_loop().create_task(self._apply(b, fronts))
        return True

    async def apply_config(
        self, b: Bootstrap, *, cluster_delta: tuple[Sequence[Any], Sequence[str]] | None = None
    ) -> None:
        """Apply a validated configuration (the control plane's): every front is built first, then swapped
        in as a reload does; raises ``ConfigError`` (nothing changed) if building fails."""
        if self.state == "INITIALIZING":  # before listeners start: they will be built from this one
            self.clusters.update(b.static_resources.clusters)
            self.bootstrap = b
            return
        fronts = self._build_fronts(b)
        await self._apply(b, fronts, drain_changed=True, cluster_delta=cluster_delta)

    async def _apply(
        self,
        b: Bootstrap,
        fronts: dict[str, list[FilterChainRuntime]],
        *,
        drain_changed: bool = False,
        cluster_delta: tuple[Sequence[Any], Sequence[str]] | None = None,
    ) -> None:
        """Swap in built fronts. ``drain_changed`` (control-plane updates): the open connections of a
        listener whose config changed drain (``TcpListener.drain_connections``); a SIGHUP reload lets them
        keep their chain until they end."""
        self.clusters.update(b.static_resources.clusters, delta=cluster_delta)
        new = {lc.name: lc for lc in b.static_resources.listeners}
        unbound: dict[str, str] = {}
        for name in list(self._lst):
            old_cfg = self._listener_configs[name]
            lc = new.get(name)
            if lc is not None and lc.address == old_cfg.address and _kind(lc) == _kind(old_cfg):
                continue
            lst = self._lst.pop(name)
            self._listener_configs.pop(name)
            self._built.pop(name, None)
            await lst.stop_accepting()
            lst.drain()
            asyncio.get_running_loop().call_later(old_cfg.drain_timeout, lst.close_all)
        for name, lc in new.items():
            front = fronts[name]
            existing = self._lst.get(name)
            if existing is None:
                try:
                    await self._start_listener(lc, front)
                except OSError as exc:
                    log.error("listener %s: cannot bind %s: %s", name, lc.address, exc)
                    unbound[name] = (
                        f"cannot bind {lc.address.address}:{lc.address.port_value}: {exc.strerror or exc}"
                    )
                continue
            previous = self._listener_configs.get(name)
            if previous is lc:  # unchanged (the control-plane client keeps unchanged objects)
                continue
            chain = lc.filter_chains[0]
            if isinstance(existing, TcpListener):
                existing.update(front, lc.max_connections)
                if drain_changed and lc != previous:
                    existing.drain_connections(lc.drain_timeout)
            elif front and front[0].coap is not None:
                cast("CoapListener", existing).update(front[0].coap)
            else:
                assert lc.quic_options is not None
                assert chain.transport_socket is not None
                quic = cast("QuicListener", existing)
                quic.update(front[0].front, lc.quic_options, chain.transport_socket, lc.max_connections)
            self._listener_configs[name] = lc
            self._built[name] = (lc, front)
        self.bootstrap = b
        self.reloads.inc()
        log.info("config reloaded: %d listeners, %d clusters", len(new), len(b.static_resources.clusters))
        if unbound and drain_changed:  # the control plane hears about it (a NACK naming the listeners)
            raise ListenerBindError(unbound)

    # ----------------------------------------------------------------------------- AdminHost
    def ready(self) -> bool:
        return self.state == "LIVE"

    def config_dump(self) -> dict[str, Any]:
        return {
            "configs": [
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                    "bootstrap": redact(self.xds.raw_doc() if self.xds is not None else self.bootstrap.raw),
                }
            ]
        }

    def clusters_text(self) -> str:
        return self.clusters.admin_clusters_text()

    def clusters_json(self) -> dict[str, Any]:
        return self.clusters.admin_clusters_json()

    def listeners(self) -> list[dict[str, Any]]:
        out = []
        for name, lst in self._lst.items():
            proto = "TCP" if isinstance(lst, TcpListener) else "UDP"
            out.append(
                {
                    "name": name,
                    "local_address": {
                        "socket_address": {
                            "address": lst.host,
                            "port_value": lst.bound_port,
                            "protocol": proto,
                        }
                    },
                }
            )
        return out

    def server_info(self) -> dict[str, Any]:
        node = self.bootstrap.node
        up = int(time.time() - self.started_at)
        return {
            "version": f"microenvoy/{__version__}",
            "state": self.state,
            "uptime_current_epoch": f"{up}s",
            "uptime_all_epochs": f"{up}s",
            "node": {"id": node.id, "cluster": node.cluster, "metadata": node.metadata},
            "command_line_options": {"config_path": self.config_path or ""},
            "config_source": self.xds.info() if self.xds is not None else {"source": "static"},
        }

    def healthcheck_fail(self) -> None:
        self.health.failing = True

    def healthcheck_ok(self) -> None:
        self.health.failing = False

    def drain_listeners(self, graceful: bool, inbound_only: bool) -> None:
        async def drain() -> None:
            for lst in self._lst.values():
                await lst.stop_accepting()
                lst.drain()

        asyncio.get_running_loop().create_task(drain())

    def set_log_level(self, level: str, logger: str | None) -> str:
        return admin_logging.set_level(level, logger)

    def dump_json(self) -> str:
        return json.dumps(self.config_dump(), indent=2)
