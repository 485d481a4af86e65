"""Run commands or callables as the unprivileged ``nobody`` (65534:65534).

Used to prove that the pipeline works without root. ``setpriv`` drops
privileges for subprocesses; callables run in a forked child that drops them
itself. Paths the child must write to have to be handed over with ``own``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

R = TypeVar("R")


@dataclass(frozen=True)
class UnprivilegedUser:
    """``nobody``; when the tests already run unprivileged, the current user."""

    uid: int = 65534
    gid: int = 65534

    @property
    def needs_switch(self) -> bool:
        return os.geteuid() == 0

    def wrap(self, command: Sequence[str]) -> list[str]:
        """``command`` prefixed with ``setpriv`` when running as root."""
        if not self.needs_switch:
            return list(command)
        ids = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return ["setpriv", *ids, "--", *command]

    def run(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of the wrapped command (kwargs passed through)."""
        return subprocess.run(self.wrap(command), **kwargs)

    def own(self, *paths: Path) -> None:
        """Give ``paths`` (recursively) to this user, and make their parents traversable."""
        if not self.needs_switch:
            return
        for path in paths:
            for parent in path.parents:
                if parent != Path("/"):
                    parent.chmod(parent.stat().st_mode | 0o011)
            for root, dirs, files in os.walk(path):
                for name in [*dirs, *files]:
                    os.lchown(os.path.join(root, name), self.uid, self.gid)
            os.lchown(path, self.uid, self.gid)

    @contextmanager
    def cli_pull(self, cli: str, *args: str) -> Iterator[subprocess.CompletedProcess[str]]:
        """``cli pull --data-dir D *args`` as this user, D its own; D lives while the body runs.

        Skips the test when it would prove nothing (already unprivileged) or
        cannot run (``cli`` not reachable by this user). D is not under
        pytest's base temp dir: a pytest session starting meanwhile (as the
        same user) takes the search permission :meth:`own` gives its parents
        away again.
        """
        if not self.needs_switch:
            pytest.skip("already unprivileged: every other test covers this case")
        if self.run([cli, "--version"], capture_output=True).returncode != 0:
            pytest.skip(f"nobody cannot run {cli}: a parent of the checkout is not searchable")
        with tempfile.TemporaryDirectory(prefix="hypeman-nobody-") as scratch:
            data_dir = Path(scratch) / "data"
            data_dir.mkdir()
            self.own(data_dir)
            yield self.run(
                [cli, "pull", "--data-dir", str(data_dir), *args],
                capture_output=True,
                text=True,
                env={**os.environ, "HOME": str(data_dir)},
            )

    def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` in a forked child with this user's ids; return its result.

        The result (or the exception) travels back pickled through a pipe.
        """
        if not self.needs_switch:
            return fn(*args)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges, never return into pytest
            os.close(read_fd)
            try:
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:
                outcome = (False, exc)
            with os.fdopen(write_fd, "wb") as pipe:
                try:
                    pickle.dump(outcome, pipe)
                except Exception as exc:
                    pickle.dump((False, RuntimeError(repr(exc))), pipe)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        ok, value = pickle.loads(data)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]
