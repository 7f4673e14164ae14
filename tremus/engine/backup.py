"""The backup: receive, stage, verify, apply, ACK; detect failure; fail over.

Each checkpoint is staged (bounded memory), verified whole, applied to the replica
RAM with the native scatter, and only then acknowledged. A checkpoint that is not
complete and verified never touches the replica. When the primary fails — stream
error, EOF without END, a protocol error, or no byte within the heartbeat timeout —
the backup rebuilds the domain from the last applied checkpoint (through the domain
registry: the engine knows no concrete domain) and runs it. Before the first
complete checkpoint there is nothing to fail over to: it says so and starts nothing.
END means a graceful stop: the replica is discarded, no failover.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, final

import trio

from tremus._groups import collapse_groups
from tremus._memory import PayloadBuffers, prefaulted_buffer
from tremus.accel import impl
from tremus.domains.base import ConsoleSink, Domain, DomainError
from tremus.domains.registry import get_driver, restore_domain
from tremus.engine import protocol as p
from tremus.engine._link import Link
from tremus.engine._stall import StallWatch
from tremus.engine.config import INITIAL_SYNC_PATIENCE, ProtectionConfig, takeover_grace
from tremus.engine.events import (
    CheckpointApplied,
    EventHub,
    FailoverComplete,
    FailoverRefused,
    FailoverStarted,
    Operation,
    OwnershipLost,
    OwnershipRefused,
    OwnershipTaken,
    PrimaryConnected,
)
from tremus.engine.ownership import Ownership, OwnershipError

__all__ = [
    "BackupOutcome", "BackupSession", "Fence", "FencingFailed", "PrimaryFailed", "ReplicaDiverged",
]


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: From this many pages a checkpoint is applied in a worker thread (the scatter
#: releases the GIL), so the next one is received meanwhile; a smaller one costs
#: less than the thread's hand-off and is applied on the event loop.
_APPLY_IN_THREAD_PAGES = 256
#: Frame buffers kept for reuse after their checkpoint is applied, at most (and at
#: most the guest's RAM): a backup that serves many guests keeps its memory bounded.
_SPARE_PAYLOAD_BYTES = 256 << 20


#: Fault injection for tests: hold every ACK this long (an ACK the primary reads late).
_INJECT_ACK_DELAY: Final = float(os.environ.get("TREMUS_INJECT_ACK_DELAY_MS", "0")) / 1000


def _available_memory() -> int | None:
    """MemAvailable, less room for a checkpoint in flight (a replica must not OOM us)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 3 // 4
    except (OSError, ValueError):
        pass
    return None


class FencingFailed(Exception):
    """The fence could not make sure the primary is stopped: do not fail over."""


#: ``await fence(reason)``: stop the old primary for good before the guest runs here.
Fence = Callable[[str], Awaitable[None]]

#: ``ownership_for(key)``: this backup's handle on the arbiter's record of guest ``key``.
OwnershipFactory = Callable[[str], Ownership]

#: ``await apply_gate(epoch)``: True once checkpoint ``epoch`` may be applied (what else
#: belongs to it, e.g. a disk epoch, is held here), False if it never may: then neither
#: it nor any later checkpoint is applied, and a failover resumes the last one that was.
ApplyGate = Callable[[int], Awaitable[bool]]

#: ``prepare_failover(epoch, config)``: make this host's resources (disk replicas) match
#: checkpoint ``epoch``; returns the domain configuration to rebuild it with here.
PrepareFailover = Callable[[int, Mapping[str, Any]], Mapping[str, Any]]

#: ``admit(hello)``: None to accept this primary, else why it is refused (a backup
#: service refuses a guest whose name it already holds).
Admit = Callable[[p.Hello], str | None]


class PrimaryFailed(Exception):
    """The primary is gone (or broke the protocol); the message says how."""


class ReplicaDiverged(PrimaryFailed):
    """``--verify`` found the replica different from the primary's RAM."""


@final
class BackupOutcome(enum.Enum):
    ENDED = "ended"  # the primary stopped protection gracefully
    FAILED_OVER = "failed_over"  # the domain now runs here
    REFUSED = "refused"  # the primary failed before a complete checkpoint, or may not be replaced
    REJECTED = "rejected"  # never a protection session: no valid, acceptable HELLO


@final
class BackupSession:
    """Serves one primary over ``stream``.

    Args:
        stream: the accepted checkpoint stream.
        fence: called before failing over; it must make sure the primary can no
            longer run (power it off, cut its network) and return normally, or raise
            ``FencingFailed`` to refuse the failover. Without it, a backup that loses
            the primary to a network partition runs the guest while the primary may
            still be running it (split brain).
        config: heartbeat period and timeout, auth secret.
        hub: where events go.
        console: the failed-over guest's console lines (with the host name).
        peer: how the primary is named in events.
        fence_timeout: the most ``fence`` may take (seconds; it must give up by then):
            part of the takeover window the primary learns in the handshake.
        ownership_for: the arbiter (``--arbiter``): with it, the backup fails over only
            after it took the guest's ownership over, and only a primary that uses
            the same arbiter is accepted.
        apply_gate: awaited before each checkpoint is applied (a replicated disk
            holds memory checkpoint N until disk epoch N is durable here).
        prepare_failover: called before the domain is rebuilt here.
        admit: asked whether to accept the primary once its HELLO is valid.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        config: ProtectionConfig | None = None,
        hub: EventHub | None = None,
        console: ConsoleSink | None = None,
        peer: str = "primary",
        fence: Fence | None = None,
        fence_timeout: float = 0.0,
        ownership_for: OwnershipFactory | None = None,
        apply_gate: ApplyGate | None = None,
        prepare_failover: PrepareFailover | None = None,
        admit: Admit | None = None,
    ) -> None:
        self.config = config or ProtectionConfig()
        self.events = hub or EventHub()
        self._console = console
        self._peer = peer
        self._fence = fence
        self._fence_timeout = fence_timeout if fence is not None else 0.0
        self._ownership_for = ownership_for
        self._ownership: Ownership | None = None
        self._apply_gate = apply_gate
        self._frozen = False
        self._prepare_failover = prepare_failover
        self._admit = admit
        self._stop = trio.Event()
        self._stop_reason = ""
        #: Why the connection never became a protection session (``REJECTED``).
        self.rejected_reason = ""
        #: Set once WELCOME was sent: from then on this session holds a replica.
        self.accepted = trio.Event()
        self._conn = p.BackupConnection(secret=self.config.auth_secret)
        timeout = self.config.heartbeat_timeout_ms / 1000
        self._link = Link(self._conn, stream, PrimaryFailed, "primary",
                          stall_timeout=timeout * INITIAL_SYNC_PATIENCE)
        self._stalls = StallWatch(threshold=timeout / 2)
        self._link.distrust = self._stalls.stalled_after
        # When the primary certainly last heard from us: the send time of the newest
        # heartbeat it echoed (or of WELCOME). It gives up on us no earlier than its
        # timeout after that, and holds its output our takeover window longer.
        self._heartbeats_sent: deque[tuple[int, float]] = deque(maxlen=256)
        self._heard_by_primary = 0.0
        self._hello: p.Hello | None = None
        self._replica: mmap.mmap | None = None
        self._stager: p.CheckpointStager | None = None
        self._payload_buffers: PayloadBuffers | None = None
        self._state: bytes | None = None
        #: Clear while a checkpoint is being applied in the background.
        self._applied = trio.Event()
        self._applied.set()
        self.applied_epoch: int | None = None
        self._heartbeat_seq = 0
        self.host = socket.gethostname()
        #: The domain running here after a failover.
        self.domain: Domain | None = None
        #: Completes with ``FailoverComplete`` once the domain runs here; fails if the
        #: backup refused (nothing to fail over to); cancelled if the primary ended
        #: gracefully or the connection never became a protection session.
        self.failover: Operation[FailoverComplete] = Operation("failover", self.events)

    @property
    def hello(self) -> p.Hello | None:
        """The primary's HELLO, once received."""
        return self._hello

    def stop(self, reason: str = "the backup is stopping") -> None:
        """End gracefully: the primary is told (END) and goes on unprotected, the
        replica is discarded; after a failover, the guest running here stops."""
        self._stop_reason = reason
        self._stop.set()
        if self.domain is not None:
            self.domain.stop()

    @property
    def replica(self) -> memoryview | None:
        return None if self._replica is None else memoryview(self._replica)

    async def run(self, *, task_status: trio.TaskStatus[BackupOutcome] = trio.TASK_STATUS_IGNORED
                  ) -> BackupOutcome:
        """Receive checkpoints until the primary ends or fails.

        After a failover the restored domain runs inside this call until it stops
        or the call is cancelled; ``task_status.started`` reports the outcome as soon
        as it is known (so a caller can ``await nursery.start(session.run)``).
        """
        try:
            reason = await self._serve()
        except PrimaryFailed as exc:
            reason = str(exc)
            if not self.accepted.is_set():
                # Not a protection session yet (garbage, a wrong secret, a refused
                # HELLO): there is no replica to speak of.
                self.rejected_reason = reason
                self.failover.cancel(f"not a protection session: {reason}")
                task_status.started(BackupOutcome.REJECTED)
                return BackupOutcome.REJECTED
        finally:
            await self._link.aclose()
        if reason is None or self._stop.is_set():
            # The primary said END, or this backup was stopped and said END itself (the
            # primary may then close the connection at once): neither is a reason to
            # take over.
            self.failover.cancel(
                f"this backup was stopped ({self._stop_reason}): no failover"
                if self._stop.is_set() else "the primary ended protection: no failover needed")
            task_status.started(BackupOutcome.ENDED)
            return BackupOutcome.ENDED
        if self._state is None or self._replica is None or self._hello is None:
            refused = FailoverRefused(
                reason=f"{reason}; no complete checkpoint was received, nothing to fail over to")
            self.events.emit(refused)
            self.failover.fail(RuntimeError(refused.reason))
            task_status.started(BackupOutcome.REFUSED)
            return BackupOutcome.REFUSED
        return await self._failover(reason, task_status)

    # -- receiving ------------------------------------------------------------------
    async def _serve(self) -> str | None:
        """Returns None after END; raises PrimaryFailed on failure."""
        with collapse_groups(PrimaryFailed):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stalls.run)
                nursery.start_soon(self._until_stopped, nursery.cancel_scope)
                result = await self._handshake()
                if result is not None:
                    return result
                nursery.start_soon(self._heartbeat_loop)
                try:
                    return await self._receive_loop(nursery)
                finally:
                    nursery.cancel_scope.cancel()

    async def _until_stopped(self, serving: trio.CancelScope) -> None:
        """``stop()``: say END and stop serving (``_serve`` then returns None)."""
        await self._stop.wait()
        with trio.move_on_after(1), contextlib.suppress(*_IO_ERRORS, PrimaryFailed):
            await self._link.send(p.End(self._stop_reason))
        serving.cancel()

    async def _handshake(self) -> str | None:
        try:
            event = await self._link.next_event(
                self.config.heartbeat_timeout_ms / 1000 * INITIAL_SYNC_PATIENCE)
        except PrimaryFailed as exc:
            if isinstance(exc.__cause__, p.ProtocolError):
                # Tell the primary why (the connection is in error: a raw END frame).
                with trio.move_on_after(1), contextlib.suppress(*_IO_ERRORS):
                    await self._link.stream.send_all(  # type: ignore[union-attr]
                        p.encode_frame(p.End(str(exc.__cause__))))
            raise
        if isinstance(event, p.ConnectionClosed):
            raise PrimaryFailed("the peer closed the connection before sending HELLO")
        if not isinstance(event, p.Hello):
            raise PrimaryFailed(f"expected HELLO, got {type(event).__name__}")
        try:
            get_driver(event.driver)
        except DomainError as exc:
            await self._link.send(p.End(f"cannot rebuild this domain here: {exc}"))
            raise PrimaryFailed(f"refused the primary: {exc}") from None
        refusal = self._admit(event) if self._admit is not None else None
        if refusal is not None:
            await self._link.send(p.End(refusal))
            raise PrimaryFailed(f"refused the primary: {refusal}")
        self._hello = event
        if self._ownership_for is not None and not event.arbiter_key:
            reason = "this backup decides failover with an arbiter; give the primary --arbiter"
            await self._link.send(p.End(reason))
            raise PrimaryFailed(f"refused the primary: {reason}")
        if self._ownership_for is None and event.arbiter_key:
            reason = "the primary uses an arbiter; give this backup the same --arbiter"
            await self._link.send(p.End(reason))
            raise PrimaryFailed(f"refused the primary: {reason}")
        available = _available_memory()
        if available is not None and event.ram_size > available:
            reason = (f"the domain's {event.ram_size >> 20} MiB of RAM do not fit in this "
                      f"host's {available >> 20} MiB of available memory")
            await self._link.send(p.End(f"cannot hold a replica here: {reason}"))
            raise PrimaryFailed(f"refused the primary: {reason}")
        self._replica = await trio.to_thread.run_sync(prefaulted_buffer, event.ram_size)
        self._stager = p.CheckpointStager(memoryview(self._replica), page_size=event.page_size)
        # The replica holds nothing until the first checkpoint completes: write that
        # one straight into it (see CheckpointStager.write_through).
        self._stager.write_through = True
        self._link.conn.pages_landing = self._stager.landing  # its pages land in place
        # Frame buffers are used again once their checkpoint is applied (see _apply),
        # as many as one checkpoint of up to _SPARE_PAYLOAD_BYTES needs.
        self._payload_buffers = PayloadBuffers(min(event.ram_size, _SPARE_PAYLOAD_BYTES))
        self._link.conn.payload_buffers = self._payload_buffers
        features = tuple(f for f in event.features if f in p.SUPPORTED_FEATURES)
        standby = ""
        if self._ownership_for is not None:
            self._ownership = self._ownership_for(event.arbiter_key)
            standby = self._ownership.me
        self._heard_by_primary = trio.current_time()
        self.accepted.set()
        await self._link.send(p.Welcome(
            features=features, standby=standby, takeover_ms=round(self.takeover_window * 1000),
            timeout_ms=round(self.config.heartbeat_timeout_ms)))
        self.events.emit(PrimaryConnected(peer=self._peer, domain=event.driver,
                                          ram_bytes=event.ram_size))
        return None

    async def _receive_loop(self, nursery: trio.Nursery) -> str | None:
        """Stage checkpoints, acknowledge each once it is whole and verified, and
        apply it in the background (``_apply``) while the next one arrives.

        An apply always finishes, shielded, before the next one starts, before a
        delta frame is decoded against the replica, and before ``_serve`` returns
        (its nursery waits for it): a failover resumes exactly the last applied one.
        """
        assert self._stager is not None and self._replica is not None
        while True:
            # Until the first checkpoint is complete there is nothing to fail over to,
            # and a large guest's first (full) checkpoint can hold the primary's
            # loop for a while: be patient then, watchful after.
            timeout = self.config.heartbeat_timeout_ms / 1000
            if self._state is None:
                timeout *= INITIAL_SYNC_PATIENCE
            event = await self._link.next_event(timeout)
            if isinstance(event, p.CheckpointBegin | p.Pages | p.State | p.CheckpointEnd):
                if isinstance(event, p.Pages) and (self._stager.write_through
                                                   or event.codec != p.RAW):
                    await self._applied.wait()  # decoded against / written into the replica
                try:
                    done = self._stager.feed(event)
                except p.ProtocolError as exc:
                    raise PrimaryFailed(f"bad checkpoint: {exc}") from exc
                if done is not None:
                    await self._acknowledge(done, nursery)
            elif isinstance(event, p.Heartbeat):
                self._heard(event.echo)
            elif isinstance(event, p.End):
                self._stager.abort()
                self._state = None
                return None
            elif isinstance(event, p.ConnectionClosed):
                raise PrimaryFailed("the primary closed the connection without END")

    async def _acknowledge(self, checkpoint: p.CompleteCheckpoint, nursery: trio.Nursery) -> None:
        """ACK a whole, verified checkpoint, then apply it (the ACK's promise: this
        backup holds it and will fail over to it, or to a later one)."""
        assert self._stager is not None
        if self._frozen or (self._apply_gate is not None
                            and not await self._apply_gate(checkpoint.epoch)):
            self._frozen = True  # later checkpoints build on this one: none may follow
            return
        await self._applied.wait()
        if _INJECT_ACK_DELAY:
            await trio.sleep(_INJECT_ACK_DELAY)
        if checkpoint.applied:
            # The first, written through: the replica already holds its pages.
            self._commit(checkpoint, time.perf_counter())
            self._stager.write_through = False  # from now on the replica is worth keeping
            await self._send_while_serving(p.Ack(checkpoint.epoch))
            return
        if not await self._send_while_serving(p.Ack(checkpoint.epoch)):
            # The primary is gone (or ended: its END is read next). It never learnt
            # of this checkpoint: fail over, if at all, to the one before, as a
            # primary that died just before sending it would have us do; and since
            # later checkpoints build on this one, none may follow.
            self._frozen = True
            return
        self._applied = trio.Event()
        nursery.start_soon(self._apply, checkpoint, self._applied)

    async def _apply(self, checkpoint: p.CompleteCheckpoint, applied: trio.Event) -> None:
        # Shielded: the replica and the state that goes with it change together.
        with trio.CancelScope(shield=True):
            try:
                started = time.perf_counter()
                if checkpoint.pages >= _APPLY_IN_THREAD_PAGES:
                    await trio.to_thread.run_sync(self._scatter, checkpoint)
                else:
                    self._scatter(checkpoint)
                self._commit(checkpoint, started)
                # Nothing reads this checkpoint's frames again: their buffers serve
                # the next ones, already mapped in.
                if self._payload_buffers is not None:
                    self._payload_buffers.give_back(data.obj for _, data in checkpoint.batches)
            finally:
                applied.set()

    def _scatter(self, checkpoint: p.CompleteCheckpoint) -> None:
        assert self._replica is not None and self._hello is not None
        for pfns, data in checkpoint.batches:
            impl.scatter(self._replica, pfns, data, self._hello.page_size)

    def _commit(self, checkpoint: p.CompleteCheckpoint, started: float) -> None:
        """The replica holds ``checkpoint``'s pages: check them, keep its state."""
        assert self._replica is not None and self._hello is not None
        verified = None
        if checkpoint.ram_digest is not None:
            verified = int(impl.hash64(self._replica)) == checkpoint.ram_digest
            if not verified:
                # The checkpoint itself was verified before it was applied, so the
                # replica had diverged before it: it cannot be trusted for failover.
                self._state = None
                raise ReplicaDiverged(
                    f"after applying checkpoint {checkpoint.epoch} the replica does not match "
                    f"the primary's RAM digest: the replica is discarded"
                )
        self._state = checkpoint.state
        self.applied_epoch = checkpoint.epoch
        self._link.stall_timeout = self.config.heartbeat_timeout_ms / 1000
        apply_us = (time.perf_counter() - started) * 1e6
        self.events.emit(CheckpointApplied(
            epoch=checkpoint.epoch, pages=checkpoint.pages,
            bytes_received=checkpoint.pages * self._hello.page_size,
            apply_us=round(apply_us, 1), verified=verified))

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.config.heartbeat_ms / 1000)
            self._heartbeat_seq += 1
            self._heartbeats_sent.append((self._heartbeat_seq, trio.current_time()))
            heartbeat = p.Heartbeat(self._heartbeat_seq, time.time(),
                                    echo=self._conn.their_heartbeat_seq)
            if not await self._send_while_serving(heartbeat):
                return

    async def _send_while_serving(self, event: p.Event) -> bool:
        """Send ``event``; False if the connection is broken. How the primary went is
        for the receive loop to find out, not for a send: a primary that ended
        gracefully may close its socket right after END (with a reset, if our
        last frames were still unread there), and a send that fails before END is
        read must not make a graceful end look like a failure, or a failover."""
        try:
            await self._link.send(event)
        except PrimaryFailed:
            return False
        return True

    def _heard(self, echo: int) -> None:
        for seq, sent_at in self._heartbeats_sent:
            if seq == echo:
                self._heard_by_primary = max(self._heard_by_primary, sent_at)
                return

    @property
    def takeover_window(self) -> float:
        """Seconds after losing this backup that the primary must hold its output:
        our silence timeout, the fence's time, and a grace for late timers."""
        timeout = self.config.heartbeat_timeout_ms / 1000
        return timeout + self._fence_timeout + takeover_grace(timeout)

    def _too_late(self) -> str | None:
        """Why failing over now could resume a stale replica, or None.

        The primary gives up on us no earlier than its timeout after it last heard
        from us, then holds its output our takeover window before releasing
        anything we never acknowledged. Past that (this backup was stalled, or its
        failure detection ran late) it may have gone on without us.
        """
        assert self._hello is not None
        timeout = self.config.heartbeat_timeout_ms / 1000
        latest = (self._heard_by_primary + self._hello.timeout_ms / 1000 + timeout
                  + takeover_grace(timeout))
        late = trio.current_time() - latest
        if late <= 0:
            return None
        heard_ms = (trio.current_time() - self._heard_by_primary) * 1000
        return (f"the primary last heard from this backup {heard_ms:.0f} ms ago: it may have "
                f"gone on without it (this replica would be stale)")

    # -- failover -------------------------------------------------------------------
    async def _failover(self, reason: str,
                        task_status: trio.TaskStatus[BackupOutcome]) -> BackupOutcome:
        assert self._hello is not None and self._replica is not None and self._state is not None
        epoch = self.applied_epoch if self.applied_epoch is not None else -1
        refusal = await self._may_take_over()
        if refusal is not None:
            refused = FailoverRefused(reason=f"{reason}; {refusal}")
            self.events.emit(refused)
            self.failover.fail(RuntimeError(refused.reason))
            task_status.started(BackupOutcome.REFUSED)
            return BackupOutcome.REFUSED
        if self._fence is not None:
            try:
                await self._fence(reason)
            except FencingFailed as exc:
                refused = FailoverRefused(reason=f"{reason}; fencing the primary failed: {exc}")
                self.events.emit(refused)
                self.failover.fail(exc)
                task_status.started(BackupOutcome.REFUSED)
                return BackupOutcome.REFUSED
        self.events.emit(FailoverStarted(epoch=epoch, reason=reason))
        config = self._hello.config
        if self._prepare_failover is not None:
            try:
                config = self._prepare_failover(epoch, config)
            except Exception as exc:  # noqa: BLE001 - a refusal that names the cause
                refused = FailoverRefused(reason=f"{reason}; this host cannot run checkpoint "
                                                 f"{epoch}: {exc}")
                self.events.emit(refused)
                self.failover.fail(exc)
                task_status.started(BackupOutcome.REFUSED)
                return BackupOutcome.REFUSED
        domain = restore_domain(self._hello.driver, config,
                                memoryview(self._replica), self._state, console=self._console)
        self.domain = domain
        async with trio.open_nursery() as nursery:
            await nursery.start(domain.run)
            if self._ownership is not None:
                nursery.start_soon(self._keep_ownership, self._ownership, domain)
            announce = getattr(domain, "announce", None)
            if announce is not None:
                announce()  # tell the network where the guest is now (gratuitous ARP)
            downtime_ms = (trio.current_time() - self._link.last_received) * 1000
            complete = FailoverComplete(epoch=epoch, downtime_ms=round(downtime_ms, 1),
                                        host=self.host,
                                        disks=tuple(getattr(domain, "disk_paths", ())))
            self.events.emit(complete)
            self.failover.complete(complete)
            task_status.started(BackupOutcome.FAILED_OVER)
        return BackupOutcome.FAILED_OVER

    async def _may_take_over(self) -> str | None:
        """None if this backup may run the guest now, else why not."""
        ownership = self._ownership
        if ownership is None:
            return self._too_late()
        assert self._hello is not None
        # The arbiter decides: the primary's lease must have expired, and the standby
        # key must still name us (a primary that went on without us removed it).
        try:
            await ownership.take_over(wait=3 * ownership.lease_ttl + 2)
        except OwnershipError as exc:
            self.events.emit(OwnershipRefused(key=self._hello.arbiter_key, reason=str(exc)))
            return f"ownership refused by the arbiter: {exc}"
        self.events.emit(OwnershipTaken(key=self._hello.arbiter_key, owner=ownership.me,
                                        arbiter=ownership.url))
        return None

    async def _keep_ownership(self, ownership: Ownership, domain: Domain) -> None:
        """The guest runs here only while this side owns it."""
        assert self._hello is not None
        await ownership.keep()
        if ownership.lost.is_set():
            self.events.emit(OwnershipLost(
                key=self._hello.arbiter_key,
                reason="the lease could not be renewed in time: the guest is stopped here"))
            await domain.suspend()
            domain.stop()
