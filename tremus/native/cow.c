/* Copy-on-write capture of a checkpoint's dirty pages with userfaultfd write-protect.
 *
 * In the pause the dirty pages are write-protected (wp_protect), which costs about a
 * tenth of copying them; the guest resumes; then wp_copy copies them into the
 * staging buffer in pfn order while it serves write faults: a guest (or VMM) write
 * to a page not yet copied blocks in the kernel until this loop copies that page
 * first and lifts its protection. Pages are released run by run as the sweep
 * passes them. Whatever happens, every page protected is unprotected before
 * wp_copy returns, so a guest is never left blocked.
 *
 * Debian's headers predate some of the kernel's features: the few constants that
 * may be missing are defined here.
 */
#include "tremus_native.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Set or lift write protection on [addr, addr + len); lifting it wakes waiters. */
static int wp_range(int fd, uint64_t addr, uint64_t len, int protect) {
    struct uffdio_writeprotect wp = {
        .range = {.start = addr, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    while (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) != 0) {
        if (errno != EAGAIN && errno != EINTR)
            return -1;
    }
    return 0;
}

PyObject *tn_wp_open(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ram", NULL};
    Py_buffer ram = {0};
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&:wp_open", kwlist, tn_conv_rw, &ram))
        return NULL;
    uint64_t addr = (uint64_t)(uintptr_t)ram.buf, len = (uint64_t)ram.len;
    PyBuffer_Release(&ram);
    if (addr % TREMUS_PAGE_SIZE || len % TREMUS_PAGE_SIZE || len == 0) {
        PyErr_SetString(PyExc_ValueError, "ram must be a non-empty page-aligned mapping");
        return NULL;
    }
    /* Shared memory needs the shmem feature; anonymous memory works without it. */
    const uint64_t tries[2] = {UFFD_FEATURE_WP_HUGETLBFS_SHMEM, 0};
    const char *step = "userfaultfd";
    for (int t = 0; t < 2; t++) {
        int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "userfaultfd");
        struct uffdio_api api = {.api = UFFD_API, .features = tries[t]};
        if (ioctl(fd, UFFDIO_API, &api) != 0) {
            step = "UFFDIO_API";
            close(fd);
            continue;
        }
        struct uffdio_register reg = {
            .range = {.start = addr, .len = len},
            .mode = UFFDIO_REGISTER_MODE_WP,
        };
        if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
            step = "UFFDIO_REGISTER (write-protect mode)";
            close(fd);
            continue;
        }
        if (!(reg.ioctls & ((uint64_t)1 << _UFFDIO_WRITEPROTECT))) {
            close(fd);
            errno = EOPNOTSUPP;
            step = "UFFDIO_WRITEPROTECT";
            continue;
        }
        return PyLong_FromLong(fd);
    }
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, step);
}

/* Validates pfns against the RAM; returns the page count or -1 with an exception.
 * Ascending is checked without a branch per page (a pause may hold tens of
 * thousands); the slow walk only runs to name the offender. */
static Py_ssize_t check_pfns(const Py_buffer *pfns, Py_ssize_t ram_len) {
    if (pfns->len % 8) {
        PyErr_Format(PyExc_ValueError, "pfns has %zd bytes, not a multiple of 8", pfns->len);
        return -1;
    }
    Py_ssize_t n = pfns->len / 8;
    uint64_t pages = (uint64_t)ram_len / TREMUS_PAGE_SIZE;
    if (n == 0)
        return 0;
    const unsigned char *p = pfns->buf;
    unsigned descending = 0;
    for (Py_ssize_t i = 1; i < n; i++)
        descending |= tn_load_le64(p + 8 * i) <= tn_load_le64(p + 8 * (i - 1));
    if (!descending && tn_load_le64(p + 8 * (n - 1)) < pages)
        return n;
    uint64_t last = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t pfn = tn_load_le64(p + 8 * i);
        if (pfn >= pages || (i && pfn <= last)) {
            PyErr_Format(PyExc_ValueError,
                         "pfns must be ascending and below %llu (pfn %llu at %zd)",
                         (unsigned long long)pages, (unsigned long long)pfn, i);
            return -1;
        }
        last = pfn;
    }
    return n;
}

/* Protection is set and lifted in units of unit_pages pages aligned in the address
 * space (a transparent huge page is one unit: it stays whole, and protecting it is
 * one page-table entry however many of its pages are dirty). unit_pages 1 is per page. */
struct units {
    uint64_t shift, size, pages;
};

static struct units units_of(const Py_buffer *ram, Py_ssize_t unit_pages) {
    struct units u = {.size = unit_pages < 1 ? 1 : (uint64_t)unit_pages,
                      .pages = (uint64_t)ram->len / TREMUS_PAGE_SIZE};
    u.shift = ((uint64_t)(uintptr_t)ram->buf / TREMUS_PAGE_SIZE) % u.size;
    return u;
}

static inline uint64_t unit_of(const struct units *u, uint64_t pfn) {
    return (pfn + u->shift) / u->size;
}

/* [first, end) pages of ram covered by units a..b, clipped to ram. */
static inline void unit_span(const struct units *u, uint64_t a, uint64_t b, uint64_t *first,
                             uint64_t *end) {
    uint64_t lo = a * u->size, hi = (b + 1) * u->size;
    *first = lo > u->shift ? lo - u->shift : 0;
    *end = hi - u->shift < u->pages ? hi - u->shift : u->pages;
}

/* From index j, the end of the run of dirty pages in unit *b or the units right
 * after it (*b advances to the last unit taken), stopping at a new unit once
 * max_pages pages were taken since index from (max_pages < 0: no limit). The pfns
 * are ascending and distinct (check_pfns), so the end of a unit is found by a
 * binary search in at most unit_pages of them, not by reading each: a large
 * epoch has tens of thousands. */
static Py_ssize_t next_unit(const unsigned char *p, Py_ssize_t j, Py_ssize_t n,
                            const struct units *u, uint64_t *b, Py_ssize_t max_pages) {
    Py_ssize_t from = j - 1;
    uint64_t boundary = (*b + 1) * u->size - u->shift; /* first pfn of unit *b + 1 */
    while (j < n) {
        /* pfns[j - 1] < boundary, and pfns[j - 1 + d] >= pfns[j - 1] + d: the first
         * index at or past the boundary is at most j - 1 + (boundary - pfns[j - 1]). */
        uint64_t gap = boundary - tn_load_le64(p + 8 * (j - 1));
        Py_ssize_t lo = j, hi = gap < (uint64_t)(n - j + 1) ? j - 1 + (Py_ssize_t)gap : n;
        if (hi > lo && tn_load_le64(p + 8 * (hi - 1)) < boundary)
            lo = hi; /* the unit's pages are all dirty (or all the rest are in it) */
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (tn_load_le64(p + 8 * mid) < boundary)
                lo = mid + 1;
            else
                hi = mid;
        }
        j = lo;
        if (j == n)
            break;
        uint64_t pfn = tn_load_le64(p + 8 * j);
        if (pfn >= boundary + u->size || (max_pages >= 0 && j - from >= max_pages))
            break;
        ++*b;
        boundary += u->size;
        j++;
    }
    return j;
}

/* Protection set by one call, run by run: on a failure what it protected is
 * lifted again (nothing may stay protected unserved) and the errno kept. A call
 * that lifts (wp_lift_bitmap) stops at its first failure. */
struct protecting {
    int fd, failed, lift;
    uint64_t base, from, to;
    Py_ssize_t runs;
};

static void protect_run(struct protecting *p, uint64_t first, uint64_t end) {
    if (wp_range(p->fd, p->base + first * TREMUS_PAGE_SIZE, (end - first) * TREMUS_PAGE_SIZE,
                 !p->lift) != 0) {
        p->failed = errno;
        if (!p->lift && p->to > p->from)
            wp_range(p->fd, p->base + p->from * TREMUS_PAGE_SIZE,
                     (p->to - p->from) * TREMUS_PAGE_SIZE, 0);
        return;
    }
    if (!p->runs)
        p->from = first;
    p->to = end;
    p->runs++;
}

static PyObject *protected_result(const struct protecting *p) {
    if (p->failed) {
        errno = p->failed;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "UFFDIO_WRITEPROTECT");
    }
    return PyLong_FromSsize_t(p->runs);
}

/* Write-protect the units holding pages pfns[] of ram: one ioctl per run of
 * consecutive units. */
PyObject *tn_wp_protect(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "ram", "pfns", "unit_pages", NULL};
    int fd;
    Py_ssize_t unit_pages = 1;
    Py_buffer ram = {0}, pfns = {0};
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&O&|n:wp_protect", kwlist, &fd, tn_conv_rw,
                                     &ram, tn_conv_ro, &pfns, &unit_pages))
        return NULL;
    Py_ssize_t n = check_pfns(&pfns, ram.len);
    if (n < 0)
        goto done;
    struct units u = units_of(&ram, unit_pages);
    struct protecting prot = {.fd = fd, .base = (uint64_t)(uintptr_t)ram.buf};
    const unsigned char *p = pfns.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !prot.failed;) {
        uint64_t a = unit_of(&u, tn_load_le64(p + 8 * i)), b = a;
        Py_ssize_t j = next_unit(p, i + 1, n, &u, &b, -1);
        uint64_t first, end;
        unit_span(&u, a, b, &first, &end);
        protect_run(&prot, first, end);
        i = j;
    }
    Py_END_ALLOW_THREADS
    result = protected_result(&prot);
done:
    PyBuffer_Release(&ram);
    PyBuffer_Release(&pfns);
    return result;
}

/* The first set bit of bitmap at or after from, or limit if none before it. */
static uint64_t next_set_bit(const unsigned char *bm, uint64_t from, uint64_t limit) {
    while (from < limit) {
        uint64_t word = tn_load_le64(bm + 8 * (from / 64)) >> (from % 64);
        if (word) {
            uint64_t bit = from + (uint64_t)__builtin_ctzll(word);
            return bit < limit ? bit : limit;
        }
        from = (from / 64 + 1) * 64;
    }
    return limit;
}

/* Protect the units of the pages set in bm, one ioctl per run of consecutive units. */
static void protect_bitmap_units(struct protecting *prot, const struct units *u,
                                 const unsigned char *bm) {
    uint64_t pages = u->pages;
    uint64_t page = next_set_bit(bm, 0, pages);
    while (page < pages && !prot->failed) {
        /* A run of consecutive units, each holding a dirty page. */
        uint64_t a = unit_of(u, page), b = a, first, end;
        for (;;) {
            uint64_t next_first, next_end;
            unit_span(u, b + 1, b + 1, &next_first, &next_end);
            if (next_first >= pages || next_set_bit(bm, next_first, next_end) >= next_end)
                break;
            b++;
        }
        unit_span(u, a, b, &first, &end);
        protect_run(prot, first, end);
        page = next_set_bit(bm, end, pages);
    }
}

/* Parse (fd, ram, bitmap, unit_pages) and check the bitmap covers ram. */
static int protect_bitmap_args(PyObject *args, PyObject *kw, const char *format, char **kwlist,
                               PyObject **slot, int *fd, Py_buffer *ram, Py_buffer *bitmap,
                               struct units *u) {
    Py_ssize_t unit_pages = 1;
    int ok = slot != NULL
        ? PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, slot, fd, tn_conv_rw, ram,
                                      tn_conv_ro, bitmap, &unit_pages)
        : PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, fd, tn_conv_rw, ram,
                                      tn_conv_ro, bitmap, &unit_pages);
    if (!ok)
        return 0;
    *u = units_of(ram, unit_pages);
    uint64_t words = (u->pages + 63) / 64;
    if ((uint64_t)bitmap->len < 8 * words) {
        PyErr_Format(PyExc_ValueError, "bitmap has %zd bytes, %llu pages need %llu", bitmap->len,
                     (unsigned long long)u->pages, (unsigned long long)(8 * words));
        return 0;
    }
    return 1;
}

/* Set (or lift) protection on the units of the pages set in a bitmap, in one call. */
static PyObject *bitmap_units_call(PyObject *args, PyObject *kw, const char *format, int lift) {
    static char *kwlist[] = {"fd", "ram", "bitmap", "unit_pages", NULL};
    int fd;
    Py_buffer ram = {0}, bitmap = {0};
    struct units u;
    PyObject *result = NULL;
    if (protect_bitmap_args(args, kw, format, kwlist, NULL, &fd, &ram, &bitmap, &u)) {
        struct protecting prot = {.fd = fd, .lift = lift, .base = (uint64_t)(uintptr_t)ram.buf};
        Py_BEGIN_ALLOW_THREADS
        protect_bitmap_units(&prot, &u, bitmap.buf);
        Py_END_ALLOW_THREADS
        result = protected_result(&prot);
    }
    PyBuffer_Release(&ram);
    PyBuffer_Release(&bitmap);
    return result;
}

/* wp_protect_bitmap(fd, ram, bitmap, unit_pages=1) -> ioctls made
 *
 * wp_protect for the pages whose bit is set in bitmap (bit i of little-endian u64
 * word i / 64 is page i), without listing them first: in the pause, listing
 * sixteen thousand pfns and reading them back cost more than protecting their
 * 2 MiB units. */
PyObject *tn_wp_protect_bitmap(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return bitmap_units_call(args, kw, "iO&O&|n:wp_protect_bitmap", 0);
}

/* wp_lift_bitmap(fd, ram, bitmap, unit_pages=1) -> ioctls made
 *
 * Lift write protection from the units of the pages set in bitmap. On units that
 * hold none it changes no page-table entry, but the kernel still tells the
 * mapping's MMU notifiers the range changed: KVM walks its reverse map of those
 * pages and drops its mappings of them, as a write-protect of them would. */
PyObject *tn_wp_lift_bitmap(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return bitmap_units_call(args, kw, "iO&O&|n:wp_lift_bitmap", 1);
}

/* wp_protect_bitmap posted to a parked vCPU thread (see struct tn_parked_work): the
 * write-protect, the longest step of a large epoch's pause, runs on that thread's
 * CPU while the pausing thread snapshots the state. The caller keeps ram and bitmap
 * alive and unchanged until wp_protect_bitmap_finish. */
struct wp_job {
    struct tn_parked_work work;
    struct protecting prot;
    struct units units;
    const unsigned char *bitmap;
    /* A capture (wp_capture_post): the dirty log is read into bitmap first, and the
     * protect runs only for min_pages dirty pages or more. */
    int vm_fd, log_err, protecting;
    unsigned int mem_slot;
    unsigned char *log, *extra;
    size_t log_len;
    Py_ssize_t min_pages, count;
};

static void wp_job_run(struct tn_parked_work *work) {
    struct wp_job *job = (struct wp_job *)work;
    if (job->protecting)
        protect_bitmap_units(&job->prot, &job->units, job->bitmap);
}

static void capture_read_log(struct tn_parked_work *work) {
    struct wp_job *job = (struct wp_job *)work;
    int rc = tn_read_dirty_log(job->vm_fd, job->mem_slot, job->log, job->extra,
                               (unsigned char *)job->bitmap, job->log_len, &job->count);
    job->log_err = rc < 0 ? -rc : 0;
    job->protecting = rc == 0 && job->count >= job->min_pages;
}

/* The job protects the units of ram (userfaultfd fd) holding the pages set in bitmap. */
static void job_protects(struct wp_job *job, int fd, const Py_buffer *ram, struct units u,
                         const unsigned char *bitmap) {
    job->prot.fd = fd;
    job->prot.base = (uint64_t)(uintptr_t)ram->buf;
    job->units = u;
    job->bitmap = bitmap;
}

/* Claim an idle (or finished) slot for a job; ValueError if it holds unfinished work. */
static struct wp_job *claim_slot(PyObject *slot_obj, Py_buffer *slot) {
    struct wp_job *job = tn_parked_work_slot(slot_obj, slot);
    if (job == NULL)
        return NULL;
    uint32_t state = __atomic_load_n(&job->work.state, __ATOMIC_ACQUIRE);
    if (state == TN_WORK_POSTED || state == TN_WORK_TAKEN) {
        PyErr_SetString(PyExc_ValueError, "the slot holds work not finished yet");
        PyBuffer_Release(slot);
        return NULL;
    }
    memset(job, 0, sizeof *job);
    job->work.run = wp_job_run;
    return job;
}

_Static_assert(sizeof(struct wp_job) <= TN_PARKED_WORK_SLOT_BYTES, "parked work slot too small");

/* wp_protect_bitmap_post(slot, fd, ram, bitmap, unit_pages=1): post the protect. */
PyObject *tn_wp_protect_bitmap_post(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"slot", "fd", "ram", "bitmap", "unit_pages", NULL};
    PyObject *slot_obj = NULL, *result = NULL;
    Py_buffer slot = {0}, ram = {0}, bitmap = {0};
    struct units u;
    int fd;
    (void)self;
    if (!protect_bitmap_args(args, kw, "OiO&O&|n:wp_protect_bitmap_post", kwlist, &slot_obj, &fd,
                             &ram, &bitmap, &u))
        goto done;
    struct wp_job *job = claim_slot(slot_obj, &slot);
    if (job == NULL)
        goto done;
    job_protects(job, fd, &ram, u, bitmap.buf);
    job->protecting = 1;
    __atomic_store_n(&job->work.state, TN_WORK_POSTED, __ATOMIC_RELEASE);
    result = Py_NewRef(Py_None);
    PyBuffer_Release(&slot);
done:
    PyBuffer_Release(&ram);
    PyBuffer_Release(&bitmap);
    return result;
}

static void capture_read_log(struct tn_parked_work *work);

/* Parse (slot) and give its job, posted and of the kind asked for (a capture, or any
 * protect); NULL with ValueError otherwise. The caller releases slot. */
static struct wp_job *posted_job(PyObject *args, PyObject *kw, const char *format,
                                 Py_buffer *slot, int capture) {
    static char *kwlist[] = {"slot", NULL};
    PyObject *slot_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &slot_obj))
        return NULL;
    struct wp_job *job = tn_parked_work_slot(slot_obj, slot);
    if (job == NULL)
        return NULL;
    if (__atomic_load_n(&job->work.state, __ATOMIC_ACQUIRE) == TN_WORK_IDLE ||
        job->work.run != wp_job_run || (capture && job->work.early != capture_read_log)) {
        PyErr_Format(PyExc_ValueError, "no %s was posted to this slot",
                     capture ? "capture" : "protect");
        PyBuffer_Release(slot);
        return NULL;
    }
    return job;
}

/* wp_protect_bitmap_finish(slot) -> (ioctls made, ran on the parked thread, done at
 * CLOCK_MONOTONIC ns): done once it returns (run here if nobody took it), as
 * wp_protect_bitmap would have returned; the slot is idle again. */
PyObject *tn_wp_protect_bitmap_finish(PyObject *self, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    Py_buffer slot = {0};
    (void)self;
    struct wp_job *job = posted_job(args, kw, "O:wp_protect_bitmap_finish", &slot, 0);
    if (job == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    tn_parked_work_wait(&job->work);
    Py_END_ALLOW_THREADS
    PyObject *protected = protected_result(&job->prot);
    if (protected != NULL) {
        result = Py_BuildValue("(NOK)", protected, job->work.by_parked ? Py_True : Py_False,
                               (unsigned long long)job->work.done_ns);
    }
    __atomic_store_n(&job->work.state, TN_WORK_IDLE, __ATOMIC_RELEASE);
    PyBuffer_Release(&slot);
    return result;
}

/* wp_capture_post(slot, vm_fd, mem_slot, log, extra, out, fd, ram, unit_pages=1,
 * min_pages=1): post a capture to a vCPU thread about to park (kvm_wait_run's work):
 * as it parks, before it reads the registers, it reads the dirty log of KVM slot
 * mem_slot into log and merges it with extra (the VMM's own writes, zeroed) into
 * out, as get_dirty_log does; after them, if min_pages or more pages are dirty, it
 * write-protects their units as wp_protect_bitmap(fd, ram, out) would. The pause
 * then starts with the longest step already under way. log, extra (or None) and out
 * are as large as each other and out covers ram; the caller keeps all of them alive
 * and unchanged until wp_capture_count (and wp_protect_bitmap_finish if it said the
 * pages are being protected). */
PyObject *tn_wp_capture_post(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"slot", "vm_fd", "mem_slot", "log", "extra", "out", "fd",
                             "ram", "unit_pages", "min_pages", NULL};
    PyObject *slot_obj, *extra_obj, *result = NULL;
    Py_buffer slot = {0}, log = {0}, extra = {0}, out = {0}, ram = {0};
    int vm_fd, fd;
    unsigned int mem_slot;
    Py_ssize_t unit_pages = 1, min_pages = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiIO&OO&iO&|nn:wp_capture_post", kwlist,
                                     &slot_obj, &vm_fd, &mem_slot, tn_conv_rw, &log, &extra_obj,
                                     tn_conv_rw, &out, &fd, tn_conv_rw, &ram, &unit_pages,
                                     &min_pages))
        return NULL;
    if (extra_obj != Py_None && !tn_conv_rw(extra_obj, &extra))
        goto done;
    struct units u = units_of(&ram, unit_pages);
    if (log.len == 0 || log.len % 8 != 0 || out.len != log.len ||
        (extra.buf != NULL && extra.len != log.len)) {
        PyErr_Format(PyExc_ValueError, "log (%zd bytes) must be a non-empty multiple of 8 bytes, "
                     "as large as out (%zd) and extra (%zd)", log.len, out.len,
                     extra.buf != NULL ? extra.len : log.len);
        goto done;
    }
    if ((uint64_t)out.len < 8 * ((u.pages + 63) / 64)) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, %llu pages need %llu", out.len,
                     (unsigned long long)u.pages, (unsigned long long)(8 * ((u.pages + 63) / 64)));
        goto done;
    }
    struct wp_job *job = claim_slot(slot_obj, &slot);
    if (job == NULL)
        goto done;
    job_protects(job, fd, &ram, u, out.buf);
    job->vm_fd = vm_fd;
    job->mem_slot = mem_slot;
    job->log = log.buf;
    job->extra = extra.buf;
    job->log_len = (size_t)log.len;
    job->min_pages = min_pages;
    job->work.early = capture_read_log;
    __atomic_store_n(&job->work.state, TN_WORK_POSTED, __ATOMIC_RELEASE);
    result = Py_NewRef(Py_None);
    PyBuffer_Release(&slot);
done:
    if (extra.buf != NULL)
        PyBuffer_Release(&extra);
    PyBuffer_Release(&log);
    PyBuffer_Release(&out);
    PyBuffer_Release(&ram);
    return result;
}

/* wp_capture_count(slot) -> (dirty pages, protecting): the capture posted to slot has
 * read the dirty log (run here, whole, if no thread took it). protecting: its protect
 * runs (or ran), and wp_protect_bitmap_finish must follow; else the slot is done
 * with. OSError if the dirty log could not be read (nothing is protected then). */
PyObject *tn_wp_capture_count(PyObject *self, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    Py_buffer slot = {0};
    (void)self;
    struct wp_job *job = posted_job(args, kw, "O:wp_capture_count", &slot, 1);
    if (job == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    tn_parked_work_wait_early(&job->work);
    Py_END_ALLOW_THREADS
    if (job->log_err) {
        errno = job->log_err;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "KVM_GET_DIRTY_LOG");
    } else {
        result = Py_BuildValue("(nO)", job->count, job->protecting ? Py_True : Py_False);
    }
    PyBuffer_Release(&slot);
    return result;
}

/* wp_release(fd, ram): lift all write protection from ram (waking its writers). */
PyObject *tn_wp_release(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "ram", NULL};
    Py_buffer ram = {0};
    int fd, rc;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&:wp_release", kwlist, &fd, tn_conv_rw, &ram))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = wp_range(fd, (uint64_t)(uintptr_t)ram.buf, (uint64_t)ram.len, 0);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ram);
    if (rc != 0)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "UFFDIO_WRITEPROTECT");
    Py_RETURN_NONE;
}

struct sweep {
    int fd;
    uint64_t base;
    struct units units;
    const unsigned char *ram, *pfns;
    unsigned char *staging, *copied;
    Py_ssize_t n;
    uint64_t faults, serve_ns, serve_max_ns;
    int error;
};

static inline uint64_t pfn_at(const struct sweep *s, Py_ssize_t k) {
    return tn_load_le64(s->pfns + 8 * k);
}

/* Index of the first dirty page at or after pfn. */
static Py_ssize_t lower_bound(const struct sweep *s, uint64_t pfn) {
    Py_ssize_t lo = 0, hi = s->n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (pfn_at(s, mid) < pfn)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static inline void copy_page(struct sweep *s, Py_ssize_t k) {
    memcpy(s->staging + (size_t)k * TREMUS_PAGE_SIZE, s->ram + pfn_at(s, k) * TREMUS_PAGE_SIZE,
           TREMUS_PAGE_SIZE);
    s->copied[k] = 1;
}

static void release(struct sweep *s, uint64_t first, uint64_t end) {
    if (wp_range(s->fd, s->base + first * TREMUS_PAGE_SIZE, (end - first) * TREMUS_PAGE_SIZE,
                 0) != 0 && !s->error)
        s->error = errno;
}

/* Serve every write fault waiting now: copy the faulting unit's dirty pages the
 * sweep has not copied yet, then lift the unit's protection, which wakes the writer. */
static void serve_faults(struct sweep *s) {
    struct uffd_msg msgs[16];
    for (;;) {
        ssize_t got = read(s->fd, msgs, sizeof msgs);
        if (got <= 0) {
            if (got < 0 && errno != EAGAIN && errno != EINTR && !s->error)
                s->error = errno;
            return;
        }
        for (ssize_t m = 0; m < got / (ssize_t)sizeof msgs[0]; m++) {
            if (msgs[m].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t t0 = now_ns();
            uint64_t pfn = (msgs[m].arg.pagefault.address - s->base) / TREMUS_PAGE_SIZE;
            uint64_t u = unit_of(&s->units, pfn), first, end;
            unit_span(&s->units, u, u, &first, &end);
            for (Py_ssize_t k = lower_bound(s, first); k < s->n && pfn_at(s, k) < end; k++)
                if (!s->copied[k])
                    copy_page(s, k);
            release(s, first, end);
            uint64_t took = now_ns() - t0;
            s->faults++;
            s->serve_ns += took;
            if (took > s->serve_max_ns)
                s->serve_max_ns = took;
        }
    }
}

/* wp_copy(fd, ram, pfns, staging, run_pages=64, unit_pages=1, checksums=None,
 *         batch_pages=0) -> (faults, serve_ns, serve_max_ns, copy_ns)
 *
 * Page k of staging becomes page pfns[k] of ram as it was when wp_protect ran.
 * With checksums, the frame checksums of the staged pages (tn_frame_sums): the
 * sweep hashes each page as it passes it, in order, right after copying it (or,
 * if a fault copied it earlier, from staging). */
PyObject *tn_wp_copy(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "ram", "pfns", "staging", "run_pages", "unit_pages",
                             "checksums", "batch_pages", NULL};
    int fd, hashing = 0;
    Py_ssize_t run_pages = 64, unit_pages = 1, batch_pages = 0;
    Py_buffer ram = {0}, pfns = {0}, staging = {0}, sums_view = {0};
    PyObject *result = NULL, *checksums = NULL;
    struct tn_frame_sums sums = {0};
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&O&O&|nnOn:wp_copy", kwlist, &fd, tn_conv_rw,
                                     &ram, tn_conv_ro, &pfns, tn_conv_rw, &staging,
                                     &run_pages, &unit_pages, &checksums, &batch_pages))
        return NULL;
    /* Refused arguments still lift all protection: no writer may stay blocked. */
    Py_ssize_t n = check_pfns(&pfns, ram.len);
    if (n < 0)
        goto refuse;
    hashing = tn_frame_sums_arg(checksums, &sums_view, pfns.buf, n, batch_pages, &sums);
    if (hashing < 0) {
        hashing = 0;
        goto refuse;
    }
    if (staging.len / TREMUS_PAGE_SIZE < n) {
        PyErr_Format(PyExc_ValueError, "staging holds %zd pages, %zd are dirty",
                     staging.len / TREMUS_PAGE_SIZE, n);
        goto refuse;
    }
    if (run_pages < 1)
        run_pages = 1;
    struct sweep s = {
        .fd = fd, .base = (uint64_t)(uintptr_t)ram.buf, .units = units_of(&ram, unit_pages),
        .ram = ram.buf, .pfns = pfns.buf, .staging = staging.buf, .n = n,
    };
    s.copied = calloc(n ? (size_t)n : 1, 1);
    if (s.copied == NULL) {
        /* Cannot track: lift every protection so that no writer stays blocked. */
        if (n)
            release(&s, 0, s.units.pages);
        PyErr_NoMemory();
        goto done;
    }
    uint64_t started = now_ns();
    Py_BEGIN_ALLOW_THREADS
    /* A step copies consecutive units, at most run_pages dirty pages unless one unit
     * holds more, then lifts their protection in one call. */
    for (Py_ssize_t i = 0; i < n;) {
        serve_faults(&s);
        uint64_t a = unit_of(&s.units, pfn_at(&s, i)), b = a;
        Py_ssize_t j = next_unit(s.pfns, i + 1, n, &s.units, &b, run_pages);
        for (Py_ssize_t k = i; k < j; k++) {
            if (!s.copied[k])
                copy_page(&s, k);
            if (hashing)
                tn_frame_sums_page(&sums, k, s.staging + (size_t)k * TREMUS_PAGE_SIZE,
                                   TREMUS_PAGE_SIZE);
            /* A unit may hold more than run_pages dirty pages: writers elsewhere are
             * served between every run_pages pages all the same. */
            if ((k - i) % run_pages == run_pages - 1)
                serve_faults(&s);
        }
        uint64_t first, end;
        unit_span(&s.units, a, b, &first, &end);
        release(&s, first, end);
        i = j;
    }
    /* Writers woken by the last steps left their messages: read them (no copy needed). */
    serve_faults(&s);
    Py_END_ALLOW_THREADS
    uint64_t copy_ns = now_ns() - started;
    free(s.copied);
    if (s.error) {
        errno = s.error;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "userfaultfd copy-on-write");
        goto done;
    }
    result = Py_BuildValue("(KKKK)", (unsigned long long)s.faults,
                           (unsigned long long)s.serve_ns, (unsigned long long)s.serve_max_ns,
                           (unsigned long long)copy_ns);
    goto done;
refuse:
    wp_range(fd, (uint64_t)(uintptr_t)ram.buf, (uint64_t)ram.len, 0);
done:
    if (hashing) {
        tn_frame_sums_free(&sums);
        PyBuffer_Release(&sums_view);
    }
    PyBuffer_Release(&ram);
    PyBuffer_Release(&pfns);
    PyBuffer_Release(&staging);
    return result;
}
