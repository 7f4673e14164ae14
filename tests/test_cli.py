"""The ``tremus`` command as a user runs it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

from tests._microvm_util import needs_kvm


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tremus.cli", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, env=dict(os.environ))


@needs_kvm
def test_demo_fails_over_and_the_counter_continues() -> None:
    proc = _cli("demo", "--seconds", "1.5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "failover_complete" in proc.stdout
    assert proc.stdout.strip().endswith("OK")


def test_protect_needs_a_backup() -> None:
    proc = _cli("protect", "--domain", "microvm:memory=4M")
    assert proc.returncode == 2
    assert "--backup" in proc.stderr and "Traceback" not in proc.stderr


@needs_kvm
def test_protect_to_a_missing_backup_is_one_clear_line() -> None:
    proc = _cli("protect", "--domain", "microvm:memory=4M", "--backup", "127.0.0.1:1")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_listen_address() -> None:
    proc = _cli("backup", "--listen", "nonsense:port")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


@needs_kvm
def test_metrics_address_in_use_is_reported_before_the_backup_is_contacted() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The backup address is dead too: the metrics error must come first.
        proc = _cli("protect", "--domain", "microvm:memory=4M", "--backup", "127.0.0.1:1",
                    "--metrics", f"127.0.0.1:{port}")
    assert proc.returncode == 2, proc.stderr
    assert f"--metrics 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@needs_kvm
def test_a_missing_tls_file_is_named() -> None:
    proc = _cli("protect", "--domain", "microvm:memory=4M", "--backup", "tls://127.0.0.1:1",
                "--tls-ca", "/nonexistent/ca.pem")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tremus: error: --tls-ca /nonexistent/ca.pem: no such file"


def test_version_and_a_negative_reprotect() -> None:
    assert _cli("--version").stdout.startswith("tremus ")
    proc = _cli("protect", "--domain", "microvm:memory=4M", "--blackhole", "--reprotect", "-1")
    assert proc.returncode == 2 and "--reprotect" in proc.stderr and "positive" in proc.stderr


def test_every_option_has_help_and_the_spec_keys_are_listed() -> None:
    from tremus.cli import build_parser
    from tremus.domains.microvm.config import MicroVMConfig

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"tremus {name} {'/'.join(action.option_strings)}: no help"
    protect_help = subparsers.choices["protect"].format_help()
    for key in [f.name for f in dataclasses.fields(MicroVMConfig)]:
        spelled = {"working_set": "ws", "hot_set": "hot"}.get(key, key)
        assert spelled in protect_help, f"SPEC key {spelled} missing from --help"


@needs_kvm
def test_protect_on_a_terminal_shows_one_status_line_redrawn_in_place() -> None:
    """Without --json, on a real terminal (a pty), ``protect`` redraws one compact
    status line in place many times instead of printing a line per checkpoint, and
    says what its plain lines are for: the notable events."""
    import pty
    import select
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backup = subprocess.Popen([sys.executable, "-m", "tremus.cli", "backup", "--listen",
                               f"127.0.0.1:{port}", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    controller, terminal = pty.openpty()
    try:
        assert backup.stdout is not None
        assert "backup_ready" in backup.stdout.readline()
        primary = subprocess.Popen(
            [sys.executable, "-m", "tremus.cli", "protect", "--domain",
             "microvm:name=web,workload=counter,memory=8M", "--backup", f"127.0.0.1:{port}",
             "--interval", "25", "--duration", "8"],
            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
        os.close(terminal)
        terminal = -1
        out = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the terminal's last writer is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif primary.poll() is not None:
                break
        assert primary.wait(timeout=30) == 0, out.decode(errors="replace")[-2000:]
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
        backup.terminate()
        backup.wait(timeout=30)
    text = out.decode(errors="replace")
    redraws = text.count("\r") - text.count("\r\n")
    lines = [line for line in text.replace("\r\n", "\n").split("\n")
             if line.strip() and "counter " not in line]  # the guest's console is its own
    acks = 8 / 0.025  # about as many checkpoints as there were
    assert redraws >= 5, text[-2000:]
    assert len(lines) < acks / 4, f"{len(lines)} lines for ~{acks:.0f} checkpoints"
    assert "web: protection started: microvm -> " in text
    assert "protection stopped" in text
    status = text.rsplit("PROTECTED", 1)[-1]
    for field in ("ckpt/s", "pause p50", "p99", "rtt p50", "/s sent", "held output"):
        assert field in status, (field, status[:300])
