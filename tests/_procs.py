"""Run ``tremus`` commands as real OS processes and read their JSON-line events."""

from __future__ import annotations

import socket
import subprocess

import trio

from tremus.engine import protocol as p
from tremus.testing.procs import TremusProcess, start_tremus, tremus_argv

__all__ = ["TremusProcess", "free_port", "local_address", "plain_lines", "run_ctl",
           "scripted_hello", "start_tremus"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_address(stream: trio.SocketStream) -> str:
    """``HOST:PORT`` of our end of ``stream``: how the server names us as its peer."""
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


def plain_lines(proc: TremusProcess) -> list[str]:
    """What a process without ``--json`` printed on stdout so far, one entry a line
    (``TremusProcess`` keeps each line that is not JSON as a ``garbage`` event)."""
    return [str(e["line"]) for e in proc.events if e["event"] == "garbage"]


async def run_ctl(path: str, *args: str, timeout: float = 60
                  ) -> subprocess.CompletedProcess[bytes]:
    """``tremus ctl PATH ARGS`` as a process: its exit code, stdout and stderr (not checked)."""
    with trio.fail_after(timeout):
        return await trio.run_process(tremus_argv(["ctl", path, *args]), capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      stdin=subprocess.DEVNULL)


async def scripted_hello(port: int, hello: p.Hello, *, secret: bytes | None = None,
                         timeout: float = 30) -> tuple[str, p.Welcome | p.End | None]:
    """A scripted primary (the real sans-IO ``PrimaryConnection``, no guest): connect to
    the backup on 127.0.0.1:``port``, send ``hello`` (signed with ``secret``), read the
    backup's answer, and close: after a WELCOME, gracefully (END).

    Returns our address (as the backup names its peer) and the answer: WELCOME, END
    (a refusal, with its reason), or None if the backup closed without either.
    """
    conn = p.PrimaryConnection(secret=secret)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            address = local_address(stream)
            await stream.send_all(conn.send(hello))
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return address, None
                if not data:
                    return address, None
                conn.receive_data(data)
                event = conn.next_event()
                if isinstance(event, p.Welcome):
                    await stream.send_all(conn.send(p.End("the scripted primary is done")))
                    return address, event
                if isinstance(event, p.End):
                    return address, event
                if event is not p.NEED_DATA:
                    raise AssertionError(f"expected WELCOME or END from the backup, got {event!r}")
