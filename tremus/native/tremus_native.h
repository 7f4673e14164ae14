/* Shared declarations of the tremus._native extension.
 *
 * The module is split by concern: module.c (method table, buffer helpers),
 * memory.c (bitmap, gather, scatter, memcpy), hash.c (hash64), codec.c (page
 * delta coding), kvm.c (KVM_RUN, dirty log, kick, the parked vCPU thread and its
 * work slot), cow.c (copy-on-write capture with userfaultfd write-protect).
 *
 * Conventions, shared by every function:
 *   - Buffers come in through the buffer protocol and must be C-contiguous;
 *     a buffer that must be written to must be writable. A wrong kind of
 *     object raises TypeError (the same error CPython's own recv_into/readinto
 *     raise), a bad length or bound raises ValueError.
 *   - Every length and bound is validated before any memory is touched.
 *   - Every loop over memory runs with the GIL released.
 *   - Multi-byte integers in buffers are little-endian, whatever the host.
 */
#ifndef TREMUS_NATIVE_H
#define TREMUS_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>
#include <string.h>
#include <endian.h>

#define TREMUS_PAGE_SIZE 4096

/* Little-endian loads and stores through memcpy: no alignment assumptions,
 * compiled to single moves on x86-64. */
static inline uint64_t tn_load_le64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return le64toh(v);
}
static inline uint32_t tn_load_le32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return le32toh(v);
}
static inline uint16_t tn_load_le16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return le16toh(v);
}
static inline void tn_store_le64(unsigned char *p, uint64_t v) {
    v = htole64(v);
    memcpy(p, &v, 8);
}
static inline void tn_store_le16(unsigned char *p, uint16_t v) {
    v = htole16(v);
    memcpy(p, &v, 2);
}

/* Work handed to a parked vCPU thread: kvm_wait_run runs work posted to it while it
 * waits to be released, on its own CPU, while the pause goes on in the thread that
 * posted it. Work posted before the thread parks runs as it parks: its early part
 * (if any) before the thread reads the vCPU's registers, the rest after them. Whoever
 * then needs the work done takes it back and runs it itself if the parked thread has
 * not started it (parked_work_wait): posted work is always done, by exactly one
 * thread, and always before the parked thread lets the guest run again. A job embeds
 * this header first. */
enum { TN_WORK_IDLE, TN_WORK_POSTED, TN_WORK_TAKEN, TN_WORK_DONE };
struct tn_parked_work {
    uint32_t state;
    uint32_t by_parked;  /* the parked thread ran it */
    uint32_t early_done; /* its early part ran (set before the rest runs) */
    void (*early)(struct tn_parked_work *work); /* NULL: none */
    void (*run)(struct tn_parked_work *work);
    uint64_t done_ns; /* CLOCK_MONOTONIC when it was done */
};

/* Take posted work nobody took yet; 1 if this call took it (it must then run it). */
static inline int tn_parked_work_take(struct tn_parked_work *work) {
    uint32_t posted = TN_WORK_POSTED;
    return __atomic_load_n(&work->state, __ATOMIC_ACQUIRE) == TN_WORK_POSTED &&
           __atomic_compare_exchange_n(&work->state, &posted, TN_WORK_TAKEN, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Taken work: its early part, then (tn_parked_work_complete) the rest. */
static inline void tn_parked_work_run_early(struct tn_parked_work *work) {
    if (work->early != NULL)
        work->early(work);
    __atomic_store_n(&work->early_done, 1, __ATOMIC_RELEASE);
}

static inline void tn_parked_work_complete(struct tn_parked_work *work, int by_parked) {
    struct timespec now;
    work->by_parked = (uint32_t)by_parked;
    work->run(work);
    clock_gettime(CLOCK_MONOTONIC, &now);
    work->done_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    __atomic_store_n(&work->state, TN_WORK_DONE, __ATOMIC_RELEASE);
}

/* Taken work, whole: its early part, then the rest. */
static inline void tn_parked_work_run_taken(struct tn_parked_work *work, int by_parked) {
    tn_parked_work_run_early(work);
    tn_parked_work_complete(work, by_parked);
}

/* Run work if it is posted and nobody took it yet; 1 if this call ran it. */
static inline int tn_parked_work_try_run(struct tn_parked_work *work, int by_parked) {
    if (!tn_parked_work_take(work))
        return 0;
    tn_parked_work_run_taken(work, by_parked);
    return 1;
}

static inline void tn_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Done (or never posted) once this returns: runs it here if still posted, else
 * waits for the thread running it. Call without the GIL. */
static inline void tn_parked_work_wait(struct tn_parked_work *work) {
    if (tn_parked_work_try_run(work, 0))
        return;
    while (__atomic_load_n(&work->state, __ATOMIC_ACQUIRE) == TN_WORK_TAKEN)
        tn_cpu_relax();
}

/* Its early part done (or never posted) once this returns: the whole work runs here
 * if still posted, else this waits for the thread running it to get that far. */
static inline void tn_parked_work_wait_early(struct tn_parked_work *work) {
    if (tn_parked_work_try_run(work, 0))
        return;
    while (__atomic_load_n(&work->state, __ATOMIC_ACQUIRE) == TN_WORK_TAKEN &&
           !__atomic_load_n(&work->early_done, __ATOMIC_ACQUIRE))
        tn_cpu_relax();
}

/* The parked work slot in obj: a writable buffer of TN_PARKED_WORK_SLOT_BYTES or
 * more, 16-byte aligned; sets ValueError (or TypeError) and returns NULL otherwise.
 * The caller releases view. */
#define TN_PARKED_WORK_SLOT_BYTES 256
void *tn_parked_work_slot(PyObject *obj, Py_buffer *view);

/* O& converters (with Py_CLEANUP_SUPPORTED) for read-only / writable
 * C-contiguous buffers; failures become TypeError. */
int tn_conv_ro(PyObject *obj, void *view);
int tn_conv_rw(PyObject *obj, void *view);

/* Validates a little-endian u64 pfn array: its length must be a multiple of 8.
 * Sets ValueError and returns -1 on failure, else stores the count in *n. */
int tn_pfn_count(const Py_buffer *pfns, Py_ssize_t *n);

/* Validates a page size (> 0). Sets ValueError and returns -1 on failure. */
int tn_check_page_size(Py_ssize_t page_size);

/* Index of the first pfn >= limit, or -1 if all are below it (GIL not needed). */
Py_ssize_t tn_first_pfn_at_or_above(const unsigned char *pfns, Py_ssize_t n, uint64_t limit);

/* memory.c */
PyObject *tn_dirty_bitmap_to_pfns(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_dirty_bitmap_to_pfns_into(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_gather(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_dirty_bitmap_merge(PyObject *self, PyObject *args, PyObject *kw);
Py_ssize_t tn_bitmap_merge(const unsigned char *bitmap, unsigned char *extra, unsigned char *out,
                           Py_ssize_t len);
PyObject *tn_wp_protect_bitmap(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_lift_bitmap(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_pfns_ascending_below(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_scatter(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_memcpy(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_empty_bytearray(PyObject *self, PyObject *args, PyObject *kw);

/* hash.c */
uint64_t tn_hash64(const unsigned char *p, size_t n, uint64_t seed);
struct tn_frame_sums {
    void *state; /* XXH3_state_t */
    const unsigned char *pfns;
    unsigned char *out;
    Py_ssize_t count, batch_pages;
};
int tn_frame_sums_init(struct tn_frame_sums *f, const unsigned char *pfns, Py_ssize_t count,
                       Py_ssize_t batch_pages, unsigned char *out);
void tn_frame_sums_page(struct tn_frame_sums *f, Py_ssize_t k, const unsigned char *page,
                        size_t page_size);
void tn_frame_sums_free(struct tn_frame_sums *f);
int tn_frame_sums_arg(PyObject *checksums, Py_buffer *view, const unsigned char *pfns,
                      Py_ssize_t count, Py_ssize_t batch_pages, struct tn_frame_sums *f);
PyObject *tn_py_hash64(PyObject *self, PyObject *args, PyObject *kw);

/* codec.c */
PyObject *tn_delta_encode(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_delta_decode(PyObject *self, PyObject *args, PyObject *kw);

/* kvm.c */
PyObject *tn_kvm_run(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_get_dirty_log(PyObject *self, PyObject *args, PyObject *kw);
/* KVM_GET_DIRTY_LOG of a slot into bitmap (len bytes); with out (len bytes): also
 * out = bitmap | extra (extra, if not NULL, zeroed) and *count = pages set. 0 or
 * -errno; no GIL needed. */
int tn_read_dirty_log(int vm_fd, unsigned int slot, unsigned char *bitmap, unsigned char *extra,
                      unsigned char *out, size_t len, Py_ssize_t *count);
PyObject *tn_kvm_get_vcpu_state(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_kvm_wait_run(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_kvm_run_parking(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_poll_or_park(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_kvm_sync_regs(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_spin_until_set(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_py_parked_work_wait(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_current_cpu(PyObject *self, PyObject *args);
PyObject *tn_clear_dirty_log(PyObject *self, PyObject *args, PyObject *kw);
extern PyTypeObject tn_Hash64Type;
PyObject *tn_install_kick_handler(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_kick(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_buffer_address(PyObject *self, PyObject *args, PyObject *kw);

/* cow.c */
PyObject *tn_wp_open(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_protect(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_copy(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_protect_bitmap_post(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_protect_bitmap_finish(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_capture_post(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_capture_count(PyObject *self, PyObject *args, PyObject *kw);
PyObject *tn_wp_release(PyObject *self, PyObject *args, PyObject *kw);

#endif
