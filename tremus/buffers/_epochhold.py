"""Output held per epoch, in the order it was produced: what a buffer inside the VMM keeps.

The producer (the vCPU thread) hands every item — a frame, a console line — to
``hold``; ``close(N)`` ends epoch N's items (the guest is suspended, so the cut is
exact); ``take_through(N)`` hands back every item of epochs <= N, oldest first, for
the owner to let out. Several epochs may be closed and waiting at once. ``stop``
hands back everything held, the open epoch included, and stops holding; the owner
lets it out *under the lock* (``with hold.lock``), so that an item produced meanwhile
waits for those and none overtakes one that was held. Items beyond the limits are
dropped (counted), never let out early, and the producer never waits.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar, final

__all__ = ["EpochHold"]

T = TypeVar("T")


@final
class EpochHold(Generic[T]):
    """Items held per epoch until their epoch is committed (thread-safe)."""

    def __init__(self, *, limit_items: int, limit_bytes: int | None = None,
                 size: Callable[[T], int] = lambda item: 0) -> None:
        self.limit_items = limit_items
        self.limit_bytes = limit_bytes
        self._size = size
        #: Held by ``stop``'s caller while it lets the items out.
        self.lock = threading.Lock()
        self.holding = False
        self._open: list[T] = []
        self._closed: deque[tuple[int, list[T]]] = deque()
        self._last_closed: int | None = None
        self.held_items = 0
        self.held_bytes = 0
        #: Items dropped over the limits while holding.
        self.dropped = 0
        #: Called (in the producer's thread) when the open epoch gets its first item.
        self.on_output: Callable[[], None] | None = None

    def start(self) -> None:
        with self.lock:
            self.holding = True

    def hold(self, item: T) -> bool:
        """Keep ``item`` for its epoch; False if not holding (let it out yourself)."""
        with self.lock:
            if not self.holding:
                return False
            size = self._size(item)
            if self.held_items >= self.limit_items or (
                    self.limit_bytes is not None and self.held_bytes + size > self.limit_bytes):
                self.dropped += 1
                return True
            first = not self._open
            self._open.append(item)
            self.held_items += 1
            self.held_bytes += size
        if first and self.on_output is not None:
            self.on_output()
        return True

    def close(self, epoch: int) -> None:
        """The items held so far belong to ``epoch``."""
        with self.lock:
            if self._last_closed is not None and epoch <= self._last_closed:
                raise ValueError(f"epoch {epoch} closed after epoch {self._last_closed}")
            self._last_closed = epoch
            self._closed.append((epoch, self._open))
            self._open = []

    def take_through(self, epoch: int) -> list[T]:
        """Every item of the closed epochs <= ``epoch``, oldest first."""
        with self.lock:
            items: list[T] = []
            while self._closed and self._closed[0][0] <= epoch:
                items += self._closed.popleft()[1]
            self._forget(items)
            return items

    def stop(self) -> list[T]:
        """Stop holding; every item held, the open epoch's too, oldest first. Call it
        with ``lock`` held and let the items out before releasing it."""
        assert self.lock.locked()
        items = [item for _, batch in self._closed for item in batch] + self._open
        self._closed.clear()
        self._open = []
        self._forget(items)
        self.holding = False
        return items

    @property
    def epochs(self) -> list[int]:
        """Closed, uncommitted epochs, oldest first."""
        with self.lock:
            return [epoch for epoch, _ in self._closed]

    def closed(self) -> list[tuple[int, list[T]]]:
        """The closed, uncommitted epochs with their items, oldest first."""
        with self.lock:
            return [(epoch, list(items)) for epoch, items in self._closed]

    def _forget(self, items: list[T]) -> None:
        self.held_items -= len(items)
        self.held_bytes -= sum(self._size(item) for item in items)
