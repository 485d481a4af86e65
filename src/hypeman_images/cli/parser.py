"""The command line's grammar: every command, its flags and its help.

Flags shared by several commands are declared once, as parent parsers. The
handlers the commands dispatch to live in one module per area; each command
names its own in :data:`HANDLERS`, and ``app.main`` imports it only when the
command runs, so that ``list`` never loads what ``pull`` or ``serve`` need
(tests/cli/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

from hypeman_images import __version__
from hypeman_images.build.progress import human_size
from hypeman_images.build.queue import DEFAULT_CONCURRENCY
from hypeman_images.cli.guards import (
    add_data_dir_group_flag,
    add_service_flags,
    add_transfer_flags,
)
from hypeman_images.cli.helptext import DESCRIPTION, EXAMPLES, epilog
from hypeman_images.cli.output import PROG
from hypeman_images.errors import DigestMismatch, DiskArtifactInvalid, InvalidArgument, NotFound
from hypeman_images.fleet.cache import CacheMode
from hypeman_images.layers.limits import Limits
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.store.formats import DiskFormat

FORMATS = [f.value for f in DiskFormat]
DEFAULT_LISTEN = "127.0.0.1:8080"
CACHE_ENV = "HYPEMAN_DISK_CACHE"
P = TypeVar("P", bound=argparse.ArgumentParser)


@dataclass(frozen=True)
class Handler:
    """A command's handler, named: ``module`` (under ``hypeman_images.cli``) and ``function``.

    The module is imported when the command runs (:meth:`load`), never when
    the grammar is declared.
    """

    module: str
    function: str

    def load(self) -> Callable[[argparse.Namespace], int]:
        """The handler: takes the parsed arguments, returns the exit code."""
        module = importlib.import_module(f"hypeman_images.cli.{self.module}")
        run: Callable[[argparse.Namespace], int] = getattr(module, self.function)
        return run


# Every command and the handler it runs: the one place they are paired.
HANDLERS = {
    "pull": Handler("images", "pull"),
    "list": Handler("images", "list_images"),
    "inspect": Handler("images", "inspect"),
    "rm": Handler("images", "remove"),
    "tag": Handler("images", "tag"),
    "gc": Handler("images", "gc"),
    "verify": Handler("images", "verify"),
    "boot": Handler("boot", "boot_image"),
    "login": Handler("login", "login"),
    "logout": Handler("login", "logout"),
    "serve": Handler("serve", "serve"),
    "disk push": Handler("disk", "disk_push"),
    "disk pull": Handler("disk", "disk_pull"),
}


class UsageParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, with the exit code of a bad argument."""

    def error(self, message: str) -> NoReturn:
        """Exit with one line that points at ``--help``."""
        self.exit(
            InvalidArgument.exit_code, f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        )


DATA_DIR_HELP = (
    "data directory (default: $HYPEMAN_DATA_DIR, /var/lib/hypeman as root, "
    "else $XDG_DATA_HOME/hypeman)"
)
VERBOSE_HELP = "debug logging (-vv adds httpx's)"


def _common_flags() -> UsageParser:
    common = UsageParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    common.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    add_data_dir_group_flag(common)
    return common


def _global_flags(parser: argparse.ArgumentParser) -> None:
    """The common flags before the command too, as docker and podman take them.

    They land in ``global_*`` attributes: argparse lets a subcommand's defaults
    overwrite what the main parser set, so :func:`parse_args` merges the two.
    """
    parser.add_argument(
        "--data-dir", dest="global_data_dir", type=Path, metavar="DATA_DIR", help=DATA_DIR_HELP
    )
    parser.add_argument(
        "-v", "--verbose", dest="global_verbose", action="count", default=0, help=VERBOSE_HELP
    )
    parser.add_argument(
        "--data-dir-group",
        dest="global_data_dir_group",
        metavar="GROUP",
        help="share the data dir with this group (as after the command)",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; the common flags count wherever they stand, before or after the command."""
    args = build_parser().parse_args(argv)
    args.data_dir = getattr(args, "data_dir", None) or args.global_data_dir
    args.verbose = getattr(args, "verbose", 0) + args.global_verbose
    # After the command, the flag's default is the environment's: a flag before it wins over that.
    from_env = os.environ.get("HYPEMAN_DATA_DIR_GROUP") or None
    if args.global_data_dir_group is not None and args.data_dir_group == from_env:
        args.data_dir_group = args.global_data_dir_group
    return args


def _registry_flags() -> UsageParser:
    flags = UsageParser(add_help=False)
    flags.add_argument(
        "--registries-conf",
        type=Path,
        default=os.environ.get("HYPEMAN_REGISTRIES_CONF") or None,
        help="registries.conf-like TOML: mirrors, insecure registries, certs dirs "
        "(default: $HYPEMAN_REGISTRIES_CONF)",
    )
    flags.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="HTTPS without certificate checks, or plain HTTP, for this registry (repeatable)",
    )
    flags.add_argument("--ca-bundle", type=Path, help="CA certificates (PEM) to trust")
    flags.add_argument(
        "--max-manifest-size",
        default=None,
        help="largest manifest, index or config accepted (default 4M)",
    )
    flags.add_argument(
        "--max-blob-size", default=None, help="largest compressed layer accepted (default 32G)"
    )
    flags.add_argument(
        "--certs-dir",
        action="append",
        type=Path,
        default=[],
        help="certs.d-style directory: <dir>/<host:port>/ca.crt (repeatable)",
    )
    defaults = RegistryConfig()
    flags.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds to wait for a connection to a registry "
        f"(default {defaults.connect_timeout:g})",
    )
    flags.add_argument(
        "--read-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds a registry may send nothing before the request fails and is retried "
        f"(default {defaults.read_timeout:g})",
    )
    flags.add_argument(
        "--allow-foreign-layers",
        action="store_true",
        default=None,
        help="fetch non-distributable (foreign) layers from the URLs their image names "
        "(default: refuse them)",
    )
    add_transfer_flags(flags)
    return flags


def _build_flags() -> UsageParser:
    flags = UsageParser(add_help=False)
    flags.add_argument(
        "--platform", help="OS/ARCH[/VARIANT] to pick from an index (default: the host's)"
    )
    flags.add_argument(
        "--free-space", default=None, help="free space to leave in the disk (e.g. 64M; default 16M)"
    )
    flags.add_argument("--mke2fs", default=None, help="mke2fs binary (default: from PATH)")
    flags.add_argument(
        "--disk-digest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record the disk's sha256 in metadata.json (default; --no-disk-digest saves "
        "about 0.8 s per GB of disk)",
    )
    flags.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="the disk's filesystem: ext4 (default) or erofs, a read-only EROFS image "
        "(boot: the image's disk, ext4 if it has both)",
    )
    flags.add_argument(
        "--two-pass",
        action="store_true",
        help="scan every layer before writing the disk, never in one pass (slower; same tree)",
    )
    limits = flags.add_argument_group("safety limits (against hostile images)")
    defaults = Limits()
    limits.add_argument(
        "--max-entries",
        type=int,
        default=defaults.max_entries,
        help=f"tar entries per image (default {defaults.max_entries})",
    )
    limits.add_argument(
        "--max-layer-size",
        default=None,
        help=f"uncompressed bytes per layer (default {human_size(defaults.max_layer_bytes)})",
    )
    limits.add_argument(
        "--max-image-size",
        default=None,
        help=f"uncompressed bytes per image (default {human_size(defaults.max_image_bytes)})",
    )
    _disk_cache_flags(flags)
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each command's ``run`` default is its handler."""
    common, registry_flags, build_flags = _common_flags(), _registry_flags(), _build_flags()
    json_flag = UsageParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = UsageParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, *, data: bool = True, registry: bool = False, build: bool = False
    ) -> argparse.ArgumentParser:
        parents = [common, json_flag] if data else [common]
        parents += [registry_flags] if registry else []
        parents += [build_flags] if build else []
        command_parser = sub.add_parser(
            name,
            parents=parents,
            help=summary,
            description=summary,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command_parser.set_defaults(run=HANDLERS[name])
        return command_parser

    p = command(
        "pull",
        "Pull an image, convert it into rootfs.ext4 (or rootfs.erofs) and print the disk's path.",
        registry=True,
        build=True,
    )
    p.add_argument("image", help="image reference: alpine, localhost:5000/app:1, repo@sha256:…")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines, no bars")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a user label on the image (repeatable; replaces the image's labels)",
    )

    p = command("list", "List local images with their status, tags and size.")
    p.add_argument(
        "repository",
        nargs="?",
        metavar="REPOSITORY[:TAG]",
        help="only this repository's images (only this tag's, with :TAG)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print image IDs only")
    p.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="table (default) or json (as --json)",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only images with this user label (repeatable: all must match)",
    )

    p = command("inspect", "Show an image's metadata: entrypoint, cmd, env, status, disk.")
    p.add_argument("image", help="tag or digest reference, or image ID, of a local image")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="the record of this disk (default: the ready one, ext4 first)",
    )

    p = command("rm", "Remove images by tag or by digest.")
    p.add_argument("image", nargs="+", help="tag or digest references, or image IDs")

    p = command("tag", "Give a local image another name (a tag), as docker tag does; no pull.")
    p.add_argument("source", help="image: tag or digest reference, or image ID")
    p.add_argument("target", help="the new name, with a tag: myapp:prod, localhost:5000/app:1")

    command("gc", "Free space: unneeded blobs, failed builds, leftovers of crashes.")

    p = command(
        "verify", "Check a local image's disk again: e2fsck -fn (fsck.erofs) and its sha256."
    )
    p.add_argument("image", help="tag or digest reference, or image ID, of a local image")
    p.add_argument(
        "--format", choices=FORMATS, help="the disk to check (default: the ready one, ext4 first)"
    )
    p.add_argument(
        "--record", action="store_true", help="record the sha256 if none was (for later checks)"
    )

    p = command(
        "boot", "Boot an image in a microVM and run its command.", registry=True, build=True
    )
    p.add_argument("image", help="image reference (pulled first if not local)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    p.add_argument("--hypervisor", choices=["cloud-hypervisor", "qemu"], help="default: probe")
    p.add_argument("--accel", choices=["kvm", "tcg"], help="QEMU accelerator (default: probe)")
    p.add_argument("--memory", type=int, default=256, metavar="MIB", help="guest memory")
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the Cloud Hypervisor command line for the disk and exit",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- CMD ARGS… to run instead of cmd")

    p = command("login", "Log in to a registry.", data=False, registry=True)
    p.add_argument("registry", nargs="?", default="docker.io", help="host[:port] (docker.io)")
    p.add_argument("-u", "--username", help="user name (asked for on a terminal if not given)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")

    p = command("logout", "Forget a registry's credential.", data=False)
    p.add_argument("registry", nargs="?", default="docker.io", help="host[:port] (docker.io)")

    p = command(
        "serve",
        "Run the REST API (hypeman's /images) on HOST:PORT.",
        data=False,
        registry=True,
        build=True,
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT to bind (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--token-file", type=Path, help="require this bearer token (file mode 0600)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"builds run at once (default {DEFAULT_CONCURRENCY})",
    )
    add_service_flags(p)

    cache_flags = UsageParser(add_help=False)
    _disk_cache_flags(cache_flags)
    _disk_commands(
        sub,
        push_parents=[common, json_flag, registry_flags, cache_flags],
        pull_parents=[common, json_flag, registry_flags, build_flags],
    )
    return parser


def _disk_cache_flags(parser: argparse.ArgumentParser) -> None:
    """``--disk-cache`` and ``--disk-cache-mode``, in a group of their own.

    They go with the build flags (``pull``, ``boot``, ``serve``, ``disk pull``)
    and with ``disk push``; what they resolve to, with ``HYPEMAN_DISK_CACHE``
    and registries.conf, is :func:`cli.config.disk_cache`.
    """
    group = parser.add_argument_group("disk cache (built disks shared through a registry)")
    group.add_argument(
        "--disk-cache",
        default=os.environ.get(CACHE_ENV) or None,
        metavar="REGISTRY/REPOSITORY",
        help=f"repository where built disks are looked up and pushed (default: ${CACHE_ENV}, "
        "else registries.conf's disk-cache; an empty value turns it off)",
    )
    group.add_argument(
        "--disk-cache-mode",
        choices=list(CacheMode),
        default=None,
        help="pull: look there before building; push: push what is built here; "
        "both (default): look first, push after a build",
    )


def _disk_commands(
    sub: argparse._SubParsersAction[P],
    push_parents: Sequence[P],
    pull_parents: Sequence[P],
) -> None:
    """The ``disk`` command and its two actions (handlers in :mod:`cli.disk`)."""
    summary = "Share built disks through the disk cache by hand: push, pull."
    disk = sub.add_parser("disk", help=summary, description=summary, epilog=EXAMPLES["disk"])
    disk.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = disk.add_subparsers(dest="disk_command", required=True, metavar="ACTION")
    push = actions.add_parser(
        "push",
        parents=list(push_parents),
        help="Push a local image's disk to the disk cache.",
        description="Push a local image's ready disk to the disk cache, whatever the mode.",
    )
    push.add_argument("image", help="tag or digest reference of a local image")
    push.add_argument(
        "--format",
        choices=FORMATS,
        help="the disk to push (default: the ready one, ext4 first)",
    )
    push.set_defaults(run=HANDLERS["disk push"])
    pull = actions.add_parser(
        "pull",
        parents=list(pull_parents),
        help="Fetch an image's disk from the disk cache, never building it.",
        description="Fetch and verify an image's disk from the disk cache, as pull does, "
        f"but fail (exit {NotFound.exit_code} if there is none, {DiskArtifactInvalid.exit_code} "
        f"or {DigestMismatch.exit_code} if it fails a check) instead of building it here.",
    )
    pull.add_argument("image", help="image reference: alpine, localhost:5000/app:1, …")
    pull.add_argument("--no-progress", action="store_true", help="plain progress lines, no bars")
    pull.set_defaults(run=HANDLERS["disk pull"])
