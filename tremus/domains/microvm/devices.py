"""Paravirtual port-I/O devices of the micro-VM, each with its own persist state.

Every device answers the ports it owns and saves/restores its state as a small
msgpack-able dict, so a backup can rebuild it (Firecracker's "persist" shape).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, final

from tremus.domains.base import DomainError
from tremus.domains.microvm import abi

__all__ = ["Clock", "Console", "ExitPort", "Idle", "LineHook", "PortDevice"]

#: Called in the vCPU thread with each line the guest prints; returns True if it took
#: the line (it will emit it later, or drop it), False to let the console emit it.
LineHook = Callable[[str], bool]


class PortDevice(Protocol):
    name: str
    ports: tuple[int, ...]

    def io_out(self, port: int, value: int) -> None: ...

    def io_in(self, port: int) -> int: ...

    def save(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


@final
class Clock:
    """Monotonic guest clock in nanoseconds, continuous across save and restore.

    The guest time is host monotonic time plus an offset; a restore sets the offset
    so that the clock continues from the saved reading and never goes back.
    """

    name = "clock"
    ports: tuple[int, ...] = (abi.PORT_CLOCK_LO, abi.PORT_CLOCK_HI)

    def __init__(self) -> None:
        self._offset = -time.monotonic_ns()
        self._latched = 0

    def now(self) -> int:
        return time.monotonic_ns() + self._offset

    def io_out(self, port: int, value: int) -> None:
        raise DomainError(f"clock: port {port:#x} is read-only")

    def io_in(self, port: int) -> int:
        if port == abi.PORT_CLOCK_LO:
            self._latched = self.now()
            return self._latched & 0xFFFFFFFF
        return self._latched >> 32

    def save(self) -> dict[str, Any]:
        return {"now": self.now(), "latched": self._latched}

    def restore(self, state: dict[str, Any]) -> None:
        self._offset = int(state["now"]) - time.monotonic_ns()
        self._latched = int(state["latched"])


@final
class Idle:
    """HLT with a deadline: the guest arms ``now + µs``, then halts until then."""

    name = "idle"
    ports: tuple[int, ...] = (abi.PORT_IDLE,)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.deadline: int | None = None

    def io_out(self, port: int, value: int) -> None:
        self.deadline = self._clock.now() + value * 1000

    def io_in(self, port: int) -> int:
        return 0

    def remaining(self) -> float | None:
        """Seconds until the armed deadline (≤ 0 if passed), None if none is armed."""
        if self.deadline is None:
            return None
        return (self.deadline - self._clock.now()) / 1e9

    def save(self) -> dict[str, Any]:
        return {"deadline": self.deadline}

    def restore(self, state: dict[str, Any]) -> None:
        self.deadline = state["deadline"]


@final
class Console:
    """The guest hands over the address of a NUL-terminated line; one exit per line.

    Each line goes to ``emit``, unless a line hook (an output buffer holding the
    console until its epoch is committed) takes it.
    """

    name = "console"
    ports: tuple[int, ...] = (abi.PORT_CONSOLE,)
    MAX_LINE = 256

    def __init__(self, ram: memoryview, emit: Callable[[str], None]) -> None:
        self._ram = ram
        self._emit = emit
        self.lines = 0
        #: See ``LineHook``; installed by the console output buffer.
        self.line_hook: LineHook | None = None

    def io_out(self, port: int, value: int) -> None:
        if value >= len(self._ram):
            raise DomainError(f"console: line address {value:#x} is outside guest RAM")
        chunk = bytes(self._ram[value : value + self.MAX_LINE])
        end = chunk.find(b"\0")
        text = chunk if end < 0 else chunk[:end]
        self.lines += 1
        line = text.decode("utf-8", "replace")
        hook = self.line_hook
        if hook is not None and hook(line):
            return
        self._emit(line)

    def io_in(self, port: int) -> int:
        return 0

    def save(self) -> dict[str, Any]:
        return {"lines": self.lines}

    def restore(self, state: dict[str, Any]) -> None:
        self.lines = int(state["lines"])


@final
class ExitPort:
    """The guest stops the machine with a code (it found something it cannot handle)."""

    name = "exit"
    ports: tuple[int, ...] = (abi.PORT_EXIT,)

    def __init__(self) -> None:
        self.code: int | None = None

    def io_out(self, port: int, value: int) -> None:
        self.code = value

    def io_in(self, port: int) -> int:
        return 0

    def save(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass
