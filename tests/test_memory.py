"""Page-aligned buffers, and received page data that lands page-aligned (a buffer
16 bytes off a page boundary made every copy into the replica ~3.5x slower)."""

from __future__ import annotations

import ctypes
import os
from array import array

import pytest

from tremus._memory import page_aligned
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
