"""Blocking calls that wait on the network, on threads of their own.

FastAPI runs a plain ``def`` endpoint on one thread pool shared by every
route (anyio's, 40 threads). ``POST /images`` resolves the name at the
registry, which a slow registry can stretch to ``manifest_timeout``; on the
shared pool, enough such requests would leave no thread for ``GET /images``.
So the route awaits :meth:`Offload.run` instead, which runs the call on a
bounded pool that only such calls use: they wait for each other, never the
other routes. (``/healthz`` and the 401s are answered without a thread at
all: :mod:`.limits`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from fastapi import FastAPI

P = ParamSpec("P")
T = TypeVar("T")

# Image creations resolving at once; more wait, in the event loop, for a thread.
CREATE_WORKERS = 16


class Offload:
    """A bounded pool for one kind of blocking call; :meth:`close` when the app stops."""

    def __init__(self, workers: int = CREATE_WORKERS, name: str = "offload") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)`` on the pool, awaited without holding an event-loop thread."""
        return await asyncio.wrap_future(self._pool.submit(call, *args, **kwargs))

    def close(self) -> None:
        """Drop the calls not started; the running ones end on their own deadlines."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def offload(app: FastAPI) -> Offload:
    """The app's pool for registry-bound calls (made by ``service.api.create_app``)."""
    pool: Offload = app.state.offload
    return pool


__all__ = ["CREATE_WORKERS", "Offload", "offload"]
