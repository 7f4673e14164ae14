/*
 * The kv workload: a UDP key-value server with its own ARP, IPv4, ICMP and UDP.
 *
 * One frame at a time: poll the NIC (port PORT_NIC_RX copies the next frame to the
 * RX buffer), answer it from the TX buffer (port PORT_NIC_TX), and halt with a
 * deadline when nothing is there (the VMM ends the halt when a frame arrives).
 * The table lives in .bss, so every checkpoint carries it. Protocol: ABI.md.
 *
 * With a disk, every SET is also a record appended to a log on the disk, written
 * and flushed before the reply; the log is replayed at boot. After a restore (the
 * disk's generation changed) the guest checks that the disk's log ends where its
 * memory says it does. Log format: ABI.md, "The kv log".
 */
#include "abi.h"
#include "disk.h"
#include "kv.h"
#include "text.h"

#define BI ((volatile struct boot_info *)BOOT_INFO_ADDR)

#define ETH_HLEN 14
#define ETHERTYPE_IP 0x0800
#define ETHERTYPE_ARP 0x0806
#define IP_HLEN 20
#define UDP_HLEN 8
#define IDLE_US 50000

#define KV_SLOTS 1024 /* a power of two */
#define KV_KEY_MAX 32
#define KV_VAL_MAX 64

struct entry {
    u8 used, klen, vlen;
    char key[KV_KEY_MAX];
    char val[KV_VAL_MAX];
};

static struct entry table[KV_SLOTS];
static u32 kv_count;
static u8 my_mac[6], my_ip[4];
static u8 *rx, *tx;
static u32 ip_id;
static char kv_line[128];

static void say(char *end)
{
    *end = 0;
    outl(PORT_CONSOLE, (u32)(u64)kv_line);
}

/* -- small helpers ------------------------------------------------------------ */

static inline u32 get16(const u8 *p) { return ((u32)p[0] << 8) | p[1]; }

static inline void put16(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static void copy(void *dst, const void *src, u32 n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
}

static int same(const void *a, const void *b, u32 n)
{
    const u8 *x = a, *y = b;
    while (n--)
        if (*x++ != *y++)
            return 0;
    return 1;
}

static u32 csum_add(u32 sum, const u8 *p, u32 n)
{
    for (; n > 1; p += 2, n -= 2)
        sum += ((u32)p[0] << 8) | p[1];
    if (n)
        sum += (u32)p[0] << 8;
    return sum;
}

static u32 csum_fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

static void send(u32 len) { outl(PORT_NIC_TX, len); }

/* -- the key-value table -------------------------------------------------------- */

static u32 hash(const char *k, u32 n)
{
    u32 h = 2166136261u; /* FNV-1a */
    while (n--) {
        h ^= (u8)*k++;
        h *= 16777619u;
    }
    return h;
}

/* The entry for key k, or a fresh one for it if insert; 0 if absent (or full). */
static struct entry *lookup(const char *k, u32 n, int insert)
{
    u32 i = hash(k, n) & (KV_SLOTS - 1);
    for (u32 probes = 0; probes < KV_SLOTS; probes++) {
        struct entry *e = &table[i];
        if (!e->used) {
            if (!insert)
                return 0;
            copy(e->key, k, n);
            e->klen = (u8)n;
            e->vlen = 0;
            e->used = 1;
            kv_count++;
            return e;
        }
        if (e->klen == n && same(e->key, k, n))
            return e;
        i = (i + 1) & (KV_SLOTS - 1);
    }
    return 0;
}

/* -- the log on disk ---------------------------------------------------------------- */

#define LOG_MAGIC 0x564B53554D455254UL /* "TREMUSKV" */
#define LOG_VERSION 1
#define REC_MAGIC 0x3152564BU /* "KVR1" */
#define REC_SUM_WORDS 30      /* the checksum covers bytes 8..127 */
#define LOG_BATCH 32          /* sectors per read while replaying */

struct log_header {           /* sector 0 */
    u64 magic;
    u32 version;
    u32 record_size;
    u64 log_id;
};

struct log_record {           /* sector seq; the rest of the sector is zero */
    u32 magic;
    u32 sum;
    u64 log_id;
    u64 seq;
    u8 klen, vlen, pad[6];
    char key[KV_KEY_MAX];
    char val[KV_VAL_MAX];
};

typedef u32 __attribute__((may_alias)) word;

static u8 log_io[LOG_BATCH * DISK_SECTOR_SIZE] __attribute__((aligned(64)));
static u64 log_sectors;       /* 0: no disk, the table lives in RAM only */
static u64 log_id;            /* this log's id (its header) */
static u64 log_head;          /* sequence number of the last record written and flushed */
static u32 log_gen;           /* the disk's restore generation last seen */

#define HDR ((struct log_header *)log_io)
#define REC(i) ((struct log_record *)(log_io + (i) * DISK_SECTOR_SIZE))

static u32 rec_sum(const struct log_record *r)
{
    const word *w = (const word *)&r->log_id;
    u32 h = 2166136261u;
    for (int i = 0; i < REC_SUM_WORDS; i++)
        h = (h ^ w[i]) * 16777619u;
    return h;
}

static int rec_ok(const struct log_record *r, u64 seq)
{
    return r->magic == REC_MAGIC && r->log_id == log_id && r->seq == seq && r->klen &&
           r->klen <= KV_KEY_MAX && r->vlen && r->vlen <= KV_VAL_MAX && r->sum == rec_sum(r);
}

static int header_ok(void)
{
    return HDR->magic == LOG_MAGIC && HDR->version == LOG_VERSION &&
           HDR->record_size == DISK_SECTOR_SIZE;
}

static void zero(void *p, u32 n)
{
    u8 *d = p;
    while (n--)
        *d++ = 0;
}

static struct entry *kv_put(const char *k, u32 klen, const char *v, u32 vlen)
{
    struct entry *e = lookup(k, klen, 1);
    if (e) {
        copy(e->val, v, vlen);
        e->vlen = (u8)vlen;
    }
    return e;
}

/* How many records of this log follow each other from sequence 1 on the disk (with
 * apply, loaded into the table); ~0 if the disk could not be read. */
static u64 log_scan(int apply)
{
    u64 seq = 1;
    while (seq < log_sectors) {
        u64 n = log_sectors - seq < LOG_BATCH ? log_sectors - seq : LOG_BATCH;
        if (disk_read(seq, (u32)n, log_io))
            return ~0UL;
        for (u64 i = 0; i < n; i++, seq++) {
            struct log_record *r = REC(i);
            if (!rec_ok(r, seq))
                return seq - 1;
            if (apply)
                kv_put(r->key, r->klen, r->val, r->vlen);
        }
    }
    return seq - 1;
}

static void disk_failed(u32 status)
{
    say(put_u64(put_str(kv_line, "kv: disk error "), status));
    outl(PORT_EXIT, 5);
    for (;;)
        hlt();
}

/* Open the log: replay it, or write a new one (header, empty sector 1) on a disk that
 * holds none. */
static void log_open(void)
{
    u32 st;
    u64 n = 0;
    log_gen = disk_generation();
    if ((st = disk_read(0, 1, log_io)))
        disk_failed(st);
    if (header_ok()) {
        log_id = HDR->log_id;
        n = log_scan(1);
        if (n == ~0UL)
            disk_failed(DISK_E_IO);
    } else {
        u64 lo = inl(PORT_CLOCK_LO), hi = inl(PORT_CLOCK_HI);
        log_id = ((hi << 32 | lo) * 0x9E3779B97F4A7C15UL) ^ BI->seed;
        zero(log_io, 2 * DISK_SECTOR_SIZE);
        HDR->magic = LOG_MAGIC;
        HDR->version = LOG_VERSION;
        HDR->record_size = DISK_SECTOR_SIZE;
        HDR->log_id = log_id;
        if ((st = disk_write(0, 2, log_io)) || (st = disk_flush()))
            disk_failed(st);
    }
    log_head = n;
    say(put_str(put_u64(put_str(kv_line, "kv loaded "), n), " records"));
}

/* Append SET key value as record log_head + 1; written and flushed when it returns 0. */
static u32 log_append(const char *k, u32 klen, const char *v, u32 vlen)
{
    struct log_record *r = REC(0);
    u32 st;
    zero(r, DISK_SECTOR_SIZE);
    r->magic = REC_MAGIC;
    r->log_id = log_id;
    r->seq = log_head + 1;
    r->klen = (u8)klen;
    r->vlen = (u8)vlen;
    copy(r->key, k, klen);
    copy(r->val, v, vlen);
    r->sum = rec_sum(r);
    if ((st = disk_write(r->seq, 1, r)) || (st = disk_flush()))
        return st;
    log_head++;
    return 0;
}

/* Whether sector seq holds this log's header (0) or its record seq; -1: unreadable. */
static int log_has(u64 seq)
{
    if (seq >= log_sectors)
        return 0;
    if (disk_read(seq, 1, log_io))
        return -1;
    return seq ? rec_ok(REC(0), seq) : header_ok() && HDR->log_id == log_id;
}

/* After a restore: does the disk's log end where memory says it does? */
static void log_check(void)
{
    char *p;
    int head = log_has(0), last = log_head ? log_has(log_head) : head;
    int next = log_has(log_head + 1);
    u64 disk = 0;
    if (head < 0 || last < 0 || next < 0)
        goto unreadable;
    if (head && last && !next) {
        say(put_u64(put_str(kv_line, "kv disk consistent at seq "), log_head));
        return;
    }
    if (head && (disk = log_scan(0)) == ~0UL)
        goto unreadable;
    p = put_u64(put_str(kv_line, "kv disk MISMATCH memory seq "), log_head);
    say(put_u64(put_str(p, " disk seq "), disk));
    return;
unreadable:
    p = put_u64(put_str(kv_line, "kv disk MISMATCH memory seq "), log_head);
    say(put_str(p, " disk unreadable"));
}

/* Answer the request req[0..n) into out; returns the reply's length (< 128). */
static u32 kv_request(const char *req, u32 n, char *out)
{
    char *p = out;
    const char *err = 0;
    if (n && req[n - 1] == '\n')
        n--;
    if (n && req[n - 1] == '\r')
        n--;
    for (u32 i = 0; i < n; i++)
        if ((u8)req[i] < 0x20 || (u8)req[i] > 0x7e) {
            err = "ERR bad character";
            goto fail;
        }
    if (n >= 4 && same(req, "SET ", 4)) {
        const char *key = req + 4;
        u32 klen = 0, rest = n - 4;
        while (klen < rest && key[klen] != ' ')
            klen++;
        if (klen == 0 || klen + 1 >= rest) {
            err = "ERR usage: SET <key> <value>";
            goto fail;
        }
        const char *val = key + klen + 1;
        u32 vlen = rest - klen - 1;
        if (klen > KV_KEY_MAX) {
            err = "ERR key too long";
            goto fail;
        }
        if (vlen > KV_VAL_MAX) {
            err = "ERR value too long";
            goto fail;
        }
        struct entry *e = lookup(key, klen, 0);
        if (!e && kv_count >= KV_SLOTS) {
            err = "ERR table full";
            goto fail;
        }
        if (log_sectors) {
            if (log_head + 1 >= log_sectors) {
                err = "ERR disk full";
                goto fail;
            }
            if (log_append(key, klen, val, vlen)) {
                err = "ERR disk error";
                goto fail;
            }
        }
        kv_put(key, klen, val, vlen);
        p = put_str(p, "OK ");
        copy(p, key, klen);
        return (u32)(p - out) + klen;
    }
    if (n >= 4 && same(req, "GET ", 4)) {
        const char *key = req + 4;
        u32 klen = n - 4;
        for (u32 i = 0; i < klen; i++)
            if (key[i] == ' ')
                klen = 0;
        if (klen == 0) {
            err = "ERR usage: GET <key>";
            goto fail;
        }
        if (klen > KV_KEY_MAX) {
            err = "ERR key too long";
            goto fail;
        }
        struct entry *e = lookup(key, klen, 0);
        if (!e) {
            p = put_str(p, "NONE ");
            copy(p, key, klen);
            return (u32)(p - out) + klen;
        }
        p = put_str(p, "VAL ");
        copy(p, key, klen);
        p += klen;
        *p++ = ' ';
        copy(p, e->val, e->vlen);
        return (u32)(p - out) + e->vlen;
    }
    err = "ERR unknown command (SET <key> <value> | GET <key>)";
fail:
    return (u32)(put_str(out, err) - out);
}

/* -- the network ------------------------------------------------------------------ */

/* Ethernet header of a reply to the frame in rx. */
static void eth_reply(u32 type)
{
    copy(tx, rx + 6, 6);
    copy(tx + 6, my_mac, 6);
    put16(tx + 12, type);
}

/* IPv4 header of a reply to the datagram whose header is req. */
static void ip_reply(const u8 *req, u32 proto, u32 payload)
{
    u8 *h = tx + ETH_HLEN;
    eth_reply(ETHERTYPE_IP);
    h[0] = 0x45;
    h[1] = 0;
    put16(h + 2, IP_HLEN + payload);
    put16(h + 4, ip_id++);
    put16(h + 6, 0x4000); /* DF */
    h[8] = 64;
    h[9] = (u8)proto;
    put16(h + 10, 0);
    copy(h + 12, my_ip, 4);
    copy(h + 16, req + 12, 4);
    put16(h + 10, csum_fold(csum_add(0, h, IP_HLEN)));
}

static void handle_arp(u32 len)
{
    const u8 *a = rx + ETH_HLEN;
    u8 *r = tx + ETH_HLEN;
    if (len < ETH_HLEN + 28 || get16(a) != 1 || get16(a + 2) != ETHERTYPE_IP || a[4] != 6 ||
        a[5] != 4 || get16(a + 6) != 1 || !same(a + 24, my_ip, 4))
        return;
    eth_reply(ETHERTYPE_ARP);
    put16(r, 1);
    put16(r + 2, ETHERTYPE_IP);
    r[4] = 6;
    r[5] = 4;
    put16(r + 6, 2); /* reply */
    copy(r + 8, my_mac, 6);
    copy(r + 14, my_ip, 4);
    copy(r + 18, a + 8, 6);  /* the requester's MAC */
    copy(r + 24, a + 14, 4); /* and IP */
    send(ETH_HLEN + 28);
}

static void handle_icmp(const u8 *ip, const u8 *m, u32 n)
{
    u8 *r = tx + ETH_HLEN + IP_HLEN;
    if (n < 8 || m[0] != 8 || m[1] != 0 || ETH_HLEN + IP_HLEN + n > NET_FRAME_MAX)
        return;
    if (csum_fold(csum_add(0, m, n)) != 0)
        return;
    r[0] = 0; /* echo reply */
    r[1] = 0;
    put16(r + 2, 0);
    copy(r + 4, m + 4, n - 4);
    put16(r + 2, csum_fold(csum_add(0, r, n)));
    ip_reply(ip, 1, n);
    send(ETH_HLEN + IP_HLEN + n);
}

static void handle_udp(const u8 *ip, const u8 *u, u32 n)
{
    u8 *r = tx + ETH_HLEN + IP_HLEN;
    u32 ulen;
    if (n < UDP_HLEN || get16(u + 2) != KV_UDP_PORT)
        return;
    ulen = get16(u + 4);
    if (ulen < UDP_HLEN || ulen > n)
        return;
    u32 m = kv_request((const char *)u + UDP_HLEN, ulen - UDP_HLEN, (char *)r + UDP_HLEN);
    put16(r, KV_UDP_PORT);
    copy(r + 2, u, 2); /* to the sender's port */
    put16(r + 4, UDP_HLEN + m);
    put16(r + 6, 0); /* no checksum */
    ip_reply(ip, 17, UDP_HLEN + m);
    send(ETH_HLEN + IP_HLEN + UDP_HLEN + m);
}

static void handle_ip(u32 len)
{
    const u8 *ip = rx + ETH_HLEN;
    u32 ihl, total;
    if (len < ETH_HLEN + IP_HLEN || (ip[0] >> 4) != 4)
        return;
    ihl = (u32)(ip[0] & 15) * 4;
    total = get16(ip + 2);
    if (ihl < IP_HLEN || total < ihl || ETH_HLEN + total > len)
        return;
    if ((get16(ip + 6) & 0x3fff) || !same(ip + 16, my_ip, 4)) /* fragment, not ours */
        return;
    if (csum_fold(csum_add(0, ip, ihl)) != 0)
        return;
    if (ip[9] == 1)
        handle_icmp(ip, ip + ihl, total - ihl);
    else if (ip[9] == 17)
        handle_udp(ip, ip + ihl, total - ihl);
}

static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

void run_kv(void)
{
    char *p;
    u64 buf = BI->net_buf;
    if (!buf || BI->ip == 0) {
        p = put_str(kv_line, "kv: needs a NIC and an IP address");
        *p = 0;
        outl(PORT_CONSOLE, (u32)(u64)kv_line);
        outl(PORT_EXIT, 4);
        return;
    }
    for (int i = 0; i < 6; i++)
        my_mac[i] = BI->mac[i];
    for (int i = 0; i < 4; i++)
        my_ip[i] = (u8)(BI->ip >> (8 * i)); /* network order in memory */
    rx = (u8 *)(buf + NET_RX_OFFSET);
    tx = (u8 *)(buf + NET_TX_OFFSET);
    log_sectors = disk_sectors();
    if (log_sectors)
        log_open();

    p = put_str(kv_line, "kv ready ip=");
    for (int i = 0; i < 4; i++) {
        p = put_u64(p, my_ip[i]);
        *p++ = i < 3 ? '.' : 0;
    }
    outl(PORT_CONSOLE, (u32)(u64)kv_line);

    for (;;) {
        if (log_sectors) {
            u32 gen = disk_generation();
            if (gen != log_gen) {
                log_gen = gen;
                log_check();
            }
        }
        u32 len = inl(PORT_NIC_RX);
        if (!len) {
            outl(PORT_IDLE, IDLE_US);
            hlt();
            continue;
        }
        if (len < ETH_HLEN || len > NET_FRAME_MAX)
            continue;
        if (!same(rx, my_mac, 6) && !same(rx, broadcast, 6))
            continue;
        switch (get16(rx + 12)) {
        case ETHERTYPE_ARP:
            handle_arp(len);
            break;
        case ETHERTYPE_IP:
            handle_ip(len);
            break;
        }
    }
}
