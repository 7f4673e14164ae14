"""Run ``tremus`` commands as real OS processes and read their JSON-line events."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TremusProcess:
    """A ``python -m tremus.cli ... --json`` child whose events are collected as they come."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._changed = trio.Event()
        self.exited = trio.Event()

    async def _pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self.events.append(json.loads(line))
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    async def _wait(self) -> None:
        await self.process.wait()
        self.exited.set()
        self._changed.set()

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    async def wait_for(self, predicate: Callable[[TremusProcess], Any], timeout: float = 60,
                       what: str = "a condition") -> Any:
        with trio.move_on_after(timeout):
            while True:
                result = predicate(self)
                if result:
                    return result
                if self.exited.is_set() and not predicate(self):
                    break
                await self._changed.wait()
        raise AssertionError(
            f"{self.name}: timed out waiting for {what}; exit={self.process.returncode} "
            f"last events={self.events[-5:]} stderr={self.stderr.decode()[-2000:]}"
        )

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


async def start_tremus(nursery: trio.Nursery, name: str, *args: str) -> TremusProcess:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tremus.cli", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    child = TremusProcess(process, name)
    nursery.start_soon(child._pump)
    nursery.start_soon(child._pump_stderr)
    nursery.start_soon(child._wait)
    return child
