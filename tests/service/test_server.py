"""The server's pieces that need no client: the throttled log and the open-file headroom.

The behaviour under real clients (slow heads, floods, no descriptors left)
is tests/system/test_serve_limits.py's.
"""

from __future__ import annotations

import logging
import time

import pytest

from hypeman_images.service import server
from hypeman_images.service.server import FD_RESERVE, ThrottledLog, fd_headroom


def test_throttled_log_says_once_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    log = ThrottledLog(logging.getLogger("throttle-test"), interval=0.3)
    with caplog.at_level(logging.WARNING, "throttle-test"):
        for _ in range(1000):
            log.warning("accept failed: %s", "EMFILE")
        assert [r.getMessage() for r in caplog.records] == ["accept failed: EMFILE"]
        time.sleep(0.35)
        log.warning("accept failed: %s", "EMFILE")
    assert caplog.records[-1].getMessage() == (
        "accept failed: EMFILE (999 more like it in the last 0.3 s)"
    )


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def get(self, kind: int) -> tuple[int, int]:
        return self.soft, self.hard

    def set(self, kind: int, limits: tuple[int, int]) -> None:
        self.soft, self.hard = limits


@pytest.mark.parametrize(
    ("soft", "hard", "raised", "warned"),
    [
        pytest.param(1024, 1 << 20, 256 + FD_RESERVE, False, id="enough-already"),
        pytest.param(64, 1 << 20, 256 + FD_RESERVE, False, id="raised-to-fit"),
        pytest.param(64, 300, 300, True, id="hard-limit-too-low"),
    ],
)
def test_fd_headroom(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    soft: int,
    hard: int,
    raised: int,
    warned: bool,
) -> None:
    limits = Limits(soft, hard)
    monkeypatch.setattr(server.resource, "getrlimit", limits.get)
    monkeypatch.setattr(server.resource, "setrlimit", limits.set)
    with caplog.at_level(logging.WARNING, server.log.name):
        fd_headroom(256)
    assert limits.soft == max(soft, raised) and limits.hard == hard
    assert bool(caplog.records) is warned
