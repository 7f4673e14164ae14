"""Concrete output buffers for a domain, chosen by name (``--netbuf``), and its console's.

The engine sees only ``CheckpointDevice``s; this is where the command line and
embedders turn ``plug``, ``nfqueue``, ``vmm`` or ``none`` into one, and hold the
console's lines (``open_console``).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from tremus.engine.devices import CheckpointDevice

__all__ = ["NETBUF_KINDS", "NetbufError", "open_console", "open_netbuf"]

NETBUF_KINDS = ("auto", "plug", "nfqueue", "vmm", "none")


class NetbufError(Exception):
    """The requested network buffering cannot be set up for this domain."""


def _tap_of(domain: Any) -> tuple[str | None, str | None]:
    config = dict(getattr(domain, "config", {}) or {})
    return config.get("tap"), config.get("bridge")


async def open_netbuf(kind: str, domain: Any, stack: AsyncExitStack, *, unsafe: bool = False,
                      queue_num: int = 0) -> list[CheckpointDevice]:
    """The devices that hold ``domain``'s network output until its checkpoint is acked.

    ``auto`` is ``vmm`` for a domain with a NIC, else nothing. ``none`` with a NIC
    lets output out before the backup holds the state that produced it: it needs
    ``unsafe`` (``xl remus -F``).
    """
    tap, bridge = _tap_of(domain)
    if kind == "auto":
        kind = "vmm" if tap else "none"
    if kind == "none":
        if tap and not unsafe:
            raise NetbufError(
                "--netbuf none lets the guest's packets out before the backup holds the state "
                "that produced them; add --unsafe if you mean it"
            )
        return []
    if not tap:
        raise NetbufError(f"--netbuf {kind}: the domain has no NIC (give it tap=NAME)")
    if kind == "vmm":
        from tremus.buffers.vmm import VmmNetBuffer

        return [VmmNetBuffer(domain)]
    if kind == "plug":
        from tremus.buffers.plug import PlugBuffer

        return [PlugBuffer(tap)]
    if kind == "nfqueue":
        if not bridge:
            raise NetbufError("--netbuf nfqueue needs the TAP on a bridge (bridge=BR in the spec)")
        from tremus.buffers.nfqueue import NfqueueBuffer

        return [await stack.enter_async_context(NfqueueBuffer(tap, queue_num))]
    raise NetbufError(f"unknown --netbuf {kind!r}; choose one of {', '.join(NETBUF_KINDS)}")


def open_console(domain: Any, *, unsafe: bool = False) -> list[CheckpointDevice]:
    """The device that holds ``domain``'s console lines until their checkpoint is acked.

    Console output is output: a line printed in epoch N leaves the primary only with
    N's commit, so a backup that takes over never prints a line twice. Nothing with
    ``unsafe`` (lines go out at once), nor for a domain whose console cannot hold
    lines (no ``console.line_hook``). The lines go to the domain's own console sink.
    """
    if unsafe or not hasattr(getattr(domain, "console", None), "line_hook"):
        return []
    from tremus.buffers.console import ConsoleBuffer

    return [ConsoleBuffer(domain)]
