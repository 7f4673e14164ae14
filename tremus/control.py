"""The control socket: ask a running tremus for its status, start and stop things,
and watch its events, in the spirit of QMP and of libxl's asynchronous operations.

A long-running ``tremus run``, ``protect`` or ``backup`` serves it with
``--control PATH``; ``tremus ctl PATH COMMAND`` is its command-line client, and
``control_request`` / ``control_events`` are the same for programs.

Wire format
-----------

Newline-delimited JSON (UTF-8, one object per line) over a Unix stream socket
(mode 0600: only its owner, and root, may connect).

On connect the server first sends a greeting, like QMP's::

    {"tremus": {"version": "0.1.0", "role": "primary"}, "commands": ["events", ...]}

``role`` is ``primary``, ``backup`` or ``run``; ``commands`` lists every command the
server answers. Then the client sends requests, one per line, and gets one reply
per request, in order::

    {"id": <any JSON>, "command": "<name>", ...arguments}
    {"id": <the same>, "ok": true, "result": {...}}
    {"id": <the same>, "ok": false, "error": "<message that names what failed>"}

A request that could not be read (not JSON, not an object) is answered with
``"id": null``. A line longer than ``MAX_LINE`` bytes is answered with an error,
and the connection is closed. Blank lines are ignored.

``events`` is built in: it replies ``ok`` (the subscription is in place by then, so
nothing emitted afterwards is missed) and then streams every event of the
process's ``EventHub`` as one line each, ``{"event": "<name>", "time": ..., ...}``
(``Event.to_json()``), until the client disconnects or shuts its sending side
down (as QMP does, end of input ends the session). The connection carries only
events from then on: any further request is answered with an error. A client that
reads too slowly loses the oldest events, and is told before the next one it gets::

    {"event": "events_dropped", "count": N}

A client that stops reading altogether is disconnected once a send has waited
``send_timeout`` seconds, so it can hold neither memory nor the server.

Long operations (``protect``) work the libxl ``ao_how`` way: the reply comes at
once, ``{"operation": "protect", ...}``, and the outcome later as an
``{"event": "operation_complete", "operation": "protect", "ok": ..., "error": ...}``
event. To be sure to see it, subscribe to events on a second connection *before*
sending the request (``tremus ctl`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, final

import trio

from tremus.engine.events import EventHub, Subscription

__all__ = [
    "KNOWN_COMMANDS", "MAX_LINE", "ControlError", "ControlUnreachable", "Handler",
    "add_ctl_parser", "cmd_ctl", "control_events", "control_request", "serve_control",
]

#: What the embedding code supplies for each command: the request's arguments
#: (everything but ``id`` and ``command``) in, the reply's ``result`` out.
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: The longest request line the server reads (without its newline). Requests are
#: small; the limit keeps a client from making the server buffer without end.
MAX_LINE: Final = 64 * 1024
#: The longest line a client reads: replies and events are ours, so more generous.
_CLIENT_MAX_LINE: Final = 16 * 1024 * 1024
#: How long a client waits for the greeting before deciding it is not a tremus.
_GREETING_TIMEOUT: Final = 10.0
#: How long a probe waits to learn whether a socket file has a listener behind it.
_PROBE_TIMEOUT: Final = 2.0
_BACKLOG: Final = 64
#: The longest path a Unix socket can be bound at: sizeof(sun_path), less the NUL.
_MAX_UNIX_PATH: Final = 107
#: The commands ``tremus ctl`` knows by name (others are passed through as well).
KNOWN_COMMANDS: Final = ("status", "stop-protection", "protect", "stop", "events")
#: Errors after which a connection is of no further use: its peer is gone, or
#: would not read what we sent in time.
_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class ControlError(Exception):
    """A control request failed; the message says what failed.

    Raised by handlers for a clean error reply, by ``serve_control`` when it
    cannot take the socket path, and by the client functions for an error reply.
    """


@final
class ControlUnreachable(ControlError):
    """Nothing answers at the control socket path (no process, a stale socket, no
    permission). Separate from an error reply so callers can tell "not running"
    from "said no"."""


@final
class _LineTooLong(Exception):
    """The peer sent more than the limit without a newline."""


@final
class _LineReader:
    """Lines from a stream, never buffering more than one line's limit."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0  # no newline before this offset of the buffer

    async def line(self) -> bytes | None:
        """The next line without its newline; None at end of stream.

        A partial last line is dropped: a peer that disconnects mid-request
        sent no request.
        """
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                if end > self._limit:
                    raise _LineTooLong
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._limit:
                raise _LineTooLong
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk


def _encode(message: Mapping[str, Any]) -> bytes:
    """One JSON line; ValueError/TypeError for what JSON cannot say (NaN, a cycle)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False,
                      default=str).encode() + b"\n"


def _error(request_id: Any, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": message}


# --------------------------------------------------------------------------- server


@final
class _Client:
    """One connection to the server: its requests, answered in order."""

    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self._server = server
        self._stream = stream
        self._lines = _LineReader(stream, MAX_LINE)
        # An events connection sends from two tasks: lines must not interleave.
        self._send_lock = trio.StrictFIFOLock()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one line, or raise TooSlowError: a client that does not read
        within ``send_timeout`` must not hold up this task (or a hub's memory)."""
        data = _encode(message)
        with trio.fail_after(self._server.send_timeout):
            async with self._send_lock:
                await self._stream.send_all(data)

    async def run(self) -> None:
        await self.send(self._server.greeting)
        while True:
            request = await self._next_request()
            if request is None:
                return
            request_id, command, args = request
            if command == "events":
                await self._stream_events(request_id)
                return
            await self.send(await self._call(request_id, command, args))

    async def _next_request(self) -> tuple[Any, str, dict[str, Any]] | None:
        """The next well-formed request for a known command, answering the others
        with an error on the way; None when the connection is done."""
        while True:
            try:
                line = await self._lines.line()
            except _LineTooLong:
                await self.send(_error(None, f"request longer than {MAX_LINE} bytes; "
                                             "closing the connection"))
                return None
            if line is None:
                return None
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                await self.send(_error(None, f"request is not JSON: {exc}"))
                continue
            if not isinstance(request, dict):
                await self.send(_error(None, "a request must be a JSON object, not "
                                             f"{_json_type(request)}"))
                continue
            request_id = request.get("id")
            command = request.get("command")
            known = self._server.known()
            if not isinstance(command, str):
                what = "no \"command\"" if command is None else "\"command\" is not a string"
                await self.send(_error(request_id, f"{what}; known commands: {known}"))
                continue
            if command != "events" and command not in self._server.commands:
                await self.send(_error(request_id,
                                       f"unknown command {command!r}; known commands: {known}"))
                continue
            args = {k: v for k, v in request.items() if k not in ("id", "command")}
            return request_id, command, args

    async def _call(self, request_id: Any, command: str, args: dict[str, Any]
                    ) -> dict[str, Any]:
        """The reply to one request. A handler's failure is the client's answer,
        never the server's end: the process it controls must not die of it."""
        handler = self._server.commands[command]
        try:
            result = await handler(args)
        except Exception as exc:
            leaf = _single_leaf(exc)
            if isinstance(leaf, ControlError):
                return _error(request_id, str(leaf) or f"{command} failed")
            return _error(request_id, f"{command} failed: {type(leaf).__name__}: {leaf}")
        if not isinstance(result, Mapping):
            return _error(request_id, f"{command} returned {_json_type(result)}, "
                                      "not a JSON object")
        reply = {"id": request_id, "ok": True, "result": dict(result)}
        try:
            _encode(reply)
        except (TypeError, ValueError, RecursionError) as exc:
            return _error(request_id, f"{command} returned a result that is not JSON: {exc}")
        return reply

    async def _stream_events(self, request_id: Any) -> None:
        # Subscribed before the reply: whatever the client does after reading it
        # (send a request elsewhere, say), the events it causes are in the stream.
        with self._server.hub.subscribe(self._server.events_buffer) as subscription:
            await self.send({"id": request_id, "ok": True, "result": {}})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, subscription, nursery.cancel_scope)
                nursery.start_soon(self._refuse_requests, nursery.cancel_scope)

    async def _forward(self, subscription: Subscription, done: trio.CancelScope) -> None:
        """Send the hub's events; the first to end (this or the reader) ends both."""
        reported = 0
        try:
            async for event in subscription:
                # Read before any await: drops counted now all precede ``event``.
                dropped = subscription.dropped
                if dropped > reported:
                    await self.send({"event": "events_dropped", "count": dropped - reported})
                    reported = dropped
                await self.send(event.to_json())
        except _GONE:
            pass
        finally:
            done.cancel()

    async def _refuse_requests(self, done: trio.CancelScope) -> None:
        """Read what an events client sends: its end of stream is how we learn it
        left (else its subscription would live until the next event); anything
        else it sends is an error, this connection only streams."""
        try:
            while (request := await self._next_request()) is not None:
                await self.send(_error(request[0], f"this connection streams events; send "
                                                   f"{request[1]!r} on another connection"))
        except _GONE:
            pass
        finally:
            done.cancel()


def _single_leaf(exc: Exception) -> Exception:
    """The one exception inside nested groups of one (a handler's nursery wraps
    whatever its task raised), else ``exc`` itself."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@final
class _Server:
    """What every connection shares: the commands, the hub, the limits."""

    def __init__(self, path: str, commands: Mapping[str, Handler], hub: EventHub, role: str,
                 send_timeout: float, events_buffer: int, max_clients: int) -> None:
        from tremus import __version__  # here: tremus/__init__ is still loading otherwise

        self.path = path
        self.commands = dict(commands)
        self.hub = hub
        self.send_timeout = send_timeout
        self.events_buffer = events_buffer
        self.max_clients = max_clients
        self.clients = 0
        self.greeting = {"tremus": {"version": __version__, "role": role},
                         "commands": sorted({*self.commands, "events"})}

    def known(self) -> str:
        return ", ".join(self.greeting["commands"])

    async def serve_client(self, stream: trio.SocketStream) -> None:
        client = _Client(self, stream)
        if self.clients >= self.max_clients:
            # Each client holds a task and a descriptor: refuse, do not pile up.
            with contextlib.suppress(*_GONE):
                await client.send(_error(None, f"too many control clients "
                                               f"({self.max_clients}); try again later"))
            return
        self.clients += 1
        try:
            await client.run()
        except _GONE:
            pass
        except Exception as exc:
            # A bug here must cost one client, not the protected guest's process.
            print(f"tremus: control socket {self.path}: dropped a client after an internal "
                  f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            self.clients -= 1


async def _probe(path: str) -> bool:
    """Whether a process listens on the socket file ``path`` (False: stale or gone)."""
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(_PROBE_TIMEOUT):
            await probe.connect(path)
        return True  # connected, or waited on a full backlog: a busy listener
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise ControlError(f"{path}: cannot tell whether a process listens there: "
                           f"{exc.strerror or exc}") from None
    finally:
        probe.close()


async def _clear(path: str) -> None:
    """Make ``path`` free for a new socket, removing a stale one (left by a crash);
    never a live one, nor anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path}: exists and is not a socket; not replacing it")
    if await _probe(path):
        raise ControlError(f"{path}: another process is listening there")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _create_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at ``path``, mode 0600 from the start; and its file's
    (device, inode), to remove it at the end only if it is still ours."""
    try:
        sock = await _bind_beside(path) or await _bind_with_umask(path)
        try:
            sock.listen(_BACKLOG)
            info = os.stat(path)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ControlError(f"cannot create the control socket {path}: "
                           f"{exc.strerror or exc}") from None
    return sock, (info.st_dev, info.st_ino)


async def _bind_beside(path: str) -> socket.socket | None:
    """Bind in a fresh private directory beside ``path``, make the socket 0600
    there, then hard-link it into place. No one else can connect during the moment
    it has the umask's mode; the process-wide umask (other threads create files)
    is left alone; and link(2), unlike rename, never replaces a socket another
    process bound meanwhile. None where that cannot work: the longer path does not
    fit in sun_path, or the filesystem has no hard links.
    """
    private = tempfile.mkdtemp(prefix=".tremus-", dir=os.path.dirname(os.path.abspath(path)))
    temporary = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(temporary)) > _MAX_UNIX_PATH:
            sock.close()
            return None
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        for _ in range(3):
            await _clear(path)
            try:
                os.link(temporary, path)
                return sock
            except FileExistsError:
                continue  # another process created it after _clear: look again
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                sock.close()
                return None
        raise ControlError(f"{path}: something keeps being created there")
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        with contextlib.suppress(OSError):
            os.rmdir(private)


async def _bind_with_umask(path: str) -> socket.socket:
    """Bind at ``path`` itself, for the rare place ``_bind_beside`` cannot work;
    paid for with a brief process-wide umask. bind(2) too refuses a path that
    exists, so a socket created meanwhile is not replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for _ in range(3):
            await _clear(path)
            old = os.umask(0o177)
            try:
                sock.bind(path)
                return sock
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # else created after _clear: look again
                    raise
            finally:
                os.umask(old)
        raise ControlError(f"{path}: something keeps being created there")
    except BaseException:
        sock.close()
        raise


def _remove_if_ours(path: str, identity: tuple[int, int]) -> None:
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


async def serve_control(path: str, commands: Mapping[str, Handler], hub: EventHub, *,
                        role: str, send_timeout: float = 5.0, events_buffer: int = 1024,
                        max_clients: int = 64,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Serve the control socket at ``path`` until cancelled; start it with
    ``await nursery.start(serve_control, path, commands, hub, role=...)`` so that
    the socket exists (and errors are raised) before the caller goes on.

    ``commands``: name -> handler; ``events`` is built in. Raises ControlError if
    another process listens at ``path`` or it is not a socket; a stale socket file
    is replaced. The socket file is removed when this ends.

    ``send_timeout``: a client that does not take a line within this many seconds
    is disconnected. ``events_buffer``: events kept per ``events`` client that
    reads slowly before the oldest are dropped. ``max_clients``: connections
    served at once; more are refused with an error line.
    """
    if "events" in commands:
        raise ValueError("'events' is built into the control socket; it cannot be replaced")
    server = _Server(path, commands, hub, role, send_timeout, events_buffer, max_clients)
    sock, identity = await _create_socket(path)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(server.serve_client, [listener], handler_nursery=nursery)
    finally:
        _remove_if_ours(path, identity)
        listener.socket.close()


# --------------------------------------------------------------------------- client


@final
class _Connection:
    """A client's connection, past the greeting."""

    def __init__(self, path: str, stream: trio.SocketStream, lines: _LineReader,
                 greeting: dict[str, Any]) -> None:
        self.path = path
        self.greeting = greeting
        self._stream = stream
        self._lines = lines
        self._next_id = 1

    @staticmethod
    async def _read(path: str, lines: _LineReader, waiting_for: str) -> dict[str, Any]:
        try:
            line = await lines.line()
        except _LineTooLong:
            raise ControlError(f"{path}: a line longer than {_CLIENT_MAX_LINE} bytes "
                               f"while waiting for {waiting_for}") from None
        except trio.BrokenResourceError as exc:
            raise ControlError(f"{path}: the connection broke while waiting for "
                               f"{waiting_for}: {exc.__cause__ or exc}") from None
        if line is None:
            raise ControlError(f"{path}: the server closed the connection before "
                               f"{waiting_for}")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ControlError(f"{path}: not JSON while waiting for {waiting_for}: "
                               f"{exc}") from None
        if not isinstance(message, dict):
            raise ControlError(f"{path}: {_json_type(message)} instead of an object while "
                               f"waiting for {waiting_for}")
        return message

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str) -> AsyncIterator[_Connection]:
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise ControlUnreachable(f"cannot reach the control socket {path}: "
                                     f"{exc.strerror or exc}") from None
        async with stream:
            lines = _LineReader(stream, _CLIENT_MAX_LINE)
            greeting: dict[str, Any] | None = None
            with trio.move_on_after(_GREETING_TIMEOUT):
                greeting = await cls._read(path, lines, "the greeting")
            if greeting is None:
                raise ControlError(f"{path}: no greeting within {_GREETING_TIMEOUT:g} s; "
                                   "is it a tremus control socket?")
            if greeting.get("ok") is False:  # refused (too many clients)
                raise ControlError(f"{path}: {greeting.get('error')}")
            if not isinstance(greeting.get("tremus"), dict):
                raise ControlError(f"{path}: not a tremus control socket (it greeted with "
                                   f"{json.dumps(greeting, default=str)[:200]})")
            yield cls(path, stream, lines, greeting)

    async def request(self, command: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request; its result, or ControlError with the server's error."""
        request_id = self._next_id
        self._next_id += 1
        try:
            await self._stream.send_all(_encode({"id": request_id, "command": command, **args}))
        except _GONE as exc:
            raise ControlError(f"{self.path}: cannot send {command}: "
                               f"{exc.__cause__ or exc}") from None
        while True:
            reply = await self._read(self.path, self._lines, f"the reply to {command}")
            if reply.get("id") != request_id and reply.get("id") is not None:
                continue  # not ours (no other request is in flight: defensive)
            if "ok" not in reply:
                continue  # an event
            if reply["ok"] is True:
                result = reply.get("result")
                return result if isinstance(result, dict) else {}
            raise ControlError(str(reply.get("error") or f"{command} failed (no message)"))

    async def subscribe(self) -> None:
        """Ask for events; when this returns, every later event will be seen."""
        await self.request("events", {})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The events streamed after ``subscribe``, until the server closes."""
        while True:
            try:
                line = await self._lines.line()
            except (_LineTooLong, trio.BrokenResourceError):
                return
            if line is None:
                return
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                yield event


async def control_request(path: str, command: str, /, **args: Any) -> dict[str, Any]:
    """Connect to the control socket at ``path``, send ``command`` with ``args``, and
    return its result; ControlError with the server's error message if it failed,
    ControlUnreachable if nothing answers at ``path``."""
    for reserved in ("id", "command"):
        if reserved in args:
            raise ValueError(f"{reserved!r} is part of the request, not an argument")
    async with _Connection.open(path) as connection:
        return await connection.request(command, args)


async def control_events(path: str) -> AsyncGenerator[dict[str, Any]]:
    """The events of the process serving ``path``, from now until it closes the
    connection (an ``events_dropped`` line says how many a slow reader missed).

    Close it promptly with ``contextlib.aclosing(control_events(path))``. The
    subscription exists once the first event arrives; to be sure of seeing the
    effect of a request, use ``tremus ctl``'s order: subscribe, then request.
    """
    async with _Connection.open(path) as connection:
        await connection.subscribe()
        async for event in connection.events():
            yield event


# --------------------------------------------------------------------------- tremus ctl


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_ctl_parser(
        sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``tremus ctl PATH COMMAND`` to the ``tremus`` command's subparsers, and
    return its parser (the ``tremus`` command wraps the handler in its signal
    handling)."""
    ctl = sub.add_parser(
        "ctl", help="talk to a running tremus through its --control socket",
        description="Send COMMAND to the tremus serving the control socket PATH and print "
                    "the result. A command that starts a long operation (protect) waits "
                    "for it to complete; events prints every event until interrupted.")
    ctl.add_argument("control_path", metavar="PATH", help="the control socket (--control PATH)")
    ctl.add_argument("ctl_command", metavar="COMMAND",
                     help=f"one of {', '.join(KNOWN_COMMANDS)}, or any other command the "
                          "server lists in its greeting")
    ctl.add_argument("--backup", metavar="HOST:PORT", help="protect: the backup's address")
    ctl.add_argument("--guest", metavar="NAME", help="the guest the command is about")
    ctl.add_argument("--json", action="store_true", help="print JSON, one object per line")
    ctl.add_argument("--no-wait", action="store_true",
                     help="do not wait for a long operation to complete")
    ctl.add_argument("--timeout", type=_seconds, default=120.0, metavar="S",
                     help="give up after S seconds (default 120; not for events)")
    ctl.set_defaults(handler=cmd_ctl)
    return ctl


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


@final
class _Printer:
    """How ``tremus ctl`` shows things: JSON lines, or lines for people (in the
    style of the other commands' event lines)."""

    def __init__(self, as_json: bool) -> None:
        self._json = as_json

    def result(self, result: Mapping[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(result, default=str))
        else:
            for key, value in result.items():
                self._line(f"{key}: {_plain(value)}")

    def event(self, event: Mapping[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(event, default=str))
        elif event.get("event") == "console" and "line" in event:
            self._line(str(event["line"]))
        else:
            fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time"))
            self._line(f"[{event.get('event')}] {fields}")

    def completion(self, event: Mapping[str, Any]) -> None:
        if self._json:
            self.event(event)
        elif event.get("ok"):
            self._line(f"{event.get('operation')}: ok")

    @staticmethod
    def _line(text: str) -> None:
        print(text, flush=True)


def _fail(message: str) -> int:
    print(f"tremus: error: {message}", file=sys.stderr)
    return 1


async def cmd_ctl(args: argparse.Namespace) -> int:
    """``tremus ctl``: 0 on success, 1 for an error the server reported (or an
    operation that failed or did not complete in time), 2 for a usage error;
    ControlUnreachable when nothing answers at PATH."""
    path: str = args.control_path
    command: str = args.ctl_command
    if not command or command.startswith("-"):
        print(f"tremus: error: {command!r} is not a command name", file=sys.stderr)
        return 2
    printer = _Printer(args.json)
    if command == "events":
        async with _Connection.open(path) as connection:
            try:
                await connection.subscribe()
            except ControlUnreachable:
                raise
            except ControlError as exc:
                return _fail(str(exc))
            try:
                async for event in connection.events():
                    printer.event(event)
            except BrokenPipeError:
                pass  # `tremus ctl PATH events | head`
        return 0
    arguments = {key: value for key, value in (("backup", args.backup), ("guest", args.guest))
                 if value is not None}
    stage = [f"reply to {command}"]
    with trio.move_on_after(args.timeout):
        return await _request_and_wait(path, command, arguments, printer,
                                       wait=not args.no_wait, stage=stage)
    return _fail(f"{path}: no {stage[0]} within {args.timeout:g} s")


async def _request_and_wait(path: str, command: str, arguments: Mapping[str, Any],
                            printer: _Printer, *, wait: bool, stage: list[str]) -> int:
    async with contextlib.AsyncExitStack() as stack:
        watcher: _Connection | None = None
        if wait:
            # Subscribed before the request: its operation may complete before the
            # reply is even read, and its completion event must not be missed.
            watcher = await stack.enter_async_context(_Connection.open(path))
            try:
                await watcher.subscribe()
            except ControlUnreachable:
                raise
            except ControlError as exc:
                return _fail(str(exc))
        try:
            async with _Connection.open(path) as connection:
                result = await connection.request(command, arguments)
        except ControlUnreachable:
            raise
        except ControlError as exc:
            return _fail(str(exc))
        printer.result(result)
        operation = result.get("operation")
        if watcher is None or not isinstance(operation, str):
            return 0
        stage[0] = f"completion of {operation}"
        async for event in watcher.events():
            if event.get("event") == "operation_complete" and event.get("operation") == operation:
                printer.completion(event)
                if event.get("ok"):
                    return 0
                return _fail(f"{operation} failed: {event.get('error') or 'no reason given'}")
        return _fail(f"{path}: the server closed the connection before {operation} completed")
    raise AssertionError("unreachable")
