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

from collections.abc import Callable
from typing import TYPE_CHECKING, final

import trio

from tremus.buffers._epochhold import EpochHold
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
        self._frames: EpochHold[bytes] = EpochHold(limit_items=limit_frames,
                                                   limit_bytes=limit_bytes, size=len)
        #: Frames written to the TAP by commit/release_all.
        self.released = 0
        self._refused = 0

    # -- introspection ----------------------------------------------------------------
    @property
    def on_output(self) -> Callable[[], None] | None:
        """Called (in the vCPU thread) when the open epoch gets its first frame."""
        return self._frames.on_output

    @on_output.setter
    def on_output(self, callback: Callable[[], None] | None) -> None:
        self._frames.on_output = callback

    @property
    def holding(self) -> bool:
        return self._frames.holding

    @property
    def held_frames(self) -> int:
        """Frames held now (closed epochs and the open one)."""
        return self._frames.held_items

    @property
    def held_epochs(self) -> list[int]:
        """Closed, uncommitted epochs, oldest first."""
        return self._frames.epochs

    @property
    def dropped(self) -> int:
        """Frames dropped: over the limits while holding, refused by the TAP, or
        discarded at teardown."""
        return self._frames.dropped + self._refused

    # -- CheckpointDevice -----------------------------------------------------------------
    async def setup(self) -> None:
        nic = self._vm.nic
        if nic is None:
            raise DomainError("the vmm output buffer needs a micro-VM with a NIC (tap=NAME)")
        if nic.tx_hook is not None and nic.tx_hook != self._frames.hold:
            raise DomainError("the micro-VM's NIC already has an output buffer")
        self._frames.start()
        nic.tx_hook = self._frames.hold
        self._nic = nic
        await trio.lowlevel.checkpoint()

    async def postsuspend(self, epoch: int) -> None:
        self._frames.close(epoch)

    async def preresume(self, epoch: int) -> None:
        """Nothing to do (and, inline, no checkpoint: this runs inside the pause)."""

    async def commit(self, epoch: int) -> int:
        """Write the frames of every closed epoch <= ``epoch``; returns how many."""
        sent = self._write(self._frames.take_through(epoch))
        await trio.lowlevel.checkpoint()
        return sent

    async def release_all(self) -> None:
        with self._frames.lock:
            # Written under the lock: a frame the guest sends now waits for these.
            self._write(self._frames.stop())
        await trio.lowlevel.checkpoint()

    async def teardown(self) -> None:
        with self._frames.lock:
            self._refused += len(self._frames.stop())
            if self._nic is not None and self._nic.tx_hook == self._frames.hold:
                self._nic.tx_hook = None
        await trio.lowlevel.checkpoint()

    def _write(self, frames: list[bytes]) -> int:
        nic = self._nic
        sent = 0 if nic is None else sum(1 for frame in frames if nic.send(frame))
        self.released += sent
        self._refused += len(frames) - sent
        return sent
