"""The micro-VM's entry in the domain registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

from tremus.domains.base import ConsoleSink
from tremus.domains.microvm.config import MicroVMConfig
from tremus.domains.microvm.vm import MicroVM


@final
class MicroVMDriver:
    name = "microvm"

    def create(self, options: Mapping[str, str], *, console: ConsoleSink | None = None) -> MicroVM:
        return MicroVM.boot(MicroVMConfig.from_options(options), console=console)

    def restore(self, config: Mapping[str, Any], ram: memoryview, state: bytes, *,
                console: ConsoleSink | None = None) -> MicroVM:
        return MicroVM.from_checkpoint(MicroVMConfig.from_dict(config), ram, state, console=console)


DRIVER = MicroVMDriver()
