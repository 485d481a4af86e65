"""The ``hypeman-images`` command line.

Exit codes (also in ``--help`` and the README): 0 ok; 1 other failure
(including 409-style conflicts); 2 bad usage or image name; 3 not found;
4 unauthorized; 5 rate limited; 6 platform not in the index; 7 bad image
content; 8 digest mismatch; 9 e2fsprogs problem; 10 data dir not writable or
full; 11 boot failed; 12 a local disk fails its check (verify); 130
interrupted. Every command that prints data takes
``--json``; errors are then also printed as ``{"code", "message",
"exit_code"}`` on stdout. Progress goes to stderr: bars on a terminal, plain
lines otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

# httpx's __init__ imports its own command-line tool (httpx._main: click,
# pygments, rich.syntax...) whenever click is installed, and falls back to a
# stub on ImportError. We never run it; blocking it saves ~15-30 ms of every
# command's start-up (issue 7). Only this CLI's process does it, not the library.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from hypeman_images import __version__  # noqa: E402
from hypeman_images.build.image import Image, image_of  # noqa: E402
from hypeman_images.build.manager import DEFAULT_CONCURRENCY, ImageManager  # noqa: E402
from hypeman_images.build.options import BuildOptions, default_data_dir, parse_size  # noqa: E402
from hypeman_images.build.progress import PlainReporter, Reporter, RichReporter, human_size  # noqa: E402
from hypeman_images.build.queue import PauseHook  # noqa: E402
from hypeman_images.errors import HypemanError, InvalidArgument, ServiceError  # noqa: E402
from hypeman_images.layers.limits import Limits  # noqa: E402
from hypeman_images.oci.reference import DOCKER_HUB, parse_reference  # noqa: E402
from hypeman_images.oci.spec import Platform  # noqa: E402
from hypeman_images.registry.client import RegistryClient  # noqa: E402
from hypeman_images.registry.config import RegistryConfig, check_timeout  # noqa: E402
from hypeman_images.registry.credentials import (  # noqa: E402
    Credential,
    default_credentials,
    login,
    logout,
    registry_key,
)
from hypeman_images.store.images import ImageStatus  # noqa: E402

log = logging.getLogger(__name__)

PROG = "hypeman-images"
DEFAULT_LISTEN = "127.0.0.1:8080"
# How long `serve` waits for running builds on shutdown before leaving them to recovery.
SHUTDOWN_GRACE_S = 10.0

EXIT_CODES = """\
exit codes:
  0 ok               1 other failure    2 bad usage/name   3 not found
  4 unauthorized     5 rate limited     6 platform missing 7 bad image
  8 digest mismatch  9 e2fsprogs       10 storage         11 boot failed
  12 corrupt disk   13 cannot listen   130 interrupted"""

EXAMPLES = {
    "pull": f"""\
examples:
  {PROG} pull alpine:3.20
  {PROG} pull --platform linux/arm64 ghcr.io/org/app@sha256:<hex>
  {PROG} pull --json localhost:5000/app:1 | jq -r .disk""",
    "list": f"""\
examples:
  {PROG} list
  {PROG} list --json | jq '.[] | select(.status == "ready") | .name'""",
    "inspect": f"""\
examples:
  {PROG} inspect alpine:3.20
  {PROG} inspect --json docker.io/library/alpine@sha256:<hex>""",
    "rm": f"""\
A tag's disk is deleted with the last tag that points at it; a digest goes
with all its tags. An image that is being built cannot be removed (exit 1).

examples:
  {PROG} rm alpine:3.20
  {PROG} rm docker.io/library/alpine@sha256:<hex>""",
    "gc": f"""\
Removes cached blobs no ready or in-progress image needs, the directories of
failed builds, and temp files left by interrupted ones.

examples:
  {PROG} gc
  {PROG} gc --json""",
    "verify": f"""\
Runs e2fsck -fn on the image's disk again and hashes it. If the disk's sha256
was recorded (at pull, unless --no-disk-digest; or verify --record later), it must still
match: a disk that fails either check exits 12; remove it and pull again.

examples:
  {PROG} verify alpine:3.20
  {PROG} verify --record --json docker.io/library/alpine@sha256:<hex>""",
    "boot": f"""\
Boots the image's disk (pulled first if it is not local) in a microVM: Cloud
Hypervisor when it is on PATH, else QEMU microvm with KVM where KVM works and
TCG where it does not. Prints the command's output and exits with its code.

examples:
  {PROG} boot alpine:3.20
  {PROG} boot alpine:3.20 -- cat /etc/alpine-release
  {PROG} boot --print-command alpine:3.20""",
    "login": f"""\
Stores the credential where docker and podman look (a credential helper if
one is configured, else ~/.docker/config.json, mode 0600) after checking it.

examples:
  {PROG} login -u me registry.example.com
  echo "$TOKEN" | {PROG} login -u me --password-stdin ghcr.io""",
    "logout": f"""\
examples:
  {PROG} logout registry.example.com""",
    "serve": f"""\
Serves POST/GET /images, GET/DELETE /images/{{name}}, /healthz, /metrics and
/openapi.json. Builds interrupted by a crash or restart are resumed at start.
The token file holds one bearer token and must not be readable by group or
others (chmod 600).

examples:
  {PROG} serve --listen 127.0.0.1:8080
  {PROG} serve --listen 0.0.0.0:8080 --token-file /etc/hypeman/token --concurrency 4
  curl -H "Authorization: Bearer $(cat token)" -d '{{"name":"alpine"}}' \\
       -H 'Content-Type: application/json' http://127.0.0.1:8080/images""",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: $HYPEMAN_DATA_DIR, /var/lib/hypeman as root, "
        "else $XDG_DATA_HOME/hypeman)",
    )
    common.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    registry_flags = _Parser(add_help=False)
    registry_flags.add_argument(
        "--registries-conf",
        type=Path,
        default=os.environ.get("HYPEMAN_REGISTRIES_CONF") or None,
        help="registries.conf-like TOML: mirrors, insecure registries, certs dirs "
        "(default: $HYPEMAN_REGISTRIES_CONF)",
    )
    registry_flags.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="HTTPS without certificate checks, or plain HTTP, for this registry (repeatable)",
    )
    registry_flags.add_argument("--ca-bundle", type=Path, help="CA certificates (PEM) to trust")
    registry_flags.add_argument(
        "--max-manifest-size",
        default=None,
        help="largest manifest, index or config accepted (default 4M)",
    )
    registry_flags.add_argument(
        "--max-blob-size", default=None, help="largest compressed layer accepted (default 32G)"
    )
    registry_flags.add_argument(
        "--certs-dir",
        action="append",
        type=Path,
        default=[],
        help="certs.d-style directory: <dir>/<host:port>/ca.crt (repeatable)",
    )
    registry_defaults = RegistryConfig()
    registry_flags.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds to wait for a connection to a registry "
        f"(default {registry_defaults.connect_timeout:g})",
    )
    registry_flags.add_argument(
        "--read-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds a registry may send nothing before the request fails and is retried "
        f"(default {registry_defaults.read_timeout:g})",
    )
    registry_flags.add_argument(
        "--allow-foreign-layers",
        action="store_true",
        default=None,
        help="fetch non-distributable (foreign) layers from the URLs their image names "
        "(default: refuse them)",
    )
    build_flags = _Parser(add_help=False)
    build_flags.add_argument(
        "--platform", help="OS/ARCH[/VARIANT] to pick from an index (default: the host's)"
    )
    build_flags.add_argument(
        "--free-space", default=None, help="free space to leave in the disk (e.g. 64M; default 16M)"
    )
    build_flags.add_argument("--mke2fs", default=None, help="mke2fs binary (default: from PATH)")
    build_flags.add_argument(
        "--disk-digest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record the disk's sha256 in metadata.json (default; --no-disk-digest saves "
        "about 0.8 s per GB of disk)",
    )
    build_flags.add_argument(
        "--two-pass",
        action="store_true",
        help="scan every layer before writing the disk, never in one pass (slower; same tree)",
    )
    limits = build_flags.add_argument_group("safety limits (against hostile images)")
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
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = _Parser(
        prog=PROG,
        description="Turn OCI container images into bootable ext4 disks for microVMs.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options and examples.\n\n"
        + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, *, data: bool = True, registry: bool = False, build: bool = False
    ) -> argparse.ArgumentParser:
        parents = [common, json_flag] if data else [common]
        parents += [registry_flags] if registry else []
        parents += [build_flags] if build else []
        return sub.add_parser(
            name,
            parents=parents,
            help=summary,
            description=summary,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command(
        "pull",
        "Pull an image, convert it into rootfs.ext4 and print the disk's path.",
        registry=True,
        build=True,
    )
    p.add_argument("image", help="image reference: alpine, localhost:5000/app:1, repo@sha256:…")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines, no bars")
    p.set_defaults(run=_pull)

    p = command("list", "List local images with their status, tags and size.")
    p.set_defaults(run=_list)

    p = command("inspect", "Show an image's metadata: entrypoint, cmd, env, status, disk.")
    p.add_argument("image", help="tag or digest reference of a local image")
    p.set_defaults(run=_inspect)

    p = command("rm", "Remove images by tag or by digest.")
    p.add_argument("image", nargs="+", help="tag or digest references")
    p.set_defaults(run=_rm)

    p = command("gc", "Free space: unneeded blobs, failed builds, leftovers of crashes.")
    p.set_defaults(run=_gc)

    p = command("verify", "Check a local image's disk again: e2fsck -fn and its sha256.")
    p.add_argument("image", help="tag or digest reference of a local image")
    p.add_argument(
        "--record", action="store_true", help="record the sha256 if none was (for later checks)"
    )
    p.set_defaults(run=_verify)

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
    p.set_defaults(run=_boot)

    p = command("login", "Log in to a registry.", data=False, registry=True)
    p.add_argument("registry", nargs="?", default="docker.io", help="host[:port] (docker.io)")
    p.add_argument("-u", "--username", help="user name (asked for on a terminal if not given)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(run=_login)

    p = command("logout", "Forget a registry's credential.", data=False)
    p.add_argument("registry", nargs="?", default="docker.io", help="host[:port] (docker.io)")
    p.set_defaults(run=_logout)

    p = command(
        "serve",
        "Run the REST API (hypeman's /images) on HOST:PORT.",
        data=False,
        registry=True,
        build=True,
    )
    p.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to bind (default {DEFAULT_LISTEN})"
    )
    p.add_argument("--token-file", type=Path, help="require this bearer token (file mode 0600)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"builds run at once (default {DEFAULT_CONCURRENCY})",
    )
    p.set_defaults(run=_serve)
    return parser


def _registry_config(args: argparse.Namespace) -> RegistryConfig:
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
    return config


def _client(args: argparse.Namespace) -> RegistryClient:
    return RegistryClient(credentials=default_credentials(), config=_registry_config(args))


def _manager(
    args: argparse.Namespace, options: BuildOptions | None = None, concurrency: int | None = None
) -> ImageManager:
    return ImageManager(
        args.data_dir or default_data_dir(),
        options=options,
        client_factory=lambda: _client(args),
        concurrency=concurrency or DEFAULT_CONCURRENCY,
        pause=PauseHook.from_env(),  # the documented crash-test hook; unset in real use
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _image_json(image: Image) -> dict[str, Any]:
    """metadata.json's fields (env as the OCI list) with the live status, tags and disk path."""
    doc: dict[str, Any] = json.loads(image.record.to_json())
    doc.update(
        name=image.name,
        status=str(image.status),
        queue_position=image.queue_position,
        error=image.error,
        repository=image.repository,
        tags=list(image.tags),
        disk=str(image.disk) if image.disk else None,
    )
    return doc


def _reporter(args: argparse.Namespace) -> Reporter:
    if args.json:
        return Reporter()
    if sys.stderr.isatty() and not args.no_progress:
        return RichReporter()
    return PlainReporter()


def _build_options(args: argparse.Namespace) -> BuildOptions:
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
    limits = options.limits
    if args.max_entries < 1:
        raise InvalidArgument(f"--max-entries must be at least 1, not {args.max_entries}")
    limits = replace(limits, max_entries=args.max_entries)
    if args.max_layer_size:
        limits = replace(limits, max_layer_bytes=parse_size(args.max_layer_size))
    if args.max_image_size:
        limits = replace(limits, max_image_bytes=parse_size(args.max_image_size))
    return replace(options, limits=limits)


def _pull(args: argparse.Namespace) -> int:
    options = _build_options(args)
    reporter = _reporter(args)
    try:
        with _manager(args, options) as manager:
            stored = manager.pull(args.image, reporter=reporter)
    finally:
        reporter.close()
    image = image_of(stored)
    if args.json:
        _print_json(_image_json(image))
    else:
        print(image.disk)
    return 0


def _list(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        images = manager.list()
    if args.json:
        _print_json([_image_json(i) for i in images])
        return 0
    rows = [("REPOSITORY", "TAGS", "DIGEST", "STATUS", "SIZE", "CREATED")]
    for image in images:
        size = human_size(image.size_bytes) if image.size_bytes else "-"
        status = str(image.status)
        if image.queue_position:
            status += f" (#{image.queue_position})"
        short = image.digest.partition(":")[2][:12]
        tags = ",".join(image.tags) or "-"
        rows.append((image.repository, tags, short, status, size, image.created_at))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        image = manager.get(args.image)
    if args.json:
        _print_json(_image_json(image))
        return 0
    fields: list[tuple[str, object]] = [
        ("name", image.name),
        ("digest", image.digest),
        ("status", image.status),
        ("error", image.error),
        ("tags", ", ".join(image.tags) or "-"),
        ("platform", image.platform),
        ("size", human_size(image.size_bytes) if image.size_bytes else None),
        ("entrypoint", json.dumps(image.entrypoint)),
        ("cmd", json.dumps(image.cmd)),
        ("working_dir", image.working_dir or "/"),
        ("user", image.user or "root"),
        ("created_at", image.created_at),
        ("disk", image.disk),
    ]
    for key, value in fields:
        if value is not None:
            print(f"{key + ':':13} {value}")
    for item in image.record.env:
        print(f"{'env:':13} {item}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    removed: list[str] = []
    with _manager(args) as manager:
        for name in args.image:
            removed.extend(manager.delete(name))
    if args.json:
        _print_json({"removed": removed})
    else:
        for name in removed:
            print(f"removed {name}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        report = manager.gc()
    if args.json:
        _print_json(
            {
                "blobs_removed": report.blobs_removed,
                "directories_removed": report.directories_removed,
                "scans_removed": report.scans_removed,
                "bytes_freed": report.bytes_freed,
            }
        )
    else:
        print(
            f"removed {report.blobs_removed} blobs, {report.directories_removed} build "
            f"directories and {report.scans_removed} layer scans, freed "
            f"{human_size(report.bytes_freed)}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        checked = manager.verify(args.image, record=args.record)
    if args.json:
        _print_json(
            {
                "name": checked.name,
                "digest": checked.digest,
                "disk": str(checked.disk),
                "sha256": checked.sha256,
                "recorded": checked.recorded,
                "recorded_now": checked.recorded_now,
            }
        )
        return 0
    if checked.recorded is not None:
        how = "matches the sha256 recorded at build time"
    elif checked.recorded_now:
        how = "recorded now"
    else:
        how = "none recorded (--record keeps it)"
    print(f"ok: {checked.name}: e2fsck -fn clean; {checked.sha256} {how}")
    return 0


def _boot(args: argparse.Namespace) -> int:
    # Imported here: only this command needs the VM machinery.
    import shlex

    from hypeman_images.boot import boot, boot_command
    from hypeman_images.errors import NotFound

    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    with _manager(args, _build_options(args)) as manager:
        try:
            image = manager.get(args.image)
            if image.status is not ImageStatus.READY:
                raise NotFound(f"{args.image} is {image.status}, not ready")
        except NotFound:
            image = image_of(manager.pull(args.image, reporter=PlainReporter()))
        if image.disk is None:
            raise NotFound(f"{args.image} has no disk; pull it again")
        disk = image.disk
        metadata = json.loads(image.record.to_json())
        work_dir = manager.data.boot / "run"
        work_dir.mkdir(parents=True, exist_ok=True)
        if args.print_command:
            argv = boot_command(
                disk,
                metadata,
                command=command or None,
                hypervisor="cloud-hypervisor",
                accel="kvm",
                work_dir=work_dir,
                cache_dir=manager.data.boot,
            )
            print(shlex.join(argv))
            return 0
        result = boot(
            disk,
            metadata,
            command=command or None,
            timeout=args.timeout,
            hypervisor=args.hypervisor,
            accel=args.accel,
            work_dir=work_dir,
            cache_dir=manager.data.boot,
            memory_mib=args.memory,
        )
    if args.json:
        doc = dataclasses.asdict(result)
        doc.pop("console", None)
        _print_json(doc)
    else:
        sys.stdout.write(result.output)
        sys.stdout.flush()
        if result.error:
            print(f"{PROG}: {result.error}", file=sys.stderr)
        print(
            f"{PROG}: booted with {result.hypervisor} ({result.accelerator}); "
            f"exit code {result.exit_code}",
            file=sys.stderr,
        )
    return result.exit_code


def _registry_host(text: str) -> str:
    """``docker.io`` for Docker Hub's names, else the host as given (validated).

    Accepts what ``docker login`` does: a bare host, or a URL ending in ``/v1``
    or ``/v2``; the scheme and Hub aliases are read as the credential files are.
    """
    path = text.split("://", 1)[-1].rstrip("/").partition("/")[2]
    if path not in ("", "v1", "v2"):
        raise InvalidArgument(f"invalid registry {text!r}: expected HOST[:PORT], e.g. ghcr.io")
    host = registry_key(text)
    return host if host == DOCKER_HUB else parse_reference(f"{host}/x").registry


def _login(args: argparse.Namespace) -> int:
    import getpass

    registry = _registry_host(args.registry)
    username = args.username
    if not username and sys.stdin.isatty() and not args.password_stdin:
        username = input(f"Username for {registry}: ").strip()
    if not username:
        raise InvalidArgument("a user name is needed: pass -u USER")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {username}@{registry}: ")
    if not password:
        raise InvalidArgument("empty password")
    with _client(args) as client:
        client.check_login(registry, Credential(username, password, origin=f"{PROG} login"))
    where = login(registry, username, password)
    print(f"Login succeeded; credential stored in {where}")
    return 0


def _logout(args: argparse.Namespace) -> int:
    registry = _registry_host(args.registry)
    if logout(registry):
        print(f"Removed the credential for {registry}")
    else:
        print(f"Not logged in to {registry}")
    return 0


def _listen_address(text: str) -> tuple[str, int]:
    host, colon, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgument(f"invalid --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port_text)


def _bind(host: str, port: int, listen: str) -> socket.socket:
    """The listening socket, bound before anything else starts, with a usable error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except socket.gaierror as exc:  # an OSError too: before the generic case
        raise InvalidArgument(f"invalid --listen {listen!r}: {exc.strerror}") from exc
    except OSError as exc:
        hint = {
            errno.EADDRINUSE: "another process listens there; stop it or pick another --listen",
            errno.EADDRNOTAVAIL: "no interface of this host has that address",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
        }.get(exc.errno or 0, "check --listen")
        raise ServiceError(f"cannot listen on {listen}: {exc.strerror} ({hint})") from exc


def read_token(path: Path) -> str:
    """The bearer token in ``path``; refuses a file others may read."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read token file {path}: {exc.strerror}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(
            f"token file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
        )
    token = text.strip()
    if not token:
        raise InvalidArgument(f"token file {path} is empty")
    return token


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the other commands need neither and start faster without them.
    import uvicorn

    from hypeman_images.service.api import create_app

    host, port = _listen_address(args.listen)
    token = read_token(args.token_file) if args.token_file else None
    if args.concurrency < 1:
        raise InvalidArgument(f"--concurrency must be at least 1, not {args.concurrency}")
    sock = _bind(host, port, args.listen)
    manager = _manager(args, _build_options(args), concurrency=args.concurrency)
    try:
        report = manager.recover()
        if report.resumed:
            log.warning("resuming %d interrupted builds", len(report.resumed))
        config = uvicorn.Config(
            create_app(manager, token=token),
            log_level="info" if args.verbose else "warning",
            access_log=bool(args.verbose),
        )
        server = uvicorn.Server(config)
        print(
            f"{PROG}: serving on http://{args.listen} (data dir {manager.data.root}, "
            f"concurrency {args.concurrency}{', token required' if token else ''})",
            file=sys.stderr,
            flush=True,
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
        manager.close(timeout=SHUTDOWN_GRACE_S)
    code = 0 if server.started else 1
    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        # Builds outlived the grace period: leave them to the next start's recovery
        # rather than let the interpreter's exit wait for them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except HypemanError as exc:
        if getattr(args, "json", False):
            _print_json({"code": exc.code, "message": exc.message, "exit_code": exc.exit_code})
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Download and scan workers are blocked in I/O; the interpreter's exit
        # would join them. Leave now: temp files carry our pid, and the next
        # gc or recover removes what a dead writer left.
        os._exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
