"""Prometheus metrics, from events and over HTTP from the CLI."""

from __future__ import annotations

import trio

from tests._microvm_util import needs_kvm
from tests._procs import free_port, start_tremus
from tremus.engine.events import BackupLost, CheckpointAcked, EventHub, ProtectionStarted
from tremus.metrics import Metrics


def test_metrics_follow_events() -> None:
    hub = EventHub()
    metrics = Metrics("primary")
    metrics.attach(hub)
    hub.emit(ProtectionStarted(domain="microvm", backup="b", interval_ms=50, codec="delta",
                               devices=()))
    for epoch in range(3):
        hub.emit(CheckpointAcked(epoch=epoch, dirty_pages=10, pause_us=300.0, kick_us=50.0,
                                 bytes_sent=1000, raw_bytes=40960, round_trip_ms=1.5))
    text = metrics.render()
    assert 'tremus_checkpoints_acked_total{role="primary"} 3' in text
    assert 'tremus_checkpoint_bytes_sent_total{role="primary"} 3000' in text
    assert 'tremus_protected{role="primary"} 1' in text
    assert 'tremus_pause_seconds_bucket{role="primary",le="0.0005"} 3' in text
    assert 'tremus_pause_seconds_bucket{role="primary",le="0.00025"} 0' in text
    hub.emit(BackupLost(reason="gone", last_acked_epoch=2))
    text = metrics.render()
    assert 'tremus_protected{role="primary"} 0' in text
    assert 'tremus_backup_lost_total{role="primary"} 1' in text


async def _get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


@needs_kvm
async def test_protect_serves_metrics() -> None:
    port, metrics_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                    f"127.0.0.1:{port}", "--json")
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        primary = await start_tremus(
            nursery, "primary", "protect", "--domain", "microvm:workload=counter,memory=8M",
            "--backup", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics_port}", "--json")
        await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 3, what="acks")
        reply = await _get(metrics_port, "/metrics")
        assert reply.startswith(b"HTTP/1.0 200 OK")
        assert b'tremus_protected{role="primary"} 1' in reply
        assert b"tremus_checkpoints_acked_total" in reply
        assert (await _get(metrics_port, "/other")).startswith(b"HTTP/1.0 404")
        primary.kill()
        backup.kill()
