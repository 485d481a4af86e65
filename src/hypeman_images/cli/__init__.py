"""The ``hypeman-images`` command line: parser, handlers and exit codes.

May import: everything below it (``service``, ``build``, ``boot`` and what
they may import).
"""

from hypeman_images.cli.app import main

__all__ = ["main"]
