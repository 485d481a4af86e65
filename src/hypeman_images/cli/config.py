"""From parsed flags to the library's objects: registry config, build options, manager.

Precedence everywhere: a flag wins over registries.conf, which wins over the
library's defaults (README, "Configuration").
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING

from hypeman_images.build.manager import DEFAULT_CONCURRENCY, ImageManager
from hypeman_images.build.options import BuildOptions, default_data_dir, parse_size
from hypeman_images.build.queue import PauseHook
from hypeman_images.cli.guards import data_dir_group, transfer_config
from hypeman_images.errors import InvalidArgument
from hypeman_images.fleet.cache import CacheMode, DiskCache
from hypeman_images.oci.spec import Platform
from hypeman_images.registry.config import RegistryConfig, check_timeout
from hypeman_images.store.formats import DiskFormat

if TYPE_CHECKING:
    from hypeman_images.registry.client import RegistryClient


def registry_config(args: argparse.Namespace) -> RegistryConfig:
    """The registry flags (absent on commands without them) over registries.conf."""
    config = RegistryConfig()
    if getattr(args, "registries_conf", None):
        config = config.with_registries_conf(args.registries_conf)
    config = replace(
        config,
        insecure_registries=config.insecure_registries
        | frozenset(getattr(args, "insecure_registry", [])),
        ca_bundle=getattr(args, "ca_bundle", None) or config.ca_bundle,
        certs_dirs=config.certs_dirs + tuple(getattr(args, "certs_dir", [])),
    )
    if getattr(args, "max_manifest_size", None):
        config = replace(config, max_manifest_bytes=parse_size(args.max_manifest_size))
    if getattr(args, "max_blob_size", None):
        config = replace(config, max_blob_bytes=parse_size(args.max_blob_size))
    # Flags win over registries.conf, which wins over the defaults.
    if getattr(args, "connect_timeout", None) is not None:
        timeout = check_timeout(args.connect_timeout, "--connect-timeout")
        config = replace(config, connect_timeout=timeout)
    if getattr(args, "read_timeout", None) is not None:
        config = replace(config, read_timeout=check_timeout(args.read_timeout, "--read-timeout"))
    if getattr(args, "allow_foreign_layers", None):
        config = replace(config, allow_foreign_layers=True)
    return transfer_config(config, args)


def build_options(args: argparse.Namespace) -> BuildOptions:
    """BuildOptions from the build flags shared by pull, boot and serve."""
    options = BuildOptions()
    if args.platform:
        options = replace(options, platform=Platform.parse(args.platform))
    if args.free_space:
        options = replace(options, free_space=parse_size(args.free_space))
    if args.mke2fs:
        options = replace(options, mke2fs=args.mke2fs)
    if not args.disk_digest:
        options = replace(options, disk_digest=False)
    if args.two_pass:
        options = replace(options, one_pass=False)
    if args.format:
        options = replace(options, format=DiskFormat(args.format))
    limits = options.limits
    if args.max_entries < 1:
        raise InvalidArgument(f"--max-entries must be at least 1, not {args.max_entries}")
    limits = replace(limits, max_entries=args.max_entries)
    if args.max_layer_size:
        limits = replace(limits, max_layer_bytes=parse_size(args.max_layer_size))
    if args.max_image_size:
        limits = replace(limits, max_image_bytes=parse_size(args.max_image_size))
    options = replace(options, disk_cache=disk_cache(args))
    return replace(options, limits=limits)


def open_client(args: argparse.Namespace) -> RegistryClient:
    """A registry client with the user's credentials (docker's config and helpers)."""
    # Imported here: only the commands that reach a registry make a client, and
    # httpx would slow the start of every other one (tests/cli/test_cli_startup.py).
    from hypeman_images.registry.client import RegistryClient
    from hypeman_images.registry.credentials import default_credentials

    return RegistryClient(credentials=default_credentials(), config=registry_config(args))


def open_manager(
    args: argparse.Namespace, options: BuildOptions | None = None, concurrency: int | None = None
) -> ImageManager:
    """The image manager on ``--data-dir`` (or the default data dir)."""
    return ImageManager(
        args.data_dir or default_data_dir(),
        options=options,
        client_factory=lambda: open_client(args),
        concurrency=concurrency or DEFAULT_CONCURRENCY,
        pause=PauseHook.from_env(),  # the documented crash-test hook; unset in real use
        data_dir_group=data_dir_group(args),
    )


def disk_cache(args: argparse.Namespace) -> DiskCache | None:
    """The disk cache: ``--disk-cache`` (default ``$HYPEMAN_DISK_CACHE``), else
    registries.conf's ``disk-cache``; an empty flag turns it off. The mode likewise."""
    conf = registry_config(args)
    text = getattr(args, "disk_cache", None)
    if text is None:
        text = conf.disk_cache
    if not text:
        return None
    mode = getattr(args, "disk_cache_mode", None) or conf.disk_cache_mode or CacheMode.BOTH
    return DiskCache.parse(text, mode)
