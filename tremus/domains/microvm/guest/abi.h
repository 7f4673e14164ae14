/*
 * The tremus micro-VM guest ABI: boot-info page and paravirtual port I/O devices.
 * Mirrored on the host side by tremus/domains/microvm/abi.py; see ABI.md.
 */
#ifndef TREMUS_GUEST_ABI_H
#define TREMUS_GUEST_ABI_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define BOOT_INFO_ADDR 0x8000UL
#define BOOT_INFO_MAGIC 0x494253554D455254UL /* "TREMUSBI" as little-endian bytes */
#define BOOT_INFO_VERSION 2

enum workload { WL_COUNTER = 1, WL_DIRTY = 2, WL_KV = 3, WL_DISKWRITE = 4 };
enum pattern { PAT_RANDOM = 0, PAT_SEQUENTIAL = 1, PAT_HOTSET = 2 };

struct boot_info {
    u64 magic;
    u64 version;
    u64 ram_size;
    u64 workload;
    u64 interval_us;  /* counter: time between lines */
    u64 ws_start;     /* dirty: first byte of the working set (page aligned) */
    u64 ws_pages;     /* dirty: working set size in pages */
    u64 rate;         /* dirty: pages per second */
    u64 pattern;      /* dirty: enum pattern */
    u64 hot_pages;    /* dirty: size of the hot set */
    u64 seed;
    u8 mac[8];
    u32 ip;           /* network byte order */
    u32 netmask;      /* network byte order */
    u64 net_buf;      /* guest-physical address of the NIC buffer area; 0 = no NIC */
    u64 disk_sectors; /* size of the disk in DISK_SECTOR_SIZE sectors; 0 = no disk */
    u64 io_sectors;   /* diskwrite: sectors per write */
};

/* Ports. 32-bit accesses unless noted. */
#define PORT_CONSOLE   0x510 /* out: guest-physical address of a NUL-terminated line */
#define PORT_CLOCK_LO  0x520 /* in: latch the monotonic clock (ns), return the low half */
#define PORT_CLOCK_HI  0x524 /* in: high half of the latched value */
#define PORT_IDLE      0x530 /* out: arm a deadline now+value microseconds (then HLT) */
#define PORT_EXIT      0x540 /* out: stop the machine with this code */
#define PORT_NIC_RX    0x550 /* in: copy the next received frame to net_buf + NET_RX_OFFSET,
                                return its length (0 = nothing received) */
#define PORT_NIC_TX    0x554 /* out: send the frame of value bytes at net_buf + NET_TX_OFFSET */
#define PORT_DISK      0x560 /* out: guest-physical address of a struct disk_req; the VMM
                                performs it during the exit and writes its status */
#define PORT_DISK_GEN  0x564 /* in: the disk's restore generation (bumped on every restore) */

/* The NIC buffer area (boot_info.net_buf). */
#define NET_BUF_ADDR   0x90000UL
#define NET_RX_OFFSET  0
#define NET_TX_OFFSET  2048
#define NET_FRAME_MAX  2048 /* Ethernet header included, no FCS */
#define NET_FRAME_MIN  14

#define KV_UDP_PORT    7000

/* The block device (boot_info.disk_sectors != 0). A request is a descriptor in guest
 * RAM; the doorbell (PORT_DISK) performs it synchronously and fills in status. */
#define DISK_SECTOR_SIZE 512
#define DISK_MAX_SECTORS 2048 /* per request: 1 MiB */

enum disk_op { DISK_OP_READ = 0, DISK_OP_WRITE = 1, DISK_OP_FLUSH = 2 };
enum disk_status {
    DISK_OK = 0,
    DISK_E_RANGE = 1,  /* count 0 or > DISK_MAX_SECTORS, or past the end of the disk */
    DISK_E_OP = 2,     /* unknown op */
    DISK_E_IO = 3,     /* the host's I/O failed */
    DISK_E_BUF = 4,    /* the data buffer is not inside guest RAM */
};

struct disk_req {      /* 32 bytes, anywhere in guest RAM */
    u32 op;            /* enum disk_op */
    u32 count;         /* sectors (read, write); ignored by flush */
    u64 sector;        /* first sector */
    u64 buf;           /* guest-physical address of count * DISK_SECTOR_SIZE bytes */
    u32 status;        /* written by the VMM before the doorbell's exit returns */
    u32 reserved;
};

/* Port I/O is also a compiler memory barrier: the VMM reads what the guest wrote before
 * an `out` (console line, TX frame) and writes what the guest reads after an `in` (RX). */
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }

#endif
