"""Shared helpers for tests that run micro-VMs."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
import trio

from tremus.domains.microvm import MicroVM, MicroVMConfig

needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)

COUNTER = re.compile(r"^counter (\d+)$")


class ConsoleLog:
    """Collects console lines and lets a test wait for one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = trio.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def counters(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := COUNTER.match(line))]

    async def wait_until(self, predicate: Callable[[ConsoleLog], bool], timeout: float = 60) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()


def boot(console: ConsoleLog | None = None, **options: str) -> MicroVM:
    return MicroVM.boot(MicroVMConfig.from_options(options), console=console)
