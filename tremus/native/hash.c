/* hash64: a fast non-cryptographic 64-bit checksum for frames and RAM digests.
 *
 * Four independent lanes each absorb one little-endian 64-bit word per 32-byte
 * stripe with a multiply-rotate-multiply step, so the CPU keeps four multiplies
 * in flight; the lanes are folded together, the tail is absorbed word by word,
 * and a xor-shift-multiply finalizer spreads every input bit over the result.
 * The exact algorithm is mirrored in tremus/_pyfallback.py (hash64); change
 * both together or checksums stop matching across implementations.
 *
 *   K1..K5            odd 64-bit constants (below)
 *   mix(a, w)       = rotl(a + w*K2, 31) * K1
 *   fold(h, v)      = (h ^ mix(0, v)) * K1 + K4
 *   n >= 32:  v = (seed+K1+K2, seed+K2, seed, seed-K1); v[j] = mix(v[j], word j) per stripe
 *             h = rotl(v0,1)+rotl(v1,7)+rotl(v2,12)+rotl(v3,18); h = fold(h, v0..v3)
 *   n < 32:   h = seed + K5
 *   h += n
 *   per remaining 8 bytes: h = rotl(h ^ mix(0, w), 27) * K1 + K4
 *   remaining 4 bytes:     h = rotl(h ^ (u32 * K1), 23) * K2 + K3
 *   per remaining byte:    h = rotl(h ^ (b * K5), 11) * K1
 *   h ^= h>>33; h *= K2; h ^= h>>29; h *= K3; h ^= h>>32
 */
#include "tremus_native.h"

#define K1 0x9E3779B97F4A7C15ULL
#define K2 0xBF58476D1CE4E5B9ULL
#define K3 0x94D049BB133111EBULL
#define K4 0xD6E8FEB86659FD93ULL
#define K5 0xA0761D6478BD642FULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t mix(uint64_t acc, uint64_t w) { return rotl64(acc + w * K2, 31) * K1; }
static inline uint64_t fold(uint64_t h, uint64_t v) { return (h ^ mix(0, v)) * K1 + K4; }

uint64_t tn_hash64(const unsigned char *p, size_t n, uint64_t seed) {
    const unsigned char *end = p + n;
    uint64_t h;
    if (n >= 32) {
        uint64_t v0 = seed + K1 + K2, v1 = seed + K2, v2 = seed, v3 = seed - K1;
        const unsigned char *limit = end - 32;
        do {
            v0 = mix(v0, tn_load_le64(p));
            v1 = mix(v1, tn_load_le64(p + 8));
            v2 = mix(v2, tn_load_le64(p + 16));
            v3 = mix(v3, tn_load_le64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v0, 1) + rotl64(v1, 7) + rotl64(v2, 12) + rotl64(v3, 18);
        h = fold(h, v0);
        h = fold(h, v1);
        h = fold(h, v2);
        h = fold(h, v3);
    } else {
        h = seed + K5;
    }
    h += (uint64_t)n;
    while (end - p >= 8) {
        h = rotl64(h ^ mix(0, tn_load_le64(p)), 27) * K1 + K4;
        p += 8;
    }
    if (end - p >= 4) {
        h = rotl64(h ^ ((uint64_t)tn_load_le32(p) * K1), 23) * K2 + K3;
        p += 4;
    }
    while (p < end) {
        h = rotl64(h ^ ((uint64_t)*p * K5), 11) * K1;
        p++;
    }
    h ^= h >> 33;
    h *= K2;
    h ^= h >> 29;
    h *= K3;
    h ^= h >> 32;
    return h;
}

PyObject *tn_py_hash64(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"data", "seed", NULL};
    Py_buffer data;
    PyObject *seed_obj = NULL;
    uint64_t seed = 0, h;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|O:hash64", kwlist, tn_conv_ro, &data,
                                     &seed_obj))
        return NULL;
    if (seed_obj != NULL) {
        /* Any int, taken modulo 2**64 (as the pure-Python version does). */
        PyObject *idx = PyNumber_Index(seed_obj);
        if (idx == NULL) {
            PyBuffer_Release(&data);
            return NULL;
        }
        seed = (uint64_t)PyLong_AsUnsignedLongLongMask(idx);
        Py_DECREF(idx);
        if (seed == (uint64_t)-1 && PyErr_Occurred()) {
            PyBuffer_Release(&data);
            return NULL;
        }
    }
    if (data.len >= 4096) {
        Py_BEGIN_ALLOW_THREADS
        h = tn_hash64(data.buf, (size_t)data.len, seed);
        Py_END_ALLOW_THREADS
    } else { /* small inputs: the GIL round trip would cost more than the hash */
        h = tn_hash64(data.buf, (size_t)data.len, seed);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}
