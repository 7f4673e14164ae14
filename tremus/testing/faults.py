"""Fault injection: a protected kv guest, a client writing, one fault, and the count.

One trial (:func:`run_trial`) builds hosts in network namespaces
(:mod:`tremus.testing.kvnet`) - ``client``, ``primary``, ``backup``, and for the
arbiter ``etcd1..3`` - runs ``tremus backup`` on ``backup`` and ``tremus protect`` of
the kv guest on ``primary``, and writes from the client without pause: ``SET key<k>
value<i>``, one at a time, each retried until the reply naming its key comes back
(:class:`Writer`; keys are reused after 900 writes, with new values).
At a random moment it injects one fault (:data:`KINDS`), waits for it to settle,
writes a little longer, then reads every acknowledged key back (``GET``) from
whichever host runs the guest now, and counts:

``lost_writes``
    keys whose last acknowledged value does not read back (``NONE``, another value,
    or no answer at all - a write nobody can read is lost to the client).
``split_brain``
    the old primary let guest output out after the backup's ``failover_complete``
    (its ``time``): an ``output_released`` event of the old primary with ``packets >
    0`` timed after it, or an IPv4 frame from the guest's MAC seen leaving the
    primary host's ``eth0`` more than 50 ms after it (a packet socket in the primary
    host watches the wire, whatever released the frame: the output buffer, a
    teardown, an unprotected guest); or the old primary process is still alive at
    the end of the trial, with its guest not stopped (no ``domain_stopped`` event)
    and its ownership not lost (no ``ownership_lost`` event), after the backup
    completed a failover - two hosts run the guest and both may answer.
    ``split_brain_evidence`` says which.
``crashes``
    a ``tremus`` process with ``Traceback`` or ``ExceptionGroup`` on its stderr (any
    process, killed or not: a traceback is printed before a kill, never by it), or
    one that exited by itself with a non-zero status - except processes the trial
    killed (SIGKILL by the harness, or by the fence: the power switch), and except
    documented refusals: ``tremus backup`` exits with status 1 after
    ``failover_refused``, and an exit right after ``ownership_lost`` or
    ``ownership_refused`` with a one-line ``tremus: error:`` is a decision, not a
    crash. A process that dies of a signal the trial did not send is a crash.
``failover_ms``
    ``failover_complete.downtime_ms`` of the backup (silence to guest running).
``client_downtime_ms``
    the longest gap between consecutive OKs from the last OK before the fault to
    the end of writing (``None`` if no OK came after the fault).

``violations`` lists what the kind says must happen and did not (the backup did
not fail over after the primary was killed, the primary emitted no
``backup_lost``, the stale backup took over, ...); ``error`` says why a trial could
not be run to the end (a ``tremus`` command line the CLI rejects - e.g. a flag it
does not know yet -, a timeout); ``skipped`` why it did not run at all.
:attr:`TrialResult.ok` is: no error, no loss, no split brain, no crash, no
violation.

Safety modes: ``none`` (neither fence nor arbiter: the documented, unsafe
configuration - a backup cannot tell a dead primary from a partition), ``fence``
(``tremus backup --fence CMD``; CMD SIGKILLs the primary's process group - the
processes of every namespace are visible here - and waits until it is gone: it
stands for a power switch) and ``arbiter`` (both sides ``--arbiter etcd://...``, a
three-member etcd cluster on hosts of its own, from
:mod:`tremus.testing.etcd`).

Everything a trial creates is removed when it ends, also when it fails or times
out: processes (SIGKILL), namespaces (with every interface and iptables rule in
them), the fence's files. Every wait is bounded. The guest runs in KVM's
instruction emulator here (about a million instructions a second): nothing waits
on guest speed, and the timeouts are generous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from tremus._groups import collapse_groups
from tremus.testing.etcd import EtcdCluster, require_etcd
from tremus.testing.kvnet import GUEST_MAC, TAP, KvNet, NsProcess, kv_net, kv_ready
from tremus.testing.topology import require_root

__all__ = [
    "KINDS",
    "NETBUFS",
    "SAFETIES",
    "Trial",
    "TrialResult",
    "Writer",
    "read_back",
    "run_trial",
    "summarize",
    "why_not",
]

#: The faults, in the order a campaign runs them.
KINDS: Final = (
    "primary_kill", "backup_kill", "first_checkpoint_kill", "primary_stop", "backup_stop",
    "stall_then_kill", "partition", "isolate_primary",
)
SAFETIES: Final = ("none", "fence", "arbiter")
NETBUFS: Final = ("vmm", "nfqueue")
ETCD_HOSTS: Final = ("etcd1", "etcd2", "etcd3")
#: The kv guest's table holds 1024 keys; the client cycles through fewer.
MAX_KEYS: Final = 900
#: Memory of the guest for ``first_checkpoint_kill``: a first checkpoint that lasts.
FIRST_CHECKPOINT_MEMORY: Final = "64M"

T = TypeVar("T")


# --- the description of a trial ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trial:
    """One fault-injection trial.

    Args:
        kind: one of :data:`KINDS`.
        interval_ms: the checkpoint interval (``protect --interval``).
        netbuf: the output buffer, ``vmm`` or ``nfqueue``.
        safety: ``none``, ``fence`` or ``arbiter``.
        seed: seeds the random moments (fault time, stall lengths).
        heartbeat_timeout_ms: ``--heartbeat-timeout`` of both sides.
        lease_ttl_s: ``--lease-ttl`` of both sides (arbiter only).
        fence_timeout_s: ``backup --fence-timeout`` (fence only); the primary holds
            its output this much longer after losing its backup.
        fault_window_s: the fault comes uniformly within this long after
            ``min_oks`` acknowledged writes.
        min_oks: acknowledged writes before the fault window opens.
        write_after_s: how long the client keeps writing once the fault settled.
        timeout_s: bound on the whole trial (setup to read-back).
    """

    kind: str
    interval_ms: float = 50.0
    netbuf: str = "vmm"
    safety: str = "none"
    seed: int = 0
    heartbeat_timeout_ms: float = 1000.0
    lease_ttl_s: float = 2.0
    fence_timeout_s: float = 3.0
    fault_window_s: float = 1.0
    min_oks: int = 5
    write_after_s: float = 2.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.safety not in SAFETIES:
            raise ValueError(f"safety {self.safety!r}: expected one of {', '.join(SAFETIES)}")
        if self.netbuf not in NETBUFS:
            raise ValueError(f"netbuf {self.netbuf!r}: expected one of {', '.join(NETBUFS)}")
        if not 1 <= self.interval_ms <= 10_000:
            raise ValueError("interval_ms out of range")

    @property
    def label(self) -> str:
        return (f"{self.kind}/{self.safety} {self.netbuf}@{self.interval_ms:g}ms "
                f"seed={self.seed}")

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.heartbeat_timeout_ms / 1000

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class TrialResult:
    """What one trial observed (every field JSON-able; :meth:`to_json`)."""

    trial: Trial
    skipped: str | None = None
    error: str | None = None
    #: Writes acknowledged to the client.
    acked_writes: int = 0
    #: Keys read back (the last acknowledged value of each must come back).
    keys_read: int = 0
    lost_writes: int = 0
    #: Up to ten lost keys: (key, value written, what was read back - ``None``: no
    #: answer -, when its OK came in seconds after the fault began).
    lost_samples: tuple[tuple[str, str, str | None, float | None], ...] = ()
    #: Reads that got no answer at all (part of ``lost_writes``).
    unanswered_reads: int = 0
    split_brain: bool = False
    split_brain_evidence: tuple[str, ...] = ()
    #: IPv4 frames of the guest seen leaving the primary host: in all, and after the
    #: backup's failover_complete.
    primary_host_guest_frames: int = 0
    old_primary_frames_after_failover: int = 0
    crashes: int = 0
    crash_details: tuple[str, ...] = ()
    failover: bool = False
    failover_refused: bool = False
    failover_ms: float | None = None
    client_downtime_ms: float | None = None
    writes_resumed: bool = False
    oks_after_fault: int = 0
    #: From the first signal (or cut) to the last SIGCONT (or heal), in seconds.
    fault_s: float | None = None
    client_retries: int = 0
    violations: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    #: Hosts whose guest TAP had carrier at the end (a guest NIC attached there).
    guest_taps_up: tuple[str, ...] = ()
    #: Per process, how many of the interesting events it printed.
    events: dict[str, dict[str, int]] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Ran, and nothing went wrong: no loss, split brain, crash or violation."""
        return (self.skipped is None and self.error is None and self.lost_writes == 0
                and not self.split_brain and self.crashes == 0 and not self.violations)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {**self.trial.to_json(), "ok": self.ok}
        for f in dataclasses.fields(self):
            if f.name == "trial":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            row[f.name] = value
        return row

    def describe(self) -> str:
        """A one-paragraph account, for assertion messages and logs."""
        if self.skipped:
            return f"{self.trial.label}: skipped ({self.skipped})"
        parts = [f"{self.trial.label}: {'ok' if self.ok else 'FAILED'}",
                 f"acked={self.acked_writes} lost={self.lost_writes}"
                 f" (unanswered {self.unanswered_reads})",
                 f"split_brain={self.split_brain} crashes={self.crashes}",
                 f"failover={self.failover} refused={self.failover_refused}"
                 f" failover_ms={self.failover_ms}",
                 f"client_downtime_ms={self.client_downtime_ms}"]
        if self.error:
            parts.append(f"error: {self.error}")
        parts += [f"violation: {v}" for v in self.violations]
        parts += [f"split brain: {e}" for e in self.split_brain_evidence]
        parts += [f"crash: {c}" for c in self.crash_details]
        if self.lost_samples:
            parts.append(f"lost (key, wrote, read): {list(self.lost_samples)}")
        parts += [f"note: {n}" for n in self.notes]
        parts.append(f"events: {self.events}")
        return "\n  ".join(parts)


# --- prerequisites --------------------------------------------------------------------------


def why_not(trial: Trial | None = None) -> str | None:
    """Why ``trial`` (or any trial) cannot run here, or ``None`` if it can."""
    reason = require_root()
    if reason is None and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "needs /dev/kvm"
    if reason is None and shutil.which("iptables") is None:
        reason = "needs iptables"
    if reason is None and trial is not None and trial.safety == "arbiter":
        reason = require_etcd()
    return reason


# --- the client -----------------------------------------------------------------------------


class Writer:
    """Write ``i`` is ``SET key<i mod max_keys> value<i>-...``, one at a time, each
    retried until the reply naming its key comes back.

    Writes are paced (``min_gap`` between the starts of two writes): an unprotected
    guest answers within a millisecond. Keys are reused after ``max_keys`` writes (the
    guest's table holds 1024), each time with a new value: :attr:`acked` holds the
    last acknowledged value of each key - what must read back. (A loss is masked
    only if the same key is written and acknowledged again afterwards, ``max_keys``
    writes later.)
    """

    def __init__(self, net: KvNet, *, try_timeout: float = 0.5, min_gap: float = 0.02,
                 max_keys: int = MAX_KEYS) -> None:
        self.net = net
        self.try_timeout = try_timeout
        self.min_gap = min_gap
        self.max_keys = max_keys
        #: key -> its last acknowledged value.
        self.acked: dict[str, str] = {}
        #: key -> when that value's OK came (``time.time()``).
        self.acked_at: dict[str, float] = {}
        #: When each OK came (``time.time()``), in order.
        self.ok_times: list[float] = []
        #: The write that was being retried when the writer stopped: it may or may not
        #: have been applied, so either value of its key is right.
        self.in_flight: tuple[str, str] | None = None
        self.retries = 0
        self.unexpected: list[str] = []
        self.stop = trio.Event()
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                key, value = f"key{i % self.max_keys}", f"value{i}-{i * 7919 % 1000}"
                self.in_flight = (key, value)
                started = trio.current_time()
                while not self.stop.is_set():
                    got = await self.net.try_ask(f"SET {key} {value}", timeout=self.try_timeout)
                    if got is not None and got.reply == f"OK {key}":
                        self.acked[key] = value
                        self.acked_at[key] = got.t1
                        self.ok_times.append(got.t1)
                        self.in_flight = None
                        break
                    if got is not None and len(self.unexpected) < 10:
                        self.unexpected.append(got.reply)
                    self.retries += 1
                await trio.sleep_until(started + self.min_gap)
        finally:
            self.done.set()

    def lost(self, reads: dict[str, str | None]) -> list[tuple[str, str, str | None]]:
        """(key, acknowledged value, reply) of every key whose value did not read back
        (oldest acknowledgement first)."""
        out = []
        for key, value in self.acked.items():
            reply = reads.get(key)
            good = {f"VAL {key} {value}"}
            if self.in_flight is not None and self.in_flight[0] == key:
                good.add(f"VAL {key} {self.in_flight[1]}")
            if reply not in good:
                out.append((key, value, reply))
        return sorted(out, key=lambda lost: self.acked_at.get(lost[0], 0.0))

    def oks_after(self, t: float) -> int:
        return sum(1 for ok in self.ok_times if ok > t)

    def longest_gap_ms(self, since: float) -> float | None:
        """The longest gap between consecutive OKs from the last OK before ``since``
        on; ``None`` if no OK came after ``since``."""
        before = [t for t in self.ok_times if t <= since]
        after = [t for t in self.ok_times if t > since]
        if not after:
            return None
        times = ([before[-1]] if before else [since]) + after
        return round(max(b - a for a, b in zip(times, times[1:], strict=False)) * 1000, 1)


async def read_back(net: KvNet, expected: dict[str, str], *, batch: int = 32,
                    try_timeout: float = 0.5, give_up_s: float = 8.0
                    ) -> dict[str, str | None]:
    """``GET`` every key of ``expected`` from the guest; the reply to each (``None`` if
    none came). Requests go out ``batch`` at a time, replies are matched by key, keys
    without an answer are asked again, until ``give_up_s`` pass without any answer."""
    await net.drain()
    replies: dict[str, str | None] = {}
    pending = list(expected)
    last_answer = trio.current_time()
    while pending:
        chunk, pending = pending[:batch], pending[batch:]
        waiting = set(chunk)
        for key in chunk:
            await net.sock.sendto(f"GET {key}".encode(), net.guest)
        with trio.move_on_after(try_timeout):
            while waiting:
                data, addr = await net.sock.recvfrom(2048)
                parts = data.decode(errors="replace").split(maxsplit=2)
                if (addr == net.guest and len(parts) >= 2 and parts[0] in ("VAL", "NONE")
                        and parts[1] in waiting):
                    replies[parts[1]] = data.decode(errors="replace")
                    waiting.discard(parts[1])
                    last_answer = trio.current_time()
        if waiting:
            if trio.current_time() - last_answer > give_up_s:
                for key in [*waiting, *pending]:
                    replies[key] = None
                break
            pending = [key for key in chunk if key in waiting] + pending
    return replies


# --- one trial ------------------------------------------------------------------------------


class TrialError(Exception):
    """The trial could not go on; the message says why (reported as ``error``)."""


_INTERESTING: Final = (
    "protection_started", "checkpoint_acked", "output_released", "backup_lost",
    "protection_stopped", "domain_stopped", "primary_connected", "checkpoint_applied",
    "failover_started", "failover_complete", "failover_refused", "ownership_taken",
    "ownership_lost", "ownership_refused", "device_failed",
)
_DECISIONS: Final = ("failover_complete", "failover_refused", "ownership_refused")
_ETH_P_ALL: Final = 0x0003
#: A frame seen this long after failover_complete left after it (capture latency).
_CAPTURE_SLACK_S: Final = 0.05


@dataclass
class _Run:
    """The state of a trial in progress (what the analysis reads)."""

    trial: Trial
    rng: random.Random
    workdir: Path
    phase: str = "setup"
    primary: NsProcess | None = None
    backup: NsProcess | None = None
    writer: Writer | None = None
    #: Processes the trial SIGKILLed itself.
    killed: list[NsProcess] = field(default_factory=list)
    fault_at: float | None = None
    fault_end: float | None = None
    reads: dict[str, str | None] | None = None
    #: When guest IPv4 frames left the primary host (``time.time()``).
    primary_guest_frames: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def fence_marker(self) -> Path:
        return self.workdir / "fenced"

    @property
    def pgid_file(self) -> Path:
        return self.workdir / "primary.pgid"

    def fenced(self) -> list[str]:
        try:
            return self.fence_marker.read_text().splitlines()
        except OSError:
            return []


async def _until(condition: Callable[[], T], timeout: float, poll: float = 0.02) -> T | None:
    """The first truthy ``condition()`` within ``timeout`` seconds, else ``None``."""
    with trio.move_on_after(timeout):
        while True:
            result = condition()
            if result:
                return result
            await trio.sleep(poll)
    return None


def _signal(proc: NsProcess, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``proc``'s process group; False if it is gone."""
    if proc.process.returncode is not None:
        return False
    try:
        os.killpg(proc.process.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _kill(run: _Run, proc: NsProcess) -> None:
    if proc not in run.killed:
        run.killed.append(proc)
    _signal(proc, signal.SIGKILL)


_FENCE_SCRIPT: Final = '''\
import os, signal, sys, time
# The power switch: SIGKILL the primary's process group, wait until it is gone.
try:
    pgid = int(open({pgid!r}).read())
except (OSError, ValueError) as exc:
    sys.exit(f"fence: no primary to fence ({{exc}})")
def alive():
    try:
        with open(f"/proc/{{pgid}}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
deadline = time.monotonic() + {patience}
while alive():
    if time.monotonic() > deadline:
        sys.exit(f"fence: process group {{pgid}} still alive")
    time.sleep(0.01)
with open({marker!r}, "a") as f:
    f.write(f"{{time.time()}} {{os.environ.get('TREMUS_FAILOVER_REASON', '')}}\\n")
'''


def _safety_args(trial: Trial, run: _Run, arbiter_url: str | None) -> tuple[list[str], list[str]]:
    """Extra command-line arguments of (backup, primary) for the trial's safety mode."""
    hb = f"{trial.heartbeat_timeout_ms:g}"
    backup = ["--heartbeat-timeout", hb]
    primary = ["--heartbeat-timeout", hb]
    if trial.safety == "fence":
        script = run.workdir / "fence.py"
        script.write_text(_FENCE_SCRIPT.format(pgid=str(run.pgid_file),
                                               marker=str(run.fence_marker),
                                               patience=trial.fence_timeout_s / 2))
        backup += ["--fence", f"{sys.executable} {script}",
                   "--fence-timeout", f"{trial.fence_timeout_s:g}"]
    elif trial.safety == "arbiter":
        assert arbiter_url is not None
        ttl = f"{trial.lease_ttl_s:g}"
        backup += ["--arbiter", arbiter_url, "--lease-ttl", ttl]
        primary += ["--arbiter", arbiter_url, "--arbiter-key", "tremus-faults/kv",
                    "--lease-ttl", ttl]
    return backup, primary


def _rejected(proc: NsProcess, args: Sequence[str]) -> str:
    """Why ``proc`` exited during its start, for the trial's error."""
    err = proc.stderr.decode(errors="replace").strip()
    lines = err.splitlines()
    last = lines[-1] if lines else "(no stderr)"
    if _usage_error(err):
        return (f"`tremus {args[0]}` ({proc.name}) rejected its command line (exit "
                f"{proc.process.returncode}): {last} -- args: {' '.join(args)}")
    return (f"`tremus {args[0]}` ({proc.name}) exited with {proc.process.returncode} during "
            f"its start: {err[-1500:] or '(no stderr)'}")


async def _started(proc: NsProcess, args: Sequence[str], ready: Callable[[NsProcess], Any],
                   what: str, timeout: float) -> None:
    got = await _until(lambda: ready(proc) or proc.exited.is_set(), timeout)
    if got and ready(proc):
        return
    if proc.exited.is_set():
        # Let the stderr pump catch up with the last words.
        await trio.sleep(0.2)
        raise TrialError(_rejected(proc, args))
    raise TrialError(f"{proc.name}: no {what} within {timeout:g} s; last events "
                     f"{[e.get('event') for e in proc.events[-8:]]}, stderr "
                     f"{proc.stderr.decode(errors='replace')[-800:]!r}")


async def _start_backup(net: KvNet, run: _Run, extra: Sequence[str]) -> NsProcess:
    net.backup_port = next(net._ports)
    args = ["backup", "--listen", net.backup_address, "--json", "--once", *extra]
    backup = await net.start("backup", "backup", *args)
    run.backup = backup
    await _started(backup, args, lambda b: b.of("backup_ready"), "backup_ready", 30)
    return backup


async def _start_primary(net: KvNet, run: _Run, extra: Sequence[str]) -> NsProcess:
    trial = run.trial
    domain: dict[str, str] = {}
    more: list[str] = []
    if trial.kind == "first_checkpoint_kill":
        # All of RAM, uncompressed: the first checkpoint takes a while to cross.
        domain["memory"] = FIRST_CHECKPOINT_MEMORY
        more.append("--no-compression")
    args = ["protect", "--domain", net.domain_spec(**domain), "--backup", net.backup_address,
            "--interval", f"{trial.interval_ms:g}", "--netbuf", trial.netbuf, "--json",
            *more, *extra]
    primary = await net.start("primary", "primary", *args)
    run.primary = primary
    # The fence finds the primary's process group here (it runs in its own session).
    run.pgid_file.write_text(str(primary.process.pid))
    if trial.kind == "first_checkpoint_kill":
        await _started(primary, args, lambda p: p.of("protection_started"),
                       "protection_started", 60)
    else:
        await _started(primary, args, lambda p: p.of("checkpoint_acked") and kv_ready(p),
                       "acked checkpoint and kv ready", 60)
    return primary


def _decided(backup: NsProcess) -> bool:
    return backup.exited.is_set() or any(backup.of(name) for name in _DECISIONS)


def _settle_timeout(trial: Trial) -> float:
    """How long a backup may take to decide after its primary went silent."""
    extra = trial.fence_timeout_s if trial.safety == "fence" else 0.0
    if trial.safety == "arbiter":
        extra = 3 * trial.lease_ttl_s
    return 3 * trial.heartbeat_timeout_s + extra + 20


async def _inject(net: KvNet, run: _Run) -> None:
    """The fault itself; sets ``fault_at`` (its start) and ``fault_end``."""
    trial, rng = run.trial, run.rng
    primary, backup = run.primary, run.backup
    assert primary is not None and backup is not None
    hb = trial.heartbeat_timeout_s
    kind = trial.kind
    if kind != "first_checkpoint_kill":
        await trio.sleep(rng.uniform(0, trial.fault_window_s))
    run.phase = f"fault {kind}"
    run.fault_at = time.time()
    if kind == "first_checkpoint_kill":
        since = run.fault_at - primary.of("protection_started")[0]["time"]
        run.notes.append(f"killed {since * 1000:.0f} ms after protection_started")
    if kind == "primary_kill":
        _kill(run, primary)
    elif kind == "first_checkpoint_kill":
        _kill(run, primary)
    elif kind == "backup_kill":
        _kill(run, backup)
    elif kind == "primary_stop":
        _signal(primary, signal.SIGSTOP)
        await trio.sleep(1.5 * hb)  # past the backup's heartbeat timeout, at least
        await _until(lambda: _decided(backup), _settle_timeout(trial))
        await trio.sleep(0.5)
        _signal(primary, signal.SIGCONT)
    elif kind == "backup_stop":
        _signal(backup, signal.SIGSTOP)
        await trio.sleep(1.5 * hb)
        await _until(lambda: primary.of("backup_lost") or primary.exited.is_set(),
                     _settle_timeout(trial))
        await trio.sleep(0.5)
        _signal(backup, signal.SIGCONT)
    elif kind == "stall_then_kill":
        _signal(primary, signal.SIGSTOP)
        await trio.sleep(0.3)
        _signal(backup, signal.SIGSTOP)
        _kill(run, primary)
        await trio.sleep(rng.uniform(0.1, 0.8))
        _signal(backup, signal.SIGCONT)
    elif kind in ("partition", "isolate_primary"):
        cut = _partition_commands(net, kind)
        for argv in cut.cut:
            await _netns(net, "primary", argv)
        try:
            hold = max(3.0, 2 * hb + 1)
            if trial.safety == "arbiter":
                hold += 2 * trial.lease_ttl_s
            await trio.sleep(hold)
        finally:
            with trio.CancelScope(shield=True):
                for argv in cut.heal:
                    await _netns(net, "primary", argv)
    else:  # pragma: no cover - Trial validates kind
        raise AssertionError(kind)
    run.fault_end = time.time()


@dataclass(frozen=True)
class _Cut:
    cut: list[list[str]]
    heal: list[list[str]]


def _partition_commands(net: KvNet, kind: str) -> _Cut:
    if kind == "isolate_primary":
        return _Cut([["ip", "link", "set", "eth0", "down"]], [["ip", "link", "set", "eth0", "up"]])
    # The replication link only: the primary host's address to the backup host's and
    # back. The guest's traffic (another address, bridged) and etcd's are untouched.
    me, peer = net.topo.address("primary"), net.topo.address("backup")
    rules = [["INPUT", "-s", peer, "-d", me], ["OUTPUT", "-s", me, "-d", peer]]
    return _Cut([["iptables", "-w", "-I", *rule, "-j", "DROP"] for rule in rules],
                [["iptables", "-w", "-D", *rule, "-j", "DROP"] for rule in rules])


async def _netns(net: KvNet, host: str, argv: Sequence[str]) -> None:
    result = await trio.to_thread.run_sync(
        lambda: net.topo.run(host, list(argv), check=False, timeout=10))
    if result.returncode != 0:
        raise TrialError(f"`{' '.join(argv)}` in {host} failed: {result.stderr.strip()}")


async def _settle(run: _Run) -> None:
    """Wait (bounded) for the outcome the fault leads to."""
    trial = run.trial
    primary, backup = run.primary, run.backup
    assert primary is not None and backup is not None
    run.phase = "settle"
    timeout = _settle_timeout(trial)
    if trial.kind in ("primary_kill", "first_checkpoint_kill", "stall_then_kill"):
        if await _until(lambda: _decided(backup), timeout) is None:
            run.notes.append(f"the backup decided nothing within {timeout:g} s")
    elif trial.kind == "backup_kill":
        await _until(lambda: primary.of("backup_lost") or primary.exited.is_set(), timeout)
    elif trial.kind in ("primary_stop", "backup_stop", "partition", "isolate_primary"):
        # The side that was stopped or cut off needs a heartbeat timeout to notice.
        await trio.sleep(trial.heartbeat_timeout_s + 1)


async def _write_on(run: _Run) -> None:
    """Keep writing after the fault settled: long enough to see the service back."""
    trial, writer = run.trial, run.writer
    assert writer is not None and run.fault_at is not None
    run.phase = "writing after the fault"
    if trial.kind == "first_checkpoint_kill":
        await trio.sleep(min(1.0, trial.write_after_s))
        return
    t = trio.current_time()
    fault_at = run.fault_at
    if _guest_may_run(run):
        await _until(lambda: writer.oks_after(fault_at) >= 5 or writer.done.is_set(),
                     trial.write_after_s + 10)
    await trio.sleep_until(t + trial.write_after_s)


def _guest_may_run(run: _Run) -> bool:
    """Whether some host may still run the guest (else nothing will answer)."""
    primary, backup = run.primary, run.backup
    assert primary is not None and backup is not None
    if primary.process.returncode is None and primary not in run.killed:
        return True
    return backup.process.returncode is None and not backup.of("failover_refused")


async def _watch_guest_output(net: KvNet, run: _Run, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
    """Stamp every IPv4 frame of the guest that leaves the primary host (on its
    ``eth0``, whatever released it: an output buffer, a teardown, an unprotected
    guest). ARP is left out: it is never held."""
    raw = net.topo.socket("primary", socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    with raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        raw.bind(("eth0", 0))
        sock = trio.socket.from_stdlib_socket(raw)
        mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        task_status.started()
        while True:
            try:
                frame, addr = await sock.recvfrom(2048)
            except OSError as exc:  # the link went down (isolate_primary): go on
                if exc.errno not in (errno.ENETDOWN, errno.ENXIO):
                    raise
                await trio.sleep(0.01)
                continue
            if addr[2] == socket.PACKET_OUTGOING and frame[6:12] == mac \
                    and frame[12:14] == b"\x08\x00":
                run.primary_guest_frames.append(time.time())


async def _drive(net: KvNet, run: _Run, arbiter_url: str | None) -> None:
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            await nursery.start(_watch_guest_output, net, run)
            await _drive_trial(net, run, arbiter_url)
            nursery.cancel_scope.cancel()


async def _drive_trial(net: KvNet, run: _Run, arbiter_url: str | None) -> None:
    trial = run.trial
    backup_args, primary_args = _safety_args(trial, run, arbiter_url)
    run.phase = "starting the backup"
    await _start_backup(net, run, backup_args)
    run.phase = "starting the primary"
    await _start_primary(net, run, primary_args)
    # Long enough for a reply held one interval and a round trip, short enough that
    # the client notices the service back soon (a retry of a SET is harmless).
    try_timeout = max(0.25, 2.5 * trial.interval_ms / 1000 + 0.05)
    writer = run.writer = Writer(net, try_timeout=try_timeout)
    with collapse_groups():
        await _write_through_fault(net, run, writer)
    run.phase = "reading back"
    run.reads = await read_back(net, writer.acked, try_timeout=try_timeout,
                                give_up_s=8.0 if _guest_may_run(run) else 2.0)


async def _write_through_fault(net: KvNet, run: _Run, writer: Writer) -> None:
    trial = run.trial
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        try:
            if trial.kind == "first_checkpoint_kill":
                # Right after protection started, within the first (full) checkpoint:
                # it is taken one interval later and takes a while to cross.
                run.phase = "waiting for the moment of the kill"
                interval = trial.interval_ms / 1000
                await trio.sleep(run.rng.uniform(0.5 * interval, interval + 0.06))
            else:
                run.phase = "writing before the fault"
                got = await _until(lambda: len(writer.acked) >= trial.min_oks,
                                   30 + 20 * trial.interval_ms / 1000)
                if got is None:
                    raise TrialError(
                        f"client: {len(writer.acked)} OKs from the protected guest before "
                        f"the fault (wanted {trial.min_oks}; {writer.retries} retries, "
                        f"unexpected replies {writer.unexpected})")
            await _inject(net, run)
            await _settle(run)
            await _write_on(run)
        finally:
            writer.stop.set()
            with trio.move_on_after(writer.try_timeout + 2):
                await writer.done.wait()
            nursery.cancel_scope.cancel()


# --- analysis -------------------------------------------------------------------------------


def _events_of(proc: NsProcess) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in proc.events:
        name = event.get("event", "?")
        if name in _INTERESTING:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _crashes(run: _Run, procs: Iterable[NsProcess]) -> list[str]:
    found = []
    fenced = bool(run.fenced())
    for proc in procs:
        stderr = proc.stderr.decode(errors="replace")
        rc = proc.process.returncode
        tail = " | ".join(stderr.strip().splitlines()[-6:])
        if "Traceback" in stderr or "ExceptionGroup" in stderr:
            found.append(f"{proc.name} (exit {rc}): traceback on stderr: {tail[-1500:]}")
            continue
        if rc is None or rc == 0 or proc in run.killed:
            continue
        if rc == 2 and _usage_error(stderr):
            continue  # the CLI rejected its command line: the trial's error, not a crash
        if rc == -signal.SIGKILL and proc is run.primary and fenced:
            continue  # the fence's power switch
        names = [e.get("event") for e in proc.events]
        last_error = [line for line in stderr.strip().splitlines() if line.strip()]
        one_line = len(last_error) <= 1 and (not last_error
                                              or last_error[0].startswith("tremus: error:"))
        if rc == 1 and proc is run.backup and "failover_refused" in names and one_line:
            continue  # the documented refusal
        if rc > 0 and one_line and ("ownership_lost" in names or "ownership_refused" in names):
            continue  # gave up ownership, as told
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        found.append(f"{proc.name} ({how}, not sent by the trial): "
                     f"last events {names[-5:]}; stderr: {tail[-1500:] or '(empty)'}")
    return found


def _usage_error(stderr: str) -> bool:
    """Whether ``stderr`` is argparse rejecting a command line."""
    return "usage: tremus" in stderr and any(
        words in stderr for words in ("unrecognized arguments", "invalid choice",
                                      "arguments are required", "expected one argument",
                                      "invalid float value", "invalid int value"))


def _split_brain(run: _Run) -> list[str]:
    primary, backup = run.primary, run.backup
    if primary is None or backup is None:
        return []
    complete = backup.of("failover_complete")
    if not complete:
        return []
    t = complete[0]["time"]
    evidence = []
    leaked = [f for f in run.primary_guest_frames if f > t + _CAPTURE_SLACK_S]
    if leaked:
        evidence.append(
            f"{len(leaked)} IPv4 frame(s) of the guest left the old primary's host after "
            f"the backup's failover_complete (first {leaked[0] - t:+.3f} s, last "
            f"{leaked[-1] - t:+.3f} s)")
    late = [e for e in primary.of("output_released") if e.get("packets", 0) > 0 and e["time"] > t]
    if late:
        evidence.append(
            f"the old primary released {sum(e['packets'] for e in late)} packet(s) in "
            f"{len(late)} epoch(s) after failover_complete (first {late[0]['time'] - t:+.3f} s)")
    names = {e.get("event") for e in primary.events}
    if (primary.process.returncode is None and "domain_stopped" not in names
            and "ownership_lost" not in names):
        unprotected = primary.of("backup_lost")
        how = (f"unprotected since backup_lost at {unprotected[0]['time'] - t:+.3f} s"
               if unprotected else "no backup_lost either")
        evidence.append(
            f"the old primary (pid {primary.process.pid}) still runs the guest "
            f"{time.time() - t:.1f} s after the backup's failover_complete "
            f"(no domain_stopped, no ownership_lost; {how})")
    return evidence


def _expectations(run: _Run) -> list[str]:
    """What the kind says must happen, that did not."""
    trial = run.trial
    primary, backup, writer = run.primary, run.backup, run.writer
    if primary is None or backup is None or writer is None or run.fault_at is None:
        return []
    out = []
    complete = bool(backup.of("failover_complete"))
    resumed = writer.oks_after(run.fault_at) > 0
    kind = trial.kind
    if kind in ("primary_kill", "stall_then_kill") and not complete:
        out.append(f"the backup did not fail over after the primary was killed "
                   f"(events {[e.get('event') for e in backup.events[-5:]]})")
    if kind == "first_checkpoint_kill":
        # What the backup must do depends on whether it completed the first
        # checkpoint before the primary died (then it must fail over) or not.
        if any(a["time"] < run.fault_at for a in primary.of("checkpoint_acked")):
            run.notes.append("the first checkpoint was acknowledged before the kill landed: "
                             "this trial was a plain primary_kill")
        if backup.of("checkpoint_applied"):
            run.notes.append("the backup had completed the first checkpoint")
            if not complete:
                out.append("the backup did not fail over (it had a complete checkpoint)")
        else:
            if complete:
                out.append("the backup failed over without a complete checkpoint")
            elif not backup.of("failover_refused"):
                out.append("the backup did not say failover_refused")
    if kind in ("backup_kill", "backup_stop") and not primary.of("backup_lost"):
        out.append("the primary did not emit backup_lost")
    if kind == "backup_stop" and complete:
        out.append("the stale backup took over after SIGCONT")
    if kind in ("primary_stop", "isolate_primary") and trial.safety != "none" and not complete:
        out.append("the backup did not take over from the unreachable primary")
    if kind != "first_checkpoint_kill" and not resumed:
        out.append("no write was acknowledged after the fault")
    return out


def _taps_up(net: KvNet) -> list[str]:
    hosts = []
    for host in ("primary", "backup"):
        with contextlib.suppress(Exception):
            out = net.topo.run(host, ["ip", "-o", "link", "show", TAP], check=False).stdout
            if "LOWER_UP" in out:
                hosts.append(host)
    return hosts


def _since(t: float | None, origin: float | None) -> float | None:
    return None if t is None or origin is None else round(t - origin, 3)


def _result(run: _Run, net: KvNet | None, started: float) -> TrialResult:
    trial = run.trial
    procs = [p for p in (run.backup, run.primary) if p is not None]
    writer = run.writer
    lost = writer.lost(run.reads) if writer is not None and run.reads is not None else []
    unanswered = sum(1 for _, _, reply in lost if reply is None)
    crashes = _crashes(run, procs)
    split = _split_brain(run)
    backup = run.backup
    complete = backup.of("failover_complete") if backup else []
    notes = list(run.notes)
    violations = _expectations(run)
    if writer and writer.unexpected:
        notes.append(f"unexpected replies: {writer.unexpected}")
    fenced = run.fenced()
    if fenced:
        notes.append(f"fenced: {fenced[0]}")
    downtime = writer.longest_gap_ms(run.fault_at) if writer and run.fault_at else None
    events = {p.name: _events_of(p) for p in procs}
    return TrialResult(
        trial=trial,
        error=run.error,
        acked_writes=len(writer.ok_times) if writer else 0,
        keys_read=len(run.reads) if run.reads is not None else 0,
        lost_writes=len(lost) if run.reads is not None else 0,
        lost_samples=tuple(
            (key, value, reply, _since(writer.acked_at.get(key) if writer else None,
                                       run.fault_at))
            for key, value, reply in lost[:10]),
        unanswered_reads=unanswered,
        split_brain=bool(split),
        split_brain_evidence=tuple(split),
        primary_host_guest_frames=len(run.primary_guest_frames),
        old_primary_frames_after_failover=(
            sum(1 for f in run.primary_guest_frames
                if f > complete[0]["time"] + _CAPTURE_SLACK_S) if complete else 0),
        crashes=len(crashes),
        crash_details=tuple(crashes),
        failover=bool(complete),
        failover_refused=bool(backup.of("failover_refused")) if backup else False,
        failover_ms=complete[0].get("downtime_ms") if complete else None,
        client_downtime_ms=downtime,
        writes_resumed=bool(writer and run.fault_at and writer.oks_after(run.fault_at)),
        oks_after_fault=writer.oks_after(run.fault_at) if writer and run.fault_at else 0,
        fault_s=(round(run.fault_end - run.fault_at, 3)
                 if run.fault_at is not None and run.fault_end is not None else None),
        client_retries=writer.retries if writer else 0,
        violations=tuple(violations),
        notes=tuple(notes),
        guest_taps_up=tuple(_taps_up(net)) if net is not None else (),
        events=events,
        duration_s=round(time.monotonic() - started, 2),
    )


@asynccontextmanager
async def _etcd(net: KvNet) -> AsyncIterator[str]:
    """A three-member etcd cluster on the etcd hosts; yields its ``etcd://`` URL."""
    async with EtcdCluster(net.topo, hosts=ETCD_HOSTS) as cluster:
        yield cluster.url


async def run_trial(trial: Trial) -> TrialResult:
    """Run one trial from scratch (hosts, processes, client) and clean everything up.

    Never raises for what goes wrong in the trial: that is the result's ``error``
    (with ``violations``, crashes and counts as far as the trial got).
    """
    started = time.monotonic()
    reason = why_not(trial)
    if reason is not None:
        return TrialResult(trial=trial, skipped=reason)
    with tempfile.TemporaryDirectory(prefix="tremus-faults-") as tmp:
        run = _Run(trial, random.Random(f"{trial.kind}:{trial.seed}"), Path(tmp))
        net: KvNet | None = None
        hosts = ["client", "primary", "backup"]
        if trial.safety == "arbiter":
            hosts += ETCD_HOSTS
        try:
            async with AsyncExitStack() as stack:
                net = await stack.enter_async_context(
                    kv_net(hosts, guest_hosts=("primary", "backup")))
                with trio.move_on_after(trial.timeout_s) as scope:
                    try:
                        url = None
                        if trial.safety == "arbiter":
                            run.phase = "starting etcd"
                            url = await stack.enter_async_context(_etcd(net))
                        await _drive(net, run, url)
                    except TrialError as exc:
                        run.error = f"{run.phase}: {exc}"
                    except AssertionError as exc:
                        run.error = f"{run.phase}: {exc}"
                if scope.cancelled_caught:
                    run.error = f"timed out after {trial.timeout_s:g} s ({run.phase})"
                # Judge before the processes are killed and the hosts deleted.
                return _result(run, net, started)
        except Exception as exc:  # noqa: BLE001 - reported, the campaign goes on
            run.error = (f"{run.phase}: harness failure: "
                         + "".join(traceback.format_exception(exc))[-3000:])
            return _result(run, None, started)


# --- summaries ------------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return round(statistics.median(known), 1), round(max(known), 1)


def summarize(results: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """One row per (kind, safety): trials, losses, split brains, crashes, timings."""
    groups: dict[tuple[str, str], list[TrialResult]] = {}
    for result in results:
        groups.setdefault((result.trial.kind, result.trial.safety), []).append(result)
    rows = []
    for (kind, safety), group in groups.items():
        ran = [r for r in group if r.skipped is None]
        fo_median, fo_max = _stats([r.failover_ms for r in ran])
        dt_median, dt_max = _stats([r.client_downtime_ms for r in ran])
        row: dict[str, Any] = {
            "summary": True, "kind": kind, "safety": safety,
            "trials": len(ran),
            "skipped": len(group) - len(ran),
            "errors": sum(1 for r in ran if r.error is not None),
            "ok": sum(1 for r in ran if r.ok),
            "acked_writes": sum(r.acked_writes for r in ran),
            "lost_writes": sum(r.lost_writes for r in ran),
            "trials_with_loss": sum(1 for r in ran if r.lost_writes),
            "split_brain": sum(1 for r in ran if r.split_brain),
            "crashes": sum(r.crashes for r in ran),
            "violations": sum(1 for r in ran if r.violations),
            "failovers": sum(1 for r in ran if r.failover),
            "failover_ms_median": fo_median, "failover_ms_max": fo_max,
            "client_downtime_ms_median": dt_median, "client_downtime_ms_max": dt_max,
        }
        if len(ran) < len(group):
            row["skip_reason"] = next(r.skipped for r in group if r.skipped is not None)
        rows.append(row)
    return rows
