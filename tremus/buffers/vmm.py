"""The ``vmm`` output buffer: the micro-VM's NIC holds the guest's frames per epoch.

No root, no qdisc, no netfilter: the NIC hands every frame the guest sends to this
buffer (in the vCPU thread) instead of writing it to the TAP. ``postsuspend(N)``
closes epoch N's frames (the guest is suspended, so the cut is exact);
``commit(N)`` writes every held frame of epochs <= N to the TAP, in the order the
guest sent them. Several epochs may be in flight at once.

``release_all()`` (protection lost) writes everything held, including the still
open epoch, and stops holding: from then on frames go straight to the TAP, and none
overtakes one that was held. ``teardown()`` stops holding and *drops* what is still
held (it was never committed). Frames beyond the limits are dropped (counted), the
way a full qdisc drops them; they never leave early.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, final

import trio

from tremus.domains.base import DomainError

if TYPE_CHECKING:
    from tremus.domains.microvm.nic import Nic
    from tremus.domains.microvm.vm import MicroVM

__all__ = ["VmmNetBuffer"]


@final
class VmmNetBuffer:
    """A ``CheckpointDevice`` holding a micro-VM's transmitted frames until commit."""

    name = "vmm-netbuf"
    #: Epochs closed but not committed that can be held at once.
    max_inflight = 1 << 16

    #: Its operations never wait: the device runner calls it inline.
    inline = True

    def __init__(self, vm: MicroVM, *, limit_frames: int = 65536,
                 limit_bytes: int = 64 << 20) -> None:
        self._vm = vm
        self._nic: Nic | None = None
        self.limit_frames = limit_frames
        self.limit_bytes = limit_bytes
        #: Called (in the vCPU thread) when the open epoch gets its first frame.
        self.on_output: Callable[[], None] | None = None
        # Guarded by _lock (the vCPU thread appends to _open).
        self._lock = threading.Lock()
        self._holding = False
        self._open: list[bytes] = []
        self._closed: deque[tuple[int, list[bytes]]] = deque()
        self._last_closed: int | None = None
        self._held_frames = 0
        self._held_bytes = 0
        #: Frames written to the TAP by commit/release_all.
        self.released = 0
        #: Frames dropped: over the limits while holding, refused by the TAP, or
        #: discarded at teardown.
        self.dropped = 0

    # -- introspection ----------------------------------------------------------------
    @property
    def holding(self) -> bool:
        return self._holding

    @property
    def held_frames(self) -> int:
        """Frames held now (closed epochs and the open one)."""
        with self._lock:
            return self._held_frames

    @property
    def held_epochs(self) -> list[int]:
        """Closed, uncommitted epochs, oldest first."""
        with self._lock:
            return [epoch for epoch, _ in self._closed]

    # -- the vCPU thread's side ---------------------------------------------------------
    def _hold(self, frame: bytes) -> bool:
        with self._lock:
            if not self._holding:
                return False
            if (self._held_frames >= self.limit_frames
                    or self._held_bytes + len(frame) > self.limit_bytes):
                self.dropped += 1
                return True
            first = not self._open
            self._open.append(frame)
            self._held_frames += 1
            self._held_bytes += len(frame)
        if first and self.on_output is not None:
            self.on_output()
        return True

    # -- CheckpointDevice -----------------------------------------------------------------
    async def setup(self) -> None:
        nic = self._vm.nic
        if nic is None:
            raise DomainError("the vmm output buffer needs a micro-VM with a NIC (tap=NAME)")
        if nic.tx_hook is not None and nic.tx_hook != self._hold:
            raise DomainError("the micro-VM's NIC already has an output buffer")
        with self._lock:
            self._holding = True
            nic.tx_hook = self._hold
        self._nic = nic
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
        """Write the frames of every closed epoch <= ``epoch``; returns how many."""
        frames: list[bytes] = []
        with self._lock:
            while self._closed and self._closed[0][0] <= epoch:
                frames += self._closed.popleft()[1]
            self._forget(frames)
        sent = self._write(frames)
        with self._lock:
            self._count(sent, len(frames) - sent)
        await trio.lowlevel.checkpoint()
        return sent

    async def release_all(self) -> None:
        with self._lock:
            frames = [f for _, batch in self._closed for f in batch] + self._open
            self._closed.clear()
            self._open = []
            self._forget(frames)
            self._holding = False
            # Written under the lock: a frame the guest sends now waits for these.
            sent = self._write(frames)
            self._count(sent, len(frames) - sent)
        await trio.lowlevel.checkpoint()

    async def teardown(self) -> None:
        with self._lock:
            self.dropped += self._held_frames
            self._closed.clear()
            self._open = []
            self._held_frames = self._held_bytes = 0
            self._holding = False
            if self._nic is not None and self._nic.tx_hook == self._hold:
                self._nic.tx_hook = None
        await trio.lowlevel.checkpoint()

    # -- helpers ---------------------------------------------------------------------
    def _forget(self, frames: list[bytes]) -> None:
        self._held_frames -= len(frames)
        self._held_bytes -= sum(len(f) for f in frames)

    def _count(self, sent: int, failed: int) -> None:
        self.released += sent
        self.dropped += failed

    def _write(self, frames: list[bytes]) -> int:
        nic = self._nic
        if nic is None:
            return 0
        return sum(1 for frame in frames if nic.send(frame))
