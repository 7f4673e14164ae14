"""ProtectionConfig: how a domain is protected (and its TOML form)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["INITIAL_SYNC_PATIENCE", "ConfigError", "ProtectionConfig", "takeover_grace"]

#: Until the first checkpoint is complete, silence timeouts are this many times
#: longer on both sides: the first checkpoint carries all of RAM (seconds of work for
#: a large guest), and before it completes the backup has nothing to fail over to,
#: so waiting longer costs nothing.
INITIAL_SYNC_PATIENCE = 10


def takeover_grace(timeout: float) -> float:
    """Slack for a backup whose failure detection fires late (a busy loop, a slow
    scheduler), in seconds, given its silence timeout: part of the takeover window."""
    return max(0.25, timeout / 2)


#: ``ProtectionConfig.capture``: ``"auto"`` picks ``"cow"`` where available.
CAPTURE_METHODS = ("auto", "cow", "copy")


class ConfigError(ValueError):
    """An invalid protection setting."""


@dataclass(frozen=True, slots=True)
class ProtectionConfig:
    """Settings of one protection session; the defaults are sane for a LAN.

    Attributes:
        interval_ms: time from one resume to the next suspend.
        codec: ``"delta"`` (page delta against recently sent pages) or ``"raw"``.
        max_inflight: checkpoints sent but not yet acknowledged (devices may lower it).
        heartbeat_ms: how often each side sends a heartbeat when otherwise silent.
        heartbeat_timeout_ms: silence after which the peer is declared lost.
        verify: send a digest of the whole RAM with every checkpoint; the backup
            checks its replica against it after applying.
        delta_cache_pages: slots of the primary's page cache for delta coding.
        auth_secret: shared secret authenticating HELLO (None: no authentication).
        output_triggered: when a device holds output (a frame, a console line, a
            disk write), start the next checkpoint as soon as ``min_interval_ms``
            since the last resume allows; ``interval_ms`` stays the longest gap.
        min_interval_ms: the shortest time from a resume to the next suspend with
            ``output_triggered`` (it bounds the checkpoint rate under heavy output).
        capture: how dirty pages are captured: ``"cow"`` write-protects them in the
            pause and copies them after the guest resumed (copy-on-write: the
            pause no longer grows with the dirty pages); ``"copy"`` copies them in
            the pause; ``"auto"`` is ``"cow"`` where the domain offers it, else
            ``"copy"``.
    """

    interval_ms: float = 50.0
    codec: str = "delta"
    max_inflight: int = 4
    heartbeat_ms: float = 100.0
    heartbeat_timeout_ms: float = 1000.0
    verify: bool = False
    delta_cache_pages: int = 8192
    auth_secret: bytes | None = None
    output_triggered: bool = False
    min_interval_ms: float = 2.0
    capture: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.interval_ms <= 3_600_000:
            raise ConfigError(f"interval {self.interval_ms} ms must be within 1..3600000")
        if self.capture not in CAPTURE_METHODS:
            raise ConfigError(f"capture {self.capture!r} must be one of "
                              f"{', '.join(repr(m) for m in CAPTURE_METHODS)}")
        if self.codec not in ("delta", "raw"):
            raise ConfigError(f"codec {self.codec!r} must be 'delta' or 'raw'")
        if self.max_inflight < 1:
            raise ConfigError("max_inflight must be at least 1")
        if self.heartbeat_ms <= 0 or self.heartbeat_timeout_ms <= self.heartbeat_ms:
            raise ConfigError(
                f"heartbeat timeout ({self.heartbeat_timeout_ms} ms) must exceed the "
                f"heartbeat period ({self.heartbeat_ms} ms)"
            )
        if self.min_interval_ms <= 0 or (self.output_triggered
                                         and self.min_interval_ms > self.interval_ms):
            raise ConfigError(f"min interval {self.min_interval_ms} ms must be positive and "
                              f"at most the interval ({self.interval_ms} ms)")
        if self.delta_cache_pages < 1:
            raise ConfigError("delta_cache_pages must be at least 1")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> ProtectionConfig:
        """Load ``[protection]`` from a TOML file; keyword overrides win."""
        with open(path, "rb") as f:
            data = tomllib.load(f).get("protection", {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown protection setting(s): {', '.join(unknown)}")
        if isinstance(data.get("auth_secret"), str):
            data["auth_secret"] = data["auth_secret"].encode()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
