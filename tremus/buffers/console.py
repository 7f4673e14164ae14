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
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, final

import trio

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
        self.limit_lines = limit_lines
        #: Called (in the vCPU thread) when the open epoch gets its first line.
        self.on_output: Callable[[], None] | None = None
        # Guarded by _lock (the vCPU thread appends to _open).
        self._lock = threading.Lock()
        self._holding = False
        self._open: list[str] = []
        self._closed: deque[tuple[int, list[str]]] = deque()
        self._last_closed: int | None = None
        self._held_lines = 0
        #: Lines emitted to the sink by commit/release_all.
        self.released = 0
        #: Lines dropped: over the limit while holding, or discarded at teardown.
        self.dropped = 0
        #: The lines the last teardown discarded (never committed), oldest first.
        self.discarded: list[str] = []

    # -- introspection ----------------------------------------------------------------
    @property
    def holding(self) -> bool:
        return self._holding

    @property
    def held_lines(self) -> int:
        """Lines held now (closed epochs and the open one)."""
        with self._lock:
            return self._held_lines

    @property
    def held_epochs(self) -> list[int]:
        """Closed, uncommitted epochs, oldest first."""
        with self._lock:
            return [epoch for epoch, _ in self._closed]

    def held(self) -> list[tuple[int, list[str]]]:
        """The closed, uncommitted epochs with their lines, oldest first."""
        with self._lock:
            return [(epoch, list(lines)) for epoch, lines in self._closed]

    # -- the vCPU thread's side ---------------------------------------------------------
    def _hold(self, line: str) -> bool:
        with self._lock:
            if not self._holding:
                return False
            if self._held_lines >= self.limit_lines:
                self.dropped += 1
                return True
            first = not self._open
            self._open.append(line)
            self._held_lines += 1
        if first and self.on_output is not None:
            self.on_output()
        return True

    # -- CheckpointDevice -----------------------------------------------------------------
    async def setup(self) -> None:
        console = getattr(self.domain, "console", None)
        if console is None or not hasattr(console, "line_hook"):
            raise DomainError("the console output buffer needs a domain whose console can "
                              "hold lines (a micro-VM)")
        if console.line_hook is not None and console.line_hook != self._hold:
            raise DomainError("the domain's console already has an output buffer")
        self._emit_to = self._sink if self._sink is not None else getattr(
            self.domain, "console_sink", None)
        with self._lock:
            self._holding = True
            console.line_hook = self._hold
        self._console = console
        await trio.lowlevel.checkpoint()

    async def postsuspend(self, epoch: int) -> None:
        with self._lock:
            if self._last_closed is not None and epoch <= self._last_closed:
                raise ValueError(f"epoch {epoch} closed after epoch {self._last_closed}")
            self._last_closed = epoch
            self._closed.append((epoch, self._open))
            self._open = []
        await trio.lowlevel.checkpoint()

    async def preresume(self, epoch: int) -> None:
        await trio.lowlevel.checkpoint()

    async def commit(self, epoch: int) -> int:
        """Emit the lines of every closed epoch <= ``epoch``, in order.

        Returns 0: ``output_released.packets`` counts network packets; ``released``
        counts the lines.
        """
        lines: list[str] = []
        with self._lock:
            while self._closed and self._closed[0][0] <= epoch:
                lines += self._closed.popleft()[1]
            self._held_lines -= len(lines)
        self._emit(lines)
        await trio.lowlevel.checkpoint()
        return 0

    async def release_all(self) -> None:
        with self._lock:
            lines = [line for _, batch in self._closed for line in batch] + self._open
            self._closed.clear()
            self._open = []
            self._held_lines -= len(lines)
            self._holding = False
            # Emitted under the lock: a line the guest prints now waits for these.
            self._emit(lines)
        await trio.lowlevel.checkpoint()

    async def teardown(self) -> None:
        with self._lock:
            discarded = [line for _, batch in self._closed for line in batch] + self._open
            self.dropped += len(discarded)
            self._closed.clear()
            self._open = []
            self._held_lines = 0
            self._holding = False
            if self._console is not None and self._console.line_hook == self._hold:
                self._console.line_hook = None
        if discarded:
            self.discarded = discarded
            # INFO, not WARNING: nothing is printed on stderr by default (a halted
            # primary's stderr is one `tremus: error:` line, and tools rely on that).
            log.info("console: dropped %d line(s) of epochs never acknowledged, "
                     "from %r to %r", len(discarded), discarded[0], discarded[-1])
        await trio.lowlevel.checkpoint()

    # -- helpers ---------------------------------------------------------------------
    def _emit(self, lines: list[str]) -> None:
        sink = self._emit_to
        if sink is None:
            self.released += len(lines)
            return
        for line in lines:
            sink(line)
            self.released += 1
