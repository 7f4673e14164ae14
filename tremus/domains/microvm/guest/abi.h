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

enum workload { WL_COUNTER = 1, WL_DIRTY = 2, WL_KV = 3 };
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

/* The NIC buffer area (boot_info.net_buf). */
#define NET_BUF_ADDR   0x90000UL
#define NET_RX_OFFSET  0
#define NET_TX_OFFSET  2048
#define NET_FRAME_MAX  2048 /* Ethernet header included, no FCS */
#define NET_FRAME_MIN  14

#define KV_UDP_PORT    7000

/* Port I/O is also a compiler memory barrier: the VMM reads what the guest wrote before
 * an `out` (console line, TX frame) and writes what the guest reads after an `in` (RX). */
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }

#endif
