"""``tremus`` commands as child processes whose JSON-line events are collected live.

Used by the demo, the tests and the benchmarks: start ``python -m tremus.cli ...
--json`` (optionally wrapped, e.g. in ``ip netns exec``), read its events as they
come, wait for one, and SIGKILL it (its whole session when it has its own).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, final

import trio

__all__ = ["TremusProcess", "start_tremus", "tremus_argv"]

# `python -m tremus.cli ARGS`, plus a watchdog: if the parent dies without killing
# its children (SIGKILL, a hard timeout), they exit instead of running on unowned.
_BOOT = """
import os, sys, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(137)
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "tremus"
from tremus.cli import main
sys.exit(main())
"""


def tremus_argv(args: Sequence[str]) -> list[str]:
    """The command line that runs ``tremus ARGS`` with a parent-death watchdog."""
    return [sys.executable, "-c", _BOOT, *args]


@final
class TremusProcess:
    """A running ``tremus ... --json`` child and the events it has printed so far."""

    def __init__(self, process: trio.Process, name: str, own_session: bool) -> None:
        self.process = process
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self.exited = trio.Event()
        self._own_session = own_session
        self._changed = trio.Event()
        self._listeners: list[Callable[[TremusProcess, dict[str, Any]], None]] = []

    def on_event(self, listener: Callable[[TremusProcess, dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    async def _pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "garbage", "line": line.decode("utf-8", "replace")}
                self.events.append(event)
                for listener in self._listeners:
                    listener(self, event)
            self._wake()
        self._wake()

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    async def _wait(self) -> None:
        await self.process.wait()
        self.exited.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    async def wait_for(self, predicate: Callable[[TremusProcess], Any], timeout: float = 60,
                       what: str = "a condition") -> Any:
        """The first truthy ``predicate(self)``; AssertionError (with the child's last
        events and stderr) on timeout or if the child exits first."""
        with trio.move_on_after(timeout):
            while True:
                result = predicate(self)
                if result:
                    return result
                if self.exited.is_set():
                    break
                await self._changed.wait()
        raise AssertionError(
            f"{self.name}: no {what} (exit={self.process.returncode}); last events="
            f"{self.events[-5:]} stderr={self.stderr.decode(errors='replace')[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the child (and its session, wrappers included, if it has one)."""
        if self.process.returncode is not None:
            return
        try:
            if self._own_session:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass


async def start_tremus(nursery: trio.Nursery, name: str, *args: str,
                       wrapper: Sequence[str] = (), own_session: bool = False,
                       env: dict[str, str] | None = None) -> TremusProcess:
    """Start ``[*wrapper] tremus ARGS`` and collect its events in ``nursery``."""
    process = await trio.lowlevel.open_process(
        [*wrapper, *tremus_argv(args)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=own_session,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    child = TremusProcess(process, name, own_session)
    nursery.start_soon(child._pump)
    nursery.start_soon(child._pump_stderr)
    nursery.start_soon(child._wait)
    return child
