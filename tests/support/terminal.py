"""What a terminal shows after a program drew on it: enough of a VT100 for rich's live display.

rich redraws its bars in place (carriage return, erase line, cursor up), so
the raw bytes repeat every row many times; :func:`screen` replays them and
returns the lines a user would see at the end, scrollback included.
:func:`run_in_terminal` runs a program with its stderr on a pseudo-terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_SEQUENCE = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b.")


def screen(output: str, width: int = 100) -> list[str]:
    """The lines on screen (and above it) once ``output`` has been drawn; trailing blanks cut."""
    lines: list[list[str]] = [[]]
    row = col = 0

    def put(char: str) -> None:
        nonlocal col
        if col >= width:  # auto-wrap
            newline()
        line = lines[row]
        line.extend(" " * (col - len(line) + 1))
        line[col] = char
        col += 1

    def newline() -> None:
        nonlocal row, col
        row, col = row + 1, 0
        if row == len(lines):
            lines.append([])

    pos = 0
    while pos < len(output):
        match = _SEQUENCE.match(output, pos)
        if match:
            pos = match.end()
            params, command = match.group(1) or "", match.group(2)
            count = int(params) if params.isdigit() else 1
            if command == "A":
                row = max(0, row - count)
            elif command == "B":
                row = min(len(lines) - 1, row + count)
            elif command == "C":
                col += count
            elif command == "D":
                col = max(0, col - count)
            elif command == "G":
                col = count - 1
            elif command == "K":
                mode = int(params) if params.isdigit() else 0
                line = lines[row]
                if mode == 2:
                    lines[row] = []
                elif mode == 0:
                    del line[col:]
                else:
                    line[: col + 1] = [" "] * min(len(line), col + 1)
            continue
        char = output[pos]
        pos += 1
        if char == "\n":
            newline()
        elif char == "\r":
            col = 0
        elif char == "\b":
            col = max(0, col - 1)
        elif char >= " ":
            put(char)
    text = ["".join(line).rstrip() for line in lines]
    while text and not text[-1]:
        text.pop()
    return text


@dataclass
class TerminalRun:
    """A program run with its stderr on a pseudo-terminal: exit code, raw drawing, stdout."""

    code: int
    drawn: str
    stdout: str

    @property
    def lines(self) -> list[str]:
        """What the terminal shows at the end."""
        return screen(self.drawn)


def run_in_terminal(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    interrupt_when: str | None = None,
    timeout: float = 120,
) -> TerminalRun:
    """Run ``argv`` with stderr on a 100x30 pseudo-terminal; stdout stays a pipe.

    With ``interrupt_when``, SIGINT goes to the program's process group (as
    Ctrl-C on a terminal sends it) once the terminal shows that text.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    full_env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", **(env or {})}
    full_env.pop("NO_COLOR", None)
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=full_env,
        start_new_session=True,  # its own group: Ctrl-C and the clean-up reach every child
    ) as process:
        os.close(slave)
        drawn = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer of the terminal is gone
                break
            if not chunk:
                break
            drawn += chunk
            if interrupt_when is not None and interrupt_when.encode() in drawn:
                os.killpg(process.pid, signal.SIGINT)
                interrupt_when = None
        os.close(master)
        try:
            out, _ = process.communicate(timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.communicate()
            raise AssertionError(
                f"{argv[1:]} still running after {timeout:.0f} s; the terminal showed:\n"
                + "\n".join(screen(drawn.decode(errors="replace")))
            ) from None
        finally:
            _kill_group(process.pid)  # nothing it started outlives the test
        code = process.returncode
    return TerminalRun(code, drawn.decode(errors="replace"), out.decode())


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
