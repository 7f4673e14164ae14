"""The wire protocol: framing, both roles' rules, staging, and what bad input does.

The invariant behind most of these tests: a malformed,
truncated, oversized, out-of-order or unauthenticated frame is a ProtocolError with a
precise message, and never changes the replica.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tremus.accel import impl
from tremus.engine.protocol import (
    DEFAULT_MAX_PAYLOAD,
    MAX_HEADER,
    NEED_DATA,
    PREFIX,
    PROTOCOL_VERSION,
    Ack,
    BackupConnection,
    CheckpointBegin,
    CheckpointEnd,
    CheckpointStager,
    CompleteCheckpoint,
    ConnectionClosed,
    ConnectionState,
    End,
    Event,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Pages,
    PrimaryConnection,
    ProtocolError,
    RemoteProtocolError,
    State,
    Welcome,
    checkpoint_digest,
    encode_frame,
)
from tremus.transports.codec import (
    MAX_BATCH_PAGES,
    DeltaCodec,
    PageCodec,
    RawCodec,
    split_batches,
)

PS = 512  # small pages keep the exhaustive tests fast
RAM_PAGES = 48
SECRET = b"correct horse battery staple"

hypothesis_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def pfn_bytes(pfns: Iterable[int]) -> bytes:
    return b"".join(struct.pack("<Q", p) for p in pfns)


def events_of(conn: PrimaryConnection | BackupConnection) -> list[Event]:
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


def hello(**overrides: object) -> Hello:
    fields: dict[str, object] = {
        "driver": "microvm",
        "ram_size": RAM_PAGES * PS,
        "page_size": PS,
        "config": {"vcpus": 1, "workload": "counter", "nested": {"b": [1, 2], "a": b"x"}},
        "features": ("delta", "future-thing"),
    }
    fields.update(overrides)
    return Hello(**fields)  # type: ignore[arg-type]


@dataclass
class Primary:
    """A primary's RAM, its connection and codec; produces wire bytes."""

    codec_name: str = "raw"
    secret: bytes | None = None
    digest: bool = True
    seed: int = 1
    ram: bytearray = field(init=False)
    conn: PrimaryConnection = field(init=False)
    codec: PageCodec = field(init=False)
    epoch: int = 0

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.ram = bytearray(rng.randbytes(RAM_PAGES * PS))
        self.ram[3 * PS : 5 * PS] = bytes(2 * PS)  # some zero pages
        self.conn = PrimaryConnection(secret=self.secret)
        self.codec = DeltaCodec(64, PS) if self.codec_name == "delta" else RawCodec(PS)
        self.rng = rng

    def hello(self) -> bytes:
        return self.conn.send(hello())

    def dirty(self, count: int) -> list[int]:
        """Change ``count`` random pages a little (deltas) or a lot; return them sorted."""
        pfns = sorted(self.rng.sample(range(RAM_PAGES), count))
        for pfn in pfns:
            base = pfn * PS
            if self.rng.random() < 0.5:
                self.ram[base + 8 : base + 16] = self.rng.randbytes(8)
            else:
                self.ram[base : base + PS] = self.rng.randbytes(PS)
        return pfns

    def checkpoint(self, pfns: Sequence[int] | None = None, batch: int = 16) -> bytes:
        """The frames of the next checkpoint (all of RAM the first time)."""
        full = self.epoch == 0 or pfns is None
        if full:
            pfns = range(RAM_PAGES)
        assert pfns is not None
        self.epoch += 1
        pfn_list = pfn_bytes(pfns)
        staged = bytearray(len(pfns) * PS)
        impl.gather(self.ram, pfn_list, staged, PS)
        state = b"vcpu-state-%d" % self.epoch
        out = [self.conn.send(CheckpointBegin(self.epoch, full))]
        total = 0
        for pv, dv in split_batches(pfn_list, staged, PS, batch):
            data = self.codec.encode(dv, pv)
            total += len(data)
            out.append(self.conn.send(Pages(self.epoch, pv, data, self.codec.name)))
        digest = checkpoint_digest(pfn_list, staged, state) if self.digest else None
        out.append(self.conn.send(State(self.epoch, state)))
        out.append(self.conn.send(CheckpointEnd(self.epoch, len(pfns), total, digest)))
        return b"".join(out)


@dataclass
class Backup:
    """A backup: connection, stager, replica; applies complete checkpoints and acks."""

    secret: bytes | None = None
    replica: bytearray = field(default_factory=lambda: bytearray(RAM_PAGES * PS))
    conn: BackupConnection = field(init=False)
    stager: CheckpointStager = field(init=False)
    applied: list[CompleteCheckpoint] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    to_primary: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.conn = BackupConnection(secret=self.secret)
        self.stager = CheckpointStager(self.replica, page_size=PS)

    def eof(self) -> None:
        self.conn.receive_data(b"")
        self.feed(b"")

    def feed(self, data: bytes) -> None:
        """Process ``data`` (``b""``: just what is buffered)."""
        if data:
            self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not NEED_DATA:
            self.events.append(event)
            match event:
                case Hello():
                    features = tuple(f for f in event.features if f == "delta")
                    self.to_primary += self.conn.send(Welcome(features=features))
                case CheckpointBegin() | Pages() | State() | CheckpointEnd():
                    done = self.stager.feed(event)
                    if done is not None:
                        impl.scatter(self.replica, done.pfns, done.data, PS)
                        self.applied.append(done)
                        self.to_primary += self.conn.send(Ack(done.epoch))
                case ConnectionClosed():
                    return


def connected(codec: str = "raw", secret: bytes | None = None) -> tuple[Primary, Backup]:
    primary, backup = Primary(codec, secret), Backup(secret)
    backup.feed(primary.hello())
    primary.conn.receive_data(bytes(backup.to_primary))
    backup.to_primary.clear()
    assert isinstance(events_of(primary.conn)[0], Welcome)
    return primary, backup


def wire(codec: str = "raw", epochs: int = 2, batch: int = 16) -> tuple[bytes, list[int]]:
    """A primary's whole byte stream (HELLO + checkpoints) and where each checkpoint ends."""
    primary, backup = Primary(codec), Backup()
    out = primary.hello()
    backup.feed(out)
    primary.conn.receive_data(bytes(backup.to_primary))
    events_of(primary.conn)
    ends = []
    for _ in range(epochs):
        out += primary.checkpoint(None if primary.epoch == 0 else primary.dirty(7), batch)
        ends.append(len(out))
    return out, ends


def header_frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    """A frame with an arbitrary header, built from the spec (correct header check)."""
    raw = msgpack.packb(header, use_bin_type=True)
    check = impl.hash64(raw, len(raw) | len(payload) << 32)
    return PREFIX.pack(len(raw), len(payload), check) + raw + payload


def frame_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    while pos < len(data):
        header_len, payload_len, _ = PREFIX.unpack_from(data, pos)
        pos += PREFIX.size + header_len + payload_len
        ends.append(pos)
    return ends


# -- round trips ----------------------------------------------------------------------


def test_every_frame_round_trips() -> None:
    p, b = PrimaryConnection(), BackupConnection()

    def p2b(event: Event) -> Event:
        b.receive_data(p.send(event))
        (got,) = events_of(b)
        assert got == event
        return got

    def b2p(event: Event) -> Event:
        p.receive_data(b.send(event))
        (got,) = events_of(p)
        assert got == event
        return got

    got_hello = p2b(hello())
    assert isinstance(got_hello, Hello)
    assert got_hello.config["nested"] == {"b": [1, 2], "a": b"x"}
    b2p(Welcome(features=("delta",)))
    assert p.features == b.features == {"delta"}
    assert p.state is b.state is ConnectionState.OPEN
    p2b(Heartbeat(0, 12.5))
    b2p(Heartbeat(7, 13.0))
    p2b(CheckpointBegin(10, full=True))
    ram = random.Random(2).randbytes(RAM_PAGES * PS)
    pfns = pfn_bytes(range(RAM_PAGES))
    got = p2b(Pages(10, pfns[: 8 * 20], ram[: 20 * PS]))
    assert isinstance(got, Pages) and got.checksum == impl.hash64(
        ram[: 20 * PS], impl.hash64(pfns[: 8 * 20])
    )
    codec = DeltaCodec(16, PS)
    data = codec.encode(ram[20 * PS :], pfns[8 * 20 :])
    p2b(Pages(10, pfns[8 * 20 :], data, "delta"))
    p2b(State(10, b"\x00state\xff"))
    p2b(CheckpointEnd(10, RAM_PAGES, 20 * PS + len(data), digest=2**64 - 1))
    assert b.unacked == p.unacked == (10,)
    b2p(Ack(10))
    assert b.unacked == p.unacked == ()
    p2b(End("operator asked"))
    b.receive_data(b"")
    assert events_of(b) == [ConnectionClosed(clean=True)]
    assert b.state is ConnectionState.CLOSED


def test_encode_frame_matches_send() -> None:
    p = PrimaryConnection()
    assert p.send(hello()) == encode_frame(hello())


def test_send_parts_do_not_copy_page_data() -> None:
    primary, _ = connected()
    data = bytearray(PS * RAM_PAGES)
    primary.conn.send(CheckpointBegin(1, True))
    parts = primary.conn.send_parts(Pages(1, pfn_bytes(range(RAM_PAGES)), data))
    assert parts[-1] is data


@pytest.mark.parametrize("codec", ["raw", "delta"])
@pytest.mark.parametrize("secret", [None, SECRET])
def test_checkpoints_rebuild_ram_exactly(codec: str, secret: bytes | None) -> None:
    primary, backup = connected(codec, secret)
    sent = 0
    for epoch in range(1, 9):
        pfns = None if epoch == 1 else primary.dirty(random.Random(epoch).randint(1, 20))
        data = primary.checkpoint(pfns)
        sent += len(data)
        # Deliver in odd-sized pieces, as a socket would.
        for i in range(0, len(data), 997):
            backup.feed(data[i : i + 997])
        assert backup.replica == primary.ram
        primary.conn.receive_data(bytes(backup.to_primary))
        backup.to_primary.clear()
        assert events_of(primary.conn) == [Ack(epoch)]
        assert primary.conn.unacked == ()
    assert [cp.epoch for cp in backup.applied] == list(range(1, 9))
    assert backup.applied[0].full and not backup.applied[1].full
    if codec == "delta":  # small changes and zero pages code small
        assert sent < 0.8 * (RAM_PAGES + 7 * 10) * PS


def test_several_checkpoints_in_flight_are_acked_in_order() -> None:
    primary, backup = connected()
    for _ in range(3):
        backup.feed(primary.checkpoint(None if primary.epoch == 0 else primary.dirty(3)))
    assert primary.conn.unacked == (1, 2, 3)
    primary.conn.receive_data(bytes(backup.to_primary))
    assert events_of(primary.conn) == [Ack(1), Ack(2), Ack(3)]


# -- truncation -----------------------------------------------------------------------


def replay(data: bytes, chunks: Iterable[int] = ()) -> Backup:
    backup = Backup()
    pos = 0
    for size in chunks:
        backup.feed(data[pos : pos + size])
        pos += size
    backup.feed(data[pos:])
    return backup


@pytest.mark.parametrize("codec", ["raw", "delta"])
def test_truncation_at_every_byte_gives_need_data_never_a_wrong_event(codec: str) -> None:
    """Every byte near a frame boundary (each header and trailer field, every offset
    of each), and every 61st byte inside the page payloads, which all look alike."""
    data, _ = wire(codec, epochs=2, batch=24)
    whole = replay(data)
    expected, final_replica = whole.events, bytes(whole.replica)
    assert len(whole.applied) == 2
    near = {cut for end in BOUNDARIES[codec] for cut in range(end - 256, end + 256)}
    cuts = sorted((near | set(range(0, len(data), 61))) & set(range(len(data))))
    for cut in cuts:
        backup = Backup()
        backup.feed(data[:cut])
        assert backup.conn.next_event() is NEED_DATA
        assert backup.events == expected[: len(backup.events)]
        applied = len(backup.applied)
        backup.feed(data[cut:])
        assert backup.events == expected
        assert len(backup.applied) == 2 and bytes(backup.replica) == final_replica
        if cut % 61 == 0:  # EOF inside a frame is an error; at a boundary it is not
            cut_backup = Backup()
            cut_backup.feed(data[:cut])
            snapshot = bytes(cut_backup.replica)
            cut_backup.conn.receive_data(b"")
            if cut in BOUNDARIES[codec]:
                assert cut_backup.conn.next_event() == ConnectionClosed(clean=False)
            else:
                with pytest.raises(RemoteProtocolError, match="connection closed inside"):
                    cut_backup.conn.next_event()
            assert bytes(cut_backup.replica) == snapshot
            assert len(cut_backup.applied) == applied


@hypothesis_settings
@given(st.data())
def test_any_chunking_gives_the_same_events(data: st.DataObject) -> None:
    stream, _ = WIRE_DELTA
    sizes = data.draw(st.lists(st.integers(0, 3000), max_size=30))
    backup = replay(stream, sizes)
    assert backup.events == REFERENCE_DELTA.events
    assert backup.replica == REFERENCE_DELTA.replica


WIRE_DELTA = wire("delta", epochs=3)
BOUNDARIES = {
    codec: {0, *frame_ends(wire(codec, epochs=2, batch=24)[0])} for codec in ("raw", "delta")
}
REFERENCE_DELTA = replay(WIRE_DELTA[0])


# -- corruption -----------------------------------------------------------------------


@hypothesis_settings
@given(
    codec=st.sampled_from(["raw", "delta"]),
    where=st.floats(0, 1, exclude_max=True),
    xor=st.integers(1, 255),
)
def test_any_corrupt_byte_is_an_error_and_never_applied(codec: str, where: float, xor: int) -> None:
    stream, ends = WIRES[codec]
    index = int(where * len(stream))
    corrupt = bytearray(stream)
    corrupt[index] ^= xor
    backup = Backup()
    snapshots = [bytes(backup.replica)]
    with pytest.raises(ProtocolError) as info:
        for i in range(0, len(corrupt), 4096):
            backup.feed(bytes(corrupt[i : i + 4096]))
            if len(backup.applied) == len(snapshots):
                snapshots.append(bytes(backup.replica))
        backup.eof()  # a stalled frame is an error too
    # Only checkpoints that ended before the corrupt byte were applied ...
    intact = sum(1 for end in ends if end <= index)
    assert len(backup.applied) == intact
    # ... and the replica is exactly what they made it.
    assert bytes(backup.replica) == REPLICAS[codec][intact]
    assert backup.conn.state is ConnectionState.ERROR
    message = str(info.value)
    assert any(
        word in message
        for word in ("checksum", "closed inside", "length", "not valid", "unknown frame type")
    ), message


WIRES = {codec: wire(codec, epochs=3) for codec in ("raw", "delta")}


def _replicas(codec: str) -> list[bytes]:
    stream, ends = WIRES[codec]
    out = [bytes(RAM_PAGES * PS)]
    backup = Backup()
    start = 0
    for end in ends:
        backup.feed(stream[start:end])
        out.append(bytes(backup.replica))
        start = end
    return out


REPLICAS = {codec: _replicas(codec) for codec in ("raw", "delta")}


@hypothesis_settings
@given(st.binary(max_size=400))
def test_garbage_is_only_ever_a_protocol_error(garbage: bytes) -> None:
    for prefix in (b"", WIRE_DELTA[0][: WIRE_DELTA[1][0]]):
        backup = Backup()
        try:
            backup.feed(prefix + garbage)
            backup.eof()
        except ProtocolError:
            pass
        assert len(backup.applied) == (1 if prefix else 0)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**64 - 1), max_size=2),
)
_field_names = st.sampled_from(
    ["epoch", "full", "count", "codec", "checksum", "pages", "bytes", "digest", "seq", "time"]
    + ["reason", "version", "features", "auth", "role", "driver", "config", "x"]
)
_kinds = st.sampled_from(
    ["HELLO", "WELCOME", "CHECKPOINT_BEGIN", "PAGES", "STATE", "CHECKPOINT_END"]
    + ["ACK", "HEARTBEAT", "END", "NOPE", 3]
)


@hypothesis_settings
@given(
    kind=_kinds,
    fields=st.dictionaries(_field_names, _values, max_size=6),
    payload=st.binary(max_size=64),
)
def test_well_framed_nonsense_headers_are_protocol_errors(
    kind: object, fields: dict[str, object], payload: bytes
) -> None:
    backup = Backup()
    backup.feed(WIRE_DELTA[0][: WIRE_DELTA[1][0]])
    snapshot = bytes(backup.replica)
    try:
        backup.feed(header_frame({"type": kind, **fields}, payload))
    except ProtocolError:
        assert backup.conn.state is ConnectionState.ERROR
    assert bytes(backup.replica) == snapshot
    assert len(backup.applied) == 1


# -- order ----------------------------------------------------------------------------


def backup_after_first_checkpoint() -> tuple[Primary, Backup]:
    primary, backup = connected("delta")
    backup.feed(primary.checkpoint())
    assert len(backup.applied) == 1
    return primary, backup


def _order_case() -> tuple[bytes, list[bytes], list[bytes]]:
    primary = Primary("delta")
    backup = Backup()
    prefix = primary.hello()
    backup.feed(prefix)
    primary.conn.receive_data(bytes(backup.to_primary))
    events_of(primary.conn)
    prefix += primary.checkpoint()
    stream = primary.checkpoint(primary.dirty(12), batch=8)  # BEGIN PAGES PAGES STATE END
    stream += primary.checkpoint(primary.dirty(5), batch=8)  # BEGIN PAGES STATE END
    starts = [0, *frame_ends(stream)]
    frames = [stream[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    assert len(frames) == 9, len(frames)
    backup = Backup()
    backup.feed(prefix)
    replicas = [bytes(backup.replica)]
    for i, frame in enumerate(frames):
        backup.feed(frame)
        if i in (4, 8):
            replicas.append(bytes(backup.replica))
    return prefix, frames, replicas


ORDER_PREFIX, ORDER_FRAMES, ORDER_REPLICAS = _order_case()


@hypothesis_settings
@given(st.lists(st.integers(0, 8), max_size=12))
def test_frames_in_any_other_order_are_never_applied(order: list[int]) -> None:
    """Epochs 2 and 3 as frames in any order, with repeats and omissions.

    A checkpoint is applied only if all its frames came, in order; an END that
    follows a frame out of place is always an error (some orders merely stall,
    e.g. BEGIN then STATE: a checkpoint may have no pages, and waits for its END).
    """
    backup = Backup()
    backup.feed(ORDER_PREFIX)
    good = 0
    while good < len(order) and order[good] == good:
        good += 1
    try:
        backup.feed(b"".join(ORDER_FRAMES[i] for i in order))
        raised = False
    except RemoteProtocolError:
        raised = True
    complete = 1 + (good >= 5) + (good >= 9)
    assert len(backup.applied) == complete
    assert bytes(backup.replica) == ORDER_REPLICAS[complete - 1]
    if good == len(order):
        assert not raised
    elif any(i in (4, 8) for i in order[good:]):
        assert raised


def expect_error(backup: Backup, frames: Sequence[bytes], match: str) -> None:
    snapshot = bytes(backup.replica)
    applied = len(backup.applied)
    with pytest.raises(RemoteProtocolError, match=match):
        for frame in frames:
            backup.feed(frame)
    assert bytes(backup.replica) == snapshot
    assert len(backup.applied) == applied
    assert backup.conn.state is ConnectionState.ERROR
    # ... and stays there.
    with pytest.raises(RemoteProtocolError, match="ERROR"):
        backup.conn.next_event()
    with pytest.raises(RemoteProtocolError, match="ERROR"):
        backup.conn.send(Heartbeat(99, 0.0))


def page_frame(epoch: int, pfns: Sequence[int], data: bytes | None = None) -> bytes:
    return encode_frame(Pages(epoch, pfn_bytes(pfns), data or bytes(len(pfns) * PS)))


def state_frame(epoch: int) -> bytes:
    return encode_frame(State(epoch, b"s"))


BEGIN2 = encode_frame(CheckpointBegin(2))


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([page_frame(2, [1])], r"PAGES for epoch 2 outside a checkpoint \(no CHECKPOINT_BEGIN\)"),
        ([state_frame(2)], "STATE for epoch 2 outside a checkpoint"),
        ([BEGIN2, state_frame(2), state_frame(2)], "STATE for epoch 2: second STATE"),
        ([BEGIN2, page_frame(2, [1]), encode_frame(CheckpointEnd(2, 1, PS))], "before STATE"),
        ([BEGIN2, state_frame(2), page_frame(2, [1])], "PAGES for epoch 2 after STATE"),
        ([encode_frame(CheckpointBegin(3))], "epoch skips ahead; expected epoch 2"),
        ([encode_frame(CheckpointBegin(1))], "epoch goes back; expected epoch 2"),
        ([BEGIN2, BEGIN2], "CHECKPOINT_BEGIN for epoch 2 while checkpoint 2 is still open"),
        ([BEGIN2, page_frame(3, [1])], "PAGES for epoch 3 inside checkpoint 2"),
        ([BEGIN2, page_frame(2, [RAM_PAGES])], f"pfn {RAM_PAGES} .* out of range"),
        ([BEGIN2, page_frame(2, [2**64 - 1])], "out of range: RAM has 48 pages"),
        ([BEGIN2, page_frame(2, [5, 5])], "pfn 5 .*index 1.* does not follow pfn 5"),
        ([BEGIN2, page_frame(2, [5, 3])], "strictly ascending"),
        ([BEGIN2, page_frame(2, [5]), page_frame(2, [4])], "does not follow pfn 5 of the prev"),
        (
            [BEGIN2, page_frame(2, [1], b"short"), state_frame(2)],
            r"payload of 13 bytes does not fit 1 pfns \(8 bytes\) and raw data \(512 bytes\)",
        ),
        (
            [BEGIN2, page_frame(2, [1]), state_frame(2), encode_frame(CheckpointEnd(2, 2, PS))],
            "CHECKPOINT_END for epoch 2: says 2 pages, the checkpoint had 1",
        ),
        (
            [BEGIN2, page_frame(2, [1]), state_frame(2), encode_frame(CheckpointEnd(2, 1, 7))],
            "says 7 page data bytes, the checkpoint had 512",
        ),
        (
            [
                encode_frame(CheckpointBegin(2, full=True)),
                page_frame(2, [1]),
                state_frame(2),
                encode_frame(CheckpointEnd(2, 1, PS)),
            ],
            "a full checkpoint must carry all 48 pages, this one had 1",
        ),
        ([encode_frame(hello())], "second HELLO"),
        ([encode_frame(Ack(1))], "ACK from the primary, which never sends it"),
        ([encode_frame(Welcome())], "WELCOME from the primary"),
        ([encode_frame(End("bye")), BEGIN2], "CHECKPOINT_BEGIN for epoch 2 after END"),
        (
            [encode_frame(Heartbeat(5, 1.0)), encode_frame(Heartbeat(5, 2.0))],
            "HEARTBEAT seq 5 does not increase",
        ),
        (
            [header_frame({"type": "CHECKPOINT_BEGIN", "epoch": 2, "full": False, "x": 2})],
            "unexpected header field",
        ),
        (
            [header_frame({"type": "CHECKPOINT_BEGIN", "full": False})],
            "CHECKPOINT_BEGIN: header field 'epoch' is missing",
        ),
        (
            [header_frame({"type": "CHECKPOINT_BEGIN", "epoch": -1, "full": True})],
            r"must be an integer in \[0, 2\*\*64\)",
        ),
        ([header_frame({"type": "BOGUS"})], "unknown frame type 'BOGUS'"),
        ([header_frame({"type": "END", "reason": "x"}, b"p")], "END: has a payload of 1 bytes"),
        ([PREFIX.pack(3, 0, 0) + b"abc"], "frame header checksum mismatch"),
    ],
)
def test_out_of_order_and_malformed_frames(frames: list[bytes], match: str) -> None:
    _, backup = backup_after_first_checkpoint()
    expect_error(backup, frames, match)


def test_first_checkpoint_must_be_full() -> None:
    _, backup = connected()
    expect_error(backup, [encode_frame(CheckpointBegin(1))], "the first checkpoint must be full")


def test_checkpoint_before_welcome() -> None:
    backup = Backup()
    backup.conn.receive_data(encode_frame(hello()))
    assert isinstance(backup.conn.next_event(), Hello)  # not answered yet
    expect_error(backup, [encode_frame(CheckpointBegin(1, True))], "before the backup's WELCOME")


def test_first_frame_must_be_hello() -> None:
    expect_error(Backup(), [encode_frame(CheckpointBegin(1, True))], "before HELLO")


def test_delta_needs_negotiation() -> None:
    primary = Primary("delta")
    backup = Backup()
    backup.conn.receive_data(primary.conn.send(hello(features=())))
    events_of(backup.conn)
    backup.conn.send(Welcome())
    frames = [
        encode_frame(CheckpointBegin(1, True)),
        encode_frame(Pages(1, pfn_bytes([0]), b"\1", "delta")),
    ]
    expect_error(backup, frames, "codec 'delta' was not negotiated")


def test_undecodable_delta_with_a_good_checksum_is_not_staged() -> None:
    _, backup = backup_after_first_checkpoint()
    bad = b"\x03\x01\x00\xff\xff\x01\x00abcd"  # a run past the end of the page
    frames = [BEGIN2, encode_frame(Pages(2, pfn_bytes([1]), bad, "delta"))]
    snapshot = bytes(backup.replica)
    with pytest.raises(ProtocolError, match="PAGES for epoch 2: delta data does not decode"):
        for frame in frames:
            backup.feed(frame)
    assert bytes(backup.replica) == snapshot
    assert backup.stager.open_epoch is None


def test_digest_mismatch_is_not_applied() -> None:
    _, backup = backup_after_first_checkpoint()
    frames = [BEGIN2, page_frame(2, [1]), state_frame(2)]
    frames.append(encode_frame(CheckpointEnd(2, 1, PS, digest=12345)))
    snapshot = bytes(backup.replica)
    with pytest.raises(ProtocolError, match="CHECKPOINT_END for epoch 2: digest mismatch"):
        for frame in frames:
            backup.feed(frame)
    assert bytes(backup.replica) == snapshot and len(backup.applied) == 1


def test_state_over_the_cap_is_not_staged() -> None:
    replica = bytearray(RAM_PAGES * PS)
    stager = CheckpointStager(replica, page_size=PS, max_state=4)
    stager.feed(CheckpointBegin(1, True))
    with pytest.raises(ProtocolError, match="5 bytes of state exceed the 4-byte limit"):
        stager.feed(State(1, b"12345"))
    assert stager.open_epoch is None and replica == bytes(len(replica))


# -- sizes ----------------------------------------------------------------------------


@hypothesis_settings
@given(
    header_len=st.integers(MAX_HEADER + 1, 2**32 - 1) | st.just(0),
    payload_len=st.integers(0, 2**32 - 1),
)
def test_oversized_header_rejected_on_the_prefix(header_len: int, payload_len: int) -> None:
    _, backup = backup_after_first_checkpoint()
    expect_error(backup, [PREFIX.pack(header_len, payload_len, 0)], "frame header length")


@hypothesis_settings
@given(payload_len=st.integers(DEFAULT_MAX_PAYLOAD + 1, 2**32 - 1))
def test_oversized_payload_rejected_on_the_prefix(payload_len: int) -> None:
    _, backup = backup_after_first_checkpoint()
    match = f"frame payload length {payload_len} exceeds the {DEFAULT_MAX_PAYLOAD}-byte limit"
    expect_error(backup, [PREFIX.pack(100, payload_len, 0)], match)


def test_payload_inconsistent_with_header_rejected_before_buffering() -> None:
    _, backup = backup_after_first_checkpoint()
    frame = page_frame(2, range(4))
    header_len, payload_len, _ = PREFIX.unpack_from(frame)
    # Header says 4 raw pages; claim a larger payload, and send only the header.
    header = frame[PREFIX.size : PREFIX.size + header_len]
    lie = payload_len + 1
    check = impl.hash64(header, header_len | lie << 32)
    with pytest.raises(RemoteProtocolError, match="does not fit 4 pfns"):
        backup.feed(BEGIN2 + PREFIX.pack(header_len, lie, check) + header)


def test_configured_payload_cap() -> None:
    conn = BackupConnection(max_payload=1000)
    conn.receive_data(PREFIX.pack(10, 1001, 0))
    with pytest.raises(RemoteProtocolError, match="exceeds the 1000-byte limit"):
        conn.next_event()


def test_too_many_pages_in_one_frame() -> None:
    _, backup = backup_after_first_checkpoint()
    count = MAX_BATCH_PAGES + 1
    frame = header_frame(
        {"type": "PAGES", "epoch": 2, "count": count, "codec": "raw", "checksum": 0}
    )
    expect_error(backup, [BEGIN2, frame], f"count {count} is not in 1..1024")


# -- handshake ------------------------------------------------------------------------


def test_wrong_version_names_both() -> None:
    backup = Backup()
    frame = header_frame({"type": "HELLO", "version": 7, "whatever": "v7 fields"})
    expect_error(
        backup,
        [frame],
        f"primary speaks protocol version 7, this backup speaks version {PROTOCOL_VERSION}",
    )


def test_primary_rejects_wrong_welcome_version() -> None:
    p = PrimaryConnection()
    p.send(hello())
    p.receive_data(header_frame({"type": "WELCOME", "version": 1, "features": [], "auth": None}))
    with pytest.raises(RemoteProtocolError, match="backup speaks protocol version 1"):
        p.next_event()


@pytest.mark.parametrize(
    ("primary_secret", "match"),
    [
        (None, "HELLO: authentication failed: the primary sent no token"),
        (b"wrong", "HELLO: authentication failed: wrong token"),
    ],
)
def test_backup_rejects_bad_auth(primary_secret: bytes | None, match: str) -> None:
    backup = Backup(SECRET)
    frame = PrimaryConnection(secret=primary_secret).send(hello())
    expect_error(backup, [frame], match)
    assert backup.conn.hello is None


def test_tampered_hello_fails_auth() -> None:
    signed = PrimaryConnection(secret=SECRET)
    sent = signed.send(hello())
    backup = Backup(SECRET)
    backup.feed(sent)  # the genuine one passes
    assert backup.conn.hello is not None
    assert backup.conn.hello.auth is not None
    forged = Hello(
        driver="microvm",
        ram_size=RAM_PAGES * PS * 2,  # changed after signing
        page_size=PS,
        config=hello().config,
        features=hello().features,
        auth=backup.conn.hello.auth,
    )
    expect_error(Backup(SECRET), [encode_frame(forged)], "authentication failed: wrong token")


@pytest.mark.parametrize("backup_secret", [None, b"other"])
def test_primary_rejects_backup_without_the_secret(backup_secret: bytes | None) -> None:
    p = PrimaryConnection(secret=SECRET)
    b = BackupConnection()
    b.receive_data(p.send(hello()))
    events_of(b)
    if backup_secret is None:
        reply = b.send(Welcome())
        match = "WELCOME: authentication failed: the backup sent no token"
    else:
        reply = encode_frame(Welcome(auth=b"x" * 32))
        match = "WELCOME: authentication failed: wrong token"
    p.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match=match):
        p.next_event()
    with pytest.raises(RemoteProtocolError):
        p.send(CheckpointBegin(1, True))


def test_welcome_may_not_add_features() -> None:
    p = PrimaryConnection()
    p.send(hello(features=()))
    p.receive_data(encode_frame(Welcome(features=("delta",))))
    with pytest.raises(RemoteProtocolError, match="features delta were not offered"):
        p.next_event()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"page_size": 1000}, "page_size 1000 is not a power of two"),
        ({"ram_size": PS * 3 + 1}, "is not a positive multiple"),
        ({"ram_size": 0}, "is not a positive multiple"),
        ({"role": "backup"}, "role must be 'primary'"),
        ({"driver": ""}, "driver is empty"),
    ],
)
def test_bad_geometry(overrides: dict[str, object], match: str) -> None:
    expect_error(Backup(), [encode_frame(hello(**overrides))], match)
    with pytest.raises(LocalProtocolError, match=match):
        PrimaryConnection().send(hello(**overrides))


def test_page_size_must_fit_the_payload_cap() -> None:
    big = hello(page_size=65536, ram_size=65536 * 4)
    with pytest.raises(LocalProtocolError, match="over the 67108864-byte payload limit"):
        PrimaryConnection().send(big)
    conn = BackupConnection(max_payload=128 * 1024 * 1024)
    conn.receive_data(PrimaryConnection(max_payload=128 * 1024 * 1024).send(big))
    assert conn.next_event() == big


def test_ram_size_limit() -> None:
    conn = BackupConnection(max_ram_size=PS * 4)
    conn.receive_data(encode_frame(hello()))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit 2048"):
        conn.next_event()


def test_backup_may_refuse_with_end() -> None:
    p, b = PrimaryConnection(), BackupConnection()
    b.receive_data(p.send(hello(driver="xen")))
    events_of(b)
    p.receive_data(b.send(End("no driver named 'xen'")) + b"")
    p.receive_data(b"")
    assert events_of(p) == [End("no driver named 'xen'"), ConnectionClosed(clean=True)]


# -- acks and the local side ----------------------------------------------------------


def primary_with_epochs(n: int) -> PrimaryConnection:
    primary, backup = connected()
    for _ in range(n):
        backup.feed(primary.checkpoint(None if primary.epoch == 0 else primary.dirty(2)))
    return primary.conn


@pytest.mark.parametrize(
    ("sent", "acks", "match"),
    [
        (0, [5], r"ACK for epoch 5: no checkpoint has ended that awaits an ACK \(last ended: none"),
        (2, [3], "ACK for epoch 3: ahead of the last ended checkpoint 2"),
        (2, [2], "ACK for epoch 2: out of order, expected ACK 1"),
        (2, [1, 1], "ACK for epoch 1: already acknowledged"),
        (1, [1, 2], r"ACK for epoch 2: no checkpoint has ended .*\(last ended: 1\)"),
    ],
)
def test_primary_rejects_bad_acks(sent: int, acks: list[int], match: str) -> None:
    conn = primary_with_epochs(sent)
    conn.receive_data(b"".join(encode_frame(Ack(e)) for e in acks))
    with pytest.raises(RemoteProtocolError, match=match):
        events_of(conn)
    assert conn.state is ConnectionState.ERROR


def test_backup_cannot_ack_ahead() -> None:
    primary, backup = connected()
    backup.feed(primary.checkpoint())
    backup.feed(primary.conn.send(CheckpointBegin(2)))
    backup.feed(primary.conn.send(Pages(2, pfn_bytes([0]), bytes(PS))))
    match = r"ACK for epoch 2: no .* \(last ended: 1; checkpoint 2 is still open\)"
    with pytest.raises(LocalProtocolError, match=match):
        backup.conn.send(Ack(2))
    assert backup.conn.state is ConnectionState.ERROR


@pytest.mark.parametrize(
    ("events", "match"),
    [
        ([CheckpointBegin(1, True)], "before HELLO"),
        ([Ack(1)], "Ack: a primary does not send it"),
        ([hello(), CheckpointBegin(1, True)], "before the backup's WELCOME"),
        ([hello(), End("x"), Heartbeat(1, 0.0)], "after END"),
        ([hello(), Pages(1, b"123", b"")], "not a whole number of u64"),
        ([hello(), Heartbeat(-1, 0.0)], "'seq' must be an integer"),
        ([hello(config={"big": b"x" * MAX_HEADER})], "exceeds 65536"),
        ([ConnectionClosed(True)], "ConnectionClosed: a primary does not send it"),
    ],
)
def test_primary_send_checks(events: list[Event], match: str) -> None:
    conn = PrimaryConnection()
    with pytest.raises(LocalProtocolError, match=match):
        for event in events:
            conn.send(event)
    assert conn.state is ConnectionState.ERROR


def test_blackhole_recipe_primary_talks_to_itself() -> None:
    """With no backup (blackhole), the engine feeds its connection WELCOME and ACKs."""
    conn = PrimaryConnection()
    conn.send(hello())
    conn.receive_data(encode_frame(Welcome(features=("delta",))))
    assert isinstance(conn.next_event(), Welcome)
    for epoch in (1, 2):
        conn.send(CheckpointBegin(epoch, full=epoch == 1))
        pfns = range(RAM_PAGES) if epoch == 1 else [3]
        conn.send(Pages(epoch, pfn_bytes(pfns), bytes(len(pfns) * PS)))
        conn.send(State(epoch, b""))
        conn.send(CheckpointEnd(epoch, len(pfns), len(pfns) * PS))
        conn.receive_data(encode_frame(Ack(epoch)))
        assert conn.next_event() == Ack(epoch)
    assert conn.unacked == () and conn.state is ConnectionState.OPEN


def test_eof_without_end_is_unclean() -> None:
    _, backup = backup_after_first_checkpoint()
    backup.conn.receive_data(b"")
    assert backup.conn.next_event() == ConnectionClosed(clean=False)
    assert backup.conn.next_event() == ConnectionClosed(clean=False)
    assert backup.conn.state is ConnectionState.CLOSED


def test_end_mid_checkpoint_abandons_it() -> None:
    primary, backup = backup_after_first_checkpoint()
    snapshot = bytes(backup.replica)
    backup.feed(primary.conn.send(CheckpointBegin(2)))
    backup.feed(primary.conn.send(Pages(2, pfn_bytes([1]), bytes(PS), "raw")))
    backup.feed(primary.conn.send(End("shutting down")))
    assert backup.events[-1] == End("shutting down")
    backup.stager.abort()
    assert backup.stager.open_epoch is None and bytes(backup.replica) == snapshot


def test_stager_never_writes_the_replica() -> None:
    frozen = REPLICAS["delta"][1]
    view = memoryview(frozen)  # read-only: a write would raise TypeError
    stager = CheckpointStager(view, page_size=PS)
    conn = BackupConnection()
    stream, _ = WIRES["delta"]
    hello_end = frame_ends(stream)[0]
    conn.receive_data(stream[:hello_end])
    events_of(conn)
    conn.send(Welcome(features=("delta",)))
    conn.receive_data(stream[hello_end:])
    epochs = []
    for event in events_of(conn):
        if isinstance(event, CheckpointBegin | Pages | State | CheckpointEnd):
            done = stager.feed(event)
            if done is not None:
                epochs.append(done.epoch)
                if done.epoch == 2:  # decoded against epoch 1's replica, as it should
                    assert bytes(done.data) != b""
                    break
    assert epochs == [1, 2]
    assert bytes(view) == frozen


# -- page data checksummed as it arrives ----------------------------------------------------


def _large_pages_frame(pages: int) -> tuple[BackupConnection, bytes, bytes, bytes]:
    """A backup past its handshake and CHECKPOINT_BEGIN, and a PAGES frame of
    ``pages`` real-size pages (its pfns and data too)."""
    page = 4096
    primary, backup = PrimaryConnection(), BackupConnection()
    backup.receive_data(primary.send(hello(ram_size=2 * pages * page, page_size=page)))
    assert isinstance(backup.next_event(), Hello)
    primary.receive_data(backup.send(Welcome()))
    assert isinstance(primary.next_event(), Welcome)
    backup.receive_data(primary.send(CheckpointBegin(0, True)))
    assert isinstance(backup.next_event(), CheckpointBegin)
    rng = random.Random(7)
    pfns = pfn_bytes(sorted(rng.sample(range(2 * pages), pages)))
    data = rng.randbytes(pages * page)
    return backup, primary.send(Pages(0, pfns, data)), pfns, data


@pytest.mark.parametrize("path", ["receive_data", "receive_buffer"])
def test_page_data_is_checksummed_as_it_arrives(path: str) -> None:
    backup, frame, pfns, data = _large_pages_frame(384)  # 1.5 MiB of pages
    rng = random.Random(3)
    delivered = 0
    hashed_midway = -1
    while delivered < len(frame):
        size = min(rng.randint(1, 200_000), len(frame) - delivered)
        chunk = frame[delivered : delivered + size]
        into = backup.receive_buffer() if path == "receive_buffer" else None
        if into is not None:
            size = min(size, len(into))
            into[:size] = frame[delivered : delivered + size]
            backup.received_into(size)
        else:
            backup.receive_data(chunk)
        delivered += size
        if hashed_midway < 0 and delivered >= len(frame) // 2:
            hashed_midway = backup._pages_hashed
        if delivered < len(frame):
            assert backup.next_event() is NEED_DATA
    # Half way through, the page data that had arrived was hashed already (all but
    # less than one step of it), not left for the end.
    assert hashed_midway >= len(frame) // 2 - 4096 - (256 << 10)
    event = backup.next_event()
    assert isinstance(event, Pages)
    assert bytes(event.pfns) == pfns and bytes(event.data) == data
    assert event.checksum == impl.hash64(data, impl.hash64(pfns))


@pytest.mark.parametrize("where", [0, 1, 4095, 300_000, -1])
def test_a_corrupt_page_byte_is_caught_by_the_running_checksum(where: int) -> None:
    backup, frame, _, data = _large_pages_frame(384)
    corrupt = bytearray(frame)
    corrupt[len(frame) - len(data) + where if where >= 0 else where] ^= 0x10
    for start in range(0, len(corrupt), 65_536):
        backup.receive_data(corrupt[start : start + 65_536])
    with pytest.raises(RemoteProtocolError, match="PAGES for epoch 0: checksum mismatch"):
        events_of(backup)
