"""``tremus backup`` as a service: many primaries, one replica each, and bad clients survived.

Each connection is served in its own task. A disk stream (known by its first bytes)
goes to the guest's disk replica; anything else is a memory stream served by a
``BackupSession``. A session becomes a replica only once its HELLO is valid,
authenticated and acceptable: the guest's name (``name=`` in its SPEC) is not held
here already and its RAM fits. Whatever a connection does before that — close at
once, send garbage, fail its TLS handshake, give a wrong secret — ends as one
``connection_rejected`` event naming the peer and the reason, and touches nothing
else. A guest that fails over here keeps its name while it runs here, and can be
protected again from here (failback), to a backup that comes back on the old
primary's host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any, final

import trio

from tremus._diskwiring import BackupDisks, GuestDisks, sniff
from tremus._groups import describe
from tremus._protector import ProtectionError, Protector, ProtectPlan
from tremus.domains.base import Domain, guest_name
from tremus.engine import protocol as p
from tremus.engine.backup import BackupOutcome, BackupSession, Fence, OwnershipFactory
from tremus.engine.config import ProtectionConfig
from tremus.engine.events import (
    ConnectionRejected,
    Console,
    DomainStopped,
    Event,
    EventHub,
    PrimaryConnected,
    ReplicaClosed,
    ReplicaOpened,
)

__all__ = ["HANDSHAKE_TIMEOUT_ENV", "BackupService", "GuestState"]

#: How long a peer may take to say what it is (TLS handshake, first bytes), unless
#: ``HANDSHAKE_TIMEOUT_ENV`` (or ``BackupService(handshake_timeout=...)``) says otherwise.
_FIRST_BYTES_TIMEOUT = 30.0
#: The environment variable read when a ``BackupService`` starts: that timeout, in seconds.
HANDSHAKE_TIMEOUT_ENV = "TREMUS_HANDSHAKE_TIMEOUT_S"


def _handshake_timeout_from_env() -> float:
    """``HANDSHAKE_TIMEOUT_ENV`` as seconds, else the default; ProtectionError if it is
    set to anything but a positive number (a typo must not silently mean 30 s)."""
    text = os.environ.get(HANDSHAKE_TIMEOUT_ENV, "").strip()
    if not text:
        return _FIRST_BYTES_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ProtectionError(f"{HANDSHAKE_TIMEOUT_ENV}={text!r}: expected a positive number "
                              f"of seconds")
    return value


@final
@dataclass(slots=True)
class GuestState:
    """What the service holds of one guest."""

    name: str
    peer: str
    ram_bytes: int = 0
    #: ``replica`` (protected from elsewhere), ``running`` (failed over: it runs here).
    state: str = "admitted"
    session: BackupSession | None = None
    domain: Domain | None = None
    protector: Protector | None = None

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"guest": self.name, "state": self.state, "peer": self.peer}
        if self.session is not None:
            out["applied_epoch"] = self.session.applied_epoch
            hello = self.session.hello
            if hello is not None:
                out["ram_bytes"] = hello.ram_size
        if self.protector is not None:
            out["protection"] = self.protector.status()
        return out


def _peer_of(stream: trio.abc.Stream) -> str:
    inner: Any = stream
    while not isinstance(inner, trio.SocketStream):
        inner = getattr(inner, "transport_stream", None)
        if inner is None:
            return "?"
    try:
        name = inner.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name) or "unix"


def _tls_reason(exc: BaseException) -> str:
    return f"TLS handshake failed: {describe(exc).removeprefix('TLS: ')}"


async def _send_tls_alert(stream: trio.SSLStream[Any]) -> None:
    """Send the alert OpenSSL wrote when the handshake failed ("certificate required",
    "unknown ca"...), so the peer learns why; trio drops it when it raises."""
    outgoing = getattr(stream, "_outgoing", None)  # trio's MemoryBIO: no public way
    alert = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
    if alert:
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError,
                                                        trio.ClosedResourceError, OSError):
            await stream.transport_stream.send_all(alert)


@final
class BackupService:
    """Serves primaries on ``listener`` until ``stop()`` (or, ``once``, after one).

    Args:
        listener: where primaries connect (memory and disk streams alike).
        config: heartbeat period and timeout, auth secret.
        hub: every event of every guest, tagged with its ``guest``.
        state_dir: where disk replicas are kept.
        fence, fence_timeout, ownership_for: as for ``BackupSession``.
        once: serve one primary, then end (after its guest stops, if it failed over).
        memory_limit: the most guest RAM this backup holds at once (replicas and guests
            running here), in bytes; a primary that would pass it is refused.
        failback: how to protect a guest that failed over here (``backup`` is where);
            None to leave it unprotected until asked (``protect``).
        handshake_timeout: how long a connection may take to finish its TLS handshake,
            and then to send its first bytes, before it is rejected (seconds); None:
            ``$TREMUS_HANDSHAKE_TIMEOUT_S``, else 30.
    """

    def __init__(self, listener: Any, *, config: ProtectionConfig, hub: EventHub,
                 state_dir: str, fence: Fence | None = None, fence_timeout: float = 0.0,
                 ownership_for: OwnershipFactory | None = None, once: bool = False,
                 failback: ProtectPlan | None = None, memory_limit: int | None = None,
                 handshake_timeout: float | None = None) -> None:
        self.listener = listener
        self.config = config
        self.events = hub
        self._fence = fence
        self._fence_timeout = fence_timeout
        self._ownership_for = ownership_for
        self._once = once
        self._failback = failback
        self._memory_limit = memory_limit
        self._handshake_timeout = (_handshake_timeout_from_env() if handshake_timeout is None
                                   else handshake_timeout)
        self.host = socket.gethostname()
        self.guests: dict[str, GuestState] = {}
        self.disks = BackupDisks(state_dir, hub, secret=config.auth_secret,
                                 timeout=config.heartbeat_timeout_ms / 1000 * 10,
                                 admit=self._admit_disk)
        self._stopping = trio.Event()
        self._stop_reason = ""
        self._once_served = trio.Event()
        self._once_taken = False
        self._nursery: trio.Nursery | None = None
        #: The outcome of the one session of a ``once`` service.
        self.outcome: BackupOutcome | None = None

    # -- public ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"role": "backup", "listen": self.listener.url, "host": self.host,
                "guests": [g.status() for g in self.guests.values()]}

    def stop(self, reason: str = "the backup is stopping") -> None:
        """End every protection gracefully (END: no primary fails over because of it),
        stop the guests that run here, and stop serving."""
        self._stop_reason = reason
        self._stopping.set()

    def guest(self, name: str | None) -> GuestState:
        if not name:
            if len(self.guests) == 1:
                return next(iter(self.guests.values()))
            raise ProtectionError(f"name the guest (one of: {', '.join(self.guests) or 'none'})")
        try:
            return self.guests[name]
        except KeyError:
            raise ProtectionError(f"no guest {name!r} here (held: "
                                  f"{', '.join(self.guests) or 'none'})") from None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._accept_loop, nursery)
            task_status.started()
            with trio.CancelScope() as waiting:
                async with trio.open_nursery() as watchers:
                    async def until(event: trio.Event) -> None:
                        await event.wait()
                        waiting.cancel()

                    watchers.start_soon(until, self._stopping)
                    watchers.start_soon(until, self._once_served)
            await self._stop_all()
            nursery.cancel_scope.cancel()

    async def _stop_all(self) -> None:
        reason = self._stop_reason or "the backup is stopping"
        with trio.move_on_after(10):
            for guest in list(self.guests.values()):
                if guest.protector is not None:
                    guest.protector.stop(reason)
                    await guest.protector.finished.wait()
                if guest.session is not None:
                    guest.session.stop(reason)
            while self.guests:
                await trio.sleep(0.01)

    # -- connections ----------------------------------------------------------------
    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await self.listener.accept()
            except OSError as exc:  # e.g. EMFILE: wait for connections to close
                self.events.emit(ConnectionRejected(peer="?", reason=f"accept failed: {exc}"))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        peer = _peer_of(stream)
        try:
            await self._serve_connection(stream, peer)
        except Exception as exc:  # noqa: BLE001 - one connection's failure is its own
            self.events.emit(ConnectionRejected(peer=peer, reason=f"internal error: {exc!r}"))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await stream.aclose()

    async def _serve_connection(self, stream: trio.abc.Stream, peer: str) -> None:
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self._handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
                reason = (f"no TLS handshake within {self._handshake_timeout:g} s"
                          if isinstance(exc, trio.TooSlowError) else _tls_reason(exc))
                self.events.emit(ConnectionRejected(peer=peer, reason=reason))
                await _send_tls_alert(stream)
                return
        try:
            is_disk, prefix, stream = await sniff(stream, self._handshake_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.events.emit(ConnectionRejected(peer=peer, reason=f"connection failed: {exc}"))
            return
        if is_disk:
            receiver = await self.disks.serve(stream, prefix)
            if receiver.name is None and receiver.lost:
                self.events.emit(ConnectionRejected(peer=peer, reason=receiver.lost))
            return
        if self._once:
            if self._once_taken:
                self.events.emit(ConnectionRejected(peer=peer, reason="this backup serves one "
                                                    "primary (--once) and already has it"))
                return
            self._once_taken = True
        await self._memory_session(stream, peer)

    def _admit_disk(self, name: str) -> str | None:
        guest = self.guests.get(name)
        if guest is not None and guest.state != "admitted":
            return f"this backup already holds guest {name!r} ({guest.state})"
        return None

    async def _memory_session(self, stream: trio.abc.Stream, peer: str) -> None:
        hub = EventHub()
        holder: list[GuestState] = []

        def forward(event: Event) -> None:
            if not holder or not session.accepted.is_set():
                return  # not a replica (yet): a rejection is reported as one event, below
            name = holder[0].name
            if isinstance(event, PrimaryConnected):
                self.events.emit(ReplicaOpened(guest=name, peer=peer,
                                               ram_bytes=event.ram_bytes))
            self.events.emit(dataclasses.replace(event, guest=name))

        hub.add_callback(forward)
        disks: list[GuestDisks] = []

        def admit(hello: p.Hello) -> str | None:
            name = guest_name(hello.config)
            held = self.guests.get(name)
            if held is not None:
                where = "runs here" if held.state == "running" else "is protected here"
                return (f"this backup already holds a guest named {name!r} (it {where}, "
                        f"from {held.peer}): give each guest its own name= in its SPEC")
            if self._stopping.is_set():
                return "this backup is stopping"
            held_bytes = sum(g.ram_bytes for g in self.guests.values())
            if self._memory_limit is not None and held_bytes + hello.ram_size > self._memory_limit:
                return (f"guest {name!r} needs {hello.ram_size >> 20} MiB for its replica; this "
                        f"backup holds {held_bytes >> 20} MiB of its --memory-limit "
                        f"{self._memory_limit >> 20} MiB")
            # The session from the start: stopping the backup must reach a live replica
            # (END to its primary), not only one whose outcome is known.
            state = GuestState(name=name, peer=peer, state="replica", ram_bytes=hello.ram_size,
                               session=session)
            self.guests[name] = state
            holder.append(state)
            disks.append(self.disks.for_guest(name, hub))
            return None

        async def apply_gate(epoch: int) -> bool:
            return await disks[0].apply_gate(epoch) if disks else True

        def prepare_failover(epoch: int, config: Any) -> Any:
            return disks[0].prepare_failover(epoch, config) if disks else config

        session = BackupSession(
            stream, config=self.config, hub=hub, peer=peer,
            console=lambda line: hub.emit(Console(line=line, host=self.host)),
            fence=self._fence, fence_timeout=self._fence_timeout,
            ownership_for=self._ownership_for, apply_gate=apply_gate,
            prepare_failover=prepare_failover, admit=admit)
        try:
            async with trio.open_nursery() as nursery:
                outcome = await nursery.start(session.run)
                if self._once:
                    self.outcome = outcome
                if outcome is BackupOutcome.REJECTED:
                    self.events.emit(ConnectionRejected(peer=peer,
                                                        reason=session.rejected_reason))
                    if self._once:
                        self._once_served.set()
                    return
                guest = holder[0]
                if outcome is not BackupOutcome.FAILED_OVER:
                    reason = ("the primary ended protection" if outcome is BackupOutcome.ENDED
                              else "failover refused")
                    self.events.emit(ReplicaClosed(guest=guest.name, outcome=outcome.value,
                                                   reason=reason))
                    return
                guest.state = "running"
                guest.domain = session.domain
                self.events.emit(ReplicaClosed(guest=guest.name, outcome=outcome.value,
                                               reason="the guest runs here now"))
                if session.domain is not None:
                    guest.protector = Protector(session.domain, hub)
                    if self._failback is not None:
                        nursery.start_soon(self._protect_guest, guest,
                                           dataclasses.replace(self._failback, retry_first=True))
            self.events.emit(DomainStopped(reason=self._stop_reason or "the guest stopped",
                                           host=self.host, guest=guest.name))
        finally:
            if holder:
                self.guests.pop(holder[0].name, None)
                self.disks.forget(holder[0].name)
            if self._once:
                self._once_served.set()

    async def _protect_guest(self, guest: GuestState, plan: ProtectPlan) -> None:
        """Protect a guest that runs here (failback); its failure is an event, not ours."""
        assert guest.protector is not None
        try:
            await guest.protector.run(plan)
        except (ProtectionError, OSError) as exc:
            self.events.emit(ConnectionRejected(peer=plan.name, guest=guest.name,
                                                reason=f"protecting {guest.name}: {exc}"))

    def protect(self, name: str | None, plan: ProtectPlan) -> GuestState:
        """Start protecting a guest that runs here (after a failover) to ``plan.backup``;
        it completes with the ``protect`` operation's event."""
        guest = self.guest(name)
        if guest.state != "running" or guest.protector is None or self._nursery is None:
            raise ProtectionError(f"guest {guest.name!r} does not run here (it is a replica)")
        if guest.protector.active:
            raise ProtectionError(f"guest {guest.name!r} is already protected to "
                                  f"{guest.protector.status()['backup']}")
        self._nursery.start_soon(self._protect_guest, guest, plan)
        return guest
