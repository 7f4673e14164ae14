"""The ``tremus`` command: run, protect and back up domains."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import socket
import ssl
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, final

import trio

from tremus import transports
from tremus._groups import collapse_groups
from tremus._output import EventPrinter
from tremus._protector import ProtectionError, Protector, ProtectPlan, TlsFiles, ssl_context, url_of
from tremus._service import BackupService
from tremus._wiring import NETBUF_KINDS
from tremus.control import ControlError, Handler, add_ctl_parser, serve_control
from tremus.control import cmd_ctl as _ctl_client
from tremus.domains.base import Domain, DomainError, guest_name
from tremus.domains.registry import create_domain
from tremus.engine.backup import BackupOutcome, Fence, FencingFailed
from tremus.engine.config import CAPTURE_METHODS, ConfigError, ProtectionConfig
from tremus.engine.devices import DeviceError
from tremus.engine.events import BackupReady, Console, DomainStarted, DomainStopped, EventHub
from tremus.engine.ownership import Ownership
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


_SPEC_HELP = (
    "the guest: microvm:KEY=VALUE,... with keys name (the guest's name), workload "
    "(counter, dirty, kv, diskwrite), memory (e.g. 16M), interval_ms (counter), rate "
    "(dirty: pages/s; diskwrite: writes/s), pattern (random, sequential, hotset), ws, "
    "hot, seed, tap, bridge, mac, ip (A.B.C.D/NN), disk (a raw image), disk_size, "
    "io_size; e.g. microvm:name=web,workload=counter,memory=16M")


def _size(text: str) -> int:
    from tremus.domains.microvm.config import parse_size

    try:
        value = parse_size(text, "size")
    except DomainError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tremus", description=__doc__)
    from tremus import __version__

    parser.add_argument("--version", action="version", version=f"tremus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a domain unprotected")
    run.add_argument("--domain", required=True, metavar="SPEC", help=_SPEC_HELP)
    _disk_option(run)
    run.add_argument("--duration", type=_duration, metavar="S", help="stop after S seconds")
    _control_option(run)
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
    backup.add_argument("--memory-limit", type=_size, metavar="SIZE",
                        help="the most guest RAM to hold at once, replicas and guests "
                             "running here (e.g. 8G); a primary that would pass it is "
                             "refused (default: what the host has available)")
    backup.add_argument("--handshake-timeout", type=_duration, metavar="S",
                        help="how long a connection may take to finish its TLS handshake "
                             "and send its first bytes before it is closed (default 30, or "
                             "TREMUS_HANDSHAKE_TIMEOUT_S)")
    backup.add_argument("--once", action="store_true",
                        help="serve one primary, then exit (after its guest stops, if it "
                             "failed over here); exit 1 if it was refused")
    backup.add_argument("--reprotect-to", metavar="HOST:PORT",
                        help="protect a guest that fails over here to this backup (failback), "
                             "retrying every 2 s until one answers")
    backup.add_argument("--reprotect-interval", type=float, default=50.0, metavar="MS",
                        help="checkpoint interval of that protection (default 50)")
    backup.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics")
    _control_option(backup)
    backup.add_argument("--json", action="store_true", help="one JSON object per line")
    backup.set_defaults(handler=cmd_backup)

    demo = sub.add_parser("demo", help="protect a counter VM, kill the primary, watch failover")
    demo.add_argument("--seconds", type=_duration, default=4.0, metavar="S",
                      help="how long to run protected before the kill (default 4)")
    demo.add_argument("--json", action="store_true", help="one JSON object per line")
    demo.set_defaults(handler=cmd_demo)

    protect = sub.add_parser("protect", help="run a domain protected by a backup")
    protect.add_argument("--domain", required=True, metavar="SPEC", help=_SPEC_HELP)
    protect.add_argument("--backup", metavar="HOST:PORT", help="the backup's address (or URL)")
    protect.add_argument("--interval", type=float, default=50.0, metavar="MS",
                         help="checkpoint interval, from one resume to the next suspend (default 50)")
    protect.add_argument("--output-triggered", action="store_true",
                         help="when output is held, checkpoint as soon as --min-interval "
                              "allows instead of waiting for --interval (low latency)")
    protect.add_argument("--min-interval", type=float, default=2.0, metavar="MS",
                         help="with --output-triggered, the shortest time from a resume to "
                              "the next suspend (default 2; bounds the checkpoint rate)")
    protect.add_argument("--capture", choices=CAPTURE_METHODS, default="auto",
                         help="how dirty pages are captured: cow = write-protect them in the "
                              "pause and copy them after the guest resumed (the pause does not "
                              "grow with them), copy = copy them in the pause; auto (default) = "
                              "cow where the host offers userfaultfd write-protect")
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
    _control_option(protect)
    protect.add_argument("--json", action="store_true", help="one JSON object per line")
    protect.set_defaults(handler=cmd_protect)
    add_ctl_parser(sub).set_defaults(handler=cmd_ctl)
    return parser


def _control_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH",
                        help="serve a control socket at PATH (JSON lines; `tremus ctl PATH "
                             "status|stop-protection|protect|stop|events`)")


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
    return str(getattr(args, "arbiter_key", None) or guest_name(domain.config))


def _tls_options(parser: argparse.ArgumentParser, cert_help: str, ca_help: str) -> None:
    parser.add_argument("--tls-cert", metavar="PEM", help=cert_help + " (tls:// URLs)")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key, if not in --tls-cert")
    parser.add_argument("--tls-ca", metavar="PEM", help=ca_help)



def _ssl_context(args: argparse.Namespace, url: str, *, server: bool) -> ssl.SSLContext | None:
    try:
        return ssl_context(_tls_files(args), url, server=server)
    except ProtectionError as exc:
        raise UsageError(str(exc)) from None


def _tls_files(args: argparse.Namespace) -> TlsFiles:
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)


def _url(address: str) -> str:
    return url_of(address)


def _peer_url(option: str, address: str) -> str:
    """``address`` (HOST:PORT, or a tcp://, tls://, unix:// URL) as the URL to connect
    to, checked now: an address that is only used later (``--reprotect-to``, at
    failover) would otherwise fail then, long after a typo could have been fixed."""
    url = _url(address)
    try:
        parsed = transports.parse_url(url)
    except transports.InvalidURL as exc:
        raise UsageError(f"{option} {address}: {exc}") from None
    if parsed.scheme not in ("tcp", "tls", "unix"):
        raise UsageError(f"{option} {address}: another process is reached over tcp://, "
                         f"tls:// or unix://, not {parsed.scheme}://")
    if parsed.scheme in ("tcp", "tls") and parsed.port == 0:
        raise UsageError(f"{option} {address}: port 0 cannot be connected to; "
                         "expected HOST:PORT with a port in 1..65535")
    return url


def _read_secret(path: str) -> bytes:
    """The shared secret in ``path``; a UsageError naming the option and the file when
    it cannot be had (an OSError would read as a failure of the protection itself)."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except FileNotFoundError:
        raise UsageError(f"--auth-secret-file {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"--auth-secret-file {path}: cannot read it: "
                         f"{exc.strerror or exc}") from None
    if not secret:
        raise UsageError(f"--auth-secret-file {path}: the secret is empty")
    return secret


def _protection_config(args: argparse.Namespace, **extra: object) -> ProtectionConfig:
    secret = _read_secret(args.auth_secret_file) if args.auth_secret_file else None
    try:
        return ProtectionConfig(heartbeat_ms=args.heartbeat,
                                heartbeat_timeout_ms=args.heartbeat_timeout,
                                auth_secret=secret, **extra)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


async def cmd_demo(args: argparse.Namespace) -> int:
    """``tremus demo``; SIGTERM or SIGINT ends it gracefully (see ``_Stop``): its
    primary ends protection, its backup stops, the verdict says it was interrupted."""
    from tremus._demo import run_demo

    stop = _Stop()
    async with trio.open_nursery() as nursery:
        await nursery.start(stop.watch, None)
        status = await run_demo(args.seconds, args.json, stop=stop)
        nursery.cancel_scope.cancel()
    return status


async def cmd_ctl(args: argparse.Namespace) -> int:
    """``tremus ctl`` (the client in ``tremus.control``), which SIGTERM or SIGINT ends
    quietly with status 0: a client asked to stop has nothing to undo. ``events``
    ends that way; a command waiting for its operation stops waiting (the
    operation goes on in the server). Its status otherwise."""
    stop = _Stop()
    status = 0
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            nonlocal status
            status = await _ctl_client(args)
            nursery.cancel_scope.cancel()

        await nursery.start(stop.watch, None)
        nursery.start_soon(client)
        await stop.event.wait()
        nursery.cancel_scope.cancel()
    return status


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


#: How long a ``stop`` through the control socket waits for its reply to go out.
_REPLY_GRACE = 0.05


@final
class _Stop:
    """Why and when this command stops: a signal, ``--duration``, the control socket.

    SIGTERM and SIGINT mean the same for every command: stop gracefully, exit 0.
    Protection ends with END (no backup fails over because of it), a guest this
    process runs stops, a backup ends every protection it serves, ``demo`` stops its
    two processes that way, ``ctl`` stops waiting. A second signal exits at once
    (128 + the signal): a stop that hangs must not need SIGKILL.
    """

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    async def set_after_reply(self, reason: str) -> None:
        """``set``, once the control socket's reply to ``stop`` has gone out (it is
        sent as soon as the handler returns; the stop would otherwise cut it off)."""
        await trio.sleep(_REPLY_GRACE)
        self.set(reason)

    async def watch(self, duration: float | None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Turn signals (and ``duration``) into a stop. Start it with ``nursery.start``
        before the command says it is up: a signal from then on is a graceful stop."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            with trio.move_on_after(math.inf if duration is None else duration):
                async for signum in signals:
                    self._signalled(signum)
            self.set("duration elapsed")
            async for signum in signals:
                self._signalled(signum)

    def _signalled(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            print(f"tremus: {name} again: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.set(f"stopped by {name}")


async def _start_control(nursery: trio.Nursery, args: argparse.Namespace, hub: EventHub,
                         role: str, commands: Mapping[str, Handler]) -> None:
    if not getattr(args, "control", None):
        return
    try:
        await nursery.start(functools.partial(serve_control, args.control, commands, hub,
                                              role=role))
    except (ControlError, OSError) as exc:
        raise UsageError(f"--control {args.control}: {exc}") from None


def _refusals_as_replies(handler: Handler) -> Handler:
    """A command the service refuses (ProtectionError: no such guest, already
    protected, ...) is a plain error reply naming why, not an unexpected failure."""
    @functools.wraps(handler)
    async def call(request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await handler(request)
        except ProtectionError as exc:
            raise ControlError(str(exc)) from None

    return call


def _arg(request: Mapping[str, Any], name: str) -> str | None:
    value = request.get(name)
    if value is not None and not isinstance(value, str):
        raise ControlError(f"{name} must be a string")
    return value


async def cmd_backup(args: argparse.Namespace) -> int:
    config = _protection_config(args)
    _check_arbiter(args)
    failback = None
    if args.reprotect_to:
        reprotect_url = _peer_url("--reprotect-to", args.reprotect_to)
        if args.arbiter:
            raise UsageError("--reprotect-to with --arbiter is not supported yet: protect the "
                             "guest again with `tremus ctl ... protect` once the arbiter "
                             "released it")
        failback = ProtectPlan(
            backup=args.reprotect_to, reprotect=2.0, tls=_tls_files(args),
            config=_protection_config(args, interval_ms=args.reprotect_interval))
        _ssl_context(args, reprotect_url, server=False)
    hub = EventHub()
    printer = EventPrinter(args.json)
    hub.add_callback(printer)
    try:
        url = _url(args.listen)
        listener = await transports.listen(url, ssl_context=_ssl_context(args, url, server=True))
    except transports.InvalidURL as exc:
        raise UsageError(str(exc)) from None
    service = BackupService(
        listener, config=config, hub=hub, state_dir=args.state_dir,
        fence=command_fence(args.fence, args.fence_timeout) if args.fence else None,
        fence_timeout=args.fence_timeout, ownership_for=_ownership_for(args), once=args.once,
        failback=failback, memory_limit=args.memory_limit,
        handshake_timeout=args.handshake_timeout)
    stop = _Stop()

    async def status(request: Mapping[str, Any]) -> dict[str, Any]:
        return service.status()

    async def stop_protection(request: Mapping[str, Any]) -> dict[str, Any]:
        guest = service.guest(_arg(request, "guest"))
        why = "protection stopped through the backup's control socket"
        if guest.state == "running" and guest.protector is not None:
            if not guest.protector.active:
                raise ControlError(f"guest {guest.name!r} is not protected")
            guest.protector.stop(why)
            with trio.move_on_after(30):
                await guest.protector.finished.wait()
        elif guest.session is not None:
            guest.session.stop(why)
        return {"guest": guest.name, "stopped": True}

    async def protect(request: Mapping[str, Any]) -> dict[str, Any]:
        backup = _arg(request, "backup")
        if not backup:
            raise ControlError("protect needs a backup (HOST:PORT)")
        plan = failback or ProtectPlan(backup=backup, tls=_tls_files(args),
                                       config=_protection_config(args))
        guest = service.protect(_arg(request, "guest"),
                                dataclasses.replace(plan, backup=backup, retry_first=False))
        return {"operation": "protect", "guest": guest.name, "backup": backup}

    async def stop_guest(request: Mapping[str, Any]) -> dict[str, Any]:
        name = _arg(request, "guest")
        if not name:
            nursery.start_soon(stop.set_after_reply, "stopped through the control socket")
            return {"stopping": True}
        guest = service.guest(name)
        if guest.session is not None:
            guest.session.stop("stopped through the backup's control socket")
        return {"guest": guest.name, "stopping": True}

    async with trio.open_nursery() as nursery, listener:
        await _start_metrics(nursery, args, hub, "backup")
        await _start_control(nursery, args, hub, "backup", {
            name: _refusals_as_replies(handler) for name, handler in (
                ("status", status), ("stop-protection", stop_protection),
                ("protect", protect), ("stop", stop_guest))})
        served = trio.Event()

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await service.run(task_status=task_status)
            finally:
                served.set()
            stop.set("served its one primary (--once)")

        await nursery.start(stop.watch, None)
        await nursery.start(serve)
        hub.emit(BackupReady(listen=listener.url))
        await stop.event.wait()
        service.stop(stop.reason)
        await served.wait()  # every primary told, every guest here stopped
        nursery.cancel_scope.cancel()

    printer.close()
    if args.once and service.outcome in (BackupOutcome.REFUSED, BackupOutcome.REJECTED):
        return 1
    return 0


async def _start_metrics(nursery: trio.Nursery, args: argparse.Namespace, hub: EventHub,
                         role: str) -> None:
    if not getattr(args, "metrics", None):
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



async def cmd_protect(args: argparse.Namespace) -> int:
    if not args.blackhole and not args.backup:
        raise UsageError("--backup HOST:PORT is required (or --blackhole)")
    config = _protection_config(
        args, interval_ms=args.interval, codec="raw" if args.no_compression else "delta",
        verify=args.verify, max_inflight=args.max_inflight,
        output_triggered=args.output_triggered, min_interval_ms=args.min_interval,
        capture=args.capture)
    _check_arbiter(args)
    if args.no_disk_replication and not args.unsafe:
        raise UsageError("--no-disk-replication leaves the backup without the guest's disk "
                         "writes; add --unsafe if it is replicated by other means")
    spec, disk_target = _with_disk(args)
    plan = ProtectPlan(
        backup=None if args.blackhole else args.backup, config=config, netbuf=args.netbuf,
        nfqueue_num=args.nfqueue_num, unsafe=args.unsafe, disk_target=disk_target,
        disk_fifo=args.disk_fifo, replicate_disk=not args.no_disk_replication,
        run_dir=args.run_dir, reprotect=args.reprotect, ownership_for=_ownership_for(args),
        arbiter_key=args.arbiter_key, tls=_tls_files(args))
    if plan.backup is not None:
        _ssl_context(args, _url(plan.backup), server=False)
    return await _run_guest(args, spec, plan, "primary")


async def cmd_run(args: argparse.Namespace) -> int:
    spec, _ = _with_disk(args)
    return await _run_guest(args, spec, None, "run")


async def _run_guest(args: argparse.Namespace, spec: str, plan: ProtectPlan | None,
                     role: str) -> int:
    """Run a guest here until stopped, protected per ``plan`` (and the control socket)."""
    hub = EventHub()
    printer = EventPrinter(args.json)
    hub.add_callback(printer)
    host = socket.gethostname()
    domain = create_domain(spec, console=lambda line: hub.emit(Console(line=line, host=host)))
    protector = Protector(domain, hub)
    stop = _Stop()
    base_plan = plan or ProtectPlan(backup=None)
    async with trio.open_nursery() as nursery:

        async def run_protection(chosen: ProtectPlan) -> None:
            with contextlib.suppress(ProtectionError, OSError):  # reported as an event
                await protector.run(chosen)
            if protector.halt_reason:
                stop.set(protector.halt_reason)

        async def status(request: Mapping[str, Any]) -> dict[str, Any]:
            return {"role": role, "host": host, "guest": protector.guest, "domain": spec,
                    "running": not stop.event.is_set(), **protector.status()}

        async def stop_protection(request: Mapping[str, Any]) -> dict[str, Any]:
            if not protector.active:
                raise ControlError("the guest is not protected")
            protector.stop("protection stopped through the control socket")
            with trio.move_on_after(30):
                await protector.finished.wait()
            return {"stopped": True}

        async def protect(request: Mapping[str, Any]) -> dict[str, Any]:
            backup = _arg(request, "backup") or base_plan.backup
            if not backup:
                raise ControlError("protect needs a backup (HOST:PORT)")
            if protector.active:
                raise ControlError(f"the guest is already protected to "
                                   f"{protector.status()['backup']}")
            nursery.start_soon(run_protection, dataclasses.replace(base_plan, backup=backup))
            return {"operation": "protect", "backup": backup}

        async def stop_guest(request: Mapping[str, Any]) -> dict[str, Any]:
            nursery.start_soon(stop.set_after_reply, "stopped through the control socket")
            return {"stopping": True}

        # Everything that can be checked here is, before the backup is contacted.
        await _start_metrics(nursery, args, hub, role)
        await _start_control(nursery, args, hub, role, {
            "status": status, "stop-protection": stop_protection, "protect": protect,
            "stop": stop_guest})
        stream = None
        if plan is not None and plan.backup is not None:
            stream = await _connect_backup(args)
        await nursery.start(stop.watch, args.duration)
        hub.emit(DomainStarted(domain=spec, ram_bytes=domain.geometry.ram_size, host=host))
        await nursery.start(domain.run)
        if plan is not None:
            try:
                await nursery.start(functools.partial(protector.run, plan, stream=stream))
            except ProtectionError as exc:
                domain.stop()
                raise UsageError(str(exc)) from None

            async def until_halted() -> None:
                await protector.finished.wait()
                if protector.halt_reason:
                    stop.set(protector.halt_reason)

            nursery.start_soon(until_halted)
        await stop.event.wait()
        if protector.active:
            protector.stop(stop.reason)
            with trio.move_on_after(30):
                await protector.finished.wait()
        domain.stop()
        nursery.cancel_scope.cancel()
    hub.emit(DomainStopped(reason=stop.reason, host=host))
    printer.close()
    if protector.halt_reason:
        print(f"tremus: error: the guest was stopped here: {protector.halt_reason}",
              file=sys.stderr)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with collapse_groups():
            return trio.run(args.handler, args)
    except KeyboardInterrupt:
        return 130
    except (DomainError, UsageError, OSError, DeviceError, ControlError,
            ProtectionError) as exc:
        print(f"tremus: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | DomainError) else 1


if __name__ == "__main__":
    sys.exit(main())
