"""Host side of the guest ABI (mirrors ``guest/abi.h``; documented in ``guest/ABI.md``)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000  # four page directories: 0x3000..0x6fff map up to 4 GiB
BOOT_INFO_ADDR = 0x8000
STACK_TOP = 0x80000
IMAGE_ADDR = 0x100000
WORKING_SET_ADDR = 0x200000
MIN_RAM = 2 << 20
MAX_RAM = 4 << 30

BOOT_INFO_MAGIC = 0x494253554D455254
BOOT_INFO_VERSION = 2

PORT_CONSOLE = 0x510
PORT_CLOCK_LO = 0x520
PORT_CLOCK_HI = 0x524
PORT_IDLE = 0x530
PORT_EXIT = 0x540
PORT_NIC_RX = 0x550
PORT_NIC_TX = 0x554
PORT_DISK = 0x560  # out: guest-physical address of a disk request descriptor (doorbell)
PORT_DISK_GEN = 0x564  # in: the disk's restore generation

# The NIC's buffer area (one page between the stack and the image; boot_info.net_buf
# points here when the machine has a NIC, else it is 0).
NET_BUF_ADDR = 0x90000
NET_RX_OFFSET = 0  # the VMM copies a received frame here
NET_TX_OFFSET = 2048  # the guest builds the frame to send here
NET_FRAME_MAX = 2048  # largest frame either way (Ethernet header included, no FCS)
NET_FRAME_MIN = 14  # an Ethernet header

KV_UDP_PORT = 7000

# The block device (boot_info.disk_sectors != 0; ABI.md, "Disk").
DISK_SECTOR_SIZE = 512
DISK_MAX_SECTORS = 2048  # per request (1 MiB)
DISK_OP_READ = 0
DISK_OP_WRITE = 1
DISK_OP_FLUSH = 2
DISK_OK = 0
DISK_E_RANGE = 1  # count 0 or > DISK_MAX_SECTORS, or past the end of the disk
DISK_E_OP = 2  # unknown op
DISK_E_IO = 3  # the host's I/O (or a replication hook) failed
DISK_E_BUF = 4  # the data buffer is not inside guest RAM
#: struct disk_req: op, count, sector, buf, status, reserved.
DISK_REQ = struct.Struct("<IIQQII")
DISK_REQ_STATUS_OFFSET = 24

WORKLOADS = {"counter": 1, "dirty": 2, "kv": 3, "diskwrite": 4}
PATTERNS = {"random": 0, "sequential": 1, "hotset": 2}

_BOOT_INFO = struct.Struct("<11Q8sIIQQQ")


@dataclass(frozen=True, slots=True)
class BootInfo:
    """What the guest reads at ``BOOT_INFO_ADDR`` to learn its job."""

    ram_size: int
    workload: int
    interval_us: int = 100_000
    ws_start: int = WORKING_SET_ADDR
    ws_pages: int = 0
    rate: int = 0
    pattern: int = 0
    hot_pages: int = 0
    seed: int = 1
    mac: bytes = b"\0" * 6
    ip: bytes = b"\0" * 4
    netmask: bytes = b"\0" * 4
    net_buf: int = 0
    disk_sectors: int = 0
    io_sectors: int = 0

    def pack(self) -> bytes:
        return _BOOT_INFO.pack(
            BOOT_INFO_MAGIC, BOOT_INFO_VERSION, self.ram_size, self.workload, self.interval_us,
            self.ws_start, self.ws_pages, self.rate, self.pattern, self.hot_pages, self.seed,
            self.mac.ljust(8, b"\0"), int.from_bytes(self.ip, "little"),
            int.from_bytes(self.netmask, "little"), self.net_buf, self.disk_sectors,
            self.io_sectors,
        )
