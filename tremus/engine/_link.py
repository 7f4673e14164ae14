"""One end of a checkpoint stream: a sans-IO connection driven over a Trio stream.

Both roles need the same I/O around the protocol core: read until the connection
yields an event (with a silence timeout), send frames whole and in order from
several tasks, and turn every I/O or protocol failure into the role's own "peer
lost" error with a message that says what happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import final

import trio

from tremus._groups import describe
from tremus.engine import protocol as p

__all__ = ["Link"]

_COALESCE = 64 * 1024
#: Buffers one sendmsg takes at most (Linux's IOV_MAX).
_IOV_MAX = 1024
#: How long a side that found its peer silent still listens for bytes already on
#: their way (pending in the socket) before it believes the silence.
_PENDING_GRACE = 0.01
#: Room for the bytes that follow a payload in the same receive.
_SPILL = 64 << 10
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@final
class Link:
    """Drives ``conn`` over ``stream``; ``stream=None`` swallows sends (blackhole).

    Args:
        conn: the sans-IO connection of this side.
        stream: the transport, or None.
        lost: the exception raised when the peer is gone or misbehaves.
        peer: how the peer is named in messages ("backup", "primary").
        stall_timeout: seconds a send may make no progress before the peer is lost
            (an attribute: a role may allow more during the initial synchronisation).
    """

    def __init__(self, conn: p.PrimaryConnection | p.BackupConnection,
                 stream: trio.abc.Stream | None, lost: type[Exception], peer: str,
                 stall_timeout: float = 10.0) -> None:
        self.conn = conn
        self.stream = stream
        self._lost = lost
        self._peer = peer
        self._send_lock = trio.Lock()
        self.stall_timeout = stall_timeout
        # A socket stream lets us receive into the protocol's buffers (one copy less).
        self._socket: trio.socket.SocketType | None = (
            stream.socket if isinstance(stream, trio.SocketStream) else None)
        # What follows a payload in the same receive (the next frame's header, or a
        # checkpoint's STATE and END after its last pages): one trip less through
        # the scheduler at the end of every PAGES frame.
        self._spill = bytearray(_SPILL)
        #: ``distrust(silent_since)``: whether this side itself stalled since then.
        self.distrust: Callable[[float], bool] | None = None
        #: trio.current_time() of the last byte received / frame sent.
        self.last_received = trio.current_time()
        self.last_sent = 0.0

    @property
    def sending(self) -> bool:
        return self._send_lock.locked()

    def feed(self, event: p.Event) -> None:
        """Hand the connection a frame as if the peer had sent it (blackhole answers)."""
        self.conn.receive_data(p.encode_frame(event))

    async def next_event(self, timeout: float = math.inf) -> p.Event:
        """The next event from the peer; ``lost`` on silence past ``timeout`` seconds.

        Silence is judged carefully: what is already waiting in the socket is read
        before it counts (a side that was stalled finds its peer's frames pending),
        and a silence that overlaps a stall of this very process (``distrust``) is
        measured again from now.
        """
        deadline = trio.current_time() + timeout
        while True:
            try:
                event = self.conn.next_event()
            except p.ProtocolError as exc:
                raise self._lost(f"protocol error from the {self._peer}: {exc}") from exc
            if event is not p.NEED_DATA:
                return event
            if self.stream is None:
                raise self._lost(f"no {self._peer} to hear from (blackhole)")
            if await self._receive(deadline):
                deadline = self.last_received + timeout
                continue
            # Silent until the deadline: first read whatever is already pending.
            if await self._receive(trio.current_time() + _PENDING_GRACE):
                deadline = self.last_received + timeout
                continue
            silent_since = deadline - timeout
            if self.distrust is not None and self.distrust(silent_since):
                deadline = trio.current_time() + timeout
                continue
            raise self._lost(f"no word from the {self._peer} for {timeout * 1000:g} ms")

    async def _receive(self, deadline: float) -> bool:
        """Receive some bytes into the connection before ``deadline``; False if none came."""
        assert self.stream is not None
        into = self.conn.receive_buffer() if self._socket is not None else None
        data: p.BytesLike | None = None
        received = 0
        spilled = b""
        with trio.move_on_at(deadline) as scope:
            try:
                if into is not None and len(into):
                    # Page data straight into the frame's payload buffer.
                    assert self._socket is not None
                    into = into[: 1 << 22]
                    received, *_ = await self._socket.recvmsg_into([into, self._spill])
                    if received > len(into):
                        spilled = bytes(memoryview(self._spill)[: received - len(into)])
                        received = len(into)
                    data = b"" if received == 0 else None
                else:
                    # Small reads while no payload is pending: a frame's header
                    # comes with as little of its payload as possible, the rest
                    # goes straight into the payload buffer above.
                    data = await self.stream.receive_some(
                        1 << 16 if self._socket is not None else 1 << 20)
            except _IO_ERRORS as exc:
                raise self._lost(f"connection to the {self._peer} failed: {describe(exc)}"
                                 ) from exc
        if scope.cancelled_caught:
            return False
        self.last_received = trio.current_time()
        if data is None:
            self.conn.received_into(received)
            if spilled:
                self.conn.receive_data(spilled)
        else:
            self.conn.receive_data(data)
        return True

    async def send(self, event: p.Event) -> int:
        return await self.send_parts(self.conn.send_parts(event))

    async def send_parts(self, parts: Iterable[p.BytesLike | None]) -> int:
        """Send frame pieces in order; returns bytes sent.

        ``parts`` may be a generator that builds frames as it goes: a ``None`` it
        yields ends a group (a flush). A group is written at once: one ``sendmsg`` on
        a socket (no copy, and one wake-up of the peer for a frame's header, pfns and
        pages, and the frames that follow them), else small pieces joined and large
        ones written as they are. On a socket, the next group is built as soon as
        the socket is full (a partial write), while it drains, and joins the bytes
        still waiting: building a frame overlaps the network and the peer instead of
        following the last byte of the frame before it.
        """
        if self.stream is None:
            return sum(len(part) for part in parts if part is not None)
        total = 0
        try:
            # Not through the scheduler when the link is free (Lock.acquire always
            # yields): an ACK or a checkpoint's first frame goes out at once.
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            # A frame is sent whole or the link is lost: cancelling a send half way
            # would leave the peer a truncated frame, which a backup must take for
            # the primary's death. So sends are shielded, and bounded instead by a
            # deadline that every completed write pushes back (no progress = lost).
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.stall_timeout
                try:
                    if self._socket is not None:
                        total = await self._send_socket(iter(parts), scope)
                    else:
                        total = await self._send_stream(iter(parts), scope)
                except _IO_ERRORS as exc:
                    raise self._lost(f"sending to the {self._peer} failed: {describe(exc)}"
                                     ) from exc
            if scope.cancelled_caught:
                raise self._lost(f"sending to the {self._peer} made no progress for "
                                 f"{self.stall_timeout * 1000:g} ms")
            self.last_sent = trio.current_time()
        finally:
            self._send_lock.release()
        await trio.lowlevel.checkpoint_if_cancelled()
        return total

    @staticmethod
    def _next_group(parts: Iterator[p.BytesLike | None], into: list[memoryview]) -> bool:
        """Append the non-empty pieces of ``parts`` up to its next flush to ``into``;
        False once ``parts`` has ended."""
        for part in parts:
            if part is None:
                return True
            if len(part):
                into.append(memoryview(part).cast("B"))
        return False

    async def _send_socket(self, parts: Iterator[p.BytesLike | None],
                           scope: trio.CancelScope) -> int:
        """``send_parts`` on a socket: ``sendmsg`` of everything built so far, and
        the next group built whenever a write leaves bytes behind."""
        assert self._socket is not None
        views: list[memoryview] = []
        more = self._next_group(parts, views)
        total = 0
        while views or more:
            if not views:
                more = self._next_group(parts, views)
                continue
            sent = await self._socket.sendmsg(views[:_IOV_MAX])
            total += sent
            scope.deadline = trio.current_time() + self.stall_timeout
            done = 0
            while done < len(views) and sent >= len(views[done]):
                sent -= len(views[done])
                done += 1
            del views[:done]
            if sent:
                views[0] = views[0][sent:]
            if views and more:
                # The socket is full: build the next frames while it drains.
                more = self._next_group(parts, views)
        return total

    async def _send_stream(self, parts: Iterator[p.BytesLike | None],
                           scope: trio.CancelScope) -> int:
        """``send_parts`` on any other stream (TLS): a group at a time, small pieces
        joined, every write that makes progress pushing back the deadline."""
        assert self.stream is not None
        total = 0
        more = True
        while more:
            group: list[memoryview] = []
            more = self._next_group(parts, group)
            small: list[memoryview] = []
            for part in [*group, memoryview(b"")]:
                if 0 < len(part) < _COALESCE:
                    small.append(part)
                    continue
                if small:
                    await self.stream.send_all(b"".join(small))
                    small = []
                    scope.deadline = trio.current_time() + self.stall_timeout
                if part:
                    await self.stream.send_all(part)
                    scope.deadline = trio.current_time() + self.stall_timeout
            total += sum(len(part) for part in group)
        return total

    async def aclose(self) -> None:
        if self.stream is not None:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

