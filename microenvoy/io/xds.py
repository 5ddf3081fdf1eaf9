"""The agent's delta xDS session: one gRPC stream to the control plane, updates applied live, the cache.

``XdsSession`` drives the sans-IO ``microenvoy.xds.client.DeltaClient`` over a bidirectional gRPC stream
(``DeltaAggregatedResources``, CBOR messages) opened on the agent's own static cluster (``xds_cluster``), so
retries, health, TLS and stats are the ordinary cluster machinery. For each response:

1. every resource's COSE_Sign1 signature is verified against the pinned keys (a bad or missing one is
   rejected and counted in ``xds.signature_invalid``);
2. the candidate set (applied resources + this update - removals) is composed onto the static bootstrap and
   validated by the loader (``microenvoy.xds.resources``); an invalid resource is rejected by name and its
   last good version stays in effect; a resource that references what the agent does not have yet is held;
3. the result is applied through the server's reload path (fronts built first, then swapped; changed
   clusters warm before they replace the old), the applied resources are persisted in the offline cache,
   and the response is ACKed, or NACKed naming only the rejected resources.

At start the server waits up to ``initial_fetch_timeout`` for the first update; without one it starts from the
cache (signatures verified again) and says so in the log and ``/server_info``. The stream reconnects with
jittered exponential backoff (500 ms to 30 s), failing over between the configured clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microenvoy import __version__
from microenvoy.codecs.grpc import GrpcMessageDecoder, encode_message
from microenvoy.config.model import Bootstrap
from microenvoy.core.errors import ConfigError
from microenvoy.core.headers import Headers
from microenvoy.io.server import ListenerBindError
from microenvoy.xds import cose
from microenvoy.xds.client import DeltaClient, Update
from microenvoy.xds.messages import (
    DeltaRequest,
    DeltaResponse,
    Node,
    XdsProtocolError,
    decode_response,
    encode_request,
)
from microenvoy.xds.resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    SECRET,
    TYPES,
    Key,
    Validator,
    Verdict,
    describe,
    references,
)

if TYPE_CHECKING:
    from microenvoy.config.xds import DynamicResources
    from microenvoy.io.server import Server

__all__ = ["XDS_PATH", "XdsSession", "grpc_target"]

log = logging.getLogger("microenvoy.xds")

XDS_PATH = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
_MAX_MESSAGE = 16 * 1048576
_FIRST_TYPES = (CLUSTER, LISTENER)
"""The initial fetch is over once these (wildcard) types have had their first response."""


@dataclass(slots=True)
class Applied:
    """One resource as the agent has it (what is cached and what a NACK falls back to)."""

    version: str
    resource: dict[str, Any]
    signature: bytes


def grpc_target(clusters: Any, cluster_name: str, path: bytes, authority: str) -> tuple[Any, Any, Headers]:
    """The cluster, a host and the request headers of a gRPC call (CBOR messages) to the control plane on
    ``cluster_name``; ``ConnectionError`` if the cluster is unknown or has no healthy host."""
    cluster = clusters.get(cluster_name)
    if cluster is None:
        raise ConnectionError(f"cluster {cluster_name!r} is not configured")
    host = cluster.choose_host()
    if host is None:
        raise ConnectionError(f"cluster {cluster_name!r} has no healthy host")
    headers = Headers(
        [
            (b":method", b"POST"),
            (b":scheme", b"https" if cluster.config.transport_socket is not None else b"http"),
            (b":authority", (authority or cluster_name).encode()),
            (b":path", path),
            (b"content-type", b"application/grpc+cbor"),
            (b"te", b"trailers"),
        ]
    )
    return cluster, host, headers


class _ResourcesView(Mapping[str, Mapping[str, Mapping[str, Any]]]):
    """``type -> name -> resource`` over the applied set, without copying it (10,000 clusters)."""

    def __init__(self, applied: dict[str, dict[str, Applied]]) -> None:
        self._applied = applied

    def __getitem__(self, type_url: str) -> Mapping[str, Mapping[str, Any]]:
        return _TypeView(self._applied[type_url])

    def __iter__(self) -> Iterator[str]:
        return iter(self._applied)

    def __len__(self) -> int:
        return len(self._applied)


class _TypeView(Mapping[str, Mapping[str, Any]]):
    def __init__(self, items: dict[str, Applied]) -> None:
        self._items = items

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self._items[name].resource

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _VersionsView(Mapping[Key, str]):
    def __init__(self, applied: dict[str, dict[str, Applied]]) -> None:
        self._applied = applied

    def __getitem__(self, key: Key) -> str:
        return self._applied[key[0]][key[1]].version

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and key[0] in self._applied and key[1] in self._applied[key[0]]

    def __iter__(self) -> Iterator[Key]:
        return ((t, n) for t, v in self._applied.items() for n in v)

    def __len__(self) -> int:
        return sum(len(v) for v in self._applied.values())


class XdsSession:
    """See the module docstring."""

    def __init__(self, server: Server, config: DynamicResources) -> None:
        self.server = server
        self.config = config
        self.static_doc: dict[str, Any] = server.static_doc
        self.base_dir: str | None = (
            os.path.dirname(os.path.abspath(server.config_path)) if server.config_path else None
        )
        """Relative file names resolve against the config file's directory, as when the server loaded it."""
        self.validator = Validator(self.static_doc, base_dir=self.base_dir)
        b = server.bootstrap
        node = Node(
            id=b.node.id, cluster=b.node.cluster, metadata={**b.node.metadata, "agent_version": __version__}
        )
        self.client = DeltaClient(node, rng=server.random)
        self.trusted = cose.trusted_keys(cose.load_public_key(t) for t in config.trusted_keys)
        self.applied: dict[str, dict[str, Applied]] = {t: {} for t in TYPES}
        self.held: dict[Key, str] = {}
        self.source = "static"
        self.cache: Any = None
        if config.cache_dir:
            from microenvoy.io.xds_cache import XdsCache

            self.cache = XdsCache(config.cache_dir)
        stats = server.stats
        self.connected = stats.gauge("xds.connected_state")
        self.signature_invalid = stats.counter("xds.signature_invalid")
        self.stream_errors = stats.counter("xds.stream_errors")
        self.cache_loaded = stats.gauge("xds.cache_loaded")
        self._per_type = {
            t: {
                name: stats.counter(f"xds.{t.rsplit('.', 1)[1]}.{name}")
                for name in ("update_attempt", "update_success", "update_rejected", "held")
            }
            for t in TYPES
        }
        self._update_time = {t: stats.histogram(f"xds.{t.rsplit('.', 1)[1]}.update_time") for t in TYPES}
        self.version_text: dict[str, str] = {}
        self._first = asyncio.get_running_loop().create_future()
        self._seen: set[str] = set()
        self._in_sync = True
        self._refs: dict[Key, tuple[str, set[Key]]] = {}
        """Per Cluster/Listener (at its version): what it references (EDS, RDS, SDS names)."""
        """The server runs what the validator last accepted (so its cluster deltas apply)."""
        self._task: asyncio.Task[None] | None = None
        self._ttl_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.identity: Any = None
        """``microenvoy.io.xds_identity.XdsIdentity`` with ``microenvoy.identity`` (mTLS node identity)."""

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.applied.values())
        return f"<XdsSession source={self.source} resources={n} connected={self.connected.value}>"

    # ------------------------------------------------------------------------------ lifecycle
    async def initial(self) -> None:
        """Start the stream; return after the first update is applied, or after ``initial_fetch_timeout``
        (then from the cache, if there is one)."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.identity is not None:
            from microenvoy.io.xds_identity import XdsIdentity

            self.identity = XdsIdentity(
                self.server, cfg.identity, xds_clusters=cfg.xds_clusters, authority=cfg.authority
            )
            await self.identity.start()  # loads a stored certificate; enrolls/renews in the background
        self._task = loop.create_task(self._run())
        self._ttl_task = loop.create_task(self._ttl_loop())
        timeout = self.config.initial_fetch_timeout
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._first)
        if self._first.done():
            return
        if self.cache is not None:
            await self._load_cache()
        else:
            log.warning(
                "no control-plane update within %.1fs and no cache: starting from static config", timeout
            )

    async def close(self) -> None:
        if self.identity is not None:
            await self.identity.close()
        for task in (self._task, self._ttl_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _ttl_loop(self) -> None:
        while True:
            deadline = self.client.next_deadline()
            delay = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(delay)
            try:
                await self.expire()
            except ConfigError as exc:
                log.error("xDS: applying TTL expiry failed: %s", exc)

    def info(self) -> dict[str, Any]:
        """The ``config_source`` section of ``/server_info``."""
        return {
            "source": self.source,
            "connected": bool(self.connected.value),
            "resources": {t.rsplit(".", 1)[1]: len(v) for t, v in self.applied.items()},
            "held": {describe(k): why for k, why in self.held.items()},
            "version_info": dict(self.version_text),
        }

    def recompose(self, b: Bootstrap) -> Bootstrap:
        """A new static bootstrap (SIGHUP) with the dynamic resources composed onto it (ConfigError if that
        is not valid)."""
        validator = Validator(b.raw, base_dir=self.base_dir)
        verdict = validator.validate(self._resources(), self._versions())
        if verdict.bootstrap is None:
            raise ConfigError([f"{describe(k)}: {why}" for k, why in verdict.rejected.items()])
        self.static_doc = b.raw
        self.validator = validator
        return verdict.bootstrap

    def _versions(self) -> dict[Key, str]:
        return {(t, n): a.version for t, v in self.applied.items() for n, a in v.items()}

    def _validate(self, changed: set[Key] | None = None) -> Verdict:
        """Validate the applied set; ``changed``: the keys that differ since the last call (a delta)."""
        return self.validator.validate(_ResourcesView(self.applied), _VersionsView(self.applied), changed)

    def raw_doc(self) -> dict[str, Any]:
        """The composed configuration as a document (``/config_dump``), built on demand."""
        from microenvoy.xds.resources import compose

        return compose(self.static_doc, self._resources()).doc

    # ------------------------------------------------------------------------------- the stream
    async def _run(self) -> None:
        servers = list(self.config.xds_clusters)
        while True:
            name = self.client.next_server(servers)
            try:
                await self._stream(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stream_errors.inc()
                log.info("xDS stream to cluster %s ended: %s", name, exc)
            finally:
                self.connected.set(0)
            delay = self.client.on_disconnected(time.monotonic())
            log.debug("xDS: reconnecting to the control plane in %.2fs", delay)
            await asyncio.sleep(delay)

    async def _stream(self, cluster_name: str) -> None:
        """One stream on ``cluster_name`` until it fails (it never ends normally)."""
        cluster, host, headers = grpc_target(
            self.server.clusters, cluster_name, XDS_PATH, self.config.authority
        )
        if self.identity is not None:  # the stream runs over mTLS with the node's certificate
            await self.identity.ready()
            self.identity.attach(cluster)
        stream = await cluster.open_stream(host, headers, end_stream=False)
        try:
            for req in self.client.on_connected(time.monotonic()):
                await stream.send_data(encode_message(encode_request(req)), False)
            response_headers = await stream.read_headers()
            status = response_headers.get(b":status")
            if status != b"200":
                raise ConnectionError(f"control plane answered :status {status!r}")
            self.connected.set(1)
            decoder = GrpcMessageDecoder(_MAX_MESSAGE)
            while True:
                item = await stream.read_body()
                if item is None or isinstance(item, Headers):
                    grpc_status = item.get(b"grpc-status") if isinstance(item, Headers) else None
                    raise ConnectionError(f"stream ended (grpc-status {grpc_status!r})")
                for _, message in decoder.feed(item):
                    try:
                        resp = decode_response(message)
                    except XdsProtocolError as exc:
                        log.warning("xDS: malformed response from the control plane: %s", exc)
                        nack = self.client.reject(exc)
                        if nack is None:
                            raise ConnectionError(
                                f"malformed response from the control plane: {exc}"
                            ) from exc
                        await stream.send_data(encode_message(encode_request(nack)), False)
                        continue
                    for req in await self._handle(resp):
                        await stream.send_data(encode_message(encode_request(req)), False)
        finally:
            stream.reset()

    # ------------------------------------------------------------------------------- updates
    def _resources(
        self, extra: dict[str, dict[str, Applied]] | None = None
    ) -> dict[str, dict[str, dict[str, Any]]]:
        out = {t: {n: a.resource for n, a in v.items()} for t, v in self.applied.items()}
        for t, v in (extra or {}).items():
            out.setdefault(t, {}).update({n: a.resource for n, a in v.items()})
        return out

    async def _handle(self, resp: DeltaResponse) -> list[DeltaRequest]:
        """One response: verify, validate, apply, cache; the ACK/NACK (and new subscriptions) to send."""
        now = time.monotonic()
        update: Update = self.client.on_response(resp, now)
        t = update.type_url
        if update.error is not None:  # the whole response is refused (a type the agent did not ask for)
            log.warning("xDS: response for %s refused: %s", t, update.error)
            ack = self.client.ack(update)
            return [ack] if ack is not None else []
        counters = self._per_type.get(t)
        if counters is not None:
            counters["update_attempt"].inc()
        rejected: dict[str, str] = {}
        incoming: dict[str, Applied] = {}
        for name, entry in update.resources.items():
            if entry.resource is None:
                continue  # a TTL heartbeat: nothing to apply
            try:
                if self.config.require_signatures or entry.signature is not None:
                    cose.verify_resource(
                        self.trusted, entry.signature or b"", t, name, entry.version, entry.resource
                    )
            except cose.SignatureError as exc:
                self.signature_invalid.inc()
                rejected[name] = f"signature: {exc}"
                log.warning(
                    "xDS: %s version %s refused: bad signature (%s)", describe((t, name)), entry.version, exc
                )
                continue
            incoming[name] = Applied(entry.version, dict(entry.resource), entry.signature or b"")
        async with self._lock:
            started = time.perf_counter()
            previous = dict(self.applied.get(t, {}))
            candidate = dict(previous)
            candidate.update(incoming)
            for name in update.removed:
                candidate.pop(name, None)
            self.applied[t] = candidate
            changed = {(t, n) for n in incoming} | {(t, n) for n in update.removed}
            verdict = self._validate(changed)
            for key, why in verdict.rejected.items():
                if key[0] == t and key[1] in incoming:
                    rejected[key[1]] = why
                    if key[1] in previous:  # the last good version stays in effect
                        candidate[key[1]] = previous[key[1]]
                    else:
                        candidate.pop(key[1], None)
            if any(k[0] == t and k[1] in incoming for k in verdict.rejected):
                verdict = self._validate(changed)
            applied_ok = False
            if verdict.bootstrap is not None and not verdict.rejected:
                try:
                    delta = verdict.cluster_delta if self._in_sync else None
                    await self.server.apply_config(verdict.bootstrap, cluster_delta=delta)
                    applied_ok = self._in_sync = True
                except ListenerBindError as exc:  # the rest is live; take the unbound listeners out again
                    applied_ok = True
                    for name, why in exc.failed.items():
                        if t == LISTENER and name in incoming:
                            rejected[name] = why
                            if name in previous:
                                candidate[name] = previous[name]
                            else:
                                candidate.pop(name, None)
                    verdict = self._validate(changed)
                    if verdict.bootstrap is not None:
                        with contextlib.suppress(ListenerBindError):
                            await self.server.apply_config(verdict.bootstrap)
                except ConfigError as exc:
                    for name in incoming:
                        rejected.setdefault(name, "; ".join(exc.errors))
            if not applied_ok:
                self._in_sync = False  # the server may differ from the validator: compare all next time
                self.applied[t] = previous
                self._validate(changed)  # the validator's view follows the restored set
                for name in incoming:
                    rejected.setdefault(
                        name,
                        "; ".join(f"{describe(k)}: {w}" for k, w in verdict.rejected.items())
                        or "not applied",
                    )
            self.held = verdict.held
            if counters is not None:
                counters["held"].inc(sum(1 for k in verdict.held if k[0] == t))
                (counters["update_rejected"] if rejected else counters["update_success"]).inc()
                self._update_time[t].record((time.perf_counter() - started) * 1000.0)
            if applied_ok:
                self.source = "control_plane"
                if resp.system_version_info:
                    self.version_text[t.rsplit(".", 1)[1]] = resp.system_version_info
                await self._persist(t, incoming, rejected, update.removed)
        for name, why in rejected.items():
            log.warning("xDS: NACK %s: %s", describe((t, name)), why)
        self._seen.add(t)
        if not self._first.done() and all(x in self._seen for x in _FIRST_TYPES):
            self._first.set_result(None)
        out: list[DeltaRequest] = []
        ack = self.client.ack(update, {n: w for n, w in rejected.items() if n in update.resources})
        if ack is not None:
            out.append(ack)
        out += self._follow_references()
        return out

    def _follow_references(self) -> list[DeltaRequest]:
        """Subscribe to what the applied and held resources reference (EDS assignments, RDS route
        configurations, SDS secrets) and unsubscribe from what nothing references any more."""
        refs = self._refs
        for t, items in self.applied.items():  # only resources whose version changed are walked again
            if t not in (CLUSTER, LISTENER):
                continue
            for name, a in items.items():
                known = refs.get((t, name))
                if known is None or known[0] != a.version:
                    found = references({t: {name: a.resource}})
                    refs[(t, name)] = (a.version, {(rt, n) for rt, names in found.items() for n in names})
        for key in [k for k in refs if k[1] not in self.applied.get(k[0], {})]:
            del refs[key]
        wanted: dict[str, set[str]] = {ENDPOINTS: set(), ROUTES: set(), SECRET: set()}
        for _, keys in refs.values():
            for rt, n in keys:
                wanted[rt].add(n)
        out: list[DeltaRequest] = []
        for type_url, names in wanted.items():
            current = set(self.client.subscriptions(type_url))
            add = sorted(names - current)
            drop = sorted(current - names)
            if add:
                out += self.client.subscribe(type_url, add)
            if drop:
                out += self.client.unsubscribe(type_url, drop)
        return out

    async def expire(self) -> None:
        """Remove resources whose TTL passed without a refresh (DELTA.md rule 7) and apply the result."""
        gone = self.client.expired(time.monotonic())
        if not gone:
            return
        async with self._lock:
            for type_url, name in gone:
                self.applied.get(type_url, {}).pop(name, None)
                log.warning(
                    "xDS: %s expired (TTL, no refresh from the control plane)", describe((type_url, name))
                )
                if self.cache is not None:
                    with contextlib.suppress(OSError):
                        self.cache.remove(type_url, name)
            verdict = self._validate()
            if verdict.bootstrap is not None:
                await self.server.apply_config(verdict.bootstrap)
                self.held = verdict.held

    async def _persist(
        self, type_url: str, incoming: dict[str, Applied], rejected: dict[str, str], removed: Any
    ) -> None:
        """Write what was applied to the cache in a worker thread (fsyncs on an SD card must not stall the
        loop)."""
        if self.cache is None:
            return
        from microenvoy.io.xds_cache import XdsCacheError

        cache = self.cache
        entries = [
            (type_url, n, a.version, a.resource, a.signature)
            for n, a in incoming.items()
            if n not in rejected
        ]

        def write() -> None:
            cache.store_many(entries)
            for name in removed:
                cache.remove(type_url, name)

        try:
            await asyncio.to_thread(write)
        except (OSError, XdsCacheError) as exc:  # a full or read-only disk must not stop the data plane
            log.error("xDS cache: cannot write %s: %s", self.config.cache_dir, exc)

    async def _load_cache(self) -> None:
        found = await asyncio.to_thread(self.cache.load, self.trusted)
        loaded = found.resources
        for path, reason in found.problems:
            log.warning("xDS cache: skipped %s: %s", path, reason)
        if not loaded:
            log.warning(
                "no control-plane update within %.1fs and the cache is empty: starting from static config",
                self.config.initial_fetch_timeout,
            )
            return
        for item in loaded:
            self.applied.setdefault(item.type_url, {})[item.name] = Applied(
                item.version, item.resource, item.signature
            )
        verdict = self._validate()
        if verdict.bootstrap is None or verdict.rejected:
            log.error("xDS cache does not validate (%s): starting from static config", verdict.rejected)
            self.applied = {t: {} for t in TYPES}
            return
        await self.server.apply_config(verdict.bootstrap)
        self.held = verdict.held
        self.source = "cache"
        self.cache_loaded.set(1)
        for item in loaded:  # the reconnect asks only for what changed since
            self.client.restore(item.type_url, item.name, item.version)
        log.warning(
            "no control-plane update within %.1fs: serving from the cache in %s "
            "(%d resources, signatures verified)",
            self.config.initial_fetch_timeout, self.config.cache_dir, len(loaded),
        )  # fmt: skip
