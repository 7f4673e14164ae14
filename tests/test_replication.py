"""The replication engine in one process: verified replicas, cut streams, refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from tests._microvm_util import ConsoleLog, needs_kvm
from tremus import transports
from tremus.domains.base import Domain
from tremus.domains.registry import create_domain
from tremus.engine import backup as backup_module
from tremus.engine.backup import BackupOutcome, BackupSession
from tremus.engine.config import ProtectionConfig
from tremus.engine.events import (
    BackupLost,
    CheckpointAcked,
    CheckpointApplied,
    Event,
    FailoverComplete,
    FailoverRefused,
    FailoverStarted,
    ProtectionStarted,
)
from tremus.engine.primary import BackupLostError, PrimarySession

pytestmark = needs_kvm


@dataclass
class Pair:
    primary: PrimarySession
    backup: BackupSession
    domain: Domain
    primary_events: list[Event] = field(default_factory=list)
    backup_events: list[Event] = field(default_factory=list)
    backup_done: trio.Event = field(default_factory=trio.Event)
    outcome: BackupOutcome | None = None

    def of(self, kind: type[Event], side: str = "primary") -> list:
        events = self.primary_events if side == "primary" else self.backup_events
        return [e for e in events if isinstance(e, kind)]


class CuttingStream(trio.abc.Stream):
    """Wraps the primary's real stream; on ``cut()``, forwards half of the next
    send and then closes the connection (a link that dies mid-checkpoint)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.armed = False
        self.cut_done = trio.Event()

        self.skip = 0
        self.wait_for_pages = False

    def cut(self, after: int = 0, *, after_pages: bool = False) -> None:
        """Cut the next send (after letting ``after`` more sends through, or, with
        ``after_pages``, the next send of page data: the cut then lands after at
        least one whole PAGES frame of a checkpoint, before its end)."""
        self.armed = True
        self.skip = after
        self.wait_for_pages = after_pages

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.armed and self.wait_for_pages:
            if len(data) >= 1 << 20:
                self.wait_for_pages = False
        elif self.armed and self.skip:
            self.skip -= 1
        elif self.armed and not self.cut_done.is_set() and len(data) > 64:
            await self.inner.send_all(memoryview(data)[: len(data) // 2])
            await self.inner.aclose()
            self.cut_done.set()
            raise trio.BrokenResourceError("cut by the test")
        if self.cut_done.is_set():
            raise trio.BrokenResourceError("cut by the test")
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.cut_done.is_set():
            raise trio.ClosedResourceError("cut by the test")
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def protected(spec: str, config: ProtectionConfig, *, console: ConsoleLog | None = None,
                    wrap=lambda s: s, devices=()) -> AsyncIterator[Pair]:
    listener = await transports.listen("tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        domain = create_domain(spec)
        await nursery.start(domain.run)
        stream = wrap(await transports.connect(listener.url))
        accepted = await listener.accept()
        await listener.aclose()
        backup = BackupSession(accepted, config=config, console=console)
        for device in devices:
            device.domain = domain
        primary = PrimarySession(domain, stream, config=config, devices=devices)
        pair = Pair(primary, backup, domain)
        primary.events.add_callback(pair.primary_events.append)
        backup.events.add_callback(pair.backup_events.append)

        async def run_backup() -> None:
            pair.outcome = await backup.run()
            pair.backup_done.set()

        nursery.start_soon(run_backup)
        await nursery.start(primary.run)
        try:
            yield pair
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


class RamSnapshots:
    """A checkpoint device (a test double, not under test) that copies the primary's
    RAM at ``preresume``: the guest is suspended and the checkpoint has been taken."""

    name = "ram-snapshots"
    max_inflight = 1 << 20

    def __init__(self) -> None:
        self.domain: Domain | None = None
        self.by_epoch: dict[int, bytes] = {}

    async def setup(self) -> None: ...
    async def postsuspend(self, epoch: int) -> None: ...

    async def preresume(self, epoch: int) -> None:
        assert self.domain is not None
        self.by_epoch[epoch] = bytes(self.domain.ram)

    async def commit(self, epoch: int) -> int:
        return 0

    async def release_all(self) -> None: ...
    async def teardown(self) -> None: ...


# A small hot set rewritten all the time: with copy-on-write the guest writes the
# very pages being copied (the test lowers CopyOnWrite.min_pages to 1 for it).
SMALL_EPOCHS = "microvm:workload=dirty,memory=8M,ws=2M,rate=4000,pattern=hotset"
# Epochs of hundreds of pages: the backup applies them in a worker thread while the
# next checkpoint arrives (and a delta one waits for that apply before decoding).
LARGE_EPOCHS = "microvm:workload=dirty,memory=8M,ws=2M,rate=60000,pattern=sequential"


@pytest.mark.parametrize(("codec", "spec", "interval_ms", "capture"), [
    ("raw", SMALL_EPOCHS, 10, "cow"), ("delta", SMALL_EPOCHS, 10, "cow"),
    ("raw", LARGE_EPOCHS, 25, "cow"), ("delta", LARGE_EPOCHS, 25, "cow"),
    ("raw", SMALL_EPOCHS, 10, "copy"), ("delta", LARGE_EPOCHS, 25, "copy"),
], ids=["raw", "delta", "raw-large", "delta-large", "raw-copy", "delta-large-copy"])
async def test_verify_replica_equals_primary_at_every_checkpoint(
        codec: str, spec: str, interval_ms: float, capture: str) -> None:
    """With copy-on-write capture the guest writes (the hot set: the very pages being
    copied) while its checkpoint is copied; the replica must still be the RAM as it
    was at the suspend, every time."""
    config = ProtectionConfig(interval_ms=interval_ms, codec=codec, verify=True,
                              capture=capture)
    snapshots = RamSnapshots()
    compared: list[int] = []
    mismatched: list[int] = []
    async with protected(spec, config, devices=[snapshots]) as pair:
        if capture == "cow" and spec == SMALL_EPOCHS:
            pair.domain.copy_on_write().min_pages = 1  # type: ignore[attr-defined]

        def compare(event: Event) -> None:
            # Runs right after the backup applied the checkpoint, before the next one.
            if isinstance(event, CheckpointApplied):
                primary_ram = snapshots.by_epoch.pop(event.epoch)
                (compared if pair.backup.replica == primary_ram else mismatched).append(
                    event.epoch)

        pair.backup.events.add_callback(compare)

        def enough() -> bool:
            # 100 epochs, and as many more as a slow guest needs to show each case.
            if len(compared) + len(mismatched) < 100:
                return False
            if spec == LARGE_EPOCHS and sum(
                    e.pages >= backup_module._APPLY_IN_THREAD_PAGES
                    for e in pair.of(CheckpointApplied, "backup")[1:]) < 20:
                return False
            acked = pair.of(CheckpointAcked)
            if capture == "cow" and sum(e.copy_us > 0 for e in acked) < 20:
                return False
            return not (capture == "cow" and spec == SMALL_EPOCHS
                        and not any(e.cow_faults for e in acked))

        await wait_until(enough, timeout=120)
        assert mismatched == []
        applied = pair.of(CheckpointApplied, "backup")
        # Every applied checkpoint also matched the primary's RAM digest (--verify).
        assert len(applied) >= 100 and all(e.verified for e in applied)
        assert sum(e.dirty_pages for e in pair.of(CheckpointAcked)[1:]) > 100
        if spec == LARGE_EPOCHS:
            large = [e for e in applied[1:] if e.pages >= backup_module._APPLY_IN_THREAD_PAGES]
            assert len(large) >= 20, [e.pages for e in applied]
        assert pair.of(ProtectionStarted)[0].capture == capture
        acked = pair.of(CheckpointAcked)
        faults = sum(e.cow_faults for e in acked)
        print(f"{capture}: {faults} writes waited for their page in {len(acked)} epochs")
        if capture == "copy":
            assert faults == 0 and all(e.copy_us == 0 for e in acked)
        else:
            # Copy-on-write exactly when enough pages are dirty; how many epochs that
            # is depends on the guest's speed, so only the rule and a floor are checked.
            min_pages = pair.domain.copy_on_write().min_pages  # type: ignore[attr-defined]
            rows = [(e.dirty_pages, e.copy_us) for e in acked]
            assert all((copy_us > 0) == (dirty >= min_pages) for dirty, copy_us in rows), rows
            assert sum(copy_us > 0 for _, copy_us in rows) >= 20, rows
            if spec == SMALL_EPOCHS:
                assert faults > 0  # the guest did write pages that were being copied
        pair.primary.stop()
        await pair.backup_done.wait()
        assert pair.outcome is BackupOutcome.ENDED, pair.of(FailoverRefused, "backup")


async def test_stream_cut_mid_checkpoint_fails_over_to_the_previous_one() -> None:
    config = ProtectionConfig(interval_ms=20, codec="delta", verify=True)
    spec = "microvm:workload=counter,memory=8M,interval_ms=10"
    cutter: list[CuttingStream] = []

    def wrap(stream: trio.abc.Stream) -> CuttingStream:
        cutter.append(CuttingStream(stream))
        return cutter[0]

    console = ConsoleLog()
    async with protected(spec, config, wrap=wrap, console=console) as pair:
        await wait_until(lambda: len(pair.of(CheckpointAcked)) >= 10)
        cutter[0].cut()
        await wait_until(lambda: pair.of(FailoverComplete, "backup"))
        started = pair.of(FailoverStarted, "backup")[0]
        # The backup applied only complete checkpoints: the cut one was never applied.
        applied = [e.epoch for e in pair.of(CheckpointApplied, "backup")]
        assert started.epoch == applied[-1] == pair.backup.applied_epoch
        await wait_until(lambda: pair.of(BackupLost))
        # The failed-over guest runs and counts on.
        await console.wait_until(lambda c: len(c.counters()) >= 3)
        counts = console.counters()
        assert counts == list(range(counts[0], counts[0] + len(counts)))


async def test_cut_before_the_first_checkpoint_refuses_failover() -> None:
    config = ProtectionConfig(interval_ms=20)
    cutter: list[CuttingStream] = []

    def wrap(stream: trio.abc.Stream) -> CuttingStream:
        cutter.append(CuttingStream(stream))
        cutter[0].cut(after=1)  # HELLO passes; the first (full) checkpoint is cut
        return cutter[0]

    async with protected("microvm:workload=counter,memory=8M", config, wrap=wrap) as pair:
        await pair.backup_done.wait()
        assert pair.outcome is BackupOutcome.REFUSED
        assert "nothing to fail over to" in pair.of(FailoverRefused, "backup")[0].reason
        assert pair.backup.domain is None


@pytest.mark.parametrize("via_url", [False, True])
async def test_blackhole_acks_every_checkpoint_at_once(via_url: bool) -> None:
    domain = create_domain("microvm:workload=dirty,memory=8M,ws=1M,rate=2000")
    events: list[Event] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(domain.run)
        stream = await transports.connect("blackhole://") if via_url else None
        session = PrimarySession(domain, stream, config=ProtectionConfig(interval_ms=10))
        session.events.add_callback(events.append)
        await nursery.start(session.run)
        await wait_until(lambda: len([e for e in events if isinstance(e, CheckpointAcked)]) >= 20)
        session.stop()
        await session.stopped.wait()
        domain.stop()
    acks = [e for e in events if isinstance(e, CheckpointAcked)]
    assert [a.epoch for a in acks] == list(range(len(acks)))


class FailingDevice(RamSnapshots):
    """A device (test double) whose postsuspend fails at a given epoch."""

    name = "flaky"

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.released_all = False

    async def postsuspend(self, epoch: int) -> None:
        if epoch == self.fail_at:
            raise OSError("the buffer broke")

    async def preresume(self, epoch: int) -> None: ...

    async def release_all(self) -> None:
        self.released_all = True


async def test_device_failure_stops_protection_loudly_and_the_guest_runs_on() -> None:
    from tremus.engine.events import DeviceFailed

    device = FailingDevice(fail_at=5)
    config = ProtectionConfig(interval_ms=20)
    async with protected("microvm:workload=counter,memory=8M,interval_ms=10", config,
                         devices=[device]) as pair:
        await wait_until(lambda: pair.of(BackupLost))
        failed = pair.of(DeviceFailed)
        assert failed and failed[0].device == "flaky" and "broke" in failed[0].message
        # Released only once the backup can no longer take over (END may be lost).
        lost = pair.of(BackupLost)[0]
        assert lost.hold_ms > 0 and not device.released_all
        await wait_until(lambda: device.released_all, timeout=lost.hold_ms / 1000 + 5)
        await pair.backup_done.wait()
        # The backup was told (END): no failover.
        assert pair.outcome is BackupOutcome.ENDED, pair.of(FailoverRefused, "backup")
        assert not pair.of(FailoverStarted, "backup")
        acked = len(pair.of(CheckpointAcked))
        await trio.sleep(0.3)
        assert len(pair.of(CheckpointAcked)) == acked  # no more checkpoints
        assert not pair.domain.suspended


async def test_wrong_secret_is_refused_before_anything_is_staged() -> None:
    listener = await transports.listen("tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        domain = create_domain("microvm:workload=counter,memory=4M")
        await nursery.start(domain.run)
        stream = await transports.connect(listener.url)
        accepted = await listener.accept()
        backup = BackupSession(accepted, config=ProtectionConfig(auth_secret=b"right"))
        primary = PrimarySession(domain, stream, config=ProtectionConfig(auth_secret=b"wrong"))
        outcome: list[BackupOutcome] = []

        async def run_backup() -> None:
            outcome.append(await backup.run())

        nursery.start_soon(run_backup)
        with pytest.raises(BackupLostError, match="refused protection.*authentication failed"):
            await primary.run()
        with trio.fail_after(10):
            while not outcome:
                await trio.sleep(0.01)
        assert outcome == [BackupOutcome.REJECTED]  # never a protection session
        assert "auth" in backup.rejected_reason.lower() or "secret" in backup.rejected_reason
        assert backup.replica is None or not any(backup.replica)
        assert backup.applied_epoch is None
        domain.stop()


class SlowStream(trio.abc.Stream):
    """Wraps the primary's real stream and sends in small slow pieces, so that a
    stop lands in the middle of a checkpoint (a test double for a slow link)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sending = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 256 * 1024):
            if len(view) > 1 << 20:
                self.sending.set()
            await self.inner.send_all(view[start : start + 256 * 1024])
            await trio.sleep(0.01)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_stop_during_a_checkpoint_ends_gracefully_without_failover() -> None:
    slow: list[SlowStream] = []

    def wrap(stream: trio.abc.Stream) -> SlowStream:
        slow.append(SlowStream(stream))
        return slow[0]

    config = ProtectionConfig(interval_ms=20, codec="raw")
    async with protected("microvm:workload=counter,memory=8M", config, wrap=wrap) as pair:
        await slow[0].sending.wait()  # the full first checkpoint is on its way
        pair.primary.stop()
        await pair.backup_done.wait()
        assert pair.outcome is BackupOutcome.ENDED, pair.of(FailoverRefused, "backup")
        assert not pair.of(FailoverStarted, "backup")


async def test_a_large_guest_synchronises_without_looking_dead() -> None:
    """The first checkpoint of a large guest carries all of its RAM; neither side may
    mistake the time that takes for a dead peer (it once did, at 1 GiB)."""
    config = ProtectionConfig(interval_ms=50, heartbeat_ms=50, heartbeat_timeout_ms=200)
    spec = "microvm:workload=dirty,memory=512M,ws=16M,rate=5000"
    async with protected(spec, config) as pair:
        await wait_until(lambda: len(pair.of(CheckpointAcked)) >= 5, timeout=60)
        first = pair.of(CheckpointAcked)[0]
        assert first.epoch == 0 and first.dirty_pages == (512 << 20) // 4096
        assert not pair.of(BackupLost) and not pair.of(FailoverStarted, "backup")
        pair.primary.stop()
        await pair.backup_done.wait()
        assert pair.outcome is BackupOutcome.ENDED, pair.of(FailoverRefused, "backup")


async def test_a_checkpoint_cut_half_way_leaves_the_replica_at_the_last_complete_one() -> None:
    config = ProtectionConfig(interval_ms=150, codec="raw")
    # ~3000 pages an epoch: several PAGES frames per checkpoint.
    spec = "microvm:workload=dirty,memory=32M,ws=16M,rate=20000,pattern=sequential"
    snapshots = RamSnapshots()
    cutter: list[CuttingStream] = []

    def wrap(stream: trio.abc.Stream) -> CuttingStream:
        cutter.append(CuttingStream(stream))
        return cutter[0]

    async with protected(spec, config, wrap=wrap, devices=[snapshots]) as pair:
        await wait_until(lambda: len(pair.of(CheckpointAcked)) >= 4)
        cutter[0].cut(after_pages=True)  # whole PAGES frames arrive, then the cut
        await wait_until(lambda: pair.of(FailoverComplete, "backup"))
        epoch = pair.backup.applied_epoch
        assert epoch is not None
        assert pair.backup.replica == snapshots.by_epoch[epoch]
