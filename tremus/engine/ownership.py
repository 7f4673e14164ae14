"""Who may run the guest: ownership decided by an arbiter (an etcd lease).

Two hosts cannot tell a dead peer from a partition. An arbiter can: the guest's
owner holds a key under a lease that it must keep renewing, and a standby key names
the one backup that may take over. The engine only sees this protocol; the etcd
implementation lives in ``tremus.arbiters``.

The rules the engine follows with an arbiter:

* The primary acquires ownership before protecting, and designates its backup as
  standby once the backup has accepted it.
* The primary releases an epoch's output only while ``may_release()`` — its lease
  is held, with a margin, by its own conservative estimate. ``lost`` is set before
  a lease it cannot renew can expire: the primary then stops the guest.
* A primary that loses its backup calls ``drop_standby()`` before it releases
  anything the backup never acknowledged: from then on no stale backup can take over.
* The backup fails over only after ``take_over()`` succeeded: the primary's lease
  has expired (its key is gone) and the standby key still names this backup.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import trio

__all__ = ["Ownership", "OwnershipError", "OwnershipLost", "OwnershipRefused"]


class OwnershipError(Exception):
    """The arbiter could not be asked, or answered no; the message says which."""


class OwnershipRefused(OwnershipError):
    """Someone else owns the guest (or this backup is no longer its standby)."""


class OwnershipLost(OwnershipError):
    """This side's lease could not be renewed in time, or was taken away."""


@runtime_checkable
class Ownership(Protocol):
    """One side's handle on the guest's ownership record.

    ``key`` names the guest in the arbiter (both sides use the same one); ``me`` is
    this side's unique identity (host, process, session).
    """

    @property
    def key(self) -> str: ...

    @property
    def me(self) -> str: ...

    @property
    def url(self) -> str:
        """Where the arbiter is (for events and messages)."""

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease lives without renewal (as granted by the arbiter)."""

    #: Set (never cleared) when this side's lease can no longer be trusted: the
    #: owner must stop releasing output and stop the guest at once.
    lost: trio.Event

    async def acquire(self, *, wait: float) -> None:
        """Become the owner (a new lease); waits up to ``wait`` seconds for a previous
        owner's lease to expire. Raises ``OwnershipRefused`` if someone else keeps it."""

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        """Renew the lease until cancelled; sets ``lost`` (and returns) when it cannot
        be renewed before the margin before expiry."""

    def may_release(self) -> bool:
        """True while the lease is certainly held (last renewal sent + TTL - margin)."""

    async def designate(self, standby: str) -> None:
        """Name ``standby`` the one backup that may take over (only while owner)."""

    async def drop_standby(self) -> None:
        """Remove the standby designation (only while owner). Raises ``OwnershipLost``
        if this side is no longer the owner, ``OwnershipError`` if the arbiter cannot
        be reached in time."""

    async def take_over(self, *, wait: float) -> None:
        """(Backup) Become the owner once the owner's lease has expired, if the
        standby key names ``me``: compare-and-swap. Waits up to ``wait`` seconds for
        the owner's lease to expire. Raises ``OwnershipRefused`` with the reason."""

    async def resign(self) -> None:
        """Give ownership up at a graceful end (delete standby, revoke the lease)."""

    async def aclose(self) -> None:
        """Close connections (does not revoke: a crashed owner's lease just expires)."""
