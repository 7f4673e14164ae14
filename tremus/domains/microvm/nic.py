"""The micro-VM's paravirtual NIC, backed by a TAP device (ABI: ``guest/ABI.md``).

RX happens in the vCPU thread when the guest polls: one non-blocking read from the
TAP, copied into the guest's RX buffer through ``MicroVM.write_ram`` (so the page is
in the next checkpoint's dirty set). TX also happens in the vCPU thread: the frame
goes to the TAP, unless a TX hook (the ``vmm`` output buffer) takes it to hold it
until its epoch is committed.

The device's persist state is its counters; frames in flight (in the TAP's queue or
in an output buffer) are not state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, final

from tremus.domains.microvm import abi
from tremus.domains.microvm.tap import Tap

__all__ = ["Nic", "TxHook", "default_mac", "garp_frame"]

#: Called in the vCPU thread with each frame the guest sends; returns True if it
#: took the frame (it will send it later, or drop it), False to let the NIC send it.
TxHook = Callable[[bytes], bool]

BROADCAST = b"\xff" * 6
_COUNTERS = ("rx_frames", "rx_bytes", "rx_dropped", "tx_frames", "tx_bytes", "tx_dropped")


def default_mac(tap: str) -> bytes:
    """A stable locally administered unicast MAC derived from the TAP name."""
    digest = hashlib.sha256(b"tremus-microvm-mac:" + tap.encode()).digest()
    return bytes([0x02, *digest[:5]])


def garp_frame(mac: bytes, ip: bytes) -> bytes:
    """A gratuitous ARP (an ARP request for our own address, broadcast)."""
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01" + mac + ip + b"\x00" * 6 + ip)
    return (BROADCAST + mac + b"\x08\x06" + arp).ljust(60, b"\0")


@final
class Nic:
    """Ports ``PORT_NIC_RX`` / ``PORT_NIC_TX`` over a TAP link."""

    name = "nic"
    ports: tuple[int, ...] = (abi.PORT_NIC_RX, abi.PORT_NIC_TX)

    def __init__(self, tap: Tap, ram: memoryview, write_ram: Callable[[int, bytes], None], *,
                 mac: bytes, ip: bytes, buf_addr: int = abi.NET_BUF_ADDR) -> None:
        self.tap = tap
        self.mac = mac
        self.ip = ip
        self._ram = ram
        self._write_ram = write_ram
        self._rx_addr = buf_addr + abi.NET_RX_OFFSET
        self._tx_addr = buf_addr + abi.NET_TX_OFFSET
        #: See ``TxHook``; installed by the ``vmm`` output buffer.
        self.tx_hook: TxHook | None = None
        #: rx/tx frames and bytes the guest received / sent (held frames included),
        #: frames dropped (too short or long, TAP refused them).
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: Set when the TAP failed (e.g. its link was deleted): RX stops, TX drops.
        self.failed: OSError | None = None
        #: The guest's last RX poll found nothing: the next frame ends its HLT (like
        #: an edge-triggered interrupt; a guest that never polls is never woken).
        self.rx_armed = False

    @property
    def usable(self) -> bool:
        return self.failed is None and self.tap.fd >= 0

    @property
    def wait_fd(self) -> int | None:
        """The descriptor whose readability should end the guest's HLT, if any."""
        return self.tap.fd if self.rx_armed and self.usable else None

    # -- port I/O (vCPU thread) -----------------------------------------------------
    def io_in(self, port: int) -> int:
        if port != abi.PORT_NIC_RX:
            return 0
        return self.receive()

    def io_out(self, port: int, value: int) -> None:
        if port != abi.PORT_NIC_TX:
            return
        if not abi.NET_FRAME_MIN <= value <= abi.NET_FRAME_MAX:
            self.counters["tx_dropped"] += 1
            return
        frame = bytes(self._ram[self._tx_addr : self._tx_addr + value])
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += value
        hook = self.tx_hook
        if hook is not None and hook(frame):
            return
        if not self.send(frame):
            self.counters["tx_dropped"] += 1

    def receive(self) -> int:
        """Copy the next received frame into the guest's RX buffer; its length, or 0."""
        self.rx_armed = False
        while self.usable:
            try:
                frame = self.tap.read()
            except OSError as exc:
                self.failed = exc
                return 0
            if frame is None:
                self.rx_armed = True
                return 0
            if not abi.NET_FRAME_MIN <= len(frame) <= abi.NET_FRAME_MAX:
                self.counters["rx_dropped"] += 1
                continue
            self._write_ram(self._rx_addr, frame)
            self.counters["rx_frames"] += 1
            self.counters["rx_bytes"] += len(frame)
            return len(frame)
        return 0

    # -- host side ------------------------------------------------------------------
    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Write a frame to the TAP now (no hold); False if it was dropped."""
        if not self.usable:
            return False
        try:
            return self.tap.write(frame)
        except OSError as exc:
            self.failed = exc
            return False

    def announce(self) -> bool:
        """Send a gratuitous ARP for the guest's IP and MAC (after failover)."""
        if self.ip == b"\0\0\0\0":
            return False
        return self.send(garp_frame(self.mac, self.ip))

    def close(self) -> None:
        self.tap.close()

    # -- persist --------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "rx_armed": self.rx_armed}

    def restore(self, state: dict[str, Any]) -> None:
        saved = state["counters"]
        self.counters = {k: int(saved.get(k, 0)) for k in _COUNTERS}
        self.rx_armed = bool(state["rx_armed"])
