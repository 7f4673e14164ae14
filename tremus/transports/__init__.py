"""Checkpoint streams, by URL, and the page codecs that travel on them.

A transport is just a ``trio.abc.Stream`` (``send_all``, ``receive_some`` with
``b""`` at EOF, ``aclose``): the engine drives the sans-IO protocol of
``tremus.engine.protocol`` over whatever ``connect``/``listen`` returned, and knows
nothing about sockets.

=========================  ====================================================
``tcp://HOST:PORT``        TCP (``[v6]`` in brackets); Nagle off, large buffers
``tls://HOST:PORT``        the same inside TLS (``ssl_context``: certificates)
``unix:///PATH``           Unix-domain socket (``unix://@NAME``: abstract name)
``memory://NAME``          in-process pair, for tests and demos (one Trio run)
``blackhole://``           ``connect`` only: swallows everything, never answers
=========================  ====================================================

The backup listens and the primary connects.
"""

from __future__ import annotations

import ssl
from typing import TypeAlias

import trio

from . import codec
from ._listener import Listener
from ._memory import BlackholeStream, connect_memory, listen_memory, memory_pair
from ._sockets import DEFAULT_BUFFER_SIZE, connect_tcp, connect_unix, listen_tcp, listen_unix
from ._tls import client_context, connect_tls, listen_tls, server_context
from ._url import SCHEMES, InvalidURL, TransportURL, parse_url

__all__ = [
    "Stream",
    "Listener",
    "BlackholeStream",
    "client_context",
    "server_context",
    "InvalidURL",
    "TransportURL",
    "SCHEMES",
    "DEFAULT_BUFFER_SIZE",
    "codec",
    "connect",
    "listen",
    "memory_pair",
    "parse_url",
]

#: A checkpoint stream is any Trio stream.
Stream: TypeAlias = trio.abc.Stream


async def connect(
    url: str | TransportURL,
    *,
    buffer_size: int | None = DEFAULT_BUFFER_SIZE,
    ssl_context: ssl.SSLContext | None = None,
) -> Stream:
    """Open a stream to ``url``.

    Args:
        url: a transport URL, see the module docstring.
        buffer_size: TCP socket buffer size to ask for; ``None`` leaves the kernel's
            autotuning alone. Not used by other transports.
        ssl_context: for ``tls://``: whom to trust (default: the system's CAs) and,
            for mutual TLS, our certificate (see ``client_context``).

    Raises:
        InvalidURL: ``url`` is malformed.
        OSError: the connection failed (the message names the URL).
    """
    parsed = parse_url(url) if isinstance(url, str) else url
    match parsed.scheme:
        case "tcp":
            return await connect_tcp(parsed, buffer_size)
        case "tls":
            return await connect_tls(parsed, ssl_context, buffer_size)
        case "unix":
            return await connect_unix(parsed)
        case "memory":
            return await connect_memory(parsed)
        case _:
            await trio.lowlevel.checkpoint()
            return BlackholeStream()


async def listen(
    url: str | TransportURL,
    *,
    buffer_size: int | None = DEFAULT_BUFFER_SIZE,
    backlog: int = 16,
    ssl_context: ssl.SSLContext | None = None,
) -> Listener:
    """Listen on ``url``; ``listener.url`` is the address to give to peers.

    ``tcp://HOST:0`` picks a free port. A stale Unix socket file left by a crashed
    listener is replaced; one with a live listener behind it is an error.

    Raises:
        InvalidURL: ``url`` is malformed, or is a blackhole (nothing to listen on).
        OSError: the address is in use or cannot be bound (the message names it).
    """
    parsed = parse_url(url) if isinstance(url, str) else url
    match parsed.scheme:
        case "tcp":
            return await listen_tcp(parsed, buffer_size, backlog)
        case "tls":
            return await listen_tls(parsed, ssl_context, buffer_size, backlog)
        case "unix":
            return await listen_unix(parsed, backlog)
        case "memory":
            await trio.lowlevel.checkpoint()
            return listen_memory(parsed)
        case _:
            raise InvalidURL(str(parsed), "a blackhole can only be connected to, not listened on")
