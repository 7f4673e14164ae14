"""tremus embedded in an asyncio program (Trio guest mode)."""

from __future__ import annotations

import asyncio

import pytest
import trio

from tests._microvm_util import needs_kvm
from tremus import aio
from tremus.domains.registry import create_domain
from tremus.engine.config import ProtectionConfig
from tremus.engine.events import CheckpointAcked, EventHub, OperationCancelled, OperationComplete
from tremus.engine.primary import PrimarySession

pytestmark = needs_kvm


def test_protect_from_asyncio_with_events_and_callbacks() -> None:
    async def asyncio_main() -> tuple[list[int], list[str], int]:
        hub = EventHub()
        acked: list[int] = []
        completions: list[str] = []
        loop_thread_checks: list[bool] = []

        async def consume() -> None:
            async for event in aio.events(hub):
                loop_thread_checks.append(asyncio.get_running_loop() is not None)
                if isinstance(event, CheckpointAcked):
                    acked.append(event.epoch)
                    if len(acked) >= 10:
                        return

        async def trio_part() -> int:
            domain = create_domain("microvm:workload=dirty,memory=8M,ws=1M,rate=1000")
            async with trio.open_nursery() as nursery:
                await nursery.start(domain.run)
                session = PrimarySession(domain, None, config=ProtectionConfig(interval_ms=10),
                                         hub=hub)
                session.protection.add_done_callback(lambda op: completions.append(op.name))
                nursery.start_soon(session.run)
                await session.protection.wait()
                while session.epochs_acked < 12:
                    await trio.sleep(0.01)
                session.stop()
                await session.stopped.wait()
                domain.stop()
                return session.epochs_acked

        consumer = asyncio.create_task(consume())
        count = await aio.run(trio_part)
        await asyncio.wait_for(consumer, 10)
        return acked, completions, count

    acked, completions, count = asyncio.run(asyncio_main())
    assert acked[:10] == list(range(10))
    assert completions == ["protect"]
    assert count >= 12


def test_cancelling_the_asyncio_task_cancels_trio() -> None:
    cancelled: list[bool] = []

    async def trio_part() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)

    async def asyncio_main() -> None:
        task = asyncio.create_task(aio.run(trio_part))
        await asyncio.sleep(0.1)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(asyncio_main())
    assert cancelled == [True]


def test_operation_completion_event() -> None:
    from tremus.engine.events import Operation

    async def main() -> list[OperationComplete]:
        hub = EventHub()
        seen: list = []
        hub.add_callback(seen.append)
        op: Operation[int] = Operation("demo", hub)
        op.complete(7)
        assert await op.wait() == 7
        failed: Operation[int] = Operation("broken", hub)
        failed.fail(ValueError("nope"))
        try:
            await failed.wait()
        except ValueError:
            pass
        unneeded: Operation[int] = Operation("failover", hub)
        unneeded.cancel("the primary ended protection")
        with pytest.raises(OperationCancelled, match="the primary ended protection"):
            await unneeded.wait()
        return [e for e in seen if isinstance(e, OperationComplete)]

    events = trio.run(main)
    assert [(e.operation, e.ok, e.error, e.cancelled) for e in events] == [
        ("demo", True, None, False), ("broken", False, "nope", False),
        ("failover", False, "the primary ended protection", True)]
