"""The ``hypeman-images`` command line: parser, handlers and exit codes.

``app.main`` is the entry point; ``parser`` declares the commands and
``helptext`` their prose; the handlers live by area (``images``, ``boot``,
``login``, ``serve``, ``disk`` for the disk cache) and build the library's
objects through ``config``; ``output`` prints (and escapes what an image
wrote), ``listing`` lays out ``list``'s table, ``servelog`` is ``serve``'s
logfmt, ``interrupt`` is what Ctrl-C leaves behind. The parser names each
command's handler (``parser.HANDLERS``) and ``app.main`` imports only the one
that runs; what a command alone needs (the registry client and httpx for
``pull``, uvicorn and the API for ``serve``, the VM machinery for ``boot``)
is imported when it is first used, so that ``list``, ``inspect``, ``rm`` and
``tag`` start without any of it (tests/cli/test_cli_startup.py).

May import: everything below it (``service``, ``build``, ``boot`` and what
they may import).
"""

import sys

# httpx's __init__ imports its own command-line tool (httpx._main: click,
# pygments, rich.syntax...) whenever click is installed, and falls back to a
# stub on ImportError. We never run it, and blocking it takes a sizeable part
# of every command's start-up away. It is done here, before any module of this
# package can import httpx, and only when the CLI is loaded, never by the library.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from hypeman_images.cli.app import main  # noqa: E402

__all__ = ["main"]
