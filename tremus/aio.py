"""Embedding tremus in asyncio programs, through Trio's guest mode.

tremus is written for Trio. An asyncio program runs it with ``await
tremus.aio.run(fn, *args)``: Trio then runs as a guest on the asyncio event loop,
in the same thread, so callbacks and events are delivered on the asyncio thread and
can touch asyncio objects directly. Cancelling the asyncio task cancels the Trio
run. ``events(hub)`` turns a session's events into an asyncio async iterator.

    async def main():
        async def protect():
            ...  # Trio code: PrimarySession, BackupSession, nurseries
        await tremus.aio.run(protect)

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import trio

from tremus.engine.events import Event, EventHub

__all__ = ["events", "run"]

T = TypeVar("T")


async def run(async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run the Trio function ``async_fn(*args)`` on the running asyncio loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    scope_box: list[trio.CancelScope] = []
    token_box: list[trio.lowlevel.TrioToken] = []

    async def guest() -> T:
        token_box.append(trio.lowlevel.current_trio_token())
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            return await async_fn(*args)
        raise asyncio.CancelledError("the Trio run was cancelled from asyncio")

    def finished(outcome: Any) -> None:
        if not done.done():
            done.set_result(outcome)

    trio.lowlevel.start_guest_run(
        guest,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=finished,
        host_uses_signal_set_wakeup_fd=True,
    )
    try:
        outcome = await asyncio.shield(done)
    except asyncio.CancelledError:
        if scope_box and token_box:
            token_box[0].run_sync_soon(scope_box[0].cancel)
        await done  # let the Trio run unwind cleanly before propagating
        raise
    return outcome.unwrap()  # type: ignore[no-any-return]


async def events(hub: EventHub, maxsize: int = 0) -> AsyncGenerator[Event, None]:
    """Iterate a hub's events from asyncio (the hub lives in the Trio guest run).

    It stops listening to the hub when closed: ``async with
    contextlib.aclosing(events(hub)) as it`` when breaking out of the loop early."""
    queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
    remove = hub.add_callback(queue.put_nowait)
    try:
        while True:
            yield await queue.get()
    finally:
        remove()
