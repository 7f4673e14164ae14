"""Protecting a running guest: one protection after another, started and stopped at will.

``tremus protect`` protects the guest it starts; the control socket stops protection
(the guest keeps running) and starts it again, to the same backup or another; a
backup service protects a guest that failed over to it (failback). All of them run
a ``Protector``: it owns no guest, only the protection of one — connect, build the
output buffers, run a ``PrimarySession``, and after a lost backup try again every
``reprotect`` seconds, each time from a full checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, final

import trio

from tremus import transports
from tremus._diskwiring import disk_name, open_disk_replication
from tremus._groups import collapse_groups
from tremus._wiring import NetbufError, open_console, open_netbuf
from tremus.buffers.blockremus import BlockRemusDevice
from tremus.buffers.diskrep import DiskReplicationError
from tremus.domains.base import Domain, guest_name
from tremus.engine.config import ProtectionConfig
from tremus.engine.devices import CheckpointDevice
from tremus.engine.events import EventHub, Operation
from tremus.engine.ownership import Ownership
from tremus.engine.primary import BackupLostError, PrimarySession

__all__ = ["ProtectPlan", "ProtectionError", "Protector", "TlsFiles", "ssl_context", "url_of"]


class ProtectionError(Exception):
    """Protection cannot start as asked (a bad option, a refusal): the message says why."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


def url_of(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


def ssl_context(tls: TlsFiles, url: str, *, server: bool) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (None unless it is ``tls://``), files checked first."""
    if not url.startswith("tls://"):
        if tls.cert or tls.ca:
            raise ProtectionError("--tls-cert/--tls-ca need a tls:// address")
        return None
    for option, path in (("--tls-cert", tls.cert), ("--tls-key", tls.key),
                         ("--tls-ca", tls.ca)):
        if path and not os.path.isfile(path):
            raise ProtectionError(f"{option} {path}: no such file")
    try:
        if server:
            if not tls.cert:
                raise ProtectionError("listening on tls:// needs --tls-cert (and --tls-key)")
            return transports.server_context(tls.cert, tls.key, tls.ca)
        return transports.client_context(tls.ca, tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ProtectionError(f"TLS setup: {exc}") from None


#: ``ownership_for(key)``: the arbiter's record of guest ``key`` (``--arbiter``).
OwnershipFactory = Callable[[str], Ownership]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectPlan:
    """How to protect a guest: to which backup, with which buffers and options."""

    #: The backup's address or URL; None: blackhole (checkpoints are dropped).
    backup: str | None
    config: ProtectionConfig = field(default_factory=ProtectionConfig)
    netbuf: str = "auto"
    nfqueue_num: int = 0
    unsafe: bool = False
    #: Where the disk replicates (``tap:remus:HOST:PORT``), if not to ``backup``.
    disk_target: tuple[str, int] | None = None
    disk_fifo: str | None = None
    replicate_disk: bool = True
    run_dir: str | None = None
    #: After the backup is lost, try again every this many seconds (None: do not).
    reprotect: float | None = None
    #: Keep trying until a backup first answers (failback to a host coming back).
    retry_first: bool = False
    ownership_for: OwnershipFactory | None = None
    arbiter_key: str | None = None
    tls: TlsFiles = TlsFiles()

    @property
    def name(self) -> str:
        return self.backup or "blackhole"


@final
class Protector:
    """The protection of one running guest, one session after another."""

    def __init__(self, domain: Domain, hub: EventHub) -> None:
        self.domain = domain
        self.events = hub
        self.plan: ProtectPlan | None = None
        self.session: PrimarySession | None = None
        self._stop = trio.Event()
        self._stop_reason = ""
        #: Set once a protection run is over (stopped, halted, given up).
        self.finished = trio.Event()
        self.finished.set()
        #: Why the last session stopped the guest (it may have been replaced), or "".
        self.halt_reason = ""

    @property
    def guest(self) -> str:
        return guest_name(self.domain.config)

    @property
    def active(self) -> bool:
        return not self.finished.is_set()

    def status(self) -> dict[str, Any]:
        session = self.session
        return {
            "protected": bool(session is not None and session.protected),
            "backup": self.plan.name if self.plan is not None and self.active else None,
            "epochs_acked": session.epochs_acked if session is not None else 0,
            "last_acked_epoch": session.last_acked_epoch if session is not None else -1,
            "interval_ms": self.plan.config.interval_ms if self.plan is not None else None,
        }

    def stop(self, reason: str) -> None:
        """End protection gracefully (END: the backup does not fail over); the guest runs on."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self, plan: ProtectPlan, *, stream: trio.abc.Stream | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Protect per ``plan`` until ``stop()`` or a halt; started once protected.

        ``stream``: a connection to ``plan.backup`` already made. The first attempt's
        failure raises (``ProtectionError``, ``OSError``) unless the plan says to retry,
        and completes the ``protect`` operation with it; later losses of the backup
        are retried every ``plan.reprotect`` seconds or leave the guest unprotected.
        """
        if self.active:
            raise ProtectionError(f"the guest is already protected to {self.plan.name}"
                                  if self.plan is not None else "the guest is already protected")
        self.plan = plan
        self._stop = trio.Event()
        self.finished = trio.Event()
        self.halt_reason = ""
        started = False

        def protected() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        self.session = None
        try:
            with collapse_groups():
                await self._run(plan, stream, protected)
        except (ProtectionError, OSError) as exc:
            if self.session is None:  # a session reports its own failure to start
                Operation[None]("protect", self.events).fail(exc)
            raise
        finally:
            self.finished.set()
        if not started:
            task_status.started()  # stopped before a backup ever answered

    async def _run(self, plan: ProtectPlan, stream: trio.abc.Stream | None,
                   protected: Callable[[], None]) -> None:
        started = False

        def first() -> None:
            nonlocal started
            started = True
            protected()

        if stream is None:
            stream = await self._first_stream(plan)
        while stream is not None or plan.backup is None:
            session = await self._protect_once(plan, stream, plan.retry_first or started,
                                               first)
            if session.halted.is_set():
                self.halt_reason = session.halt_reason
                break
            if self._stop.is_set() or not session.lost.is_set():
                break
            if plan.reprotect is None:
                await self._stop.wait()  # unprotected until told
                break
            stream = await self._reconnect(plan, plan.reprotect)

    async def _first_stream(self, plan: ProtectPlan) -> trio.abc.Stream | None:
        if plan.backup is None:
            return None
        try:
            return await self._connect(plan)
        except OSError:
            if not plan.retry_first:
                raise
        return await self._reconnect(plan, plan.reprotect or 2.0)

    async def _reconnect(self, plan: ProtectPlan, period: float) -> trio.abc.Stream | None:
        """Try every ``period`` seconds until a backup answers; None if stopped first."""
        while not self._stop.is_set():
            with trio.move_on_after(period):
                await self._stop.wait()
            if self._stop.is_set():
                return None
            with contextlib.suppress(OSError):
                return await self._connect(plan)
        return None

    async def _connect(self, plan: ProtectPlan) -> trio.abc.Stream:
        assert plan.backup is not None
        url = url_of(plan.backup)
        try:
            return await transports.connect(url, ssl_context=ssl_context(plan.tls, url,
                                                                         server=False))
        except transports.InvalidURL as exc:
            raise ProtectionError(str(exc)) from None

    async def _protect_once(self, plan: ProtectPlan, stream: trio.abc.Stream | None,
                            retrying: bool, protected: Callable[[], None]) -> PrimarySession:
        """One protection session, until ``stop()``, the loss of the backup, or a halt."""
        async with AsyncExitStack() as stack:
            # The buffers' own nurseries open before the session's and close after it.
            try:
                devices = await open_netbuf(plan.netbuf, self.domain, stack, unsafe=plan.unsafe,
                                            queue_num=plan.nfqueue_num)
                devices = [*await self._disk_devices(plan, stack), *devices,
                           *open_console(self.domain, unsafe=plan.unsafe)]
            except (NetbufError, DiskReplicationError, OSError) as exc:
                if stream is not None:
                    await stream.aclose()
                if not retrying:
                    raise ProtectionError(str(exc)) from None
                return self._refused_session(plan, str(exc))
            key = plan.arbiter_key or self.guest
            session = PrimarySession(
                self.domain, stream, config=plan.config, hub=self.events, devices=devices,
                backup_name=plan.name,
                ownership=plan.ownership_for(key) if plan.ownership_for else None)
            self.session = session
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(session.run)
                except BackupLostError as exc:
                    if retrying or (plan.reprotect is not None and stream is not None):
                        session.lost.set()
                        return session  # a backup that refused us now may accept later
                    raise ProtectionError(f"cannot protect: {exc}") from None
                protected()

                async def until(event: trio.Event, scope: trio.CancelScope) -> None:
                    await event.wait()
                    scope.cancel()

                with trio.CancelScope() as waiting:
                    async with trio.open_nursery() as watchers:
                        watchers.start_soon(until, self._stop, waiting)
                        watchers.start_soon(until, session.lost, waiting)
                        watchers.start_soon(until, session.stopped, waiting)
                lost = session.lost.is_set() and not self._stop.is_set()
                session.stop("backup lost; protecting again" if lost
                             else self._stop_reason or "stopped")
                await session.stopped.wait()
        return session

    def _refused_session(self, plan: ProtectPlan, reason: str) -> PrimarySession:
        """A session that never started (its devices could not be set up): lost."""
        session = PrimarySession(self.domain, None, config=plan.config, hub=EventHub())
        session.lost.set()
        Operation[None]("protect", self.events).fail(ProtectionError(reason))
        return session

    async def _disk_devices(self, plan: ProtectPlan, stack: AsyncExitStack
                            ) -> list[CheckpointDevice]:
        """The block-remus device of this session's disk (and what serves its fifo)."""
        config = plan.config
        timeout = config.heartbeat_timeout_ms / 1000 * 10
        if plan.disk_fifo:
            return [BlockRemusDevice(plan.disk_fifo, timeout=timeout)]
        if (plan.backup is None or not plan.replicate_disk
                or getattr(self.domain, "disk", None) is None):
            return []
        backup = plan.backup
        if plan.disk_target is None:
            parsed = transports.parse_url(url_of(backup))
            address = (parsed.host or "localhost", parsed.port or 0)
            url = url_of(backup)
        else:
            address = plan.disk_target
            scheme = "tls" if backup.startswith("tls://") else "tcp"
            url = f"{scheme}://{address[0]}:{address[1]}"

        async def connect() -> trio.abc.Stream:
            return await transports.connect(url, ssl_context=ssl_context(plan.tls, url,
                                                                         server=False))

        try:
            return await open_disk_replication(
                self.domain, stack, connect=connect, target=address,
                name=disk_name(self.guest), secret=config.auth_secret,
                run_dir=plan.run_dir, timeout=timeout, hub=self.events)
        except (OSError, DiskReplicationError) as exc:
            raise DiskReplicationError(f"disk replication to {url}: {exc}") from None
