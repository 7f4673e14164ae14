"""TCP and Unix-domain socket transports.

Checkpoints are bulk transfers followed by a small ACK the primary waits for, so
both ends want Nagle off (Trio's ``SocketStream`` sets ``TCP_NODELAY``; we check it)
and socket buffers big enough for a whole batch of pages in flight.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from typing import Final, final

import trio

from ._listener import Listener
from ._url import TransportURL

__all__ = ["DEFAULT_BUFFER_SIZE", "connect_tcp", "listen_tcp", "connect_unix", "listen_unix"]

#: Socket send/receive buffer asked for by default (see ``_tune``).
DEFAULT_BUFFER_SIZE: Final = 4 * 1024 * 1024
_BACKLOG: Final = 16


@functools.cache
def _sysctl_max(name: str) -> int | None:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _tune(sock: trio.socket.SocketType, buffer_size: int | None) -> None:
    """Ask for ``buffer_size`` byte socket buffers, where the kernel grants them.

    On Linux an explicit size turns off buffer autotuning, and the kernel silently
    clamps it to ``net.core.[rw]mem_max``: asking for more than that would leave a
    smaller buffer than autotuning gives. So we only ask when the limit allows it.
    """
    if buffer_size is None:
        return
    for option, limit_name in (
        (trio.socket.SO_SNDBUF, "wmem_max"),
        (trio.socket.SO_RCVBUF, "rmem_max"),
    ):
        limit = _sysctl_max(limit_name)
        if limit is None or buffer_size <= limit:
            sock.setsockopt(trio.socket.SOL_SOCKET, option, buffer_size)


def _with_url(exc: OSError, what: str, url: TransportURL) -> OSError:
    """The same kind of OSError, saying which URL it was about."""
    reason = exc.strerror or str(exc)
    if exc.errno is None:
        return type(exc)(f"{what} {url}: {reason}")
    return type(exc)(exc.errno, f"{what} {url}: {reason}")


def _stream(sock: trio.socket.SocketType) -> trio.SocketStream:
    stream = trio.SocketStream(sock)
    if sock.family != trio.socket.AF_UNIX:
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    return stream


async def connect_tcp(url: TransportURL, buffer_size: int | None) -> trio.SocketStream:
    try:
        infos = await trio.socket.getaddrinfo(url.host, url.port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise _with_url(exc, "cannot resolve", url) from exc
    last: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            _tune(sock, buffer_size)
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return _stream(sock)
    assert last is not None  # getaddrinfo returns at least one address or raises
    raise _with_url(last, "cannot connect to", url) from last


@final
class _SocketListener(Listener):
    """A ``trio.SocketListener`` plus its URL; removes its Unix socket file on close."""

    def __init__(self, sock: trio.socket.SocketType, url: TransportURL) -> None:
        self._listener = trio.SocketListener(sock)
        self._url = url
        self._unlink: tuple[str, int] | None = None
        if url.scheme == "unix" and not url.path.startswith("\0"):
            self._unlink = (url.path, os.stat(url.path).st_ino)

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._listener.socket

    @property
    def url(self) -> str:
        if self._url.scheme == "tcp":
            host, port = self.socket.getsockname()[:2]
            return str(TransportURL("tcp", host=host, port=port))
        return str(self._url)

    async def accept(self) -> trio.SocketStream:
        stream = await self._listener.accept()
        if self._url.scheme == "tcp":
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        return stream

    async def aclose(self) -> None:
        if self._unlink is not None:
            path, inode = self._unlink
            self._unlink = None
            # Only our own socket file: a later listener may have replaced it.
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        await self._listener.aclose()


async def listen_tcp(url: TransportURL, buffer_size: int | None, backlog: int) -> Listener:
    try:
        infos = await trio.socket.getaddrinfo(
            url.host, url.port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
        )
    except OSError as exc:
        raise _with_url(exc, "cannot resolve", url) from exc
    family, type_, proto, _, address = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        # Set on the listening socket, accepted sockets inherit the buffer sizes.
        _tune(sock, buffer_size)
        await sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _with_url(exc, "cannot listen on", url) from exc
    except BaseException:
        sock.close()
        raise
    return _SocketListener(sock, url)


async def connect_unix(url: TransportURL) -> trio.SocketStream:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.connect(url.path)
    except OSError as exc:
        sock.close()
        raise _with_url(exc, "cannot connect to", url) from exc
    except BaseException:
        sock.close()
        raise
    return _stream(sock)


async def _is_stale(path: str) -> bool:
    """Whether ``path`` is a Unix socket file nobody listens on (left by a crash)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


async def listen_unix(url: TransportURL, backlog: int) -> Listener:
    for attempt in range(2):
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(url.path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and attempt == 0 and await _is_stale(url.path):
                os.unlink(url.path)
                continue
            raise _with_url(exc, "cannot listen on", url) from exc
        except BaseException:
            sock.close()
            raise
        return _SocketListener(sock, url)
    raise AssertionError("unreachable")
