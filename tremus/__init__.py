"""tremus: Remus-style high availability for virtual machines, on Trio.

The embedding API: build a domain (``create_domain``), open a checkpoint stream
(``transports.connect`` / ``transports.listen``), and run a ``PrimarySession`` on the
protected host and a ``BackupSession`` on the backup. Both report typed events
(``tremus.engine.events``) by ``async for``, callback, or ``Operation`` completion.
asyncio programs use ``tremus.aio``.
"""

from tremus.domains.base import Domain, DomainError, Geometry
from tremus.domains.registry import create_domain, parse_spec, register_driver, restore_domain
from tremus.engine.backup import BackupOutcome, BackupSession, PrimaryFailed, ReplicaDiverged
from tremus.engine.config import ConfigError, ProtectionConfig
from tremus.engine.devices import CheckpointDevice, DeviceError
from tremus.engine.events import Event, EventHub, Operation, OperationCancelled
from tremus.engine.primary import BackupLostError, PrimarySession
from tremus.engine.protocol import ProtocolError

__all__ = [
    "BackupLostError", "BackupOutcome", "BackupSession", "CheckpointDevice", "ConfigError",
    "DeviceError", "Domain", "DomainError", "Event", "EventHub", "Geometry", "Operation",
    "OperationCancelled", "PrimaryFailed", "PrimarySession", "ProtectionConfig", "ProtocolError", "ReplicaDiverged",
    "create_domain", "parse_spec", "register_driver", "restore_domain",
]

__version__ = "0.1.0"
