"""The program: parse the arguments, run the command, turn its failure into an exit code.

Exit codes come from :mod:`hypeman_images.errors` (``--help`` prints the
table). Every command that prints data takes ``--json``; errors are then also
printed as ``{"code", "message", "exit_code"}`` on stdout. Progress goes to
stderr: bars on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from hypeman_images.cli.output import PROG, print_json
from hypeman_images.cli.parser import parse_args
from hypeman_images.errors import EXIT_INTERRUPTED, HypemanError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = parse_args(argv)
    _configure_logging(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except HypemanError as exc:
        if getattr(args, "json", False):
            print_json({"code": exc.code, "message": exc.message, "exit_code": exc.exit_code})
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Download and scan workers are blocked in I/O; the interpreter's exit
        # would join them. Leave now: temp files carry our pid, and the next
        # gc or recover removes what a dead writer left.
        os._exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (``| head``): later writes, and the interpreter's
        # final flush, go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return HypemanError.exit_code


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
