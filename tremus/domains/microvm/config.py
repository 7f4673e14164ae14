"""Configuration of a micro-VM, parsed from a domain spec's options.

Options (``microvm:key=value,...``):

- ``name``: the guest's name (letters, digits, ``-``, ``_``, ``.``): how a backup that
  serves several guests tells them apart, and how their replicas are named;
- ``workload``: ``counter``, ``dirty``, ``kv`` or ``diskwrite``; ``memory`` (e.g. ``16M``);
- ``interval_ms`` (counter: time between lines); ``rate`` (dirty: pages per second;
  diskwrite: writes per second, 0 = as fast as it can); ``pattern`` (``random``,
  ``sequential``, ``hotset``; diskwrite: ``random`` or ``sequential``); ``ws``/``hot``
  (dirty: working-set and hot-set sizes); ``seed``;
- a NIC: ``tap=NAME``, ``bridge=BR``, ``mac=02:..``, ``ip=A.B.C.D/NN``;
- a disk: ``disk=PATH`` (a raw image), ``disk_size=SIZE`` (creates a missing image,
  sparse; must match an existing one's size), ``io_size`` (diskwrite: bytes per
  write, a multiple of 512, default 4K).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tremus.domains.base import DomainError, valid_guest_name
from tremus.domains.microvm import abi
from tremus.domains.microvm.disk import MIN_DISK_SIZE
from tremus.domains.microvm.nic import default_mac
from tremus.domains.microvm.tap import valid_ifname

__all__ = ["MicroVMConfig", "parse_ip", "parse_mac", "parse_size"]

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str, what: str) -> int:
    """``"16M"`` -> 16777216; bytes by default; K, M, G (optionally with ``iB``)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = raw[-1:] if raw[-1:] in ("K", "M", "G") else ""
    number = raw[: len(raw) - len(suffix)]
    if not number.isdigit():
        raise DomainError(f"{what}={text!r} is not a size (examples: 16M, 512K, 1G)")
    return int(number) * _SUFFIXES[suffix]


def parse_mac(text: str) -> bytes:
    """``"02:aa:bb:cc:dd:ee"`` -> 6 bytes; a unicast, non-zero MAC."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise DomainError(f"mac={text!r} is not a MAC address (example: 02:00:00:00:00:01)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise DomainError(f"mac={text!r} is not a MAC address (example: 02:00:00:00:00:01)") from None
    if mac[0] & 1:
        raise DomainError(f"mac={text!r} is a multicast address; the NIC needs a unicast MAC")
    if mac == bytes(6):
        raise DomainError(f"mac={text!r} is all zeros")
    return mac


def parse_ip(text: str) -> ipaddress.IPv4Interface:
    """``"10.0.0.2/24"`` -> the guest's address and prefix (the prefix is required)."""
    if "/" not in text:
        raise DomainError(f"ip={text!r} needs a prefix length (example: 10.0.0.2/24)")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise DomainError(f"ip={text!r} is not an IPv4 address with a prefix "
                          f"(example: 10.0.0.2/24)") from None
    if not 1 <= iface.network.prefixlen <= 32:
        raise DomainError(f"ip={text!r}: prefix length must be within 1..32")
    addr = iface.ip
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise DomainError(f"ip={text!r} is not a unicast host address")
    if iface.network.prefixlen <= 30 and addr in (iface.network.network_address,
                                                  iface.network.broadcast_address):
        raise DomainError(f"ip={text!r} is the network or broadcast address of its subnet")
    return iface


def _parse_int(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise DomainError(f"{what}={text!r} is not an integer") from None
    if value < 0:
        raise DomainError(f"{what}={text!r} must not be negative")
    return value


@dataclass(frozen=True, slots=True)
class MicroVMConfig:
    """Everything needed to build (or rebuild, on a backup) a micro-VM."""

    name: str | None = None
    workload: str = "counter"
    memory: int = 16 << 20
    interval_ms: int = 100
    rate: int = 1000
    pattern: str = "random"
    working_set: int = 0  # bytes; 0 = all RAM above the working-set base
    hot_set: int = 0  # bytes; 0 = a tenth of the working set
    seed: int = 1
    tap: str | None = None
    bridge: str | None = None
    mac: str | None = None
    ip: str | None = None
    disk: str | None = None
    disk_size: int = 0  # bytes; 0 = the existing image's size
    io_size: int = 4096  # diskwrite: bytes per write

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> MicroVMConfig:
        """Validate ``key=value`` options of a ``microvm:`` spec (the keys are listed in
        this module's docstring), with clear errors."""
        known = {f.name for f in dataclasses.fields(cls)} | {"ws", "hot"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DomainError(
                f"unknown micro-VM option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if key in ("memory", "working_set", "ws", "hot_set", "hot", "disk_size", "io_size"):
                name = {"ws": "working_set", "hot": "hot_set"}.get(key, key)
                kwargs[name] = parse_size(value, key)
            elif key in ("interval_ms", "rate", "seed"):
                kwargs[key] = _parse_int(value, key)
            else:
                kwargs[key] = value
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MicroVMConfig:
        """Inverse of ``to_dict`` (the HELLO carries it to the backup)."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in names})
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.name is not None and not valid_guest_name(self.name):
            raise DomainError(f"name={self.name!r} is not a guest name: 1..64 letters, digits, "
                              f"'-', '_' or '.', not starting with '.'")
        if self.workload not in abi.WORKLOADS:
            raise DomainError(
                f"unknown workload {self.workload!r}; choose one of {', '.join(abi.WORKLOADS)}"
            )
        if self.memory % abi.PAGE_SIZE:
            raise DomainError(f"memory={self.memory} is not a multiple of the 4 KiB page size")
        least = abi.MIN_RAM if self.workload == "counter" else abi.WORKING_SET_ADDR + (64 << 10)
        if self.memory < least:
            raise DomainError(
                f"memory={self.memory >> 10}K is too small for workload {self.workload}: "
                f"the micro-VM needs at least {least >> 10}K"
            )
        if self.memory > abi.MAX_RAM:
            raise DomainError(f"memory={self.memory >> 20}M is too large: at most 4G")
        if self.pattern not in abi.PATTERNS:
            raise DomainError(
                f"unknown pattern {self.pattern!r}; choose one of {', '.join(abi.PATTERNS)}"
            )
        if self.interval_ms < 1 or self.interval_ms > 3_600_000:
            raise DomainError(f"interval_ms={self.interval_ms} must be within 1..3600000")
        self._validate_net()
        self._validate_disk()
        if self.workload == "dirty" and self.working_set > self.memory - abi.WORKING_SET_ADDR:
            raise DomainError(
                f"working set {self.working_set >> 10}K does not fit in memory "
                f"{self.memory >> 10}K above the {abi.WORKING_SET_ADDR >> 10}K base"
            )

    def _validate_net(self) -> None:
        for key in ("tap", "bridge"):
            name = getattr(self, key)
            if name is not None and not valid_ifname(name):
                raise DomainError(f"{key}={name!r} is not a valid interface name "
                                  f"(1..15 characters, no '/', ':' or spaces)")
        if self.tap is None:
            for key in ("bridge", "mac", "ip"):
                if getattr(self, key) is not None:
                    raise DomainError(f"{key}= needs a NIC: give tap=NAME as well")
        if self.mac is not None:
            parse_mac(self.mac)
        if self.ip is not None:
            parse_ip(self.ip)
        if self.workload == "kv" and (self.tap is None or self.ip is None):
            raise DomainError("workload=kv needs a NIC and an address: give tap=NAME and "
                              "ip=A.B.C.D/NN")

    def _validate_disk(self) -> None:
        if self.disk is None:
            if self.disk_size:
                raise DomainError("disk_size= needs a disk: give disk=PATH as well")
        elif not self.disk.strip():
            raise DomainError("disk= needs the path of a raw disk image")
        if self.disk_size % abi.DISK_SECTOR_SIZE:
            raise DomainError(f"disk_size={self.disk_size} is not a multiple of the "
                              f"{abi.DISK_SECTOR_SIZE}-byte sector")
        if self.disk_size and self.disk_size < MIN_DISK_SIZE:
            raise DomainError(f"disk_size={self.disk_size} is too small: at least "
                              f"{MIN_DISK_SIZE >> 10}K")
        most = abi.DISK_MAX_SECTORS * abi.DISK_SECTOR_SIZE
        if self.io_size % abi.DISK_SECTOR_SIZE or not 0 < self.io_size <= most:
            raise DomainError(f"io_size={self.io_size} must be a multiple of "
                              f"{abi.DISK_SECTOR_SIZE} within {abi.DISK_SECTOR_SIZE}.."
                              f"{most >> 10}K")
        if self.workload != "diskwrite":
            return
        if self.disk is None:
            raise DomainError("workload=diskwrite needs a disk: give disk=PATH "
                              "(and disk_size=SIZE to create it)")
        if self.pattern not in ("random", "sequential"):
            raise DomainError(f"workload=diskwrite writes a random or sequential pattern, "
                              f"not {self.pattern!r}")
        if self.io_size > self.memory - abi.WORKING_SET_ADDR:
            raise DomainError(f"io_size={self.io_size >> 10}K does not fit in memory "
                              f"{self.memory >> 10}K above the {abi.WORKING_SET_ADDR >> 10}K base")
        if self.disk_size and self.io_size > self.disk_size:
            raise DomainError(f"io_size={self.io_size} is larger than disk_size={self.disk_size}")

    @property
    def mac_bytes(self) -> bytes:
        """The guest's MAC: ``mac=`` or one derived from the TAP name (b"" without NIC)."""
        if self.mac is not None:
            return parse_mac(self.mac)
        return default_mac(self.tap) if self.tap is not None else b""

    @property
    def working_set_pages(self) -> int:
        available = (self.memory - abi.WORKING_SET_ADDR) // abi.PAGE_SIZE
        if self.working_set:
            return max(1, min(available, self.working_set // abi.PAGE_SIZE))
        return max(1, available)

    @property
    def hot_set_pages(self) -> int:
        if self.hot_set:
            return max(1, self.hot_set // abi.PAGE_SIZE)
        return max(1, self.working_set_pages // 10)

    def boot_info(self) -> abi.BootInfo:
        return abi.BootInfo(
            ram_size=self.memory,
            workload=abi.WORKLOADS[self.workload],
            interval_us=self.interval_ms * 1000,
            ws_pages=self.working_set_pages,
            rate=self.rate,
            pattern=abi.PATTERNS[self.pattern],
            hot_pages=self.hot_set_pages,
            seed=self.seed,
            disk_sectors=self.disk_size // abi.DISK_SECTOR_SIZE if self.disk is not None else 0,
            io_sectors=self.io_size // abi.DISK_SECTOR_SIZE,
            **self._net_boot_info(),
        )

    def _net_boot_info(self) -> dict[str, Any]:
        if self.tap is None:
            return {}
        info: dict[str, Any] = {"mac": self.mac_bytes, "net_buf": abi.NET_BUF_ADDR}
        if self.ip is not None:
            iface = parse_ip(self.ip)
            info["ip"] = iface.ip.packed
            info["netmask"] = iface.network.netmask.packed
        return info
