"""``tls://HOST:PORT``: the TCP transport inside TLS.

A checkpoint stream carries the guest's memory: on a network that is not private,
encrypt it. The HELLO's shared-secret authentication proves who the peer is but
protects nothing after it; TLS (with a CA both sides trust, and client
certificates for mutual authentication) protects every frame.
"""

from __future__ import annotations

import ssl
from typing import final

import trio

from tremus.transports._listener import Listener
from tremus.transports._sockets import connect_tcp, listen_tcp
from tremus.transports._url import InvalidURL, TransportURL

__all__ = ["client_context", "connect_tls", "listen_tls", "server_context"]


def server_context(cert: str, key: str | None = None, ca: str | None = None) -> ssl.SSLContext:
    """The backup's side: its certificate; with ``ca``, clients must present one too."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str | None = None, cert: str | None = None,
                   key: str | None = None) -> ssl.SSLContext:
    """The primary's side: trust ``ca`` (else the system's CAs); ``cert`` for mutual TLS."""
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _tcp(url: TransportURL) -> TransportURL:
    return TransportURL("tcp", host=url.host, port=url.port)


async def connect_tls(url: TransportURL, context: ssl.SSLContext | None,
                      buffer_size: int | None) -> trio.SSLStream[trio.SocketStream]:
    tcp = await connect_tcp(_tcp(url), buffer_size)
    stream = trio.SSLStream(tcp, context or client_context(), server_hostname=url.host)
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        await tcp.aclose()
        cause = exc.__cause__ or exc
        raise ConnectionError(f"TLS handshake with {url} failed: {cause}") from exc
    return stream


@final
class _TlsListener(Listener):
    def __init__(self, inner: Listener, context: ssl.SSLContext) -> None:
        self._inner = inner
        self._context = context

    @property
    def url(self) -> str:
        return "tls" + self._inner.url.removeprefix("tcp")

    async def accept(self) -> trio.SSLStream[trio.abc.Stream]:
        """The next connection, its handshake not done yet.

        The handshake happens on first use, or by ``await stream.do_handshake()``: in
        the connection's own task, so that a peer that never completes it cannot hold
        up the connections after it (a handshake that fails raises
        ``trio.BrokenResourceError`` with the ``ssl.SSLError`` as its cause).
        """
        tcp = await self._inner.accept()
        return trio.SSLStream(tcp, self._context, server_side=True)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def listen_tls(url: TransportURL, context: ssl.SSLContext | None,
                     buffer_size: int | None, backlog: int) -> Listener:
    if context is None:
        raise InvalidURL(str(url), "listening on tls:// needs a certificate (an ssl_context "
                                   "with one; the CLI's --tls-cert and --tls-key)")
    return _TlsListener(await listen_tcp(_tcp(url), buffer_size, backlog), context)
