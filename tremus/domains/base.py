"""The `Domain` protocol: what the replication engine drives.

The engine never imports a concrete domain. It sees this protocol, and the backup
finds a driver by name in the registry (`tremus.domains.registry`) to rebuild a
domain from a RAM image and saved state at failover.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio

__all__ = [
    "ConsoleSink", "Domain", "DomainDriver", "DomainError", "Geometry", "guest_name",
    "valid_guest_name",
]

ConsoleSink = Callable[[str], None]


class DomainError(Exception):
    """A domain could not be created, started, suspended or restored."""


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of a domain's memory, as sent in HELLO."""

    ram_size: int
    page_size: int = 4096

    @property
    def pages(self) -> int:
        return self.ram_size // self.page_size


@runtime_checkable
class Domain(Protocol):
    """A running machine that can be checkpointed.

    Lifecycle: ``await nursery.start(domain.run)`` starts it; ``run`` returns when
    ``stop()`` is called (or the guest shuts down). ``suspend``/``resume`` park and
    release the vCPU; while suspended the RAM and the state are stable.
    """

    @property
    def driver(self) -> str:
        """Registry name of the driver that can restore this domain."""

    @property
    def config(self) -> Mapping[str, Any]:
        """The configuration a backup needs to rebuild the domain (msgpack-able)."""

    @property
    def geometry(self) -> Geometry: ...

    @property
    def ram(self) -> memoryview:
        """Guest RAM, writable, ``geometry.ram_size`` bytes."""

    @property
    def suspended(self) -> bool: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the domain until ``stop()``; reports started once the vCPU is running."""

    async def suspend(self) -> None:
        """Stop the vCPU; returns once it is out of the guest and parked."""

    async def resume(self) -> None:
        """Let a suspended vCPU run again."""

    def stop(self) -> None:
        """Ask ``run`` to end (the domain is destroyed)."""

    def read_and_clear_dirty(self) -> memoryview:
        """Page frame numbers written since the last call (guest and VMM writes),
        as a memoryview of unsigned 64-bit integers, ascending, valid until the next
        call. Only while suspended."""

    def save_state(self) -> bytes:
        """vCPU and device state as versioned bytes. Only while suspended."""


class DomainDriver(Protocol):
    """Builds domains of one kind; registered by name."""

    name: str

    def restore(
        self,
        config: Mapping[str, Any],
        ram: memoryview,
        state: bytes,
        *,
        console: ConsoleSink | None = None,
    ) -> Domain:
        """A new, not yet running domain from a RAM image and saved state."""


def valid_guest_name(name: str) -> bool:
    """A name that is safe as a file name and a metrics label."""
    return (0 < len(name) <= 64 and not name.startswith(".")
            and name.replace("-", "").replace("_", "").replace(".", "").isalnum()
            and name.isascii())


def guest_name(config: Mapping[str, Any]) -> str:
    """How a guest is named where several meet (a backup service, an arbiter, disk
    replicas): its ``name=``, else its MAC, else ``guest``."""
    name = config.get("name") or str(config.get("mac") or "").replace(":", "-")
    return str(name or "guest")
