"""What the VM's init runs: the image's process config and how it reaches the init."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypeman_images.errors import InvalidArgument


def _string_list(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidArgument(f"metadata {key!r} must be a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class RunSpec:
    """The process part of an image config (OCI image-spec ``config``).

    ``entrypoint`` and ``cmd`` follow Docker: the command line is entrypoint + cmd,
    and a command given at run time replaces ``cmd`` only. ``env`` holds ``K=V``
    strings; ``user`` is ``""``, ``uid``, ``uid:gid``, ``name`` or ``name:group``.
    """

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    def __post_init__(self) -> None:
        for item in self.env:
            if "=" not in item or item.startswith("="):
                raise InvalidArgument(f"environment entry {item!r} is not of the form KEY=VALUE")
        if self.working_dir and not self.working_dir.startswith("/"):
            raise InvalidArgument(f"working dir {self.working_dir!r} must be an absolute path")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> RunSpec:
        """Read the keys of an image's ``metadata.json``; missing or null keys take defaults."""
        env = _string_list(metadata.get("env"), "env") or ()
        working_dir = metadata.get("working_dir") or ""
        user = metadata.get("user") or ""
        if not isinstance(working_dir, str) or not isinstance(user, str):
            raise InvalidArgument("metadata 'working_dir' and 'user' must be strings")
        return cls(
            entrypoint=_string_list(metadata.get("entrypoint"), "entrypoint"),
            cmd=_string_list(metadata.get("cmd"), "cmd"),
            env=env,
            working_dir=working_dir,
            user=user,
        )

    def argv(self, command: Sequence[str] | None = None) -> tuple[str, ...]:
        """Return entrypoint + (``command`` if given, else cmd), as ``docker run`` does."""
        args = tuple(command) if command is not None else (self.cmd or ())
        return (self.entrypoint or ()) + args


#: The filesystems ``init.sh`` mounts ``/dev/vda`` as.
FSTYPES = ("ext4", "erofs")


def render_run_conf(
    spec: RunSpec,
    argv: Sequence[str],
    nonce: str,
    *,
    probe: bool = False,
    fstype: str = "ext4",
    stdin: bool = False,
) -> bytes:
    """Render ``/etc/hypeman/run.conf``, the shell assignments ``init.sh`` sources.

    Every value is quoted with :func:`shlex.quote`, so any byte sequence but NUL
    survives; lists become numbered variables since POSIX sh has no arrays.
    ``fstype`` is the disk's filesystem, one of :data:`FSTYPES`.
    ``stdin``: the command reads what the host relays on the console, not /dev/null.
    """
    if fstype not in FSTYPES:
        raise InvalidArgument(f"unknown disk filesystem {fstype!r}: use {' or '.join(FSTYPES)}")
    lines = [
        f"HM_NONCE={shlex.quote(nonce)}",
        f"HM_PROBE={1 if probe else 0}",
        f"HM_STDIN={1 if stdin else 0}",
        f"HM_FSTYPE={fstype}",
        f"HM_WORKDIR={shlex.quote(spec.working_dir or '/')}",
        f"HM_USER={shlex.quote(spec.user)}",
        f"HM_ARGC={len(argv)}",
        *(f"HM_ARG_{i}={shlex.quote(a)}" for i, a in enumerate(argv, 1)),
        f"HM_ENVC={len(spec.env)}",
        *(f"HM_ENV_{i}={shlex.quote(e)}" for i, e in enumerate(spec.env, 1)),
    ]
    for value in (*argv, *spec.env, spec.working_dir, spec.user):
        if "\0" in value:
            raise InvalidArgument(f"NUL byte in {value!r}")
    return ("\n".join(lines) + "\n").encode()
