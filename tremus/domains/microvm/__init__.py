"""The built-in KVM micro-VM (see ``guest/ABI.md`` for the guest interface)."""

from tremus.domains.microvm.config import MicroVMConfig
from tremus.domains.microvm.vm import MicroVM

__all__ = ["MicroVM", "MicroVMConfig"]
