/* KVM calls the micro-VM's vCPU loop needs off the GIL, and the kick that stops it.
 *
 * Suspending a vCPU: the controlling thread sets kvm_run.immediate_exit and sends
 * a signal to the vCPU thread. A no-op handler installed without SA_RESTART makes
 * a KVM_RUN in progress return EINTR; immediate_exit makes a KVM_RUN that is just
 * about to start return EINTR at once, so the kick cannot be lost in between.
 */
#include "tremus_native.h"

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

_Static_assert(offsetof(struct kvm_run, immediate_exit) == 1, "immediate_exit is byte 1");

PyObject *tn_kvm_run(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vcpu_fd", NULL};
    int fd, rc, err = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i:kvm_run", kwlist, &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, KVM_RUN, 0);
    if (rc < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc < 0 ? -err : rc);
}

/* A dirty-log ioctl on the VM without the GIL; releases bm; None or OSError. */
static PyObject *bitmap_ioctl(int fd, unsigned long request, void *arg, Py_buffer *bm,
                              const char *name) {
    int rc, err = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, request, arg);
    if (rc < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(bm);
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
    }
    Py_RETURN_NONE;
}

int tn_read_dirty_log(int vm_fd, unsigned int slot, unsigned char *bitmap, unsigned char *extra,
                      unsigned char *out, size_t len, Py_ssize_t *count) {
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
        return -errno;
    *count = out != NULL ? tn_bitmap_merge(bitmap, extra, out, (Py_ssize_t)len) : 0;
    return 0;
}

/* get_dirty_log(vm_fd, slot, bitmap, extra=None, out=None): KVM_GET_DIRTY_LOG into
 * bitmap. With out (as large as bitmap): also out = bitmap | extra, extra zeroed
 * (the VMM's own writes), and the count of pages set is returned: the pause's
 * dirty bitmap in one call. */
PyObject *tn_get_dirty_log(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vm_fd", "slot", "bitmap", "extra", "out", NULL};
    int fd, rc, err = 0;
    unsigned int slot;
    PyObject *extra_obj = Py_None, *out_obj = Py_None, *result = NULL;
    Py_buffer bm, extra = {0}, out = {0};
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iIO&|OO:get_dirty_log", kwlist, &fd, &slot,
                                     tn_conv_rw, &bm, &extra_obj, &out_obj))
        return NULL;
    /* KVM writes ceil(slot pages / 64) u64 words; the caller sizes the bitmap
     * from the slot it registered, we can only check it is whole words. */
    if (bm.len == 0 || bm.len % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "bitmap must be a non-empty multiple of 8 bytes, not %zd",
                     bm.len);
        goto done;
    }
    if (out_obj != Py_None) {
        if (!tn_conv_rw(out_obj, &out))
            goto done;
        if (out.len != bm.len) {
            PyErr_Format(PyExc_ValueError, "out has %zd bytes, bitmap has %zd", out.len, bm.len);
            goto done;
        }
        if (extra_obj != Py_None) {
            if (!tn_conv_rw(extra_obj, &extra))
                goto done;
            if (extra.len != bm.len) {
                PyErr_Format(PyExc_ValueError, "extra has %zd bytes, bitmap has %zd", extra.len,
                             bm.len);
                goto done;
            }
        }
    } else if (extra_obj != Py_None) {
        PyErr_SetString(PyExc_ValueError, "extra needs out");
        goto done;
    }
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = tn_read_dirty_log(fd, slot, bm.buf, extra.buf, out.buf, (size_t)bm.len, &count);
    if (rc < 0)
        err = -rc;
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "KVM_GET_DIRTY_LOG");
    } else if (out.buf != NULL) {
        result = PyLong_FromSsize_t(count);
    } else {
        result = Py_NewRef(Py_None);
    }
done:
    if (extra.buf != NULL)
        PyBuffer_Release(&extra);
    if (out.buf != NULL)
        PyBuffer_Release(&out);
    PyBuffer_Release(&bm);
    return result;
}

/* KVM_CLEAR_DIRTY_LOG over a whole slot of ``pages`` pages: clear the bits set in
 * ``bitmap`` and write-protect those pages again (manual dirty-log protection). */
PyObject *tn_clear_dirty_log(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vm_fd", "slot", "bitmap", "pages", NULL};
    int fd;
    unsigned int slot, pages;
    Py_buffer bm;
    struct kvm_clear_dirty_log log;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iIO&I:clear_dirty_log", kwlist, &fd, &slot,
                                     tn_conv_ro, &bm, &pages))
        return NULL;
    if (bm.len * 8 < (Py_ssize_t)pages) {
        PyErr_Format(PyExc_ValueError, "bitmap of %zd bytes cannot hold %u pages", bm.len, pages);
        PyBuffer_Release(&bm);
        return NULL;
    }
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.first_page = 0;
    log.num_pages = pages;
    log.dirty_bitmap = bm.buf;
    return bitmap_ioctl(fd, KVM_CLEAR_DIRTY_LOG, &log, &bm, "KVM_CLEAR_DIRTY_LOG");
}

static void noop_handler(int signum) { (void)signum; }

PyObject *tn_install_kick_handler(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"signum", NULL};
    int signum;
    struct sigaction sa;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i:install_kick_handler", kwlist, &signum))
        return NULL;
    if (signum < 1 || signum >= NSIG) {
        PyErr_Format(PyExc_ValueError, "signal number %d out of range", signum);
        return NULL;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = noop_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the interrupted KVM_RUN must return EINTR */
    if (sigaction(signum, &sa, NULL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyObject *tn_kick(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"thread_id", "run", "signum", NULL};
    PyObject *tid_obj;
    Py_buffer run;
    int signum, rc;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO&i:kick", kwlist, &tid_obj, tn_conv_rw, &run,
                                     &signum))
        return NULL;
    unsigned long tid = PyLong_AsUnsignedLong(tid_obj);
    if (tid == (unsigned long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&run);
        return NULL;
    }
    if (run.len < 2) {
        PyErr_Format(PyExc_ValueError, "run has %zd bytes, not a kvm_run mapping", run.len);
        PyBuffer_Release(&run);
        return NULL;
    }
    if (signum < 1 || signum >= NSIG) {
        PyErr_Format(PyExc_ValueError, "signal number %d out of range", signum);
        PyBuffer_Release(&run);
        return NULL;
    }
    __atomic_store_n((unsigned char *)run.buf + 1, (unsigned char)1, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&run);
    rc = pthread_kill((pthread_t)tid, signum);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

PyObject *tn_buffer_address(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buf", NULL};
    Py_buffer b;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&:buffer_address", kwlist, tn_conv_ro, &b))
        return NULL;
    PyObject *r = PyLong_FromVoidPtr(b.buf);
    PyBuffer_Release(&b);
    return r;
}

/* KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_FPU; -1 with errno and *what on failure. */
static int read_vcpu_state(int fd, struct kvm_regs *regs, struct kvm_sregs *sregs,
                           struct kvm_fpu *fpu, const char **what) {
    if (ioctl(fd, KVM_GET_REGS, regs) < 0) {
        *what = "KVM_GET_REGS";
        return -1;
    }
    if (ioctl(fd, KVM_GET_SREGS, sregs) < 0) {
        *what = "KVM_GET_SREGS";
        return -1;
    }
    if (ioctl(fd, KVM_GET_FPU, fpu) < 0) {
        *what = "KVM_GET_FPU";
        return -1;
    }
    return 0;
}

#define CR0_EM (1ULL << 2)
#define CR4_OSFXSR (1ULL << 9)
#define CR4_OSXSAVE (1ULL << 18)

/* No instruction can change the FPU state of a vCPU with CR0.EM set and neither
 * CR4.OSFXSR nor CR4.OSXSAVE: x87, MMX, SSE and the FPU save/restore instructions
 * all fault (the micro-VM's guest is built without them and boots so). */
static int fpu_frozen(const struct kvm_sregs *sregs) {
    return (sregs->cr0 & CR0_EM) && !(sregs->cr4 & (CR4_OSFXSR | CR4_OSXSAVE));
}

/* The registers KVM stored in kvm_run as the last KVM_RUN returned (kvm_sync_regs
 * asked it to), the FPU by ioctl: one vCPU ioctl at the park instead of three (each
 * loads the vCPU's context: ~7 us here), none if fpu_known (the FPU read before is
 * still in *fpu, nothing set it since) and the vCPU cannot change its FPU state.
 * 1 if *fpu was read, 0 if kept, -1 with errno and *what on failure. */
static int read_vcpu_state_synced(int fd, const struct kvm_run *run, struct kvm_regs *regs,
                                  struct kvm_sregs *sregs, struct kvm_fpu *fpu,
                                  int fpu_known, const char **what) {
    const uint64_t both = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    /* RFLAGS bit 1 is always set in a stored copy: clear, none was stored since the
     * registers were last set by ioctl (kvm_sync_regs cleared it then). */
    if (run == NULL || (run->kvm_valid_regs & both) != both || !(run->s.regs.regs.rflags & 2))
        return read_vcpu_state(fd, regs, sregs, fpu, what) < 0 ? -1 : 1;
    memcpy(regs, &run->s.regs.regs, sizeof *regs);
    memcpy(sregs, &run->s.regs.sregs, sizeof *sregs);
    if (fpu_known && fpu_frozen(sregs))
        return 0;
    if (ioctl(fd, KVM_GET_FPU, fpu) < 0) {
        *what = "KVM_GET_FPU";
        return -1;
    }
    return 1;
}

/* kvm_sync_regs(vm_fd, run) -> bool: ask KVM to store the vCPU's general and special
 * registers in its kvm_run mapping run whenever KVM_RUN returns, if it can; what a
 * park then reads from there (kvm_wait_run's run). Any copy stored so far is
 * dropped: call it again whenever the registers are set by ioctl, until the next
 * KVM_RUN stores them anew. */
PyObject *tn_kvm_sync_regs(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vm_fd", "run", NULL};
    const uint64_t both = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    int vm_fd;
    Py_buffer run;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iw*:kvm_sync_regs", kwlist, &vm_fd, &run))
        return NULL;
    int offered = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
    int enabled = (size_t)run.len >= sizeof(struct kvm_run) && offered > 0 &&
                  ((uint64_t)offered & both) == both;
    if (enabled) {
        struct kvm_run *r = run.buf;
        memset(&r->s.regs.regs, 0, sizeof r->s.regs.regs);
        memset(&r->s.regs.sregs, 0, sizeof r->s.regs.sregs);
        r->kvm_valid_regs = both;
    }
    PyBuffer_Release(&run);
    return PyBool_FromLong(enabled);
}

#define VCPU_STATE_SIZE (sizeof(struct kvm_regs) + sizeof(struct kvm_sregs) + sizeof(struct kvm_fpu))

/* The vCPU's registers in one call: kvm_regs, kvm_sregs and kvm_fpu, concatenated.
 * This runs inside the checkpoint pause, so it avoids three Python round trips. */
PyObject *tn_kvm_get_vcpu_state(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vcpu_fd", NULL};
    struct {
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        struct kvm_fpu fpu;
    } s;
    int fd, rc = 0, err = 0;
    const char *what = "";
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i:kvm_get_vcpu_state", kwlist, &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = read_vcpu_state(fd, &s.regs, &s.sregs, &s.fpu, &what);
    if (rc < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
    }
    PyObject *out = PyTuple_New(3);
    if (out == NULL)
        return NULL;
    PyObject *parts[3] = {
        PyBytes_FromStringAndSize((const char *)&s.regs, sizeof s.regs),
        PyBytes_FromStringAndSize((const char *)&s.sregs, sizeof s.sregs),
        PyBytes_FromStringAndSize((const char *)&s.fpu, sizeof s.fpu),
    };
    for (int i = 0; i < 3; i++) {
        if (parts[i] == NULL) {
            Py_DECREF(out);
            for (int j = i + 1; j < 3; j++)
                Py_XDECREF(parts[j]);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, parts[i]);
    }
    return out;
}

/* Spin, yielding the CPU between looks, until flag[0] is non-zero or timeout_ns
 * passed; 1 if it was set. A tight loop of PAUSE instead made a kick 50-150 us
 * slower here: the vCPU thread's way out of KVM_RUN competes for the cores. Work
 * posted to work (if not NULL) meanwhile is run in place of a yield, and the wait
 * starts again after it. */
/* Take work posted to a parked thread while it waits, as opposed to a capture (work
 * with an early part) posted before a park, which is the next park's to run: seen
 * here, only on the way out of this one, it is left posted. 1 if taken. */
static int take_work_of_this_park(struct tn_parked_work *work) {
    if (!tn_parked_work_take(work))
        return 0;
    if (work->early == NULL)
        return 1;
    __atomic_store_n(&work->state, TN_WORK_POSTED, __ATOMIC_RELEASE);
    return 0;
}

static int spin_until(const unsigned char *flag, struct tn_parked_work *work,
                      long long timeout_ns) {
    struct timespec start, now;
    if (__atomic_load_n(flag, __ATOMIC_ACQUIRE))
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (unsigned int n = 1;; n++) {
        if (work != NULL && take_work_of_this_park(work)) {
            tn_parked_work_run_taken(work, 1);
            clock_gettime(CLOCK_MONOTONIC, &start);
        }
        else
            sched_yield();
        if (__atomic_load_n(flag, __ATOMIC_ACQUIRE))
            return 1;
        if (n % 4 == 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - start.tv_sec) * 1000000000LL + (now.tv_nsec - start.tv_nsec) >=
                timeout_ns)
                return 0;
        }
    }
}

/* parked_work_wait(slot): once it returns, the work posted to slot (if any) is done:
 * run here if the parked thread has not started it, else waited for. The owner of a
 * parked thread calls it before releasing the thread. */
PyObject *tn_py_parked_work_wait(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"slot", NULL};
    PyObject *slot_obj;
    Py_buffer view = {0};
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:parked_work_wait", kwlist, &slot_obj))
        return NULL;
    struct tn_parked_work *work = tn_parked_work_slot(slot_obj, &view);
    if (work == NULL)
        return NULL;
    uint32_t state = __atomic_load_n(&work->state, __ATOMIC_ACQUIRE);
    if (state == TN_WORK_POSTED || state == TN_WORK_TAKEN) { /* else nothing to wait for */
        Py_BEGIN_ALLOW_THREADS
        tn_parked_work_wait(work);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* Let the calling thread run anywhere it may except on cpu (saving its affinity in
 * *original); the kernel moves it at once. 1 if it moved, 0 if it may not. */
static int move_away_from(int cpu, cpu_set_t *original) {
    if (sched_getaffinity(0, sizeof *original, original) != 0)
        return 0;
    cpu_set_t away = *original;
    CPU_CLR(cpu, &away);
    if (CPU_COUNT(&away) == 0)
        return 0;
    return sched_setaffinity(0, sizeof away, &away) == 0;
}

/* The park flags shared with the controlling thread (see kvm_wait_run). */
enum {
    PARK_PARKED = 0,      /* set by the park once it let go of the GIL */
    PARK_RELEASED = 1,    /* set by resume()/stop(), before they write wait_fd */
    PARK_SAVED = 2,       /* the registers are in state */
    PARK_ERRNO = 3,       /* errno & 0xff of a failed register read, else 0 */
    PARK_CPU = 4,         /* int32: the CPU the controlling thread runs on, -1 unknown */
    PARK_WANTED = 8,      /* a pause is asked for: park at the next EINTR or wake-up */
    PARK_STOP = 9,        /* the vCPU is to stop: never park, leave a park */
    PARK_FPU_UNREAD = 10, /* the FPU in state is not the vCPU's (set since, or never read) */
    PARK_STOPPED_NS = 16, /* int64 CLOCK_MONOTONIC ns: a park in C began */
    PARK_RESUMED_NS = 24, /* int64: the last park ended, its work done */
    PARK_FLAGS_FULL = 32, /* the flags kvm_run_parking and poll_or_park need */
};

static long long monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A park's buffers and settings, taken from Python once per call. */
struct park {
    int wait_fd, save_fd;
    long long spin_ns;
    unsigned char *flags;
    Py_ssize_t flags_len;
    unsigned char *state;
    struct tn_parked_work *work;
    const struct kvm_run *run;
    Py_buffer flags_view, state_view, work_view, run_view;
};

static void park_release(struct park *p) {
    /* a view never filled has no owner: a no-op */
    PyBuffer_Release(&p->state_view);
    PyBuffer_Release(&p->work_view);
    PyBuffer_Release(&p->run_view);
    PyBuffer_Release(&p->flags_view);
}

/* Check and hold a park's buffers; 0, or -1 with an exception set (and nothing held). */
static int park_acquire(struct park *p, int wait_fd, PyObject *flags_obj, long long spin_ns,
                        int save_fd, PyObject *state_obj, PyObject *work_obj,
                        PyObject *run_obj, Py_ssize_t min_flags) {
    memset(p, 0, sizeof *p);
    p->wait_fd = wait_fd;
    p->save_fd = save_fd;
    p->spin_ns = spin_ns;
    if (!tn_conv_rw(flags_obj, &p->flags_view))
        return -1;
    p->flags = p->flags_view.buf;
    p->flags_len = p->flags_view.len;
    if (min_flags < (save_fd >= 0 ? 4 : 2))
        min_flags = save_fd >= 0 ? 4 : 2;
    if (p->flags_len < min_flags) {
        PyErr_Format(PyExc_ValueError, "flags must be a writable buffer of %zd bytes", min_flags);
        goto refuse;
    }
    if (run_obj != Py_None) {
        if (!tn_conv_ro(run_obj, &p->run_view))
            goto refuse;
        if ((size_t)p->run_view.len < sizeof(struct kvm_run)) {
            PyErr_SetString(PyExc_ValueError, "run must be a vCPU's kvm_run mapping");
            goto refuse;
        }
        p->run = p->run_view.buf;
    }
    if (save_fd >= 0) {
        if (state_obj == Py_None) {
            PyErr_SetString(PyExc_ValueError, "save_fd needs a state buffer");
            goto refuse;
        }
        if (!tn_conv_rw(state_obj, &p->state_view))
            goto refuse;
        if ((size_t)p->state_view.len < VCPU_STATE_SIZE) {
            PyErr_Format(PyExc_ValueError, "state must hold %zu bytes, not %zd",
                         (size_t)VCPU_STATE_SIZE, p->state_view.len);
            goto refuse;
        }
        p->state = p->state_view.buf;
    }
    if (work_obj != Py_None) {
        p->work = tn_parked_work_slot(work_obj, &p->work_view);
        if (p->work == NULL)
            goto refuse;
    }
    return 0;
refuse:
    park_release(p);
    return -1;
}

/* The park itself, without the GIL (see kvm_wait_run): 0 once released with its
 * work done, or -1 with *err if waiting failed. ``began_ns`` > 0: the park began
 * then (a park in C straight from KVM_RUN or a HLT wait), stamped in the flags.
 * Leaving, it stamps the flags' PARK_RESUMED_NS (if they hold it) and *resumed_ns. */
static int park_here(struct park *p, long long began_ns, int *err, long long *resumed_ns) {
    unsigned char *parked = p->flags + PARK_PARKED, *released = p->flags + PARK_RELEASED;
    int full = p->flags_len >= PARK_FLAGS_FULL, rc = 0, moved = 0;
    long long spin_ns = p->spin_ns;
    struct tn_parked_work *work = p->work;
    if (began_ns > 0) {
        memcpy(p->flags + PARK_STOPPED_NS, &began_ns, sizeof began_ns);
        /* A park in C resets what the previous one set (one in Python did so itself);
         * a stop asked before this reset still ends the park at once. */
        __atomic_store_n(released, (unsigned char)0, __ATOMIC_SEQ_CST);
        p->flags[PARK_SAVED] = 0;
        if (__atomic_load_n(p->flags + PARK_STOP, __ATOMIC_SEQ_CST))
            __atomic_store_n(released, (unsigned char)1, __ATOMIC_RELEASE);
    }
    int32_t controller_cpu = -1;
    if (p->flags_len >= 8)
        memcpy(&controller_cpu, p->flags + PARK_CPU, sizeof controller_cpu);
    cpu_set_t original;
    /* Work posted before the park: its early part first, the rest after the registers
     * (taken before the park is told, so that the pausing thread finds it taken). */
    int took = work != NULL && tn_parked_work_take(work);
    __atomic_store_n(parked, (unsigned char)1, __ATOMIC_RELEASE);
    if (took)
        tn_parked_work_run_early(work);
    if (p->save_fd >= 0) {
        const char *what = "";
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        struct kvm_fpu fpu;
        unsigned char *fpu_unread = full ? p->flags + PARK_FPU_UNREAD : NULL;
        unsigned char *fpu_out = p->state + sizeof regs + sizeof sregs;
        int read = read_vcpu_state_synced(p->save_fd, p->run, &regs, &sregs, &fpu,
                                          fpu_unread != NULL && !*fpu_unread, &what);
        int failed = read < 0 ? errno : 0;
        memcpy(p->state, &regs, sizeof regs);
        memcpy(p->state + sizeof regs, &sregs, sizeof sregs);
        if (read > 0) {
            memcpy(fpu_out, &fpu, sizeof fpu);
            if (fpu_unread != NULL)
                *fpu_unread = 0;
        }
        p->flags[PARK_ERRNO] = (unsigned char)(failed ? (failed & 0xff ? failed & 0xff : 0xff) : 0);
        __atomic_store_n(p->flags + PARK_SAVED, (unsigned char)1, __ATOMIC_RELEASE);
    }
    if (controller_cpu >= 0 && sched_getcpu() == controller_cpu) {
        moved = move_away_from(controller_cpu, &original);
        if (!moved)
            spin_ns = 0;
    }
    if (took)
        tn_parked_work_complete(work, 1);
    if (spin_ns <= 0 || !spin_until(released, work, spin_ns)) {
        while (!__atomic_load_n(released, __ATOMIC_ACQUIRE)) {
            uint64_t value;
            struct pollfd pfd = {.fd = p->wait_fd, .events = POLLIN};
            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
                rc = -1;
                *err = errno;
                break;
            }
            if (read(p->wait_fd, &value, sizeof value) < 0 && errno != EAGAIN && errno != EINTR) {
                rc = -1;
                *err = errno;
                break;
            }
        }
    }
    /* Released: work posted to the slot is done before the guest may write again,
     * whether or not the releasing thread waited for it. */
    if (work != NULL) {
        if (take_work_of_this_park(work))
            tn_parked_work_run_taken(work, 1);
        while (__atomic_load_n(&work->state, __ATOMIC_ACQUIRE) == TN_WORK_TAKEN)
            tn_cpu_relax();
    }
    *resumed_ns = monotonic_ns();
    if (full)
        memcpy(p->flags + PARK_RESUMED_NS, resumed_ns, sizeof *resumed_ns);
    if (moved)
        sched_setaffinity(0, sizeof original, &original); /* still on an allowed CPU */
    return rc;
}

/* A pause asked for, and no stop: a park in C should begin. */
static int park_wanted(const struct park *p) {
    return __atomic_load_n(p->flags + PARK_WANTED, __ATOMIC_SEQ_CST) &&
           !__atomic_load_n(p->flags + PARK_STOP, __ATOMIC_SEQ_CST);
}

/* Park a vCPU thread until it is released, then enter KVM_RUN at once, all without
 * the GIL: a resumed guest runs again without waiting for the interpreter lock,
 * which the controlling thread may hold for a while. ``flags`` is shared with the
 * controlling thread: this call sets flags[0] ("parked") once the GIL is let go, and
 * the controlling thread sets flags[1] ("released") then writes the eventfd
 * ``wait_fd``. The park spins on flags[1] for up to ``spin_ns`` (a sleeping thread's
 * wake-up is ~25 us of every pause here), then sleeps on the eventfd, which only
 * wakes it to look at the flag again (a write that arrives after the flag was seen
 * is harmless). With ``save_fd`` >= 0 it then reads that vCPU's registers into
 * ``state`` (kvm_regs, kvm_sregs, kvm_fpu back to back) and sets flags[2] ("state
 * saved"; flags[3] holds errno & 0xff if a read failed): the controlling thread goes
 * on with its pause while they are read (~13 us: the FPU by ioctl, the rest from run
 * if KVM stores them there, see kvm_sync_regs; 21-23 us by three ioctls), and waits for
 * flags[2] only when it needs them. If flags[4:8] holds the CPU the controlling
 * thread runs on (int32, native order; -1: unknown) and this thread is on that CPU
 * too (the scheduler put them together in about 4 pauses out of 10 here), it moves
 * to another CPU for the pause once its registers are read (waking an idle CPU can
 * take hundreds of us here: they are not left waiting for it), its affinity
 * restored once released: it is running there when released.
 * Left there, its spin would hand the CPU to the controlling thread at its first
 * yield and get it back only when that thread sleeps, after the whole pause and the
 * release (300-600 us late). With no other CPU allowed it sleeps at once instead.
 * The parked work slot ``work`` (struct tn_parked_work): work posted before the
 * park runs as it parks (its early part before the registers are read), work posted
 * while it waits runs in place of a yield, and any left when released runs before
 * KVM_RUN: the releasing thread need not wait for it.
 * With ``vcpu_fd`` < 0 it only waits. Returns (KVM_RUN result or -errno,
 * CLOCK_MONOTONIC ns when the wait ended and its work was done; also stored at
 * flags[24:32] if flags has 32 bytes). */
PyObject *tn_kvm_wait_run(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"wait_fd", "vcpu_fd", "flags", "spin_ns", "save_fd", "state",
                             "work", "run", NULL};
    int wait_fd, vcpu_fd, save_fd = -1, rc = 0, err = 0;
    PyObject *flags_obj, *state_obj = Py_None, *work_obj = Py_None, *run_obj = Py_None;
    long long spin_ns = 0, resumed_ns = 0;
    struct park p;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiO|LiOOO:kvm_wait_run", kwlist, &wait_fd,
                                     &vcpu_fd, &flags_obj, &spin_ns, &save_fd, &state_obj,
                                     &work_obj, &run_obj))
        return NULL;
    if (park_acquire(&p, wait_fd, flags_obj, spin_ns, save_fd, state_obj, work_obj, run_obj,
                     0) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = park_here(&p, 0, &err, &resumed_ns);
    if (rc == 0 && vcpu_fd >= 0) {
        rc = ioctl(vcpu_fd, KVM_RUN, 0);
        if (rc < 0)
            err = errno;
    }
    Py_END_ALLOW_THREADS
    park_release(&p);
    return Py_BuildValue("(lL)", rc < 0 ? -(long)err : (long)rc, resumed_ns);
}

/* The park's settings as kvm_run_parking and poll_or_park take them: a tuple
 * (wait_fd, flags, spin_ns, vcpu_fd, state, work, run), the vCPU's registers read
 * from vcpu_fd. */
static int park_from_tuple(struct park *p, PyObject *park_obj) {
    int wait_fd, vcpu_fd;
    long long spin_ns;
    PyObject *flags_obj, *state_obj, *work_obj, *run_obj;
    if (!PyArg_ParseTuple(park_obj, "iOLiOOO;park must be (wait_fd, flags, spin_ns, vcpu_fd, "
                          "state, work, run)", &wait_fd, &flags_obj, &spin_ns, &vcpu_fd,
                          &state_obj, &work_obj, &run_obj))
        return -1;
    if (park_acquire(p, wait_fd, flags_obj, spin_ns, vcpu_fd, state_obj, work_obj, run_obj,
                     PARK_FLAGS_FULL) < 0)
        return -1;
    if (p->run == NULL) {
        PyErr_SetString(PyExc_ValueError, "park needs the vCPU's kvm_run mapping");
        park_release(p);
        return -1;
    }
    return 0;
}

/* kvm_run_parking(vcpu_fd, park) -> 0 or -errno: KVM_RUN, parking in C whenever it
 * returns EINTR with a pause asked for (flags[8]) and no stop (flags[9]), then
 * entering KVM_RUN again once released: the pause begins the moment the vCPU left
 * the guest, with no Python step between (flags[16:24] stamps that moment). The
 * kick's immediate_exit is cleared at every EINTR. Returns the first KVM_RUN result
 * that did not lead to a park (-EINTR also when a stop ended a park). */
PyObject *tn_kvm_run_parking(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vcpu_fd", "park", NULL};
    int vcpu_fd, rc, err = 0;
    long long resumed_ns;
    PyObject *park_obj;
    struct park p;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO!:kvm_run_parking", kwlist, &vcpu_fd,
                                     &PyTuple_Type, &park_obj))
        return NULL;
    if (park_from_tuple(&p, park_obj) < 0)
        return NULL;
    unsigned char *immediate_exit = (unsigned char *)p.run + 1;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        rc = ioctl(vcpu_fd, KVM_RUN, 0);
        if (rc >= 0 || errno != EINTR) {
            if (rc < 0)
                err = errno;
            break;
        }
        err = EINTR;
        long long now = monotonic_ns();
        /* Cleared before the flags are read: a stop's kick (its flag set before its
         * immediate_exit) is seen below if this clears its immediate_exit. */
        __atomic_store_n(immediate_exit, (unsigned char)0, __ATOMIC_SEQ_CST);
        if (!park_wanted(&p))
            break;
        if (park_here(&p, now, &err, &resumed_ns) < 0) {
            rc = -1;
            break;
        }
        if (__atomic_load_n(p.flags + PARK_STOP, __ATOMIC_SEQ_CST)) {
            rc = -1;
            err = EINTR;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    park_release(&p);
    return PyLong_FromLong(rc < 0 ? -(long)err : (long)rc);
}

/* poll_or_park(fds, timeout_ms, park) -> -1 if it parked (and was released), else a
 * mask of the fds found readable (bit i: fds[i]; 0: the timeout passed). For a
 * halted vCPU: it sleeps in poll() until one of fds (the first the eventfd suspend
 * writes) is readable or timeout_ms passed (< 0: no limit), and parks in C if a pause
 * is asked for (flags[8], no stop) before or after, stamping flags[16:24] as it
 * does; it enters no KVM_RUN. */
PyObject *tn_poll_or_park(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fds", "timeout_ms", "park", NULL};
    PyObject *fds_obj, *park_obj;
    int timeout_ms, rc = 0, err = 0;
    long long resumed_ns;
    struct pollfd pfds[8];
    struct park p;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iO!:poll_or_park", kwlist, &PyTuple_Type,
                                     &fds_obj, &timeout_ms, &PyTuple_Type, &park_obj))
        return NULL;
    Py_ssize_t nfds = PyTuple_GET_SIZE(fds_obj);
    if (nfds < 1 || nfds > (Py_ssize_t)(sizeof pfds / sizeof pfds[0])) {
        PyErr_Format(PyExc_ValueError, "poll_or_park takes 1 to %zu fds, not %zd",
                     sizeof pfds / sizeof pfds[0], nfds);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        long fd = PyLong_AsLong(PyTuple_GET_ITEM(fds_obj, i));
        if (fd == -1 && PyErr_Occurred())
            return NULL;
        pfds[i].fd = (int)fd;
        pfds[i].events = POLLIN;
        pfds[i].revents = 0;
    }
    if (park_from_tuple(&p, park_obj) < 0)
        return NULL;
    int parked = 0, ready = 0;
    Py_BEGIN_ALLOW_THREADS
    if (!park_wanted(&p)) {
        ready = poll(pfds, (nfds_t)nfds, timeout_ms);
        if (ready < 0 && errno != EINTR) { /* EINTR: a kick, looked at below */
            rc = -1;
            err = errno;
        }
    }
    if (rc == 0 && park_wanted(&p)) {
        parked = 1;
        rc = park_here(&p, monotonic_ns(), &err, &resumed_ns);
    }
    Py_END_ALLOW_THREADS
    park_release(&p);
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, parked ? "park" : "poll");
    }
    if (parked)
        return PyLong_FromLong(-1);
    long mask = 0;
    for (Py_ssize_t i = 0; ready > 0 && i < nfds; i++)
        if (pfds[i].revents & (POLLIN | POLLERR | POLLHUP))
            mask |= 1L << i;
    return PyLong_FromLong(mask);
}

/* Wait, without the GIL, until flag[0] is non-zero or timeout_ns passed; True if
 * it was set. suspend() waits so for the vCPU to park (see kvm_wait_run): about as
 * long as the kick takes, and without the sleeping thread's wake-up. */
PyObject *tn_spin_until_set(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"flag", "timeout_ns", NULL};
    Py_buffer buf;
    long long timeout_ns;
    int set;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*L:spin_until_set", kwlist, &buf, &timeout_ns))
        return NULL;
    if (buf.len < 1) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "flag must be a writable buffer of at least 1 byte");
        return NULL;
    }
    const unsigned char *flag = buf.buf;
    Py_BEGIN_ALLOW_THREADS
    set = spin_until(flag, NULL, timeout_ns);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyBool_FromLong(set);
}

/* The CPU the calling thread runs on now (-1 if unknown). */
PyObject *tn_current_cpu(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(sched_getcpu());
}
