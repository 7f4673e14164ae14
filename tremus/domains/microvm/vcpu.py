"""One KVM vCPU: its file descriptor, its kvm_run mapping and its register state."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from typing import final

from tremus.accel import native
from tremus.domains.microvm import _kvm, abi

assert native is not None, "the micro-VM needs the native helper"
native_get_state = native.kvm_get_vcpu_state
native_sync_regs = native.kvm_sync_regs

_IO = struct.Struct("<BBHIQ")


@final
class Vcpu:
    """A vCPU of ``vm_fd``; the run loop that drives it lives in ``MicroVM``."""

    def __init__(self, kvm_fd: int, vm_fd: int, index: int = 0) -> None:
        self.fd = fcntl.ioctl(vm_fd, _kvm.KVM_CREATE_VCPU, index)
        size = fcntl.ioctl(kvm_fd, _kvm.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._vm_fd = vm_fd
        #: KVM stores the general and special registers in ``run`` as each KVM_RUN
        #: returns: a park reads them from there (one vCPU ioctl fewer, ~7 us each).
        self.registers_in_run = self._keep_registers_in_run()
        #: Called whenever registers are set by ioctl (a park's copy of them is stale).
        self.on_registers_set: Callable[[], None] = lambda: None

    def _keep_registers_in_run(self) -> bool:
        return bool(native_sync_regs(self._vm_fd, self.run))

    def close(self) -> None:
        try:
            self.run.close()
        except BufferError:  # a kick still holds it; the fd close below still frees KVM
            pass
        os.close(self.fd)

    @property
    def exit_reason(self) -> int:
        return int.from_bytes(self.run[_kvm.RUN_EXIT_REASON : _kvm.RUN_EXIT_REASON + 4], "little")

    def io_exit(self) -> tuple[int, int, int, int, int]:
        """(direction, size, port, count, data_offset) of a KVM_EXIT_IO."""
        return _IO.unpack_from(self.run, _kvm.RUN_IO)

    def clear_immediate_exit(self) -> None:
        self.run[_kvm.RUN_IMMEDIATE_EXIT] = 0

    def get(self, request: int, struct_type: type[ctypes.Structure]) -> ctypes.Structure:
        value = struct_type()
        _kvm.ioctl_struct(self.fd, request, value)
        return value

    def set(self, request: int, value: ctypes.Structure) -> None:
        _kvm.ioctl_struct(self.fd, request, value)
        if self.registers_in_run:
            self._keep_registers_in_run()  # the copy in run is stale until the next run
        self.on_registers_set()

    def boot_long_mode(self, entry: int) -> None:
        """Registers for a 64-bit guest entered at ``entry`` with paging already set up."""
        sregs = self.get(_kvm.KVM_GET_SREGS, _kvm.Sregs)
        assert isinstance(sregs, _kvm.Sregs)
        code = _kvm.Segment(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1,
                            dpl=0, db=0, s=1, l=1, g=1)
        data = _kvm.Segment(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1,
                            dpl=0, db=1, s=1, l=0, g=1)
        sregs.cs = code
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        sregs.cr3 = abi.PML4_ADDR
        sregs.cr4 = 0x20  # PAE (no OSFXSR, no OSXSAVE: SSE and XSAVE fault)
        # EM: x87 and MMX fault too. The guest is built without them
        # (-mgeneral-regs-only), so its FPU state never changes: a park need not read it.
        sregs.cr0 = 0x80050037  # PG | AM | WP | NE | ET | EM | MP | PE
        sregs.efer = 0x500  # LME | LMA
        self.set(_kvm.KVM_SET_SREGS, sregs)
        regs = _kvm.Regs(rip=entry, rsp=abi.STACK_TOP, rflags=2)
        self.set(_kvm.KVM_SET_REGS, regs)

    def save(self) -> dict[str, bytes]:
        regs, sregs, fpu = native_get_state(self.fd)
        return {"regs": regs, "sregs": sregs, "fpu": fpu}

    def restore(self, state: dict[str, bytes]) -> None:
        for key, struct_type, request in (
            ("sregs", _kvm.Sregs, _kvm.KVM_SET_SREGS),
            ("regs", _kvm.Regs, _kvm.KVM_SET_REGS),
            ("fpu", _kvm.Fpu, _kvm.KVM_SET_FPU),
        ):
            blob = state[key]
            if len(blob) != ctypes.sizeof(struct_type):
                raise ValueError(f"vCPU state {key}: {len(blob)} bytes, expected "
                                 f"{ctypes.sizeof(struct_type)}")
            self.set(request, struct_type.from_buffer_copy(blob))
