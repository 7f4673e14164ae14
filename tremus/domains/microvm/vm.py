"""The micro-VM: guest RAM in transparent huge pages, one long-mode vCPU, paravirtual devices.

The vCPU runs in a worker thread (``trio.to_thread``) that loops on KVM_RUN and
dispatches exits to the devices; the Trio side parks and releases it. Suspending
kicks the vCPU out of KVM_RUN (``immediate_exit`` + a signal to its thread).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import math
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, final

import msgpack
import trio

from tremus._cow import CopyOnWrite
from tremus._groups import collapse_groups
from tremus._memory import guest_memory, prefaulted_buffer
from tremus.accel import impl, native
from tremus.domains.base import ConsoleSink, DomainError, Geometry
from tremus.domains.microvm import _kvm, abi
from tremus.domains.microvm.config import MicroVMConfig
from tremus.domains.microvm.devices import Clock, Console, ExitPort, Idle, PortDevice
from tremus.domains.microvm.disk import Disk
from tremus.domains.microvm.nic import Nic
from tremus.domains.microvm.tap import Tap
from tremus.domains.microvm.vcpu import Vcpu

__all__ = ["MicroVM", "STATE_FORMAT", "STATE_VERSION", "guest_image"]

STATE_FORMAT = "tremus-microvm"
STATE_VERSION = 1
KICK_SIGNAL = signal.SIGRTMIN + 3
_kick_handler_installed = False
#: Seconds between the gratuitous ARPs after the first, when the guest appears on a
#: new host (QEMU announces 5 times, 50 ms apart growing by 100 ms).
ANNOUNCE_GAPS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55)
_NOT_RUN = 1 << 40  # _park_if_requested: the vCPU was not run on release


def guest_image() -> bytes:
    """The guest binary the package build compiled."""
    try:
        return (resources.files("tremus.domains.microvm.guest") / "guest.bin").read_bytes()
    except FileNotFoundError:
        raise DomainError(
            "the micro-VM guest image is not built; install the package with `pip install -e .`"
        ) from None


def _require_native() -> Any:
    if native is None:
        raise DomainError("the native helper tremus._native is not built; run `pip install -e .`")
    global _kick_handler_installed
    if not _kick_handler_installed:
        native.install_kick_handler(KICK_SIGNAL)
        _kick_handler_installed = True
    return native


#: How long ``suspend`` spins for the vCPU to park (a kick usually takes a few hundred
#: microseconds here; KVM's emulator may notice it only at a timer tick), before it
#: looks in the event loop every ``_PARK_POLL`` s, for at most ``_PARK_TIMEOUT`` s.
_PARK_SPIN_NS = 3_000_000
_PARK_POLL = 0.0005
_PARK_TIMEOUT = 30.0
# _park_flags (the layout kvm.c's park uses): [0] "parked", set by the vCPU thread
# once parked, without the GIL (suspend spins on it); [1] "released", set by
# resume()/stop() before they write _resume_fd; [2] the registers are read, [3] the
# errno of a failed read; [4:8] the CPU suspend() ran on (int32, -1 unknown); [8] a
# pause is asked for (the vCPU parks in C at its next EINTR or wake-up); [9] stop;
# [10] the FPU state the last park kept is stale (registers set since: a park reads
# it again); [16:24] and [24:32] CLOCK_MONOTONIC ns the vCPU parked and left its
# park (int64).
_FLAG_WANTED = 8
_FLAG_STOP = 9
_FLAG_FPU_UNREAD = 10
_FLAGS_STOPPED_AT = 16
_FLAGS_RESUMED_AT = 24
#: How long a parked vCPU thread spins for its release before it sleeps.
_RELEASE_SPIN_NS = 2_000_000
#: How long save_state() waits for a parked vCPU thread to read its registers (three
#: ioctls: ~35 us; a thread preempted there may take a scheduler tick or two).
_STATE_WAIT_NS = 5_000_000_000


def _state_slices() -> tuple[tuple[str, int, int], ...]:
    """Where kvm_wait_run puts each part of the parked vCPU's registers."""
    slices, offset = [], 0
    for name, part in (("regs", _kvm.Regs), ("sregs", _kvm.Sregs), ("fpu", _kvm.Fpu)):
        slices.append((name, offset, offset + ctypes.sizeof(part)))
        offset += ctypes.sizeof(part)
    return tuple(slices)


_VCPU_STATE_SLICES = _state_slices()


@final
class MicroVM:
    """A KVM micro-VM implementing the ``Domain`` protocol.

    Build one with ``MicroVM.boot(config)`` or ``MicroVM.from_checkpoint(...)``, then
    ``await nursery.start(vm.run)``.
    """

    driver = "microvm"

    def __init__(self, config: MicroVMConfig, *, console: ConsoleSink | None = None,
                 kvm_path: str | None = None, restoring: bool = False) -> None:
        kvm_path = kvm_path or os.environ.get("TREMUS_KVM_DEVICE", "/dev/kvm")
        self._native = _require_native()
        self._cow: CopyOnWrite | None = None
        #: The vCPU's registers (kvm_regs, kvm_sregs, kvm_fpu) as the vCPU thread read
        #: them once parked: _park_flags[2] says they are there.
        self._parked_state = bytearray(_VCPU_STATE_SLICES[-1][2])
        self._parked_state_view = memoryview(self._parked_state)
        #: One packer for every save_state (a new one per pause cost ~25 us more).
        self._packer = msgpack.Packer()
        self._nursery: trio.Nursery | None = None
        #: Completed suspends: a disk write made while it reads N belongs to the
        #: epoch that suspend N + 1 closes (replication tags writes with it).
        self.suspends = 0
        self._config = config
        self._geometry = Geometry(config.memory, abi.PAGE_SIZE)
        self._console_sink = console
        try:
            self._kvm_fd = _kvm.open_kvm(kvm_path)
        except FileNotFoundError:
            raise DomainError(f"{kvm_path} does not exist: this host has no KVM") from None
        except PermissionError:
            raise DomainError(f"{kvm_path}: permission denied (run as root or join group kvm)") from None
        self._fds: list[int] = [self._kvm_fd]
        try:
            self._vm_fd = _kvm_create_vm(self._kvm_fd)
            self._fds.append(self._vm_fd)
            self._manual_dirty_log = _enable_manual_dirty_log(self._vm_fd)
            memory = guest_memory(config.memory)
            self._mmap = memory.mapping
            self._cow_unit_pages = memory.huge_page // abi.PAGE_SIZE if memory.mostly_huge else 1
            self._ram = memoryview(self._mmap)
            region = _kvm.UserspaceMemoryRegion(
                slot=0, flags=_kvm.KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=0,
                memory_size=config.memory,
                userspace_addr=self._native.buffer_address(self._mmap),
            )
            _kvm.ioctl_struct(self._vm_fd, _kvm.KVM_SET_USER_MEMORY_REGION, region)
            self._vcpu = Vcpu(self._kvm_fd, self._vm_fd)
        except OSError as exc:
            self.close()
            raise DomainError(f"cannot create the micro-VM: {exc}") from exc
        bitmap_bytes = (self._geometry.pages + 63) // 64 * 8
        self._kvm_bitmap = bytearray(bitmap_bytes)
        #: The last read's dirty pages: KVM's and the VMM's own writes together.
        self._dirty_bitmap = bytearray(bitmap_bytes)
        self._pfns = memoryview(prefaulted_buffer(self._geometry.pages * 8))
        #: The dirty pages last read (still in _kvm_bitmap, which only the next read
        #: rewrites, after it re-arms them) are still to be cleared in KVM.
        self._dirty_to_rearm = False
        self._vmm_bitmap = bytearray(bitmap_bytes)

        self.clock = Clock()
        self.idle = Idle(self.clock)
        self.console = Console(self._ram, self._emit_console)
        self.exit_port = ExitPort()
        self._devices: tuple[PortDevice, ...] = (self.clock, self.idle, self.console, self.exit_port)
        self._ports: dict[int, PortDevice] = {p: d for d in self._devices for p in d.ports}
        self._exits: dict[int, Callable[[], None]] = {
            _kvm.KVM_EXIT_IO: self._on_io,
            _kvm.KVM_EXIT_HLT: self._on_hlt,
        }

        self._cond = threading.Condition()
        self._want_pause = False
        self._want_stop = False
        self._parked = False
        self._halted = False
        self._wakeup = False
        self._thread_id: int | None = None
        #: The vCPU thread's kernel id and own affinity (``_keep_vcpu_off``).
        self._thread_tid: int | None = None
        self._thread_affinity: frozenset[int] = frozenset()
        self._kept_off = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._on_started: Callable[[], None] = lambda: None
        self._running = False
        self._closed = False
        #: perf_counter_ns() when resume() released the parked vCPU.
        self.released_at_ns = 0
        #: Time from the suspend request to the vCPU being parked, last suspend.
        self.kick_latency_ns = 0
        #: Time the last suspend spent before its kick having KVM drop its mappings of
        #: the pages written (copy-on-write at park: ``drop_secondary_mappings``).
        self.unmapped_before_kick_ns = 0
        # Ends a HLT wait early: written by suspend/stop/wake (the NIC's TAP fd too).
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(self._event_fd)
        # Written by resume()/stop() to wake a parked vCPU that sleeps (_park_flags).
        self._resume_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(self._resume_fd)
        self._park_flags = bytearray(32)  # see _FLAG_WANTED
        self._park_flags[4:8] = struct.pack("=i", -1)
        self._park_flags[_FLAG_FPU_UNREAD] = 1
        self._vcpu.on_registers_set = self._forget_parked_fpu
        #: Work for the parked vCPU thread, done on its CPU while the pause goes on
        #: (``kvm_wait_run``): a slot of its own, page-aligned.
        self._parked_work = mmap.mmap(-1, mmap.PAGESIZE)
        #: How the vCPU thread parks in C (``kvm_run_parking``, ``poll_or_park``).
        self._park = (self._resume_fd, self._park_flags, _RELEASE_SPIN_NS, self._vcpu.fd,
                      self._parked_state, self._parked_work, self._vcpu.run)
        #: The paravirtual NIC (``tap=``), or None.
        self.nic: Nic | None = None
        if config.tap is not None:
            try:
                tap = Tap.open(config.tap, bridge=config.bridge)
            except BaseException:
                self.close()
                raise
            ip = config.boot_info().ip
            self.nic = Nic(tap, self._ram, self.write_ram, mac=config.mac_bytes, ip=ip)
            self._devices += (self.nic,)
            self._ports.update(dict.fromkeys(self.nic.ports, self.nic))
        #: The paravirtual block device (``disk=``), or None.
        self.disk: Disk | None = None
        if config.disk is not None:
            try:
                self._open_disk(config, restoring)
            except BaseException:
                self.close()
                raise

    def _open_disk(self, config: MicroVMConfig, restoring: bool) -> None:
        assert config.disk is not None
        # A restored machine opens the image its configuration names (a backup points
        # it at its replica) and never creates one.
        disk = Disk.open(config.disk, self._ram, self.mark_dirty, size=config.disk_size,
                         create=not restoring)
        self.disk = disk
        if config.workload == "diskwrite" and config.io_size > disk.size:
            raise DomainError(f"disk image {config.disk} ({disk.size} bytes) is smaller than "
                              f"io_size={config.io_size}")
        # The configuration carries the image's actual size (the boot info's
        # disk_sectors; a backup checks its replica against it).
        self._config = dataclasses.replace(config, disk_size=disk.size)
        self._devices += (disk,)
        self._ports.update(dict.fromkeys(disk.ports, disk))

    # -- construction ---------------------------------------------------------------
    @classmethod
    def boot(cls, config: MicroVMConfig, *, console: ConsoleSink | None = None) -> MicroVM:
        """A fresh machine: page tables, boot info and the guest image written to RAM."""
        vm = cls(config, console=console)
        try:
            vm._load_fresh()
        except BaseException:
            vm.close()
            raise
        return vm

    @classmethod
    def from_checkpoint(cls, config: MicroVMConfig, ram: memoryview | bytes, state: bytes, *,
                        console: ConsoleSink | None = None) -> MicroVM:
        """A machine rebuilt from a RAM image and ``save_state()`` bytes (failover)."""
        if len(ram) != config.memory:
            raise DomainError(f"RAM image is {len(ram)} bytes, the configuration says {config.memory}")
        vm = cls(config, console=console, restoring=True)
        try:
            vm._ram[:] = ram
            vm._load_state(state)
        except BaseException:
            vm.close()
            raise
        return vm

    def _load_fresh(self) -> None:
        tables = bytearray(0x6000)  # PML4, PDPT and four PDs at 0x1000..0x6fff
        struct.pack_into("<Q", tables, 0, abi.PDPT_ADDR | 3)
        for i in range(4):
            struct.pack_into("<Q", tables, 0x1000 + 8 * i, (abi.PD_ADDR + 0x1000 * i) | 3)
            for j in range(512):
                struct.pack_into("<Q", tables, 0x2000 + 0x1000 * i + 8 * j,
                                 ((i << 30) | (j << 21)) | 0x83)
        self.write_ram(abi.PML4_ADDR, tables)
        self.write_ram(abi.BOOT_INFO_ADDR, self._config.boot_info().pack())
        image = guest_image()
        if abi.IMAGE_ADDR + len(image) > min(self._config.memory, abi.WORKING_SET_ADDR):
            raise DomainError("the guest image does not fit below the working set")
        self.write_ram(abi.IMAGE_ADDR, image)
        self._vcpu.boot_long_mode(abi.IMAGE_ADDR)

    def _load_state(self, blob: bytes) -> None:
        try:
            state = msgpack.unpackb(blob, raw=False)
            if state.get("format") != STATE_FORMAT:
                raise DomainError(f"not a micro-VM state (format {state.get('format')!r})")
            if state.get("version") != STATE_VERSION:
                raise DomainError(f"micro-VM state version {state.get('version')} is not "
                                  f"supported (this build reads {STATE_VERSION})")
            has_disk = "disk" in state["devices"]
            if has_disk != (self.disk is not None):
                raise DomainError(
                    "the checkpoint's machine has a disk: give its image as disk=PATH in the "
                    "configuration" if has_disk else
                    f"the checkpoint's machine has no disk, the configuration gives "
                    f"disk={self._config.disk}")
            self._vcpu.restore(state["vcpu"])
            for device in self._devices:
                device.restore(state["devices"][device.name])
            self._halted = bool(state["halted"])
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise DomainError(f"corrupt micro-VM state: {exc!r}") from exc
        except OSError as exc:
            raise DomainError(f"KVM refused the saved vCPU state: {exc}") from exc

    # -- Domain protocol ------------------------------------------------------------
    @property
    def config(self) -> Mapping[str, Any]:
        return self._config.to_dict()

    @property
    def microvm_config(self) -> MicroVMConfig:
        return self._config

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def ram(self) -> memoryview:
        return self._ram

    @property
    def suspended(self) -> bool:
        return self._parked

    @property
    def stopped_at_ns(self) -> int:
        """perf_counter_ns() when the vCPU last parked: as it left KVM_RUN or woke
        from a HLT, the pause's steps all after it."""
        return int(struct.unpack_from("=q", self._park_flags, _FLAGS_STOPPED_AT)[0])

    @property
    def resumed_at_ns(self) -> int:
        """perf_counter_ns() when the vCPU last left its park, about to run the guest."""
        return int(struct.unpack_from("=q", self._park_flags, _FLAGS_RESUMED_AT)[0])

    @property
    def console_sink(self) -> ConsoleSink | None:
        """Where the guest's console lines go (called in the Trio thread), if anywhere."""
        return self._console_sink

    def write_ram(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write into guest RAM as a device would (DMA); the pages become dirty."""
        end = addr + len(data)
        if addr < 0 or end > self._config.memory:
            raise DomainError(f"VMM write {addr:#x}..{end:#x} outside guest RAM")
        # With the GIL released: under copy-on-write capture a write to a page not
        # yet copied waits for the copying thread, which must not need the GIL.
        self._native.memcpy(self._ram[addr:end], data)
        self.mark_dirty(addr, len(data))

    def mark_dirty(self, addr: int, length: int) -> None:
        """Add guest RAM the VMM wrote in place (a device's DMA) to the dirty set."""
        if length <= 0:
            return
        for pfn in range(addr // abi.PAGE_SIZE, (addr + length - 1) // abi.PAGE_SIZE + 1):
            self._vmm_bitmap[pfn >> 3] |= 1 << (pfn & 7)

    def read_and_clear_dirty(self) -> memoryview:
        """The pages written since the last call (a view valid until the next call:
        its buffer is reused, allocated once). With manual dirty-log protection
        KVM only reports them here; they are cleared and write-protected again
        (the per-page part) by ``resume``, or after it by copy-on-write capture,
        which holds every one of them protected until then. A capture posted for
        this pause (copy-on-write's ``at_park``) is undone first: these pages are
        for copying in the pause."""
        self._abandon_capture()
        self.read_dirty_bitmap()
        return self.dirty_pfns()

    def read_dirty_bitmap(self) -> tuple[memoryview, int]:
        """``read_and_clear_dirty`` without the list: the pages as a bitmap (bit ``i``
        of little-endian u64 word ``i // 64`` is page ``i``) and how many there are,
        valid until the next read. Copy-on-write protects them from it in the
        pause; ``dirty_pfns`` lists them after the resume."""
        cow = self._cow
        if cow is not None and cow.posted_at_park:
            # Read as the vCPU parked, and protected by now if copy-on-write takes them.
            count = cow.claim_at_park()
        else:
            self._rearm_dirty_log()  # a read that no resume followed
            count = self._native.get_dirty_log(self._vm_fd, 0, self._kvm_bitmap,
                                               self._vmm_bitmap, self._dirty_bitmap)
        self._dirty_to_rearm = self._manual_dirty_log
        return memoryview(self._dirty_bitmap), count

    def _post_capture(self) -> None:
        """Before the kick, if copy-on-write asks for it (``at_park``): the vCPU
        thread reads the dirty log and write-protects the dirty pages as it parks,
        the longest steps of the pause under way before this thread has woken. Only
        the vCPU thread writes guest RAM (device emulation runs on it), so none is
        written between that read and the resume."""
        cow = self._cow
        self.unmapped_before_kick_ns = 0
        if cow is None or not cow.at_park or not cow.idle:
            return
        self._rearm_dirty_log()
        if self._manual_dirty_log:
            # The pages written since the last capture, which the capture will
            # protect: KVM walks its map of them now, while the guest runs, and the
            # protect in the pause finds that walk's data in the cache. (With manual
            # protection reading the log clears nothing: the capture reads it again.)
            started = time.perf_counter_ns()
            try:
                self._native.get_dirty_log(self._vm_fd, 0, self._kvm_bitmap)
                cow.drop_secondary_mappings(self._kvm_bitmap)
            except OSError:
                pass  # only the protect's speed is lost; the capture reports a bad log
            else:
                self.unmapped_before_kick_ns = time.perf_counter_ns() - started
        cow.post_at_park(self._vm_fd, 0, self._kvm_bitmap, self._vmm_bitmap, self._dirty_bitmap)

    def _abandon_capture(self) -> None:
        """A capture posted for this pause that nobody claimed: nothing stays
        protected, and its pages count as dirty at the next read (KVM's bits are
        still set; the VMM's were merged into the bitmap, and go back)."""
        cow = self._cow
        if cow is None or not cow.posted_at_park:
            return
        try:
            count = cow.claim_at_park()
        except OSError:
            return  # the dirty log was not read: nothing changed
        if count >= cow.min_pages:
            try:
                cow.release_all()
            except OSError:
                pass  # the protect failed, and lifted what it had set
        merged = (int.from_bytes(self._dirty_bitmap, "little")
                  | int.from_bytes(self._vmm_bitmap, "little"))
        self._vmm_bitmap[:] = merged.to_bytes(len(self._vmm_bitmap), "little")

    def dirty_pfns(self) -> memoryview:
        """The pfns of the last ``read_dirty_bitmap``, ascending (valid until the
        next read; any thread, the guest running or not)."""
        count = impl.dirty_bitmap_to_pfns_into(self._dirty_bitmap, None, self._pfns)
        return self._pfns[: 8 * count].cast("Q")

    def _rearm_dirty_log(self) -> None:
        """Clear the pages last read from the dirty log, so that their next write is
        seen (called by ``resume`` or, off the pause, by copy-on-write capture)."""
        if self._dirty_to_rearm:
            self._dirty_to_rearm = False
            self._native.clear_dirty_log(self._vm_fd, 0, self._kvm_bitmap,
                                         self._geometry.pages)

    def copy_on_write(self) -> CopyOnWrite:
        """Copy-on-write capture over this machine's RAM (``tremus._cow``), opened on
        first use; DomainError if this host cannot write-protect it."""
        if self._cow is None:
            try:
                self._cow = CopyOnWrite(self._mmap, unit_pages=self._cow_unit_pages,
                                        parked_work=self._parked_work,
                                        rearm=self._rearm_dirty_log)
            except OSError as exc:
                raise DomainError(f"userfaultfd write-protect: {exc}") from exc
        return self._cow

    def save_state(self) -> bytes:
        return self.state_snapshot()()

    def state_snapshot(self) -> Callable[[], bytes]:
        """The vCPU and device state as they are now (suspended), encoded as
        ``save_state`` would when the returned function is called: the pause only
        takes the snapshot (every device's ``save`` returns values, not views of
        itself), the encoding can wait until the guest runs again."""
        if not self._parked and self._running:
            raise DomainError("save_state() needs a suspended domain")
        # As little as can be in the pause (each Python step there runs with cold
        # caches): the parked registers are copied whole, split when encoded.
        registers = self._parked_registers() if self._parked else None
        vcpu = self._vcpu.save() if registers is None else None
        halted = self._halted
        devices = [(d.name, d.save()) for d in self._devices]
        pack = self._packer.pack

        def encode() -> bytes:
            return pack({
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "vcpu": vcpu if registers is None else {
                    name: registers[start:end] for name, start, end in _VCPU_STATE_SLICES},
                "halted": halted,
                "devices": dict(devices),
            })

        return encode

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the guest until ``stop()``; DomainError if the guest stops by itself."""
        if self._running or self._closed:
            raise DomainError("this micro-VM has already run")
        self._running = True
        self._token = trio.lowlevel.current_trio_token()
        started = trio.Event()
        self._on_started = started.set
        try:
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stop_when_cancelled)
                    nursery.start_soon(self._run_vcpu_thread, nursery.cancel_scope)
                    await started.wait()
                    self._nursery = nursery
                    task_status.started()
        finally:
            self._nursery = None
            self._running = False
            self._close_kvm()
        if self.exit_port.code is not None:
            raise DomainError(f"the guest stopped itself with code {self.exit_port.code}")

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stop()

    async def _run_vcpu_thread(self, scope: trio.CancelScope) -> None:
        try:
            await trio.to_thread.run_sync(self._thread_main, abandon_on_cancel=False)
        except OSError as exc:
            raise DomainError(f"vCPU failed: {exc}") from exc
        scope.cancel()

    async def suspend(self) -> None:
        if self._parked:
            return
        if not self._running:
            raise DomainError("suspend() of a micro-VM that is not running")
        requested = time.perf_counter_ns()
        self._post_capture()
        flags = self._park_flags
        with self._cond:
            self._want_pause = True
            flags[0] = 0
            flags[_FLAG_WANTED] = 1
            # Where this thread runs: the vCPU thread is kept off this CPU for the
            # pause (kvm_wait_run moves it, or sleeps, if it parks here all the same).
            cpu = self._native.current_cpu()
            struct.pack_into("=i", flags, 4, cpu)
            self._keep_vcpu_off(cpu)
            self._cond.notify_all()
            thread_id = self._thread_id
        self._poke()
        if thread_id is not None:
            self._native.kick(thread_id, self._vcpu.run, KICK_SIGNAL)
        # The vCPU parks in C as it leaves KVM_RUN (or wakes from a HLT), usually
        # within a few hundred microseconds of the kick: wait for it right here, in
        # this thread, rather than through the event loop, whose wake-up would
        # lengthen every pause by as much again. If it takes longer, look from the
        # event loop.
        if not self._native.spin_until_set(flags, _PARK_SPIN_NS):
            with trio.move_on_after(_PARK_TIMEOUT):
                while not flags[0] and self._running and not self._want_stop:
                    await trio.sleep(_PARK_POLL)
        if not self._running or self._want_stop:
            raise DomainError("the micro-VM stopped while being suspended")
        if not flags[0]:
            raise DomainError(f"the vCPU did not stop within {_PARK_TIMEOUT:g} s of the kick")
        self._parked = True
        self.kick_latency_ns = self.stopped_at_ns - requested
        # Parked: every disk write so far happened before this suspend.
        self.suspends += 1

    async def resume(self) -> None:
        # Work posted to the parked vCPU thread (copy-on-write's write-protect) is
        # done by it before it lets the guest run: no need to wait for it here.
        self._abandon_capture()
        if self._dirty_to_rearm and not (self._cow is not None and self._cow.rearm_due):
            self._rearm_dirty_log()
        with self._cond:
            self._want_pause = False
            self._park_flags[_FLAG_WANTED] = 0
            # Released: the vCPU thread enters KVM_RUN straight from its park, and
            # leaves that call only at the guest's next exit. Until then it is
            # running, and a suspend must stop it again, not find it "parked".
            self._parked = False
            # Stamped as the flag is set: a spinning vCPU thread is gone from its park
            # before the eventfd write below has returned.
            self.released_at_ns = time.perf_counter_ns()
            self._park_flags[1] = 1
            if not self._closed:
                os.eventfd_write(self._resume_fd, 1)
            self._let_vcpu_anywhere()
        await trio.lowlevel.checkpoint()

    def stop(self) -> None:
        with self._cond:
            self._want_stop = True
            self._parked = False
            self._park_flags[_FLAG_STOP] = 1  # before the kick: see kvm_run_parking
            self._cond.notify_all()
            thread_id = self._thread_id
        self._poke()
        if thread_id is not None and not self._closed:
            try:
                # immediate_exit before the release below: a parked vCPU that is let
                # go into KVM_RUN leaves it at once.
                self._native.kick(thread_id, self._vcpu.run, KICK_SIGNAL)
            except (ValueError, OSError):
                pass  # the thread already left
        with self._cond:
            self._park_flags[1] = 1
            if not self._closed:
                os.eventfd_write(self._resume_fd, 1)

    def wake(self) -> None:
        """End a HLT early (a device has something for the guest)."""
        with self._cond:
            self._wakeup = True
            self._cond.notify_all()
        self._poke()

    def _poke(self) -> None:
        with self._cond:  # not while _close_kvm closes the descriptor
            if not self._closed:
                os.eventfd_write(self._event_fd, 1)

    @property
    def disk_paths(self) -> tuple[str, ...]:
        """The images this machine runs on."""
        return () if self.disk is None else (self.disk.path,)

    def announce(self) -> bool:
        """Announce the guest's IP and MAC on its TAP (gratuitous ARP), now and then
        again over the next two seconds while it runs (QEMU's announce rounds).

        Call it when the machine appears on a new host (failover), so that bridges
        and neighbours learn where it is now — repeatedly, so that a frame from a
        stale copy elsewhere cannot leave a switch's MAC entry pointing there. False
        if it has no NIC or IP address.
        """
        if self.nic is None or not self.nic.announce():
            return False
        if self._nursery is not None:
            self._nursery.start_soon(self._announce_rounds, self.nic)
        return True

    @staticmethod
    async def _announce_rounds(nic: Nic) -> None:
        for gap in ANNOUNCE_GAPS:
            await trio.sleep(gap)
            nic.announce()

    def close(self) -> None:
        """Release KVM and the RAM mapping (``ram`` is invalid afterwards)."""
        self._close_kvm()
        if self._cow is not None:
            self._cow.close()
        try:
            self._ram.release()
            self._mmap.close()
        except (AttributeError, BufferError):
            pass

    def _close_kvm(self) -> None:
        if self._closed:
            return
        cond = getattr(self, "_cond", None)
        if cond is None:
            self._closed = True
        else:
            with cond:  # _poke() must not write to a closed descriptor
                self._closed = True
        nic: Nic | None = getattr(self, "nic", None)
        if nic is not None:
            nic.close()
        disk: Disk | None = getattr(self, "disk", None)
        if disk is not None:
            disk.close()
        if hasattr(self, "_vcpu"):
            self._vcpu.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    # -- the vCPU thread ------------------------------------------------------------
    def _thread_main(self) -> None:
        with self._cond:
            self._thread_id = threading.get_ident()
            self._thread_tid = threading.get_native_id()
            self._thread_affinity = frozenset(os.sched_getaffinity(0))
        assert self._token is not None
        self._token.run_sync_soon(self._on_started)
        try:
            self._vcpu_loop()
        finally:
            with self._cond:
                self._let_vcpu_anywhere()  # a worker thread Trio may reuse
                self._thread_id = None
                self._thread_tid = None

    def _vcpu_loop(self) -> None:
        run_vcpu = self._native.kvm_run_parking
        fd, park = self._vcpu.fd, self._park
        while True:
            rc = self._park_if_requested()
            if rc is None:
                return
            if rc is _NOT_RUN:
                if self._halted and not self._wait_halted():
                    continue
                rc = run_vcpu(fd, park)
            if rc == -errno.EINTR:
                self._vcpu.clear_immediate_exit()
                continue
            if rc < 0:
                raise OSError(-rc, f"KVM_RUN: {os.strerror(-rc)}")
            reason = self._vcpu.exit_reason
            handler = self._exits.get(reason)
            if handler is None:
                raise DomainError(
                    f"vCPU exit {_kvm.EXIT_NAMES.get(reason, reason)} is not handled "
                    f"(guest crashed?)"
                )
            handler()
            if self.exit_port.code is not None:
                return

    def _keep_vcpu_off(self, cpu: int) -> None:
        """Before the kick (``_cond`` held): let the vCPU thread run anywhere it may
        but on ``cpu``, the pausing thread's. The scheduler put the two together in
        about 4 pauses in 10 here (a thread woken from HLT lands by its waker), and
        the pause then waited for the vCPU thread to leave (~50 us)."""
        tid, allowed = self._thread_tid, self._thread_affinity
        if tid is None or cpu not in allowed or len(allowed) < 2 or self._kept_off:
            return
        try:
            os.sched_setaffinity(tid, allowed - {cpu})
        except OSError:
            return  # the thread is gone, or may not be moved: kvm_wait_run copes
        self._kept_off = True

    def _let_vcpu_anywhere(self) -> None:
        """After the release (``_cond`` held): the vCPU thread's own affinity again."""
        if self._kept_off and self._thread_tid is not None:
            try:
                os.sched_setaffinity(self._thread_tid, self._thread_affinity)
            except OSError:
                pass
        self._kept_off = False

    def _parked_registers(self) -> bytes:
        """The registers the parked vCPU thread reads right after it parks (regs,
        sregs and fpu back to back: ``_VCPU_STATE_SLICES``)."""
        if not self._park_flags[2] and not self._native.spin_until_set(
                memoryview(self._park_flags)[2:3], _STATE_WAIT_NS):
            raise DomainError(f"the parked vCPU did not save its registers within "
                              f"{_STATE_WAIT_NS / 1e9:g} s")
        if self._park_flags[3]:
            raise DomainError(f"reading the parked vCPU's registers: "
                              f"{os.strerror(self._park_flags[3])}")
        return self._parked_state_view.tobytes()

    def _park_if_requested(self) -> int | None:
        """Park, in Python, if a pause was asked for while this thread was between
        KVM_RUN calls (the usual parks happen in C: ``kvm_run_parking``,
        ``poll_or_park``). None: stop. Otherwise the result of the KVM_RUN that the
        release entered directly, or ``_NOT_RUN``.

        A parked vCPU waits in C, without the GIL, and enters KVM_RUN the moment
        ``resume()`` sets the release flag: the guest's pause ends then, not
        whenever this thread next gets the interpreter lock. The flag decides, so a
        write to the resume eventfd left from an earlier park releases nothing.
        """
        with self._cond:
            if self._want_stop:
                return None
            if not self._want_pause:
                return _NOT_RUN
            self._announce_parked()
        while True:
            run_fd = -1 if self._halted else self._vcpu.fd
            rc, _ = self._native.kvm_wait_run(
                self._resume_fd, run_fd, self._park_flags, _RELEASE_SPIN_NS,
                self._vcpu.fd, self._parked_state, self._parked_work, self._vcpu.run)
            with self._cond:
                if self._want_stop:
                    return None
                if self._want_pause and run_fd < 0:
                    # Released, and asked to pause again before the guest ran (it
                    # waits in HLT): it is parked anew, and the new suspend is told.
                    self._announce_parked()
                    continue
            return _NOT_RUN if run_fd < 0 else rc

    def _forget_parked_fpu(self) -> None:
        self._park_flags[_FLAG_FPU_UNREAD] = 1

    def _announce_parked(self) -> None:
        """About to park in Python (``_cond`` held): what a park in C does as it begins."""
        struct.pack_into("=q", self._park_flags, _FLAGS_STOPPED_AT, time.perf_counter_ns())
        self._park_flags[1] = 0
        # The registers are read by this thread, the one that runs the vCPU (a vCPU
        # ioctl from any other thread first moves the vCPU's context to it, which made
        # save_state() ~80 us slower inside the pause), once parked, in kvm_wait_run:
        # the pause goes on meanwhile, and save_state() waits for them (flags[2]).
        self._park_flags[2] = 0

    def _wait_halted(self) -> bool:
        """Sleep through a HLT until its deadline, a wakeup or a frame for the NIC;
        False if a pause or stop interrupted it.

        The wait is a poll() on the eventfd that suspend/stop/wake write (after
        setting their flag, so a flag set after the check below still ends the poll)
        and on the NIC's TAP descriptor.
        """
        nic_fd = self.nic.wait_fd if self.nic is not None else None
        fds = (self._event_fd,) if nic_fd is None else (self._event_fd, nic_fd)
        while True:
            with self._cond:
                if self._want_pause or self._want_stop:
                    return False
                remaining = self.idle.remaining()
                if self._wakeup or (remaining is not None and remaining <= 0):
                    self._wakeup = False
                    self._halted = False
                    self.idle.deadline = None
                    return True
            timeout = -1 if remaining is None else max(1, math.ceil(remaining * 1000))
            # A suspend that finds the guest here is served by a park in C.
            ready = self._native.poll_or_park(fds, timeout, self._park)
            if ready < 0:
                return False
            if ready & 1:
                try:
                    os.eventfd_read(self._event_fd)
                except BlockingIOError:
                    pass
            if ready & 2 and self.nic is not None:  # a frame for a guest waiting for one
                self.nic.rx_armed = False
                with self._cond:
                    self._wakeup = True

    def _on_io(self) -> None:
        direction, size, port, count, offset = self._vcpu.io_exit()
        device = self._ports.get(port)
        if device is None or count != 1:
            raise DomainError(f"guest I/O on unknown port {port:#x} (size {size}, count {count})")
        run = self._vcpu.run
        if direction == _kvm.KVM_EXIT_IO_OUT:
            device.io_out(port, int.from_bytes(run[offset : offset + size], "little"))
        else:
            value = device.io_in(port) & ((1 << (8 * size)) - 1)
            run[offset : offset + size] = value.to_bytes(size, "little")

    def _on_hlt(self) -> None:
        self._halted = True

    def _emit_console(self, line: str) -> None:
        sink = self._console_sink
        if sink is not None and self._token is not None:
            self._token.run_sync_soon(sink, line)


def _enable_manual_dirty_log(vm_fd: int) -> bool:
    """Manual dirty-log protection: KVM_GET_DIRTY_LOG then only reports, and
    write-protecting the pages again is a separate call (KVM_CLEAR_DIRTY_LOG) that
    need not happen inside the pause. False on a kernel without it (Linux < 5.3)."""
    cap = _kvm.EnableCap(cap=_kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    cap.args[0] = _kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    try:
        _kvm.ioctl_struct(vm_fd, _kvm.KVM_ENABLE_CAP, cap)
    except OSError:
        return False
    return True


def _kvm_create_vm(kvm_fd: int) -> int:
    import fcntl

    vm_fd = fcntl.ioctl(kvm_fd, _kvm.KVM_CREATE_VM, 0)
    try:
        fcntl.ioctl(vm_fd, _kvm.KVM_SET_TSS_ADDR, 0x7FFBD000)
    except OSError:
        pass  # not needed on every host (only for real-mode emulation on VMX)
    return vm_fd
