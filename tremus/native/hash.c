/* hash64: a fast non-cryptographic 64-bit checksum for frames and RAM digests.
 *
 * It is XXH3-64 (XXH3_64bits_withSeed) from the xxHash library, linked from the
 * system's libxxhash (Debian: libxxhash-dev; scripts/setup.sh installs it). The
 * pure-Python fallback (tremus/_pyfallback.py, hash64) calls the same function
 * through the `xxhash` package, so both give the same value for the same bytes
 * and seed on every host: XXH3 reads its input as little-endian words whatever
 * the CPU, and its results are frozen by the xxHash project since v0.8.0.
 */
#include "tremus_native.h"

#if !defined(__has_include) || __has_include(<xxhash.h>)
#include <xxhash.h>
#else
#error "xxhash.h not found: install the xxHash headers (Debian/Ubuntu: apt-get install libxxhash-dev, or run scripts/setup.sh)"
#endif

#if !defined(XXH_VERSION_NUMBER) || XXH_VERSION_NUMBER < 800
#error "xxHash >= 0.8.0 is needed (XXH3-64 is stable from 0.8.0 on)"
#endif

uint64_t tn_hash64(const unsigned char *p, size_t n, uint64_t seed) {
    return (uint64_t)XXH3_64bits_withSeed(p, n, (XXH64_hash_t)seed);
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
