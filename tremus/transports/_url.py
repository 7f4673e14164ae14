"""Transport URLs: ``tcp://HOST:PORT``, ``tls://HOST:PORT``, ``unix:///path``,
``memory://NAME``, ``blackhole://``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

__all__ = ["InvalidURL", "TransportURL", "parse_url", "SCHEMES"]

SCHEMES: Final = ("tcp", "tls", "unix", "memory", "blackhole")
_FORMS: Final = (
    "tcp://HOST:PORT, tcp://[IPV6]:PORT, tls://HOST:PORT, unix:///PATH, memory://NAME "
    "or blackhole://"
)
#: sun_path is 108 bytes on Linux, one of them the terminating NUL.
_MAX_UNIX_PATH: Final = 107


@final
class InvalidURL(ValueError):
    """A transport URL that cannot be used; the message says why and what would do."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"invalid transport URL {url!r}: {why}")
        self.url = url


@final
@dataclass(frozen=True, slots=True)
class TransportURL:
    """A parsed transport URL. ``host``/``port`` for tcp, ``path`` for unix and memory."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme in ("tcp", "tls"):
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{self.scheme}://{host}:{self.port}"
        if self.scheme == "unix" and self.path.startswith("\0"):
            return f"unix://@{self.path[1:]}"
        return f"{self.scheme}://{self.path}"


def parse_url(url: str) -> TransportURL:
    """Parse a transport URL.

    ``unix://@NAME`` names a Linux abstract socket; ``unix://rel/path`` is relative.

    Raises:
        InvalidURL: with the reason and the accepted forms.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        if url == "blackhole":
            return TransportURL("blackhole")
        raise InvalidURL(url, f"no scheme; expected {_FORMS}")
    if scheme not in SCHEMES:
        raise InvalidURL(url, f"unknown scheme {scheme!r}; expected {_FORMS}")
    if scheme in ("tcp", "tls"):
        host, port = _host_port(url, rest)
        return TransportURL(scheme, host=host, port=port)
    if scheme == "unix":
        if not rest:
            raise InvalidURL(url, "no socket path; expected unix:///PATH or unix://@ABSTRACT")
        path = "\0" + rest[1:] if rest.startswith("@") else rest
        if len(path.encode()) > _MAX_UNIX_PATH:
            raise InvalidURL(url, f"socket path longer than {_MAX_UNIX_PATH} bytes")
        return TransportURL("unix", path=path)
    if scheme == "memory":
        if not rest or "/" in rest:
            raise InvalidURL(url, "expected memory://NAME with a non-empty NAME and no '/'")
        return TransportURL("memory", path=rest)
    if rest:
        raise InvalidURL(url, "blackhole takes no address; use blackhole://")
    return TransportURL("blackhole")


def _host_port(url: str, rest: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not host:
            raise InvalidURL(url, "unterminated or empty [IPv6] address; expected tcp://[::1]:PORT")
        if not tail.startswith(":"):
            raise InvalidURL(url, "no port after the [IPv6] address; expected tcp://[IPV6]:PORT")
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise InvalidURL(url, "no port; expected tcp://HOST:PORT")
        if ":" in host:
            raise InvalidURL(url, "an IPv6 address must be in brackets: tcp://[::1]:PORT")
        if not host:
            raise InvalidURL(url, "no host; use 0.0.0.0 or [::] to listen on all interfaces")
    if "/" in port_text or "/" in host:
        raise InvalidURL(url, "a tcp URL has no path; expected tcp://HOST:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidURL(url, f"port {port_text!r} is not a number in 0..65535")
    return host, int(port_text)
