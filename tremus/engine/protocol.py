"""The tremus wire protocol, sans-IO: frames <-> events, and the rules both roles follow.

This docstring is the protocol's specification.

Roles and flow
--------------
A *primary* protects a running VM by streaming checkpoints to a *backup*. The primary
connects and speaks first; every checkpoint it sends is acknowledged by the backup
once the backup has verified and applied it::

    primary                                  backup
    HELLO ------------------------------------->
    <---------------------------------- WELCOME   (or END: refused)
    CHECKPOINT_BEGIN(e, full) ----------------->
    PAGES(e)* --------------------------------->
    STATE(e) ---------------------------------->
    CHECKPOINT_END(e, totals, digest) --------->
    <-------------------------------------- ACK(e)
    ... the next checkpoint is e + 1 (several may be in flight) ...
    HEARTBEAT <--------------------------------> HEARTBEAT   (after the sender's first frame)
    END(reason) <------------------------------> END(reason) (graceful stop)

Framing (protocol version 1; all integers little-endian)
--------------------------------------------------------
Each frame is a 16-byte prefix, a header, and a payload::

    u32 header_len     1 .. 65536
    u32 payload_len    0 .. max_payload (64 MiB unless configured)
    u64 header_check   hash64(header, seed=header_len | payload_len << 32)
    header             header_len bytes: a msgpack map with str keys, "type" first
    payload            payload_len raw bytes (page data is never re-encoded by msgpack)

``hash64`` is ``tremus.accel.impl.hash64``: XXH3-64 (xxHash). The header check covers the lengths and
every header field, and each payload is covered by a checksum in its header, so a
single corrupt byte anywhere is an error, never a silently different checkpoint.
Both caps are checked on the prefix, before any of the header or payload is buffered.
The prefix format and the ``type`` and ``version`` fields of HELLO and WELCOME never
change, so that a version mismatch is always reported as one.

Frames (header fields; ``u64`` is an int in [0, 2**64); unknown or missing fields
are errors)
----------------------------------------------------------------------------------
``HELLO`` (primary, first frame): ``version`` u64, ``role`` "primary", ``auth`` bin|nil,
``driver`` str (the domain driver that rebuilds the VM), ``config`` map (the driver's
configuration), ``ram_size`` u64 (a multiple of ``page_size``), ``page_size`` (a power
of two in 512..65536, small enough that a PAGES frame of 1024 pages fits the payload
cap), ``features`` [str] (what the primary would like to use), ``timeout_ms`` u64 (how
long the primary waits for a silent backup before giving it up), ``arbiter_key`` str
(the guest's name in the ownership arbiter, "" without one).

``WELCOME`` (backup, first frame): ``version``, ``features`` (a subset of HELLO's:
what will be used; today only ``"delta"`` exists), ``auth`` bin|nil, ``takeover_ms`` u64
(after losing this backup, the primary holds its output this long: the backup's
silence timeout, fence time and a grace), ``timeout_ms`` u64 (the backup's silence
timeout), ``standby`` str (the backup's identity in the
arbiter, "" without one). A backup that refuses the HELLO sends END instead.

``CHECKPOINT_BEGIN``: ``epoch`` u64, ``full`` bool. The first checkpoint must be full,
later epochs go up by exactly one. A full checkpoint carries every page of RAM.

``PAGES``: ``epoch``, ``count`` (1..1024 pages), ``codec`` "raw"|"delta",
``checksum`` = hash64(data, seed=hash64(pfns)). Payload: ``count`` u64 pfns, then the
page data: ``count * page_size`` bytes for raw; the ``delta_encode`` format of
``tremus/_native.pyi`` for delta (``count .. count * (page_size + 1)`` bytes, decoded
against the backup's replica; only when negotiated). Across one checkpoint the pfns
are strictly ascending (so unique) and below ``ram_size / page_size``.

``STATE``: ``epoch``, ``checksum`` = hash64(state). Payload: the vCPU and device state.
Exactly one per checkpoint, after its pages.

``CHECKPOINT_END``: ``epoch``, ``pages`` and ``bytes`` (number of pages and of page
data bytes as sent, summed over the checkpoint's PAGES frames: must match), ``digest``
u64|nil = ``checkpoint_digest(pfns, decoded pages, state)`` over the whole checkpoint
in order, verified by the backup's stager after decoding, before anything is applied;
``ram_digest`` u64|nil = ``hash64`` of the primary's whole RAM when the checkpoint was
taken (``--verify``): after applying, the backup's replica must hash the same.

``ACK`` (backup): ``epoch``: checkpoint ``epoch`` is verified and applied. One per
completed checkpoint, in order, never for a checkpoint that has not ended.

``HEARTBEAT`` (both): ``seq`` u64, strictly increasing per direction; ``time`` float
(the sender's clock, informational); ``echo`` u64, the highest HEARTBEAT seq received
from the peer (0: none). Each side sends one every heartbeat period, checkpoints or not.

``END`` (both): ``reason`` str. Graceful stop: after it the sender sends nothing more;
a backup that receives it discards its replica and does not fail over. An END in the
middle of a checkpoint abandons that checkpoint.

Authentication
--------------
With a shared secret, ``HELLO.auth = HMAC-SHA256(secret, b"tremus-hello\\0" +
msgpack([version, role, driver, config, ram_size, page_size, features, timeout_ms,
arbiter_key]))`` (maps with
sorted keys) and ``WELCOME.auth = HMAC-SHA256(secret, b"tremus-welcome\\0" +
HELLO.auth + msgpack([version, features, takeover_ms, timeout_ms, standby]))``. Each side that holds a secret rejects a
peer that does not prove it ("authentication failed"), before accepting anything else.
This proves the peer knew the secret; it neither prevents replays nor protects the
frames after the handshake: use TLS or a private link on a hostile network.

Using it
--------
``PrimaryConnection`` and ``BackupConnection`` have the shape of h11: feed received
bytes with ``receive_data`` (``b""`` at EOF), take events with ``next_event`` until it
returns ``NEED_DATA``, and turn events into bytes with ``send`` (or ``send_parts``,
which avoids copying page data). Both directions are checked: a bad frame from the peer
raises ``RemoteProtocolError``, a bad event handed to ``send`` ``LocalProtocolError``;
either leaves the connection in ``ConnectionState.ERROR`` for good. The backup feeds
checkpoint events to a ``CheckpointStager``, which hands back a verified
``CompleteCheckpoint`` and never writes the replica.
"""

from __future__ import annotations

import enum
import hmac
import math
import operator
import struct
import sys
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from hashlib import sha256
from typing import Any, Final, NoReturn, TypeAlias, final

import msgpack

from tremus._memory import PayloadBuffers, page_aligned
from tremus.accel import impl
from tremus.transports.codec import CODECS, DELTA, MAX_BATCH_PAGES, RAW, decode_into, encoded_size

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_FEATURES",
    "PREFIX",
    "MAX_HEADER",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_MAX_STATE",
    "DEFAULT_MAX_RAM_SIZE",
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "NEED_DATA",
    "NeedData",
    "ConnectionState",
    "Hello",
    "Welcome",
    "CheckpointBegin",
    "Pages",
    "State",
    "CheckpointEnd",
    "Ack",
    "Heartbeat",
    "End",
    "ConnectionClosed",
    "Event",
    "CheckpointEvent",
    "PrimaryConnection",
    "BackupConnection",
    "CheckpointStager",
    "CompleteCheckpoint",
    "checkpoint_digest",
    "BytesLike",
    "encode_frame",
    "hello_auth",
    "welcome_auth",
]

PROTOCOL_VERSION: Final = 3  # 3: checksums are XXH3-64
#: Features this implementation can use; WELCOME answers with a subset of HELLO's.
SUPPORTED_FEATURES: Final = frozenset({DELTA})
#: header_len, payload_len, header_check.
PREFIX: Final = struct.Struct("<IIQ")
MAX_HEADER: Final = 64 * 1024
#: A PAGES payload's running checksum is fed in steps of at least this many bytes.
_HASH_STEP: Final = 256 << 10
#: Payloads from this size get a page-aligned buffer (``page_aligned``: page data is
#: copied from it at full speed); smaller ones are not worth the extra page.
_ALIGN_PAYLOAD_FROM: Final = 64 * 1024
DEFAULT_MAX_PAYLOAD: Final = 64 * 1024 * 1024
DEFAULT_MAX_STATE: Final = 16 * 1024 * 1024
DEFAULT_MAX_RAM_SIZE: Final = 1 << 40
_U64_LIMIT: Final = 1 << 64

BytesLike: TypeAlias = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """A frame or event broke the protocol; the message says which and how."""


@final
class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid (or the stream is corrupt)."""


@final
class LocalProtocolError(ProtocolError):
    """We were asked to send something invalid: a bug on this side."""


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel (an enum so that ``is`` narrows types)."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` when the buffered bytes do not hold a whole frame yet.
NEED_DATA: Final = NeedData.NEED_DATA


@final
class ConnectionState(enum.Enum):
    HANDSHAKE = "HANDSHAKE"  # HELLO/WELCOME not yet exchanged
    OPEN = "OPEN"
    CLOSED = "CLOSED"  # END sent or received, or EOF seen
    ERROR = "ERROR"  # a ProtocolError happened; nothing more can be sent or received


# -- events ---------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """The primary's opening frame: who it is and what the backup must rebuild."""

    driver: str
    ram_size: int
    page_size: int = 4096
    config: Mapping[str, Any] = field(default_factory=dict)
    features: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION
    role: str = "primary"
    #: The primary's silence timeout (ms): how long it waits for the backup before
    #: giving it up (the backup bounds its takeover window with it).
    timeout_ms: int = 1000
    #: The guest's name in the arbiter both sides must use, or "" (no arbiter).
    arbiter_key: str = ""
    #: Filled in by ``PrimaryConnection.send`` when the connection has a secret.
    auth: bytes | None = None


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """The backup's answer to HELLO: accepted, with these features."""

    features: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION
    #: How long after losing this backup the primary must hold its output (ms): the
    #: backup's silence timeout, its fence time and a grace. Within it the backup
    #: may still take over; after it, it never will.
    takeover_ms: int = 0
    #: The backup's silence timeout (ms): a primary that stood still this long may
    #: have been given up (and replaced) by it.
    timeout_ms: int = 1000
    #: This backup's identity in the arbiter ("" without one): the standby to name.
    standby: str = ""
    #: Filled in by ``BackupConnection.send`` when the connection has a secret.
    auth: bytes | None = None


@final
@dataclass(frozen=True, slots=True)
class CheckpointBegin:
    epoch: int
    #: Carries every page of RAM (the first checkpoint must).
    full: bool = False


@final
@dataclass(frozen=True, slots=True)
class Pages:
    """One batch of a checkpoint's pages (at most ``MAX_BATCH_PAGES``).

    Received events hold read-only memoryviews into one bytes object per frame.
    """

    epoch: int
    #: Little-endian u64 page frame numbers.
    pfns: BytesLike
    #: Page data as coded by ``codec``.
    data: BytesLike
    codec: str = RAW
    #: ``hash64(data, seed=hash64(pfns))``; ``None`` on send means "compute it".
    checksum: int | None = field(default=None, compare=False)

    @property
    def count(self) -> int:
        return len(self.pfns) // 8


@final
@dataclass(frozen=True, slots=True)
class State:
    epoch: int
    state: BytesLike
    #: ``hash64(state)``; ``None`` on send means "compute it".
    checksum: int | None = field(default=None, compare=False)


@final
@dataclass(frozen=True, slots=True)
class CheckpointEnd:
    epoch: int
    #: Pages in the checkpoint.
    pages: int
    #: Page data bytes as sent (after coding), summed over its PAGES frames.
    bytes: int
    #: ``checkpoint_digest`` of the whole checkpoint, or ``None`` (not checked).
    digest: int | None = None
    #: ``hash64`` of the primary's whole RAM at this checkpoint (``--verify``), or ``None``.
    ram_digest: int | None = None


@final
@dataclass(frozen=True, slots=True)
class Ack:
    epoch: int


@final
@dataclass(frozen=True, slots=True)
class Heartbeat:
    seq: int
    time: float
    #: The highest HEARTBEAT seq received from the peer so far (0: none): tells the
    #: peer how recently this side certainly heard from it.
    echo: int = 0


@final
@dataclass(frozen=True, slots=True)
class End:
    reason: str


@final
@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Not a frame: the peer closed the stream (EOF) at a frame boundary.

    ``clean`` is whether it sent END first; a backup fails over only when it is not.
    """

    clean: bool


Event: TypeAlias = (
    Hello
    | Welcome
    | CheckpointBegin
    | Pages
    | State
    | CheckpointEnd
    | Ack
    | Heartbeat
    | End
    | ConnectionClosed
)
CheckpointEvent: TypeAlias = CheckpointBegin | Pages | State | CheckpointEnd

_KIND_OF: Final[dict[type, str]] = {
    Hello: "HELLO",
    Welcome: "WELCOME",
    CheckpointBegin: "CHECKPOINT_BEGIN",
    Pages: "PAGES",
    State: "STATE",
    CheckpointEnd: "CHECKPOINT_END",
    Ack: "ACK",
    Heartbeat: "HEARTBEAT",
    End: "END",
}
_FROM_PRIMARY: Final = frozenset(
    {"HELLO", "CHECKPOINT_BEGIN", "PAGES", "STATE", "CHECKPOINT_END", "HEARTBEAT", "END"}
)
_FROM_BACKUP: Final = frozenset({"WELCOME", "ACK", "HEARTBEAT", "END"})


# -- digests and authentication -------------------------------------------------------


def checkpoint_digest(pfns: BytesLike, data: BytesLike, state: BytesLike) -> int:
    """The CHECKPOINT_END digest: all pfns, decoded page data and state, in order.

    The primary computes it over its staging buffer (the pages before coding); the
    backup over what it decoded. It catches what per-frame checksums cannot: a delta
    decoded against a replica page that differs from the primary's cache.
    """
    return int(impl.hash64(state, impl.hash64(data, impl.hash64(pfns))))


def _canonical(value: object) -> object:
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, kv[0]))
        return {k: _canonical(v) for k, v in items}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _mac(secret: bytes, label: bytes, *parts: object) -> bytes:
    message = label + b"".join(
        p if isinstance(p, bytes) else msgpack.packb(_canonical(p), use_bin_type=True)
        for p in parts
    )
    return hmac.new(secret, message, sha256).digest()


def hello_auth(secret: bytes, hello: Hello) -> bytes:
    """HELLO's auth token for ``secret`` (``hello.auth`` itself is not covered)."""
    fields = [
        hello.version,
        hello.role,
        hello.driver,
        hello.config,
        hello.ram_size,
        hello.page_size,
        hello.features,
        hello.timeout_ms,
        hello.arbiter_key,
    ]
    return _mac(secret, b"tremus-hello\0", fields)


def welcome_auth(secret: bytes, hello: Hello, welcome: Welcome) -> bytes:
    """WELCOME's auth token: bound to the HELLO it answers through HELLO's token."""
    return _mac(secret, b"tremus-welcome\0", hello.auth or b"", [welcome.version, welcome.features,
                                                      welcome.takeover_ms, welcome.timeout_ms,
                                                      welcome.standby])


# -- header schema --------------------------------------------------------------------

_Check: TypeAlias = tuple[str, Callable[[object], bool]]


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v < _U64_LIMIT


def _is_u64_or_nil(v: object) -> bool:
    return v is None or _is_u64(v)


def _is_str(v: object) -> bool:
    return type(v) is str


def _is_bool(v: object) -> bool:
    return type(v) is bool


def _is_bin_or_nil(v: object) -> bool:
    return v is None or type(v) is bytes


def _is_map(v: object) -> bool:
    return type(v) is dict


def _is_str_list(v: object) -> bool:
    return type(v) is list and all(type(x) is str for x in v)


def _is_finite(v: object) -> bool:
    return type(v) is float and math.isfinite(v)


_U64: Final[_Check] = ("an integer in [0, 2**64)", _is_u64)
_SCHEMAS: Final[dict[str, dict[str, _Check]]] = {
    "HELLO": {
        "version": _U64,
        "role": ("a string", _is_str),
        "auth": ("bytes or nil", _is_bin_or_nil),
        "driver": ("a string", _is_str),
        "config": ("a map", _is_map),
        "ram_size": _U64,
        "page_size": _U64,
        "features": ("a list of strings", _is_str_list),
        "timeout_ms": _U64,
        "arbiter_key": ("a string", _is_str),
    },
    "WELCOME": {
        "version": _U64,
        "features": ("a list of strings", _is_str_list),
        "auth": ("bytes or nil", _is_bin_or_nil),
        "takeover_ms": _U64,
        "timeout_ms": _U64,
        "standby": ("a string", _is_str),
    },
    "CHECKPOINT_BEGIN": {"epoch": _U64, "full": ("a boolean", _is_bool)},
    "PAGES": {"epoch": _U64, "count": _U64, "codec": ("a string", _is_str), "checksum": _U64},
    "STATE": {"epoch": _U64, "checksum": _U64},
    "CHECKPOINT_END": {
        "epoch": _U64,
        "pages": _U64,
        "bytes": _U64,
        "digest": ("an integer in [0, 2**64) or nil", _is_u64_or_nil),
        "ram_digest": ("an integer in [0, 2**64) or nil", _is_u64_or_nil),
    },
    "ACK": {"epoch": _U64},
    "HEARTBEAT": {"seq": _U64, "time": ("a finite float", _is_finite), "echo": _U64},
    "END": {"reason": ("a string", _is_str)},
}
_WITH_PAYLOAD: Final = frozenset({"PAGES", "STATE"})


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(kind: str, header: Mapping[str, object]) -> str:
    epoch = header.get("epoch")
    return f"{kind} for epoch {epoch}" if _is_u64(epoch) else kind


def _check_schema(kind: str, header: Mapping[str, object]) -> None:
    schema = _SCHEMAS[kind]
    unknown = sorted(k for k in header if k != "type" and k not in schema)
    if unknown:
        raise ProtocolError(f"{kind}: unexpected header field(s) {', '.join(unknown)}")
    for name, (what, ok) in schema.items():
        if name not in header:
            raise ProtocolError(f"{_describe(kind, header)}: header field {name!r} is missing")
        if not ok(header[name]):
            raise ProtocolError(
                f"{_describe(kind, header)}: header field {name!r} must be {what},"
                f" not {_short(header[name])}"
            )


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _decode_header(raw: BytesLike) -> tuple[str, dict[str, Any]]:
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext
        )
    except Exception as exc:  # msgpack raises ValueError and friends for any bad input
        raise ProtocolError(f"frame header is not valid msgpack: {exc}") from None
    if type(header) is not dict:
        raise ProtocolError(f"frame header must be a msgpack map, not {type(header).__name__}")
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in _SCHEMAS:
        raise ProtocolError(f"unknown frame type {_short(kind)}")
    return kind, header


# -- pfn lists ------------------------------------------------------------------------


def _pfn_array(pfns: BytesLike) -> array[int]:
    arr = array("Q")
    arr.frombytes(pfns)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def _first(pred: Callable[[int], bool], values: array[int]) -> int:
    return next(i for i, v in enumerate(values) if pred(v))


# -- the two directions ---------------------------------------------------------------


@final
class _Phase(enum.Enum):
    HANDSHAKE = "HANDSHAKE"
    IDLE = "IDLE"  # between checkpoints
    PAGES = "PAGES"  # after CHECKPOINT_BEGIN
    STATE = "STATE"  # after STATE: only CHECKPOINT_END may follow
    ENDED = "ENDED"  # after END


class _Session:
    """What the handshake established; shared by both directions' rule checkers."""

    def __init__(self, max_ram_size: int, max_payload: int) -> None:
        self.max_ram_size = max_ram_size
        self.max_payload = max_payload
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.features: frozenset[str] = frozenset()
        self.page_size = 0
        self.ram_pages = 0


class _PrimaryRules:
    """The rules of the primary-to-backup direction (checked on both ends)."""

    def __init__(self, session: _Session) -> None:
        self.s = session
        self.phase = _Phase.HANDSHAKE
        self.epoch: int | None = None  # the open checkpoint, else the last one
        self.full = False
        self.pages = 0
        self.nbytes = 0
        self.last_pfn = -1
        self.completed: deque[int] = deque()  # ended, not yet acknowledged
        self.ended: int | None = None  # the last checkpoint that ended
        self.heartbeat_seq = -1

    def precheck(self, kind: str, header: Mapping[str, Any], payload_len: int) -> None:
        """Order and sizes, from the header alone: runs before the payload is buffered."""
        what = _describe(kind, header)
        phase = self.phase
        if phase is _Phase.ENDED:
            raise ProtocolError(f"{what} after END")
        if phase is _Phase.HANDSHAKE and kind != "HELLO":
            raise ProtocolError(f"{what} before HELLO: the primary's first frame is HELLO")
        if kind == "HELLO" and phase is not _Phase.HANDSHAKE:
            raise ProtocolError("second HELLO")
        if kind in ("HELLO", "HEARTBEAT", "END"):
            return
        epoch: int = header["epoch"]
        if kind == "CHECKPOINT_BEGIN":
            if self.s.welcome is None:
                raise ProtocolError(f"{what} before the backup's WELCOME")
            if phase is not _Phase.IDLE:
                raise ProtocolError(f"{what} while checkpoint {self.epoch} is still open")
            if self.epoch is None and not header["full"]:
                raise ProtocolError(f"{what}: the first checkpoint must be full (full=true)")
            if self.epoch is not None and epoch != self.epoch + 1:
                direction = "skips ahead" if epoch > self.epoch else "goes back"
                raise ProtocolError(
                    f"{what}: epoch {direction}; expected epoch {self.epoch + 1}"
                    f" after checkpoint {self.epoch}"
                )
            return
        if phase is _Phase.IDLE:
            raise ProtocolError(f"{what} outside a checkpoint (no CHECKPOINT_BEGIN)")
        if epoch != self.epoch:
            raise ProtocolError(f"{what} inside checkpoint {self.epoch}")
        if kind == "PAGES":
            if phase is _Phase.STATE:
                raise ProtocolError(f"{what} after STATE: pages must come before the state")
            self._precheck_pages(what, header, payload_len)
        elif kind == "STATE":
            if phase is _Phase.STATE:
                raise ProtocolError(f"{what}: second STATE in the checkpoint")
        elif kind == "CHECKPOINT_END" and phase is not _Phase.STATE:
            raise ProtocolError(f"{what} before STATE: a checkpoint needs its state")

    def _precheck_pages(self, what: str, header: Mapping[str, Any], payload_len: int) -> None:
        count: int = header["count"]
        codec: str = header["codec"]
        if not 1 <= count <= MAX_BATCH_PAGES:
            raise ProtocolError(f"{what}: count {count} is not in 1..{MAX_BATCH_PAGES}")
        if codec not in CODECS:
            raise ProtocolError(f"{what}: unknown codec {_short(codec)}")
        if codec == DELTA and DELTA not in self.s.features:
            raise ProtocolError(f"{what}: codec 'delta' was not negotiated in WELCOME")
        low, high = encoded_size(codec, count, self.s.page_size)
        data_len = payload_len - 8 * count
        if not low <= data_len <= high:
            expected = f"{low}" if low == high else f"{low}..{high}"
            raise ProtocolError(
                f"{what}: payload of {payload_len} bytes does not fit {count} pfns"
                f" ({8 * count} bytes) and {codec} data ({expected} bytes)"
            )

    def admit(self, event: Event) -> None:
        """Full check of a whole event, then the transition; nothing changes on error."""
        match event:
            case Hello():
                self._admit_hello(event)
            case CheckpointBegin(epoch=epoch, full=full):
                self.phase = _Phase.PAGES
                self.epoch, self.full = epoch, full
                self.pages = self.nbytes = 0
                self.last_pfn = -1
            case Pages():
                self._admit_pages(event)
            case State():
                self.phase = _Phase.STATE
            case CheckpointEnd():
                self._admit_end(event)
            case Heartbeat(seq=seq):
                if seq <= self.heartbeat_seq:
                    raise ProtocolError(
                        f"HEARTBEAT seq {seq} does not increase (last {self.heartbeat_seq})"
                    )
                self.heartbeat_seq = seq
            case End():
                self.phase = _Phase.ENDED

    def _admit_hello(self, hello: Hello) -> None:
        if hello.role != "primary":
            raise ProtocolError(f"HELLO: role must be 'primary', not {_short(hello.role)}")
        if not hello.driver:
            raise ProtocolError("HELLO: driver is empty")
        ps, ram = hello.page_size, hello.ram_size
        if not 512 <= ps <= 65536 or ps & (ps - 1):
            raise ProtocolError(f"HELLO: page_size {ps} is not a power of two in 512..65536")
        if ram <= 0 or ram % ps:
            raise ProtocolError(f"HELLO: ram_size {ram} is not a positive multiple of {ps}")
        if ram > self.s.max_ram_size:
            raise ProtocolError(f"HELLO: ram_size {ram} exceeds the limit {self.s.max_ram_size}")
        biggest = MAX_BATCH_PAGES * (8 + ps + 1)
        if biggest > self.s.max_payload:
            raise ProtocolError(
                f"HELLO: page_size {ps} makes PAGES frames of up to {biggest} bytes,"
                f" over the {self.s.max_payload}-byte payload limit (raise max_payload)"
            )
        self.s.hello = hello
        self.s.page_size = ps
        self.s.ram_pages = ram // ps
        self.phase = _Phase.IDLE

    def _admit_pages(self, pages: Pages) -> None:
        if not impl.pfns_ascending_below(pages.pfns, self.s.ram_pages, self.last_pfn):
            self._refuse_pfns(pages)
        count = len(pages.pfns) // 8
        self.last_pfn = int.from_bytes(pages.pfns[8 * count - 8 : 8 * count], "little")
        self.pages += count
        self.nbytes += len(pages.data)

    def _refuse_pfns(self, pages: Pages) -> NoReturn:
        """ProtocolError naming the first pfn out of range or out of order."""
        what = f"PAGES for epoch {pages.epoch}"
        limit = self.s.ram_pages
        pfns = _pfn_array(pages.pfns)
        if max(pfns) >= limit:
            i = _first(lambda p: p >= limit, pfns)
            raise ProtocolError(
                f"{what}: pfn {pfns[i]} (index {i}) out of range: RAM has {limit} pages"
            )
        if pfns[0] <= self.last_pfn:
            raise ProtocolError(
                f"{what}: pfn {pfns[0]} (index 0) does not follow pfn {self.last_pfn} of the"
                " previous PAGES: pfns must be strictly ascending across a checkpoint"
            )
        if not all(map(operator.lt, pfns, pfns[1:])):
            i = next(i for i in range(1, len(pfns)) if pfns[i] <= pfns[i - 1])
            raise ProtocolError(
                f"{what}: pfn {pfns[i]} (index {i}) does not follow pfn {pfns[i - 1]}:"
                " pfns must be strictly ascending across a checkpoint"
            )
        raise AssertionError("pfns_ascending_below refused pfns that are in order")

    def _admit_end(self, end: CheckpointEnd) -> None:
        what = f"CHECKPOINT_END for epoch {end.epoch}"
        if end.pages != self.pages:
            raise ProtocolError(f"{what}: says {end.pages} pages, the checkpoint had {self.pages}")
        if end.bytes != self.nbytes:
            raise ProtocolError(
                f"{what}: says {end.bytes} page data bytes, the checkpoint had {self.nbytes}"
            )
        if self.full and self.pages != self.s.ram_pages:
            raise ProtocolError(
                f"{what}: a full checkpoint must carry all {self.s.ram_pages} pages,"
                f" this one had {self.pages}"
            )
        assert end.epoch == self.epoch
        self.ended = end.epoch
        self.completed.append(end.epoch)
        self.phase = _Phase.IDLE


class _BackupRules:
    """The rules of the backup-to-primary direction (checked on both ends)."""

    def __init__(self, session: _Session, primary: _PrimaryRules) -> None:
        self.s = session
        self.primary = primary
        self.phase = _Phase.HANDSHAKE
        self.last_acked: int | None = None
        self.heartbeat_seq = -1

    def precheck(self, kind: str, header: Mapping[str, Any], payload_len: int) -> None:
        what = _describe(kind, header)
        if self.phase is _Phase.ENDED:
            raise ProtocolError(f"{what} after END")
        if self.phase is _Phase.HANDSHAKE:
            if self.s.hello is None:
                raise ProtocolError(f"{what} before the primary's HELLO")
            if kind not in ("WELCOME", "END"):
                raise ProtocolError(f"{what} before WELCOME: the backup's first frame is WELCOME")
        elif kind == "WELCOME":
            raise ProtocolError("second WELCOME")

    def admit(self, event: Event) -> None:
        match event:
            case Welcome():
                hello = self.s.hello
                assert hello is not None
                extra = sorted(set(event.features) - set(hello.features))
                if extra:
                    raise ProtocolError(
                        f"WELCOME: features {', '.join(extra)} were not offered in HELLO"
                    )
                self.s.welcome = event
                self.s.features = frozenset(event.features)
                self.phase = _Phase.IDLE
            case Ack(epoch=epoch):
                self._admit_ack(epoch)
            case Heartbeat(seq=seq):
                if seq <= self.heartbeat_seq:
                    raise ProtocolError(
                        f"HEARTBEAT seq {seq} does not increase (last {self.heartbeat_seq})"
                    )
                self.heartbeat_seq = seq
            case End():
                self.phase = _Phase.ENDED

    def _admit_ack(self, epoch: int) -> None:
        completed = self.primary.completed
        if completed and epoch == completed[0]:
            completed.popleft()
            self.last_acked = epoch
            return
        if self.last_acked is not None and epoch <= self.last_acked:
            raise ProtocolError(f"ACK for epoch {epoch}: already acknowledged")
        if not completed:
            ended = "none" if self.primary.ended is None else self.primary.ended
            still_open = self.primary.phase in (_Phase.PAGES, _Phase.STATE)
            raise ProtocolError(
                f"ACK for epoch {epoch}: no checkpoint has ended that awaits an ACK"
                f" (last ended: {ended}"
                + (f"; checkpoint {self.primary.epoch} is still open)" if still_open else ")")
            )
        if epoch > completed[-1]:
            raise ProtocolError(
                f"ACK for epoch {epoch}: ahead of the last ended checkpoint {completed[-1]}"
            )
        raise ProtocolError(f"ACK for epoch {epoch}: out of order, expected ACK {completed[0]}")


# -- encoding -------------------------------------------------------------------------


def _header_and_payload(event: Event) -> tuple[dict[str, Any], list[BytesLike]]:
    kind = _KIND_OF.get(type(event))
    if kind is None:
        raise ProtocolError(f"cannot send {type(event).__name__}: it is not a frame")
    h: dict[str, Any] = {"type": kind}
    payload: list[BytesLike] = []
    match event:
        case Hello():
            h |= {
                "version": event.version,
                "role": event.role,
                "auth": event.auth,
                "driver": event.driver,
                "config": dict(event.config),
                "ram_size": event.ram_size,
                "page_size": event.page_size,
                "features": list(event.features),
                "timeout_ms": event.timeout_ms,
                "arbiter_key": event.arbiter_key,
            }
        case Welcome():
            h |= {"version": event.version, "features": list(event.features), "auth": event.auth,
                  "takeover_ms": event.takeover_ms, "timeout_ms": event.timeout_ms,
                  "standby": event.standby}
        case CheckpointBegin():
            h |= {"epoch": event.epoch, "full": event.full}
        case Pages():
            if len(event.pfns) % 8:
                raise ProtocolError(
                    f"PAGES for epoch {event.epoch}: pfns is {len(event.pfns)} bytes,"
                    " not a whole number of u64"
                )
            checksum = event.checksum
            if checksum is None:
                checksum = impl.hash64(event.data, impl.hash64(event.pfns))
            h |= {
                "epoch": event.epoch,
                "count": event.count,
                "codec": event.codec,
                "checksum": checksum,
            }
            payload = [event.pfns, event.data]
        case State():
            checksum = event.checksum if event.checksum is not None else impl.hash64(event.state)
            h |= {"epoch": event.epoch, "checksum": checksum}
            payload = [event.state]
        case CheckpointEnd():
            h |= {
                "epoch": event.epoch,
                "pages": event.pages,
                "bytes": event.bytes,
                "digest": event.digest,
                "ram_digest": event.ram_digest,
            }
        case Ack():
            h |= {"epoch": event.epoch}
        case Heartbeat():
            h |= {"seq": event.seq, "time": float(event.time), "echo": event.echo}
        case End():
            h |= {"reason": event.reason}
    return h, payload


def _event_from(kind: str, h: dict[str, Any], payload: BytesLike,
                pages_checksum: int | None = None, pages_data: BytesLike | None = None,
                ) -> Event:
    """The event of a whole frame. ``pages_checksum``: a PAGES payload's checksum,
    computed as it arrived (None: compute it here); ``pages_data``: its page data,
    when it landed apart from its pfns (``payload`` then holds only the pfns)."""
    match kind:
        case "HELLO":
            return Hello(
                version=h["version"],
                role=h["role"],
                auth=h["auth"],
                driver=h["driver"],
                config=h["config"],
                ram_size=h["ram_size"],
                page_size=h["page_size"],
                features=tuple(h["features"]),
                timeout_ms=h["timeout_ms"],
                arbiter_key=h["arbiter_key"],
            )
        case "WELCOME":
            return Welcome(version=h["version"], features=tuple(h["features"]), auth=h["auth"],
                           takeover_ms=h["takeover_ms"], timeout_ms=h["timeout_ms"],
                           standby=h["standby"])
        case "CHECKPOINT_BEGIN":
            return CheckpointBegin(h["epoch"], h["full"])
        case "PAGES":
            view = memoryview(payload)
            split = 8 * h["count"]
            pfns, data = view[:split], view[split:]
            if pages_data is not None:
                data = memoryview(pages_data)
            checksum = pages_checksum
            if checksum is None:
                checksum = impl.hash64(data, impl.hash64(pfns))
            if checksum != h["checksum"]:
                raise ProtocolError(
                    f"PAGES for epoch {h['epoch']}: checksum mismatch over {h['count']} pfns"
                    f" and {len(data)} data bytes (header {h['checksum']:#018x},"
                    f" computed {checksum:#018x})"
                )
            return Pages(h["epoch"], pfns, data, h["codec"], checksum)
        case "STATE":
            checksum = impl.hash64(payload)
            if checksum != h["checksum"]:
                raise ProtocolError(
                    f"STATE for epoch {h['epoch']}: checksum mismatch over {len(payload)} bytes"
                    f" (header {h['checksum']:#018x}, computed {checksum:#018x})"
                )
            return State(h["epoch"], payload, checksum)
        case "CHECKPOINT_END":
            return CheckpointEnd(h["epoch"], h["pages"], h["bytes"], h["digest"], h["ram_digest"])
        case "ACK":
            return Ack(h["epoch"])
        case "HEARTBEAT":
            return Heartbeat(h["seq"], h["time"], h["echo"])
        case _:
            return End(h["reason"])


def _byte_views(event: Event) -> Event:
    """Payload buffers as flat byte views, so that ``len`` counts bytes."""
    if isinstance(event, Pages):
        return replace(event, pfns=_bytes_of(event.pfns), data=_bytes_of(event.data))
    if isinstance(event, State):
        return replace(event, state=_bytes_of(event.state))
    return event


def _bytes_of(buffer: BytesLike) -> BytesLike:
    if isinstance(buffer, memoryview) and (buffer.format != "B" or buffer.ndim != 1):
        return buffer.cast("B")
    return buffer


def _frame(header: bytes, payload: list[BytesLike]) -> list[BytesLike]:
    payload_len = sum(len(p) for p in payload)
    check = impl.hash64(header, len(header) | payload_len << 32)
    return [PREFIX.pack(len(header), payload_len, check), header, *payload]


def encode_frame(event: Event) -> bytes:
    """The frame for ``event``, with no check of order or content.

    For tests, fuzzers and tools that need to produce invalid streams; a peer sends
    through its connection's ``send``, which checks everything.
    """
    header, payload = _header_and_payload(_byte_views(event))
    return b"".join(_frame(msgpack.packb(header, use_bin_type=True), payload))


# -- connections ----------------------------------------------------------------------


class _Connection:
    """One end of a tremus stream; see the module docstring for the h11-like usage."""

    _role: str
    _peer: str

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_ram_size: int = DEFAULT_MAX_RAM_SIZE,
    ) -> None:
        if not 0 < max_payload < 1 << 32:
            raise ValueError(f"max_payload must be in 1..2**32-1, not {max_payload}")
        self._secret = secret
        self._max_payload = max_payload
        self._session = _Session(max_ram_size, max_payload)
        self._primary = _PrimaryRules(self._session)
        self._backup = _BackupRules(self._session, self._primary)
        self._buffer = bytearray()
        self._eof = False
        self._closed_seen = False
        self._pending: tuple[str, dict[str, Any], int] | None = None
        self._payload: bytearray | memoryview | None = None
        self._payload_len = 0
        self._payload_filled = 0
        #: Where the page data of a raw PAGES frame may land directly, or None:
        #: called with the frame's epoch and pfns once they arrived (not yet checked:
        #: the frame is checked whole, after its pages landed), it returns a writable
        #: view of exactly the frame's page data size, or None for a buffer of the
        #: frame's own. The backup's first checkpoint, written through into a replica
        #: nothing can fail over to yet, lands its pages there: no copy at all.
        self.pages_landing: Callable[[int, memoryview], memoryview | None] | None = None
        #: Where large payloads get their buffers; with ``PayloadBuffers`` the owner
        #: gives them back once it is done with a frame's bytes.
        self.payload_buffers: PayloadBuffers | None = None
        self._landing_asked = False
        self._landing: memoryview | None = None
        # A PAGES payload is checksummed as it arrives (see _hash_arrived): where its
        # page data starts, the running hash of the page data, and how far it got.
        self._pages_at: int | None = None
        self._pages_hash: Any = None
        self._pages_hashed = 0
        self._error: ProtocolError | None = None
        self._frames_in = 0

    # -- the rules of each direction, by role
    @property
    def _ours(self) -> _PrimaryRules | _BackupRules:
        raise NotImplementedError

    @property
    def _theirs(self) -> _PrimaryRules | _BackupRules:
        raise NotImplementedError

    # -- introspection
    @property
    def state(self) -> ConnectionState:
        if self._error is not None:
            return ConnectionState.ERROR
        if (
            self._closed_seen
            or self._primary.phase is _Phase.ENDED
            or self._backup.phase is _Phase.ENDED
        ):
            return ConnectionState.CLOSED
        if self._session.welcome is None:
            return ConnectionState.HANDSHAKE
        return ConnectionState.OPEN

    @property
    def error(self) -> ProtocolError | None:
        """The error that put the connection in ERROR, if any."""
        return self._error

    @property
    def hello(self) -> Hello | None:
        return self._session.hello

    @property
    def welcome(self) -> Welcome | None:
        return self._session.welcome

    @property
    def features(self) -> frozenset[str]:
        """The features both sides agreed on in WELCOME."""
        return self._session.features

    @property
    def their_heartbeat_seq(self) -> int:
        """The highest HEARTBEAT seq received from the peer (0: none yet): the echo."""
        return max(self._theirs.heartbeat_seq, 0)

    @property
    def unacked(self) -> tuple[int, ...]:
        """Epochs whose CHECKPOINT_END went through but whose ACK has not, oldest first."""
        return tuple(self._primary.completed)

    @property
    def last_epoch(self) -> int | None:
        """The open checkpoint's epoch, else the last one's (``None`` before the first)."""
        return self._primary.epoch

    # -- sending
    def send(self, event: Event) -> bytes:
        """The bytes of one frame for ``event``, after checking it is allowed now."""
        return b"".join(self.send_parts(event))

    def send_parts(self, event: Event) -> list[BytesLike]:
        """Like ``send``, but the frame is returned in pieces; page data is not copied.

        Write the pieces in order (e.g. one ``send_all`` each) before the next frame.
        """
        self._raise_if_failed()
        try:
            return self._send_parts(event)
        except ProtocolError as exc:
            raise self._fail(LocalProtocolError(f"cannot send {exc}")) from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._fail(
                LocalProtocolError(f"cannot send {type(event).__name__}: {exc}")
            ) from exc

    def _send_parts(self, event: Event) -> list[BytesLike]:
        kind = _KIND_OF.get(type(event))
        if kind not in (_FROM_PRIMARY if self._role == "primary" else _FROM_BACKUP):
            raise ProtocolError(f"{type(event).__name__}: a {self._role} does not send it")
        event = self._sign(_byte_views(event))
        header, payload = _header_and_payload(event)
        _check_schema(kind, header)
        raw = msgpack.packb(header, use_bin_type=True)
        payload_len = sum(len(p) for p in payload)
        if len(raw) > MAX_HEADER:
            raise ProtocolError(f"{kind}: header of {len(raw)} bytes exceeds {MAX_HEADER}")
        if payload_len > self._max_payload:
            raise ProtocolError(
                f"{_describe(kind, header)}: payload of {payload_len} bytes"
                f" exceeds the {self._max_payload}-byte limit"
            )
        self._ours.precheck(kind, header, payload_len)
        self._ours.admit(event)
        return _frame(raw, payload)

    def _sign(self, event: Event) -> Event:
        if self._secret is None:
            return event
        if isinstance(event, Hello):
            return replace(event, auth=hello_auth(self._secret, event))
        if isinstance(event, Welcome):
            if self._session.hello is None:
                raise ProtocolError("WELCOME before the primary's HELLO")
            return replace(event, auth=welcome_auth(self._secret, self._session.hello, event))
        return event

    # -- receiving
    def receive_data(self, data: BytesLike) -> None:
        """Buffer bytes from the peer; ``b""`` means EOF.

        The size caps are enforced by ``next_event``: call it until ``NEED_DATA``
        after each chunk, and read the transport in bounded chunks. In ERROR the
        bytes are dropped.
        """
        if self._error is not None:
            return
        if self._eof and data:
            raise RuntimeError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        if self._payload is not None and not self._buffer:
            # The common case for page data: straight into the pending payload.
            with memoryview(data) as view:
                take = self._fill_payload(view)
                if take < len(view):
                    self._buffer += view[take:]
        else:
            self._buffer += data

    def receive_buffer(self) -> memoryview | None:
        """Where the driver may receive the next bytes directly (``recv_into``), then
        report them with ``received_into``; None when there is no payload to fill.

        It saves a copy of every page: the bytes land in the frame's payload buffer.
        """
        if self._error is not None or self._payload is None or self._buffer:
            return None
        return self._payload_room()

    def received_into(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``receive_buffer()``."""
        assert self._payload is not None
        if not 0 <= nbytes <= len(self._payload_room()):
            raise ValueError(f"received_into({nbytes}): out of the receive buffer")
        self._payload_filled += nbytes
        self._hash_arrived()

    def _payload_room(self) -> memoryview:
        """The rest of the payload's current part: a landing frame's pfns go to its
        own small buffer, its page data where ``pages_landing`` put it."""
        assert self._payload is not None
        filled = self._payload_filled
        if not self._landing_asked:
            return memoryview(self._payload)[filled:]
        pages_at = self._pages_at
        assert pages_at is not None
        if filled < pages_at:
            return memoryview(self._payload)[filled:]
        if self._landing is None:
            self._land()
            assert self._landing is not None
        return self._landing[filled - pages_at :]

    def _land(self) -> None:
        """The pfns of a landing frame are in: ask where its pages go."""
        assert self.pages_landing is not None and self._pending is not None
        assert self._payload is not None
        size = self._payload_len - len(self._payload)
        landing = self.pages_landing(self._pending[1]["epoch"], memoryview(self._payload))
        if landing is None:
            landing = self._aligned(size, 0)
        if len(landing) != size:
            raise RuntimeError(f"pages_landing gave {len(landing)} bytes for {size}")
        self._landing = landing

    def _aligned(self, size: int, aligned_at: int) -> memoryview:
        if self.payload_buffers is not None:
            return self.payload_buffers.take(size, aligned_at)
        return page_aligned(size, aligned_at)

    def _fill_payload(self, data: memoryview) -> int:
        """Copy buffered bytes into the pending payload; how many it took."""
        taken = 0
        while taken < len(data) and self._payload_filled < self._payload_len:
            room = self._payload_room()
            take = min(len(room), len(data) - taken)
            room[:take] = data[taken : taken + take]
            self._payload_filled += take
            taken += take
        self._hash_arrived()
        return taken

    def _page_data(self) -> memoryview:
        """The page data part of the pending PAGES payload."""
        assert self._payload is not None and self._pages_at is not None
        if self._landing_asked:
            assert self._landing is not None
            return memoryview(self._landing)  # a view of its own: the caller releases it
        return memoryview(self._payload)[self._pages_at :]

    def _hash_arrived(self) -> None:
        """Feed the page data that arrived since the last call to the frame's running
        checksum, while it is still in the cache (a whole frame read again once it is
        complete comes from memory), in steps of at least _HASH_STEP bytes."""
        if self._pages_at is None or self._payload is None:
            return
        filled, complete = self._payload_filled, self._payload_filled == self._payload_len
        if self._pages_hash is None:
            if filled < self._pages_at:
                return
            with memoryview(self._payload) as view, view[: self._pages_at] as pfns:
                self._pages_hash = impl.Hash64(impl.hash64(pfns))
            self._pages_hashed = self._pages_at
        if filled - self._pages_hashed >= _HASH_STEP or (complete and filled > self._pages_hashed):
            pages_at = self._pages_at
            with self._page_data() as data, data[self._pages_hashed - pages_at :
                                                  filled - pages_at] as part:
                self._pages_hash.update(part)
            self._pages_hashed = filled

    def next_event(self) -> Event | NeedData:
        """The next event from the buffered bytes, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: the peer broke the protocol; the connection is in
                ERROR from now on and every later call raises again.
        """
        self._raise_if_failed()
        try:
            return self._next_event()
        except ProtocolError as exc:
            where = f"frame {self._frames_in + 1} from the {self._peer}"
            raise self._fail(RemoteProtocolError(f"{exc} ({where})")) from None

    def _next_event(self) -> Event | NeedData:
        if self._closed_seen:
            return ConnectionClosed(self._theirs.phase is _Phase.ENDED)
        buf = self._buffer
        if self._pending is None:
            if len(buf) < PREFIX.size:
                return self._need_data()
            header_len, payload_len, check = PREFIX.unpack_from(buf)
            if not 0 < header_len <= MAX_HEADER:
                raise ProtocolError(f"frame header length {header_len} is not in 1..{MAX_HEADER}")
            if payload_len > self._max_payload:
                raise ProtocolError(
                    f"frame payload length {payload_len} exceeds the {self._max_payload}-byte limit"
                )
            end = PREFIX.size + header_len
            if len(buf) < end:
                return self._need_data()
            with memoryview(buf) as view:
                raw = view[PREFIX.size : end]
                try:
                    if impl.hash64(raw, header_len | payload_len << 32) != check:
                        raise ProtocolError("frame header checksum mismatch: the stream is corrupt")
                    kind, header = _decode_header(raw)
                finally:
                    raw.release()
            self._check_incoming_header(kind, header, payload_len)
            del buf[:end]
            self._pending = (kind, header, payload_len)
            # The payload gets a buffer of its own, filled by receive_data or by the
            # driver through receive_buffer(): page data is copied once, not twice.
            # Raw page data may even land where it belongs (pages_landing).
            pages_at = 8 * header["count"] if kind == "PAGES" else 0
            self._pages_at = pages_at if kind == "PAGES" else None
            self._pages_hash = None
            self._payload_len, self._payload_filled = payload_len, 0
            self._landing = None
            self._landing_asked = (kind == "PAGES" and self.pages_landing is not None
                                   and header["codec"] == RAW and payload_len > pages_at)
            if self._landing_asked:
                self._payload = impl.empty_bytearray(pages_at)
            elif payload_len >= _ALIGN_PAYLOAD_FROM:
                self._payload = self._aligned(payload_len, pages_at)
            else:
                self._payload = impl.empty_bytearray(payload_len)
            with memoryview(buf) as view:
                take = self._fill_payload(view)
            del buf[:take]
        kind, header, payload_len = self._pending
        assert self._payload is not None
        if self._payload_filled < payload_len:
            return self._need_data()
        payload = memoryview(self._payload).toreadonly()
        pages_checksum = None if self._pages_hash is None else self._pages_hash.intdigest()
        landed = None if self._landing is None else self._landing.toreadonly()
        self._payload = self._landing = None
        self._payload_filled = self._payload_len = 0
        self._landing_asked = False
        self._pending = None
        self._pages_at = self._pages_hash = None
        event = _event_from(kind, header, payload, pages_checksum, landed)
        self._verify(event)
        self._theirs.admit(event)
        self._frames_in += 1
        return event

    def _check_incoming_header(self, kind: str, header: dict[str, Any], payload_len: int) -> None:
        if kind not in (_FROM_BACKUP if self._role == "primary" else _FROM_PRIMARY):
            raise ProtocolError(f"{kind} from the {self._peer}, which never sends it")
        if kind in ("HELLO", "WELCOME"):
            version = header.get("version")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"{kind}: the {self._peer} speaks protocol version {_short(version)},"
                    f" this {self._role} speaks version {PROTOCOL_VERSION}"
                )
        _check_schema(kind, header)
        if kind not in _WITH_PAYLOAD and payload_len:
            raise ProtocolError(
                f"{_describe(kind, header)}: has a payload of {payload_len} bytes, must have none"
            )
        self._theirs.precheck(kind, header, payload_len)

    def _verify(self, event: Event) -> None:
        if self._secret is None:
            return
        if isinstance(event, Hello):
            expected = hello_auth(self._secret, event)
        elif isinstance(event, Welcome):
            assert self._session.hello is not None
            expected = welcome_auth(self._secret, self._session.hello, event)
        else:
            return
        kind = _KIND_OF[type(event)]
        if event.auth is None:
            raise ProtocolError(f"{kind}: authentication failed: the {self._peer} sent no token")
        if not hmac.compare_digest(event.auth, expected):
            raise ProtocolError(f"{kind}: authentication failed: wrong token")

    def _need_data(self) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._pending is None and not self._buffer:
            self._closed_seen = True
            return ConnectionClosed(self._theirs.phase is _Phase.ENDED)
        if self._pending is not None:
            kind, header, payload_len = self._pending
            raise ProtocolError(
                f"connection closed inside {_describe(kind, header)}: got"
                f" {self._payload_filled} of {payload_len} payload bytes"
            )
        raise ProtocolError(
            f"connection closed inside a frame: {len(self._buffer)} bytes of it arrived"
        )

    # -- errors
    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._error = exc
        self._buffer.clear()
        self._pending = None
        self._payload = self._landing = None
        self._payload_filled = self._payload_len = 0
        self._landing_asked = False
        self._pages_at = self._pages_hash = None
        return exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise type(self._error)(f"connection is in ERROR after: {self._error}")


@final
class PrimaryConnection(_Connection):
    """The primary's end: sends HELLO then checkpoints; receives WELCOME, ACK, ...

    Args:
        secret: shared secret; HELLO is signed with it and WELCOME must prove it.
        max_payload: largest frame payload accepted (the backup sends none).
        max_ram_size: largest ``ram_size`` this side accepts in a HELLO.
    """

    _role = "primary"
    _peer = "backup"

    @property
    def _ours(self) -> _PrimaryRules:
        return self._primary

    @property
    def _theirs(self) -> _BackupRules:
        return self._backup


@final
class BackupConnection(_Connection):
    """The backup's end: receives HELLO and checkpoints; sends WELCOME, ACK, ...

    Args:
        secret: shared secret; HELLO must prove it, WELCOME is signed with it.
        max_payload: largest frame payload accepted, checked before it is buffered.
        max_ram_size: largest ``ram_size`` accepted in HELLO (it bounds staging memory).
    """

    _role = "backup"
    _peer = "primary"

    @property
    def _ours(self) -> _BackupRules:
        return self._backup

    @property
    def _theirs(self) -> _PrimaryRules:
        return self._primary


# -- staging on the backup ------------------------------------------------------------


@final
class CompleteCheckpoint:
    """A verified checkpoint, decoded, ready to be applied to the replica.

    Applying is the engine's job: ``impl.scatter(replica, pfns, data, page_size)`` for
    each of ``batches``, then the state. The batches are the received frames' own
    buffers (raw pages are never copied on the way) or the decoded delta pages; they
    are read-only and stay valid as long as this object.
    """

    __slots__ = ("applied", "batches", "digest", "epoch", "full", "page_count", "ram_digest",
                 "state")

    def __init__(self, *, epoch: int, full: bool,
                 batches: tuple[tuple[memoryview, memoryview], ...], state: bytes,
                 digest: int | None, ram_digest: int | None = None,
                 applied: bool = False, page_count: int | None = None) -> None:
        self.epoch = epoch
        self.page_count = (page_count if page_count is not None
                           else sum(len(p) for p, _ in batches) // 8)
        #: The pages are already in the replica (``CheckpointStager.write_through``);
        #: ``batches`` is then empty.
        self.applied = applied
        self.full = full
        #: (little-endian u64 pfns, ``page_size`` bytes per page), in pfn order.
        self.batches = batches
        self.state = state
        #: The digest that was verified, or ``None`` if the primary sent none.
        self.digest = digest
        #: ``hash64`` of the primary's RAM at this checkpoint: after applying, the
        #: replica must hash the same (checked by the engine), or ``None``.
        self.ram_digest = ram_digest

    @property
    def pfns(self) -> memoryview:
        """All pfns, strictly ascending (joined: a copy)."""
        return memoryview(b"".join(p for p, _ in self.batches)).toreadonly()

    @property
    def data(self) -> memoryview:
        """All decoded pages in the order of ``pfns`` (joined: a copy)."""
        return memoryview(b"".join(d for _, d in self.batches)).toreadonly()

    @property
    def pages(self) -> int:
        return self.page_count


@final
class CheckpointStager:
    """Collects one checkpoint at a time and releases it only whole and verified.

    Delta pages are decoded as they arrive, against ``replica`` (read, never written),
    so memory stays bounded: at most ``len(replica)`` bytes of pages and ``max_state``
    bytes of state per checkpoint. A ``ProtocolError`` discards the open checkpoint.

    Feed it the checkpoint events a ``BackupConnection`` produced, which has already
    checked order, bounds and checksums; the stager re-checks what bounds its memory.
    """

    def __init__(
        self,
        replica: BytesLike,
        *,
        page_size: int = 4096,
        max_state: int = DEFAULT_MAX_STATE,
    ) -> None:
        view = memoryview(replica)
        if view.nbytes % page_size:
            raise ValueError(f"replica size {view.nbytes} is not a multiple of {page_size}")
        self._replica = view.cast("B") if view.format != "B" else view
        self._page_size = page_size
        self._ram_pages = view.nbytes // page_size
        self._max_state = max_state
        self._epoch: int | None = None
        self._full = False
        self._batches: list[tuple[memoryview, memoryview]] = []
        self._staged_pages = 0
        self._state: bytes | None = None
        #: Write pages into the replica as they arrive instead of staging them. Only
        #: for a replica that holds nothing worth keeping yet (before the first
        #: complete checkpoint): a checkpoint that never completes leaves it partly
        #: written, and there was nothing to fail over to anyway. It saves holding a
        #: whole RAM's worth of pages for the first (full) checkpoint.
        self.write_through = False
        self._written_pfns = bytearray()
        self._scratch = bytearray()
        self._landed: bytes | None = None

    def landing(self, epoch: int, pfns: memoryview) -> memoryview | None:
        """``BackupConnection.pages_landing``: while writing through, the replica's own
        pages for a frame of consecutive pfns (a full checkpoint's), so that they are
        received straight into it; None otherwise."""
        count = len(pfns) // 8
        if not self.write_through or epoch != self._epoch or count == 0:
            return None
        first = int.from_bytes(pfns[:8], "little")
        last = int.from_bytes(pfns[8 * count - 8 : 8 * count], "little")
        # Strictly ascending and spanning count pages: consecutive.
        if last - first != count - 1 or not impl.pfns_ascending_below(pfns, self._ram_pages):
            return None
        self._landed = bytes(pfns)
        ps = self._page_size
        return self._replica[first * ps : (last + 1) * ps]

    @property
    def open_epoch(self) -> int | None:
        """The epoch being staged, if a checkpoint is open."""
        return self._epoch

    def abort(self) -> None:
        """Drop the open checkpoint (on END, or when the stream is lost)."""
        self._epoch = None
        self._batches = []
        self._staged_pages = 0
        self._state = None
        self._written_pfns = bytearray()
        self._landed = None

    def feed(self, event: CheckpointEvent) -> CompleteCheckpoint | None:
        """Stage one event; on a valid CHECKPOINT_END, return the complete checkpoint.

        Raises:
            ProtocolError: out of order, too big, undecodable, or a digest mismatch;
                the open checkpoint is discarded.
        """
        try:
            return self._feed(event)
        except ProtocolError:
            self.abort()
            raise

    def _feed(self, event: CheckpointEvent) -> CompleteCheckpoint | None:
        kind = _KIND_OF[type(event)]
        what = f"{kind} for epoch {event.epoch}"
        if isinstance(event, CheckpointBegin):
            if self._epoch is not None:
                raise ProtocolError(f"{what} while checkpoint {self._epoch} is being staged")
            self.abort()
            self._epoch, self._full = event.epoch, event.full
            return None
        if self._epoch != event.epoch:
            raise ProtocolError(f"{what}: the staged checkpoint is {self._epoch}")
        if isinstance(event, Pages):
            self._add_pages(what, event)
            return None
        if isinstance(event, State):
            if self._state is not None:
                raise ProtocolError(f"{what}: second STATE")
            if len(event.state) > self._max_state:
                raise ProtocolError(
                    f"{what}: {len(event.state)} bytes of state exceed the {self._max_state}-byte limit"
                )
            self._state = bytes(event.state)
            return None
        return self._finish(what, event)

    def _add_pages(self, what: str, pages: Pages) -> None:
        if self._state is not None:
            raise ProtocolError(f"{what} after STATE")
        count = len(pages.pfns) // 8
        staged = self._staged_pages
        if count * 8 != len(pages.pfns) or staged + count > self._ram_pages:
            raise ProtocolError(
                f"{what}: {staged} + {count} pages exceed the replica's {self._ram_pages}"
            )
        size = count * self._page_size
        pfns = memoryview(pages.pfns).toreadonly()
        if self.write_through:
            self._write_through(what, pages, pfns, size)
            self._staged_pages += count
            return
        if pages.codec == RAW and len(pages.data) == size:
            data = memoryview(pages.data).toreadonly()  # the frame's own buffer: no copy
        else:
            out = page_aligned(size)
            try:
                decode_into(pages.codec, pages.data, pages.pfns, self._replica, out,
                            self._page_size)
            except ValueError as exc:
                raise ProtocolError(f"{what}: {pages.codec} data does not decode: {exc}") from None
            data = out.toreadonly()
        self._batches.append((pfns, data))
        self._staged_pages += count

    def _write_through(self, what: str, pages: Pages, pfns: memoryview, size: int) -> None:
        landed, self._landed = self._landed, None
        if landed is not None and pages.codec == RAW and pfns == landed:
            self._written_pfns += pfns  # received straight into the replica
            return
        data: BytesLike = pages.data
        if not (pages.codec == RAW and len(pages.data) == size):
            if len(self._scratch) < size:
                self._scratch = bytearray(size)
            out = memoryview(self._scratch)[:size]
            try:
                decode_into(pages.codec, pages.data, pages.pfns, self._replica, out,
                            self._page_size)
            except ValueError as exc:
                raise ProtocolError(f"{what}: {pages.codec} data does not decode: {exc}") from None
            data = out
        impl.scatter(self._replica, pfns, data, self._page_size)
        self._written_pfns += pfns

    def _finish(self, what: str, end: CheckpointEnd) -> CompleteCheckpoint:
        if self._state is None:
            raise ProtocolError(f"{what} before STATE")
        pages = self._staged_pages
        if end.pages != pages:
            raise ProtocolError(f"{what}: says {end.pages} pages, {pages} were staged")
        if self._full and pages != self._ram_pages:
            raise ProtocolError(f"{what}: full checkpoint has {pages} of {self._ram_pages} pages")
        done = CompleteCheckpoint(
            epoch=end.epoch,
            full=self._full,
            batches=tuple(self._batches),
            state=self._state,
            digest=end.digest,
            ram_digest=end.ram_digest,
            applied=self.write_through,
            page_count=pages,
        )
        if end.digest is not None:
            if self.write_through:
                written = bytearray(pages * self._page_size)
                impl.gather(self._replica, self._written_pfns, written, self._page_size)
                digest = checkpoint_digest(self._written_pfns, written, self._state)
            else:
                digest = checkpoint_digest(done.pfns, done.data, self._state)
            if digest != end.digest:
                raise ProtocolError(
                    f"{what}: digest mismatch (primary {end.digest:#018x}, staged pages give"
                    f" {digest:#018x}); the checkpoint is discarded"
                )
        self._epoch = None
        self._batches, self._staged_pages, self._state = [], 0, None
        self._written_pfns = bytearray()
        return done
