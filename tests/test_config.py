"""ProtectionConfig: defaults, validation, TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from tremus.engine.config import ConfigError, ProtectionConfig


def test_defaults_are_sane() -> None:
    config = ProtectionConfig()
    assert config.interval_ms == 50 and config.codec == "delta"
    assert config.heartbeat_timeout_ms > config.heartbeat_ms


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_ms": 0}, "interval"),
        ({"codec": "zip"}, "codec"),
        ({"max_inflight": 0}, "max_inflight"),
        ({"heartbeat_ms": 500, "heartbeat_timeout_ms": 400}, "must exceed"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProtectionConfig(**kwargs)


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "tremus.toml"
    path.write_text('[protection]\ninterval_ms = 25\ncodec = "raw"\nauth_secret = "s3"\n')
    config = ProtectionConfig.from_toml(path, verify=True)
    assert (config.interval_ms, config.codec, config.auth_secret, config.verify) == (
        25, "raw", b"s3", True)
    path.write_text("[protection]\nintervl_ms = 25\n")
    with pytest.raises(ConfigError, match="unknown protection setting.*intervl_ms"):
        ProtectionConfig.from_toml(path)
