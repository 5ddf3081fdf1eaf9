"""The offline-first xDS cache: every applied resource, with its signature, persisted atomically on disk.

When the control plane is unreachable at boot the agent starts from this cache (DELTA.md, "Offline-first
cache"); Envoy keeps xDS config only in memory. Layout, one file per resource::

    <directory>/<32 hex>.cbor   CBOR map {type_url, name, version, resource, signature, stored_at}
    <directory>/meta.cbor       CBOR map of free-form node state ({"saved_at": ...}); unsigned, informative
    <directory>/.<...>.tmp      a write in progress (or left by a crash): never read, removed by load()

The file name is the first 32 hex digits of SHA-256 of ``type_url NUL name``, so each (type, name) has exactly
one file and a store replaces it. Writes are atomic and durable: write a temp file in the same directory,
fsync it, ``os.replace`` it over the old file, fsync the directory. A crash leaves either the old file or the
new one, plus possibly a temp file that load() removes.

:meth:`XdsCache.load` trusts nothing on disk: it re-verifies every signature against the keys pinned in the
bootstrap (:func:`microenvoy.xds.cose.verify_resource`) and skips, and reports as ``(path, reason)``, every
file that is corrupt, truncated, too large, misplaced or fails verification. It never raises for a bad file.

Bounded: a resource whose file would exceed ``max_resource_size`` (4 MiB by default) is refused, and the
caller keeps the directory to what is applied with :meth:`XdsCache.remove` / :meth:`XdsCache.retain`.
Secrets (SDS) are cached too, so the directory is created 0700 and files are 0600.

All methods do blocking file I/O: call them from a worker thread (``asyncio.to_thread``) on the event loop.
They are thread-safe; concurrent stores of one name leave the last one written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from microenvoy.xds.cose import SignatureError, verify_resource

__all__ = [
    "DEFAULT_MAX_RESOURCE_SIZE",
    "CacheLoad",
    "CachedResource",
    "XdsCache",
    "XdsCacheError",
]

DEFAULT_MAX_RESOURCE_SIZE = 4 * 1024 * 1024
"""Largest cache file (one resource with its signature) accepted, in bytes."""

_SUFFIX = ".cbor"
_TMP_SUFFIX = ".tmp"
_META = "meta" + _SUFFIX
_STEM_HEX = 32
_FIELDS = ("type_url", "name", "version", "resource", "signature", "stored_at")


class XdsCacheError(Exception):
    """A resource could not be cached (too large, not encodable, or the disk refused)."""


@dataclass(frozen=True, slots=True)
class CachedResource:
    """One resource read back from the cache, its signature verified."""

    type_url: str
    """The resource's type URL."""
    name: str
    """The resource name."""
    version: str
    """The version the control plane gave it."""
    resource: dict[str, Any]
    """The resource map (Envoy JSON field names, with ``@type``)."""
    signature: bytes
    """Its COSE_Sign1 (detached payload), as received."""
    stored_at: float
    """Wall-clock time (seconds since the epoch) it was written."""
    kid: bytes
    """Key id of the trusted key that verified it at load."""


@dataclass(frozen=True, slots=True)
class CacheLoad:
    """What :meth:`XdsCache.load` found."""

    resources: tuple[CachedResource, ...]
    """Every resource that verified, sorted by (type_url, name)."""
    problems: tuple[tuple[Path, str], ...]
    """Every file skipped, with the reason (``corrupt: ...``, ``signature: bad signature`` ...)."""
    removed_temp: int
    """Temp files of interrupted writes that were removed."""


def _stem(type_url: str, name: str) -> str:
    return hashlib.sha256(f"{type_url}\0{name}".encode()).hexdigest()[:_STEM_HEX]


def _decode_exact(data: bytes) -> Any:
    """One CBOR item filling ``data`` exactly (a truncated or padded file is corrupt)."""
    fp = io.BytesIO(data)
    item = cbor2.CBORDecoder(fp).decode()
    if fp.tell() != len(data):
        raise ValueError("trailing bytes")
    return item


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class XdsCache:
    """The on-disk cache of applied xDS resources under one directory (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_resource_size: int = DEFAULT_MAX_RESOURCE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_resource_size <= 0:
            raise ValueError("max_resource_size must be greater than 0")
        self.directory = Path(directory)
        self.max_resource_size = max_resource_size
        self._clock = clock
        self._lock = threading.Lock()
        self._stores = 0
        self._removes = 0
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise XdsCacheError(
                f"{self.directory}: cannot create the cache directory: {exc.strerror}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"<XdsCache {str(self.directory)!r} max={self.max_resource_size} "
            f"stores={self._stores} removes={self._removes}>"
        )

    # ------------------------------------------------------------------------------------------- writes

    def path_for(self, type_url: str, name: str) -> Path:
        """The file that holds (type_url, name)."""
        return self.directory / (_stem(type_url, name) + _SUFFIX)

    def _encode(
        self, type_url: str, name: str, version: str, resource: Mapping[str, Any], signature: bytes
    ) -> bytes:
        record = {
            "type_url": type_url,
            "name": name,
            "version": version,
            "resource": resource,
            "signature": bytes(signature),
            "stored_at": float(self._clock()),
        }
        try:
            data = cbor2.dumps(record, canonical=True)
        except Exception as exc:  # cbor2 raises several types for values it cannot encode
            raise XdsCacheError(f"{type_url} {name!r}: cannot encode: {exc}") from None
        if len(data) > self.max_resource_size:
            raise XdsCacheError(
                f"{type_url} {name!r}: {len(data)} bytes exceeds the cache limit of {self.max_resource_size}"
            )
        return data

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """Temp file in the same directory, fsync, rename over ``path`` (the directory is fsynced later)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=_TMP_SUFFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def store(
        self, type_url: str, name: str, version: str, resource: Mapping[str, Any], signature: bytes
    ) -> Path:
        """Persist one resource atomically and durably, replacing its previous version; returns its file.

        Raises :class:`XdsCacheError` (too large, not encodable, disk error); the old file is intact then.
        """
        self.store_many([(type_url, name, version, resource, signature)])
        return self.path_for(type_url, name)

    def store_many(self, entries: Iterable[tuple[str, str, str, Mapping[str, Any], bytes]]) -> None:
        """Persist several resources (type_url, name, version, resource, signature), one directory fsync.

        Every entry is encoded and size-checked before anything is written; each file is replaced atomically.
        """
        encoded = [(self.path_for(t, n), self._encode(t, n, v, r, s)) for t, n, v, r, s in entries]
        if not encoded:
            return
        with self._lock:
            try:
                for path, data in encoded:
                    self._write_atomic(path, data)
                    self._stores += 1
                _fsync_dir(self.directory)
            except OSError as exc:
                raise XdsCacheError(f"{self.directory}: cannot write the cache: {exc.strerror}") from None

    def remove(self, type_url: str, name: str) -> bool:
        """Forget (type_url, name); True if it had a file."""
        path = self.path_for(type_url, name)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise XdsCacheError(f"{path}: cannot remove: {exc.strerror}") from None
            self._removes += 1
            with contextlib.suppress(OSError):
                _fsync_dir(self.directory)
            return True

    def retain(self, keep: Iterable[tuple[str, str]]) -> int:
        """Remove every resource file but those of the (type_url, name) pairs in ``keep``; returns the count.

        For after a full resync: the directory then holds exactly what is applied.
        """
        wanted = {_stem(t, n) + _SUFFIX for t, n in keep}
        removed = 0
        with self._lock:
            for path in self._resource_files():
                if path.name not in wanted:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
            if removed:
                self._removes += removed
                with contextlib.suppress(OSError):
                    _fsync_dir(self.directory)
        return removed

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace the free-form node state file (``saved_at`` is added). Unsigned: informative only."""
        try:
            data = cbor2.dumps({**meta, "saved_at": float(self._clock())}, canonical=True)
        except Exception as exc:  # cbor2 raises several types for values it cannot encode
            raise XdsCacheError(f"meta: cannot encode: {exc}") from None
        if len(data) > self.max_resource_size:
            raise XdsCacheError(
                f"meta: {len(data)} bytes exceeds the cache limit of {self.max_resource_size}"
            )
        with self._lock:
            try:
                self._write_atomic(self.directory / _META, data)
                _fsync_dir(self.directory)
            except OSError as exc:
                raise XdsCacheError(f"{self.directory}: cannot write the cache: {exc.strerror}") from None

    def read_meta(self) -> dict[str, Any] | None:
        """The node state last written by :meth:`write_meta`, or None (absent or unreadable)."""
        try:
            data = self._read_bounded(self.directory / _META)
            meta = _decode_exact(data)
        except Exception:  # absent, unreadable or corrupt: there is simply no state to report
            return None
        return dict(meta) if isinstance(meta, Mapping) else None

    # -------------------------------------------------------------------------------------------- reads

    def _resource_files(self) -> list[Path]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(
            self.directory / n
            for n in names
            if n.endswith(_SUFFIX) and len(n) == _STEM_HEX + len(_SUFFIX) and _is_hex(n[:_STEM_HEX])
        )

    def _read_bounded(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            data = f.read(self.max_resource_size + 1)
        if len(data) > self.max_resource_size:
            raise _TooLarge
        return data

    def _clean_temp(self) -> int:
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for n in os.listdir(self.directory):
                if n.startswith(".") and n.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(self.directory / n)
                        removed += 1
        return removed

    def _read_one(self, path: Path, trusted: Mapping[bytes, Ed25519PublicKey]) -> CachedResource | str:
        """The verified resource in ``path``, or the reason it is unusable."""
        try:
            data = self._read_bounded(path)
        except _TooLarge:
            return f"too large: over {self.max_resource_size} bytes"
        except OSError as exc:
            return f"unreadable: {exc.strerror}"
        try:
            record = _decode_exact(data)
        except Exception as exc:  # truncated or garbled: cbor2 raises several types
            return f"corrupt: not one CBOR item ({type(exc).__name__})"
        if not isinstance(record, Mapping):
            return "corrupt: not a map"
        missing = [f for f in _FIELDS if f not in record]
        if missing:
            return f"corrupt: missing {', '.join(missing)}"
        type_url, name, version = record["type_url"], record["name"], record["version"]
        resource, signature, stored_at = record["resource"], record["signature"], record["stored_at"]
        if not (isinstance(type_url, str) and isinstance(name, str) and isinstance(version, str)):
            return "corrupt: type_url, name and version must be strings"
        if not isinstance(resource, Mapping) or not isinstance(signature, bytes):
            return "corrupt: resource must be a map and signature a bstr"
        if not isinstance(stored_at, int | float) or isinstance(stored_at, bool):
            return "corrupt: stored_at must be a number"
        if path.name != _stem(type_url, name) + _SUFFIX:
            return "misplaced: the file name does not match its type_url and name"
        try:
            kid = verify_resource(trusted, signature, type_url, name, version, resource)
        except SignatureError as exc:
            return f"signature: {exc.reason}"
        return CachedResource(
            type_url=type_url,
            name=name,
            version=version,
            resource=dict(resource),
            signature=signature,
            stored_at=float(stored_at),
            kid=kid,
        )

    def load(self, trusted: Mapping[bytes, Ed25519PublicKey], *, discard_invalid: bool = False) -> CacheLoad:
        """Every cached resource whose signature verifies against ``trusted`` ({kid: key}).

        Temp files of interrupted writes are removed. A bad file is skipped and reported, never raised; with
        ``discard_invalid`` it is also deleted (by default it stays: a fixed trust list may accept it again,
        and the next store or :meth:`retain` replaces or removes it).
        """
        with self._lock:
            removed_temp = self._clean_temp()
            resources: list[CachedResource] = []
            problems: list[tuple[Path, str]] = []
            for path in self._resource_files():
                result = self._read_one(path, trusted)
                if isinstance(result, str):
                    problems.append((path, result))
                    if discard_invalid:
                        with contextlib.suppress(OSError):
                            path.unlink()
                else:
                    resources.append(result)
        resources.sort(key=lambda r: (r.type_url, r.name))
        return CacheLoad(resources=tuple(resources), problems=tuple(problems), removed_temp=removed_temp)


class _TooLarge(Exception):
    pass


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
