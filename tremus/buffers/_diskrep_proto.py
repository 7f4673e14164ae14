"""The replicated disk's stream, sans-IO: bytes in, events out; events in, bytes out.

A disk stream is a connection of its own from the primary's disk to the backup
(beside the memory stream, over the same transport and with the same TLS and
secret). It opens with the 8 bytes ``MAGIC``, so that a backup listening on one
port tells it from a memory stream (whose first bytes are a small header length).

Every frame: ``<IIQQ`` (header length, payload length, hash64 of the header, hash64
of the payload), a msgpack map with str keys (``type`` first), the payload. Explicit
little-endian, both parts checksummed, sizes capped before anything is buffered.

Frames (primary -> backup unless said otherwise)::

    HELLO   version, name, size (bytes), auth (HMAC of [version, name, size] or nil)
    WELCOME version, chunk (bytes), hashes (bin: u64 hash64 per chunk of the backup's
            replica as it is, empty if it has none), auth   (backup -> primary)
    SYNC    offset                 + payload: the image's bytes at offset (base copy)
    SYNCED  size                   the replica now equals the image as of the sync
    WRITE   epoch, offset          + payload: one guest write (sector aligned)
    EPOCH   epoch, writes, bytes   every write of ``epoch`` has been sent
    DONE    epoch                  (backup -> primary) ``epoch`` is durable on the backup
    END     reason                 (both) graceful stop

Order: HELLO, WELCOME, SYNC*, SYNCED, then WRITE and EPOCH; EPOCH epochs go 0, 1,
2, ...; a WRITE's epoch is never below the next EPOCH's; DONE answers EPOCHs in order.
A write has no size limit below the frame cap (block-remus allowed 4 KiB).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final, TypeAlias, final

import msgpack

from tremus.accel import impl

__all__ = [
    "MAGIC", "VERSION", "DiskConnection", "DiskProtocolError", "Done", "End", "EpochEnd",
    "Hello", "NEED_DATA", "Sync", "Synced", "Welcome", "Write",
]

MAGIC: Final = b"TRMSDISK"
VERSION: Final = 2  # 2: checksums are XXH3-64
SECTOR: Final = 512
MAX_HEADER: Final = 1 << 20  # WELCOME's hashes: 8 bytes a MiB of disk
MAX_PAYLOAD: Final = 16 << 20
_PREFIX: Final = struct.Struct("<IIQQ")


class DiskProtocolError(Exception):
    """A frame broke the disk stream's rules; the message says which and how."""


@final
@dataclass(frozen=True, slots=True)
class Hello:
    name: str
    size: int
    version: int = VERSION
    auth: bytes | None = None


@final
@dataclass(frozen=True, slots=True)
class Welcome:
    chunk: int
    hashes: bytes = b""
    version: int = VERSION
    auth: bytes | None = None


@final
@dataclass(frozen=True, slots=True)
class Sync:
    offset: int
    data: bytes | memoryview


@final
@dataclass(frozen=True, slots=True)
class Synced:
    size: int


@final
@dataclass(frozen=True, slots=True)
class Write:
    epoch: int
    offset: int
    data: bytes | memoryview


@final
@dataclass(frozen=True, slots=True)
class EpochEnd:
    epoch: int
    writes: int
    bytes: int


@final
@dataclass(frozen=True, slots=True)
class Done:
    epoch: int


@final
@dataclass(frozen=True, slots=True)
class End:
    reason: str


Event: TypeAlias = Hello | Welcome | Sync | Synced | Write | EpochEnd | Done | End
NEED_DATA: Final = None

_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "HELLO": ("version", "name", "size", "auth"),
    "WELCOME": ("version", "chunk", "hashes", "auth"),
    "SYNC": ("offset",),
    "SYNCED": ("size",),
    "WRITE": ("epoch", "offset"),
    "EPOCH": ("epoch", "writes", "bytes"),
    "DONE": ("epoch",),
    "END": ("reason",),
}
_FROM_PRIMARY: Final = frozenset({"HELLO", "SYNC", "SYNCED", "WRITE", "EPOCH", "END"})
_FROM_BACKUP: Final = frozenset({"WELCOME", "DONE", "END"})
_PAYLOAD: Final = frozenset({"SYNC", "WRITE"})


def hello_auth(secret: bytes, hello: Hello) -> bytes:
    message = b"tremus-disk-hello\0" + msgpack.packb([hello.version, hello.name, hello.size])
    return hmac.new(secret, message, sha256).digest()


def welcome_auth(secret: bytes, hello: Hello, welcome: Welcome) -> bytes:
    message = (b"tremus-disk-welcome\0" + (hello.auth or b"")
               + msgpack.packb([welcome.version, welcome.chunk, welcome.hashes]))
    return hmac.new(secret, message, sha256).digest()


def _u64(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 64


def _header(event: Event) -> tuple[dict[str, Any], bytes | memoryview]:
    match event:
        case Hello():
            return {"type": "HELLO", "version": event.version, "name": event.name,
                    "size": event.size, "auth": event.auth}, b""
        case Welcome():
            return {"type": "WELCOME", "version": event.version, "chunk": event.chunk,
                    "hashes": bytes(event.hashes), "auth": event.auth}, b""
        case Sync():
            return {"type": "SYNC", "offset": event.offset}, event.data
        case Synced():
            return {"type": "SYNCED", "size": event.size}, b""
        case Write():
            return {"type": "WRITE", "epoch": event.epoch, "offset": event.offset}, event.data
        case EpochEnd():
            return {"type": "EPOCH", "epoch": event.epoch, "writes": event.writes,
                    "bytes": event.bytes}, b""
        case Done():
            return {"type": "DONE", "epoch": event.epoch}, b""
        case End():
            return {"type": "END", "reason": event.reason}, b""
    raise TypeError(f"not a disk stream event: {event!r}")


@final
class DiskConnection:
    """One end of a disk stream (``role`` "primary" or "backup"), h11 style.

    ``send(event)`` returns the bytes to write (the primary's first call is
    preceded by ``MAGIC``); ``receive_data(bytes)`` buffers what was read (``b""`` at
    EOF) and ``next_event()`` returns the next event, ``NEED_DATA``, or raises
    ``DiskProtocolError``. Order and bounds are checked both ways; sizes are checked
    against the disk's size once HELLO has named it.
    """

    def __init__(self, role: str, *, secret: bytes | None = None) -> None:
        if role not in ("primary", "backup"):
            raise ValueError(f"role must be 'primary' or 'backup', not {role!r}")
        self.role = role
        self._secret = secret
        self._buffer = bytearray()
        self._eof = False
        self._magic_seen = role == "primary"
        self._magic_sent = role == "backup"
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.synced = False
        self._next_epoch = {"primary": 0, "backup": 0}  # next EPOCH sent / received
        self._next_done = 0

    # -- sending --------------------------------------------------------------------
    def send(self, event: Event) -> list[bytes | memoryview]:
        kind = _header(event)[0]["type"]
        allowed = _FROM_PRIMARY if self.role == "primary" else _FROM_BACKUP
        if kind not in allowed:
            raise DiskProtocolError(f"the {self.role} never sends {kind}")
        if isinstance(event, Hello) and self._secret is not None:
            event = Hello(event.name, event.size, event.version,
                          hello_auth(self._secret, event))
        if isinstance(event, Welcome) and self._secret is not None:
            assert self.hello is not None
            event = Welcome(event.chunk, event.hashes, event.version,
                            welcome_auth(self._secret, self.hello, event))
        self._admit(event, outgoing=True)
        header, payload = _header(event)
        raw = msgpack.packb(header, use_bin_type=True)
        parts: list[bytes | memoryview] = []
        if not self._magic_sent:
            parts.append(MAGIC)
            self._magic_sent = True
        parts.append(_PREFIX.pack(len(raw), len(payload), impl.hash64(raw),
                                  impl.hash64(payload)))
        parts.append(raw)
        if len(payload):
            parts.append(payload)
        return parts

    # -- receiving ------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def next_event(self) -> Event | None:
        buffer = self._buffer
        if not self._magic_seen:
            if len(buffer) < len(MAGIC):
                return self._need()
            if bytes(buffer[: len(MAGIC)]) != MAGIC:
                raise DiskProtocolError("not a tremus disk stream (bad magic)")
            del buffer[: len(MAGIC)]
            self._magic_seen = True
        if len(buffer) < _PREFIX.size:
            return self._need()
        header_len, payload_len, header_hash, payload_hash = _PREFIX.unpack_from(buffer)
        if not 0 < header_len <= MAX_HEADER:
            raise DiskProtocolError(f"frame header of {header_len} bytes (limit {MAX_HEADER})")
        if payload_len > MAX_PAYLOAD:
            raise DiskProtocolError(f"payload of {payload_len} bytes (limit {MAX_PAYLOAD})")
        end = _PREFIX.size + header_len + payload_len
        if len(buffer) < end:
            return self._need()
        raw = bytes(buffer[_PREFIX.size: _PREFIX.size + header_len])
        payload = bytes(buffer[_PREFIX.size + header_len: end])
        del buffer[:end]
        if impl.hash64(raw) != header_hash:
            raise DiskProtocolError("frame header checksum mismatch")
        if impl.hash64(payload) != payload_hash:
            raise DiskProtocolError(f"payload checksum mismatch over {payload_len} bytes")
        event = self._decode(raw, payload)
        self._admit(event, outgoing=False)
        return event

    def _need(self) -> Event | None:
        if self._eof and self._buffer:
            raise DiskProtocolError("the stream ended in the middle of a frame")
        return NEED_DATA

    def _decode(self, raw: bytes, payload: bytes) -> Event:
        try:
            header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises many kinds for bad input
            raise DiskProtocolError(f"frame header is not valid msgpack: {exc}") from None
        if not isinstance(header, dict):
            raise DiskProtocolError("frame header is not a map")
        kind = header.get("type")
        if kind not in _FIELDS:
            raise DiskProtocolError(f"unknown frame type {kind!r}")
        allowed = _FROM_BACKUP if self.role == "primary" else _FROM_PRIMARY
        if kind not in allowed:
            raise DiskProtocolError(f"{kind} from the peer, which never sends it")
        fields = _FIELDS[kind]
        if set(header) != {"type", *fields}:
            raise DiskProtocolError(f"{kind}: header fields {sorted(header)} are not "
                                    f"{sorted(fields)}")
        if bool(payload) != (kind in _PAYLOAD):
            raise DiskProtocolError(f"{kind}: unexpected payload presence")
        h = header
        try:
            match kind:
                case "HELLO":
                    return Hello(_str(h["name"]), _int(h["size"]), _int(h["version"]),
                                 _bin_or_nil(h["auth"]))
                case "WELCOME":
                    return Welcome(_int(h["chunk"]), _bin(h["hashes"]), _int(h["version"]),
                                   _bin_or_nil(h["auth"]))
                case "SYNC":
                    return Sync(_int(h["offset"]), payload)
                case "SYNCED":
                    return Synced(_int(h["size"]))
                case "WRITE":
                    return Write(_int(h["epoch"]), _int(h["offset"]), payload)
                case "EPOCH":
                    return EpochEnd(_int(h["epoch"]), _int(h["writes"]), _int(h["bytes"]))
                case "DONE":
                    return Done(_int(h["epoch"]))
                case _:
                    return End(_str(h["reason"]))
        except TypeError as exc:
            raise DiskProtocolError(f"{kind}: {exc}") from None

    # -- the rules ------------------------------------------------------------------
    def _admit(self, event: Event, *, outgoing: bool) -> None:
        what = type(event).__name__.upper()
        sender = self.role if outgoing else ("backup" if self.role == "primary" else "primary")
        if isinstance(event, Hello):
            if self.hello is not None:
                raise DiskProtocolError("second HELLO")
            if event.version != VERSION:
                raise DiskProtocolError(f"HELLO: disk stream version {event.version}, this "
                                        f"side speaks {VERSION}")
            if not event.name or event.size <= 0 or event.size % SECTOR:
                raise DiskProtocolError(f"HELLO: bad disk {event.name!r} of {event.size} bytes")
            if not outgoing and self._secret is not None:
                expected = hello_auth(self._secret, event)
                if event.auth is None or not hmac.compare_digest(event.auth, expected):
                    raise DiskProtocolError("HELLO: authentication failed")
            self.hello = event
            return
        if self.hello is None:
            raise DiskProtocolError(f"{what} before HELLO")
        size = self.hello.size
        if isinstance(event, Welcome):
            if self.welcome is not None:
                raise DiskProtocolError("second WELCOME")
            if event.version != VERSION or event.chunk <= 0 or len(event.hashes) % 8:
                raise DiskProtocolError("WELCOME: bad version, chunk or hashes")
            if not outgoing and self._secret is not None:
                expected = welcome_auth(self._secret, self.hello, event)
                if event.auth is None or not hmac.compare_digest(event.auth, expected):
                    raise DiskProtocolError("WELCOME: authentication failed")
            self.welcome = event
            return
        if isinstance(event, End):
            return
        if self.welcome is None:
            raise DiskProtocolError(f"{what} before WELCOME")
        if isinstance(event, Sync):
            if self.synced:
                raise DiskProtocolError("SYNC after SYNCED")
            _check_range(what, event.offset, len(event.data), size)
        elif isinstance(event, Synced):
            if self.synced or event.size != size:
                raise DiskProtocolError(f"SYNCED: size {event.size}, disk of {size} bytes")
            self.synced = True
        elif isinstance(event, Write):
            if not self.synced:
                raise DiskProtocolError("WRITE before SYNCED")
            _check_range(what, event.offset, len(event.data), size)
            if event.offset % SECTOR or len(event.data) % SECTOR or not len(event.data):
                raise DiskProtocolError(f"WRITE at {event.offset} of {len(event.data)} bytes "
                                        f"is not whole sectors")
            if event.epoch < self._next_epoch[sender]:
                raise DiskProtocolError(f"WRITE for epoch {event.epoch}, which has ended")
        elif isinstance(event, EpochEnd):
            if not self.synced:
                raise DiskProtocolError("EPOCH before SYNCED")
            next_epoch = self._next_epoch[sender]
            if event.epoch != next_epoch:
                raise DiskProtocolError(f"EPOCH {event.epoch}, expected {next_epoch}")
            self._next_epoch[sender] = next_epoch + 1
        elif isinstance(event, Done):
            if event.epoch != self._next_done or event.epoch >= self._next_epoch["primary"]:
                raise DiskProtocolError(f"DONE {event.epoch} out of order "
                                        f"(expected {self._next_done})")
            self._next_done += 1


def _check_range(what: str, offset: int, length: int, size: int) -> None:
    if offset + length > size:
        raise DiskProtocolError(f"{what} of {length} bytes at {offset} is past the end of "
                                f"the {size}-byte disk")


def _int(value: object) -> int:
    if not _u64(value):
        raise TypeError(f"{value!r} is not an integer in [0, 2**64)")
    return int(value)  # type: ignore[call-overload]


def _str(value: object) -> str:
    if type(value) is not str:
        raise TypeError(f"{value!r} is not a string")
    return value


def _bin(value: object) -> bytes:
    if type(value) is not bytes:
        raise TypeError(f"{value!r} is not bytes")
    return value


def _bin_or_nil(value: object) -> bytes | None:
    return None if value is None else _bin(value)
