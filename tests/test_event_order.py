"""Every epoch's events come in the order things happen: sent, acked, released.

The ACK of a checkpoint is read by the primary's receive task, which may run before
the sending task has come back from handing the checkpoint's last byte over; the
``checkpoint_sent`` of that epoch must still come before its ``checkpoint_acked``.
"""

from __future__ import annotations

import pytest
import trio

from tests._microvm_util import needs_kvm
from tremus import transports
from tremus.buffers.console import ConsoleBuffer
from tremus.domains.registry import create_domain
from tremus.engine.backup import BackupOutcome, BackupSession
from tremus.engine.config import ProtectionConfig
from tremus.engine.events import CheckpointAcked, CheckpointSent, Event, OutputReleased
from tremus.engine.primary import PrimarySession

pytestmark = needs_kvm

EpochEvent = CheckpointSent | CheckpointAcked | OutputReleased


class LateReturningStream(trio.abc.Stream):
    """Wraps the primary's stream: every send is passed on at once, but returns to
    the sender only a little later (a loaded host). The backup's ACK of a checkpoint
    is then read before the task that sent it runs again."""

    def __init__(self, inner: trio.abc.Stream, delay: float = 0.003) -> None:
        self.inner = inner
        self.delay = delay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        await trio.sleep(self.delay)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _protect_and_record(url: str, interval_ms: float, acks: int, *,
                              late: bool = False) -> tuple[list[Event], BackupOutcome | None]:
    """Protect a page-dirtying micro-VM over ``url`` until ``acks`` checkpoints were
    acknowledged; the primary's events in the order they were emitted, and how the
    backup ended. ``late``: the primary's sends return late (see ``LateReturningStream``)."""
    config = ProtectionConfig(interval_ms=interval_ms)
    events: list[Event] = []
    outcome: list[BackupOutcome] = []
    listener = await transports.listen(url)
    async with trio.open_nursery() as nursery:
        domain = create_domain("microvm:workload=dirty,memory=8M,ws=2M,rate=4000,"
                               "pattern=hotset")
        await nursery.start(domain.run)
        stream: trio.abc.Stream = await transports.connect(listener.url)
        if late:
            stream = LateReturningStream(stream)
        accepted = await listener.accept()
        await listener.aclose()
        backup = BackupSession(accepted, config=config)
        # A device, so that every epoch's output is released (and says so).
        primary = PrimarySession(domain, stream, config=config,
                                 devices=[ConsoleBuffer(domain)])
        primary.events.add_callback(events.append)

        async def run_backup() -> None:
            outcome.append(await backup.run())

        nursery.start_soon(run_backup)
        await nursery.start(primary.run)
        with trio.fail_after(60):
            while sum(isinstance(e, CheckpointAcked) for e in events) < acks:
                await trio.sleep(0.01)
        primary.stop()
        with trio.fail_after(30):
            await primary.stopped.wait()
            while not outcome:
                await trio.sleep(0.01)
        domain.stop()
    return events, outcome[0] if outcome else None


@pytest.mark.parametrize(("url", "late"), [
    ("tcp://127.0.0.1:0", False),
    ("memory://event-order", False),
    ("tcp://127.0.0.1:0", True),
])
async def test_every_epoch_is_sent_then_acked_then_released(url: str, late: bool) -> None:
    events, outcome = await _protect_and_record(url, interval_ms=10, acks=20, late=late)
    assert outcome is BackupOutcome.ENDED
    seen: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, EpochEvent):
            seen.setdefault(event.epoch, []).append(event.name)
    acked = [epoch for epoch, names in seen.items() if "checkpoint_acked" in names]
    assert len(acked) >= 20, f"only {len(acked)} epochs acked"
    expected = ["checkpoint_sent", "checkpoint_acked", "output_released"]
    out_of_order = {epoch: names for epoch, names in seen.items()
                    if epoch in acked and names != expected}
    assert not out_of_order, (f"{len(out_of_order)} of {len(acked)} epochs out of order: "
                              f"{dict(list(out_of_order.items())[:5])}")
    # Epochs still in flight at the stop were sent, never acked nor released.
    for epoch, names in seen.items():
        if epoch not in acked:
            assert names == ["checkpoint_sent"], (epoch, names)
    # Each kind of event comes epoch after epoch.
    for kind in (CheckpointSent, CheckpointAcked, OutputReleased):
        epochs = [e.epoch for e in events if isinstance(e, kind)]
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs), kind.name


async def test_the_sent_event_keeps_its_figures_when_the_ack_comes_first() -> None:
    events, _ = await _protect_and_record("tcp://127.0.0.1:0", interval_ms=10, acks=20,
                                          late=True)
    sent = {e.epoch: e for e in events if isinstance(e, CheckpointSent)}
    acked = [e for e in events if isinstance(e, CheckpointAcked)]
    assert acked
    for ack in acked:
        assert ack.epoch in sent
        assert sent[ack.epoch].bytes_sent == ack.bytes_sent
        assert sent[ack.epoch].dirty_pages == ack.dirty_pages
        assert sent[ack.epoch].pause_us == ack.pause_us
