/* Dirty bitmap to pfn list, page gather/scatter, and plain memcpy.
 *
 * gather is the copy loop of the checkpoint pause: it must run at memcpy speed.
 * Pages are copied whole with memmove (glibc's memcpy and memmove are the same
 * routine on x86-64, and memmove stays defined if a caller aliases buffers),
 * and the next page is prefetched while the current one is copied, so the TLB
 * miss and first cache misses of a random page overlap with useful work.
 */
#include "tremus_native.h"

/* ---- dirty_bitmap_to_pfns ------------------------------------------------ */

/* The word (or tail bytes) at byte offset off, OR-ed with extra, as LE u64. */
static inline uint64_t bitmap_word(const unsigned char *bm, const unsigned char *ex,
                                   Py_ssize_t off, Py_ssize_t len) {
    uint64_t w;
    if (off + 8 <= len) {
        w = tn_load_le64(bm + off);
        if (ex)
            w |= tn_load_le64(ex + off);
    } else {
        w = 0;
        for (Py_ssize_t k = 0; off + k < len; k++) {
            uint64_t b = bm[off + k];
            if (ex)
                b |= ex[off + k];
            w |= b << (8 * k);
        }
    }
    return w;
}

/* Parse (bitmap, extra=None[, out]) and, if asked, count the set bits. */
struct dirty_args {
    Py_buffer bm, ex;
    int have_bitmap, have_extra;
    Py_ssize_t count;
};

static int dirty_args_parse(PyObject *bitmap, PyObject *extra, struct dirty_args *a,
                            int count_bits) {
    memset(a, 0, sizeof *a);
    if (!tn_conv_ro(bitmap, &a->bm))
        return 0;
    a->have_bitmap = 1;
    if (extra != Py_None) {
        if (!tn_conv_rw(extra, &a->ex))
            return 0;
        a->have_extra = 1;
        if (a->ex.len != a->bm.len) {
            PyErr_Format(PyExc_ValueError, "extra has %zd bytes, bitmap has %zd", a->ex.len,
                         a->bm.len);
            return 0;
        }
    }
    if (!count_bits)
        return 1;
    const unsigned char *b = a->bm.buf, *e = a->have_extra ? a->ex.buf : NULL;
    Py_ssize_t len = a->bm.len, count = 0;
    for (Py_ssize_t off = 0; off < len; off += 8)
        count += __builtin_popcountll(bitmap_word(b, e, off, len));
    a->count = count;
    return 1;
}

static void dirty_args_release(struct dirty_args *a) {
    if (a->have_extra)
        PyBuffer_Release(&a->ex);
    if (a->have_bitmap)
        PyBuffer_Release(&a->bm);
}

/* Write the pfns (at most a->count) to out and zero extra; 0, or -1 if the bitmap
 * changed between the count and now (another thread wrote it). */
static int dirty_args_write(struct dirty_args *a, unsigned char *out) {
    const unsigned char *b = a->bm.buf, *e = a->have_extra ? a->ex.buf : NULL;
    Py_ssize_t len = a->bm.len, written = 0;
    for (Py_ssize_t off = 0; off < len && written < a->count; off += 8) {
        uint64_t w = bitmap_word(b, e, off, len);
        uint64_t base = (uint64_t)off * 8;
        if (w == UINT64_MAX && written + 64 <= a->count) {
            /* A whole word dirty (a large epoch is mostly such runs): no bit loop. */
            for (unsigned k = 0; k < 64; k++)
                tn_store_le64(out + 8 * (written + k), base + k);
            written += 64;
            continue;
        }
        while (w && written < a->count) {
            tn_store_le64(out + 8 * written, base + (uint64_t)__builtin_ctzll(w));
            written++;
            w &= w - 1;
        }
    }
    if (a->have_extra)
        memset(a->ex.buf, 0, (size_t)a->ex.len);
    if (written != a->count) {
        PyErr_SetString(PyExc_RuntimeError, "dirty bitmap changed while being read");
        return -1;
    }
    return 0;
}

PyObject *tn_dirty_bitmap_to_pfns(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"bitmap", "extra", NULL};
    PyObject *bitmap, *extra = Py_None, *result = NULL;
    struct dirty_args a;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:dirty_bitmap_to_pfns", kwlist, &bitmap,
                                     &extra))
        return NULL;
    if (!dirty_args_parse(bitmap, extra, &a, 1))
        goto done;
    if (a.count > PY_SSIZE_T_MAX / 8) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, a.count * 8);
    if (result != NULL && dirty_args_write(&a, (unsigned char *)PyBytes_AS_STRING(result)) < 0)
        Py_CLEAR(result);
done:
    dirty_args_release(&a);
    return result;
}

/* Parse (bitmap, extra, out) into a and a writable out; 0 with an exception.
 * Either way the caller releases both (dirty_args_release, PyBuffer_Release). */
static int dirty_out_args(PyObject *args, PyObject *kw, const char *format,
                          struct dirty_args *a, Py_buffer *out, int count_bits) {
    static char *kwlist[] = {"bitmap", "extra", "out", NULL};
    PyObject *bitmap, *extra, *out_obj;
    memset(a, 0, sizeof *a);
    memset(out, 0, sizeof *out);
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &bitmap, &extra, &out_obj))
        return 0;
    if (!tn_conv_rw(out_obj, out))
        return 0;
    return dirty_args_parse(bitmap, extra, a, count_bits);
}

/* The same into a caller's buffer (no allocation, no fresh pages to fault in: a
 * 16k-page epoch's 128 KiB of pfns cost ~40 us in page faults here). */
PyObject *tn_dirty_bitmap_to_pfns_into(PyObject *self, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    Py_buffer out;
    struct dirty_args a;
    (void)self;
    if (!dirty_out_args(args, kw, "OOO:dirty_bitmap_to_pfns_into", &a, &out, 1))
        goto done;
    if (a.count > out.len / 8) {
        PyErr_Format(PyExc_ValueError, "out holds %zd pfns, %zd pages are dirty", out.len / 8,
                     a.count);
        goto done;
    }
    if (dirty_args_write(&a, out.buf) == 0)
        result = PyLong_FromSsize_t(a.count);
done:
    dirty_args_release(&a);
    PyBuffer_Release(&out);
    return result;
}

/* out = bitmap | extra (extra may be NULL, else zeroed); the bits set in out. */
Py_ssize_t tn_bitmap_merge(const unsigned char *bitmap, unsigned char *extra, unsigned char *out,
                           Py_ssize_t len) {
    Py_ssize_t off = 0, count = 0;
    for (; off + 8 <= len; off += 8) {
        uint64_t w = bitmap_word(bitmap, extra, off, len);
        tn_store_le64(out + off, w);
        count += __builtin_popcountll(w);
    }
    for (; off < len; off++) {
        out[off] = (unsigned char)(bitmap[off] | (extra ? extra[off] : 0));
        count += __builtin_popcount(out[off]);
    }
    if (extra)
        memset(extra, 0, (size_t)len);
    return count;
}

/* dirty_bitmap_merge(bitmap, extra, out) -> count: out = bitmap | extra, extra
 * zeroed, and how many bits are set: one epoch's dirty pages as a bitmap of its
 * own, which copy-on-write protects from in the pause (dirty_bitmap_to_pfns_into
 * then lists them after the resume). */
PyObject *tn_dirty_bitmap_merge(PyObject *self, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    Py_buffer out;
    struct dirty_args a;
    (void)self;
    if (!dirty_out_args(args, kw, "OOO:dirty_bitmap_merge", &a, &out, 0))
        goto done;
    if (out.len != a.bm.len) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, bitmap has %zd", out.len, a.bm.len);
        goto done;
    }
    /* Counted as it is merged, not in a pass of its own. */
    result = PyLong_FromSsize_t(
        tn_bitmap_merge(a.bm.buf, a.have_extra ? a.ex.buf : NULL, out.buf, a.bm.len));
done:
    dirty_args_release(&a);
    PyBuffer_Release(&out);
    return result;
}

/* ---- gather / scatter ---------------------------------------------------- */

#include <pthread.h>
#include <unistd.h>

/* How far ahead the first line of a page is prefetched. Touching a page a few
 * copies early starts its TLB walk and DRAM access in the shadow of the current
 * copy; measured on the reference machine, distance 4 plus a sparse prefetch of
 * the next page reaches memcpy speed, while prefetching every line of the next
 * page is slower than no prefetch at all (it competes with the copy). */
#define PREFETCH_AHEAD 4

static inline void prefetch_first(const unsigned char *p, int write) {
    if (write)
        __builtin_prefetch(p, 1, 3);
    else
        __builtin_prefetch(p, 0, 3);
}

static inline void prefetch_sparse(const unsigned char *p, Py_ssize_t ps, int write) {
    Py_ssize_t lim = ps < 4096 ? ps : 4096;
    for (Py_ssize_t o = 256; o < lim; o += 256)
        prefetch_first(p + o, write);
}

/* One thread's share of a page copy: pages [start, end) of the pfn list. */
struct copy_job {
    const unsigned char *pf;
    unsigned char *rg, *pk;
    Py_ssize_t ps, start, end;
    uint64_t limit;
    int to_packed;
    Py_ssize_t bad; /* first out-of-range index, or -1 */
    int stream;     /* scatter with non-temporal stores */
    struct tn_frame_sums *sums; /* gather: frame checksums of the copied pages, or NULL */
};

#if defined(__SSE2__)
#include <emmintrin.h>
/* A scatter into the backup's replica writes pages nobody reads soon: streaming
 * stores skip the read-for-ownership of each destination line, a third of the
 * memory traffic of an ordinary copy. */
static void copy_page_nontemporal(unsigned char *dst, const unsigned char *src, size_t n) {
    for (size_t o = 0; o < n; o += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + o));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + o + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + o + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + o + 48));
        _mm_stream_si128((__m128i *)(dst + o), a);
        _mm_stream_si128((__m128i *)(dst + o + 16), b);
        _mm_stream_si128((__m128i *)(dst + o + 32), c);
        _mm_stream_si128((__m128i *)(dst + o + 48), d);
    }
}
#define CAN_STREAM 1
#else
static void copy_page_nontemporal(unsigned char *dst, const unsigned char *src, size_t n) {
    memmove(dst, src, n);
}
#define CAN_STREAM 0
#endif

static void copy_range(struct copy_job *job) {
    const unsigned char *pf = job->pf;
    unsigned char *rg = job->rg, *pk = job->pk;
    Py_ssize_t ps = job->ps, n = job->end;
    uint64_t limit = job->limit;
    int w = !job->to_packed;
    job->bad = -1;
    for (Py_ssize_t i = job->start + 1; i < n && i < job->start + PREFETCH_AHEAD; i++) {
        uint64_t q = tn_load_le64(pf + 8 * i);
        if (q < limit)
            prefetch_first(rg + (size_t)q * (size_t)ps, w);
    }
    for (Py_ssize_t i = job->start; i < n; i++) {
        uint64_t pfn = tn_load_le64(pf + 8 * i);
        if (__builtin_expect(pfn >= limit, 0)) {
            job->bad = i;
            return;
        }
        unsigned char *page = rg + (size_t)pfn * (size_t)ps;
        if (i + PREFETCH_AHEAD < n) {
            uint64_t q = tn_load_le64(pf + 8 * (i + PREFETCH_AHEAD));
            if (q < limit)
                prefetch_first(rg + (size_t)q * (size_t)ps, w);
        }
        if (i + 1 < n) {
            uint64_t q = tn_load_le64(pf + 8 * (i + 1));
            if (q < limit)
                prefetch_sparse(rg + (size_t)q * (size_t)ps, ps, w);
        }
        if (job->to_packed) {
            memmove(pk + (size_t)i * (size_t)ps, page, (size_t)ps);
            if (job->sums != NULL)
                tn_frame_sums_page(job->sums, i, pk + (size_t)i * (size_t)ps, (size_t)ps);
        } else if (job->stream)
            copy_page_nontemporal(page, pk + (size_t)i * (size_t)ps, (size_t)ps);
        else
            memmove(page, pk + (size_t)i * (size_t)ps, (size_t)ps);
    }
}

static void *copy_thread(void *arg) {
    copy_range(arg);
    return NULL;
}

/* A scatter of at least this many bytes is split over two threads: the backup
 * applies a checkpoint between receiving it and acknowledging it, so it is on the
 * stream's critical path, and a second core adds copy bandwidth. (gather stays on
 * one thread: measured on a paused guest's freshly written RAM, two were slower.) */
#define PARALLEL_SCATTER_MIN_BYTES (1 << 20)

static long tn_cpu_count(void) {
    static long count;
    if (count == 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        count = c > 0 ? c : 1;
    }
    return count;
}

/* Copies pages between a paged region and a packed buffer.
 * to_packed = 1: gather (region -> packed), 0: scatter (packed -> region). */
static PyObject *page_copy(Py_buffer *region, Py_buffer *pfns, Py_buffer *packed,
                           Py_ssize_t ps, int to_packed, struct tn_frame_sums *sums) {
    Py_ssize_t n, bad = -1;
    if (tn_check_page_size(ps) < 0 || tn_pfn_count(pfns, &n) < 0)
        return NULL;
    if (n > packed->len / ps) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, %zd pages of %zd need %zd",
                     to_packed ? "dst" : "src", packed->len, n, ps,
                     n <= PY_SSIZE_T_MAX / ps ? n * ps : PY_SSIZE_T_MAX);
        return NULL;
    }
    const unsigned char *pf = pfns->buf;
    uint64_t limit = (uint64_t)(region->len / ps);

    Py_BEGIN_ALLOW_THREADS
    /* Validate every pfn before copying anything (scatter must not half-apply);
     * the copy loop checks each pfn again as it loads it, because another
     * thread could change the pfn buffer while the GIL is released. */
    bad = tn_first_pfn_at_or_above(pf, n, limit);
    if (bad < 0) {
        /* Streaming stores need 16-byte aligned destinations (pages of a
         * page-aligned region are) and whole 64-byte lines. */
        int stream = CAN_STREAM && !to_packed && ps % 64 == 0 &&
                     ((uintptr_t)region->buf & 15) == 0 &&
                     (size_t)n * (size_t)ps >= PARALLEL_SCATTER_MIN_BYTES;
        struct copy_job jobs[2] = {
            {pf, region->buf, packed->buf, ps, 0, n, limit, to_packed, -1, stream, sums},
            {pf, region->buf, packed->buf, ps, n / 2, n, limit, to_packed, -1, stream, NULL},
        };
        pthread_t helper;
        int parallel = !to_packed && (size_t)n * (size_t)ps >= PARALLEL_SCATTER_MIN_BYTES &&
                       tn_cpu_count() > 1;
        if (parallel) {
            jobs[0].end = n / 2;
            parallel = pthread_create(&helper, NULL, copy_thread, &jobs[1]) == 0;
            if (!parallel)
                jobs[0].end = n;
        }
        copy_range(&jobs[0]);
        if (parallel)
            pthread_join(helper, NULL);
#if CAN_STREAM
        if (stream)
            _mm_sfence(); /* streamed stores are visible before we return */
#endif
        bad = jobs[0].bad >= 0 ? jobs[0].bad : (parallel ? jobs[1].bad : -1);
    }
    Py_END_ALLOW_THREADS

    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "pfn %llu (index %zd) is outside %s (%llu pages)",
                     (unsigned long long)tn_load_le64(pf + 8 * bad), bad,
                     to_packed ? "src" : "dst", (unsigned long long)limit);
        return NULL;
    }
    return PyLong_FromSsize_t(n * ps);
}

PyObject *tn_gather(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"src", "pfns", "dst", "page_size", "checksums", "batch_pages",
                             NULL};
    Py_buffer src, pfns, dst, sums_view;
    Py_ssize_t ps = TREMUS_PAGE_SIZE, batch_pages = 0;
    PyObject *checksums = NULL, *r = NULL;
    struct tn_frame_sums sums;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&O&|nOn:gather", kwlist, tn_conv_ro, &src,
                                     tn_conv_ro, &pfns, tn_conv_rw, &dst, &ps, &checksums,
                                     &batch_pages))
        return NULL;
    int hashing = tn_frame_sums_arg(checksums, &sums_view, pfns.buf, pfns.len / 8, batch_pages,
                                    &sums);
    if (hashing >= 0) {
        r = page_copy(&src, &pfns, &dst, ps, 1, hashing ? &sums : NULL);
        if (hashing) {
            tn_frame_sums_free(&sums);
            PyBuffer_Release(&sums_view);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&pfns);
    PyBuffer_Release(&dst);
    return r;
}

PyObject *tn_scatter(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "pfns", "src", "page_size", NULL};
    Py_buffer src, pfns, dst;
    Py_ssize_t ps = TREMUS_PAGE_SIZE;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&O&|n:scatter", kwlist, tn_conv_rw, &dst,
                                     tn_conv_ro, &pfns, tn_conv_ro, &src, &ps))
        return NULL;
    PyObject *r = page_copy(&dst, &pfns, &src, ps, 0, NULL);
    PyBuffer_Release(&src);
    PyBuffer_Release(&pfns);
    PyBuffer_Release(&dst);
    return r;
}

/* ---- pfn list check ------------------------------------------------------ */

/* pfns_ascending_below(pfns, limit, after=-1) -> bool: every pfn is below limit,
 * the first is above after, and each is above the one before it. Every PAGES
 * frame is checked so, by the backup (and by the primary, of its own frames):
 * a thousand pfns a frame, without a branch per pfn. */
PyObject *tn_pfns_ascending_below(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"pfns", "limit", "after", NULL};
    Py_buffer pfns;
    unsigned long long limit;
    long long after = -1;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&K|L:pfns_ascending_below", kwlist,
                                     tn_conv_ro, &pfns, &limit, &after))
        return NULL;
    if (tn_pfn_count(&pfns, &n) < 0) {
        PyBuffer_Release(&pfns);
        return NULL;
    }
    const unsigned char *p = pfns.buf;
    int ok = 1;
    if (n > 0) {
        uint64_t first = tn_load_le64(p), last = tn_load_le64(p + 8 * (n - 1));
        unsigned bad = 0;
        for (Py_ssize_t i = 1; i < n; i++)
            bad |= tn_load_le64(p + 8 * i) <= tn_load_le64(p + 8 * (i - 1));
        /* Ascending, so the last is the largest. */
        ok = !bad && last < (uint64_t)limit && (after < 0 || first > (uint64_t)after);
    }
    PyBuffer_Release(&pfns);
    return PyBool_FromLong(ok);
}

/* ---- memcpy -------------------------------------------------------------- */

PyObject *tn_memcpy(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dst", "src", NULL};
    Py_buffer src, dst;
    PyObject *r = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&:memcpy", kwlist, tn_conv_rw, &dst,
                                     tn_conv_ro, &src))
        return NULL;
    if (dst.len < src.len) {
        PyErr_Format(PyExc_ValueError, "dst has %zd bytes, src has %zd", dst.len, src.len);
    } else {
        Py_BEGIN_ALLOW_THREADS
        memmove(dst.buf, src.buf, (size_t)src.len);
        Py_END_ALLOW_THREADS
        r = PyLong_FromSsize_t(src.len);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return r;
}

/* ---- uninitialised buffers ------------------------------------------------ */

/* A bytearray whose contents are not zeroed: for buffers that are about to be
 * overwritten whole (a received frame's payload), zeroing is a wasted pass over
 * memory on the checkpoint stream's hot path. */
PyObject *tn_empty_bytearray(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"size", NULL};
    Py_ssize_t size;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n:empty_bytearray", kwlist, &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must not be negative");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, size);
}
