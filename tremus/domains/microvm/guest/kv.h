/* The kv workload (kv.c): a UDP key-value server; see ABI.md. */
#ifndef TREMUS_GUEST_KV_H
#define TREMUS_GUEST_KV_H

void run_kv(void);

#endif
