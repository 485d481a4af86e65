"""The numbers ``serve``'s flags set for what one client may cost it (docs/security.md).

Apart from :mod:`.limits`, which enforces them: the CLI's parser shows these
defaults on every command, and must not import Starlette for them.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024


@dataclass(frozen=True)
class ServiceLimits:
    """What one client may cost ``serve``.

    ``max_body_bytes``: the largest request body (the API's bodies are a few
    hundred bytes of JSON). ``body_timeout``: seconds to receive a whole body
    once its head is in. ``header_timeout``: seconds from the connection (or
    the previous answer) to a whole request head. ``max_connections``: open at
    once; beyond it ``serve`` stops accepting, and the kernel's backlog holds
    the rest.
    """

    max_body_bytes: int = 64 * KiB
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    max_connections: int = 256


__all__ = ["ServiceLimits"]
