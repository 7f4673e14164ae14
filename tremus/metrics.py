"""Prometheus metrics from a session's events, served over HTTP.

``Metrics`` listens to an ``EventHub`` and keeps counters and gauges;
``serve_metrics`` answers ``GET /metrics`` in the Prometheus text format, so that
protection can be watched and alerted on (a backup lost, a pause growing) by the
monitoring a site already has.
"""

from __future__ import annotations

import bisect
from typing import final

import trio

from tremus.engine.events import (
    BackupLost,
    CheckpointAcked,
    CheckpointApplied,
    DiskEpochApplied,
    DiskEpochDurable,
    Event,
    EventHub,
    FailoverComplete,
    FailoverRefused,
    OutputReleased,
    OwnershipLost,
    OwnershipRefused,
    OwnershipTaken,
    ProtectionStarted,
    ProtectionStopped,
)

__all__ = ["Metrics", "serve_metrics"]

#: Upper bounds of the pause histogram, in seconds.
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0)


@final
class Metrics:
    """Counters and gauges fed by events (call ``attach(hub)``)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.counters: dict[str, float] = {
            "tremus_checkpoints_acked_total": 0,
            "tremus_checkpoints_applied_total": 0,
            "tremus_checkpoint_bytes_sent_total": 0,
            "tremus_checkpoint_pages_total": 0,
            "tremus_output_released_packets_total": 0,
            "tremus_backup_lost_total": 0,
            "tremus_failovers_total": 0,
            "tremus_failovers_refused_total": 0,
            "tremus_disk_epochs_durable_total": 0,
            "tremus_disk_bytes_durable_total": 0,
            "tremus_disk_epochs_applied_total": 0,
            "tremus_ownership_taken_total": 0,
            "tremus_ownership_lost_total": 0,
            "tremus_ownership_refused_total": 0,
        }
        self.gauges: dict[str, float] = {
            "tremus_protected": 0,
            "tremus_last_epoch": -1,
            "tremus_last_pause_seconds": 0,
            "tremus_last_round_trip_seconds": 0,
            "tremus_last_failover_downtime_seconds": 0,
            "tremus_last_disk_durable_seconds": 0,
        }
        self._pause_buckets = [0] * (len(PAUSE_BUCKETS) + 1)
        self._pause_sum = 0.0

    def attach(self, hub: EventHub) -> None:
        hub.add_callback(self.observe)

    def observe(self, event: Event) -> None:
        c, g = self.counters, self.gauges
        if isinstance(event, CheckpointAcked):
            c["tremus_checkpoints_acked_total"] += 1
            c["tremus_checkpoint_bytes_sent_total"] += event.bytes_sent
            c["tremus_checkpoint_pages_total"] += event.dirty_pages
            pause = event.pause_us / 1e6
            g["tremus_last_epoch"] = event.epoch
            g["tremus_last_pause_seconds"] = pause
            g["tremus_last_round_trip_seconds"] = event.round_trip_ms / 1e3
            self._pause_buckets[bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1
            self._pause_sum += pause
        elif isinstance(event, CheckpointApplied):
            c["tremus_checkpoints_applied_total"] += 1
            c["tremus_checkpoint_pages_total"] += event.pages
            g["tremus_last_epoch"] = event.epoch
        elif isinstance(event, OutputReleased):
            c["tremus_output_released_packets_total"] += event.packets
        elif isinstance(event, ProtectionStarted):
            g["tremus_protected"] = 1
        elif isinstance(event, BackupLost | ProtectionStopped):
            g["tremus_protected"] = 0
            if isinstance(event, BackupLost):
                c["tremus_backup_lost_total"] += 1
        elif isinstance(event, FailoverComplete):
            c["tremus_failovers_total"] += 1
            g["tremus_last_failover_downtime_seconds"] = event.downtime_ms / 1e3
        elif isinstance(event, FailoverRefused):
            c["tremus_failovers_refused_total"] += 1
        elif isinstance(event, DiskEpochDurable):
            c["tremus_disk_epochs_durable_total"] += 1
            c["tremus_disk_bytes_durable_total"] += event.bytes
            g["tremus_last_disk_durable_seconds"] = event.durable_us / 1e6
        elif isinstance(event, DiskEpochApplied):
            c["tremus_disk_epochs_applied_total"] += 1
        elif isinstance(event, OwnershipTaken):
            c["tremus_ownership_taken_total"] += 1
        elif isinstance(event, OwnershipLost):
            c["tremus_ownership_lost_total"] += 1
        elif isinstance(event, OwnershipRefused):
            c["tremus_ownership_refused_total"] += 1

    def render(self) -> str:
        """The Prometheus text exposition format."""
        label = f'{{role="{self.role}"}}'
        lines: list[str] = []
        for name, value in self.counters.items():
            lines += [f"# TYPE {name} counter", f"{name}{label} {value:g}"]
        for name, value in self.gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name}{label} {value:g}"]
        name = "tremus_pause_seconds"
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip((*PAUSE_BUCKETS, float("inf")), self._pause_buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{role="{self.role}",le="{le}"}} {cumulative}')
        lines.append(f"{name}_sum{label} {self._pause_sum:g}")
        lines.append(f"{name}_count{label} {cumulative}")
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: Metrics, host: str, port: int, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``GET /metrics`` on HOST:PORT until cancelled; reports the bound port."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
                if path.split(b"?")[0] == b"/metrics":
                    body = metrics.render().encode()
                    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body = b"not found: try /metrics\n"
                    head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)
