"""How to reach registries: timeouts, retries, TLS, insecure hosts and mirrors.

:class:`RegistryConfig` is plain data the client reads; :func:`load_registries_conf`
fills its per-registry part from a TOML file shaped like a subset of
containers-registries.conf(5) v2::

    insecure-registries = ["build-box:5000"]      # TLS unverified, plain HTTP allowed
    certs-dirs = ["/etc/hypeman/certs.d"]          # <dir>/<host:port>/ca.crt, client.cert/key
    connect-timeout = 10                           # seconds to connect
    read-timeout = 60                              # seconds without a byte
    low-speed-limit = 1024                         # bytes/s, below which for
    low-speed-time = 30                            #   this many seconds a read fails
    manifest-timeout = 60                          # seconds to resolve one name
    allow-foreign-layers = false                   # fetch non-distributable layers' URLs
    disk-cache = "build-box:5000/hypeman/disks"     # share built disks (fleet.cache)
    disk-cache-mode = "both"                       # pull, push or both

    [[registry]]
    location = "docker.io"
    [[registry.mirror]]
    location = "mirror.internal:5000"
    insecure = true

A pull from ``docker.io`` then asks each mirror first, in order, and the
origin last. TLS (see :meth:`RegistryConfig.verifies_tls`): HTTPS with the
certificate verified, except for insecure hosts: marked so, or on loopback
unless their ``[[registry]]`` says ``insecure = false``. As with docker's
``insecure-registries`` and registries.conf's ``insecure = true``, an insecure
host is spoken to over HTTPS without certificate verification if it offers
TLS, else over plain HTTP (:mod:`.schemes` decides). A certs.d directory for a
host means verified HTTPS for it, insecure or not.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypeman_images.errors import InvalidArgument
from hypeman_images.oci.spec import MAX_DOCUMENT_BYTES

MiB = 1024 * 1024
# docker's and podman's system-wide certs.d directories.
SYSTEM_CERTS_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))


@dataclass(frozen=True)
class Mirror:
    """An endpoint to try before a registry's own."""

    location: str
    insecure: bool = False


@dataclass(frozen=True)
class RegistrySettings:
    """Per-registry settings from registries.conf."""

    location: str
    # None: the default (insecure only on loopback); False: verified HTTPS, even on loopback.
    insecure: bool | None = None
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the registry client may be told; the defaults suit Docker Hub.

    ``max_attempts`` bounds tries of one request on transient failures
    (5xx, timeouts, dropped connections); waits grow as ``backoff_base * 2**n``
    with full jitter, capped at ``backoff_max`` (0 makes tests fast).
    ``resume_attempts`` bounds ``Range`` resumptions of one blob download.
    ``max_manifest_bytes`` caps manifests, indexes and configs (real ones are
    a few KiB); ``max_blob_bytes`` caps one compressed layer's declared size.
    A response body slower than ``low_speed_limit`` bytes/s over
    ``low_speed_time`` seconds fails as a read timeout does (:mod:`.speed`;
    0 turns it off); ``manifest_timeout`` bounds resolving one name, retries
    and index included.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    low_speed_limit: int = 1024
    low_speed_time: float = 30.0
    manifest_timeout: float = 60.0
    max_attempts: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    resume_attempts: int = 5
    chunk_size: int = MiB
    max_manifest_bytes: int = MAX_DOCUMENT_BYTES
    max_blob_bytes: int = 32 * 1024 * MiB  # = Limits.max_layer_bytes: no bigger layer could be used
    insecure_registries: frozenset[str] = frozenset()
    ca_bundle: Path | None = None
    certs_dirs: tuple[Path, ...] = ()
    registries: Mapping[str, RegistrySettings] = field(default_factory=dict)
    # Non-distributable ("foreign") layers are fetched from their descriptor's
    # urls only when allowed (OCI image-spec layer.md; containerd asks the same).
    allow_foreign_layers: bool = False
    # The disk cache (``REGISTRY/REPOSITORY``) and its mode, as the file wrote
    # them: the CLI parses them with its flags (fleet.cache.DiskCache.parse).
    disk_cache: str | None = None
    disk_cache_mode: str | None = None

    def mirrors_for(self, registry: str) -> tuple[Mirror, ...]:
        """The mirrors to try, in order, before ``registry`` itself."""
        settings = self.registries.get(registry)
        return settings.mirrors if settings else ()

    def is_insecure(self, host: str) -> bool:
        """True if ``host``'s certificate need not be verified and plain HTTP is allowed.

        Loopback hosts are, unless registries.conf says ``insecure = false`` for them.
        """
        if host in self.insecure_registries:
            return True
        for settings in self.registries.values():
            if settings.location == host and settings.insecure is not None:
                return settings.insecure
            if any(m.location == host and m.insecure for m in settings.mirrors):
                return True
        return _is_loopback(host)

    def certs_dir_for(self, host: str) -> Path | None:
        """The first ``<certs dir>/<host[:port]>`` directory that exists."""
        for base in self.certs_dirs:
            candidate = base / host
            if candidate.is_dir():
                return candidate
        return None

    def verifies_tls(self, host: str) -> bool:
        """True if ``host`` gets HTTPS with its certificate verified, and never plain HTTP.

        False only for insecure hosts without a certs.d directory: those get
        HTTPS without verification if they offer TLS, else plain HTTP.
        """
        return self.certs_dir_for(host) is not None or not self.is_insecure(host)

    def with_registries_conf(self, path: Path) -> RegistryConfig:
        """This config with the contents of a registries.conf-like TOML file added.

        Lists and per-registry tables are merged; the scalar keys the file sets
        (timeouts, ``allow-foreign-layers``) replace this config's values.
        """
        return _apply_conf(self, _read_toml(path), path)


def _is_loopback(host: str) -> bool:
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def load_registries_conf(path: Path) -> RegistryConfig:
    """Parse a registries.conf-like TOML file (see the module docstring)."""
    return _apply_conf(RegistryConfig(), _read_toml(path), path)


def _read_toml(path: Path) -> Mapping[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}") from exc


def _apply_conf(base: RegistryConfig, doc: Mapping[str, Any], path: Path) -> RegistryConfig:
    """``base`` with a parsed registries.conf's settings added (lists) or set (scalars)."""
    registries: dict[str, RegistrySettings] = {}
    for i, entry in enumerate(_tables(doc.get("registry", []), f"{path}: [[registry]]")):
        where = f"{path}: [[registry]] #{i + 1}"
        location = _string(entry, "location", where) or _string(entry, "prefix", where)
        if not location:
            raise InvalidArgument(f"{where} has no 'location'")
        mirrors = tuple(
            Mirror(_string(m, "location", f"{where} mirror"), bool(m.get("insecure", False)))
            for m in _tables(entry.get("mirror", []), f"{where} [[registry.mirror]]")
        )
        if any(not m.location for m in mirrors):
            raise InvalidArgument(f"{where}: every [[registry.mirror]] needs a 'location'")
        insecure = entry.get("insecure")
        if insecure is not None and not isinstance(insecure, bool):
            raise InvalidArgument(f"{where}: 'insecure' must be true or false")
        registries[location] = RegistrySettings(location, insecure, mirrors)
    config = replace(
        base,
        insecure_registries=base.insecure_registries
        | frozenset(_strings(doc, "insecure-registries", str(path))),
        certs_dirs=base.certs_dirs + tuple(Path(p) for p in _strings(doc, "certs-dirs", str(path))),
        registries={**base.registries, **registries},
    )
    if "connect-timeout" in doc:
        config = replace(config, connect_timeout=_seconds(doc, "connect-timeout", path))
    if "read-timeout" in doc:
        config = replace(config, read_timeout=_seconds(doc, "read-timeout", path))
    config = _apply_transfer_keys(config, doc, path)
    if "allow-foreign-layers" in doc:
        allow = doc["allow-foreign-layers"]
        if not isinstance(allow, bool):
            raise InvalidArgument(f"{path}: 'allow-foreign-layers' must be true or false")
        config = replace(config, allow_foreign_layers=allow)
    for key in ("disk-cache", "disk-cache-mode"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise InvalidArgument(f"{path}: '{key}' must be a string")
            config = replace(config, **{key.replace("-", "_"): doc[key]})
    return config


def _apply_transfer_keys(
    config: RegistryConfig, doc: Mapping[str, Any], path: Path
) -> RegistryConfig:
    """The low-speed limit and the manifest deadline, if the file sets them."""
    if "low-speed-limit" in doc:
        limit = doc["low-speed-limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgument(f"{path}: 'low-speed-limit' must be bytes per second (0: off)")
        config = replace(config, low_speed_limit=limit)
    if "low-speed-time" in doc:
        config = replace(config, low_speed_time=_seconds(doc, "low-speed-time", path))
    if "manifest-timeout" in doc:
        config = replace(config, manifest_timeout=_seconds(doc, "manifest-timeout", path))
    return config


def check_timeout(value: float, name: str) -> float:
    """``value`` if it is a usable timeout in seconds (finite, > 0); else InvalidArgument."""
    if not (0 < value < float("inf")):
        raise InvalidArgument(f"{name} must be a number of seconds above 0, not {value!r}")
    return value


def _seconds(table: Mapping[str, Any], key: str, path: Path) -> float:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{path}: '{key}' must be a number of seconds")
    return check_timeout(float(value), f"{path}: '{key}'")


def _tables(value: Any, where: str) -> Sequence[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidArgument(f"{where} must be an array of tables")
    return value


def _string(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: '{key}' must be a string")
    return value


def _strings(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where}: '{key}' must be a list of strings")
    return value
