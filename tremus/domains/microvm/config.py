"""Configuration of a micro-VM, parsed from a domain spec's options."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tremus.domains.base import DomainError
from tremus.domains.microvm import abi

__all__ = ["MicroVMConfig", "parse_size"]

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str, what: str) -> int:
    """``"16M"`` -> 16777216; bytes by default; K, M, G (optionally with ``iB``)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = raw[-1:] if raw[-1:] in ("K", "M", "G") else ""
    number = raw[: len(raw) - len(suffix)]
    if not number.isdigit():
        raise DomainError(f"{what}={text!r} is not a size (examples: 16M, 512K, 1G)")
    return int(number) * _SUFFIXES[suffix]


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

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> MicroVMConfig:
        """Validate ``key=value`` options of a ``microvm:`` spec, with clear errors."""
        known = {f.name for f in dataclasses.fields(cls)} | {"ws", "hot"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DomainError(
                f"unknown micro-VM option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if key in ("memory", "working_set", "ws", "hot_set", "hot"):
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
        if self.workload == "dirty" and self.working_set > self.memory - abi.WORKING_SET_ADDR:
            raise DomainError(
                f"working set {self.working_set >> 10}K does not fit in memory "
                f"{self.memory >> 10}K above the {abi.WORKING_SET_ADDR >> 10}K base"
            )

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
        )
