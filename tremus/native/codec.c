/* Page-delta coding against a direct-mapped cache of previously sent pages.
 *
 * Encoding of one page (kind byte first), chosen in this order:
 *   ZERO(1)  the page is all zero bytes;
 *   SAME(2)  cache hit (tags[slot] == pfn+1) and the page equals the cached copy;
 *   DELTA(3) cache hit and the delta below is smaller than RAW (1 + page_size);
 *   RAW(0)   otherwise: page_size bytes.
 * DELTA body: u16 nruns, then per run u16 skip_words, u16 len_words, len_words*4
 * bytes. Words are 32-bit; a run is a maximal range of differing words in which
 * single equal words between differing ones are absorbed (a one-word gap costs
 * the same 4 bytes as a run header, so merging keeps runs few); skip counts
 * words from the end of the previous run (from 0 for the first).
 * After each page, slot pfn % slots holds (pfn+1, page). The canonical form is
 * mirrored byte for byte by tremus/_pyfallback.py.
 *
 * The decoder rejects anything the encoder cannot produce at a structural level:
 * unknown kind, truncation, DELTA with no runs or an empty run, a run past the
 * page end, trailing bytes, a pfn outside the reference.
 */
#include "tremus_native.h"

enum { KIND_RAW = 0, KIND_ZERO = 1, KIND_SAME = 2, KIND_DELTA = 3 };
#define MAX_PAGE_WORDS 0xFFFF

static int check_codec_page_size(Py_ssize_t ps) {
    if (tn_check_page_size(ps) < 0)
        return -1;
    if (ps % 4 != 0 || ps / 4 > MAX_PAGE_WORDS) {
        PyErr_Format(PyExc_ValueError,
                     "page_size must be a multiple of 4 of at most %d bytes, not %zd",
                     MAX_PAGE_WORDS * 4, ps);
        return -1;
    }
    return 0;
}

static int is_zero(const unsigned char *p, size_t n) {
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t a, b, c, d;
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        memcpy(&c, p + i + 16, 8);
        memcpy(&d, p + i + 24, 8);
        acc |= a | b | c | d;
        if (acc)
            return 0;
    }
    for (; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

static inline int word_differs(const unsigned char *a, const unsigned char *b, size_t w) {
    uint32_t x, y;
    memcpy(&x, a + 4 * w, 4);
    memcpy(&y, b + 4 * w, 4);
    return x != y;
}

/* Writes the DELTA encoding (kind byte included) of page against old at o.
 * Returns the bytes written, or 0 if it would not be smaller than limit bytes
 * (in which case up to limit bytes at o may have been scribbled on). */
static size_t encode_delta(const unsigned char *page, const unsigned char *old, size_t words,
                           unsigned char *o, size_t limit) {
    size_t size = 3, nruns = 0, i = 0, prev_end = 0;
    while (i < words) {
        /* skip equal words, 16 bytes at a time where possible */
        if (i + 4 <= words && memcmp(page + 4 * i, old + 4 * i, 16) == 0) {
            i += 4;
            continue;
        }
        if (!word_differs(page, old, i)) {
            i++;
            continue;
        }
        size_t start = i, j = i + 1;
        for (;;) {
            while (j < words && word_differs(page, old, j))
                j++;
            if (j + 1 < words && word_differs(page, old, j + 1)) {
                j += 2; /* absorb a one-word gap */
                continue;
            }
            break;
        }
        size_t len = j - start;
        if (size + 4 + 4 * len >= limit)
            return 0;
        tn_store_le16(o + size, (uint16_t)(start - prev_end));
        tn_store_le16(o + size + 2, (uint16_t)len);
        memcpy(o + size + 4, page + 4 * start, 4 * len);
        size += 4 + 4 * len;
        nruns++;
        prev_end = j;
        i = j;
    }
    o[0] = KIND_DELTA;
    tn_store_le16(o + 1, (uint16_t)nruns);
    return size;
}

PyObject *tn_delta_encode(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"pages", "pfns", "cache_tags", "cache_data", "out", "page_size",
                             NULL};
    Py_buffer pages, pfns, tags, cdata, out;
    Py_ssize_t ps = TREMUS_PAGE_SIZE, n, slots, bad = -1;
    PyObject *r = NULL;
    size_t written = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&O&O&O&|n:delta_encode", kwlist, tn_conv_ro,
                                     &pages, tn_conv_ro, &pfns, tn_conv_rw, &tags, tn_conv_rw,
                                     &cdata, tn_conv_rw, &out, &ps))
        return NULL;
    if (check_codec_page_size(ps) < 0 || tn_pfn_count(&pfns, &n) < 0)
        goto done;
    if (n > pages.len / ps) {
        PyErr_Format(PyExc_ValueError, "pages has %zd bytes, too few for %zd pages", pages.len, n);
        goto done;
    }
    if (tags.len % 8 != 0 || tags.len == 0) {
        PyErr_Format(PyExc_ValueError, "cache_tags must be a non-empty array of u64 (%zd bytes)",
                     tags.len);
        goto done;
    }
    slots = tags.len / 8;
    if (slots > cdata.len / ps) {
        PyErr_Format(PyExc_ValueError, "cache_data has %zd bytes, %zd slots need more", cdata.len,
                     slots);
        goto done;
    }
    if (n > out.len / (ps + 1)) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, %zd pages need n*(page_size+1)",
                     out.len, n);
        goto done;
    }
    const unsigned char *pg = pages.buf, *pf = pfns.buf;
    unsigned char *tg = tags.buf, *cd = cdata.buf, *o = out.buf;
    size_t words = (size_t)ps / 4, ups = (size_t)ps;

    Py_BEGIN_ALLOW_THREADS
    bad = tn_first_pfn_at_or_above(pf, n, UINT64_MAX);
    if (bad < 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            const unsigned char *page = pg + (size_t)i * ups;
            uint64_t pfn = tn_load_le64(pf + 8 * i);
            size_t slot = (size_t)(pfn % (uint64_t)slots);
            unsigned char *cached = cd + slot * ups;
            int hit = tn_load_le64(tg + 8 * slot) == pfn + 1;
            size_t sz;
            if (is_zero(page, ups)) {
                o[written] = KIND_ZERO;
                sz = 1;
            } else if (hit && memcmp(page, cached, ups) == 0) {
                o[written] = KIND_SAME;
                sz = 1;
            } else if (hit && (sz = encode_delta(page, cached, words, o + written, ups + 1)) != 0) {
                /* DELTA written */
            } else {
                o[written] = KIND_RAW;
                memcpy(o + written + 1, page, ups);
                sz = ups + 1;
            }
            written += sz;
            tn_store_le64(tg + 8 * slot, pfn + 1);
            if (cached != page)
                memmove(cached, page, ups);
        }
    }
    Py_END_ALLOW_THREADS

    if (bad >= 0)
        PyErr_Format(PyExc_ValueError, "pfn at index %zd is 2**64-1 (no cache tag for it)", bad);
    else
        r = PyLong_FromSize_t(written);
done:
    PyBuffer_Release(&pages);
    PyBuffer_Release(&pfns);
    PyBuffer_Release(&tags);
    PyBuffer_Release(&cdata);
    PyBuffer_Release(&out);
    return r;
}

/* Decodes; returns NULL on success or a static error message. *consumed gets
 * the input offset reached. Never writes outside out[0 : n*ps]. */
#define FAIL(msg) do { *consumed = ip; return msg; } while (0)
static const char *decode(const unsigned char *in, size_t inlen, const unsigned char *pf,
                          size_t n, const unsigned char *ref, uint64_t reflimit,
                          unsigned char *out, size_t ps, size_t *consumed) {
    size_t ip = 0, words = ps / 4;
    for (size_t i = 0; i < n; i++) {
        unsigned char *dst = out + i * ps;
        uint64_t pfn = tn_load_le64(pf + 8 * i);
        if (pfn >= reflimit) /* checked before; pfns may change while the GIL is released */
            FAIL("pfn outside the reference");
        const unsigned char *refpage = ref + (size_t)pfn * ps;
        if (ip >= inlen)
            FAIL("truncated: missing page kind");
        unsigned char kind = in[ip++];
        switch (kind) {
        case KIND_RAW:
            if (inlen - ip < ps)
                FAIL("truncated RAW page");
            memcpy(dst, in + ip, ps);
            ip += ps;
            break;
        case KIND_ZERO:
            memset(dst, 0, ps);
            break;
        case KIND_SAME:
            memmove(dst, refpage, ps);
            break;
        case KIND_DELTA: {
            if (inlen - ip < 2)
                FAIL("truncated DELTA header");
            size_t nruns = tn_load_le16(in + ip), pos = 0;
            ip += 2;
            if (nruns == 0)
                FAIL("DELTA with no runs");
            memmove(dst, refpage, ps);
            for (size_t r = 0; r < nruns; r++) {
                if (inlen - ip < 4)
                    FAIL("truncated DELTA run header");
                size_t skip = tn_load_le16(in + ip), len = tn_load_le16(in + ip + 2);
                ip += 4;
                if (len == 0)
                    FAIL("DELTA run of length 0");
                if (skip > words - pos || len > words - pos - skip)
                    FAIL("DELTA run past the end of the page");
                pos += skip;
                if (inlen - ip < 4 * len)
                    FAIL("truncated DELTA run data");
                memcpy(dst + 4 * pos, in + ip, 4 * len);
                ip += 4 * len;
                pos += len;
            }
            break;
        }
        default:
            ip--;
            FAIL("unknown page kind");
        }
    }
    *consumed = ip;
    if (ip != inlen)
        return "trailing bytes after the last page";
    return NULL;
}
#undef FAIL

PyObject *tn_delta_decode(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"encoded", "pfns", "reference", "out", "page_size", NULL};
    Py_buffer enc, pfns, ref, out;
    Py_ssize_t ps = TREMUS_PAGE_SIZE, n, bad = -1;
    PyObject *r = NULL;
    const char *err = NULL;
    size_t consumed = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&O&O&|n:delta_decode", kwlist, tn_conv_ro,
                                     &enc, tn_conv_ro, &pfns, tn_conv_ro, &ref, tn_conv_rw, &out,
                                     &ps))
        return NULL;
    if (check_codec_page_size(ps) < 0 || tn_pfn_count(&pfns, &n) < 0)
        goto done;
    if (n > out.len / ps) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, too few for %zd pages", out.len, n);
        goto done;
    }
    uint64_t limit = (uint64_t)(ref.len / ps);

    Py_BEGIN_ALLOW_THREADS
    bad = tn_first_pfn_at_or_above(pfns.buf, n, limit);
    if (bad < 0)
        err = decode(enc.buf, (size_t)enc.len, pfns.buf, (size_t)n, ref.buf, limit, out.buf,
                     (size_t)ps, &consumed);
    Py_END_ALLOW_THREADS

    if (bad >= 0)
        PyErr_Format(PyExc_ValueError, "pfn %llu (index %zd) is outside the reference (%llu pages)",
                     (unsigned long long)tn_load_le64((const unsigned char *)pfns.buf + 8 * bad),
                     bad, (unsigned long long)limit);
    else if (err)
        PyErr_Format(PyExc_ValueError, "malformed delta stream at byte %zu: %s", consumed, err);
    else
        r = PyLong_FromSize_t(consumed);
done:
    PyBuffer_Release(&enc);
    PyBuffer_Release(&pfns);
    PyBuffer_Release(&ref);
    PyBuffer_Release(&out);
    return r;
}
