/*
 * The block-device driver: one request at a time, synchronous. The descriptor lives
 * in .bss; the doorbell's `out` is a compiler memory barrier (abi.h), so the fields
 * are in RAM before the exit and the status the VMM wrote is read after it.
 */
#include "abi.h"
#include "disk.h"

#define BI ((volatile struct boot_info *)BOOT_INFO_ADDR)

static struct disk_req req;

u64 disk_sectors(void) { return BI->disk_sectors; }

static u32 submit(u32 op, u64 sector, u32 count, u64 buf)
{
    req.op = op;
    req.count = count;
    req.sector = sector;
    req.buf = buf;
    req.status = ~0U;
    outl(PORT_DISK, (u32)(u64)&req);
    return req.status;
}

u32 disk_read(u64 sector, u32 count, void *buf) { return submit(DISK_OP_READ, sector, count, (u64)buf); }

u32 disk_write(u64 sector, u32 count, const void *buf)
{
    return submit(DISK_OP_WRITE, sector, count, (u64)buf);
}

u32 disk_flush(void) { return submit(DISK_OP_FLUSH, 0, 0, 0); }
