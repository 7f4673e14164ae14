"""Transports: real sockets (TCP on loopback, Unix), the memory pair, the blackhole."""

from __future__ import annotations

import os
import random
import socket
import uuid

import pytest
import trio

from tremus.accel import impl
from tremus.engine.protocol import (
    NEED_DATA,
    Ack,
    BackupConnection,
    CheckpointBegin,
    CheckpointEnd,
    CheckpointStager,
    ConnectionClosed,
    End,
    Event,
    Hello,
    Pages,
    PrimaryConnection,
    State,
    Welcome,
    checkpoint_digest,
)
from tremus.transports import (
    DEFAULT_BUFFER_SIZE,
    BlackholeStream,
    InvalidURL,
    Listener,
    Stream,
    TransportURL,
    connect,
    listen,
    memory_pair,
    parse_url,
)
from tremus.transports.codec import DeltaCodec, split_batches


async def accept_and_connect(url: str) -> tuple[Listener, Stream, Stream]:
    listener = await listen(url)
    client = await connect(listener.url)
    server = await listener.accept()
    return listener, client, server


async def check_exchange(client: Stream, server: Stream) -> None:
    """Bytes both ways, a large transfer, then EOF is ``b""`` on the other side."""
    await client.send_all(b"ping")
    assert await server.receive_some(100) == b"ping"
    await server.send_all(memoryview(b"pong"))
    assert await client.receive_some(100) == b"pong"
    blob = random.Random(1).randbytes(3 * 1024 * 1024)
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(blob):
            chunk = await server.receive_some(1 << 20)
            assert chunk
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await client.send_all(blob)
    assert received == blob
    await client.aclose()
    assert await server.receive_some(100) == b""
    await server.aclose()


async def test_tcp_loopback() -> None:
    listener, client, server = await accept_and_connect("tcp://127.0.0.1:0")
    url = parse_url(listener.url)
    assert url.host == "127.0.0.1" and url.port > 0
    for stream in (client, server):
        assert isinstance(stream, trio.SocketStream)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with open("/proc/sys/net/core/wmem_max") as f:
            if int(f.read()) >= DEFAULT_BUFFER_SIZE:  # Linux reports twice what was set
                assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= DEFAULT_BUFFER_SIZE
    await check_exchange(client, server)
    await listener.aclose()


async def test_tcp_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = await listen("tcp://[::1]:0")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    assert listener.url.startswith("tcp://[::1]:")
    client = await connect(listener.url, buffer_size=None)
    server = await listener.accept()
    await check_exchange(client, server)
    await listener.aclose()


async def test_tcp_refused_names_the_url() -> None:
    listener = await listen("tcp://127.0.0.1:0")
    url = listener.url
    await listener.aclose()
    with pytest.raises(ConnectionRefusedError, match=f"cannot connect to {url}"):
        await connect(url)


async def test_tcp_port_in_use() -> None:
    listener = await listen("tcp://127.0.0.1:0")
    with pytest.raises(OSError, match=f"cannot listen on {listener.url}"):
        await listen(listener.url)
    await listener.aclose()


async def test_unix_socket(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "backup.sock")
    listener, client, server = await accept_and_connect(f"unix://{path}")
    assert listener.url == f"unix://{path}"
    await check_exchange(client, server)
    # A second listener on a live socket is refused, not silently stolen.
    with pytest.raises(OSError, match="cannot listen on unix://"):
        await listen(f"unix://{path}")
    await listener.aclose()
    assert not os.path.exists(path)


async def test_unix_stale_socket_is_replaced(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "stale.sock")
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)
    crashed.close()  # the file stays behind, nobody listens
    listener, client, server = await accept_and_connect(f"unix://{path}")
    await check_exchange(client, server)
    await listener.aclose()


async def test_unix_not_a_socket_is_left_alone(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "file")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(OSError, match="cannot listen on"):
        await listen(f"unix://{path}")
    with open(path) as f:
        assert f.read() == "precious"


async def test_unix_missing_socket(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(FileNotFoundError, match="cannot connect to unix://"):
        await connect(f"unix://{tmp_path}/nobody.sock")


async def test_unix_abstract() -> None:
    name = f"tremus-test-{uuid.uuid4().hex}"
    listener, client, server = await accept_and_connect(f"unix://@{name}")
    assert listener.url == f"unix://@{name}"
    await check_exchange(client, server)
    await listener.aclose()


async def test_memory() -> None:
    listener, client, server = await accept_and_connect("memory://backup")
    assert listener.url == "memory://backup"
    with pytest.raises(OSError, match="address in use"):
        await listen("memory://backup")
    await check_exchange(client, server)
    await listener.aclose()
    with pytest.raises(ConnectionRefusedError, match="nothing listens there"):
        await connect("memory://backup")


async def test_memory_pair_eof() -> None:
    a, b = memory_pair()
    await a.send_all(b"x")
    await a.aclose()
    assert await b.receive_some(10) == b"x"
    assert await b.receive_some(10) == b""


async def test_memory_listener_close_ends_unaccepted_streams() -> None:
    listener = await listen("memory://gone")
    client = await connect("memory://gone")
    await listener.aclose()
    assert await client.receive_some(10) == b""


async def test_blackhole() -> None:
    stream = await connect("blackhole://")
    assert isinstance(stream, BlackholeStream) and stream.acks_immediately
    await stream.send_all(b"x" * 1000)
    await stream.send_all(memoryview(bytearray(24)).cast("Q"))
    assert stream.bytes_sent == 1000 + 24  # bytes, not items
    with trio.move_on_after(0.05) as scope:
        await stream.receive_some(10)  # nothing ever arrives, and it is not EOF
    assert scope.cancelled_caught

    async def receive() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"late")
    with pytest.raises(InvalidURL, match="a blackhole can only be connected to"):
        await listen("blackhole://")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("localhost:5000", "no scheme; expected tcp://HOST:PORT"),
        ("udp://a:1", "unknown scheme 'udp'"),
        ("tcp://host", "no port; expected tcp://HOST:PORT"),
        ("tcp://:5000", "no host; use 0.0.0.0 or \\[::\\]"),
        ("tcp://host:http", "port 'http' is not a number in 0..65535"),
        ("tcp://host:70000", "port '70000' is not a number"),
        ("tcp://host:-1", "port '-1' is not a number"),
        ("tcp://::1:5000", "an IPv6 address must be in brackets"),
        ("tcp://[::1]", "no port after the \\[IPv6\\] address"),
        ("tcp://[::1:5000", "unterminated or empty \\[IPv6\\] address"),
        ("tcp://host:5000/path", "a tcp URL has no path"),
        ("unix://", "no socket path"),
        ("unix://" + "x" * 200, "socket path longer than 107 bytes"),
        ("memory://", "non-empty NAME"),
        ("blackhole://somewhere", "blackhole takes no address"),
    ],
)
async def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(InvalidURL, match=match) as info:
        parse_url(url)
    assert repr(url) in str(info.value)
    with pytest.raises(InvalidURL, match=match):
        await connect(url)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("tcp://10.0.0.2:7001", TransportURL("tcp", host="10.0.0.2", port=7001)),
        ("tcp://backup.example:0", TransportURL("tcp", host="backup.example", port=0)),
        ("tcp://[fe80::1%eth0]:9", TransportURL("tcp", host="fe80::1%eth0", port=9)),
        ("unix:///run/tremus.sock", TransportURL("unix", path="/run/tremus.sock")),
        ("unix://@abstract", TransportURL("unix", path="\0abstract")),
        ("memory://a", TransportURL("memory", path="a")),
        ("blackhole://", TransportURL("blackhole")),
        ("blackhole", TransportURL("blackhole")),
    ],
)
def test_good_urls(url: str, parsed: TransportURL) -> None:
    assert parse_url(url) == parsed
    assert parse_url(str(parsed)) == parsed


# -- the protocol over a real transport -----------------------------------------------


async def next_event(conn: PrimaryConnection | BackupConnection, stream: Stream) -> Event:
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some(1 << 20))
    return event


async def run_backup(stream: Stream, result: dict[str, object]) -> None:
    conn = BackupConnection(secret=b"s3cret")
    hello = await next_event(conn, stream)
    assert isinstance(hello, Hello)
    replica = bytearray(hello.ram_size)
    stager = CheckpointStager(replica, page_size=hello.page_size)
    await stream.send_all(conn.send(Welcome(features=("delta",))))
    while True:
        event = await next_event(conn, stream)
        if isinstance(event, CheckpointBegin | Pages | State | CheckpointEnd):
            done = stager.feed(event)
            if done is not None:
                impl.scatter(replica, done.pfns, done.data, hello.page_size)
                await stream.send_all(conn.send(Ack(done.epoch)))
        elif isinstance(event, End | ConnectionClosed):
            result["replica"] = replica
            result["end"] = event
            return


async def run_primary(stream: Stream, ram: bytearray) -> None:
    conn = PrimaryConnection(secret=b"s3cret")
    await stream.send_all(conn.send(Hello(driver="test", ram_size=len(ram), features=("delta",))))
    assert isinstance(await next_event(conn, stream), Welcome)
    codec = DeltaCodec()
    rng = random.Random(3)
    pages = len(ram) // 4096
    for epoch in range(1, 6):
        if epoch == 1:
            pfn_list = list(range(pages))
        else:
            pfn_list = sorted(rng.sample(range(pages), 300))
            for pfn in pfn_list:
                ram[pfn * 4096 + rng.randrange(4000)] ^= 0xFF
        pfns = b"".join(p.to_bytes(8, "little") for p in pfn_list)
        staged = bytearray(len(pfn_list) * 4096)
        impl.gather(ram, pfns, staged)
        total = 0
        await stream.send_all(conn.send(CheckpointBegin(epoch, full=epoch == 1)))
        for pv, dv in split_batches(pfns, staged):
            data = codec.encode(dv, pv)
            total += len(data)
            for part in conn.send_parts(Pages(epoch, pv, data, codec.name)):
                await stream.send_all(part)
        await stream.send_all(conn.send(State(epoch, b"regs")))
        digest = checkpoint_digest(pfns, staged, b"regs")
        await stream.send_all(conn.send(CheckpointEnd(epoch, len(pfn_list), total, digest)))
        assert await next_event(conn, stream) == Ack(epoch)
    await stream.send_all(conn.send(End("done")))
    await stream.aclose()


@pytest.mark.parametrize("scheme", ["tcp", "unix", "memory"])
async def test_protocol_over_transport(scheme: str, tmp_path: os.PathLike[str]) -> None:
    url = {
        "tcp": "tcp://127.0.0.1:0",
        "unix": f"unix://{tmp_path}/b.sock",
        "memory": "memory://b",
    }[scheme]
    listener = await listen(url)
    ram = bytearray(random.Random(4).randbytes(8 * 1024 * 1024))
    result: dict[str, object] = {}

    async def backup_side() -> None:
        stream = await listener.accept()
        await run_backup(stream, result)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(backup_side)
        await run_primary(await connect(listener.url), ram)
    await listener.aclose()
    assert result["end"] == End("done")
    assert result["replica"] == ram


# -- the engine's link: what it writes, and when ------------------------------------


class _Counting:
    """Counts the bytes written through ``method`` of ``inner`` (a socket's sendmsg
    or a stream's send_all), delegating everything."""

    def __init__(self, inner: object, method: str) -> None:
        self.inner, self.written, self.calls = inner, 0, 0
        real = getattr(inner, method)

        async def counted(data, *args):  # type: ignore[no-untyped-def]
            result = await real(data, *args)
            self.calls += 1
            self.written += result if method == "sendmsg" else len(data)
            return result

        setattr(self, method, counted)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("scheme", ["tcp", "memory"])
async def test_link_writes_parts_in_order_and_each_flush_before_going_on(scheme: str) -> None:
    """Link.send_parts writes what a generator yielded before each ``None`` before
    asking it for more: on any other stream all of it (send_all calls); on a socket
    (sendmsg calls, partial ones resumed where they stopped) either all of it or, if
    a write left bytes behind (the socket is full), the next group is built while
    it drains. The rest at the end; the peer gets the bytes whole and in order."""
    from tremus.engine._link import Link
    from tremus.engine.protocol import PrimaryConnection

    big = os.urandom(6 << 20)  # more than a loopback socket takes in one call
    pieces: list[bytes | memoryview | None] = [
        b"head", memoryview(big)[: 3 << 20], b"", b"x" * 100, None,
        memoryview(big)[3 << 20 :], b"tail", None, b"end",
    ]
    expected = b"".join(bytes(p) for p in pieces if p is not None)
    received = bytearray()

    async with trio.open_nursery() as nursery:
        if scheme == "tcp":
            listener = await listen("tcp://127.0.0.1:0")
            client = await connect(listener.url)
            server = await listener.accept()
            await listener.aclose()
        else:
            client, server = memory_pair()
        link = Link(PrimaryConnection(), client, ConnectionError, "backup")
        if scheme == "tcp":
            assert link._socket is not None
            counter = _Counting(link._socket, "sendmsg")
            link._socket = counter  # type: ignore[assignment]
        else:
            assert link._socket is None
            counter = _Counting(client, "send_all")
            link.stream = counter  # type: ignore[assignment]

        async def read() -> None:
            while len(received) < len(expected):
                chunk = await server.receive_some(1 << 20)
                assert chunk
                received.extend(chunk)

        ahead: list[bool] = []

        def parts():  # type: ignore[no-untyped-def]
            yielded = 0
            for piece in pieces:
                calls = counter.calls
                yield piece
                if piece is None:  # resumed: the group is written, or being written
                    if scheme == "memory":
                        assert counter.written == yielded
                    else:
                        assert counter.calls > calls
                        assert counter.written <= yielded
                    ahead.append(counter.written < yielded)
                else:
                    yielded += len(piece)

        nursery.start_soon(read)
        with trio.fail_after(30):
            sent = await link.send_parts(parts())
            while len(received) < len(expected):
                await trio.sleep(0.01)
        await client.aclose()
        await server.aclose()
    assert sent == counter.written == len(expected) and bytes(received) == expected
    # 3 MiB does not fit a loopback socket at once: the second group was built
    # while the first drained.
    assert ahead == ([False, False] if scheme == "memory" else [True, True])
