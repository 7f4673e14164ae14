"""The micro-VM on real KVM: boot, suspend/resume, dirty logging, save and restore."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from tests._microvm_util import ConsoleLog, boot, needs_kvm
from tremus.domains.base import DomainError
from tremus.domains.microvm import MicroVM, MicroVMConfig, abi
from tremus.domains.registry import create_domain, parse_spec

pytestmark = needs_kvm


async def test_counter_boots_and_counts() -> None:
    log = ConsoleLog()
    vm = boot(log, workload="counter", memory="4M", interval_ms="10")
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await log.wait_until(lambda c: len(c.counters()) >= 5)
        vm.stop()
    counters = log.counters()
    assert counters[:5] == [1, 2, 3, 4, 5]


async def _counting(nursery: trio.Nursery, lines: int, interval_ms: str
                    ) -> tuple[MicroVM, ConsoleLog]:
    """A counter micro-VM started in ``nursery``, once it printed ``lines`` lines."""
    log = ConsoleLog()
    vm = boot(log, workload="counter", memory="4M", interval_ms=interval_ms)
    await nursery.start(vm.run)
    await log.wait_until(lambda c: len(c.counters()) >= lines)
    return vm, log


async def test_suspend_stops_the_counter_and_resume_continues_it() -> None:
    async with trio.open_nursery() as nursery:
        vm, log = await _counting(nursery, 3, "10")
        await vm.suspend()
        assert vm.suspended
        seen = len(log.lines)
        await trio.sleep(0.5)
        assert len(log.lines) == seen, "the guest printed while suspended"
        last = log.counters()[-1]
        await vm.resume()
        await log.wait_until(lambda c: c.counters()[-1] >= last + 2)
        vm.stop()
    counters = log.counters()
    assert counters == list(range(1, len(counters) + 1))


async def test_a_state_snapshot_is_the_state_at_the_pause_however_late_encoded() -> None:
    """``state_snapshot`` in a pause, encoded after the guest ran on and parked again
    (its registers read anew into the same buffer), gives the bytes it would have
    given at once: the snapshot holds values, not views of the live machine."""
    import msgpack

    async with trio.open_nursery() as nursery:
        vm, log = await _counting(nursery, 2, "10")
        await vm.suspend()
        snapshot = vm.state_snapshot()
        at_pause = snapshot()
        await vm.resume()
        seen = log.counters()[-1]
        await log.wait_until(lambda c: c.counters()[-1] >= seen + 2)
        await vm.suspend()
        later = vm.save_state()
        assert snapshot() == at_pause
        before, after = msgpack.unpackb(at_pause), msgpack.unpackb(later)
        assert before["vcpu"] != after["vcpu"]  # the guest did run on in between
        assert before["devices"]["console"] != after["devices"]["console"]
        await vm.resume()
        vm.stop()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
async def test_the_vcpu_thread_is_kept_off_the_pausing_threads_cpu_until_resume() -> None:
    """While suspended the vCPU thread may not run on the CPU ``suspend`` ran on (it
    is not left there to compete with the pause); ``resume`` gives it back its own
    affinity, and so does its end."""
    vm = boot(None, workload="counter", memory="4M", interval_ms="10")
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        tid = vm._thread_tid
        assert tid is not None
        own = os.sched_getaffinity(tid)
        for _ in range(5):
            await vm.suspend()
            here = struct.unpack_from("=i", vm._park_flags, 4)[0]
            assert here in own
            assert os.sched_getaffinity(tid) == own - {here}
            await vm.resume()
            assert os.sched_getaffinity(tid) == own
            await trio.sleep(0.02)
        await vm.suspend()
        vm.stop()
    assert os.sched_getaffinity(tid) == own


async def test_dirty_set_is_inside_the_working_set_and_clears() -> None:
    ws_pages = 64
    vm = boot(None, workload="dirty", memory="4M", ws=f"{ws_pages * 4}K", rate="5000",
              pattern="random")
    ws_first = abi.WORKING_SET_ADDR // abi.PAGE_SIZE
    working_set = set(range(ws_first, ws_first + ws_pages))
    # The guest's own pages: its image (code, data, bss), its stack, and the page
    # tables (the CPU sets their accessed/dirty bits on its first walks).
    guest_own = (
        set(range(abi.IMAGE_ADDR // 4096, abi.WORKING_SET_ADDR // 4096))
        | set(range(abi.STACK_TOP // 4096 - 4, abi.STACK_TOP // 4096))
        | set(range(abi.PML4_ADDR // 4096, abi.PD_ADDR // 4096 + 4))
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.suspend()
        vm.read_and_clear_dirty()  # boot-time writes
        await vm.resume()
        await trio.sleep(1.0)
        await vm.suspend()
        dirty = set(vm.read_and_clear_dirty())
        assert dirty & working_set, "no working-set page was reported dirty"
        assert dirty <= working_set | guest_own, sorted(dirty - working_set - guest_own)
        assert len(dirty & working_set) > len(dirty - working_set)
        # Cleared: nothing new while the vCPU is parked...
        assert list(vm.read_and_clear_dirty()) == []
        # ...except what the VMM itself writes.
        vm.write_ram(3 * 4096 * 100, b"x" * 5000)
        assert list(vm.read_and_clear_dirty()) == [300, 301]
        assert list(vm.read_and_clear_dirty()) == []
        await vm.resume()
        await trio.sleep(0.5)
        await vm.suspend()
        again = set(vm.read_and_clear_dirty())
        assert again and again <= working_set | guest_own
        vm.stop()


async def test_boot_writes_are_in_the_dirty_set() -> None:
    vm = boot(None, workload="counter", memory="4M")
    dirty = set(vm.read_and_clear_dirty())
    assert {abi.PML4_ADDR // 4096, abi.BOOT_INFO_ADDR // 4096, abi.IMAGE_ADDR // 4096} <= dirty
    vm.close()


RESTORE_CHILD = textwrap.dedent(
    """
    import json, sys, trio
    from tremus.domains.registry import restore_domain

    async def main(config_path, ram_path, state_path):
        config = json.load(open(config_path))
        ram = memoryview(bytearray(open(ram_path, "rb").read()))
        state = open(state_path, "rb").read()
        lines = []
        vm = restore_domain("microvm", config, ram, state, console=lines.append)
        clock_start = vm.clock.now()
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.run)
            with trio.fail_after(60):
                while len(lines) < 3:
                    await trio.sleep(0.01)
            vm.stop()
        print(json.dumps({"lines": lines, "clock_start": clock_start}))

    trio.run(main, *sys.argv[1:])
    """
)


async def test_save_and_restore_in_another_process(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        vm, log = await _counting(nursery, 4, "20")
        await vm.suspend()
        state = vm.save_state()
        saved_clock = vm.clock.now()
        (tmp_path / "ram").write_bytes(vm.ram)
        last = log.counters()[-1]
        vm.stop()
    (tmp_path / "state").write_bytes(state)
    (tmp_path / "config.json").write_text(json.dumps(dict(vm.config)))
    await trio.sleep(0.3)  # time passes on the host before the restore
    result = await trio.run_process(
        [sys.executable, "-c", RESTORE_CHILD, str(tmp_path / "config.json"),
         str(tmp_path / "ram"), str(tmp_path / "state")],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    counters = [int(line.split()[1]) for line in out["lines"] if line.startswith("counter ")]
    assert counters[0] == last + 1, (last, out["lines"])
    assert counters == list(range(last + 1, last + 1 + len(counters)))
    # The guest clock continues from the saved reading; it does not jump back.
    assert saved_clock - 50_000_000 <= out["clock_start"] < saved_clock + 5_000_000_000


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("microvm:workload=nope", "unknown workload"),
        ("microvm:memory=1M", "too small"),
        ("microvm:memory=lots", "not a size"),
        ("microvm:color=red", "unknown micro-VM option"),
        ("microvm:workload", "not key=value"),
        ("xen:memory=16M", "unknown domain driver"),
        ("microvm:memory=16M,memory=8M", "given twice"),
        ("microvm:memory=8G", "too large"),
    ],
)
def test_bad_specs_give_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(DomainError, match=message):
        create_domain(spec)


def test_spec_parsing() -> None:
    assert parse_spec("microvm:workload=counter, memory=16M") == (
        "microvm", {"workload": "counter", "memory": "16M"})
    config = MicroVMConfig.from_options({"memory": "16M", "ws": "1M"})
    assert config.memory == 16 << 20 and config.working_set_pages == 256


def test_restore_rejects_corrupt_state() -> None:
    config = MicroVMConfig.from_options({"memory": "4M"})
    with pytest.raises(DomainError, match="corrupt micro-VM state|not a micro-VM state"):
        MicroVM.from_checkpoint(config, bytes(config.memory), b"\x93garbage")


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tremus.cli", *args], capture_output=True, text=True,
        timeout=120, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
    )


def test_cli_run_json_prints_console_events() -> None:
    proc = _cli("run", "--domain", "microvm:workload=counter,memory=4M,interval_ms=20",
                "--duration", "1.5", "--json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    consoles = [e for e in events if e["event"] == "console"]
    assert consoles and consoles[0]["line"] == "counter 1"
    assert all("host" in e for e in consoles)
    assert events[-1]["event"] == "domain_stopped"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--domain", "microvm:memory=1M"], {}, "too small"),
        (["--domain", "microvm:workload=bogus"], {}, "unknown workload"),
        (["--domain", "microvm:memory=16M"], {"TREMUS_KVM_DEVICE": "/nonexistent/kvm"},
         "has no KVM"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    proc = _cli("run", *args, "--duration", "1", **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@needs_kvm
@pytest.mark.parametrize("workload", ["dirty", "counter"])
async def test_a_suspend_right_after_a_resume_stops_the_guest(workload: str) -> None:
    """After ``resume()`` the vCPU thread runs the guest from inside its park call; a
    suspend in that window must stop the guest again (it once found the domain still
    "parked" and returned at once, and the checkpoint was taken from a running guest),
    and must come back (a guest waiting in HLT once took the new pause request for a
    stale wakeup and never said it parked: the suspend waited for ever)."""
    options = ({"rate": "1000000", "pattern": "random"} if workload == "dirty"
               else {"interval_ms": "1000"})
    vm = boot(workload=workload, memory="4M", **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await trio.sleep(0.2)
        for _ in range(300):
            with trio.fail_after(5):
                await vm.suspend()
            assert vm.suspended
            before = bytes(vm.ram)
            vm.save_state()  # raises if the vCPU is not stopped
            await trio.sleep(0.001)
            assert bytes(vm.ram) == before, "guest RAM changed while suspended"
            await vm.resume()
            assert not vm.suspended
        vm.stop()


@pytest.mark.parametrize("workload", ["dirty", "counter"])
async def test_a_suspend_that_outlasts_its_spin_waits_from_the_event_loop(
        workload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vCPU that has not parked when ``suspend``'s spin ends (a kick KVM notices
    only at a timer tick) is waited for from the event loop: with no spin at all,
    every suspend still stops the guest, running or halted, and tells when."""
    from tremus.domains.microvm import vm as vm_module

    monkeypatch.setattr(vm_module, "_PARK_SPIN_NS", 0)
    options = ({"rate": "1000000", "pattern": "random"} if workload == "dirty"
               else {"interval_ms": "2"})
    vm = boot(workload=workload, memory="4M", **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        for _ in range(20):
            await trio.sleep(0.005)
            requested = time.perf_counter_ns()
            with trio.fail_after(5):
                await vm.suspend()
            assert vm.suspended and requested <= vm.stopped_at_ns <= time.perf_counter_ns()
            before = bytes(vm.ram)
            vm.save_state()
            await trio.sleep(0.002)
            assert bytes(vm.ram) == before, "guest RAM changed while suspended"
            await vm.resume()
        vm.stop()


async def test_a_park_keeps_the_fpu_state_the_guest_cannot_change_until_it_is_set() -> None:
    """The guest runs with CR0.EM and without CR4.OSFXSR (every FPU instruction
    faults), so a park reads the FPU state only when the registers were set since
    (``Vcpu.set``): a value set that way is what the next park saves; one set behind
    ``Vcpu``'s back, by a bare ioctl, is not read (the park kept its copy)."""
    from tremus.accel import native
    from tremus.domains.microvm import _kvm

    assert native is not None
    log = ConsoleLog()
    vm = boot(log, workload="counter", memory="4M", interval_ms="5")
    vcpu = vm._vcpu  # type: ignore[attr-defined]
    fpu_at = -len(native.kvm_get_vcpu_state(vcpu.fd)[2])

    async def parked_fpu_after_a_line() -> bytes:
        await vm.resume()
        lines = len(log.counters())
        await log.wait_until(lambda c: len(c.counters()) > lines)
        await vm.suspend()
        return vm._parked_registers()[fpu_at:]  # type: ignore[attr-defined,no-any-return]

    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.suspend()
        sregs = vcpu.get(_kvm.KVM_GET_SREGS, _kvm.Sregs)
        assert sregs.cr0 & 4 and not sregs.cr4 & (1 << 9 | 1 << 18)
        assert await parked_fpu_after_a_line() == native.kvm_get_vcpu_state(vcpu.fd)[2]
        fpu = vcpu.get(_kvm.KVM_GET_FPU, _kvm.Fpu)
        fpu.fcw ^= 0x0C00  # another rounding mode
        vcpu.set(_kvm.KVM_SET_FPU, fpu)
        assert await parked_fpu_after_a_line() == bytes(fpu)
        kept = bytes(fpu)
        fpu.fcw ^= 0x0300  # another precision, set behind Vcpu's back
        _kvm.ioctl_struct(vcpu.fd, _kvm.KVM_SET_FPU, fpu)
        assert await parked_fpu_after_a_line() == kept != bytes(fpu)
        vcpu.set(_kvm.KVM_SET_FPU, fpu)
        assert await parked_fpu_after_a_line() == bytes(fpu)
        vm.stop()


async def test_the_registers_a_park_reads_from_kvm_run_are_those_kvm_would_give() -> None:
    """The parked vCPU reads its general and special registers from the copy KVM
    stores in kvm_run as KVM_RUN returns (``kvm_sync_regs``): the same bytes as the
    ioctls give, at each of several pauses. A vCPU whose registers were set by ioctl
    and that has not run since parks with them read by ioctl (the copy in kvm_run
    is stale then, and dropped)."""
    from tremus.accel import native

    assert native is not None
    log = ConsoleLog()
    vm = boot(log, workload="counter", memory="4M", interval_ms="5")
    assert vm._vcpu.registers_in_run  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        for lines in range(1, 6):
            await log.wait_until(lambda c, n=lines: len(c.counters()) >= n)
            await vm.suspend()
            parked = vm._parked_registers()  # type: ignore[attr-defined]
            regs, sregs, fpu = native.kvm_get_vcpu_state(vm._vcpu.fd)  # type: ignore[attr-defined]
            assert parked == regs + sregs + fpu
            await vm.resume()
        vm.stop()

    fresh = boot(workload="counter", memory="4M")  # registers set by ioctl, never run
    try:
        vcpu = fresh._vcpu  # type: ignore[attr-defined]
        wake = os.eventfd(0, os.EFD_NONBLOCK)
        flags = bytearray(8)
        flags[1] = 1
        flags[4:8] = (-1).to_bytes(4, "little", signed=True)
        state = bytearray(len(fresh._parked_state))  # type: ignore[attr-defined]
        rc, _ = native.kvm_wait_run(wake, -1, flags, 0, vcpu.fd, state, None, vcpu.run)
        os.close(wake)
        assert rc == 0 and flags[2] == 1 and flags[3] == 0
        assert bytes(state) == b"".join(native.kvm_get_vcpu_state(vcpu.fd))
    finally:
        fresh.close()
