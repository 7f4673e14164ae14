"""The ``tremus`` command: run, protect and back up domains."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import ssl
import sys
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

import trio

from tremus import transports
from tremus._diskwiring import BackupDisks, open_disk_replication, sniff
from tremus._groups import collapse_groups
from tremus._output import EventPrinter
from tremus._wiring import NETBUF_KINDS, NetbufError, open_console, open_netbuf
from tremus.buffers.blockremus import BlockRemusDevice
from tremus.buffers.diskrep import DiskReplicationError
from tremus.domains.base import Domain, DomainError
from tremus.domains.registry import create_domain
from tremus.engine.backup import BackupOutcome, BackupSession, Fence, FencingFailed
from tremus.engine.config import ConfigError, ProtectionConfig
from tremus.engine.devices import CheckpointDevice, DeviceError
from tremus.engine.events import BackupReady, Console, DomainStarted, DomainStopped, EventHub
from tremus.engine.ownership import Ownership
from tremus.engine.primary import BackupLostError, PrimarySession
from tremus.metrics import Metrics, serve_metrics

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tremus", description=__doc__)
    from tremus import __version__

    parser.add_argument("--version", action="version", version=f"tremus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a domain unprotected")
    run.add_argument("--domain", required=True, metavar="SPEC",
                     help="e.g. microvm:workload=counter,memory=16M")
    _disk_option(run)
    run.add_argument("--duration", type=_duration, metavar="S", help="stop after S seconds")
    run.add_argument("--json", action="store_true", help="one JSON object per line")
    run.set_defaults(handler=cmd_run)

    backup = sub.add_parser("backup", help="receive checkpoints and fail over when the primary dies")
    backup.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to listen on (or a tcp://, unix:// URL)")
    backup.add_argument("--heartbeat-timeout", type=float, default=1000.0, metavar="MS",
                        help="declare the primary dead after this much silence (default 1000)")
    backup.add_argument("--heartbeat", type=float, default=100.0, metavar="MS",
                        help="heartbeat period (default 100)")
    backup.add_argument("--auth-secret-file", metavar="PATH", help="shared secret for HELLO")
    backup.add_argument("--fence", metavar="CMD",
                        help="shell command run before failing over; it must stop the old "
                             "primary for good (exit 0), else the failover is refused")
    backup.add_argument("--fence-timeout", type=_duration, default=10.0, metavar="S",
                        help="give up on the fence command after S seconds (default 10); "
                             "after losing this backup the primary holds its output this "
                             "much longer")
    _arbiter_options(backup)
    backup.add_argument("--state-dir", default="/var/lib/tremus", metavar="DIR",
                        help="where the replicas of protected disks are kept "
                             "(default /var/lib/tremus)")
    _tls_options(backup, "this backup's certificate (required to listen on tls://)",
                 "CA the primary's certificate must be signed by (mutual TLS)")
    backup.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics")
    backup.add_argument("--json", action="store_true", help="one JSON object per line")
    backup.set_defaults(handler=cmd_backup)

    demo = sub.add_parser("demo", help="protect a counter VM, kill the primary, watch failover")
    demo.add_argument("--seconds", type=_duration, default=4.0, metavar="S",
                      help="how long to run protected before the kill (default 4)")
    demo.add_argument("--json", action="store_true", help="one JSON object per line")
    demo.set_defaults(handler=cmd_demo)

    protect = sub.add_parser("protect", help="run a domain protected by a backup")
    protect.add_argument("--domain", required=True, metavar="SPEC")
    protect.add_argument("--backup", metavar="HOST:PORT", help="the backup's address (or URL)")
    protect.add_argument("--interval", type=float, default=50.0, metavar="MS",
                         help="checkpoint interval, from one resume to the next suspend (default 50)")
    protect.add_argument("--output-triggered", action="store_true",
                         help="when output is held, checkpoint as soon as --min-interval "
                              "allows instead of waiting for --interval (low latency)")
    protect.add_argument("--min-interval", type=float, default=2.0, metavar="MS",
                         help="with --output-triggered, the shortest time from a resume to "
                              "the next suspend (default 2; bounds the checkpoint rate)")
    protect.add_argument("--no-compression", action="store_true", help="send raw pages (no delta)")
    protect.add_argument("--blackhole", action="store_true",
                         help="build checkpoints and drop them (benchmarking; not protection)")
    protect.add_argument("--verify", action="store_true",
                         help="digest every checkpoint; the backup verifies it before applying")
    protect.add_argument("--netbuf", choices=NETBUF_KINDS, default="auto",
                         help="how network output is held until its checkpoint is acked "
                              "(auto: vmm for a domain with a NIC)")
    protect.add_argument("--nfqueue-num", type=int, default=0, metavar="N",
                         help="NFQUEUE number for --netbuf nfqueue (default 0)")
    protect.add_argument("--unsafe", action="store_true",
                         help="let output out before its checkpoint is acknowledged: allows "
                              "--netbuf none and --no-disk-replication, and console lines "
                              "are not held")
    protect.add_argument("--max-inflight", type=int, default=4, metavar="N",
                         help="checkpoints sent but not yet acknowledged (default 4)")
    _disk_option(protect)
    protect.add_argument("--no-disk-replication", action="store_true",
                         help="do not replicate the disk (xl remus -d: it is replicated by "
                              "other means); needs --unsafe")
    protect.add_argument("--disk-fifo", metavar="PATH",
                         help="drive an external block-remus-compatible disk through its "
                              "control fifo PATH (and PATH.msg)")
    protect.add_argument("--run-dir", metavar="DIR",
                         help="where the disk's block-remus fifos are made (default /run/tremus)")
    protect.add_argument("--reprotect", type=_duration, nargs="?", const=2.0, metavar="S",
                         help="when the backup is lost, try every S seconds (default 2) to "
                              "protect again, to it or its replacement at the same address")
    protect.add_argument("--heartbeat-timeout", type=float, default=1000.0, metavar="MS",
                         help="give the backup up after this much silence (default 1000)")
    protect.add_argument("--heartbeat", type=float, default=100.0, metavar="MS",
                         help="heartbeat period (default 100)")
    _arbiter_options(protect)
    protect.add_argument("--arbiter-key", metavar="NAME",
                         help="the guest's name in the arbiter (default: its MAC, else "
                              "'guest'); unique per protected guest")
    protect.add_argument("--auth-secret-file", metavar="PATH", help="shared secret for HELLO")
    _tls_options(protect, "this primary's certificate, for mutual TLS",
                 "CA the backup's certificate must be signed by (default: the system's)")
    protect.add_argument("--duration", type=_duration, metavar="S", help="stop after S seconds")
    protect.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics")
    protect.add_argument("--json", action="store_true", help="one JSON object per line")
    protect.set_defaults(handler=cmd_protect)
    return parser


def _disk_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk", metavar="SPEC",
                        help="the domain's disk in xl's syntax: PATH, "
                             "target=PATH,format=raw,access=rw, or Remus's "
                             "tap:remus:HOST:PORT|aio:PATH (raw images only)")


def _with_disk(args: argparse.Namespace) -> tuple[str, tuple[str, int] | None]:
    """The domain spec with ``--disk`` folded in, and where the disk replicates to."""
    if not getattr(args, "disk", None):
        return args.domain, None
    from tremus.domains.diskspec import DiskSpecError, check_supported, parse_disk_spec

    try:
        try:
            parsed = parse_disk_spec(args.disk)
        except DiskSpecError as exc:
            if "no vdev" not in str(exc):
                raise
            # The micro-VM has one disk: its virtual device name may be left out.
            parsed = parse_disk_spec(f"vdev=xvda,{args.disk}")
        disk = check_supported(parsed)
    except DiskSpecError as exc:
        raise UsageError(f"--disk: {exc}") from None
    if "disk=" in args.domain:
        raise UsageError("give the disk once: --disk, or disk= in the domain SPEC")
    if disk.read_only:
        raise UsageError("--disk: read-only disks are not supported yet (access=ro)")
    return f"{args.domain},disk={disk.path}", disk.remus


def _arbiter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arbiter", metavar="URL",
                        help="decide who runs the guest with a lease in etcd "
                             "(etcd://HOST:PORT[,HOST:PORT...]; the same on both sides)")
    parser.add_argument("--lease-ttl", type=_duration, default=2.0, metavar="S",
                        help="arbiter lease time to live (default 2; etcd may grant more)")


def _arbiter_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _check_arbiter(args: argparse.Namespace) -> None:
    if args.arbiter:
        from tremus.arbiters import parse_arbiter_url

        try:
            parse_arbiter_url(args.arbiter)
        except ValueError as exc:
            raise UsageError(f"--arbiter: {exc}") from None


def _ownership_for(args: argparse.Namespace) -> Callable[[str], Ownership] | None:
    """This side's handle on the arbiter's record of a guest, by the guest's key."""
    if not args.arbiter:
        return None
    from tremus.arbiters import open_arbiter

    me = _arbiter_identity()

    def ownership(key: str) -> Ownership:
        return open_arbiter(args.arbiter, key=key, me=me, lease_ttl=args.lease_ttl)

    return ownership


def _arbiter_key(args: argparse.Namespace, domain: Domain) -> str:
    if args.arbiter_key:
        return str(args.arbiter_key)
    config = dict(getattr(domain, "config", {}) or {})
    return str(config.get("name") or config.get("mac") or "guest").replace(":", "-")


def _tls_options(parser: argparse.ArgumentParser, cert_help: str, ca_help: str) -> None:
    parser.add_argument("--tls-cert", metavar="PEM", help=cert_help + " (tls:// URLs)")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key, if not in --tls-cert")
    parser.add_argument("--tls-ca", metavar="PEM", help=ca_help)


def _ssl_context(args: argparse.Namespace, url: str, *, server: bool) -> ssl.SSLContext | None:
    if not url.startswith("tls://"):
        if args.tls_cert or args.tls_ca:
            raise UsageError("--tls-cert/--tls-ca need a tls:// address")
        return None
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                         ("--tls-ca", args.tls_ca)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{option} {path}: no such file")
    try:
        if server:
            if not args.tls_cert:
                raise UsageError("listening on tls:// needs --tls-cert (and --tls-key)")
            return transports.server_context(args.tls_cert, args.tls_key, args.tls_ca)
        return transports.client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS setup: {exc}") from None


def _url(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


def _protection_config(args: argparse.Namespace, **extra: object) -> ProtectionConfig:
    secret = None
    if args.auth_secret_file:
        with open(args.auth_secret_file, "rb") as f:
            secret = f.read().strip()
        if not secret:
            raise UsageError(f"{args.auth_secret_file}: the secret is empty")
    try:
        return ProtectionConfig(heartbeat_ms=args.heartbeat,
                                heartbeat_timeout_ms=args.heartbeat_timeout,
                                auth_secret=secret, **extra)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


async def cmd_demo(args: argparse.Namespace) -> int:
    from tremus._demo import run_demo

    return await run_demo(args.seconds, args.json)


def command_fence(command: str, timeout: float) -> Fence:
    """A fence that runs ``command`` in a shell (TREMUS_FAILOVER_REASON set)."""

    async def fence(reason: str) -> None:
        with trio.move_on_after(timeout) as scope:
            result = await trio.run_process(
                command, shell=True, check=False, stdin=b"", capture_stdout=True,
                capture_stderr=True, env={**os.environ, "TREMUS_FAILOVER_REASON": reason})
        if scope.cancelled_caught:
            raise FencingFailed(f"`{command}` did not finish within {timeout:g} s")
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise FencingFailed(f"`{command}` exited with {result.returncode} {detail[0]}".strip())

    return fence


async def cmd_backup(args: argparse.Namespace) -> int:
    config = _protection_config(args)
    _check_arbiter(args)
    hub = EventHub()
    hub.add_callback(EventPrinter(args.json))
    host = socket.gethostname()
    try:
        url = _url(args.listen)
        listener = await transports.listen(url, ssl_context=_ssl_context(args, url, server=True))
    except transports.InvalidURL as exc:
        raise UsageError(str(exc)) from None
    disks = BackupDisks(args.state_dir, hub, secret=config.auth_secret,
                        timeout=config.heartbeat_timeout_ms / 1000 * 10)
    async with trio.open_nursery() as nursery, listener:
        await _start_metrics(nursery, args, hub, "backup")
        hub.emit(BackupReady(listen=listener.url))
        memory: list[trio.abc.Stream] = []
        connected = trio.Event()

        async def sort(stream: trio.abc.Stream) -> None:
            # Disk streams (one per protected disk) come beside the memory stream.
            is_disk, prefix, stream = await sniff(stream)
            if is_disk:
                await disks.serve(stream, prefix)
            elif not memory:
                memory.append(stream)
                connected.set()
            else:
                await stream.aclose()  # one primary at a time

        async def accept() -> None:
            while True:
                nursery.start_soon(sort, await listener.accept())

        nursery.start_soon(accept)
        await connected.wait()
        session = BackupSession(memory[0], config=config, hub=hub,
                                console=lambda line: hub.emit(Console(line=line, host=host)),
                                fence=command_fence(args.fence, args.fence_timeout)
                                if args.fence else None, fence_timeout=args.fence_timeout,
                                ownership_for=_ownership_for(args),
                                apply_gate=disks.apply_gate,
                                prepare_failover=disks.prepare_failover)
        outcome = await session.run()
        nursery.cancel_scope.cancel()
    return 0 if outcome is not BackupOutcome.REFUSED else 1


async def _start_metrics(nursery: trio.Nursery, args: argparse.Namespace, hub: EventHub,
                         role: str) -> None:
    if not args.metrics:
        return
    host, _, port = args.metrics.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--metrics {args.metrics!r}: expected HOST:PORT")
    metrics = Metrics(role)
    metrics.attach(hub)
    try:
        await nursery.start(serve_metrics, metrics, host or "127.0.0.1", int(port))
    except OSError as exc:
        raise UsageError(f"--metrics {args.metrics}: cannot serve metrics there: "
                         f"{exc.strerror or exc}") from None


async def _until_done(duration: float | None) -> str:
    """Until ``duration`` elapses or SIGTERM/SIGINT arrives; the reason, for events.

    A signal stops things gracefully: a protected domain's backup is told (END) and
    does not fail over, as when a service manager stops the primary.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        with trio.move_on_after(math.inf if duration is None else duration):
            async for signum in signals:
                return f"stopped by {signal.Signals(signum).name}"
    return "duration elapsed"


async def cmd_protect(args: argparse.Namespace) -> int:
    if not args.blackhole and not args.backup:
        raise UsageError("--backup HOST:PORT is required (or --blackhole)")
    config = _protection_config(
        args, interval_ms=args.interval, codec="raw" if args.no_compression else "delta",
        verify=args.verify, max_inflight=args.max_inflight,
        output_triggered=args.output_triggered, min_interval_ms=args.min_interval)
    _check_arbiter(args)
    if args.no_disk_replication and not args.unsafe:
        raise UsageError("--no-disk-replication leaves the backup without the guest's disk "
                         "writes; add --unsafe if it is replicated by other means")
    hub = EventHub()
    hub.add_callback(EventPrinter(args.json))
    host = socket.gethostname()
    spec, args.disk_target = _with_disk(args)
    domain = create_domain(spec, console=lambda line: hub.emit(Console(line=line, host=host)))
    halted = ""
    async with trio.open_nursery() as nursery:
        # Everything that can be checked here is, before the backup is contacted.
        await _start_metrics(nursery, args, hub, "primary")
        stream = await _connect_backup(args)
        hub.emit(DomainStarted(domain=spec, ram_bytes=domain.geometry.ram_size, host=host))
        await nursery.start(domain.run)
        done = trio.Event()
        reason = "duration elapsed"

        async def watch() -> None:
            nonlocal reason
            reason = await _until_done(args.duration)
            done.set()

        nursery.start_soon(watch)
        while True:
            session = await _protect_once(args, domain, stream, config, hub, done,
                                          lambda: reason)
            if session.halted.is_set():
                halted = session.halt_reason
                break
            if not session.lost.is_set() or done.is_set() or args.reprotect is None:
                await done.wait()
                break
            # The backup is gone and the guest runs unprotected: keep trying to
            # protect it again (a new session, starting with a full checkpoint).
            stream = None
            while stream is None and not done.is_set():
                with trio.move_on_after(args.reprotect):
                    await done.wait()
                if not done.is_set():
                    with contextlib.suppress(OSError):
                        stream = await _connect_backup(args)
            if done.is_set():
                break
        domain.stop()
        nursery.cancel_scope.cancel()
    hub.emit(DomainStopped(reason=halted or reason, host=host))
    if halted:
        print(f"tremus: error: the guest was stopped here: {halted}", file=sys.stderr)
        return 1
    return 0


async def _connect_backup(args: argparse.Namespace) -> trio.abc.Stream | None:
    if args.blackhole:
        return None
    url = _url(args.backup)
    try:
        return await transports.connect(url, ssl_context=_ssl_context(args, url, server=False))
    except transports.InvalidURL as exc:
        raise UsageError(str(exc)) from None


async def _protect_once(args: argparse.Namespace, domain: Domain,
                        stream: trio.abc.Stream | None, config: ProtectionConfig,
                        hub: EventHub, done: trio.Event, reason: Callable[[], str]
                        ) -> PrimarySession:
    """One protection session, until ``done``, the loss of the backup, or a halt."""
    ownership_for = _ownership_for(args)
    async with AsyncExitStack() as stack:
        # The buffers' own nurseries open before ours and close after it.
        try:
            devices = await open_netbuf(args.netbuf, domain, stack, unsafe=args.unsafe,
                                        queue_num=args.nfqueue_num)
        except NetbufError as exc:
            raise UsageError(str(exc)) from None
        devices = [*await _disk_devices(args, domain, stack, config, hub), *devices,
                   *open_console(domain, unsafe=args.unsafe)]
        session = PrimarySession(
            domain, stream, config=config, hub=hub, devices=devices,
            backup_name="blackhole" if args.blackhole else args.backup,
            ownership=ownership_for(_arbiter_key(args, domain)) if ownership_for else None)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(session.run)
            except BackupLostError as exc:
                if args.reprotect is not None and stream is not None \
                        and session.epochs_acked == 0:
                    session.lost.set()
                    return session  # a backup that refused us now may accept later
                raise UsageError(f"cannot protect: {exc}") from None

            async def until(event: trio.Event, scope: trio.CancelScope) -> None:
                await event.wait()
                scope.cancel()

            with trio.CancelScope() as waiting:
                async with trio.open_nursery() as watchers:
                    watchers.start_soon(until, done, waiting)
                    watchers.start_soon(until, session.lost, waiting)
                    watchers.start_soon(until, session.stopped, waiting)
            lost = session.lost.is_set() and not done.is_set()
            session.stop("backup lost; protecting again" if lost else reason())
            await session.stopped.wait()
    return session


async def _disk_devices(args: argparse.Namespace, domain: Domain, stack: AsyncExitStack,
                        config: ProtectionConfig, hub: EventHub) -> list[CheckpointDevice]:
    """The block-remus device of this session's disk (and what serves its fifo)."""
    timeout = config.heartbeat_timeout_ms / 1000 * 10
    if args.disk_fifo:
        return [BlockRemusDevice(args.disk_fifo, timeout=timeout)]
    if args.blackhole or args.no_disk_replication or getattr(domain, "disk", None) is None:
        return []
    address = args.disk_target or _host_port(args.backup)
    url = _url(args.backup) if args.disk_target is None else f"tcp://{address[0]}:{address[1]}"
    if args.disk_target is not None and args.backup.startswith("tls://"):
        url = f"tls://{address[0]}:{address[1]}"

    async def connect() -> trio.abc.Stream:
        return await transports.connect(url, ssl_context=_ssl_context(args, url, server=False))

    try:
        return await open_disk_replication(
            domain, stack, connect=connect, target=address,
            name=f"{_arbiter_key(args, domain)}-disk0", secret=config.auth_secret,
            run_dir=args.run_dir, timeout=timeout, hub=hub)
    except (OSError, DiskReplicationError) as exc:
        raise UsageError(f"disk replication to {url}: {exc}") from None


def _host_port(address: str) -> tuple[str, int]:
    parsed = transports.parse_url(_url(address))
    return parsed.host or "localhost", parsed.port or 0


async def cmd_run(args: argparse.Namespace) -> int:
    hub = EventHub()
    hub.add_callback(EventPrinter(args.json))
    host = socket.gethostname()
    spec, _ = _with_disk(args)
    domain = create_domain(spec, console=lambda line: hub.emit(Console(line=line, host=host)))
    async with trio.open_nursery() as nursery:
        hub.emit(DomainStarted(domain=spec, ram_bytes=domain.geometry.ram_size, host=host))
        await nursery.start(domain.run)
        reason = await _until_done(args.duration)
        domain.stop()
    hub.emit(DomainStopped(reason=reason, host=host))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with collapse_groups():
            return trio.run(args.handler, args)
    except KeyboardInterrupt:
        return 130
    except (DomainError, UsageError, OSError, DeviceError) as exc:
        print(f"tremus: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | DomainError) else 1


if __name__ == "__main__":
    sys.exit(main())
