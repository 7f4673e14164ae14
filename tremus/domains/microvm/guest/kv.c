/*
 * The kv workload: a UDP key-value server with its own ARP, IPv4, ICMP and UDP.
 *
 * One frame at a time: poll the NIC (port PORT_NIC_RX copies the next frame to the
 * RX buffer), answer it from the TX buffer (port PORT_NIC_TX), and halt with a
 * deadline when nothing is there (the VMM ends the halt when a frame arrives).
 * The table lives in .bss, so every checkpoint carries it. Protocol: ABI.md.
 */
#include "abi.h"
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
static char kv_line[64];

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
        struct entry *e = lookup(key, klen, 1);
        if (!e) {
            err = "ERR table full";
            goto fail;
        }
        copy(e->val, val, vlen);
        e->vlen = (u8)vlen;
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

    p = put_str(kv_line, "kv ready ip=");
    for (int i = 0; i < 4; i++) {
        p = put_u64(p, my_ip[i]);
        *p++ = i < 3 ? '.' : 0;
    }
    outl(PORT_CONSOLE, (u32)(u64)kv_line);

    for (;;) {
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
