/* Building console and reply lines without a C library. */
#ifndef TREMUS_GUEST_TEXT_H
#define TREMUS_GUEST_TEXT_H

#include "abi.h"

/* Appends the NUL-terminated ``s`` at ``p``; returns the end (not terminated). */
char *put_str(char *p, const char *s);
/* Appends ``v`` in decimal at ``p``; returns the end (not terminated). */
char *put_u64(char *p, u64 v);

#endif
