"""The ``serve`` command: the REST API on a socket bound before anything starts.

The address and the token file are checked first, so that a mistake in
either ends ``serve`` with one line and an untouched data dir
(tests/cli/test_cli.py, the ``serve`` tests). Without a token it listens on
loopback only, and answers only requests whose ``Host`` is on the allow-list
(docs/security.md, "Who can reach the API"). uvicorn and the API are
imported inside the handler: no other command needs them.
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
from hypeman_images.cli.guards import service_limits
from hypeman_images.cli.servelog import RequestLog, configure, log_uvicorn_here
from hypeman_images.errors import InvalidArgument, ServiceError
from hypeman_images.store.access import exposure

log = logging.getLogger(__name__)

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


def require_loopback_without_token(host: str, listen: str, token: str | None) -> None:
    """Without a token, refuse an address other hosts can reach.

    Called with the ``--listen`` host before binding (an address is refused
    without ever being bound) and with the bound address after (a name).
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return  # a name: the bound address decides
    if token is None and not loopback:
        raise InvalidArgument(
            f"--listen {listen} is reachable from other hosts, and without --token-file "
            "anyone there could build and delete images: give serve a token, or listen "
            "on 127.0.0.1 or [::1]"
        )


def serve(args: argparse.Namespace) -> int:
    """``serve``: resume interrupted builds, then answer the API until a signal stops it."""
    from hypeman_images.service.api import create_app
    from hypeman_images.service.limits import allowed_hosts
    from hypeman_images.service.server import http_server

    host, port = listen_address(args.listen)
    token = read_token(args.token_file) if args.token_file else None
    if args.concurrency < 1:
        raise InvalidArgument(f"--concurrency must be at least 1, not {args.concurrency}")
    limits = service_limits(args)
    require_loopback_without_token(host, args.listen, token)
    sock = bind(host, port, args.listen)
    try:
        require_loopback_without_token(sock.getsockname()[0], args.listen, token)
    except InvalidArgument:
        sock.close()
        raise
    # With a token, a browser cannot drive the API, so Host is checked only if asked to.
    hosts = None
    if token is None or args.allowed_host:
        hosts = allowed_hosts(sock.getsockname()[0], args.allowed_host)
    configure(args.verbose)
    manager = open_manager(args, build_options(args), concurrency=args.concurrency)
    try:
        warning = exposure(manager.data.root)
        if warning:
            log.warning("%s", warning)
        report = manager.recover()
        if report.resumed:
            log.warning(
                "resuming %d interrupted builds",
                len(report.resumed),
                extra={"images": ",".join(report.resumed)},
            )
        app = create_app(manager, token=token, limits=limits, hosts=hosts)
        server = http_server(RequestLog(app), limits, verbose=bool(args.verbose))
        log_uvicorn_here(args.verbose)  # RequestLog's lines replace uvicorn's access log
        url = f"http://{args.listen}"
        log.info(
            "serving on %s",
            url,
            extra={
                "url": url,
                "data_dir": str(manager.data.root),
                "concurrency": args.concurrency,
                "token": "required" if token else "none",
            },
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
        manager.close(timeout=SHUTDOWN_GRACE_S)
    code = 0 if server.started else 1
    _exit_now_if_builds_linger(code)
    return code


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
