"""Real etcd clusters for tests: members on loopback or in a Topology's hosts.

``EtcdCluster(3)`` starts three ``/usr/bin/etcd`` members (Debian's ``etcd-server``)
on 127.0.0.1 with distinct ports; ``EtcdCluster(topo, hosts=[...])`` starts
one member inside each of those hosts' network namespaces, on the host's address
(ports 2379/2380). Timing is fast (50 ms heartbeats, 500 ms elections) so that
etcd grants leases as short as 1 s (its minimum is 1.5 election timeouts,
rounded up to whole seconds).

Every member runs in its own session and process group under a small watchdog
that SIGKILLs it if the test process dies without cleaning up; the data
directories live in one temporary directory (on /dev/shm when there is one).
:meth:`EtcdCluster.close` (``with``/``async with`` exit, and an ``atexit`` hook)
kills every member and removes the data. Members can be SIGKILLed, stopped
(SIGSTOP), resumed and restarted to make failures.

:class:`FreezableProxy` is a TCP relay whose traffic can be frozen: a client that
reaches etcd through it can be cut off without touching the cluster.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, final

import trio

from tremus.buffers.netlink import call_in_netns
from tremus.testing.topology import Topology

__all__ = [
    "ETCD_BINARY",
    "EtcdCluster",
    "EtcdMember",
    "FreezableProxy",
    "cleanup_stale",
    "require_etcd",
]

ETCD_BINARY: Final = "/usr/bin/etcd"
_DIR_PREFIX: Final = "tremus-etcd-"
_live: set[EtcdCluster] = set()

# Runs ARGV as a child and waits for it; SIGKILLs it when our parent (the test
# process) goes away without having killed us first. Both stay in the process
# group the test made, so signalling the group reaches the member.
_WATCHDOG: Final = r"""
import os, signal, sys, time
parent = os.getppid()
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
while True:
    pid, status = os.waitpid(child, os.WNOHANG)
    if pid:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
    if os.getppid() != parent:
        os.kill(child, signal.SIGKILL)
        os._exit(137)
    time.sleep(0.2)
"""


def require_etcd() -> str | None:
    """Why an etcd cluster cannot run here, or ``None`` if it can."""
    if not os.access(ETCD_BINARY, os.X_OK):
        return f"needs {ETCD_BINARY} (Debian package etcd-server; scripts/setup.sh installs it)"
    return None


def _data_base() -> str:
    """Where data directories go: RAM (/dev/shm) when possible, etcd fsyncs a lot."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def cleanup_stale() -> list[str]:
    """Remove data directories of clusters whose test process is gone (killed hard:
    the members' watchdogs killed them, but nobody removed their data)."""
    base = _data_base()
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid_text = name[len(_DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        path = os.path.join(base, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@final
@dataclass
class EtcdMember:
    """One member: where it listens and its process (``None`` while not running)."""

    index: int
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    netns: str | None = None
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of its client (gateway) listener."""
        return f"{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


@final
class EtcdCluster:
    """A real etcd cluster of ``size`` members (see the module docstring).

    Use ``with EtcdCluster(3) as cluster:`` or ``async with`` (which starts and
    closes it in a worker thread). ``cluster.url`` is an ``etcd://`` arbiter URL
    listing every member.
    """

    def __init__(
        self,
        where: int | Topology = 1,
        *,
        hosts: Sequence[str] | None = None,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        """Describe the cluster; :meth:`start` (or entering it) starts it.

        Args:
            where: the number of members on loopback, or a created
                :class:`tremus.testing.topology.Topology`: one member inside each
                host of ``hosts`` (on its address, ports 2379 and 2380).
            hosts: the topology hosts to use (default: all of them).
            heartbeat_ms, election_ms: etcd's raft timing.
            tls_cert, tls_key: serve clients over HTTPS with this certificate;
                ``tls_ca`` is the CA that signed it (for :attr:`url` and health checks).
            start_timeout: seconds to wait for the cluster to become healthy.
        """
        self.topology = where if isinstance(where, Topology) else None
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self._tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self._tls_ca = tls_ca
        self._start_timeout = start_timeout
        self._token = f"tremus-{os.getpid()}-{id(self):x}"
        self._dir: str | None = None
        self._closed = False
        if isinstance(where, Topology):
            chosen = list(hosts) if hosts is not None else list(where.hosts)
            if not chosen:
                raise ValueError("no hosts for the etcd members")
            self._places: list[tuple[str, str | None, int, int]] = [
                (where.address(h), where.netns(h), 2379, 2380) for h in chosen
            ]
        else:
            if hosts is not None:
                raise ValueError("hosts= needs a Topology")
            if where < 1:
                raise ValueError("an etcd cluster needs at least one member")
            ports = _free_ports(2 * where)
            self._places = [
                ("127.0.0.1", None, ports[2 * i], ports[2 * i + 1]) for i in range(where)
            ]
        self.members: list[EtcdMember] = []

    # -- addresses ---------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    @property
    def endpoints(self) -> list[str]:
        """``HOST:PORT`` of every member's client listener."""
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The arbiter URL: ``etcd://a:p,b:p,...`` (``etcd+https://...?ca=`` with TLS)."""
        if self._tls:
            query = f"?ca={self._tls_ca}" if self._tls_ca else ""
            return "etcd+https://" + ",".join(self.endpoints) + query
        return "etcd://" + ",".join(self.endpoints)

    def url_of(self, *indexes: int) -> str:
        """An arbiter URL naming only some members (in that order)."""
        return "etcd://" + ",".join(self.members[i].endpoint for i in indexes)

    # -- life --------------------------------------------------------------------------

    def start(self) -> EtcdCluster:
        """Start every member and wait until each reports healthy (blocking)."""
        if self.members:
            raise RuntimeError("cluster already started")
        reason = require_etcd()
        if reason:
            raise RuntimeError(reason)
        _live.add(self)
        try:
            cleanup_stale()
            self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=_data_base())
            for i, (host, netns, client_port, peer_port) in enumerate(self._places):
                self.members.append(
                    EtcdMember(
                        index=i,
                        name=f"m{i}",
                        host=host,
                        client_port=client_port,
                        peer_port=peer_port,
                        data_dir=os.path.join(self._dir, f"m{i}"),
                        log_path=os.path.join(self._dir, f"m{i}.log"),
                        netns=netns,
                    )
                )
            for member in self.members:
                self._spawn(member)
            self.wait_healthy(timeout=self._start_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _argv(self, member: EtcdMember) -> list[str]:
        initial = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in self.members)
        client_url = f"{self.scheme}://{member.host}:{member.client_port}"
        peer_url = f"http://{member.host}:{member.peer_port}"
        argv = [
            ETCD_BINARY,
            "--name", member.name,
            "--data-dir", member.data_dir,
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self._token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self._tls:
            argv += ["--cert-file", self._tls[0], "--key-file", self._tls[1]]
        return argv

    def _spawn(self, member: EtcdMember) -> None:
        argv = [sys.executable, "-c", _WATCHDOG, *self._argv(member)]
        if member.netns is not None:
            argv = ["ip", "netns", "exec", member.netns, *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach it alone
                env=env,
                close_fds=True,
            )
        member.stopped = False

    def _signal(self, index: int, sig: int) -> None:
        member = self.members[index]
        if member.process is None or member.process.poll() is not None:
            raise RuntimeError(f"etcd member {member.name} is not running")
        try:
            os.killpg(member.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (it can be :meth:`restart` ed on its data)."""
        member = self.members[index]
        if member.process is None:
            return
        try:
            os.killpg(member.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        member.process.wait()
        member.process = None
        member.stopped = False

    def stop(self, index: int) -> None:
        """SIGSTOP member ``index``: it keeps its sockets but answers nothing."""
        self._signal(index, signal.SIGSTOP)
        self.members[index].stopped = True

    def resume(self, index: int) -> None:
        """SIGCONT member ``index``."""
        self._signal(index, signal.SIGCONT)
        self.members[index].stopped = False

    def stop_all(self) -> None:
        for member in self.members:
            if member.running:
                self.stop(member.index)

    def resume_all(self) -> None:
        for member in self.members:
            if member.running and member.stopped:
                self.resume(member.index)

    def restart(self, index: int, *, timeout: float = 10.0) -> None:
        """Start a killed member again on its data directory; wait until healthy."""
        member = self.members[index]
        if member.running:
            raise RuntimeError(f"etcd member {member.name} is still running")
        self._spawn(member)
        self.wait_healthy([index], timeout=timeout)

    # -- looking -----------------------------------------------------------------------

    def _http(self, member: EtcdMember, path: str, body: dict[str, Any] | None,
              timeout: float) -> Any:
        url = f"{self.scheme}://{member.host}:{member.client_port}{path}"
        context = None
        if self._tls:
            context = ssl.create_default_context(cafile=self._tls_ca)
        data = json.dumps(body).encode() if body is not None else None

        def fetch() -> Any:
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
            with opener.open(url, data=data, timeout=timeout) as reply:
                return json.loads(reply.read())

        return call_in_netns(member.netns, fetch)

    def healthy(self, index: int, timeout: float = 1.0) -> bool:
        """Whether member ``index`` answers ``/health`` with true (it has a leader)."""
        member = self.members[index]
        if not member.running or member.stopped:
            return False
        try:
            reply = self._http(member, "/health", None, timeout)
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return bool(reply.get("health") == "true")

    def wait_healthy(self, indexes: Sequence[int] | None = None, *, timeout: float = 10.0
                     ) -> None:
        """Block until the members (default: all running ones) are healthy."""
        chosen = (
            list(indexes) if indexes is not None
            else [m.index for m in self.members if m.running and not m.stopped]
        )
        deadline = time.monotonic() + timeout
        pending = set(chosen)
        while pending:
            for i in sorted(pending):
                member = self.members[i]
                if not member.running:
                    raise RuntimeError(
                        f"etcd member {member.name} exited "
                        f"({member.process.returncode if member.process else None}):\n"
                        + member.log_tail()
                    )
                if self.healthy(i, timeout=0.5):
                    pending.discard(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {self.members[i].name}:\n{self.members[i].log_tail()}"
                                 for i in sorted(pending))
                raise TimeoutError(f"etcd members {sorted(pending)} not healthy after "
                                   f"{timeout} s\n{logs}")
            time.sleep(0.05)

    def leader(self, timeout: float = 5.0) -> int:
        """The index of the current leader (asks the running members; blocking)."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, int] = {}
            leader_id = None
            for member in self.members:
                if not member.running or member.stopped:
                    continue
                try:
                    status = self._http(member, "/v3/maintenance/status", {}, 0.5)
                except (OSError, ValueError, urllib.error.URLError):
                    continue
                ids[str(status["header"]["member_id"])] = member.index
                if status.get("leader") and status["leader"] != "0":
                    leader_id = str(status["leader"])
            if leader_id is not None and leader_id in ids:
                return ids[leader_id]
            if time.monotonic() > deadline:
                raise TimeoutError("no etcd leader found")
            time.sleep(0.05)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """SIGKILL every member and remove the data directories (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for member in self.members:
            if member.process is not None:
                try:
                    os.killpg(member.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for member in self.members:
            if member.process is not None:
                try:
                    member.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                member.process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _live.discard(self)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> EtcdCluster:
        try:
            return await trio.to_thread.run_sync(self.start)
        except BaseException:
            self.close()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.close)


@atexit.register
def _close_all() -> None:
    for cluster in list(_live):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


@final
class FreezableProxy:
    """A TCP relay on 127.0.0.1 to ``target``, whose traffic can be frozen.

    While frozen, connections are still accepted but no byte moves either way and
    nothing is reset: to a client this looks like a network partition. Run
    :meth:`serve` in a nursery (``await nursery.start(proxy.serve)``); ``port`` is
    then where to connect.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    def freeze(self) -> None:
        self._flowing = trio.Event()

    def thaw(self) -> None:
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            await self._flowing.wait()
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    try:
                        while True:
                            data = await src.receive_some(65536)
                            await self._flowing.wait()
                            if not data:
                                break
                            await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
