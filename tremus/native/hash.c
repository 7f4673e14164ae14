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

/* Frame checksums computed while pages are copied (gather, copy-on-write copy): a
 * PAGES frame's checksum is hash64(pages, seed=hash64(pfns)) over batch_pages
 * consecutive staged pages, so page k belongs to frame k / batch_pages. Each page
 * is hashed right after it was copied, in the cache, instead of read again from
 * memory before the frame is sent. Pages must be fed in order, each once. */
int tn_frame_sums_init(struct tn_frame_sums *f, const unsigned char *pfns, Py_ssize_t count,
                       Py_ssize_t batch_pages, unsigned char *out) {
    f->pfns = pfns;
    f->count = count;
    f->batch_pages = batch_pages;
    f->out = out;
    f->state = XXH3_createState();
    return f->state == NULL ? -1 : 0;
}

void tn_frame_sums_page(struct tn_frame_sums *f, Py_ssize_t k, const unsigned char *page,
                        size_t page_size) {
    XXH3_state_t *state = f->state;
    Py_ssize_t in_frame = k % f->batch_pages, frame = k / f->batch_pages;
    if (in_frame == 0) {
        Py_ssize_t first = k, last = k + f->batch_pages < f->count ? k + f->batch_pages : f->count;
        uint64_t seed = tn_hash64(f->pfns + 8 * first, (size_t)(8 * (last - first)), 0);
        XXH3_64bits_reset_withSeed(state, (XXH64_hash_t)seed);
    }
    XXH3_64bits_update(state, page, page_size);
    if (in_frame == f->batch_pages - 1 || k == f->count - 1) {
        uint64_t sum = htole64((uint64_t)XXH3_64bits_digest(state));
        memcpy(f->out + 8 * frame, &sum, 8);
    }
}

void tn_frame_sums_free(struct tn_frame_sums *f) {
    if (f->state != NULL)
        XXH3_freeState(f->state);
    f->state = NULL;
}

/* The optional ``checksums`` argument of gather and wp_copy: None, or a writable
 * buffer of 8 bytes for each frame of batch_pages pages. 0: none; 1: f is ready;
 * -1: an exception is set. */
int tn_frame_sums_arg(PyObject *checksums, Py_buffer *view, const unsigned char *pfns,
                      Py_ssize_t count, Py_ssize_t batch_pages, struct tn_frame_sums *f) {
    if (checksums == NULL || checksums == Py_None)
        return 0;
    if (batch_pages < 1) {
        PyErr_SetString(PyExc_ValueError, "batch_pages must be at least 1 with checksums");
        return -1;
    }
    if (PyObject_GetBuffer(checksums, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0)
        return -1;
    Py_ssize_t frames = (count + batch_pages - 1) / batch_pages;
    if (view->len < 8 * frames) {
        PyErr_Format(PyExc_ValueError, "checksums has %zd bytes, %zd frames need %zd",
                     view->len, frames, 8 * frames);
        PyBuffer_Release(view);
        return -1;
    }
    if (tn_frame_sums_init(f, pfns, count, batch_pages, view->buf) != 0) {
        PyBuffer_Release(view);
        PyErr_NoMemory();
        return -1;
    }
    return 1;
}

/* Hash64: hash64 computed piece by piece (XXH3-64 streaming), so that a receiver can
 * hash a frame's bytes as they arrive, while they are still in the cache, instead of
 * reading the whole frame again once it is complete. Hash64(seed) fed the pieces of
 * a buffer gives hash64(buffer, seed). */
typedef struct {
    PyObject_HEAD
    XXH3_state_t *state;
} Hash64Object;

static void hash64_dealloc(Hash64Object *self) {
    if (self->state != NULL)
        XXH3_freeState(self->state);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *hash64_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seed", NULL};
    PyObject *seed_obj = NULL;
    uint64_t seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:Hash64", kwlist, &seed_obj))
        return NULL;
    if (seed_obj != NULL) {
        PyObject *idx = PyNumber_Index(seed_obj);
        if (idx == NULL)
            return NULL;
        seed = (uint64_t)PyLong_AsUnsignedLongLongMask(idx);
        Py_DECREF(idx);
        if (seed == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
    }
    Hash64Object *self = (Hash64Object *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->state = XXH3_createState();
    if (self->state == NULL || XXH3_64bits_reset_withSeed(self->state, (XXH64_hash_t)seed) != XXH_OK) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static PyObject *hash64_update(Hash64Object *self, PyObject *arg) {
    Py_buffer data;
    XXH_errorcode rc;
    if (!tn_conv_ro(arg, &data))
        return NULL;
    if (data.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        rc = XXH3_64bits_update(self->state, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        rc = XXH3_64bits_update(self->state, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    if (rc != XXH_OK) {
        PyErr_SetString(PyExc_RuntimeError, "XXH3_64bits_update failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *hash64_intdigest(Hash64Object *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromUnsignedLongLong((uint64_t)XXH3_64bits_digest(self->state));
}

static PyMethodDef hash64_methods[] = {
    {"update", (PyCFunction)hash64_update, METH_O, "update(data) -> None: hash the next bytes"},
    {"intdigest", (PyCFunction)hash64_intdigest, METH_NOARGS,
     "intdigest() -> hash64 of all the bytes so far"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject tn_Hash64Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tremus._native.Hash64",
    .tp_doc = "Hash64(seed=0): hash64 fed piece by piece (update), read with intdigest().",
    .tp_basicsize = sizeof(Hash64Object),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = hash64_new,
    .tp_dealloc = (destructor)hash64_dealloc,
    .tp_methods = hash64_methods,
};
