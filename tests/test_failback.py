"""Failback, and protection stopped and started again, under a client that writes.

Three hosts in namespaces. A protects the kv guest to B; B runs ``tremus backup
--reprotect-to A:PORT``. A is SIGKILLed: B runs the guest, and keeps trying to protect
it to A. A backup is started again on A's host: B protects the guest to it. B is
SIGKILLed: A's side runs the guest. A client writes all along, each write retried
until its OK; at the end every acknowledged write reads back.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests._microvm_util import needs_kvm
from tests._netharness import kv_net
from tremus.testing.faults import Writer, read_back
from tremus.testing.procs import tremus_argv
from tremus.testing.topology import require_root

_why_not = require_root() or (None if shutil.which("iptables") else "needs iptables")
pytestmark = [needs_kvm, pytest.mark.skipif(_why_not is not None, reason=_why_not or ""),
              pytest.mark.slow]

FAILBACK_PORT = 7500


async def test_the_whole_cycle_loses_no_acknowledged_write() -> None:
    with trio.fail_after(150):
        async with kv_net() as net:
            a_address = f"{net.topo.address('primary')}:{FAILBACK_PORT}"
            b = await net.start_backup("--reprotect-to", a_address, once=False)
            a = await net.start_primary("vmm", 50)
            writer = Writer(net, min_gap=0.02)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await _oks(writer, 10, "OKs from A")

                # A dies: B runs the guest, and tries to protect it to A's host.
                a.kill()
                done = await b.wait_for(lambda p: p.of("failover_complete"), timeout=20,
                                        what="failover to B")
                assert done[0]["guest"]
                await _oks(writer, len(writer.ok_times) + 10, "OKs from B")
                assert not b.of("protection_started")  # nothing answers on A yet

                # A backup comes back on A's host: B protects the guest to it.
                a2 = await net.start("primary", "backup-on-a", "backup", "--listen",
                                     a_address, "--json")
                await a2.wait_for(lambda p: p.of("backup_ready"), what="backup on A")
                await b.wait_for(lambda p: p.of("protection_started"), timeout=30,
                                 what="B protects the guest to A")
                await b.wait_for(lambda p: len(p.of("checkpoint_acked")) >= 10, timeout=30,
                                 what="checkpoints acked by A")
                await _oks(writer, len(writer.ok_times) + 10, "OKs while B is protected by A")

                # B dies: A's side runs the guest.
                b.kill()
                back = await a2.wait_for(lambda p: p.of("failover_complete"), timeout=20,
                                         what="failback to A")
                assert back[0]["epoch"] >= 1
                await _oks(writer, len(writer.ok_times) + 10, "OKs from A again")
                writer.stop.set()
            reads = await read_back(net, writer.acked)
            lost = writer.lost(reads)
            assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:5]}"
            assert len(writer.acked) >= 40
            print(f"failback: {len(writer.ok_times)} OKs, {len(writer.acked)} keys read back, "
                  f"{writer.retries} retries")


async def _oks(writer: Writer, count: int, what: str, timeout: float = 30) -> None:
    with trio.move_on_after(timeout):
        while len(writer.ok_times) < count:
            await trio.sleep(0.05)
        return
    raise AssertionError(f"client: no {what} within {timeout} s "
                         f"({len(writer.ok_times)} OKs, {writer.retries} retries)")


async def test_ctl_stops_and_restarts_protection_of_a_kv_guest(tmp_path: Path) -> None:
    control = str(tmp_path / "primary.sock")
    with trio.fail_after(120):
        async with kv_net() as net:
            backup = await net.start_backup(once=False)
            primary = await net.start_primary("vmm", 50, "--control", control)
            writer = Writer(net, min_gap=0.02)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                await _oks(writer, 10, "OKs while protected")

                await _ctl(control, "stop-protection")
                await backup.wait_for(lambda b: b.of("replica_closed"), what="replica closed")
                assert backup.of("replica_closed")[0]["outcome"] == "ended"
                await _oks(writer, len(writer.ok_times) + 20, "OKs while unprotected")
                assert not backup.of("failover_started")

                await _ctl(control, "protect", "--backup", net.backup_address)
                acked = len(primary.of("checkpoint_acked"))
                await primary.wait_for(lambda p: len(p.of("checkpoint_acked")) >= acked + 10,
                                       what="protected again")
                await _oks(writer, len(writer.ok_times) + 10, "OKs while protected again")

                primary.kill()
                await backup.wait_for(lambda b: b.of("failover_complete"), timeout=20,
                                      what="failover")
                await _oks(writer, len(writer.ok_times) + 10, "OKs from the backup")
                writer.stop.set()
            reads = await read_back(net, writer.acked)
            lost = writer.lost(reads)
            assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:5]}"


async def _ctl(path: str, *args: str) -> None:
    result = await trio.run_process(tremus_argv(["ctl", path, *args]), capture_stdout=True,
                                    capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (args, result.stderr.decode())
