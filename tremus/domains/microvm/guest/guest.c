/*
 * The tremus micro-VM guest: freestanding, general registers only, short on
 * instructions (under emulation it runs at about a million per second).
 */
#include "abi.h"
#include "disk.h"
#include "kv.h"
#include "text.h"

__asm__(
    ".section .text.start, \"ax\"\n"
    ".global _start\n"
    "_start:\n"
    "    call main\n"
    "1:  hlt\n"
    "    jmp 1b\n"
    ".previous\n");

#define BI ((volatile struct boot_info *)BOOT_INFO_ADDR)

static char line[128];

static u64 clock_ns(void)
{
    u64 lo = inl(PORT_CLOCK_LO);
    u64 hi = inl(PORT_CLOCK_HI);
    return (hi << 32) | lo;
}

static void idle_us(u64 us)
{
    outl(PORT_IDLE, us > 0xffffffffUL ? 0xffffffffU : (u32)us);
    hlt();
}

static void print(char *end)
{
    *end = 0;
    outl(PORT_CONSOLE, (u32)(u64)line);
}

/* Kept in RAM so that a checkpoint carries it: the counter is the guest's state. */
static volatile u64 counter;

static void run_counter(void)
{
    u64 interval = BI->interval_us;
    for (;;) {
        counter = counter + 1;
        print(put_u64(put_str(line, "counter "), counter));
        idle_us(interval);
    }
}

static u64 rng_state;

static u64 rng(void)
{
    u64 x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

static volatile u64 pages_dirtied;

static void run_dirty(void)
{
    volatile u8 *ws = (volatile u8 *)BI->ws_start;
    u64 n = BI->ws_pages, rate = BI->rate, pattern = BI->pattern;
    u64 hot = BI->hot_pages ? BI->hot_pages : 1;
    u64 tick_us = 10000, next = 0, stamp = 0;
    u64 per_tick = rate / 100;
    u64 remainder = rate % 100, acc = 0;
    rng_state = BI->seed | 1;
    print(put_u64(put_str(line, "dirty pages="), n));
    for (;;) {
        u64 batch = per_tick;
        acc += remainder;
        if (acc >= 100) {
            acc -= 100;
            batch++;
        }
        for (u64 i = 0; i < batch; i++) {
            u64 page;
            if (pattern == PAT_SEQUENTIAL) {
                page = next;
                next = next + 1 == n ? 0 : next + 1;
            } else if (pattern == PAT_HOTSET && (rng() & 15) != 0) {
                page = rng() % (hot < n ? hot : n);
            } else {
                page = rng() % n;
            }
            stamp++;
            *(volatile u64 *)(ws + page * 4096 + ((stamp * 64) & 4095)) = stamp;
        }
        pages_dirtied = pages_dirtied + batch;
        idle_us(tick_us);
    }
}

static volatile u64 disk_writes;

/* Write the disk at BI->rate writes per second (0: as fast as it can), io_sectors
 * sectors per write, at random or sequential io-aligned places. The first 16 bytes of
 * every sector written are the write's number and the sector's own number. */
static void run_diskwrite(void)
{
    u8 *buf = (u8 *)BI->ws_start;
    u64 io = BI->io_sectors, rate = BI->rate, pattern = BI->pattern;
    u64 slots = io ? disk_sectors() / io : 0;
    u64 next = 0, issued = 0, backlog = rate / 10 + 1, t0;
    rng_state = BI->seed | 1;
    if (!slots) {
        print(put_str(line, "diskwrite: needs a disk of io_size bytes or more"));
        outl(PORT_EXIT, 5);
        return;
    }
    print(put_u64(put_str(put_u64(put_str(line, "diskwrite sectors="), disk_sectors()), " io="),
                  io * DISK_SECTOR_SIZE));
    t0 = clock_ns();
    for (;;) {
        u64 due = issued + 1;
        if (rate) {
            u64 us = (clock_ns() - t0) / 1000;
            due = us * rate / 1000000;
            if (due > issued + backlog) /* fell behind (e.g. paused): forget the excess */
                issued = due - backlog;
            if (issued >= due) {
                u64 at = ((issued + 1) * 1000000 + rate - 1) / rate;
                idle_us(at > us ? at - us : 1);
                continue;
            }
        }
        while (issued < due) {
            u64 sector, n = disk_writes + 1;
            u32 st;
            if (pattern == PAT_SEQUENTIAL) {
                sector = next * io;
                next = next + 1 == slots ? 0 : next + 1;
            } else {
                sector = rng() % slots * io;
            }
            for (u64 i = 0; i < io; i++) {
                u64 *s = (u64 *)(buf + i * DISK_SECTOR_SIZE);
                s[0] = n;
                s[1] = sector + i;
            }
            st = disk_write(sector, (u32)io, buf);
            if (st) {
                char *p = put_u64(put_str(line, "diskwrite error "), st);
                print(put_u64(put_str(p, " at sector "), sector));
                outl(PORT_EXIT, 5);
                return;
            }
            issued++;
            disk_writes = n;
            if ((n & 63) == 0)
                print(put_u64(put_str(line, "diskwrite "), n));
        }
    }
}

void main(void)
{
    if (BI->magic != BOOT_INFO_MAGIC || BI->version != BOOT_INFO_VERSION) {
        outl(PORT_EXIT, 2);
        return;
    }
    switch (BI->workload) {
    case WL_COUNTER:
        run_counter();
        break;
    case WL_DIRTY:
        run_dirty();
        break;
    case WL_KV:
        run_kv();
        break;
    case WL_DISKWRITE:
        run_diskwrite();
        break;
    default:
        print(put_str(line, "unknown workload"));
        outl(PORT_EXIT, 3);
    }
}
