"""The disk's end of the block-remus fifo pair, for tremus's own replicated disk.

A disk that replicates Remus-style calls ``on_flush(n)`` for every checkpoint the
engine closes, in order, and answers each with ``done`` (the backup holds the
writes up to that flush) or ``fail`` (it could not pass them on). This module does
the fifo side of it, byte-compatible with Xen's block-remus, so that the engine's
:class:`~tremus.buffers.blockremus.BlockRemusDevice` (or Xen's own engine) can drive
it::

    fifo = BlockRemusFifo(None, "backup-host", 9000, disk.flush)   # /run/tremus
    async with trio.open_nursery() as nursery:
        await nursery.start(fifo.run)     # the fifos exist and are open from here
        ...
        fifo.close()                      # or cancel: the fifos are removed

Decisions:

* **Numbering.** Flushes are numbered from 0 in the order they are read, for the
  life of :meth:`BlockRemusFifo.run` (across engines). The protocol carries no epoch
  number, so this is the disk's count of checkpoints, not the engine's epoch.
* **Order.** Flushes are read ahead and queued as they come (several may be
  outstanding); ``on_flush`` runs for one at a time, in order, and the answers go
  out in that order: order is all that pairs an answer with its flush.
* **Engines come and go.** The control fifo is held read-only, so the disk sees
  end of file when the engine closes it (an engine holds it write-only; Xen's
  engine holds it read-write and is never seen to leave, which is harmless). The
  flushes that engine left unanswered still reach ``on_flush`` (each was a real
  checkpoint boundary), but their answers, and any it never read, are dropped:
  the next engine must not take them for answers to its own flushes. The fifo is
  reopened before the old end is closed, so an engine never finds it unread.
* **Permissions.** The fifos are made ``0o600`` (``mode=``), the run directory
  ``0o700`` if it has to be made. Xen makes them ``0777``; but whoever can write
  ``done`` to the message fifo can let the guest's output out before the backup
  holds its disk, and whoever can write ``flush`` can shift every later answer
  onto the wrong checkpoint. Only the engine's user has any business with them.
* **Stale fifos** from a disk that died are removed and made anew; fifos that a
  live disk still reads are not (setup fails), nor is anything that is not a fifo.
* **Errors.** Garbage on the control fifo, or ``on_flush`` raising, ends
  :meth:`run` with the error (the fifos are removed, so the engine sees its disk
  gone at once, rather than a silence). An engine that stops reading its answers
  for ``answer_timeout`` seconds loses them: its session is dropped, and it will
  time out waiting.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, final

import trio

from tremus._groups import collapse_groups
from tremus.buffers._blockremus_proto import (
    NEED_DATA,
    BlockRemusProtocolError,
    Closed,
    DiskSide,
)
from tremus.buffers.blockremus import DEFAULT_RUN_DIR, fifo_paths

__all__ = ["BlockRemusFifo", "BlockRemusFifoError"]

log = logging.getLogger(__name__)

_READ_SIZE: Final = 4096


class BlockRemusFifoError(RuntimeError):
    """The fifos could not be put in place, or the engine broke the protocol."""


@final
@dataclass(eq=False, slots=True)
class _Session:
    """One engine's stay: from its first flush to its end of file."""

    number: int
    proto: DiskSide = field(default_factory=DiskSide)
    #: Its answers are no longer written (it left, or stopped reading them).
    dropped: bool = False


@final
@dataclass(frozen=True, slots=True)
class _Queued:
    epoch: int
    session: _Session


@final
class BlockRemusFifo:
    """Serves the fifo pair of the disk replicating to ``host:port``."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        host: str,
        port: int,
        on_flush: Callable[[int], Awaitable[bool]],
        *,
        mode: int = 0o600,
        answer_timeout: float = 10.0,
        queue_size: int = 4096,
    ) -> None:
        """Describe the fifos; nothing is made before :meth:`run`.

        Args:
            run_dir: where the fifos go; ``None`` for ``/run/tremus``.
            host, port: the disk's replication target (they name the fifos).
            on_flush: called with each flush's number, in order; True answers
                ``done``, False ``fail``.
            mode: permissions of both fifos.
            answer_timeout: seconds an answer may wait for the engine to make room.
            queue_size: flushes read ahead of ``on_flush`` before reading pauses.
        """
        self.run_dir = os.fspath(run_dir if run_dir is not None else DEFAULT_RUN_DIR)
        self.host = host
        self.port = port
        self.control_path, self.msg_path = fifo_paths(self.run_dir, host, port)
        self._on_flush = on_flush
        self.mode = mode
        self.answer_timeout = answer_timeout
        self.queue_size = queue_size
        self._control: int | None = None
        self._msg: int | None = None
        self._made: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino)
        self._session = _Session(0)
        self._scope: trio.CancelScope | None = None
        #: Flushes read (the next flush's number).
        self.flushes = 0
        #: Answers written: ``done`` and ``fail``.
        self.done = 0
        self.failed = 0
        #: Answers dropped because their engine had left or stopped reading.
        self.dropped = 0

    @property
    def sessions(self) -> int:
        """Engines seen to leave so far (the current one is number ``sessions``)."""
        return self._session.number

    def close(self) -> None:
        """Stop a running :meth:`run` (it removes the fifos); nothing if none runs."""
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Make and open the fifos, then serve flushes until :meth:`close` or cancel.

        ``task_status.started()`` once both fifos are open: an engine can set up.

        Raises:
            BlockRemusFifoError: the fifos could not be made, or the engine sent
                garbage.
            Exception: whatever ``on_flush`` raised.
        """
        if self._scope is not None:
            raise RuntimeError(f"{self.control_path}: already running")
        with trio.CancelScope() as self._scope:
            try:
                self._make_fifos()
                send, receive = trio.open_memory_channel[_Queued](self.queue_size)
                with collapse_groups():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_flushes, send)
                        nursery.start_soon(self._answer_flushes, receive)
                        task_status.started()
            finally:
                self._remove_fifos()
                self._scope = None

    # -- setup and removal ----------------------------------------------------------

    def _make_fifos(self) -> None:
        try:
            os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise BlockRemusFifoError(f"cannot make {self.run_dir}: {exc}") from exc
        for path in (self.control_path, self.msg_path):
            self._check_stale(path)
        self._refuse_if_served()
        try:
            for path in (self.control_path, self.msg_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                else:
                    log.info("%s: removed a stale fifo", path)
                os.mkfifo(path, self.mode)
                os.chmod(path, self.mode)  # mkfifo's mode is masked by the umask
                st = os.stat(path)
                self._made[path] = (st.st_dev, st.st_ino)
            # Message fifo read-write: writes never fail for want of a reader, and
            # answers nobody read can be drained. Control fifo read-only: the
            # engine's leaving is an end of file.
            self._msg = os.open(self.msg_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._control = os.open(self.control_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BlockRemusFifoError(f"cannot make the fifos in {self.run_dir}: {exc}") from exc

    def _check_stale(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISFIFO(st.st_mode):
            raise BlockRemusFifoError(f"{path} exists and is not a fifo: not removing it")

    def _refuse_if_served(self) -> None:
        """Fail if a live disk (tremus's or a tapdisk) still reads the control fifo."""
        try:
            fd = os.open(self.control_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # ENXIO (nobody reads it: stale) or ENOENT
        os.close(fd)
        raise BlockRemusFifoError(
            f"{self.control_path} is served by another live disk: not replacing it"
        )

    def _remove_fifos(self) -> None:
        for fd in (self._control, self._msg):
            if fd is not None:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._control = self._msg = None
        for path, identity in self._made.items():
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == identity:  # still ours
                    os.unlink(path)
            except OSError as exc:
                log.warning("%s: not removed: %s", path, exc)
        self._made.clear()

    # -- the two tasks ----------------------------------------------------------------

    async def _read_flushes(self, send: trio.MemorySendChannel[_Queued]) -> None:
        async with send:
            while True:
                fd = self._control
                assert fd is not None
                # Wait first: a fresh read-only end with no writer reads end of file.
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                session = self._session
                session.proto.receive_data(data)
                while True:
                    try:
                        event = session.proto.next_event()
                    except BlockRemusProtocolError as exc:
                        raise BlockRemusFifoError(f"{self.control_path}: {exc}") from exc
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Closed):
                        self._engine_left()
                        break
                    await send.send(_Queued(self.flushes, session))
                    self.flushes += 1

    def _engine_left(self) -> None:
        """End of file on the control fifo: start afresh for the next engine."""
        old = self._session
        log.info("%s: the engine left with %d flushes unanswered", self.control_path,
                 old.proto.outstanding)
        old.dropped = True
        self._session = _Session(old.number + 1)
        # The old end reports end of file for good; a new one waits for a new
        # writer. Open it before closing the old: the fifo never goes unread.
        try:
            fd = os.open(self.control_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BlockRemusFifoError(f"cannot reopen {self.control_path}: {exc}") from exc
        old_fd, self._control = self._control, fd
        if old_fd is not None:
            trio.lowlevel.notify_closing(old_fd)
            os.close(old_fd)
        self._drain_answers()

    def _drain_answers(self) -> None:
        fd = self._msg
        assert fd is not None
        stale = 0
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            stale += len(data)
        if stale:
            log.info("%s: dropped %d answer bytes the engine never read", self.msg_path, stale)

    async def _answer_flushes(self, receive: trio.MemoryReceiveChannel[_Queued]) -> None:
        async with receive:
            async for item in receive:
                ok = await self._on_flush(item.epoch)
                session = item.session
                if session.dropped:
                    self.dropped += 1
                    continue
                data = session.proto.send_done() if ok else session.proto.send_fail()
                if await self._write_answer(data, session):
                    if ok:
                        self.done += 1
                    else:
                        self.failed += 1
                else:
                    self.dropped += 1

    async def _write_answer(self, data: bytes, session: _Session) -> bool:
        fd = self._msg
        assert fd is not None
        deadline = trio.current_time() + self.answer_timeout
        while not session.dropped:
            try:
                os.write(fd, data)  # 4 bytes: whole or not at all
                return True
            except BlockingIOError:
                pass
            with trio.move_on_at(deadline) as scope:
                await trio.lowlevel.wait_writable(fd)
            if scope.cancelled_caught:
                log.error("%s: the engine has read no answer for %g s: dropping it",
                          self.msg_path, self.answer_timeout)
                session.dropped = True
        return False

