"""Disk output commit end to end: kv on a replicated disk, in network namespaces.

The primary's kv guest logs every SET to its disk and answers OK only after the
write and a flush; the disk replicates to the backup epoch by epoch (block-remus's
fifo on the primary, a disk stream, a durable log on the backup). A client writes
continuously; the primary is SIGKILLed; every acknowledged SET reads back from the
failed-over guest — and again from a new micro-VM cold-booted on the backup's
replica image alone. With the backup's disk made slow, replies wait for it; with
memory checkpoints held back after their disk epoch is durable, a failover still
resumes memory and disk from the same checkpoint.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import trio

from tests._microvm_util import needs_kvm
from tests._netharness import KvNet, kv_net, kv_ready
from tests.test_failover_clients import Writer
from tremus.testing.topology import require_root

_why_not = require_root() or (None if shutil.which("iptables") else "needs iptables")
pytestmark = [needs_kvm, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

DISK_SIZE = 4 << 20


def image(tmp_path: Path) -> str:
    path = tmp_path / "kv.img"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return str(path)


async def protect_kv_on_disk(net: KvNet, tmp_path: Path, *backup_args: str):
    state = tmp_path / "state"
    backup = await net.start_backup("--state-dir", str(state), *backup_args)
    primary = await net.start_primary("vmm", 50, "--disk", image(tmp_path),
                                      "--run-dir", str(tmp_path / "run"))
    return backup, primary, state


async def read_back(net: KvNet, acked: dict[str, str]) -> None:
    await net.drain()
    for key, value in acked.items():
        got = await net.ask(f"GET {key}")
        assert got.reply == f"VAL {key} {value}", (key, got.reply)


async def test_every_acknowledged_write_survives_failover_and_a_cold_boot(tmp_path) -> None:
    with trio.fail_after(90):
        async with kv_net() as net:
            backup, primary, state = await protect_kv_on_disk(net, tmp_path)
            assert any(line["line"].startswith("kv loaded 0 records")
                       for line in primary.of("console"))
            writer = Writer(net)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.wait(lambda: len(writer.acked) >= 15, "OKs from the primary")
                assert backup.of("disk_epoch_durable") and backup.of("disk_epoch_applied")
                primary.kill()
                complete = await backup.wait_for(lambda b: b.of("failover_complete"),
                                                 timeout=30, what="failover_complete")
                replica = complete[0]["disks"]
                assert replica and Path(replica[0]).parent == state
                at = complete[0]["time"]
                await writer.wait(lambda: writer.oks_after(at) >= 5, "OKs from the backup")
                writer.stop.set()
            await read_back(net, writer.acked)

            # The replica image alone holds every acknowledged SET: boot a new VM on it.
            backup.kill()
            await backup.exited.wait()
            spec = net.domain_spec(disk=replica[0])
            vm = await net.start("backup", "cold", "run", "--domain", spec, "--json")
            await vm.wait_for(kv_ready, what="kv ready on the replica")
            loaded = [e["line"] for e in vm.of("console") if e["line"].startswith("kv loaded")]
            assert loaded and int(loaded[0].split()[2]) >= len(writer.acked), loaded
            await read_back(net, writer.acked)


async def test_memory_and_disk_come_from_the_same_checkpoint(tmp_path, monkeypatch) -> None:
    # Memory checkpoint N is applied 300 ms after disk epoch N became durable: a kill
    # lands between the two, and the failover must not mix them.
    monkeypatch.setenv("TREMUS_INJECT_APPLY_DELAY_MS", "300")
    with trio.fail_after(90):
        async with kv_net() as net:
            backup, primary, _ = await protect_kv_on_disk(net, tmp_path)
            writer = Writer(net)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await writer.wait(lambda: len(writer.acked) >= 8, "OKs from the primary")
                durable = len(backup.of("disk_epoch_durable"))
                await backup.wait_for(lambda b: len(b.of("disk_epoch_durable")) > durable,
                                      what="a disk epoch durable")
                primary.kill()  # within the 300 ms: disk N durable, memory N not applied
                complete = await backup.wait_for(lambda b: b.of("failover_complete"),
                                                 timeout=30, what="failover_complete")
                last_durable = backup.of("disk_epoch_durable")[-1]["epoch"]
                assert complete[0]["epoch"] < last_durable  # that epoch's disk was discarded
                check = await backup.wait_for(
                    lambda b: [e["line"] for e in b.of("console") if "kv disk" in e["line"]],
                    what="kv's consistency check")
                assert "consistent" in check[0] and "MISMATCH" not in check[0], check
                at = complete[0]["time"]
                await writer.wait(lambda: writer.oks_after(at) >= 3, "OKs from the backup")
                writer.stop.set()
            await read_back(net, writer.acked)


async def test_replies_wait_for_the_disk_of_their_epoch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TREMUS_INJECT_DISK_DELAY_MS", "400")  # a slow disk on the backup
    with trio.fail_after(90):
        async with kv_net() as net:
            backup, primary, _ = await protect_kv_on_disk(net, tmp_path)
            await net.drain()
            for i in range(3):
                got = await net.ask(f"SET slow{i} v{i}", timeout=30)
                assert got.reply == f"OK slow{i}"
                assert got.rtt_ms >= 400, got  # not before the backup's disk said done
                durable = [e for e in backup.of("disk_epoch_durable") if e["time"] <= got.t1]
                assert durable, "a reply left before any disk epoch was durable"


async def test_a_cut_disk_stream_stops_protection_loudly_and_loses_nothing(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TREMUS_INJECT_DISK_CUT_AT", "30")  # the backup drops the disk stream
    with trio.fail_after(90):
        async with kv_net() as net:
            backup, primary, _ = await protect_kv_on_disk(net, tmp_path)
            writer = Writer(net)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                # The backup holds back every checkpoint from then on (its disk epoch
                # can never be durable): the primary gives it up, loudly.
                lost = await primary.wait_for(lambda p: p.of("backup_lost"), timeout=60,
                                              what="backup_lost")
                assert "acknowledged no checkpoint" in lost[0]["reason"], lost
                at = lost[0]["time"]
                # Held output released after the takeover window: the guest runs on.
                await writer.wait(lambda: writer.oks_after(at) >= 5, "OKs after the failure")
                writer.stop.set()
            with trio.move_on_after(10):
                await backup.exited.wait()
            assert not backup.of("failover_started")  # the primary said END
            await read_back(net, writer.acked)


async def test_protecting_again_resends_only_what_changed(tmp_path) -> None:
    with trio.fail_after(90):
        async with kv_net() as net:
            state = tmp_path / "state"
            await net.start_backup("--state-dir", str(state))
            primary = await net.start_primary("vmm", 50, "--disk", image(tmp_path),
                                              "--run-dir", str(tmp_path / "run"),
                                              "--reprotect", "0.5")
            first = await primary.wait_for(
                lambda p: [e for e in p.of("disk_sync") if e["complete"]], what="disk sync")
            assert first[0]["sent_bytes"] == DISK_SIZE  # a new replica: everything
            for i in range(5):
                assert (await net.ask(f"SET again{i} v{i}")).reply == f"OK again{i}"
            net.procs[0].kill()  # the backup
            await primary.wait_for(lambda p: p.of("backup_lost"), what="backup_lost")
            # A backup started again on the same state finds its replica: only the
            # changed chunks are sent.
            net._ports = itertools.count(net.backup_port)  # the same address again
            await net.start_backup("--state-dir", str(state))
            again = await primary.wait_for(
                lambda p: [e for e in p.of("disk_sync") if e["complete"]][1:],
                timeout=60, what="a second disk sync")
            assert again[0]["skipped_bytes"] >= DISK_SIZE // 2, again[0]
            assert again[0]["sent_bytes"] + again[0]["skipped_bytes"] == DISK_SIZE
