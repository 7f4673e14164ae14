"""The console output buffer: the guest's console lines are held per epoch, like its frames.

A console line is output too: once printed it has been seen, and a backup that
resumes from an earlier checkpoint prints it again. The micro-VM's console hands
every line the guest prints to this buffer (in the vCPU thread, through
``Console.line_hook``) instead of to its sink. ``postsuspend(N)`` closes epoch N's
lines (the guest is suspended, so the cut is exact); ``commit(N)`` emits every held
line of epochs <= N to the sink, in the order the guest printed them. Several epochs
may be in flight at once.

``release_all()`` (protection lost) emits everything held, including the still open
epoch, and stops holding: from then on lines go straight to the sink, and none
overtakes one that was held. ``teardown()`` stops holding and *drops* what is still
held (it was never committed), and says so (``discarded``, ``dropped`` and an INFO
log record). Lines beyond the limit are dropped
(counted); the vCPU never waits for the buffer to drain.

The sink is called in the Trio thread (like the domain's own console sink).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, final

import trio

from tremus.buffers._epochhold import EpochHold
from tremus.domains.base import ConsoleSink, DomainError

__all__ = ["ConsoleBuffer"]

log = logging.getLogger(__name__)


@final
class ConsoleBuffer:
    """A ``CheckpointDevice`` holding a domain's console lines until commit.

    ``domain`` must have a ``console`` with a ``line_hook`` (the micro-VM has);
    ``sink`` receives the released lines (default: the domain's own console sink, so
    a held line comes out exactly as an unheld one would).
    """

    name = "console"
    #: Epochs closed but not committed that can be held at once.
    max_inflight = 1 << 16

    #: Its operations never wait: the device runner calls it inline.
    inline = True

    def __init__(self, domain: Any, sink: ConsoleSink | None = None, *,
                 limit_lines: int = 65536) -> None:
        #: The domain whose console is held (set before ``setup``).
        self.domain = domain
        self._sink = sink
        self._emit_to: ConsoleSink | None = None
        self._console: Any = None
        self._lines: EpochHold[str] = EpochHold(limit_items=limit_lines)
        #: Lines emitted to the sink by commit/release_all.
        self.released = 0
        self._discarded_count = 0
        #: The lines the last teardown discarded (never committed), oldest first.
        self.discarded: list[str] = []

    # -- introspection ----------------------------------------------------------------
    @property
    def on_output(self) -> Callable[[], None] | None:
        """Called (in the vCPU thread) when the open epoch gets its first line."""
        return self._lines.on_output

    @on_output.setter
    def on_output(self, callback: Callable[[], None] | None) -> None:
        self._lines.on_output = callback

    @property
    def holding(self) -> bool:
        return self._lines.holding

    @property
    def held_lines(self) -> int:
        """Lines held now (closed epochs and the open one)."""
        return self._lines.held_items

    @property
    def held_epochs(self) -> list[int]:
        """Closed, uncommitted epochs, oldest first."""
        return self._lines.epochs

    def held(self) -> list[tuple[int, list[str]]]:
        """The closed, uncommitted epochs with their lines, oldest first."""
        return self._lines.closed()

    @property
    def dropped(self) -> int:
        """Lines dropped: over the limit while holding, or discarded at teardown."""
        return self._lines.dropped + self._discarded_count

    # -- CheckpointDevice -----------------------------------------------------------------
    async def setup(self) -> None:
        console = getattr(self.domain, "console", None)
        if console is None or not hasattr(console, "line_hook"):
            raise DomainError("the console output buffer needs a domain whose console can "
                              "hold lines (a micro-VM)")
        if console.line_hook is not None and console.line_hook != self._lines.hold:
            raise DomainError("the domain's console already has an output buffer")
        self._emit_to = self._sink if self._sink is not None else getattr(
            self.domain, "console_sink", None)
        self._lines.start()
        console.line_hook = self._lines.hold
        self._console = console
        await trio.lowlevel.checkpoint()

    async def postsuspend(self, epoch: int) -> None:
        self._lines.close(epoch)

    async def preresume(self, epoch: int) -> None:
        """Nothing to do (and, inline, no checkpoint: this runs inside the pause)."""

    async def commit(self, epoch: int) -> int:
        """Emit the lines of every closed epoch <= ``epoch``, in order.

        Returns 0: ``output_released.packets`` counts network packets; ``released``
        counts the lines.
        """
        self._emit(self._lines.take_through(epoch))
        await trio.lowlevel.checkpoint()
        return 0

    async def release_all(self) -> None:
        with self._lines.lock:
            # Emitted under the lock: a line the guest prints now waits for these.
            self._emit(self._lines.stop())
        await trio.lowlevel.checkpoint()

    async def teardown(self) -> None:
        with self._lines.lock:
            discarded = self._lines.stop()
            self._discarded_count += len(discarded)
            if self._console is not None and self._console.line_hook == self._lines.hold:
                self._console.line_hook = None
        if discarded:
            self.discarded = discarded
            # INFO, not WARNING: nothing is printed on stderr by default (a halted
            # primary's stderr is one `tremus: error:` line, and tools rely on that).
            log.info("console: dropped %d line(s) of epochs never acknowledged, "
                     "from %r to %r", len(discarded), discarded[0], discarded[-1])
        await trio.lowlevel.checkpoint()

    def _emit(self, lines: list[str]) -> None:
        sink = self._emit_to
        if sink is None:
            self.released += len(lines)
            return
        for line in lines:
            sink(line)
            self.released += 1
