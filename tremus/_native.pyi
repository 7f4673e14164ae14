"""Type stub and contract of the C extension ``tremus._native``.

``tremus._pyfallback`` implements the memory functions (everything above the KVM
section) with identical behaviour in pure Python; ``tremus.accel.impl`` is the one
in use (native unless ``TREMUS_PURE_PYTHON=1`` or the extension is missing).
Every function that loops over memory releases the GIL.
"""

from typing import Any as Buffer  # collections.abc.Buffer is Python 3.12+
from typing import overload

PAGE_SIZE: int  # 4096

# -- memory ---------------------------------------------------------------------------
def dirty_bitmap_to_pfns(bitmap: Buffer, extra: bytearray | None = None) -> bytes:
    """Set bits of a KVM dirty bitmap (little-endian u64 words: pfn = byte*8 + bit),
    OR-ed with ``extra`` (same layout, same length) when given, as ascending
    little-endian u64 pfns. ``extra`` is zeroed afterwards."""

def dirty_bitmap_to_pfns_into(bitmap: Buffer, extra: bytearray | None, out: Buffer) -> int:
    """``dirty_bitmap_to_pfns`` into ``out`` (writable, 8 bytes a pfn); returns how
    many pfns it wrote. ValueError if they do not fit."""

def dirty_bitmap_merge(bitmap: Buffer, extra: bytearray | None, out: Buffer) -> int:
    """``out`` (writable, as long as ``bitmap``) = ``bitmap`` OR ``extra``; ``extra``
    is zeroed; returns how many bits are set (one epoch's dirty pages)."""

def pfns_ascending_below(pfns: Buffer, limit: int, after: int = -1) -> bool:
    """Every pfn (little-endian u64) is below ``limit``, the first is above ``after``
    (-1: any), and each is above the one before it. ValueError if ``pfns`` is not a
    whole number of u64."""

def gather(src: Buffer, pfns: Buffer, dst: Buffer, page_size: int = 4096,
           checksums: Buffer | None = None, batch_pages: int = 0) -> int:
    """Copy page ``pfns[i]`` of ``src`` to ``dst[i*page_size:]``; returns bytes copied.
    ``pfns`` is little-endian u64. ValueError if a pfn is out of ``src`` or ``dst`` is
    too small. ``dst`` must be writable. With ``checksums`` (writable, 8 bytes a
    frame), the checksum of each frame of ``batch_pages`` copied pages, as a PAGES
    frame of them carries it: hash64(pages, seed=hash64(pfns)), each page hashed
    right after its copy, in the cache."""

def scatter(dst: Buffer, pfns: Buffer, src: Buffer, page_size: int = 4096) -> int:
    """Inverse of gather: ``src[i*page_size:]`` to page ``pfns[i]`` of ``dst``."""

def hash64(data: Buffer, seed: int = 0) -> int:
    """A fast non-cryptographic 64-bit checksum (frame checksums, RAM digests)."""

class Hash64:
    """``hash64`` computed piece by piece: ``Hash64(seed)`` fed the pieces of a buffer
    with ``update`` gives ``hash64(buffer, seed)`` from ``intdigest()``."""

    def __init__(self, seed: int = 0) -> None: ...
    def update(self, data: Buffer) -> None: ...
    def intdigest(self) -> int: ...

def delta_encode(
    pages: Buffer, pfns: Buffer, cache_tags: Buffer, cache_data: Buffer, out: Buffer,
    page_size: int = 4096,
) -> int:
    """Page-delta coding against a direct-mapped cache of previously sent pages.

    ``cache_tags`` is a writable array of u64, one per slot (0 = empty, else pfn+1);
    ``cache_data`` is ``slots * page_size`` writable bytes. Page i (``pages[i*ps:]``,
    pfn ``pfns[i]``) goes to slot ``pfn % slots``. Output per page, concatenated:
    one kind byte, then: RAW(0) ``page_size`` bytes | ZERO(1) nothing | SAME(2) nothing |
    DELTA(3) u16 nruns, then nruns x (u16 skip_words, u16 len_words, len_words*4 bytes),
    words being 32-bit, skips counted from the end of the previous run.
    DELTA/SAME only against a cache hit; RAW when a delta would not be smaller.
    The cache is updated with every page. ``out`` needs ``n * (page_size + 1)`` bytes
    (a worst case delta is never emitted). Returns bytes written."""

def delta_decode(
    encoded: Buffer, pfns: Buffer, reference: Buffer, out: Buffer, page_size: int = 4096,
) -> int:
    """Decode ``delta_encode`` output: page i of ``out`` gets the decoded page for
    ``pfns[i]``, SAME/DELTA taken against page ``pfns[i]`` of ``reference`` (the
    backup's replica RAM). ValueError on any malformed, truncated or trailing input,
    or an out-of-range pfn, before or while writing ``out`` (never outside it).
    Returns bytes consumed (== len(encoded))."""

def empty_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes whose contents are NOT zeroed (to be overwritten)."""

def memcpy(dst: Buffer, src: Buffer) -> int:
    """Plain memcpy with the GIL released: the limit the copy benchmark compares to."""

# -- KVM ------------------------------------------------------------------------------
def kvm_run(vcpu_fd: int) -> int:
    """ioctl(KVM_RUN) with the GIL released; 0 or -errno (e.g. -EINTR after a kick)."""

@overload
def get_dirty_log(vm_fd: int, slot: int, bitmap: Buffer) -> None: ...
@overload
def get_dirty_log(vm_fd: int, slot: int, bitmap: Buffer, extra: Buffer | None,
                  out: Buffer) -> int:
    """KVM_GET_DIRTY_LOG for ``slot`` into the writable ``bitmap``; OSError on failure.
    With ``out`` (as large as ``bitmap``): also ``dirty_bitmap_merge(bitmap, extra,
    out)`` in the same call (GIL released), and its count returned."""

def kvm_get_vcpu_state(vcpu_fd: int) -> tuple[bytes, bytes, bytes]:
    """KVM_GET_REGS, KVM_GET_SREGS and KVM_GET_FPU in one call; OSError on failure."""

def kvm_wait_run(wait_fd: int, vcpu_fd: int, flags: Buffer, spin_ns: int = 0,
                 save_fd: int = -1, state: Buffer | None = None,
                 work: Buffer | None = None, run: Buffer | None = None) -> tuple[int, int]:
    """Park (GIL released): set ``flags[0]``; with ``save_fd`` >= 0 read that vCPU's
    kvm_regs, kvm_sregs and kvm_fpu into ``state`` (the first two from its kvm_run
    mapping ``run`` if KVM stored them there: ``kvm_sync_regs``) and set ``flags[2]`` (``flags[3]``:
    errno & 0xff of a failed read, else 0); wait until ``flags[1]`` is set (spinning
    up to ``spin_ns``, then sleeping on the eventfd ``wait_fd``, written after it;
    sleeping at once if ``flags[4:8]`` holds, as an int32, the CPU this thread is on),
    then KVM_RUN at once (skipped if ``vcpu_fd`` < 0). The work posted to the slot
    ``work`` (``wp_protect_bitmap_post``, ``wp_capture_post``) runs on this thread:
    posted before the park, as it parks (its early part before the registers are
    read); posted later, while it spins; in any case before KVM_RUN. Returns (0 or
    -errno, CLOCK_MONOTONIC ns once the wait ended and the work was done; also
    stored at ``flags[24:32]`` if ``flags`` has 32 bytes)."""

#: A park in C: (wait_fd, flags, spin_ns, vcpu_fd, state, work, run), as for
#: ``kvm_wait_run`` (``vcpu_fd`` the vCPU whose registers it reads; ``flags`` of 32
#: bytes: [8] a pause is asked for, [9] stop, [16:24] and [24:32] the int64
#: CLOCK_MONOTONIC ns the park began and ended).
Park = tuple[int, Buffer, int, int, Buffer, Buffer, Buffer]

def kvm_run_parking(vcpu_fd: int, park: Park) -> int:
    """KVM_RUN (GIL released), parking in C as ``kvm_wait_run`` does whenever it
    returns EINTR with a pause asked for and no stop, then entering KVM_RUN again
    once released; ``immediate_exit`` is cleared at every EINTR. Returns the first
    result that led to no park: 0 or -errno (-EINTR also when a stop ended a park)."""

def poll_or_park(fds: tuple[int, ...], timeout_ms: int, park: Park) -> int:
    """poll() for input on 1 to 8 ``fds`` (GIL released; ``timeout_ms`` < 0: no
    limit), parking in C instead, before or after, if a pause is asked for and no
    stop; no KVM_RUN. -1 if it parked (and was released), else a mask of the fds
    found readable (bit i: ``fds[i]``; 0: timeout or a signal). OSError if poll or
    the park's wait failed."""

def kvm_sync_regs(vm_fd: int, run: Buffer) -> bool:
    """Ask KVM to store the vCPU's kvm_regs and kvm_sregs in its kvm_run mapping
    ``run`` whenever KVM_RUN returns (False: it cannot), dropping any copy stored so
    far: call it again after setting the registers by ioctl."""

def clear_dirty_log(vm_fd: int, slot: int, bitmap: Buffer, pages: int) -> None:
    """KVM_CLEAR_DIRTY_LOG over a whole slot of ``pages`` pages: clear the bits set in
    ``bitmap`` and write-protect those pages again (manual dirty-log protection)."""

def current_cpu() -> int:
    """The CPU the calling thread runs on now (-1 if unknown)."""

def spin_until_set(flag: Buffer, timeout_ns: int) -> bool:
    """Spin (GIL released) until ``flag[0]`` is non-zero, or ``timeout_ns`` passed."""

#: The size of a parked work slot (a 16-byte aligned writable buffer at least this large).
PARKED_WORK_SLOT_BYTES: int

def parked_work_wait(slot: Buffer) -> None:
    """Once it returns, the work posted to ``slot`` (if any) is done: run here if the
    parked thread has not started it, else waited for (GIL released)."""

def install_kick_handler(signum: int) -> None:
    """Install a no-op handler for ``signum`` without SA_RESTART (process-wide)."""

def kick(thread_id: int, run: Buffer, signum: int) -> None:
    """Set ``immediate_exit`` (byte 1) of the writable kvm_run mapping ``run`` and
    ``pthread_kill(thread_id, signum)``: the vCPU leaves KVM_RUN with EINTR."""

def buffer_address(buf: Buffer) -> int:
    """Address of a buffer's first byte (for ioctl structs holding pointers)."""

# -- copy-on-write capture (userfaultfd write-protect) ------------------------------------
def wp_open(ram: Buffer) -> int:
    """A userfaultfd (non-blocking, close-on-exec) with ``ram`` (a page-aligned
    mapping) registered in write-protect mode. OSError names the step that failed."""

def wp_protect(fd: int, ram: Buffer, pfns: Buffer, unit_pages: int = 1) -> int:
    """Write-protect the units (``unit_pages`` pages, aligned in the address space)
    holding pages ``pfns`` (ascending little-endian u64) of ``ram``; returns the
    ioctls made (one per run of consecutive units)."""

def wp_protect_bitmap(fd: int, ram: Buffer, bitmap: Buffer, unit_pages: int = 1) -> int:
    """``wp_protect`` for the pages whose bit is set in ``bitmap`` (bit ``i`` of
    little-endian u64 word ``i // 64`` is page ``i``), without a pfn list."""

def wp_lift_bitmap(fd: int, ram: Buffer, bitmap: Buffer, unit_pages: int = 1) -> int:
    """Lift write protection from the units holding the pages set in ``bitmap``
    (waking their writers); returns the ioctls made. On units with none set, the
    page tables stay as they are, but KVM drops its mappings of those pages."""

def wp_protect_bitmap_post(slot: Buffer, fd: int, ram: Buffer, bitmap: Buffer,
                           unit_pages: int = 1) -> None:
    """Post ``wp_protect_bitmap`` to the parked work slot ``slot`` (a parked
    ``kvm_wait_run`` runs it); ``ram`` and ``bitmap`` must stay as they are until
    ``wp_protect_bitmap_finish``. ValueError if the slot holds unfinished work."""

def wp_protect_bitmap_finish(slot: Buffer) -> tuple[int, bool, int]:
    """The posted protect, done (run here if nobody took it): (ioctls made, whether
    the parked thread ran it, CLOCK_MONOTONIC ns when it was done); OSError as ``wp_protect_bitmap`` would raise. The slot
    is then free."""

def wp_capture_post(slot: Buffer, vm_fd: int, mem_slot: int, log: Buffer,
                    extra: Buffer | None, out: Buffer, fd: int, ram: Buffer,
                    unit_pages: int = 1, min_pages: int = 1) -> None:
    """Post a capture to the slot of a vCPU thread about to park: as it parks it reads
    the dirty log (``get_dirty_log(vm_fd, mem_slot, log, extra, out)``), then, with
    ``min_pages`` or more pages dirty, protects them (``wp_protect_bitmap(fd, ram,
    out, unit_pages)``) after reading the registers. The buffers must stay as they
    are until ``wp_capture_count`` (and ``wp_protect_bitmap_finish`` if protecting).
    ValueError if the slot holds unfinished work or the sizes disagree."""

def wp_capture_count(slot: Buffer) -> tuple[int, bool]:
    """The posted capture's dirty log read (run here, whole, if nobody took it):
    (dirty pages, whether they are being protected: ``wp_protect_bitmap_finish``
    must then follow). OSError if KVM_GET_DIRTY_LOG failed (nothing protected)."""

def wp_release(fd: int, ram: Buffer) -> None:
    """Lift all write protection from ``ram``, waking its writers."""

def wp_copy(fd: int, ram: Buffer, pfns: Buffer, staging: Buffer, run_pages: int = 64,
            unit_pages: int = 1, checksums: Buffer | None = None,
            batch_pages: int = 0) -> tuple[int, int, int, int]:
    """Copy the protected pages to ``staging`` (page ``k`` = page ``pfns[k]``, as it
    was when protected) while serving write faults (copy the unit's pages first,
    then release the unit), and release every unit, also when the arguments are
    refused. With ``checksums``, the frame checksums of the staged pages as
    ``gather`` computes them. Returns (faults, serve_ns, serve_max_ns, copy_ns)."""
