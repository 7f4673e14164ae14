"""Domain drivers by name, and domain specs (``microvm:workload=counter,memory=16M``).

The backup learns the driver name and configuration from the HELLO and asks this
registry to rebuild the domain, so a new driver (Xen, say) needs no engine change.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from tremus.domains.base import ConsoleSink, Domain, DomainDriver, DomainError

__all__ = ["create_domain", "get_driver", "parse_spec", "register_driver", "restore_domain"]

_DRIVERS: dict[str, str | DomainDriver] = {
    "microvm": "tremus.domains.microvm.driver:DRIVER",
}


def register_driver(driver: DomainDriver) -> None:
    _DRIVERS[driver.name] = driver


def get_driver(name: str) -> DomainDriver:
    entry = _DRIVERS.get(name)
    if entry is None:
        raise DomainError(f"unknown domain driver {name!r}; known: {', '.join(sorted(_DRIVERS))}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        assert not isinstance(entry, str)
        _DRIVERS[name] = entry
    return entry


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"microvm:workload=counter,memory=16M"`` -> ``("microvm", {...})``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise DomainError(f"bad domain spec {spec!r}: expected DRIVER[:key=value,...]")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise DomainError(f"bad domain spec {spec!r}: {item!r} is not key=value")
        if key.strip() in options:
            raise DomainError(f"bad domain spec {spec!r}: {key.strip()!r} given twice")
        options[key.strip()] = value.strip()
    return name, options


def create_domain(spec: str, *, console: ConsoleSink | None = None) -> Domain:
    """A new, not yet running domain from a spec."""
    name, options = parse_spec(spec)
    driver: Any = get_driver(name)
    return driver.create(options, console=console)  # type: ignore[no-any-return]


def restore_domain(name: str, config: Mapping[str, Any], ram: memoryview, state: bytes, *,
                   console: ConsoleSink | None = None) -> Domain:
    """Rebuild a domain from a checkpoint (the backup's failover)."""
    return get_driver(name).restore(config, ram, state, console=console)
