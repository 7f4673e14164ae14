/* tremus._native: module definition and the buffer helpers every function uses. */
#include "tremus_native.h"

static int conv(PyObject *obj, Py_buffer *view, int writable) {
    if (obj == NULL) { /* cleanup call after a later argument failed */
        PyBuffer_Release(view);
        return 1;
    }
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "a %scontiguous bytes-like object is required, not '%.100s'",
                     writable ? "writable " : "", Py_TYPE(obj)->tp_name);
        return 0;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "a %scontiguous bytes-like object is required",
                     writable ? "writable " : "");
        return 0;
    }
    return Py_CLEANUP_SUPPORTED;
}

int tn_conv_ro(PyObject *obj, void *view) { return conv(obj, (Py_buffer *)view, 0); }
int tn_conv_rw(PyObject *obj, void *view) { return conv(obj, (Py_buffer *)view, 1); }

void *tn_parked_work_slot(PyObject *obj, Py_buffer *view) {
    if (!tn_conv_rw(obj, view))
        return NULL;
    if ((size_t)view->len < TN_PARKED_WORK_SLOT_BYTES || (uintptr_t)view->buf % 16 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "a parked work slot is a 16-byte aligned buffer of %d bytes or more",
                     TN_PARKED_WORK_SLOT_BYTES);
        PyBuffer_Release(view);
        return NULL;
    }
    return view->buf;
}

int tn_pfn_count(const Py_buffer *pfns, Py_ssize_t *n) {
    if (pfns->len % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "pfns length %zd is not a multiple of 8", pfns->len);
        return -1;
    }
    *n = pfns->len / 8;
    return 0;
}

int tn_check_page_size(Py_ssize_t page_size) {
    if (page_size <= 0) {
        PyErr_Format(PyExc_ValueError, "page_size must be positive, not %zd", page_size);
        return -1;
    }
    return 0;
}

Py_ssize_t tn_first_pfn_at_or_above(const unsigned char *pfns, Py_ssize_t n, uint64_t limit) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (tn_load_le64(pfns + 8 * i) >= limit)
            return i;
    return -1;
}

#define KW (PyCFunction)(void (*)(void))

static PyMethodDef methods[] = {
    {"dirty_bitmap_to_pfns", KW tn_dirty_bitmap_to_pfns, METH_VARARGS | METH_KEYWORDS,
     "dirty_bitmap_to_pfns(bitmap, extra=None) -> bytes of ascending little-endian u64 pfns"},
    {"dirty_bitmap_to_pfns_into", KW tn_dirty_bitmap_to_pfns_into, METH_VARARGS | METH_KEYWORDS,
     "dirty_bitmap_to_pfns_into(bitmap, extra, out) -> count"},
    {"pfns_ascending_below", KW tn_pfns_ascending_below, METH_VARARGS | METH_KEYWORDS,
     "pfns_ascending_below(pfns, limit, after=-1) -> bool"},
    {"dirty_bitmap_merge", KW tn_dirty_bitmap_merge, METH_VARARGS | METH_KEYWORDS,
     "dirty_bitmap_merge(bitmap, extra, out) -> count"},
    {"gather", KW tn_gather, METH_VARARGS | METH_KEYWORDS,
     "gather(src, pfns, dst, page_size=4096, checksums=None, batch_pages=0) -> bytes copied"},
    {"scatter", KW tn_scatter, METH_VARARGS | METH_KEYWORDS,
     "scatter(dst, pfns, src, page_size=4096) -> bytes copied"},
    {"hash64", KW tn_py_hash64, METH_VARARGS | METH_KEYWORDS,
     "hash64(data, seed=0) -> 64-bit non-cryptographic checksum"},
    {"delta_encode", KW tn_delta_encode, METH_VARARGS | METH_KEYWORDS,
     "delta_encode(pages, pfns, cache_tags, cache_data, out, page_size=4096) -> bytes written"},
    {"delta_decode", KW tn_delta_decode, METH_VARARGS | METH_KEYWORDS,
     "delta_decode(encoded, pfns, reference, out, page_size=4096) -> bytes consumed"},
    {"empty_bytearray", KW tn_empty_bytearray, METH_VARARGS | METH_KEYWORDS,
     "empty_bytearray(size) -> bytearray whose contents are not initialised"},
    {"memcpy", KW tn_memcpy, METH_VARARGS | METH_KEYWORDS,
     "memcpy(dst, src) -> bytes copied (len(src))"},
    {"kvm_run", KW tn_kvm_run, METH_VARARGS | METH_KEYWORDS,
     "kvm_run(vcpu_fd) -> 0 or -errno"},
    {"get_dirty_log", KW tn_get_dirty_log, METH_VARARGS | METH_KEYWORDS,
     "get_dirty_log(vm_fd, slot, bitmap) -> None"},
    {"kvm_get_vcpu_state", KW tn_kvm_get_vcpu_state, METH_VARARGS | METH_KEYWORDS,
     "kvm_get_vcpu_state(vcpu_fd) -> (regs, sregs, fpu) as bytes"},
    {"kvm_sync_regs", KW tn_kvm_sync_regs, METH_VARARGS | METH_KEYWORDS,
     "kvm_sync_regs(vm_fd, run) -> bool"},
    {"kvm_wait_run", KW tn_kvm_wait_run, METH_VARARGS | METH_KEYWORDS,
     "kvm_wait_run(wait_fd, vcpu_fd, flags, spin_ns=0, save_fd=-1, state=None, work=None, run=None) -> (0 or -errno, resumed_ns)"},
    {"kvm_run_parking", KW tn_kvm_run_parking, METH_VARARGS | METH_KEYWORDS,
     "kvm_run_parking(vcpu_fd, park) -> 0 or -errno"},
    {"poll_or_park", KW tn_poll_or_park, METH_VARARGS | METH_KEYWORDS,
     "poll_or_park(fds, timeout_ms, park) -> -1 (parked) or mask of readable fds"},
    {"clear_dirty_log", KW tn_clear_dirty_log, METH_VARARGS | METH_KEYWORDS,
     "clear_dirty_log(vm_fd, slot, bitmap, pages) -> None"},
    {"current_cpu", tn_current_cpu, METH_NOARGS, "current_cpu() -> int"},
    {"spin_until_set", KW tn_spin_until_set, METH_VARARGS | METH_KEYWORDS,
     "spin_until_set(flag, timeout_ns) -> bool"},
    {"parked_work_wait", KW tn_py_parked_work_wait, METH_VARARGS | METH_KEYWORDS,
     "parked_work_wait(slot) -> None"},
    {"install_kick_handler", KW tn_install_kick_handler, METH_VARARGS | METH_KEYWORDS,
     "install_kick_handler(signum) -> None"},
    {"kick", KW tn_kick, METH_VARARGS | METH_KEYWORDS,
     "kick(thread_id, run, signum) -> None"},
    {"buffer_address", KW tn_buffer_address, METH_VARARGS | METH_KEYWORDS,
     "buffer_address(buf) -> int"},
    {"wp_open", KW tn_wp_open, METH_VARARGS | METH_KEYWORDS,
     "wp_open(ram) -> userfaultfd registered for write-protect over ram"},
    {"wp_protect", KW tn_wp_protect, METH_VARARGS | METH_KEYWORDS,
     "wp_protect(fd, ram, pfns, unit_pages=1) -> ioctls made"},
    {"wp_protect_bitmap", KW tn_wp_protect_bitmap, METH_VARARGS | METH_KEYWORDS,
     "wp_protect_bitmap(fd, ram, bitmap, unit_pages=1) -> ioctls made"},
    {"wp_lift_bitmap", KW tn_wp_lift_bitmap, METH_VARARGS | METH_KEYWORDS,
     "wp_lift_bitmap(fd, ram, bitmap, unit_pages=1) -> ioctls made"},
    {"wp_protect_bitmap_post", KW tn_wp_protect_bitmap_post, METH_VARARGS | METH_KEYWORDS,
     "wp_protect_bitmap_post(slot, fd, ram, bitmap, unit_pages=1) -> None"},
    {"wp_protect_bitmap_finish", KW tn_wp_protect_bitmap_finish, METH_VARARGS | METH_KEYWORDS,
     "wp_protect_bitmap_finish(slot) -> (ioctls made, ran on the parked thread, done_ns)"},
    {"wp_capture_post", KW tn_wp_capture_post, METH_VARARGS | METH_KEYWORDS,
     "wp_capture_post(slot, vm_fd, mem_slot, log, extra, out, fd, ram, unit_pages=1, "
     "min_pages=1) -> None"},
    {"wp_capture_count", KW tn_wp_capture_count, METH_VARARGS | METH_KEYWORDS,
     "wp_capture_count(slot) -> (dirty pages, protecting)"},
    {"wp_release", KW tn_wp_release, METH_VARARGS | METH_KEYWORDS, "wp_release(fd, ram) -> None"},
    {"wp_copy", KW tn_wp_copy, METH_VARARGS | METH_KEYWORDS,
     "wp_copy(fd, ram, pfns, staging, run_pages=64, unit_pages=1, checksums=None, "
     "batch_pages=0) -> (faults, serve_ns, serve_max_ns, copy_ns)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "tremus._native",
    "Native helper of tremus: page copy, hashing, delta coding and KVM calls, GIL released.",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "PAGE_SIZE", TREMUS_PAGE_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "PARKED_WORK_SLOT_BYTES", TN_PARKED_WORK_SLOT_BYTES) < 0 ||
        PyType_Ready(&tn_Hash64Type) < 0 ||
        PyModule_AddObjectRef(m, "Hash64", (PyObject *)&tn_Hash64Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
