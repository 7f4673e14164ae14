"""The micro-VM's block device, the ``diskwrite`` workload and ``kv`` on a disk.

Real KVM and real image files in ``tmp_path``. The device's request handler is also
tested directly against a RAM buffer (the error statuses a guest would rarely
produce); the kv tests use ``tests/test_kv.py``'s network namespace and TAP.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from tests._microvm_util import ConsoleLog, boot, needs_kvm
from tests.test_kv import (  # noqa: F401  (net: the fixture, used by name)
    HOST_IP,
    _udp,
    ask,
    needs_netns,
    net,
    running_kv,
)
from tremus.domains.base import DomainError
from tremus.domains.microvm import MicroVM, MicroVMConfig, abi
from tremus.domains.microvm.disk import Disk, open_image
from tremus.domains.microvm.driver import DRIVER
from tremus.domains.registry import create_domain

SECTOR = abi.DISK_SECTOR_SIZE
LOG_MAGIC = 0x564B53554D455254
REC_MAGIC = 0x3152564B


# -- helpers ------------------------------------------------------------------------------


class Ram:
    """A guest RAM stand-in for the device: a buffer and the pages marked dirty."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.dirty: set[int] = set()

    def mark_dirty(self, addr: int, length: int) -> None:
        self.dirty.update(range(addr // 4096, (addr + length - 1) // 4096 + 1))

    def request(self, disk: Disk, addr: int, op: int, sector: int, count: int, buf: int) -> int:
        abi.DISK_REQ.pack_into(self.buf, addr, op, count, sector, buf, 0xFFFFFFFF, 0)
        disk.io_out(abi.PORT_DISK, addr)
        status: int = struct.unpack_from("<I", self.buf, addr + abi.DISK_REQ_STATUS_OFFSET)[0]
        return status


def _disk(tmp_path: Path, ram: Ram, size: int = 64 << 10, name: str = "disk.img") -> Disk:
    return Disk.open(str(tmp_path / name), ram.view, ram.mark_dirty, size=size)


def _rec_sum(sector: bytes) -> int:
    h = 2166136261
    for (w,) in struct.iter_unpack("<I", sector[8:128]):
        h = ((h ^ w) * 16777619) & 0xFFFFFFFF
    return h


def kv_log(path: Path) -> list[tuple[int, str, str]]:
    """The records of the kv log in the image at ``path`` (ABI.md, "The kv log")."""
    data = path.read_bytes()
    magic, version, record_size, log_id = struct.unpack_from("<QIIQ", data, 0)
    assert (magic, version, record_size) == (LOG_MAGIC, 1, SECTOR)
    records = []
    for seq in range(1, len(data) // SECTOR):
        sector = data[seq * SECTOR : (seq + 1) * SECTOR]
        rmagic, rsum, rid, rseq, klen, vlen = struct.unpack_from("<IIQQBB", sector)
        if (rmagic, rid, rseq) != (REC_MAGIC, log_id, seq) or rsum != _rec_sum(sector):
            break
        records.append((seq, sector[32 : 32 + klen].decode(), sector[64 : 64 + vlen].decode()))
    return records


def _lines(log: ConsoleLog, prefix: str) -> list[str]:
    return [line for line in log.lines if line.startswith(prefix)]


async def _until_line(log: ConsoleLog, prefix: str, timeout: float = 30) -> str:
    await log.wait_until(lambda c: bool(_lines(c, prefix)), timeout=timeout)
    return _lines(log, prefix)[0]


# -- configuration and images -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("microvm:disk_size=16M", "disk_size= needs a disk"),
        ("microvm:disk=/tmp/x.img,disk_size=1000", "not a multiple of the 512-byte sector"),
        ("microvm:disk=/tmp/x.img,disk_size=1K", "too small"),
        ("microvm:disk=/tmp/x.img,io_size=1000", "io_size=1000 must be a multiple of 512"),
        ("microvm:disk=/tmp/x.img,io_size=2M", "io_size=2097152 must be a multiple"),
        ("microvm:workload=diskwrite,memory=4M", "workload=diskwrite needs a disk"),
        ("microvm:workload=diskwrite,disk=/tmp/x.img,pattern=hotset", "random or sequential"),
        ("microvm:workload=diskwrite,disk=/tmp/x.img,disk_size=8K,io_size=16K", "larger than"),
    ],
)
def test_bad_disk_options_give_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(DomainError, match=message):
        create_domain(spec)


def test_disk_options_and_boot_info() -> None:
    config = MicroVMConfig.from_options({"workload": "diskwrite", "disk": "/x.img",
                                         "disk_size": "16M", "io_size": "64K"})
    assert (config.disk, config.disk_size, config.io_size) == ("/x.img", 16 << 20, 64 << 10)
    info = config.boot_info()
    assert (info.disk_sectors, info.io_sectors) == (32768, 128)
    assert len(info.pack()) == 128 and abi.BOOT_INFO_VERSION == 2
    assert MicroVMConfig.from_dict(config.to_dict()) == config
    assert MicroVMConfig().boot_info().disk_sectors == 0


def test_image_is_created_sparse_and_checked(tmp_path: Path) -> None:
    path = str(tmp_path / "new.img")
    with pytest.raises(DomainError, match=f"disk image {path} does not exist; give disk_size"):
        open_image(path)
    with pytest.raises(DomainError, match=f"disk image {path} does not exist \\(a restored"):
        open_image(path, 1 << 20, create=False)
    fd, size = open_image(path, 16 << 20)
    try:
        st = os.stat(path)
        assert size == st.st_size == 16 << 20 and st.st_blocks * 512 < 1 << 20  # sparse
        with pytest.raises(DomainError, match=f"disk image {path} is in use"):
            open_image(path)
    finally:
        os.close(fd)
    with pytest.raises(DomainError, match=f"disk image {path} is {16 << 20} bytes, not disk_size"):
        open_image(path, 8 << 20)
    fd, size = open_image(path)  # its own size
    os.close(fd)
    assert size == 16 << 20
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 5000)
    with pytest.raises(DomainError, match=f"disk image {odd} is 5000 bytes: a disk is a multiple"):
        open_image(str(odd))
    with pytest.raises(DomainError, match=f"cannot create disk image {tmp_path}/no/such"):
        open_image(str(tmp_path / "no" / "such.img"), 1 << 20)


# -- the device's request handler, against a RAM buffer ----------------------------------


def test_write_then_read_and_the_hooks(tmp_path: Path) -> None:
    ram = Ram(2 << 20)
    disk = _disk(tmp_path, ram)
    writes: list[tuple[int, bytes]] = []
    flushes: list[int] = []
    disk.write_hook = lambda offset, data: writes.append((offset, bytes(data)))
    disk.flush_hook = lambda: flushes.append(len(writes))
    payload = bytes(range(256)) * 8  # four sectors
    ram.buf[0x4000 : 0x4000 + len(payload)] = payload
    assert ram.request(disk, 0x100, abi.DISK_OP_WRITE, 10, 4, 0x4000) == abi.DISK_OK
    assert writes == [(10 * SECTOR, payload)]
    assert (tmp_path / "disk.img").read_bytes()[10 * SECTOR : 14 * SECTOR] == payload
    assert ram.request(disk, 0x100, abi.DISK_OP_FLUSH, 0, 0, 0) == abi.DISK_OK
    assert flushes == [1]
    # A read lands in RAM and its pages (and the descriptor's status word) are dirty.
    ram.dirty.clear()
    assert ram.request(disk, 0x20100, abi.DISK_OP_READ, 9, 6, 0x9F00) == abi.DISK_OK
    assert ram.buf[0x9F00 + SECTOR : 0x9F00 + 5 * SECTOR] == payload
    assert ram.buf[0x9F00 : 0x9F00 + SECTOR] == bytes(SECTOR)
    assert ram.dirty == {0x9, 0xA, 0x20}
    assert len(writes) == 1 and flushes == [1]  # reads call no hook
    assert disk.counters == {"reads": 1, "read_bytes": 6 * SECTOR, "writes": 1,
                             "written_bytes": 4 * SECTOR, "flushes": 1, "errors": 0}
    # The largest request: DISK_MAX_SECTORS at once.
    big = os.urandom(abi.DISK_MAX_SECTORS * SECTOR)
    ram.buf[0x40000 : 0x40000 + len(big)] = big
    assert ram.request(disk, 0x100, abi.DISK_OP_WRITE, 0, abi.DISK_MAX_SECTORS,
                       0x40000) == abi.DISK_E_RANGE  # the disk is 64K: past its end
    disk.close()
    big_disk = _disk(tmp_path, ram, size=4 << 20, name="big.img")
    assert ram.request(big_disk, 0x100, abi.DISK_OP_WRITE, 1, abi.DISK_MAX_SECTORS,
                       0x40000) == abi.DISK_OK
    assert (tmp_path / "big.img").read_bytes()[SECTOR : SECTOR + len(big)] == big
    big_disk.close()


def test_bad_requests_get_their_status_and_change_nothing(tmp_path: Path) -> None:
    ram = Ram(256 << 10)
    disk = _disk(tmp_path, ram, size=64 << 10)  # 128 sectors
    seen: list[int] = []
    disk.write_hook = lambda offset, data: seen.append(offset)
    ram.buf[0x1000:0x3000] = b"\xaa" * 0x2000
    cases = [
        (abi.DISK_OP_WRITE, 127, 2, 0x1000, abi.DISK_E_RANGE),  # past the end
        (abi.DISK_OP_WRITE, 128, 1, 0x1000, abi.DISK_E_RANGE),
        (abi.DISK_OP_READ, 1 << 60, 1, 0x1000, abi.DISK_E_RANGE),
        (abi.DISK_OP_WRITE, 0, 0, 0x1000, abi.DISK_E_RANGE),  # no sectors
        (abi.DISK_OP_READ, 0, abi.DISK_MAX_SECTORS + 1, 0x1000, abi.DISK_E_RANGE),
        (7, 0, 1, 0x1000, abi.DISK_E_OP),
        (abi.DISK_OP_WRITE, 0, 2, (256 << 10) - SECTOR, abi.DISK_E_BUF),  # buffer leaves RAM
        (abi.DISK_OP_READ, 0, 1, 1 << 40, abi.DISK_E_BUF),
    ]
    for op, sector, count, buf, expected in cases:
        assert ram.request(disk, 0x80, op, sector, count, buf) == expected, (op, sector, count)
    assert seen == [] and disk.counters["errors"] == len(cases)
    assert (tmp_path / "disk.img").read_bytes() == bytes(64 << 10)
    # A replication hook that fails fails the request.
    def broken(offset: int, data: memoryview) -> None:
        raise ConnectionError("backup gone")

    disk.write_hook = broken
    assert ram.request(disk, 0x80, abi.DISK_OP_WRITE, 0, 1, 0x1000) == abi.DISK_E_IO
    assert isinstance(disk.last_error, ConnectionError)
    disk.flush_hook = lambda: broken(0, memoryview(b""))
    assert ram.request(disk, 0x80, abi.DISK_OP_FLUSH, 0, 0, 0) == abi.DISK_E_IO
    # A descriptor outside RAM stops the machine.
    with pytest.raises(DomainError, match="descriptor at 0x3ffe8 is outside guest RAM"):
        disk.io_out(abi.PORT_DISK, (256 << 10) - 24)
    # A host I/O error: the image's descriptor is no longer writable.
    os.close(disk.fd)
    disk.fd = os.open(tmp_path / "disk.img", os.O_RDONLY)
    disk.write_hook = None
    assert ram.request(disk, 0x80, abi.DISK_OP_WRITE, 0, 1, 0x1000) == abi.DISK_E_IO
    assert isinstance(disk.last_error, OSError)
    disk.close()


def test_device_state_saves_and_restores(tmp_path: Path) -> None:
    ram = Ram()
    disk = _disk(tmp_path, ram)
    assert ram.request(disk, 0, abi.DISK_OP_WRITE, 3, 2, 0x1000) == abi.DISK_OK
    assert disk.io_in(abi.PORT_DISK_GEN) == 0
    state = disk.save()
    disk.close()
    again = Disk.open(str(tmp_path / "disk.img"), ram.view, ram.mark_dirty, create=False)
    again.restore(state)
    assert again.generation == 1 and again.io_in(abi.PORT_DISK_GEN) == 1
    assert again.counters["writes"] == 1 and again.size == 64 << 10
    again.restore(again.save())
    assert again.generation == 2
    again.close()
    other = _disk(tmp_path, ram, size=128 << 10, name="other.img")
    with pytest.raises(DomainError, match=f"disk image {tmp_path}/other.img is 131072 bytes; "
                                          f"the checkpoint's disk has 65536"):
        other.restore(state)
    other.close()


# -- on KVM -------------------------------------------------------------------------------


@needs_kvm
async def test_diskwrite_hook_sees_every_write(tmp_path: Path) -> None:
    image = tmp_path / "dw.img"
    log = ConsoleLog()
    vm = boot(log, workload="diskwrite", memory="4M", disk=str(image), disk_size="256K",
              io_size="8K", rate="5000", pattern="sequential")
    assert vm.disk is not None and vm.config["disk_size"] == 256 << 10
    writes: list[tuple[int, int, bytes]] = []
    vm.disk.write_hook = lambda offset, data: writes.append((offset, len(data), bytes(data)))
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await log.wait_until(lambda c: "diskwrite 128" in c.lines)
        vm.stop()
    assert log.lines[0] == "diskwrite sectors=512 io=8192"
    assert len(writes) >= 128 and vm.disk.counters["writes"] == len(writes)
    # Sequential 8K writes from sector 0, wrapping at the end of the 256K disk.
    assert [offset for offset, _, _ in writes] == [(i * 8192) % (256 << 10)
                                                   for i in range(len(writes))]
    assert all(length == 8192 for _, length, _ in writes)
    # Every sector carries the write's number and its own sector number; the image
    # holds the last write to each place.
    data = image.read_bytes()
    for number, (offset, _, written) in enumerate(writes, 1):
        for i in range(16):
            assert struct.unpack_from("<QQ", written, i * SECTOR) == (number, offset // SECTOR + i)
    for offset, _, written in writes[-32:]:
        assert data[offset : offset + 8192] == written


@needs_kvm
async def test_diskwrite_random_pattern_stays_aligned_and_on_the_disk(tmp_path: Path) -> None:
    log = ConsoleLog()
    vm = boot(log, workload="diskwrite", memory="4M", disk=str(tmp_path / "r.img"),
              disk_size="1M", io_size="4K", rate="0", pattern="random")
    assert vm.disk is not None
    offsets: list[int] = []
    vm.disk.write_hook = lambda offset, data: offsets.append(offset)
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await log.wait_until(lambda c: "diskwrite 64" in c.lines)
        vm.stop()
    assert all(o % 4096 == 0 and o < 1 << 20 for o in offsets)
    assert len(set(offsets)) > len(offsets) // 4


@needs_kvm
async def test_a_read_lands_in_ram_and_its_pages_are_dirty(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(SECTOR) + b"\x5a" * (3 * SECTOR) + bytes((64 << 10) - 4 * SECTOR))
    vm = boot(None, workload="counter", memory="4M", disk=str(image))
    try:
        assert vm.disk is not None and vm.config["disk_size"] == 64 << 10
        desc, buf = 0x300000, 0x310F00  # the read spans pages 0x310 and 0x311
        abi.DISK_REQ.pack_into(vm.ram, desc, abi.DISK_OP_READ, 3, 1, buf, 0xFFFF, 0)
        vm.read_and_clear_dirty()
        assert vm.disk.io_in(abi.PORT_DISK_GEN) == 0
        vm.disk.io_out(abi.PORT_DISK, desc)
        assert struct.unpack_from("<I", vm.ram, desc + 24)[0] == abi.DISK_OK
        assert bytes(vm.ram[buf : buf + 3 * SECTOR]) == b"\x5a" * (3 * SECTOR)
        assert list(vm.read_and_clear_dirty()) == [0x300, 0x310, 0x311]
    finally:
        vm.close()


@needs_kvm
async def test_restore_opens_the_configured_image_and_bumps_the_generation(
    tmp_path: Path,
) -> None:
    image = tmp_path / "primary.img"
    vm = boot(None, workload="counter", memory="4M", disk=str(image), disk_size="64K")
    with pytest.raises(DomainError, match=f"disk image {image} is in use"):
        boot(None, workload="counter", memory="4M", disk=str(image))
    state = vm.save_state()
    ram = bytes(vm.ram)
    config: dict[str, Any] = dict(vm.config)
    vm.close()
    replica = tmp_path / "replica.img"
    shutil.copyfile(image, replica)
    image.unlink()  # the backup has its replica only
    restored = DRIVER.restore({**config, "disk": str(replica)}, memoryview(ram), state)
    try:
        assert isinstance(restored, MicroVM) and restored.disk is not None
        assert restored.disk.path == str(replica) and restored.config["disk"] == str(replica)
        assert restored.disk.generation == 1
    finally:
        restored.close()
    with pytest.raises(DomainError, match=f"disk image {image} does not exist"):
        DRIVER.restore(config, memoryview(ram), state)  # never created on restore
    assert not image.exists()
    with pytest.raises(DomainError, match="the checkpoint's machine has a disk"):
        DRIVER.restore({**config, "disk": None, "disk_size": 0}, memoryview(ram), state)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(32 << 10))
    with pytest.raises(DomainError, match=f"disk image {small} is 32768 bytes, not disk_size"):
        DRIVER.restore({**config, "disk": str(small)}, memoryview(ram), state)


# -- kv on a disk -------------------------------------------------------------------------

PAIRS = {f"key{i}": f"value {i}" for i in range(6)}


@needs_kvm
@needs_netns
@pytest.mark.usefixtures("net")
async def test_kv_is_durable_across_a_cold_boot(tmp_path: Path) -> None:
    image = tmp_path / "kv.img"
    log = ConsoleLog()
    async with running_kv(log, disk=str(image), disk_size="1M") as vm:
        assert _lines(log, "kv loaded") == ["kv loaded 0 records"]
        assert vm.disk is not None
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            for key, value in PAIRS.items():
                assert await ask(sock, f"SET {key} {value}") == f"OK {key}"
            assert await ask(sock, "SET key0 replaced") == "OK key0"
            assert await ask(sock, "GET key1") == "VAL key1 value 1"
        # One write and one flush per SET, each before its OK (a header at boot).
        assert vm.disk.counters["writes"] == len(PAIRS) + 2
        assert vm.disk.counters["flushes"] == len(PAIRS) + 2
    expected = [(i + 1, k, v) for i, (k, v) in enumerate(PAIRS.items())]
    assert kv_log(image) == [*expected, (len(PAIRS) + 1, "key0", "replaced")]
    # A new machine on the same image replays the log.
    log = ConsoleLog()
    async with running_kv(log, disk=str(image)):
        loaded = _lines(log, "kv loaded")
        assert loaded == [f"kv loaded {len(PAIRS) + 1} records"]
        assert log.lines.index(loaded[0]) < log.lines.index(_lines(log, "kv ready")[0])
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            assert await ask(sock, "GET key0") == "VAL key0 replaced"
            for key, value in list(PAIRS.items())[1:]:
                assert await ask(sock, f"GET {key}") == f"VAL {key} {value}"
            assert await ask(sock, "SET more after") == "OK more"
    assert kv_log(image)[-1] == (len(PAIRS) + 2, "more", "after")


@needs_kvm
@needs_netns
@pytest.mark.usefixtures("net")
async def test_kv_refuses_a_set_it_cannot_log(tmp_path: Path) -> None:
    async with running_kv(disk=str(tmp_path / "tiny.img"), disk_size="4K"):  # 7 records
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            for i in range(7):
                assert await ask(sock, f"SET k{i} {i}") == f"OK k{i}"
            assert await ask(sock, "SET k7 7") == "ERR disk full"
            assert await ask(sock, "GET k7") == "NONE k7"
            assert await ask(sock, "GET k6") == "VAL k6 6"


@needs_kvm
@needs_netns
@pytest.mark.usefixtures("net")
async def test_kv_checks_its_disk_after_a_restore(tmp_path: Path) -> None:
    image = tmp_path / "kv.img"
    lagging = tmp_path / "lagging.img"
    async with running_kv(disk=str(image), disk_size="1M") as vm:
        with _udp() as sock:
            await sock.bind((HOST_IP, 0))
            for i, (key, value) in enumerate(PAIRS.items()):
                if i == 4:
                    shutil.copyfile(image, lagging)  # a replica four records behind
                assert await ask(sock, f"SET {key} {value}") == f"OK {key}"
        await vm.suspend()
        state = vm.save_state()
        ram = bytes(vm.ram)
        config: dict[str, Any] = dict(vm.config)
    replica = tmp_path / "replica.img"
    shutil.copyfile(image, replica)

    async def restore(disk: Path) -> ConsoleLog:
        log = ConsoleLog()
        vm = DRIVER.restore({**config, "disk": str(disk)}, memoryview(ram), state,
                            console=log)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(vm.run)
                await _until_line(log, "kv disk ")
                with _udp() as sock:
                    await sock.bind((HOST_IP, 0))
                    assert await ask(sock, "GET key5") == "VAL key5 value 5"
                vm.stop()
        finally:
            vm.close()
        return log

    log = await restore(replica)
    assert _lines(log, "kv disk ") == [f"kv disk consistent at seq {len(PAIRS)}"]
    log = await restore(lagging)
    assert _lines(log, "kv disk ") == [f"kv disk MISMATCH memory seq {len(PAIRS)} disk seq 4"]
