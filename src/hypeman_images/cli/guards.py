"""The flags that bound what others may cost us: clients of ``serve``, slow registries, readers
of the data dir; and their parsing into the library's settings.

Precedence as everywhere (cli/config.py): a flag wins over registries.conf,
which wins over the defaults. docs/security.md says why each limit exists.
"""

from __future__ import annotations

import argparse
import grp
import os
from dataclasses import replace

from hypeman_images.build.options import parse_size
from hypeman_images.errors import InvalidArgument
from hypeman_images.registry.config import RegistryConfig, check_timeout
from hypeman_images.service.settings import ServiceLimits


def add_data_dir_group_flag(flags: argparse.ArgumentParser) -> None:
    """``--data-dir-group``: every command may be the one that creates the data dir."""
    flags.add_argument(
        "--data-dir-group",
        default=os.environ.get("HYPEMAN_DATA_DIR_GROUP") or None,
        metavar="GROUP",
        help="share the data dir with this group (mode 2750) instead of keeping it "
        "private (0700) (default: $HYPEMAN_DATA_DIR_GROUP)",
    )


def add_transfer_flags(flags: argparse.ArgumentParser) -> None:
    """The low-speed limit and the manifest deadline, with the registry flags."""
    defaults = RegistryConfig()
    flags.add_argument(
        "--low-speed-limit",
        default=None,
        metavar="SIZE",
        help=f"bytes per second below which, over the low-speed time, a transfer fails "
        f"(default {defaults.low_speed_limit}; 0: no limit)",
    )
    flags.add_argument(
        "--low-speed-time",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds over which the low-speed limit is measured "
        f"(default {defaults.low_speed_time:g})",
    )
    flags.add_argument(
        "--manifest-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds to resolve one image name, retries included "
        f"(default {defaults.manifest_timeout:g})",
    )


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """``serve``'s limits on its clients."""
    defaults = ServiceLimits()
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also answer requests whose Host header names HOST (repeatable; "
        "default: only localhost, 127.0.0.1, [::1] and the --listen address)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help=f"connections open at once; more wait in the kernel's backlog "
        f"(default {defaults.max_connections})",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        metavar="S",
        help=f"seconds a client has to send a whole request head "
        f"(default {defaults.header_timeout:g})",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout,
        metavar="S",
        help=f"seconds a client has to send a whole request body "
        f"(default {defaults.body_timeout:g})",
    )
    parser.add_argument(
        "--max-body-size",
        default=None,
        metavar="SIZE",
        help=f"largest request body accepted (default {defaults.max_body_bytes // 1024}K)",
    )


def transfer_config(config: RegistryConfig, args: argparse.Namespace) -> RegistryConfig:
    """``config`` with the transfer flags given (absent on commands without them) applied."""
    if getattr(args, "low_speed_limit", None) is not None:
        config = replace(config, low_speed_limit=parse_size(args.low_speed_limit))
    if getattr(args, "low_speed_time", None) is not None:
        speed_time = check_timeout(args.low_speed_time, "--low-speed-time")
        config = replace(config, low_speed_time=speed_time)
    if getattr(args, "manifest_timeout", None) is not None:
        deadline = check_timeout(args.manifest_timeout, "--manifest-timeout")
        config = replace(config, manifest_timeout=deadline)
    return config


def service_limits(args: argparse.Namespace) -> ServiceLimits:
    """``serve``'s limits from its flags."""
    if args.max_connections < 1:
        raise InvalidArgument(f"--max-connections must be at least 1, not {args.max_connections}")
    limits = ServiceLimits(
        header_timeout=check_timeout(args.header_timeout, "--header-timeout"),
        body_timeout=check_timeout(args.body_timeout, "--body-timeout"),
        max_connections=args.max_connections,
    )
    if args.max_body_size is not None:
        limits = replace(limits, max_body_bytes=parse_size(args.max_body_size))
    return limits


def data_dir_group(args: argparse.Namespace) -> int | None:
    """The group id ``--data-dir-group`` names (a name or a number), if any."""
    name: str | None = getattr(args, "data_dir_group", None)
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgument(f"--data-dir-group: no group named {name!r}") from None


__all__ = [
    "add_data_dir_group_flag",
    "add_service_flags",
    "add_transfer_flags",
    "data_dir_group",
    "service_limits",
    "transfer_config",
]
