"""Disk output commit: the engine's end of Xen's block-remus fifo pair.

A Remus disk (Xen's tapdisk ``remus`` driver, or tremus's own replicated disk behind
:class:`~tremus.buffers.blockremus_server.BlockRemusFifo`) writes the guest's I/O to
the local image at once and ships it to the backup per checkpoint. The engine tells
it where each checkpoint ends and learns when the backup holds it, over two fifos the
disk creates in its run directory (Xen: ``/var/run/tap``; tremus: ``/run/tremus``)::

    remus_HOST_PORT        engine -> disk   "flush"  (5 bytes, no newline)
    remus_HOST_PORT.msg    disk -> engine   "done" | "fail"  (4 bytes, one per flush)

(``HOST_PORT`` is the disk's replication target with ``:`` and ``/`` made ``_``:
:func:`fifo_paths`.) In the epoch:

* ``postsuspend(N)`` writes ``flush`` (the guest is suspended: the cut is exact) and
  notes that epoch N awaits an answer;
* ``preresume`` does nothing;
* ``commit(N)`` waits for the answers of every flushed epoch up to N, in order (one
  per flush: only order pairs them). Output of epoch N may leave only once the
  disk's writes of epoch N are on the backup too: *disks commit before the network
  is released*. ``fail``, end of file, garbage, or no answer within ``timeout`` of
  the flush is a :class:`BlockRemusError` (a :class:`DeviceError`): the engine
  reports ``device_failed``, loudly;
* ``release_all()`` releases nothing (the writes are already on the local disk) and
  stops flushing and waiting;
* ``teardown()`` closes the fifos.

How the fifos are opened departs from Xen's engine, which opens both read-write:
the control fifo is opened write-only and ``.msg`` read-only, both non-blocking.
Holding no end we do not need lets the kernel tell us what read-write would hide:
opening the control fifo fails (ENXIO) when no disk reads it, writing to it fails
(EPIPE) once the disk is gone, and ``.msg`` reads end of file when no disk holds
it. With read-write ends a dead disk looks exactly like a slow one until the
timeout. The disk side is unaffected (it holds both ends read-write, as tapdisk
does).

Several epochs may be flushed and unanswered at once (``max_inflight``); a fifo
holds 64 KiB, thousands of messages, so a write never waits in practice (and when
it must, it waits at most ``timeout``). Answers left over from an earlier engine
(one that went away with flushes unanswered) are discarded at setup.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, final

import trio

from tremus.buffers._blockremus_proto import (
    NEED_DATA,
    BlockRemusProtocolError,
    Closed,
    Done,
    EngineSide,
    Fail,
)
from tremus.engine.devices import DeviceError

__all__ = ["DEFAULT_RUN_DIR", "BlockRemusDevice", "BlockRemusError", "fifo_paths"]

log = logging.getLogger(__name__)

#: Where tremus's own disks make their fifos (Xen's tapdisk: ``/var/run/tap``).
DEFAULT_RUN_DIR: Final = "/run/tremus"
#: Largest read from ``.msg``: a multiple of the 4-byte answer.
_READ_SIZE: Final = 4096


def fifo_paths(run_dir: str | os.PathLike[str], host: str, port: int) -> tuple[str, str]:
    """The control and message fifos of the disk replicating to ``host:port``.

    block-remus's naming: ``remus_HOST:PORT`` with every ``:`` and ``/`` of
    ``HOST:PORT`` made ``_``, and the same path plus ``.msg``.
    """
    name = f"{host}:{port}".replace(":", "_").replace("/", "_")
    control = os.path.join(os.fspath(run_dir), f"remus_{name}")
    return control, control + ".msg"


class BlockRemusError(DeviceError):
    """The disk failed, went away or broke the protocol.

    A :class:`DeviceError` whose text is the cause alone: the device runner wraps
    it again with the device's name and operation, which would otherwise be said
    twice.
    """

    def __init__(self, op: str, message: str) -> None:
        super().__init__(BlockRemusDevice.name, op, message)

    def __str__(self) -> str:
        return str(self.cause)


@final
class BlockRemusDevice:
    """A :class:`~tremus.engine.devices.CheckpointDevice` driving a block-remus disk."""

    name = "blockremus"
    #: Flushed, unanswered epochs; far below what a fifo holds (64 KiB / 5 bytes).
    max_inflight = 1024
    #: Disks commit first: network output of an epoch waits for its `done`.
    commit_stage = 0
    #: Set by an output-triggered engine; the disk behind the fifo calls it (through
    #: whoever wires it) when the open epoch gets its first write.
    on_output: Callable[[], None] | None = None

    def __init__(self, control_path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        """Describe the device; nothing is opened before :meth:`setup`.

        Args:
            control_path: the disk's control fifo (see :func:`fifo_paths`); its
                answers come on the same path plus ``.msg``.
            timeout: seconds the disk has to answer a flush, and to take one.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.control_path = os.fspath(control_path)
        self.msg_path = self.control_path + ".msg"
        self.timeout = timeout
        self._control: int | None = None
        self._msg: int | None = None
        self._proto = EngineSide()
        #: (epoch, answer deadline) of every flushed, unanswered epoch, oldest first.
        self._pending: deque[tuple[int, float]] = deque()
        self._last_epoch: int | None = None
        self._passthrough = False
        self._reading = trio.Lock()
        #: Epochs the disk answered ``done`` for since setup.
        self.acknowledged = 0

    @property
    def pending(self) -> list[int]:
        """Flushed epochs still awaiting the disk's answer, oldest first."""
        return [epoch for epoch, _ in self._pending]

    # -- CheckpointDevice -----------------------------------------------------------

    async def setup(self) -> None:
        """Open both fifos; fails naming the path if the disk is not there."""
        if self._control is not None:
            raise RuntimeError(f"{self.name}: already set up")
        for path in (self.control_path, self.msg_path):
            self._check_fifo(path)
        try:
            self._control = self._open(self.control_path, os.O_WRONLY)
            self._msg = self._open(self.msg_path, os.O_RDONLY)
            stale = self._drain()
        except BaseException:
            self._close()
            raise
        if stale:
            log.warning("%s: discarded %d answer bytes left from an earlier engine on %s",
                        self.name, stale, self.msg_path)
        self._proto = EngineSide()
        self._pending.clear()
        self._last_epoch = None
        self._passthrough = False
        self.acknowledged = 0
        await trio.lowlevel.checkpoint()

    async def postsuspend(self, epoch: int) -> None:
        """Tell the disk that epoch ``epoch``'s writes end here."""
        fd = self._require(self._control)
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(f"{self.name}: epoch {epoch} closed after epoch {self._last_epoch}")
        self._last_epoch = epoch
        if self._passthrough:
            await trio.lowlevel.checkpoint()
            return
        deadline = trio.current_time() + self.timeout
        await self._write(fd, self._proto.send_flush(), epoch, deadline)
        self._pending.append((epoch, deadline))

    async def preresume(self, epoch: int) -> None:
        """Nothing to do: writes after the flush belong to the next epoch."""
        await trio.lowlevel.checkpoint()

    async def commit(self, epoch: int) -> int:
        """Wait until the backup holds the disk writes of every epoch up to ``epoch``.

        Returns 0: the disk releases nothing (its writes went to the local disk at
        once); what this gates is the release of the other devices' output.
        """
        self._require(self._msg)
        if self._last_epoch is None or epoch > self._last_epoch:
            raise ValueError(f"{self.name}: commit({epoch}) for an epoch that was not flushed")
        async with self._reading:
            while not self._passthrough and self._pending and self._pending[0][0] <= epoch:
                flushed, deadline = self._pending[0]
                answer = await self._next_answer(flushed, deadline)
                if self._passthrough:
                    break  # release_all() while we waited: nothing is awaited any more
                if isinstance(answer, Fail):
                    raise BlockRemusError(
                        "commit",
                        f"the disk answered `fail` on {self.msg_path} for epoch {flushed}:"
                        " it could not pass the checkpoint's writes to the backup",
                    )
                self._pending.popleft()
                self.acknowledged += 1
        await trio.lowlevel.checkpoint()
        return 0

    async def release_all(self) -> None:
        """Stop flushing and waiting: the disk's writes are already local, and the
        guest now runs unprotected."""
        self._passthrough = True
        self._pending.clear()
        await trio.lowlevel.checkpoint()

    async def teardown(self) -> None:
        """Close both fifos (the disk keeps them; it made them)."""
        self._close()
        self._pending.clear()
        self._last_epoch = None
        self._passthrough = False
        await trio.lowlevel.checkpoint()

    # -- helpers -------------------------------------------------------------------

    def _require(self, fd: int | None) -> int:
        if fd is None:
            raise RuntimeError(f"{self.name}: not set up")
        return fd

    def _check_fifo(self, path: str) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BlockRemusError(
                "setup", f"{path} does not exist: is the disk (block-remus) running?"
            ) from None
        except OSError as exc:
            raise BlockRemusError("setup", f"cannot stat {path}: {exc}") from exc
        if not stat.S_ISFIFO(st.st_mode):
            raise BlockRemusError("setup", f"{path} is not a fifo")
        if st.st_mode & 0o022:
            # Xen's tapdisk makes them 0777. Whoever can write `done` there can let
            # output out before the backup holds the disk: say so, loudly.
            log.warning("%s: %s is writable by other users (mode %o): they could forge "
                        "the disk's answers", self.name, path, stat.S_IMODE(st.st_mode))

    def _open(self, path: str, mode: int) -> int:
        try:
            return os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise BlockRemusError(
                    "setup", f"nothing reads {path}: the disk (block-remus) is not running"
                ) from None
            raise BlockRemusError("setup", f"cannot open {path}: {exc}") from exc

    def _drain(self) -> int:
        """Discard answers nobody read (an earlier engine's); returns how many bytes."""
        fd = self._require(self._msg)
        stale = 0
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return stale
            if not data:
                raise BlockRemusError(
                    "setup", f"nothing writes {self.msg_path}: the disk (block-remus) is gone"
                )
            stale += len(data)

    async def _write(self, fd: int, data: bytes, epoch: int, deadline: float) -> None:
        while True:
            try:
                # At most PIPE_BUF bytes: written whole or not at all.
                written = os.write(fd, data)
            except BlockingIOError:
                pass
            except BrokenPipeError:
                raise BlockRemusError(
                    "postsuspend",
                    f"nothing reads {self.control_path} any more: the disk is gone"
                    f" (flush of epoch {epoch})",
                ) from None
            except OSError as exc:
                raise BlockRemusError(
                    "postsuspend", f"writing to {self.control_path}: {exc}"
                ) from exc
            else:
                assert written == len(data), (written, data)
                return
            with trio.move_on_at(deadline) as scope:
                await self._wait(trio.lowlevel.wait_writable, fd, "postsuspend")
            if scope.cancelled_caught:
                raise BlockRemusError(
                    "postsuspend",
                    f"the disk has not read {self.control_path} for {self.timeout:g} s"
                    f" (the fifo is full; flush of epoch {epoch})",
                )

    async def _next_answer(self, epoch: int, deadline: float) -> Done | Fail:
        fd = self._require(self._msg)
        while True:
            try:
                event = self._proto.next_event()
            except BlockRemusProtocolError as exc:
                raise BlockRemusError("commit", f"{self.msg_path}: {exc}") from exc
            if isinstance(event, Closed):
                raise BlockRemusError(
                    "commit",
                    f"the disk closed {self.msg_path} (it is gone) before answering"
                    f" the flush of epoch {epoch}",
                )
            if event is not NEED_DATA:
                return event
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                # Pending bytes were read first: a silence is believed only now.
                if trio.current_time() >= deadline:
                    raise BlockRemusError(
                        "commit",
                        f"no answer from the disk on {self.msg_path} for epoch {epoch}"
                        f" within {self.timeout:g} s of its flush",
                    ) from None
                with trio.move_on_at(deadline):
                    await self._wait(trio.lowlevel.wait_readable, fd, "commit")
                continue
            except OSError as exc:
                raise BlockRemusError("commit", f"reading {self.msg_path}: {exc}") from exc
            self._proto.receive_data(data)

    async def _wait(self, wait: Callable[[int], Awaitable[object]], fd: int, op: str) -> None:
        try:
            await wait(fd)
        except trio.ClosedResourceError:
            raise BlockRemusError(op, "the device was torn down while waiting") from None

    def _close(self) -> None:
        fds = (self._control, self._msg)
        self._control = self._msg = None
        for fd in fds:
            if fd is not None:
                trio.lowlevel.notify_closing(fd)  # a waiting commit gets ClosedResourceError
                os.close(fd)
