"""Ownership arbiters: implementations of :class:`tremus.engine.ownership.Ownership`.

Only etcd for now (``etcd://HOST:PORT[,HOST:PORT...]``): :func:`open_arbiter`.
"""

from tremus.arbiters._etcd import (
    ArbiterTarget,
    ArbiterUnreachable,
    ArbiterURLError,
    Endpoint,
    EtcdOwnership,
    OwnershipRecord,
    open_arbiter,
    parse_arbiter_url,
)
from tremus.engine.ownership import (
    Ownership,
    OwnershipError,
    OwnershipLost,
    OwnershipRefused,
)

__all__ = [
    "ArbiterTarget",
    "ArbiterURLError",
    "ArbiterUnreachable",
    "Endpoint",
    "EtcdOwnership",
    "Ownership",
    "OwnershipError",
    "OwnershipLost",
    "OwnershipRecord",
    "OwnershipRefused",
    "open_arbiter",
    "parse_arbiter_url",
]
