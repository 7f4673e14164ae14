"""KVM ioctl numbers and structures (x86-64), from <linux/kvm.h>."""

from __future__ import annotations

import ctypes
import fcntl
import os

KVM_API_VERSION = 12

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_GET_FPU = 0x81A0AE8C
KVM_SET_FPU = 0x41A0AE8D

KVM_ENABLE_CAP = 0x4068AEA3

KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1

KVM_MEM_LOG_DIRTY_PAGES = 1

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_NAMES = {
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN (triple fault)",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

# struct kvm_run offsets
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = 32  # u8 direction, u8 size, u16 port, u32 count, u64 data_offset


class Regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [
        ("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
        ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
        ("gdt", DTable), ("idt", DTable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class Fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", ctypes.c_uint8 * 128), ("fcw", ctypes.c_uint16), ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8), ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64), ("last_dp", ctypes.c_uint64),
        ("xmm", ctypes.c_uint8 * 256), ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32),
    ]


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


assert ctypes.sizeof(Regs) == 144
assert ctypes.sizeof(Sregs) == 312
assert ctypes.sizeof(Fpu) == 416
assert ctypes.sizeof(UserspaceMemoryRegion) == 32


class EnableCap(ctypes.Structure):
    _fields_ = [
        ("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64),
    ]


def ioctl_struct(fd: int, request: int, struct: ctypes.Structure) -> None:
    fcntl.ioctl(fd, request, struct, True)


def open_kvm(path: str = "/dev/kvm") -> int:
    """Open the KVM device and check its API version."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            raise OSError(f"{path}: KVM API version {version}, expected {KVM_API_VERSION}")
    except BaseException:
        os.close(fd)
        raise
    return fd
