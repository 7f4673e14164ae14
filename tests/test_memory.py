"""Page-aligned buffers, and received page data that lands page-aligned (a buffer
16 bytes off a page boundary made every copy into the replica ~3.5x slower)."""

from __future__ import annotations

import ctypes
import os
from array import array

import pytest

from tremus._memory import PayloadBuffers, page_aligned
from tremus.accel import native
from tremus.engine import protocol as p

PAGE = 4096


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.mark.parametrize("size", [1, 4095, 4096, 1 << 20])
@pytest.mark.parametrize("aligned_at", [0, 8, 16, 8 * 1024, 8 * 3])
def test_page_aligned_puts_the_given_byte_on_a_page_boundary(size: int, aligned_at: int) -> None:
    view = page_aligned(size, aligned_at)
    assert len(view) == size and not view.readonly
    assert (address(view) + aligned_at) % PAGE == 0
    view[:] = b"\xab" * size
    assert bytes(view[-1:]) == b"\xab"


@pytest.mark.skipif(native is None, reason="needs the native helper")
@pytest.mark.parametrize("count", [16, 1000, 1024])
def test_received_pages_start_on_a_page_boundary(count: int) -> None:
    primary, backup = p.PrimaryConnection(), p.BackupConnection()
    backup.receive_data(primary.send(p.Hello(driver="microvm", ram_size=count * PAGE,
                                             page_size=PAGE)))
    assert isinstance(backup.next_event(), p.Hello)
    primary.receive_data(backup.send(p.Welcome()))
    assert isinstance(primary.next_event(), p.Welcome)
    pfns = array("Q", range(count)).tobytes()
    data = os.urandom(count * PAGE)
    frame = primary.send(p.CheckpointBegin(0, True)) + primary.send(p.Pages(0, pfns, data, "raw"))
    # Header first, then the payload straight into the buffer the connection offers.
    split = len(frame) - count * PAGE - len(pfns)
    backup.receive_data(frame[:split])
    assert isinstance(backup.next_event(), p.CheckpointBegin)
    assert backup.next_event() is p.NEED_DATA
    into = backup.receive_buffer()
    assert into is not None and len(into) == len(pfns) + len(data)
    into[:] = frame[split:]
    backup.received_into(len(into))
    pages = backup.next_event()
    assert isinstance(pages, p.Pages) and bytes(pages.data) == data
    assert native is not None
    assert native.buffer_address(pages.data) % PAGE == 0


def test_payload_buffers_are_used_again_once_given_back() -> None:
    """Given back, a buffer serves the next payload of about its size (already
    mapped in); anything it did not lend, or beyond max_bytes, is not kept."""
    buffers = PayloadBuffers(max_bytes=3 << 20)
    first = buffers.take(1 << 20, aligned_at=8192)
    assert ctypes.addressof(ctypes.c_char.from_buffer(first, 8192)) % 4096 == 0
    owner = first.obj
    buffers.give_back([owner, bytearray(1 << 20), b"not ours"])
    again = buffers.take(1 << 20, aligned_at=16)
    assert again.obj is owner and len(again) == 1 << 20
    assert ctypes.addressof(ctypes.c_char.from_buffer(again, 16)) % 4096 == 0
    assert buffers.take(4 << 20).obj is not owner  # far bigger: a buffer of its own
    small = buffers.take(1000)
    assert small.obj is not owner  # far smaller: not a 1 MiB buffer for it
    big = [buffers.take(2 << 20) for _ in range(2)]
    buffers.give_back(b.obj for b in big)  # the second exceeds max_bytes: dropped
    kept = [buffers.take(2 << 20).obj for _ in range(2)]
    assert kept[0] is big[0].obj and kept[1] is not big[1].obj
