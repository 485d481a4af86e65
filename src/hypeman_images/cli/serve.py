"""The ``serve`` command: the REST API on a socket bound before anything starts.

The address and the token file are checked first, so that a mistake in
either ends ``serve`` with one line and an untouched data dir
(tests/cli/test_cli.py, the ``serve`` tests). uvicorn and the API are imported
inside the handler: no other command needs them.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import stat
import sys
import threading
from pathlib import Path

from hypeman_images.cli.config import build_options, open_manager
from hypeman_images.cli.servelog import RequestLog, configure
from hypeman_images.errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8080"
# How long `serve` waits for running builds on shutdown before leaving them to recovery.
SHUTDOWN_GRACE_S = 10.0


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port number."""
    host, colon, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgument(f"invalid --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port_text)


def bind(host: str, port: int, listen: str) -> socket.socket:
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


def serve(args: argparse.Namespace) -> int:
    """``serve``: resume interrupted builds, then answer the API until a signal stops it."""
    import uvicorn

    from hypeman_images.service.api import create_app

    host, port = listen_address(args.listen)
    token = read_token(args.token_file) if args.token_file else None
    if args.concurrency < 1:
        raise InvalidArgument(f"--concurrency must be at least 1, not {args.concurrency}")
    sock = bind(host, port, args.listen)
    configure(args.verbose)
    manager = open_manager(args, build_options(args), concurrency=args.concurrency)
    try:
        report = manager.recover()
        if report.resumed:
            log.warning(
                "resuming %d interrupted builds",
                len(report.resumed),
                extra={"images": ",".join(report.resumed)},
            )
        config = uvicorn.Config(
            RequestLog(create_app(manager, token=token)),
            log_config=None,  # our handler and format (servelog), not uvicorn's
            log_level="debug" if args.verbose else "warning",
            access_log=False,  # RequestLog's lines instead
        )
        server = uvicorn.Server(config)
        _announce(sock, args, manager.data.root, token is not None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        manager.close(timeout=SHUTDOWN_GRACE_S)
    code = 0 if server.started else 1
    _exit_now_if_builds_linger(code)
    return code


def _announce(sock: socket.socket, args: argparse.Namespace, data: Path, token: bool) -> None:
    """Say where it serves; warn when anyone on the network could use it without a token."""
    url = f"http://{args.listen}"
    log.info(
        "serving on %s",
        url,
        extra={
            "url": url,
            "data_dir": str(data),
            "concurrency": args.concurrency,
            "token": "required" if token else "none",
        },
    )
    if not token and not _loopback(sock):
        log.warning(
            "%s is reachable from other hosts and no --token-file is set: anyone who can "
            "connect can pull images into %s, list and delete them; set --token-file, or "
            "listen on 127.0.0.1",
            args.listen,
            data,
            extra={"listen": args.listen},
        )


def _loopback(sock: socket.socket) -> bool:
    """True if the socket is bound to a loopback address only (127.0.0.0/8, ::1)."""
    address = ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _exit_now_if_builds_linger(code: int) -> None:
    """Leave at once if builds outlived the grace period.

    The interpreter's exit would wait for their threads; the next start's
    recovery resumes them instead.
    """
    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
