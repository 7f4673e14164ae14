"""The device runner: commits run stage by stage (disks before network output)."""

from __future__ import annotations

import trio

from tremus.engine.devices import DeviceRunner


class Recorder:
    """A checkpoint device (a test double) that logs its commits, optionally slowly."""

    max_inflight = 8

    def __init__(self, name: str, log: list[str], stage: int | None = None,
                 gate: trio.Event | None = None) -> None:
        self.name = name
        self.log = log
        self.gate = gate
        if stage is not None:
            self.commit_stage = stage

    async def setup(self) -> None: ...
    async def postsuspend(self, epoch: int) -> None: ...
    async def preresume(self, epoch: int) -> None: ...

    async def commit(self, epoch: int) -> int:
        if self.gate is not None:
            await self.gate.wait()
        self.log.append(f"{self.name} {epoch}")
        return 1

    async def release_all(self) -> None: ...
    async def teardown(self) -> None: ...


async def test_network_output_waits_for_the_disk_commit() -> None:
    log: list[str] = []
    durable = trio.Event()
    runner = DeviceRunner([Recorder("net", log), Recorder("disk", log, stage=0, gate=durable)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.commit, 3)
        await trio.sleep(0.05)
        assert log == []  # the network did not go first
        durable.set()
    assert log == ["disk 3", "net 3"]


async def test_devices_of_one_stage_commit_together() -> None:
    log: list[str] = []
    runner = DeviceRunner([Recorder("a", log), Recorder("b", log)])
    assert await runner.commit(1) == 2
    assert sorted(log) == ["a 1", "b 1"]
