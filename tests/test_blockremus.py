"""block-remus over real fifos: the golden byte exchange, the engine's device against a
raw disk double, the disk side against raw bytes, and both ends together."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from tremus._groups import collapse_groups
from tremus.buffers._blockremus_proto import (
    NEED_DATA,
    Closed,
    DiskSide,
    Done,
    EngineSide,
    Fail,
    Flush,
    LocalProtocolError,
    RemoteProtocolError,
)
from tremus.buffers.blockremus import BlockRemusDevice, BlockRemusError, fifo_paths
from tremus.buffers.blockremus_server import BlockRemusFifo, BlockRemusFifoError
from tremus.engine.devices import DeviceError, DeviceRunner

HOST, PORT = "backup", 9000


# -- raw fifo helpers -------------------------------------------------------------------


def _open(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)  # no task of ours waits on them by then


async def read_exactly(fd: int, n: int, timeout: float = 2.0) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while len(data) < n:
            try:
                chunk = os.read(fd, n - len(data))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not chunk:
                raise EOFError(f"end of file after {data!r}")
            data += chunk
    return data


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


def nothing_to_read(fd: int) -> bool:
    try:
        os.read(fd, 64)
    except BlockingIOError:
        return True
    return False


class RawDisk:
    """A test double of the disk end: both fifos held read-write, as tapdisk does."""

    def __init__(self, control: str, msg: str) -> None:
        os.mkfifo(control, 0o600)
        os.mkfifo(msg, 0o600)
        self.control = _open(control, os.O_RDWR)
        self.msg = _open(msg, os.O_RDWR)
        self.closed = False

    async def expect(self, data: bytes) -> None:
        assert await read_exactly(self.control, len(data)) == data
        assert nothing_to_read(self.control)

    def send(self, data: bytes) -> None:
        assert os.write(self.msg, data) == len(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _close(self.control, self.msg)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return fifo_paths(tmp_path, HOST, PORT)


@pytest.fixture
def disk(paths: tuple[str, str]) -> Iterator[RawDisk]:
    raw = RawDisk(*paths)
    yield raw
    raw.close()


@pytest.fixture
async def device(disk: RawDisk, paths: tuple[str, str]) -> AsyncIterator[BlockRemusDevice]:
    dev = BlockRemusDevice(paths[0], timeout=2.0)
    await dev.setup()
    yield dev
    await dev.teardown()


async def finishes(fn: Callable[[int], Awaitable[object]], arg: int) -> bool:
    """Whether ``await fn(arg)`` returned within a short while (it is cancelled if not)."""
    done = trio.Event()

    async def run() -> None:
        await fn(arg)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.move_on_after(0.05):
            await done.wait()
        nursery.cancel_scope.cancel()
    return done.is_set()


# -- naming -------------------------------------------------------------------------------


def test_fifo_paths() -> None:
    assert fifo_paths("/var/run/tap", "10.0.0.2", 9000) == (
        "/var/run/tap/remus_10.0.0.2_9000", "/var/run/tap/remus_10.0.0.2_9000.msg")
    assert fifo_paths("/run/tremus", "fd00::2", 7) == (
        "/run/tremus/remus_fd00__2_7", "/run/tremus/remus_fd00__2_7.msg")
    assert fifo_paths("/r", "a/b", 1)[0] == "/r/remus_a_b_1"


# -- sans-IO --------------------------------------------------------------------------------


def test_proto_engine_side_buffers_split_reads() -> None:
    engine = EngineSide()
    assert [engine.send_flush() for _ in range(3)] == [b"flush"] * 3
    for chunk in (b"do", b"ne", b"fa", b"ildo", b"n"):
        engine.receive_data(chunk)
    assert engine.next_event() == Done(0)
    assert engine.next_event() == Fail(1)
    assert engine.next_event() is NEED_DATA
    engine.receive_data(b"e")
    assert engine.next_event() == Done(2)
    assert engine.outstanding == 0
    engine.receive_data(b"")
    assert engine.next_event() == Closed()


@pytest.mark.parametrize(
    ("data", "named"),
    [(b"dOne", "b'dOne'"), (b"xxxx", "b'xxxx'"), (b"flush", "b'flus'"), (b"don", "b'don'")],
)
def test_proto_engine_side_errors(data: bytes, named: str) -> None:
    engine = EngineSide()
    engine.send_flush()
    engine.receive_data(data)
    if data == b"don":
        engine.receive_data(b"")  # end of file inside a message
    with pytest.raises(RemoteProtocolError, match=named):
        engine.next_event()
    with pytest.raises(RemoteProtocolError):  # and from then on
        engine.next_event()


def test_proto_answer_without_flush() -> None:
    engine = EngineSide()
    engine.receive_data(b"done")
    with pytest.raises(RemoteProtocolError, match="no flush outstanding"):
        engine.next_event()


def test_proto_disk_side() -> None:
    disk = DiskSide()
    with pytest.raises(LocalProtocolError, match="no flush is outstanding"):
        disk.send_done()
    disk.receive_data(b"flu")
    assert disk.next_event() is NEED_DATA
    disk.receive_data(b"shflush")
    assert [disk.next_event(), disk.next_event()] == [Flush(0), Flush(1)]
    assert (disk.send_done(), disk.send_fail()) == (b"done", b"fail")
    disk.receive_data(b"flux")
    with pytest.raises(RemoteProtocolError, match="garbage from the engine: b'flux'"):
        disk.next_event()


# -- the device against a raw disk double ------------------------------------------------


async def test_golden_exchange(device: BlockRemusDevice, disk: RawDisk) -> None:
    for epoch in range(3):
        await device.postsuspend(epoch)
        await device.preresume(epoch)
    await disk.expect(b"flushflushflush")
    assert device.pending == [0, 1, 2]
    # commit(1) needs the answers of epochs 0 and 1: one is not enough.
    disk.send(b"done")
    assert not await finishes(device.commit, 1)
    assert device.pending == [1, 2]
    disk.send(b"done")
    assert await device.commit(1) == 0
    assert device.pending == [2]
    # An answer split across reads.
    disk.send(b"do")
    assert not await finishes(device.commit, 2)
    disk.send(b"ne")
    assert await device.commit(2) == 0
    assert device.pending == [] and device.acknowledged == 3
    assert await device.commit(1) == 0  # already answered: nothing to wait for
    assert nothing_to_read(disk.control)


async def test_fail_is_a_device_error(device: BlockRemusDevice, disk: RawDisk) -> None:
    await device.postsuspend(0)
    await device.postsuspend(1)
    disk.send(b"donefail")
    with pytest.raises(DeviceError) as info:
        await device.commit(1)
    message = str(info.value)
    assert "answered `fail`" in message and "epoch 1" in message
    assert device.msg_path in message
    assert (info.value.device, info.value.op) == ("blockremus", "commit")


@pytest.mark.parametrize("garbage", [b"dOne", b"xxxx"])
async def test_garbage_is_a_device_error(
    device: BlockRemusDevice, disk: RawDisk, garbage: bytes
) -> None:
    await device.postsuspend(0)
    disk.send(garbage)
    with pytest.raises(DeviceError, match=f"garbage from the disk: {garbage!r}"):
        await device.commit(0)


async def test_end_of_file_is_a_device_error(device: BlockRemusDevice, disk: RawDisk) -> None:
    await device.postsuspend(0)
    disk.close()
    with pytest.raises(DeviceError, match="the disk closed .*msg \\(it is gone\\).* epoch 0"):
        await device.commit(0)
    with pytest.raises(DeviceError, match="nothing reads .* the disk is gone"):
        await device.postsuspend(1)


async def test_silence_is_a_device_error(disk: RawDisk, paths: tuple[str, str]) -> None:
    device = BlockRemusDevice(paths[0], timeout=0.2)
    await device.setup()
    await device.postsuspend(0)
    start = trio.current_time()
    with pytest.raises(DeviceError, match="no answer from the disk .* epoch 0 within 0.2 s"):
        await device.commit(0)
    assert 0.15 < trio.current_time() - start < 1.5
    await device.teardown()


async def test_pending_answers_count_even_late(disk: RawDisk, paths: tuple[str, str]) -> None:
    """An answer that came in time but was read after the deadline is not a silence."""
    device = BlockRemusDevice(paths[0], timeout=0.1)
    await device.setup()
    await device.postsuspend(0)
    disk.send(b"done")
    await trio.sleep(0.2)
    assert await device.commit(0) == 0
    await device.teardown()


async def test_setup_discards_stale_answers(disk: RawDisk, paths: tuple[str, str]) -> None:
    disk.send(b"donedone")  # left over from an earlier engine
    device = BlockRemusDevice(paths[0], timeout=0.2)
    await device.setup()
    await device.postsuspend(0)
    with pytest.raises(DeviceError, match="no answer"):
        await device.commit(0)
    await device.teardown()


async def test_release_all_stops_waiting(device: BlockRemusDevice, disk: RawDisk) -> None:
    await device.postsuspend(0)
    await device.release_all()
    assert device.pending == []
    assert await device.commit(0) == 0
    await device.postsuspend(1)
    assert await device.commit(1) == 0
    await disk.expect(b"flush")  # epoch 1 was not flushed


async def test_release_all_while_commit_waits(device: BlockRemusDevice, disk: RawDisk) -> None:
    await device.postsuspend(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.commit, 0)
        await trio.sleep(0.02)
        await device.release_all()
        disk.send(b"done")  # commit wakes, finds nothing awaited, returns


async def test_teardown_while_commit_waits(device: BlockRemusDevice, disk: RawDisk) -> None:
    await device.postsuspend(0)
    with pytest.raises(DeviceError, match="torn down while waiting"), collapse_groups():
        async with trio.open_nursery() as nursery:
            async def commit() -> None:
                try:
                    await device.commit(0)
                finally:
                    nursery.cancel_scope.cancel()
            nursery.start_soon(commit)
            await trio.sleep(0.02)
            await device.teardown()
            await trio.sleep(1)


async def test_epochs_must_go_up(device: BlockRemusDevice) -> None:
    await device.postsuspend(3)
    with pytest.raises(ValueError, match="epoch 3 closed after epoch 3"):
        await device.postsuspend(3)
    with pytest.raises(ValueError, match="commit\\(4\\)"):
        await device.commit(4)


async def test_runner_says_it_once(device: BlockRemusDevice, disk: RawDisk) -> None:
    runner = DeviceRunner([device])
    await runner.postsuspend(0)
    disk.send(b"fail")
    with pytest.raises(DeviceError) as info:
        await runner.commit(0)
    assert str(info.value).count("blockremus: commit failed") == 1
    assert str(info.value.cause).startswith("the disk answered `fail`")


async def test_setup_errors_name_the_path(tmp_path: Path) -> None:
    control, msg = fifo_paths(tmp_path, HOST, PORT)
    with pytest.raises(BlockRemusError, match=f"{control} does not exist"):
        await BlockRemusDevice(control).setup()
    Path(control).write_bytes(b"")
    with pytest.raises(DeviceError, match=f"{control} is not a fifo"):
        await BlockRemusDevice(control).setup()
    os.unlink(control)
    os.mkfifo(control)
    with pytest.raises(DeviceError, match=f"{msg} does not exist"):
        await BlockRemusDevice(control).setup()
    os.mkfifo(msg)
    with pytest.raises(DeviceError, match=f"nothing reads {control}: .* not running"):
        await BlockRemusDevice(control).setup()
    reader = _open(control, os.O_RDONLY)  # a disk that holds only the control fifo
    try:
        with pytest.raises(DeviceError, match=f"nothing writes {msg}"):
            await BlockRemusDevice(control).setup()
    finally:
        _close(reader)


# -- the disk side against raw bytes ---------------------------------------------------------


class Recorder:
    """``on_flush``: records calls, answers from a script, may wait for a gate."""

    def __init__(self, answers: dict[int, bool] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[int] = []
        self.gates: dict[int, trio.Event] = {}
        self.busy = 0
        self.max_busy = 0

    def gate(self, epoch: int) -> trio.Event:
        return self.gates.setdefault(epoch, trio.Event())

    async def __call__(self, epoch: int) -> bool:
        self.calls.append(epoch)
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        try:
            if epoch in self.gates:
                with trio.fail_after(2):
                    await self.gates[epoch].wait()
            await trio.sleep(0.01 if epoch % 2 == 0 else 0)  # answers may take a while
        finally:
            self.busy -= 1
        return self.answers.get(epoch, True)


class Engine:
    """A raw engine end: control write-only, message fifo read-only."""

    def __init__(self, server: BlockRemusFifo) -> None:
        self.control = _open(server.control_path, os.O_WRONLY)
        self.msg = _open(server.msg_path, os.O_RDONLY)

    def send(self, data: bytes) -> None:
        assert os.write(self.control, data) == len(data)

    def close(self) -> None:
        _close(self.control, self.msg)


async def test_server_makes_and_removes_fifos(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "tremus"
    server = BlockRemusFifo(run_dir, HOST, PORT, Recorder())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        for path in (server.control_path, server.msg_path):
            mode = os.stat(path).st_mode
            assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600
        assert (server.control_path, server.msg_path) == fifo_paths(run_dir, HOST, PORT)
        # A second disk for the same target is refused while this one lives.
        with pytest.raises(BlockRemusFifoError, match="served by another live disk"):
            await BlockRemusFifo(run_dir, HOST, PORT, Recorder()).run()
        assert os.path.exists(server.control_path) and os.path.exists(server.msg_path)
        # ... and the live one still serves.
        engine = Engine(server)
        engine.send(b"flush")
        assert await read_exactly(engine.msg, 4) == b"done"
        engine.close()
        server.close()
    assert sorted(os.listdir(run_dir)) == []


async def test_server_replaces_stale_fifos_only(tmp_path: Path) -> None:
    control, msg = fifo_paths(tmp_path, HOST, PORT)
    os.mkfifo(control)  # a dead disk's
    os.mkfifo(msg)
    server = BlockRemusFifo(tmp_path, HOST, PORT, Recorder())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert os.path.exists(control)
        server.close()
    assert not os.path.exists(control) and not os.path.exists(msg)
    Path(msg).write_text("not a fifo")
    with pytest.raises(BlockRemusFifoError, match="is not a fifo: not removing it"):
        await BlockRemusFifo(tmp_path, HOST, PORT, Recorder()).run()
    assert Path(msg).read_text() == "not a fifo"


async def test_server_golden_exchange(tmp_path: Path) -> None:
    on_flush = Recorder({1: False})
    server = BlockRemusFifo(tmp_path, HOST, PORT, on_flush)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        engine = Engine(server)
        engine.send(b"flu")
        await trio.sleep(0.02)
        assert on_flush.calls == []
        engine.send(b"sh")
        assert await read_exactly(engine.msg, 4) == b"done"
        # Several outstanding at once: read ahead, answered one by one, in order.
        on_flush.gate(1)
        engine.send(b"flushflushflush")
        await wait_until(lambda: on_flush.calls == [0, 1] and server.flushes == 4)  # read ahead
        await trio.sleep(0.02)
        assert on_flush.calls == [0, 1] and nothing_to_read(engine.msg)
        on_flush.gate(1).set()
        assert await read_exactly(engine.msg, 12) == b"faildonedone"
        assert on_flush.calls == [0, 1, 2, 3] and on_flush.max_busy == 1
        assert (server.flushes, server.done, server.failed) == (4, 3, 1)
        engine.close()
        server.close()


async def test_server_garbage_ends_run(tmp_path: Path) -> None:
    server = BlockRemusFifo(tmp_path, HOST, PORT, Recorder())
    with pytest.raises(BlockRemusFifoError, match="garbage from the engine: b'flux'"), \
            collapse_groups():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            engine = Engine(server)
            try:
                engine.send(b"flux")
                await trio.sleep(1)
            finally:
                engine.close()
    assert os.listdir(tmp_path) == []


async def test_server_drops_a_departed_engines_answers(tmp_path: Path) -> None:
    on_flush = Recorder()
    server = BlockRemusFifo(tmp_path, HOST, PORT, on_flush)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        first = Engine(server)
        on_flush.gate(1)
        first.send(b"flushflush")
        await wait_until(lambda: on_flush.calls == [0, 1])
        await wait_until(lambda: server.done == 1)
        first.close()  # leaves with flush 1 unanswered (and flush 0's answer unread)
        await wait_until(lambda: server.sessions == 1)
        on_flush.gate(1).set()
        await wait_until(lambda: server.dropped == 1)
        second = Engine(server)
        assert nothing_to_read(second.msg)
        second.send(b"flush")
        assert await read_exactly(second.msg, 4) == b"done"
        await trio.sleep(0.02)
        assert nothing_to_read(second.msg)
        assert on_flush.calls == [0, 1, 2]  # numbered on, across engines
        second.close()
        server.close()


# -- both ends together -------------------------------------------------------------------


async def test_end_to_end(tmp_path: Path) -> None:
    on_flush = Recorder({5: False})
    server = BlockRemusFifo(tmp_path, HOST, PORT, on_flush)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        device = BlockRemusDevice(server.control_path, timeout=2.0)
        await device.setup()
        for epoch in range(4):
            on_flush.gate(epoch)
            await device.postsuspend(epoch)
        assert device.pending == [0, 1, 2, 3]
        assert not await finishes(device.commit, 1)
        on_flush.gate(0).set()
        assert not await finishes(device.commit, 1)  # epoch 0 done, 1 not yet
        on_flush.gate(1).set()
        assert await device.commit(1) == 0
        assert device.pending == [2, 3]
        on_flush.gate(2).set()
        on_flush.gate(3).set()
        assert await device.commit(3) == 0
        await device.postsuspend(4)
        await device.postsuspend(5)
        with pytest.raises(DeviceError, match="answered `fail` .* epoch 5"):
            await device.commit(5)
        assert device.acknowledged == 5 and on_flush.max_busy == 1
        await device.teardown()
        # The engine comes back (reprotection): a fresh start, numbering goes on.
        await device.setup()
        await device.postsuspend(0)
        assert await device.commit(0) == 0
        assert on_flush.calls == [0, 1, 2, 3, 4, 5, 6]
        await device.teardown()
        server.close()


async def test_device_sees_its_disk_die(tmp_path: Path) -> None:
    on_flush = Recorder()
    on_flush.gate(0)
    server = BlockRemusFifo(tmp_path, HOST, PORT, on_flush)
    device = BlockRemusDevice(server.control_path, timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await device.setup()
        await device.postsuspend(0)
        server.close()
    start = trio.current_time()
    with pytest.raises(DeviceError, match="it is gone"):
        await device.commit(0)
    assert trio.current_time() - start < 1.5  # at once, not after the timeout
    await device.teardown()
