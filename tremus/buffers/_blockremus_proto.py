"""block-remus's control protocol, sans-IO: bytes <-> events, for both ends.

Xen's block-remus (tapdisk's ``remus`` driver) and the engine talk over a pair of
FIFOs, without framing, version or epoch numbers:

* engine -> disk, on ``remus_HOST_PORT``: the 5 bytes ``flush`` when the guest is
  suspended: the writes before it are this checkpoint's;
* disk -> engine, on ``remus_HOST_PORT.msg``: 4 bytes per flush, in order, ``done``
  once the backup holds that checkpoint's writes, ``fail`` when they could not be
  passed to it.

The only thing tying an answer to its flush is order, so both ends count: answer
number *k* is for flush number *k* (numbered from 0). An answer with no flush
outstanding, bytes that are no message, or a stream ending inside a message are
protocol errors: nothing after them can be trusted to pair up. Reads may split or
join messages anywhere; both ends buffer.

Each end is a small state machine in the style of h11: feed it what was read
(``receive_data``, ``b""`` for end of file), take events with ``next_event`` until
it says ``NEED_DATA``, and write what ``send_*`` returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias, final

__all__ = [
    "DONE",
    "FAIL",
    "FLUSH",
    "NEED_DATA",
    "BlockRemusProtocolError",
    "Closed",
    "DiskSide",
    "Done",
    "EngineSide",
    "Fail",
    "Flush",
    "LocalProtocolError",
    "NeedData",
    "RemoteProtocolError",
]

FLUSH: Final = b"flush"
DONE: Final = b"done"
FAIL: Final = b"fail"


class BlockRemusProtocolError(Exception):
    """The fifo protocol was broken; the message names the bytes or the call."""


@final
class RemoteProtocolError(BlockRemusProtocolError):
    """The other end sent something that is not a message, or at the wrong time."""


@final
class LocalProtocolError(BlockRemusProtocolError):
    """This end was asked to send something the protocol forbids: a bug here."""


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel (an enum so that ``is`` narrows types)."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` when the buffered bytes hold no whole message.
NEED_DATA: Final = NeedData.NEED_DATA


@final
@dataclass(frozen=True, slots=True)
class Flush:
    """The engine closed a checkpoint: the disk's ``seq``-th flush (from 0)."""

    seq: int


@final
@dataclass(frozen=True, slots=True)
class Done:
    """The backup holds the writes of flush ``seq``."""

    seq: int


@final
@dataclass(frozen=True, slots=True)
class Fail:
    """The writes of flush ``seq`` could not be passed to the backup."""

    seq: int


@final
@dataclass(frozen=True, slots=True)
class Closed:
    """End of file at a message boundary: the other end closed its side."""


EngineEvent: TypeAlias = Done | Fail | Closed
DiskEvent: TypeAlias = Flush | Closed


@final
class _Reader:
    """Splits a byte stream into fixed-size messages from a known set.

    Garbage is reported as soon as the buffered bytes cannot begin any message, so
    ``xxxx`` fails on its first byte instead of waiting for the rest.
    """

    def __init__(self, messages: tuple[bytes, ...], peer: str) -> None:
        self._messages = messages
        self._size = len(messages[0])
        assert all(len(m) == self._size for m in messages)
        self._peer = peer
        self._buffer = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            return
        if not data:
            self._eof = True
        elif self._eof:
            raise RuntimeError("receive_data after end of file")
        else:
            self._buffer += data

    def next_message(self) -> bytes | Closed | NeedData:
        if self._error is not None:
            raise self._error
        head = bytes(self._buffer[: self._size])
        if head and not any(m.startswith(head) for m in self._messages):
            raise self._fail(
                f"garbage from the {self._peer}: {head!r} is not {self._expected()}"
            )
        if len(head) == self._size:
            del self._buffer[: self._size]
            return head
        if not self._eof:
            return NEED_DATA
        if head:
            raise self._fail(
                f"the {self._peer} closed inside a message: got {head!r}, {self._expected()}"
            )
        return Closed()

    def fail(self, message: str) -> RemoteProtocolError:
        return self._fail(message)

    def _fail(self, message: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(message)
        return self._error

    def _expected(self) -> str:
        return " or ".join(repr(m) for m in self._messages)


@final
class EngineSide:
    """The engine's end: sends ``flush``, receives ``done``/``fail`` (from ``.msg``)."""

    def __init__(self) -> None:
        self._reader = _Reader((DONE, FAIL), "disk")
        self._flushes = 0
        self._answers = 0

    @property
    def flushes(self) -> int:
        """Flushes sent."""
        return self._flushes

    @property
    def outstanding(self) -> int:
        """Flushes sent and not answered yet."""
        return self._flushes - self._answers

    def send_flush(self) -> bytes:
        """The bytes to write for the next flush (number ``flushes`` before the call)."""
        self._flushes += 1
        return FLUSH

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from ``.msg``; ``b""`` means end of file."""
        self._reader.receive_data(data)

    def next_event(self) -> EngineEvent | NeedData:
        """The next answer, ``Closed`` at end of file, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: garbage, an answer with no flush outstanding, or end
                of file inside a message; every later call raises it again.
        """
        message = self._reader.next_message()
        if not isinstance(message, bytes):
            return message
        if self.outstanding <= 0:
            raise self._reader.fail(
                f"the disk answered {message!r} with no flush outstanding"
                f" ({self._flushes} sent, all answered)"
            )
        seq = self._answers
        self._answers += 1
        return Done(seq) if message == DONE else Fail(seq)


@final
class DiskSide:
    """The disk's end: receives ``flush`` (from the control fifo), sends answers."""

    def __init__(self) -> None:
        self._reader = _Reader((FLUSH,), "engine")
        self._flushes = 0
        self._answers = 0

    @property
    def flushes(self) -> int:
        """Flushes received."""
        return self._flushes

    @property
    def outstanding(self) -> int:
        """Flushes received and not answered yet."""
        return self._flushes - self._answers

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the control fifo; ``b""`` means end of file."""
        self._reader.receive_data(data)

    def next_event(self) -> DiskEvent | NeedData:
        """The next ``Flush``, ``Closed`` at end of file, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: garbage or end of file inside a message.
        """
        message = self._reader.next_message()
        if not isinstance(message, bytes):
            return message
        seq = self._flushes
        self._flushes += 1
        return Flush(seq)

    def send_done(self) -> bytes:
        """The bytes answering the oldest unanswered flush with ``done``."""
        return self._answer(DONE)

    def send_fail(self) -> bytes:
        """The bytes answering the oldest unanswered flush with ``fail``."""
        return self._answer(FAIL)

    def _answer(self, message: bytes) -> bytes:
        if self.outstanding <= 0:
            raise LocalProtocolError(f"cannot send {message!r}: no flush is outstanding")
        self._answers += 1
        return message
