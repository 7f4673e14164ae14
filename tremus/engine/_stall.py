"""Noticing that this process itself was stalled (SIGSTOP, a frozen host, swapping).

A silence timeout measured while this side was not running says nothing about the
peer: its frames may be waiting unread in the socket, or it may have given up on us
meanwhile. Each role watches its own stalls and weighs its timeouts with them.
"""

from __future__ import annotations

from typing import final

import trio

__all__ = ["StallWatch"]


@final
class StallWatch:
    """Ticks every ``period`` seconds and remembers the last gap above ``threshold``.

    ``stalled_after(t)`` is whether this process stood still for ``threshold`` or
    more at some point after ``t`` (``trio.current_time()`` clock, which runs on
    while the process is stopped).
    """

    def __init__(self, threshold: float, period: float = 0.02) -> None:
        self.threshold = threshold
        self.period = min(period, threshold / 4)
        #: Start and end of the most recent stall seen (0, 0: none).
        self.last_stall: tuple[float, float] = (0.0, 0.0)
        self._tick = trio.current_time()

    def check(self) -> None:
        """Record a stall up to now (also called by the roles before they judge)."""
        now = trio.current_time()
        if now - self._tick >= self.threshold:
            self.last_stall = (self._tick, now)
        self._tick = now

    def stalled_after(self, t: float) -> bool:
        self.check()
        return self.last_stall[1] > t

    async def run(self) -> None:
        while True:
            self.check()
            await trio.sleep(self.period)
