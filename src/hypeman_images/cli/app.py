"""The program: parse the arguments, run the command, turn its failure into an exit code.

Exit codes come from :mod:`hypeman_images.errors` (``--help`` prints the
table). Every command that prints data takes ``--json``; errors are then also
printed as ``{"code", "message", "exit_code"}`` on stdout. Progress goes to
stderr: bars on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from hypeman_images.cli.interrupt import exit_interrupted
from hypeman_images.cli.output import PROG, print_json, printable
from hypeman_images.cli.parser import Handler, parse_args
from hypeman_images.errors import HypemanError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = parse_args(argv)
    _configure_logging(args.verbose)
    handler: Handler = args.run
    try:
        # Only now is the command's module imported: no command pays for another's.
        return handler.load()(args)
    except HypemanError as exc:
        if getattr(args, "json", False):
            print_json({"code": exc.code, "message": exc.message, "exit_code": exc.exit_code})
        # Messages may quote a registry or an image: never raw to a terminal.
        print(f"{PROG}: error: {printable(exc.message, lines=True)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        exit_interrupted()
    except BrokenPipeError:
        # The reader went away (``| head``): later writes, and the interpreter's
        # final flush, go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return HypemanError.exit_code


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to whatever ``sys.stderr`` is at the time.

    While progress bars are drawn, rich puts a proxy there that prints above
    the bars; a handler holding the original stream would write between
    their redraws, and the bars would be drawn again below (twice on screen).
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.WARNING
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if verbosity < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
