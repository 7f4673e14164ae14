/* The guest's block-device driver (disk.c): synchronous requests over PORT_DISK. */
#ifndef TREMUS_GUEST_DISK_H
#define TREMUS_GUEST_DISK_H

#include "abi.h"

/* The disk's size in sectors (boot info); 0 = no disk. */
u64 disk_sectors(void);
/* Read / write count sectors from / to the sector-th, at buf; flush what was written
 * to stable storage. Each returns the request's status (DISK_OK = 0). */
u32 disk_read(u64 sector, u32 count, void *buf);
u32 disk_write(u64 sector, u32 count, const void *buf);
u32 disk_flush(void);
/* The restore generation: changes when the machine was restored from a checkpoint. */
static inline u32 disk_generation(void) { return inl(PORT_DISK_GEN); }

#endif
