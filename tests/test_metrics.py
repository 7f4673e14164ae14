"""Prometheus metrics: from events, per role, and over HTTP (in-process and from the CLI)."""

from __future__ import annotations

import re

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests._microvm_util import needs_kvm
from tests._procs import free_port, start_tremus
from tremus.engine.events import (
    BackupLost,
    CheckpointAcked,
    CheckpointApplied,
    ConnectionRejected,
    DiskEpochDurable,
    DomainStopped,
    EventHub,
    FailoverComplete,
    OwnershipTaken,
    ProtectionStarted,
    ReplicaClosed,
    ReplicaOpened,
)
from tremus.metrics import LATENCY_BUCKETS, Metrics, serve_metrics

#: Metric families (names as prometheus_client reports them: counters without
#: ``_total``) that only one role may export.
PRIMARY_ONLY = {
    "tremus_checkpoints_sent", "tremus_checkpoints_acked", "tremus_checkpoint_bytes_sent",
    "tremus_output_released_packets", "tremus_backup_lost", "tremus_device_failures",
    "tremus_protected", "tremus_last_acked_epoch", "tremus_pause_seconds",
    "tremus_round_trip_seconds", "tremus_cow_copy_seconds", "tremus_cow_faults",
}
BACKUP_ONLY = {
    "tremus_checkpoints_applied", "tremus_checkpoint_bytes_received",
    "tremus_failovers_started", "tremus_failovers", "tremus_failovers_refused",
    "tremus_disk_epochs_durable", "tremus_disk_bytes_durable", "tremus_disk_epochs_applied",
    "tremus_connections_rejected", "tremus_last_applied_epoch",
    "tremus_last_failover_downtime_seconds", "tremus_guests_running", "tremus_replica",
    "tremus_replica_ram_bytes", "tremus_apply_seconds", "tremus_disk_durable_seconds",
}
SHARED = {"tremus_checkpoint_pages", "tremus_ownership_taken", "tremus_ownership_lost",
          "tremus_ownership_refused"}


def _attached(role: str) -> tuple[Metrics, EventHub]:
    hub = EventHub()
    metrics = Metrics(role)
    metrics.attach(hub)
    return metrics, hub


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"role": metrics.role, **labels})


def _acked(epoch: int, pause_us: float, round_trip_ms: float) -> CheckpointAcked:
    return CheckpointAcked(epoch=epoch, dirty_pages=10, pause_us=pause_us, kick_us=50.0,
                           bytes_sent=1000, raw_bytes=40960, round_trip_ms=round_trip_ms)


def test_metrics_follow_events() -> None:
    metrics, hub = _attached("primary")
    hub.emit(ProtectionStarted(domain="microvm", backup="b", interval_ms=50, codec="delta",
                               devices=()))
    for epoch in range(3):
        hub.emit(_acked(epoch, pause_us=300.0, round_trip_ms=1.5))
    text = metrics.render()
    # The names on the wire are those dashboards already use.
    assert 'tremus_checkpoints_acked_total{role="primary"} 3.0' in text
    assert 'tremus_checkpoint_bytes_sent_total{role="primary"} 3000.0' in text
    assert 'tremus_checkpoint_pages_total{role="primary"} 30.0' in text
    assert 'tremus_protected{role="primary"} 1.0' in text
    assert 'tremus_last_acked_epoch{role="primary"} 2.0' in text
    assert 'tremus_pause_seconds_bucket{le="0.0005",role="primary"} 3.0' in text
    assert 'tremus_pause_seconds_bucket{le="0.00025",role="primary"} 0.0' in text
    assert 'tremus_cow_copy_seconds_count{role="primary"} 0.0' in text
    hub.emit(CheckpointAcked(epoch=3, dirty_pages=300, pause_us=200.0, kick_us=50.0,
                             bytes_sent=1000, raw_bytes=40960, round_trip_ms=1.0,
                             copy_us=400.0, cow_faults=7))
    text = metrics.render()
    assert 'tremus_cow_copy_seconds_bucket{le="0.0005",role="primary"} 1.0' in text
    assert 'tremus_cow_faults_total{role="primary"} 7.0' in text
    hub.emit(BackupLost(reason="gone", last_acked_epoch=3))
    text = metrics.render()
    assert 'tremus_protected{role="primary"} 0.0' in text
    assert 'tremus_backup_lost_total{role="primary"} 1.0' in text


def test_registries_are_private() -> None:
    first, hub = _attached("primary")
    second = Metrics("primary")  # same names, another registry: no clash
    hub.emit(_acked(0, pause_us=100.0, round_trip_ms=1.0))
    assert _value(first, "tremus_checkpoints_acked_total") == 1
    assert _value(second, "tremus_checkpoints_acked_total") == 0


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        Metrics("witness")


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_every_metric_says_what_it_means(role: str) -> None:
    metrics = Metrics(role)
    text = metrics.render()
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.MULTILINE))
    types = re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE)
    assert types and set(types) == set(helps)
    for name, help_text in helps.items():
        assert len(help_text.split()) >= 4, f"{name}: {help_text!r} says too little"
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name


def _roles(metrics: Metrics) -> dict[str, set[str]]:
    """Metric family name -> the role labels of its series."""
    return {f.name: {sample.labels["role"] for sample in f.samples}
            for f in metrics.registry.collect()}


def test_each_role_exports_what_applies_to_it() -> None:
    primary, backup = _roles(Metrics("primary")), _roles(Metrics("backup"))
    assert set(primary) == PRIMARY_ONLY | SHARED
    assert all(roles == {"primary"} for roles in primary.values())
    # A backup is also the primary of the guests that failed over to it (failback):
    # it exports a primary's metrics too, as role="primary".
    assert set(backup) == BACKUP_ONLY | SHARED | PRIMARY_ONLY
    for name in BACKUP_ONLY:
        assert backup[name] <= {"backup"}, name
    for name in PRIMARY_ONLY:
        assert backup[name] == {"primary"}, name
    assert backup["tremus_checkpoint_pages"] == {"primary", "backup"}


def test_a_backup_that_protects_a_failed_over_guest_counts_it_as_its_primary() -> None:
    metrics, hub = _attached("backup")
    hub.emit(CheckpointApplied(epoch=1, pages=5, bytes_received=100, apply_us=10.0))
    hub.emit(FailoverComplete(epoch=1, downtime_ms=10.0, host="h"))
    hub.emit(ProtectionStarted(domain="microvm", backup="c:7400", interval_ms=25.0,
                               codec="raw", devices=()))
    hub.emit(_acked(0, pause_us=100.0, round_trip_ms=1.0))
    sample = metrics.registry.get_sample_value
    assert sample("tremus_protected", {"role": "primary"}) == 1
    assert sample("tremus_checkpoints_acked_total", {"role": "primary"}) == 1
    assert sample("tremus_pause_seconds_count", {"role": "primary"}) == 1
    assert sample("tremus_checkpoint_pages_total", {"role": "primary"}) == 10
    assert sample("tremus_checkpoint_pages_total", {"role": "backup"}) == 5
    assert sample("tremus_checkpoints_applied_total", {"role": "backup"}) == 1
    assert sample("tremus_guests_running", {"role": "backup"}) == 1


def test_a_primary_ignores_a_backups_events() -> None:
    metrics, hub = _attached("primary")
    hub.emit(CheckpointApplied(epoch=1, pages=5, bytes_received=100, apply_us=10.0))
    hub.emit(ReplicaOpened(guest="web", peer="10.0.0.1:4000", ram_bytes=1 << 20))
    hub.emit(FailoverComplete(epoch=1, downtime_ms=10.0, host="h"))
    assert _value(metrics, "tremus_checkpoint_pages_total") == 0
    assert "tremus_replica{" not in metrics.render()
    assert "tremus_failovers" not in metrics.render()


def test_histograms_count_sum_and_buckets() -> None:
    metrics, hub = _attached("primary")
    pauses_us = [50.0, 200.0, 200.0, 800.0, 3000.0, 2_000_000.0]
    for epoch, pause in enumerate(pauses_us):
        hub.emit(_acked(epoch, pause_us=pause, round_trip_ms=pause / 100))
    seconds = [p / 1e6 for p in pauses_us]
    for name, observed in (("tremus_pause_seconds", seconds),
                           ("tremus_round_trip_seconds", [s * 10 for s in seconds])):
        assert _value(metrics, f"{name}_count") == len(observed)
        assert _value(metrics, f"{name}_sum") == pytest.approx(sum(observed))
        for bound in LATENCY_BUCKETS:
            expected = sum(1 for s in observed if s <= bound)
            assert _value(metrics, f"{name}_bucket", le=str(float(bound))) == expected, bound
        assert _value(metrics, f"{name}_bucket", le="+Inf") == len(observed)


def test_backup_histograms_and_counters() -> None:
    metrics, hub = _attached("backup")
    for epoch, apply_us in enumerate((80.0, 400.0, 1200.0)):
        hub.emit(CheckpointApplied(epoch=epoch, pages=7, bytes_received=500, apply_us=apply_us))
    hub.emit(DiskEpochDurable(epoch=0, writes=3, bytes=12288, durable_us=1500.0))
    hub.emit(OwnershipTaken(key="k", owner="b", arbiter="etcd://x"))
    hub.emit(ConnectionRejected(peer="10.0.0.9:1", reason="garbage"))
    assert _value(metrics, "tremus_apply_seconds_count") == 3
    assert _value(metrics, "tremus_apply_seconds_sum") == pytest.approx(0.00168)
    assert _value(metrics, "tremus_apply_seconds_bucket", le="0.0001") == 1
    assert _value(metrics, "tremus_apply_seconds_bucket", le="0.0005") == 2
    assert _value(metrics, "tremus_apply_seconds_bucket", le="0.001") == 2
    assert _value(metrics, "tremus_apply_seconds_bucket", le="0.0025") == 3
    assert _value(metrics, "tremus_checkpoints_applied_total") == 3
    assert _value(metrics, "tremus_checkpoint_pages_total") == 21
    assert _value(metrics, "tremus_checkpoint_bytes_received_total") == 1500
    assert _value(metrics, "tremus_last_applied_epoch") == 2
    assert _value(metrics, "tremus_disk_epochs_durable_total") == 1
    assert _value(metrics, "tremus_disk_bytes_durable_total") == 12288
    assert _value(metrics, "tremus_disk_durable_seconds_count") == 1
    assert _value(metrics, "tremus_ownership_taken_total") == 1
    assert _value(metrics, "tremus_connections_rejected_total") == 1


def test_replica_gauges_follow_replicas() -> None:
    metrics, hub = _attached("backup")
    hub.emit(ReplicaOpened(guest="web", peer="10.0.0.1:4000", ram_bytes=64 << 20))
    hub.emit(ReplicaOpened(guest="db", peer="10.0.0.2:4000", ram_bytes=128 << 20))
    assert _value(metrics, "tremus_replica", guest="web") == 1
    assert _value(metrics, "tremus_replica", guest="db") == 1
    assert _value(metrics, "tremus_replica_ram_bytes", guest="db") == 128 << 20
    hub.emit(ReplicaClosed(guest="web", outcome="ended"))
    assert _value(metrics, "tremus_replica", guest="web") is None
    assert _value(metrics, "tremus_replica_ram_bytes", guest="web") is None
    assert 'guest="web"' not in metrics.render()
    assert _value(metrics, "tremus_replica", guest="db") == 1
    hub.emit(ReplicaClosed(guest="web", outcome="ended"))  # twice, or never opened: no error
    hub.emit(ReplicaClosed(guest="nobody", outcome="refused", reason="no checkpoint"))
    hub.emit(ReplicaOpened(guest="web", peer="10.0.0.1:4001", ram_bytes=64 << 20))
    assert _value(metrics, "tremus_replica", guest="web") == 1


def test_guests_running_after_failover() -> None:
    metrics, hub = _attached("backup")
    hub.emit(DomainStopped(reason="stray", host="h"))  # none failed over: stays at 0
    assert _value(metrics, "tremus_guests_running") == 0
    hub.emit(FailoverComplete(epoch=4, downtime_ms=250.0, host="h"))
    hub.emit(FailoverComplete(epoch=9, downtime_ms=120.0, host="h"))
    assert _value(metrics, "tremus_guests_running") == 2
    assert _value(metrics, "tremus_failovers_total") == 2
    assert _value(metrics, "tremus_last_failover_downtime_seconds") == pytest.approx(0.12)
    hub.emit(DomainStopped(reason="halted", host="h"))
    assert _value(metrics, "tremus_guests_running") == 1


# -- HTTP ---------------------------------------------------------------------------
async def _get(port: int, path: str, method: str = "GET") -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.0\r\n\r\n".encode())
        return await _read_all(stream)


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def _split(reply: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


async def test_http_serves_metrics_and_survives_bad_clients() -> None:
    metrics, hub = _attached("primary")
    hub.emit(_acked(0, pause_us=300.0, round_trip_ms=1.5))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)

            async def serves() -> None:
                status, headers, body = _split(await _get(port, "/metrics"))
                assert status == "HTTP/1.0 200 OK"
                assert headers["content-type"] == CONTENT_TYPE_LATEST
                assert int(headers["content-length"]) == len(body)
                assert body.decode() == metrics.render()
                assert b'tremus_checkpoints_acked_total{role="primary"} 1.0' in body

            await serves()
            assert (await _get(port, "/metrics?x=1")).startswith(b"HTTP/1.0 200 OK")
            assert (await _get(port, "/other")).startswith(b"HTTP/1.0 404")
            assert (await _get(port, "/")).startswith(b"HTTP/1.0 404")
            assert (await _get(port, "/metrics", "POST")).startswith(b"HTTP/1.0 405")
            status, headers, body = _split(await _get(port, "/metrics", "HEAD"))
            assert status == "HTTP/1.0 200 OK" and body == b""
            assert int(headers["content-length"]) > 0

            # 8 KiB of garbage, no request in it: refused, and the server goes on.
            garbage = await trio.open_tcp_stream("127.0.0.1", port)
            async with garbage:
                await garbage.send_all(bytes(range(256)) * 32)
                assert (await _read_all(garbage)).startswith(b"HTTP/1.0 431")
            await serves()

            # A malformed request line.
            bad = await trio.open_tcp_stream("127.0.0.1", port)
            async with bad:
                await bad.send_all(b"hello\r\n\r\n")
                assert (await _read_all(bad)).startswith(b"HTTP/1.0 400")
            await serves()

            # A half request, then the client shuts its side: closed without an answer.
            half = await trio.open_tcp_stream("127.0.0.1", port)
            async with half:
                await half.send_all(b"GET /metr")
                await half.send_eof()
                assert await _read_all(half) == b""
            await serves()

            # A client that connects and sends nothing does not hold the others up.
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            async with silent:
                await serves()
                await serves()
            await serves()

            # A client that resets the connection mid-request.
            reset = await trio.open_tcp_stream("127.0.0.1", port)
            await reset.send_all(b"GET /metrics HTTP/1.0\r\n")
            await trio.aclose_forcefully(reset)
            await serves()
            nursery.cancel_scope.cancel()


async def test_http_silent_client_is_dropped_after_the_timeout() -> None:
    metrics = Metrics("backup")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_metrics(metrics, "127.0.0.1", 0, timeout=0.3,
                                                  task_status=task_status))
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            async with silent:
                start = trio.current_time()
                assert await _read_all(silent) == b""  # the server closed it
                assert trio.current_time() - start < 5
            assert (await _get(port, "/metrics")).startswith(b"HTTP/1.0 200 OK")
            nursery.cancel_scope.cancel()


async def test_http_address_in_use_raises_before_started() -> None:
    metrics = Metrics("primary")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        with pytest.raises(OSError):
            await nursery.start(serve_metrics, metrics, "127.0.0.1", port)
        nursery.cancel_scope.cancel()


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
        assert b'tremus_protected{role="primary"} 1.0' in reply
        assert b"tremus_checkpoints_acked_total" in reply
        assert b'tremus_pause_seconds_count{role="primary"}' in reply
        assert b"tremus_replica" not in reply  # a backup's metric
        assert (await _get(metrics_port, "/other")).startswith(b"HTTP/1.0 404")
        primary.kill()
        backup.kill()


@needs_kvm
async def test_backup_serves_metrics_of_the_replicas_it_holds() -> None:
    port, metrics_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        backup = await start_tremus(nursery, "backup", "backup", "--listen",
                                    f"127.0.0.1:{port}", "--metrics",
                                    f"127.0.0.1:{metrics_port}", "--json")
        await backup.wait_for(lambda b: b.of("backup_ready"), what="backup_ready")
        primaries = [
            await start_tremus(
                nursery, name, "protect", "--domain",
                f"microvm:name={name},workload=counter,memory=8M",
                "--backup", f"127.0.0.1:{port}", "--json")
            for name in ("db", "web")]
        for primary in primaries:
            await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 3, what="acks")
        reply = (await _get(metrics_port, "/metrics")).decode()
        assert reply.startswith("HTTP/1.0 200 OK")
        for guest in ("db", "web"):
            assert f'tremus_replica{{guest="{guest}",role="backup"}} 1.0' in reply
            assert f'tremus_replica_ram_bytes{{guest="{guest}",role="backup"}} 8.388608e+06' \
                in reply
        applied = re.search(r'^tremus_checkpoints_applied_total\{role="backup"\} (\S+)$', reply,
                            re.MULTILINE)
        assert applied is not None and float(applied.group(1)) >= 6
        assert 'tremus_protected{role="primary"} 0.0' in reply  # protects nothing itself
        primaries[1].kill()  # web's primary dies: web fails over, its replica is closed
        await backup.wait_for(lambda b: b.of("failover_complete"), what="failover")
        reply = (await _get(metrics_port, "/metrics")).decode()
        assert 'tremus_replica{guest="db",role="backup"} 1.0' in reply
        assert 'guest="web"' not in reply
        assert 'tremus_guests_running{role="backup"} 1.0' in reply
        assert 'tremus_failovers_total{role="backup"} 1.0' in reply
        primaries[0].kill()
        backup.kill()

