"""In-process transports: ``memory://NAME`` listeners and the blackhole.

Both exist for tests and benchmarks: ``memory://`` joins a primary and a backup
running in one Trio program with no kernel in between; the blackhole measures the
primary alone.
"""

from __future__ import annotations

import math
from typing import ClassVar, final

import trio
import trio.testing

from ._listener import Listener
from ._url import TransportURL

__all__ = ["BlackholeStream", "memory_pair", "connect_memory", "listen_memory"]

# Keyed by Trio run as well, so that a listener one test left open cannot answer
# another's connect (memory streams only work inside the run that made them).
_listeners: dict[tuple[object, str], _MemoryListener] = {}


def _key(name: str) -> tuple[object, str]:
    return trio.lowlevel.current_trio_token(), name


def memory_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Two connected in-memory streams (``trio.testing.memory_stream_pair``).

    Sends never block (the buffer between them is unbounded); closing one end is
    EOF (``b""``) on the other.
    """
    return trio.testing.memory_stream_pair()


@final
class _MemoryListener(Listener):
    def __init__(self, name: str) -> None:
        self._name = name
        self._key = _key(name)
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    def _connect(self) -> trio.abc.Stream:
        ours, theirs = memory_pair()
        self._send.send_nowait(theirs)
        return ours

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        if _listeners.get(self._key) is self:
            del _listeners[self._key]
        self._send.close()
        # Streams connected but never accepted: their peers see EOF.
        while True:
            try:
                stream = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            await stream.aclose()
        await self._receive.aclose()


def listen_memory(url: TransportURL) -> Listener:
    if _key(url.path) in _listeners:
        raise OSError(f"cannot listen on {url}: address in use")
    listener = _MemoryListener(url.path)
    _listeners[listener._key] = listener
    return listener


async def connect_memory(url: TransportURL) -> trio.abc.Stream:
    await trio.lowlevel.checkpoint()
    listener = _listeners.get(_key(url.path))
    if listener is None:
        raise ConnectionRefusedError(f"cannot connect to {url}: nothing listens there")
    return listener._connect()


@final
class BlackholeStream(trio.abc.Stream):
    """A stream to nowhere: sends succeed at once, nothing ever arrives.

    For benchmarks of the primary alone (``xl remus -b``). Nothing ever answers, so
    the primary engine must treat a blackhole as acknowledging every checkpoint as
    soon as it is sent (check ``isinstance(stream, BlackholeStream)`` or
    ``acks_immediately``). That is not protection: output is released unprotected.
    ``receive_some`` waits until the stream is closed (it never reports EOF, which
    would look like a lost backup).

    To keep the ``PrimaryConnection`` checks (and the cost of framing, which the
    benchmark should include), feed the connection what a backup would have said:
    ``conn.receive_data(encode_frame(Welcome(features=...)))`` after HELLO, and
    ``encode_frame(Ack(epoch))`` after each CHECKPOINT_END (with a secret, WELCOME
    needs ``auth=welcome_auth(secret, signed_hello, welcome)``).
    """

    #: The engine's cue to synthesise the ACKs no backup will send.
    acks_immediately: ClassVar[bool] = True

    def __init__(self) -> None:
        self.bytes_sent = 0
        self._closed = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed.is_set():
            raise trio.ClosedResourceError("the blackhole stream is closed")
        await trio.lowlevel.checkpoint()
        self.bytes_sent += memoryview(data).nbytes

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed.is_set():
            raise trio.ClosedResourceError("the blackhole stream is closed")
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed.is_set():
            raise trio.ClosedResourceError("the blackhole stream is closed")
        await self._closed.wait()
        raise trio.ClosedResourceError("the blackhole stream was closed")

    async def aclose(self) -> None:
        self._closed.set()
        await trio.lowlevel.checkpoint()
