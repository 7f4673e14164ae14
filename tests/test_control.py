"""The control socket: its wire protocol, its resilience to bad clients, and ``tremus ctl``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import tremus
from tremus.control import (
    MAX_LINE,
    ControlError,
    ControlUnreachable,
    Handler,
    add_ctl_parser,
    cmd_ctl,
    control_events,
    control_request,
    serve_control,
)
from tremus.engine.events import Console, EventHub, Operation, OutputReleased


async def _echo(args: dict[str, Any]) -> dict[str, Any]:
    return {"echo": args}


async def _refuse(args: dict[str, Any]) -> dict[str, Any]:
    raise ControlError("refuse: the guest is not protected")


async def _crash(args: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("kaput")


async def _grouped(args: dict[str, Any]) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:  # wraps what its task raises in a group
        nursery.start_soon(_refuse, args)
    return {}


async def _not_a_dict(args: dict[str, Any]) -> dict[str, Any]:
    return [1, 2]  # type: ignore[return-value]


async def _nan(args: dict[str, Any]) -> dict[str, Any]:
    return {"x": float("nan")}


COMMANDS: dict[str, Handler] = {"echo": _echo, "refuse": _refuse, "crash": _crash,
                                "grouped": _grouped, "not-a-dict": _not_a_dict, "nan": _nan}


@asynccontextmanager
async def serving(tmp_path: Path, commands: Mapping[str, Handler] = COMMANDS,
                  hub: EventHub | None = None, name: str = "ctl.sock",
                  **options: Any) -> AsyncIterator[str]:
    path = str(tmp_path / name)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_control, path, commands, hub or EventHub(),
                                    role="primary", **options))
        yield path
        nursery.cancel_scope.cancel()


class Raw:
    """A hand-driven client, to send what a well-behaved one would not."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str) -> AsyncIterator[Raw]:
        async with await trio.open_unix_socket(path) as stream:
            yield cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, message: object) -> dict[str, Any]:
        await self.send(json.dumps(message).encode() + b"\n")
        return await self.read()

    async def line(self) -> bytes | None:
        with trio.fail_after(5):
            while b"\n" not in self.buffer:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    async def read(self) -> dict[str, Any]:
        line = await self.line()
        assert line is not None, "the server closed the connection"
        message = json.loads(line)
        assert isinstance(message, dict)
        return message


async def test_greeting_names_version_role_and_commands(tmp_path: Path) -> None:
    async with serving(tmp_path) as path, Raw.open(path) as client:
        greeting = await client.read()
    assert greeting == {"tremus": {"version": tremus.__version__, "role": "primary"},
                        "commands": sorted([*COMMANDS, "events"])}


async def test_a_handler_result_is_the_reply_with_the_request_id(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        assert await control_request(path, "echo", guest="g1", n=3) == \
            {"echo": {"guest": "g1", "n": 3}}
        async with Raw.open(path) as client:
            await client.read()
            for request_id in ("abc", 7, {"nested": [1]}, None):
                reply = await client.request({"id": request_id, "command": "echo", "a": 1})
                assert reply == {"id": request_id, "ok": True, "result": {"echo": {"a": 1}}}


async def test_control_error_is_a_clean_error_reply(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        with pytest.raises(ControlError, match="^refuse: the guest is not protected$"):
            await control_request(path, "refuse")
        async with Raw.open(path) as client:
            await client.read()
            assert await client.request({"id": 1, "command": "refuse"}) == \
                {"id": 1, "ok": False, "error": "refuse: the guest is not protected"}


async def test_a_crashing_handler_is_an_error_reply_and_serving_goes_on(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        async with Raw.open(path) as client:
            await client.read()
            reply = await client.request({"id": 1, "command": "crash"})
            assert reply == {"id": 1, "ok": False, "error": "crash failed: RuntimeError: kaput"}
            reply = await client.request({"id": 2, "command": "grouped"})
            assert reply["error"] == "refuse: the guest is not protected"
            reply = await client.request({"id": 2, "command": "not-a-dict"})
            assert not reply["ok"] and "not-a-dict returned an array" in reply["error"]
            reply = await client.request({"id": 3, "command": "nan"})
            assert not reply["ok"] and "not JSON" in reply["error"]
            # The same connection is still served, and so are new ones.
            assert (await client.request({"id": 4, "command": "echo"}))["ok"]
        assert await control_request(path, "echo") == {"echo": {}}


async def test_unknown_or_missing_command_lists_the_known_ones(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        with pytest.raises(ControlError, match="unknown command 'frobnicate'") as info:
            await control_request(path, "frobnicate")
        assert "crash, echo, events, grouped, nan, not-a-dict, refuse" in str(info.value)
        async with Raw.open(path) as client:
            await client.read()
            reply = await client.request({"id": 5})
            assert reply["id"] == 5 and not reply["ok"]
            assert 'no "command"' in reply["error"] and "echo" in reply["error"]
            reply = await client.request({"id": 6, "command": 42})
            assert "not a string" in reply["error"]


async def test_bad_clients_do_not_hurt_the_server(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        async with Raw.open(path) as client:
            await client.read()
            for garbage in (b"garbage\n", b"{\"id\": 1, \n", b"\xff\xfe\n", b"[" * 60000 + b"\n"):
                await client.send(garbage)
                reply = await client.read()
                assert reply["id"] is None and not reply["ok"]
                assert reply["error"].startswith("request is not JSON"), reply
            for value, kind in (([1, 2], "an array"), ("s", "a string"), (3, "a number"),
                                (None, "null")):
                reply = await client.request(value)
                assert reply == {"id": None, "ok": False,
                                 "error": f"a request must be a JSON object, not {kind}"}
            await client.send(b"\n   \n")  # blank lines are ignored
            assert (await client.request({"id": 1, "command": "echo"}))["ok"]

        async with Raw.open(path) as client:
            await client.read()
            await client.send(b"x" * (100 * 1024) + b"\n")
            reply = await client.read()
            assert not reply["ok"] and f"longer than {MAX_LINE} bytes" in reply["error"]
            assert await client.line() is None  # and the connection is closed

        async with Raw.open(path):
            pass  # connect and close at once
        async with Raw.open(path) as client:
            await client.send(b'{"id": 1, "command": "ec')  # half a line, then gone
        async with Raw.open(path) as client:
            await client.send(b'{"id": 1, "command": "echo"}\n')  # before the greeting
            await client.stream.send_eof()  # and no more
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(path)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()  # a reset rather than a close
        await trio.sleep(0.05)
        assert await control_request(path, "echo", after="all that") == \
            {"echo": {"after": "all that"}}


async def test_many_clients_at_once_each_get_their_replies_in_order(tmp_path: Path) -> None:
    async def slow_echo(args: dict[str, Any]) -> dict[str, Any]:
        await trio.sleep(0.01 * (args["n"] % 3))
        return {"n": args["n"]}

    async with serving(tmp_path, {"echo": slow_echo}) as path:
        async def client(k: int) -> None:
            async with Raw.open(path) as raw:
                await raw.read()
                # Pipelined: all requests first, then the replies, which keep order.
                await raw.send(b"".join(json.dumps({"id": i, "command": "echo", "n": k + i})
                                        .encode() + b"\n" for i in range(5)))
                for i in range(5):
                    assert await raw.read() == {"id": i, "ok": True, "result": {"n": k + i}}

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for k in range(40):
                    nursery.start_soon(client, k)


async def test_clients_beyond_the_limit_are_refused_with_an_error(tmp_path: Path) -> None:
    async with serving(tmp_path, max_clients=2) as path:
        async with Raw.open(path) as one, Raw.open(path) as two:
            await one.read()
            await two.read()
            with pytest.raises(ControlError, match="too many control clients"):
                await control_request(path, "echo")
        # Both gone: their slots come free once the server has seen them leave.
        with trio.fail_after(5):
            while True:
                try:
                    reply = await control_request(path, "echo")
                    break
                except ControlError as exc:
                    if "too many control clients" not in str(exc):
                        raise
                    await trio.sleep(0.01)
        assert reply == {"echo": {}}


async def test_events_stream_to_every_subscriber_in_order(tmp_path: Path) -> None:
    hub = EventHub()
    async with serving(tmp_path, hub=hub) as path:
        async with Raw.open(path) as first, aclosing(control_events(path)) as second:
            await first.read()
            assert await first.request({"id": "ev", "command": "events"}) == \
                {"id": "ev", "ok": True, "result": {}}
            received: list[dict[str, Any]] = []

            async def collect() -> None:
                async for event in second:
                    received.append(event)
                    if len(received) == 20:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                while len(hub._subscriptions) < 2:  # the second one is subscribed
                    await trio.sleep(0.01)
                for epoch in range(20):
                    hub.emit(OutputReleased(epoch=epoch, packets=epoch * 2))
            streamed = [await first.read() for _ in range(20)]
            for events in (streamed, received):
                assert [e["event"] for e in events] == ["output_released"] * 20
                assert [e["epoch"] for e in events] == list(range(20))
            assert streamed[3] == OutputReleased(epoch=3, packets=6,
                                                 time=streamed[3]["time"]).to_json()
            # An events connection takes no other command.
            reply = await first.request({"id": 9, "command": "echo"})
            assert reply["id"] == 9 and "streams events" in reply["error"]
        with trio.fail_after(5):  # both left: their subscriptions go
            while hub._subscriptions:
                await trio.sleep(0.01)


async def test_a_slow_events_client_is_told_how_many_it_missed(tmp_path: Path) -> None:
    hub = EventHub()
    async with serving(tmp_path, hub=hub, events_buffer=100) as path, Raw.open(path) as client:
        await client.read()
        await client.request({"id": 1, "command": "events"})
        for epoch in range(1000):  # all at once: the server reads none before the last
            hub.emit(OutputReleased(epoch=epoch, packets=0))
        events = [await client.read() for _ in range(101)]
        assert events[0] == {"event": "events_dropped", "count": 900}
        assert [e["epoch"] for e in events[1:]] == list(range(900, 1000))


async def test_an_events_client_that_does_not_read_is_disconnected(tmp_path: Path) -> None:
    hub = EventHub()
    async with serving(tmp_path, hub=hub, send_timeout=0.2, events_buffer=10) as path, \
            Raw.open(path) as client:
        await client.read()
        await client.request({"id": 1, "command": "events"})
        line = "x" * 10_000
        with trio.move_on_after(3):
            while hub._subscriptions:  # until the server gives up on this client
                hub.emit(Console(line=line, host="h"))
                await trio.sleep(0.001)
        assert not hub._subscriptions
        with trio.fail_after(5):
            while await client.line() is not None:
                pass  # what was sent before, then the end
        assert await control_request(path, "echo") == {"echo": {}}


def _ctl(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tremus")
    add_ctl_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["ctl", *argv])


def test_the_ctl_parser() -> None:
    args = _ctl("/run/t.sock", "protect", "--backup", "b:7000", "--guest", "web", "--json")
    assert (args.command, args.control_path, args.ctl_command) == ("ctl", "/run/t.sock", "protect")
    assert (args.backup, args.guest, args.json, args.no_wait, args.timeout) == \
        ("b:7000", "web", True, False, 120.0)
    assert args.handler is cmd_ctl
    assert _ctl("p", "some-new-command", "--timeout", "2.5").timeout == 2.5
    with pytest.raises(SystemExit) as info:
        _ctl("p", "status", "--timeout", "0")
    assert info.value.code == 2


@asynccontextmanager
async def protect_server(tmp_path: Path, *, fail: bool = False, delay: float = 0.1,
                         before_reply: bool = False) -> AsyncIterator[tuple[str, list[dict]]]:
    """A server whose ``protect`` starts an operation that completes later (or,
    ``before_reply``, before the reply is even sent)."""
    hub = EventHub()
    calls: list[dict[str, Any]] = []
    async with trio.open_nursery() as operations:
        async def protect(args: dict[str, Any]) -> dict[str, Any]:
            calls.append(args)
            operation: Operation[None] = Operation("protect", hub)

            async def finish() -> None:
                await trio.sleep(delay)
                if fail:
                    operation.fail(ConnectionRefusedError("backup b:7000 refused"))
                else:
                    operation.complete(None)

            if before_reply:
                operation.complete(None)
            else:
                operations.start_soon(finish)
            return {"operation": "protect", "backup": args.get("backup")}

        async def stop_protection(args: dict[str, Any]) -> dict[str, Any]:
            raise ControlError("stop-protection: the guest is not protected")

        async with serving(tmp_path, {"protect": protect, "status": _status,
                                      "stop-protection": stop_protection}, hub=hub) as path:
            yield path, calls
        operations.cancel_scope.cancel()


async def _status(args: dict[str, Any]) -> dict[str, Any]:
    return {"role": "primary", "protected": True, "epochs": 12, "devices": ["netbuf", "disk"]}


async def test_ctl_waits_for_the_operation_to_complete(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with protect_server(tmp_path, delay=0.2) as (path, calls):
        with trio.fail_after(5):
            assert await cmd_ctl(_ctl(path, "protect", "--backup", "b:7000", "--guest", "g")) == 0
    assert calls == [{"backup": "b:7000", "guest": "g"}]
    out, err = capsys.readouterr()
    assert out == "operation: protect\nbackup: b:7000\nprotect: ok\n" and err == ""


async def test_ctl_sees_an_operation_that_completes_before_the_reply(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with protect_server(tmp_path, before_reply=True) as (path, _):
        with trio.fail_after(5):
            assert await cmd_ctl(_ctl(path, "protect", "--json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"operation": "protect", "backup": None}
    assert lines[1]["event"] == "operation_complete" and lines[1]["ok"] is True


async def test_ctl_reports_a_failed_operation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with protect_server(tmp_path, fail=True) as (path, _):
        with trio.fail_after(5):
            assert await cmd_ctl(_ctl(path, "protect", "--backup", "b:7000")) == 1
    out, err = capsys.readouterr()
    assert err == "tremus: error: protect failed: backup b:7000 refused\n"


async def test_ctl_no_wait_and_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with protect_server(tmp_path, delay=30) as (path, _):
        with trio.fail_after(5):
            assert await cmd_ctl(_ctl(path, "protect", "--no-wait")) == 0
            assert await cmd_ctl(_ctl(path, "protect", "--timeout", "0.2")) == 1
    out, err = capsys.readouterr()
    assert err == f"tremus: error: {path}: no completion of protect within 0.2 s\n"


async def test_ctl_prints_results_and_server_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with protect_server(tmp_path) as (path, _):
        assert await cmd_ctl(_ctl(path, "status")) == 0
        assert capsys.readouterr().out == \
            'role: primary\nprotected: true\nepochs: 12\ndevices: ["netbuf", "disk"]\n'
        assert await cmd_ctl(_ctl(path, "status", "--json")) == 0
        assert json.loads(capsys.readouterr().out) == await _status({})
        assert await cmd_ctl(_ctl(path, "stop-protection")) == 1
        assert capsys.readouterr().err == \
            "tremus: error: stop-protection: the guest is not protected\n"
        assert await cmd_ctl(_ctl(path, "stop")) == 1
        assert "unknown command 'stop'; known commands: events, protect, status, " \
            "stop-protection" in capsys.readouterr().err


async def test_ctl_events_prints_the_stream(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = EventHub()
    async with serving(tmp_path, hub=hub) as path:
        for as_json in (False, True):
            while hub._subscriptions:  # the last round's client has gone
                await trio.sleep(0.01)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cmd_ctl, _ctl(path, "events", *["--json"] * as_json))
                while not hub._subscriptions:
                    await trio.sleep(0.01)
                hub.emit(Console(line="hello from the guest", host="h"))
                hub.emit(OutputReleased(epoch=4, packets=2))
                printed = ""
                with trio.fail_after(5):
                    while printed.count("\n") < 2:
                        await trio.sleep(0.01)
                        printed += capsys.readouterr().out
                nursery.cancel_scope.cancel()  # as Ctrl-C would
            out = (printed + capsys.readouterr().out).splitlines()
            if as_json:
                assert [json.loads(line)["event"] for line in out] == \
                    ["console", "output_released"]
            else:
                assert out == ["hello from the guest", "[output_released] epoch=4 packets=2"]


async def test_nothing_at_the_path_is_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    message = f"cannot reach the control socket {path}: No such file or directory"
    with pytest.raises(ControlUnreachable, match=message):
        await control_request(path, "status")
    with pytest.raises(ControlUnreachable, match=message):
        await cmd_ctl(_ctl(path, "status"))
    with pytest.raises(ControlUnreachable, match=message):
        await cmd_ctl(_ctl(path, "events"))
    with pytest.raises(ControlUnreachable, match=message):
        async for _ in control_events(path):
            pass


async def test_ctl_times_out_on_a_slow_reply(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def slow(args: dict[str, Any]) -> dict[str, Any]:
        await trio.sleep(30)
        return {}

    async with serving(tmp_path, {"status": slow}) as path:
        assert await cmd_ctl(_ctl(path, "status", "--timeout", "0.1")) == 1
    assert capsys.readouterr().err == f"tremus: error: {path}: no reply to status within 0.1 s\n"


async def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        with pytest.raises(ControlError, match=f"^{path}: another process is listening there$"):
            await serve_control(path, COMMANDS, EventHub(), role="backup")
        assert await control_request(path, "echo") == {"echo": {}}  # untouched

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # as a crashed process leaves it
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    async with serving(tmp_path):
        assert await control_request(path, "echo") == {"echo": {}}
    assert not os.path.exists(path)


async def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await serve_control(str(path), COMMANDS, EventHub(), role="run")
    assert path.read_text() == "precious"
    with pytest.raises(ControlError, match="cannot create the control socket"):
        await serve_control(str(tmp_path / "no-such-dir" / "s"), COMMANDS, EventHub(), role="run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctl.sock"]  # no leftovers


async def test_the_socket_is_private_and_removed_at_the_end(tmp_path: Path) -> None:
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        async with serving(tmp_path) as path:
            mode = os.lstat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert sorted(p.name for p in tmp_path.iterdir()) == ["ctl.sock"]
    finally:
        os.umask(old)
    assert not os.path.exists(path)
    assert list(tmp_path.iterdir()) == []


async def test_events_is_built_in(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="built in"):
        await serve_control(str(tmp_path / "s"), {"events": _echo}, EventHub(), role="run")


async def test_a_path_too_long_for_the_private_directory_is_still_private(tmp_path: Path) -> None:
    # The socket is normally bound in a directory beside PATH and linked into place;
    # when that longer path would not fit in sun_path it is bound at PATH directly.
    directory = tmp_path / ("d" * max(1, 100 - len(str(tmp_path)) - 1))
    directory.mkdir()
    assert 89 <= len(str(directory)) <= 105
    old = os.umask(0o022)
    try:
        async with serving(directory, name="s") as path:
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert os.umask(0o022) == 0o022  # restored
            assert await control_request(path, "echo") == {"echo": {}}
    finally:
        os.umask(old)
    assert list(directory.iterdir()) == []
