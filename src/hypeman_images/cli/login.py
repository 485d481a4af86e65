"""The ``login`` and ``logout`` commands: a registry's credential, checked, then stored.

Credentials go where docker and podman look for them
(:mod:`hypeman_images.registry.credentials`).
"""

from __future__ import annotations

import argparse
import sys

from hypeman_images.cli.config import open_client
from hypeman_images.cli.output import PROG
from hypeman_images.errors import InvalidArgument
from hypeman_images.oci.reference import DOCKER_HUB, parse_reference
from hypeman_images.registry import credentials
from hypeman_images.registry import login as stored
from hypeman_images.registry.credentials import Credential


def registry_host(text: str) -> str:
    """``docker.io`` for Docker Hub's names, else the host as given (validated).

    Accepts what ``docker login`` does: a bare host, or a URL ending in ``/v1``
    or ``/v2``; the scheme and Hub aliases are read as the credential files are.
    """
    path = text.split("://", 1)[-1].rstrip("/").partition("/")[2]
    if path not in ("", "v1", "v2"):
        raise InvalidArgument(f"invalid registry {text!r}: expected HOST[:PORT], e.g. ghcr.io")
    host = credentials.registry_key(text)
    return host if host == DOCKER_HUB else parse_reference(f"{host}/x").registry


def login(args: argparse.Namespace) -> int:
    """``login``: ask for what is missing, check it with the registry, store it."""
    import getpass

    registry = registry_host(args.registry)
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
    with open_client(args) as client:
        client.check_login(registry, Credential(username, password, origin=f"{PROG} login"))
    where = stored.login(registry, username, password)
    print(f"Login succeeded; credential stored in {where}")
    return 0


def logout(args: argparse.Namespace) -> int:
    """``logout``: forget the registry's credential, saying whether there was one."""
    registry = registry_host(args.registry)
    if stored.logout(registry):
        print(f"Removed the credential for {registry}")
    else:
        print(f"Not logged in to {registry}")
    return 0
