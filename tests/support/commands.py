"""The commands the CLI offers, as a user reads them in ``--help``: one list for every test."""

from __future__ import annotations

COMMANDS = (
    "pull",
    "list",
    "inspect",
    "rm",
    "tag",
    "gc",
    "verify",
    "serve",
    "boot",
    "login",
    "logout",
)
SUBCOMMANDS = (("disk", "push"), ("disk", "pull"))
