"""Checkpoint devices: things that act at fixed points of every epoch.

The shape is libxl's checkpoint device model: each device has ``setup``,
``postsuspend``, ``preresume``, ``commit`` and ``teardown``; the runner calls one
operation on all devices in parallel and fails if any of them fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, final, runtime_checkable

import trio

__all__ = ["CheckpointDevice", "DeviceError", "DeviceRunner"]


class DeviceError(Exception):
    """A checkpoint device failed an operation."""

    def __init__(self, device: str, op: str, cause: BaseException | str) -> None:
        super().__init__(f"{device}: {op} failed: {cause}")
        self.device = device
        self.op = op
        self.cause = cause


@runtime_checkable
class CheckpointDevice(Protocol):
    """An output buffer or any other device that follows the epoch.

    ``postsuspend(epoch)`` closes the output of ``epoch`` (it was produced while the
    guest ran epoch ``epoch``); ``commit(epoch)`` releases it once the backup holds
    checkpoint ``epoch``; ``release_all()`` lets everything through when protection
    is lost (the guest keeps running, unprotected).
    """

    name: str
    #: How many closed-but-uncommitted epochs the device can hold (plug: 1).
    max_inflight: int
    # Optional: ``commit_stage`` (int, default 1). Commits run stage by stage, each
    # stage's devices in parallel: a disk (stage 0) must have said its epoch is
    # durable on the backup before network output (stage 1) may be released.
    # Optional: ``inline`` (bool, default False): the device's operations never wait
    # (in-memory holds); the runner calls them in turn rather than in a nursery, and
    # their ``postsuspend``/``preresume`` need not checkpoint (they run in the pause,
    # where every trip through the scheduler lengthens it).
    # Optional: ``on_output`` (``Callable[[], None] | None``), set by the engine before
    # ``setup``: a device calls it (from any thread) when it starts holding output in
    # the open epoch, so that an output-triggered engine checkpoints soon.

    async def setup(self) -> None: ...

    async def postsuspend(self, epoch: int) -> None: ...

    async def preresume(self, epoch: int) -> None: ...

    async def commit(self, epoch: int) -> int:
        """Release ``epoch``'s output; returns how many packets/writes were released."""

    async def release_all(self) -> None: ...

    async def teardown(self) -> None: ...


def _stage(device: CheckpointDevice) -> int:
    return int(getattr(device, "commit_stage", 1))


@final
class DeviceRunner:
    """Runs one operation over all devices in parallel (libxl's device runner)."""

    def __init__(self, devices: Sequence[CheckpointDevice]) -> None:
        self.devices = tuple(devices)
        stages = sorted({_stage(d) for d in self.devices})
        self._commit_stages = [DeviceRunner([d for d in self.devices if _stage(d) == stage])
                               for stage in stages] if len(stages) > 1 else []

    def notify_output(self, callback: Callable[[], None] | None) -> None:
        """Have every device that can tell call ``callback`` when it holds output."""
        for device in self.devices:
            if hasattr(device, "on_output"):
                device.on_output = callback  # type: ignore[attr-defined]

    @property
    def max_inflight(self) -> int:
        return min((d.max_inflight for d in self.devices), default=1 << 30)

    async def _each(self, op: str, *args: int) -> list[object]:
        """``op`` on every device; the first failure, as a DeviceError, after all ran.

        This runs inside the guest's pause, and a nursery costs tens of microseconds:
        devices whose operations never wait (``inline``: in-memory holds) run in turn
        here, and a nursery is opened only for two or more of the others.
        """
        results: list[object] = [None] * len(self.devices)
        errors: list[DeviceError] = []

        async def one(i: int, device: CheckpointDevice) -> None:
            try:
                results[i] = await getattr(device, op)(*args)
            except trio.Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - reported with device and op
                error = DeviceError(device.name, op, exc)
                error.__cause__ = exc
                errors.append(error)

        waiting = [(i, d) for i, d in enumerate(self.devices) if not getattr(d, "inline", False)]
        for i, device in enumerate(self.devices):
            if getattr(device, "inline", False):
                await one(i, device)
        if len(waiting) == 1:
            await one(*waiting[0])
        elif waiting:
            async with trio.open_nursery() as nursery:
                for i, device in waiting:
                    nursery.start_soon(one, i, device)
        if errors:
            raise errors[0]
        return results

    async def setup(self) -> None:
        await self._each("setup")

    async def postsuspend(self, epoch: int) -> None:
        await self._each("postsuspend", epoch)

    async def preresume(self, epoch: int) -> None:
        await self._each("preresume", epoch)

    async def commit(self, epoch: int) -> int:
        if self._commit_stages:
            return sum([await stage.commit(epoch) for stage in self._commit_stages])
        return sum(int(r or 0) for r in await self._each("commit", epoch))  # type: ignore[call-overload]

    async def release_all(self) -> None:
        await self._each("release_all")

    async def teardown(self) -> None:
        with trio.CancelScope(shield=True):
            await self._each("teardown")
