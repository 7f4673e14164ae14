"""The one thing tremus adds to Trio's stream ABCs: a listener that knows its URL."""

from __future__ import annotations

from abc import abstractmethod

import trio

__all__ = ["Listener"]


class Listener(trio.abc.Listener[trio.abc.Stream]):
    """A ``trio.abc.Listener`` whose ``url`` is where peers connect.

    After ``listen("tcp://127.0.0.1:0")`` the URL carries the port the kernel chose,
    so it can be handed to the other side as it is.
    """

    @property
    @abstractmethod
    def url(self) -> str: ...
