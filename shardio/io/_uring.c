/*
 * shardio.io._uring: a small io_uring ring on the kernel's own interface.
 *
 * No liburing: io_uring_setup/io_uring_enter/io_uring_register through
 * syscall(2), the SQ/CQ rings and the SQE array mapped with mmap(2), the
 * layout and constants from <linux/io_uring.h>.
 *
 * One Ring belongs to one thread (an event loop's); it is not locked.
 *
 * Ops in flight live in *slots*.  A slot holds what the kernel may still
 * touch (a page-aligned buffer it reads into or writes from, a Python
 * buffer it writes from, the path bytes, a struct statx) and the caller's
 * token (any object, handed back by reap()).  A slot is released only when
 * its CQE has been reaped, never earlier: not when the caller gives up
 * (cancel() drops the token and asks the kernel to cancel, the memory stays),
 * not at close() while ops are still in the kernel (their memory is leaked
 * on purpose).  user_data is the slot index; ASYNC_CANCEL requests carry
 * CANCEL_TAG and need no slot.
 *
 * The hot path is two calls: await_op() on a tame stack (prepare the SQE with
 * the caller's Parked as token, ask the driver for a submit once per loop
 * pass, park, raise or return the result) and complete() on the loop (each
 * CQE's result straight to token.wake(), submitting every `batch` SQEs the
 * resumed stacks queue).
 *
 * Memory ordering (the kernel is the other side of both rings):
 *   SQ: fill SQEs, then store-release sq.tail (the kernel load-acquires it);
 *       load-acquire sq.head before reusing an SQE the kernel consumed.
 *   CQ: load-acquire cq.tail before reading CQEs; store-release cq.head
 *       after copying them out, so the kernel may overwrite them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

/* IORING_OP_FTRUNCATE (Linux 6.9) is newer than some distributions'
   <linux/io_uring.h> (Debian 12 ships 6.1); the probe says if the kernel has it. */
#define OP_FTRUNCATE 55
/* cachestat(2) (Linux 6.5): one number on every architecture but alpha. */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

#define CANCEL_TAG UINT64_MAX
#define PAGE 4096u
#define POOL_CLASSES 11     /* 4 KiB .. 4 MiB */
#define POOL_KEEP 32        /* free buffers kept per size class, up to 32 KiB; fewer above */
#define MAX_IO (4u << 20)   /* one read/write op moves at most this much */

enum result_kind { RESULT_INT, RESULT_BYTES, RESULT_STATX, RESULT_FD };

typedef struct {
    PyObject *token;        /* handed back by reap(); NULL once dropped */
    PyObject *keep;         /* object kept alive for the kernel (path bytes) */
    void *mem;              /* buffer the kernel reads into / writes from: the slot's page or a pool buffer */
    unsigned mem_class;
    Py_buffer view;         /* a caller's buffer the kernel writes from */
    int has_view;
    int in_use;
    enum result_kind kind;
} Slot;

typedef struct {
    PyObject_HEAD
    int fd;
    unsigned sq_entries, cq_entries;
    _Atomic uint32_t *sq_head, *sq_tail;
    uint32_t sq_mask;
    uint32_t sq_local_tail;   /* SQEs prepared; published to the kernel at submit() */
    struct io_uring_sqe *sqes;
    _Atomic uint32_t *cq_head, *cq_tail;
    uint32_t cq_mask;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_map_size, cq_map_size, sqe_map_size;
    Slot *slots;
    uint32_t *free_slots;
    unsigned nfree;
    unsigned inflight;        /* slots in use (prepared, submitted, or cancelled) */
    unsigned inflight_peak;   /* the most slots ever in use at once */
    unsigned long long enters;  /* io_uring_enter calls that submitted */
    int completing;           /* complete() is running: a nested call returns 0 */
    int kick_pending;         /* await_op() called kick since the last submit() */
    unsigned long long cancels;  /* ops whose callers gave up while they were in flight */
    char *pages;              /* one 4 KiB page per slot, registered as fixed buffer 0 */
    size_t pages_size;
    int pages_registered;     /* reads of <= 4 KiB then use READ_FIXED: no page pinning per op */
    void *pool[POOL_CLASSES][POOL_KEEP];
    unsigned pool_len[POOL_CLASSES];
    uint8_t supported[256];
    unsigned leaked;          /* slots abandoned at close() with the kernel still on them */
    /* read_direct()'s configuration (configure_direct_reads); NULL until then, cleared at close. */
    PyObject *dr_parked;      /* the wake-up token type: Parked("io_uring", "read") */
    PyObject *dr_kick;        /* as await_op's kick */
    PyObject *dr_rt;          /* the runtime: its running_group must be None */
    PyObject *dr_waiters;     /* the driver's slot waiters: must be empty */
    PyObject *dr_slow;        /* slow(fd, n, offset): every case the fast path does not take */
    PyObject *dr_rest;        /* rest(fd, n, offset, data): after a short read */
    unsigned dr_max_inflight;
    int dr_open;              /* the driver is usable (not broken, not closed) */
    unsigned long long direct_reads;  /* reads completed by read_direct's own path */
} Ring;

static long sys_setup(unsigned entries, struct io_uring_params *p)
{ return syscall(__NR_io_uring_setup, entries, p); }

static long sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{ return syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0); }

static long sys_register(int fd, unsigned opcode, void *arg, unsigned nr_args)
{ return syscall(__NR_io_uring_register, fd, opcode, arg, nr_args); }

/* ------------------------------------------------------------ buffer pool */

static unsigned size_class(size_t n)
{
    unsigned c = 0;
    size_t size = PAGE;
    while (size < n) { size <<= 1; c++; }
    return c;
}

static void *pool_get(Ring *r, unsigned c)
{
    if (r->pool_len[c])
        return r->pool[c][--r->pool_len[c]];
    return aligned_alloc(PAGE, (size_t)PAGE << c);
}

static void pool_put(Ring *r, void *mem, unsigned c)
{
    /* 32 of 4..32 KiB, then halving: 16 of 64 KiB ... 1 of 1 MiB and above */
    unsigned keep = c <= 3 ? POOL_KEEP : (c - 3 >= 5 ? 1 : POOL_KEEP >> (c - 3));
    if (r->pool_len[c] < keep)
        r->pool[c][r->pool_len[c]++] = mem;
    else
        free(mem);
}

/* ------------------------------------------------------------------ slots */

static void slot_release(Ring *r, uint32_t i)
{
    Slot *s = &r->slots[i];
    Py_CLEAR(s->token);
    Py_CLEAR(s->keep);
    if (s->mem && s->mem != r->pages + (size_t)i * PAGE) pool_put(r, s->mem, s->mem_class);
    s->mem = NULL;
    if (s->has_view) { PyBuffer_Release(&s->view); s->has_view = 0; }
    s->in_use = 0;
    r->free_slots[r->nfree++] = i;
    r->inflight--;
}

/* The next SQE and a slot for it, or NULL (with *slot untouched) when either is exhausted. */
static struct io_uring_sqe *sqe_get(Ring *r, uint32_t *slot)
{
    uint32_t head = atomic_load_explicit(r->sq_head, memory_order_acquire);
    if (r->sq_local_tail - head >= r->sq_entries || (slot && r->nfree == 0))
        return NULL;
    struct io_uring_sqe *sqe = &r->sqes[r->sq_local_tail & r->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    if (slot) {
        uint32_t i = r->free_slots[--r->nfree];
        Slot *s = &r->slots[i];
        s->in_use = 1;
        s->kind = RESULT_INT;
        if (++r->inflight > r->inflight_peak) r->inflight_peak = r->inflight;
        sqe->user_data = i;
        *slot = i;
    } else {
        sqe->user_data = CANCEL_TAG;
    }
    return sqe;
}

/* Commit a filled SQE: its slot takes the token; returns the slot index. */
static PyObject *sqe_commit(Ring *r, uint32_t slot, PyObject *token)
{
    Py_INCREF(token);
    r->slots[slot].token = token;
    r->sq_local_tail++;
    return PyLong_FromUnsignedLong(slot);
}

static int check_open(Ring *r)
{
    if (r->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the io_uring ring is closed");
        return -1;
    }
    return 0;
}

/* A NUL-terminated path from a bytes object, or NULL with ValueError/TypeError set. */
static const char *path_of(PyObject *path)
{
    if (!PyBytes_Check(path)) {
        PyErr_Format(PyExc_TypeError, "path must be bytes, not %.100s", Py_TYPE(path)->tp_name);
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(path);
    if ((Py_ssize_t)strlen(p) != PyBytes_GET_SIZE(path)) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte in path");
        return NULL;
    }
    return p;
}

/* Most prep methods share this: check the ring, get an SQE and slot, or return None. */
#define PREP_BEGIN(r, sqe, slot)                                     \
    if (check_open(r) < 0) return NULL;                              \
    uint32_t slot;                                                   \
    struct io_uring_sqe *sqe = sqe_get(r, &slot);                    \
    if (sqe == NULL) Py_RETURN_NONE

/* ------------------------------------------------------------- lifecycle */

static void ring_unmap(Ring *r)
{
    if (r->sqe_map) munmap(r->sqe_map, r->sqe_map_size);
    if (r->cq_map && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_size);
    if (r->sq_map) munmap(r->sq_map, r->sq_map_size);
    r->sqe_map = r->cq_map = r->sq_map = NULL;
    if (r->fd >= 0) close(r->fd);
    r->fd = -1;
}

static int
Ring_init(Ring *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"entries", "flags", NULL};
    unsigned entries = 128, extra_flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|II", kwlist, &entries, &extra_flags))
        return -1;
    if (self->fd >= 0 || self->slots) {
        PyErr_SetString(PyExc_RuntimeError, "Ring.__init__ called twice");
        return -1;
    }
    self->fd = -1;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    /* SUBMIT_ALL (5.18): an SQE that fails early does not stop the rest of the batch. */
    p.flags = IORING_SETUP_SUBMIT_ALL | extra_flags;
    long fd = sys_setup(entries, &p);
    if (fd < 0 && errno == EINVAL) {
        memset(&p, 0, sizeof(p));
        fd = sys_setup(entries, &p);
    }
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "io_uring_setup");
        return -1;
    }
    self->fd = (int)fd;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP)) {
        ring_unmap(self);
        errno = ENOSYS;
        PyErr_SetString(PyExc_OSError, "io_uring too old (needs SINGLE_MMAP and NODROP, Linux 5.5)");
        return -1;
    }
    self->sq_map_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (cq_size > self->sq_map_size) self->sq_map_size = cq_size;
    self->sq_map = mmap(NULL, self->sq_map_size, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_POPULATE, self->fd, IORING_OFF_SQ_RING);
    if (self->sq_map == MAP_FAILED) {
        self->sq_map = NULL;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "mmap of the io_uring rings");
        ring_unmap(self);
        return -1;
    }
    self->cq_map = self->sq_map;  /* IORING_FEAT_SINGLE_MMAP: one mapping holds both rings */
    self->cq_map_size = self->sq_map_size;
    self->sqe_map_size = p.sq_entries * sizeof(struct io_uring_sqe);
    self->sqe_map = mmap(NULL, self->sqe_map_size, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_POPULATE, self->fd, IORING_OFF_SQES);
    if (self->sqe_map == MAP_FAILED) {
        self->sqe_map = NULL;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "mmap of the io_uring SQEs");
        ring_unmap(self);
        return -1;
    }
    char *sq = self->sq_map, *cq = self->cq_map;
    self->sq_head = (_Atomic uint32_t *)(sq + p.sq_off.head);
    self->sq_tail = (_Atomic uint32_t *)(sq + p.sq_off.tail);
    self->sq_mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    self->sq_entries = p.sq_entries;
    self->sq_local_tail = atomic_load_explicit(self->sq_tail, memory_order_relaxed);
    uint32_t *array = (uint32_t *)(sq + p.sq_off.array);
    for (uint32_t i = 0; i < p.sq_entries; i++)
        array[i] = i;  /* SQE i always sits in array slot i; set once, before any submit */
    self->sqes = self->sqe_map;
    self->cq_head = (_Atomic uint32_t *)(cq + p.cq_off.head);
    self->cq_tail = (_Atomic uint32_t *)(cq + p.cq_off.tail);
    self->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    self->cq_entries = p.cq_entries;
    self->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

    /* At most sq_entries ops in flight, at most one cancel each: the CQ (2x) never overflows. */
    unsigned nslots = p.sq_entries <= p.cq_entries / 2 ? p.sq_entries : p.cq_entries / 2;
    self->slots = PyMem_Calloc(nslots, sizeof(Slot));
    self->free_slots = PyMem_Calloc(nslots, sizeof(uint32_t));
    if (!self->slots || !self->free_slots) {
        ring_unmap(self);
        PyErr_NoMemory();
        return -1;
    }
    for (unsigned i = 0; i < nslots; i++)
        self->free_slots[i] = nslots - 1 - i;
    self->nfree = nslots;

    self->pages = mmap(NULL, (size_t)nslots * PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (self->pages == MAP_FAILED) {
        self->pages = NULL;
        ring_unmap(self);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->pages_size = (size_t)nslots * PAGE;
    struct iovec pages_iov = {.iov_base = self->pages, .iov_len = self->pages_size};
    /* Fails under a tight RLIMIT_MEMLOCK: reads then use plain IORING_OP_READ. */
    self->pages_registered = sys_register(self->fd, IORING_REGISTER_BUFFERS, &pages_iov, 1) == 0;

    /* IORING_REGISTER_PROBE (5.6): which opcodes this kernel has. */
    size_t probe_size = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, probe_size);
    if (probe && sys_register(self->fd, IORING_REGISTER_PROBE, probe, 256) == 0) {
        for (unsigned i = 0; i < probe->ops_len && i < 256; i++)
            if (probe->ops[i].flags & IO_URING_OP_SUPPORTED)
                self->supported[probe->ops[i].op] = 1;
    }
    free(probe);
    return 0;
}

/* Free what no op in flight uses; slots the kernel may still touch are leaked. */
static void ring_free(Ring *r)
{
    if (r->slots) {
        unsigned nslots = r->nfree + r->inflight;
        for (unsigned i = 0; i < nslots; i++) {
            Slot *s = &r->slots[i];
            if (!s->in_use) continue;
            Py_CLEAR(s->token);
            r->leaked++;  /* s->mem, s->keep and s->view stay: the kernel may still use them */
        }
        if (r->leaked == 0) {
            PyMem_Free(r->slots);
            PyMem_Free(r->free_slots);
            if (r->pages) munmap(r->pages, r->pages_size);
        }
        r->pages = NULL;
        r->slots = NULL;
        r->free_slots = NULL;
    }
    for (unsigned c = 0; c < POOL_CLASSES; c++) {
        while (r->pool_len[c]) free(r->pool[c][--r->pool_len[c]]);
    }
    ring_unmap(r);
}

static void dr_clear(Ring *self);

static int
Ring_traverse(Ring *self, visitproc visit, void *arg)
{
    Py_VISIT(self->dr_parked);
    Py_VISIT(self->dr_kick);
    Py_VISIT(self->dr_rt);
    Py_VISIT(self->dr_waiters);
    Py_VISIT(self->dr_slow);
    Py_VISIT(self->dr_rest);
    return 0;
}

static int
Ring_clear(Ring *self)
{
    dr_clear(self);
    return 0;
}

static void
Ring_dealloc(Ring *self)
{
    PyObject_GC_UnTrack(self);
    dr_clear(self);
    ring_free(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Ring *self = (Ring *)type->tp_alloc(type, 0);
    if (self) self->fd = -1;
    return (PyObject *)self;
}

static PyObject *
Ring_close(Ring *self, PyObject *noargs)
{
    unsigned before = self->leaked;
    dr_clear(self);
    ring_free(self);
    return PyLong_FromUnsignedLong(self->leaked - before);
}

/* ------------------------------------------------------------------ preps */

static int parse_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "Ring.%s takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

static int as_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit a C int");
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int as_u64(PyObject *o, uint64_t *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "offsets and lengths must be >= 0");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

PyDoc_STRVAR(read_doc,
"read(fd, length, offset, token) -> slot or None\n\n"
"Queue a read of up to length (<= 4 MiB) bytes into a page-aligned buffer of the\n"
"ring (so O_DIRECT works); its result is the bytes read, or -errno.\n"
"None when no SQE or slot is free.");

/* Queue a read SQE whose token is token: its slot, -1 when no SQE or slot is free,
   -2 with an exception set. */
static long prep_read(Ring *self, int fd, uint64_t length, uint64_t offset, PyObject *token)
{
    if (length == 0 || length > MAX_IO) {
        PyErr_Format(PyExc_ValueError, "read length must be 1..%u bytes", MAX_IO);
        return -2;
    }
    if (check_open(self) < 0) return -2;
    uint32_t slot;
    struct io_uring_sqe *sqe = sqe_get(self, &slot);
    if (sqe == NULL) return -1;
    Slot *s = &self->slots[slot];
    if (length <= PAGE) {
        s->mem = self->pages + (size_t)slot * PAGE;
        sqe->opcode = self->pages_registered ? IORING_OP_READ_FIXED : IORING_OP_READ;
        sqe->buf_index = 0;
    } else {
        s->mem_class = size_class(length);
        s->mem = pool_get(self, s->mem_class);
        if (!s->mem) {
            slot_release(self, slot);
            PyErr_NoMemory();
            return -2;
        }
        sqe->opcode = IORING_OP_READ;
    }
    s->kind = RESULT_BYTES;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)s->mem;
    sqe->len = (uint32_t)length;
    sqe->off = offset;
    Py_INCREF(token);
    s->token = token;
    self->sq_local_tail++;
    return (long)slot;
}

static PyObject *
Ring_read(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd; uint64_t length, offset;
    if (parse_args(args, nargs, 4, "read") < 0 || as_int(args[0], &fd) < 0 ||
        as_u64(args[1], &length) < 0 || as_u64(args[2], &offset) < 0)
        return NULL;
    long slot = prep_read(self, fd, length, offset, args[3]);
    if (slot == -2) return NULL;
    if (slot == -1) Py_RETURN_NONE;
    return PyLong_FromLong(slot);
}

PyDoc_STRVAR(write_doc,
"write(fd, data, offset, copy, token) -> slot or None\n\n"
"Queue a write of data (<= 4 MiB, any buffer). copy=True copies it into a\n"
"page-aligned buffer of the ring first (needed for O_DIRECT); otherwise the\n"
"ring holds data's buffer until the completion. Result: bytes written or -errno.");

static PyObject *
Ring_write(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd; uint64_t offset;
    if (parse_args(args, nargs, 5, "write") < 0 || as_int(args[0], &fd) < 0 ||
        as_u64(args[2], &offset) < 0)
        return NULL;
    int copy = PyObject_IsTrue(args[3]);
    if (copy < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len == 0 || (size_t)view.len > MAX_IO) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "write length must be 1..%u bytes", MAX_IO);
        return NULL;
    }
    if (check_open(self) < 0) { PyBuffer_Release(&view); return NULL; }
    uint32_t slot;
    struct io_uring_sqe *sqe = sqe_get(self, &slot);
    if (sqe == NULL) { PyBuffer_Release(&view); Py_RETURN_NONE; }
    Slot *s = &self->slots[slot];
    void *addr = view.buf;
    if (copy) {
        s->mem_class = size_class(view.len);
        s->mem = pool_get(self, s->mem_class);
        if (!s->mem) {
            PyBuffer_Release(&view);
            slot_release(self, slot);
            return PyErr_NoMemory();
        }
        memcpy(s->mem, view.buf, view.len);
        addr = s->mem;
    }
    sqe->opcode = IORING_OP_WRITE;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)addr;
    sqe->len = (uint32_t)view.len;
    sqe->off = offset;
    if (copy) PyBuffer_Release(&view);
    else { s->view = view; s->has_view = 1; }
    return sqe_commit(self, slot, args[4]);
}

PyDoc_STRVAR(fsync_doc,
"fsync(fd, datasync, token) -> slot or None\n\nQueue an fsync (fdatasync if datasync).");

static PyObject *
Ring_fsync(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (parse_args(args, nargs, 3, "fsync") < 0 || as_int(args[0], &fd) < 0) return NULL;
    int datasync = PyObject_IsTrue(args[1]);
    if (datasync < 0) return NULL;
    PREP_BEGIN(self, sqe, slot);
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fd = fd;
    sqe->fsync_flags = datasync ? IORING_FSYNC_DATASYNC : 0;
    return sqe_commit(self, slot, args[2]);
}

PyDoc_STRVAR(openat_doc,
"openat(dir_fd, path, flags, mode, token) -> slot or None\n\n"
"Queue an openat(2); its result is the new fd or -errno. If the op is\n"
"cancelled and the open succeeds anyway, the ring closes the fd.");

static PyObject *
Ring_openat(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dir_fd, flags, mode;
    if (parse_args(args, nargs, 5, "openat") < 0 || as_int(args[0], &dir_fd) < 0 ||
        as_int(args[2], &flags) < 0 || as_int(args[3], &mode) < 0)
        return NULL;
    const char *path = path_of(args[1]);
    if (!path) return NULL;
    PREP_BEGIN(self, sqe, slot);
    Slot *s = &self->slots[slot];
    Py_INCREF(args[1]);
    s->keep = args[1];
    s->kind = RESULT_FD;
    sqe->opcode = IORING_OP_OPENAT;
    /* Straight to an io-wq worker: the inline attempt would add O_NONBLOCK, and a FIFO
       would then open at once for reading and fail with ENXIO for writing, where
       open(2) waits for the other end. */
    sqe->flags = IOSQE_ASYNC;
    sqe->fd = dir_fd;
    sqe->addr = (uint64_t)(uintptr_t)path;
    sqe->len = (uint32_t)mode;
    sqe->open_flags = (uint32_t)flags;
    return sqe_commit(self, slot, args[4]);
}

PyDoc_STRVAR(close_fd_doc, "close_fd(fd, token) -> slot or None\n\nQueue a close(2).");

static PyObject *
Ring_close_fd(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (parse_args(args, nargs, 2, "close_fd") < 0 || as_int(args[0], &fd) < 0) return NULL;
    PREP_BEGIN(self, sqe, slot);
    sqe->opcode = IORING_OP_CLOSE;
    sqe->fd = fd;
    return sqe_commit(self, slot, args[1]);
}

PyDoc_STRVAR(statx_doc,
"statx(dir_fd, path, flags, mask, token) -> slot or None\n\n"
"Queue a statx(2); its result is a tuple (mode, ino, dev, nlink, uid, gid,\n"
"size, atime_ns, mtime_ns, ctime_ns, blksize, blocks, rdev) or -errno.");

static PyObject *
Ring_statx(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dir_fd, flags, mask;
    if (parse_args(args, nargs, 5, "statx") < 0 || as_int(args[0], &dir_fd) < 0 ||
        as_int(args[2], &flags) < 0 || as_int(args[3], &mask) < 0)
        return NULL;
    const char *path = path_of(args[1]);
    if (!path) return NULL;
    PREP_BEGIN(self, sqe, slot);
    Slot *s = &self->slots[slot];
    s->mem = self->pages + (size_t)slot * PAGE;  /* struct statx is 256 bytes */
    Py_INCREF(args[1]);
    s->keep = args[1];
    s->kind = RESULT_STATX;
    sqe->opcode = IORING_OP_STATX;
    sqe->fd = dir_fd;
    sqe->addr = (uint64_t)(uintptr_t)path;
    sqe->len = (uint32_t)mask;
    sqe->statx_flags = (uint32_t)flags;
    sqe->addr2 = (uint64_t)(uintptr_t)s->mem;
    return sqe_commit(self, slot, args[4]);
}

PyDoc_STRVAR(renameat_doc,
"renameat(old_dir_fd, old, new_dir_fd, new, flags, token) -> slot or None\n\n"
"Queue a renameat2(2) (flags 0: replace new, like os.replace).");

static PyObject *
Ring_renameat(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int old_dir_fd, new_dir_fd, flags;
    if (parse_args(args, nargs, 6, "renameat") < 0 || as_int(args[0], &old_dir_fd) < 0 ||
        as_int(args[2], &new_dir_fd) < 0 || as_int(args[4], &flags) < 0)
        return NULL;
    const char *old_path = path_of(args[1]), *new_path = old_path ? path_of(args[3]) : NULL;
    if (!new_path) return NULL;
    PyObject *keep = PyTuple_Pack(2, args[1], args[3]);
    if (!keep) return NULL;
    if (check_open(self) < 0) { Py_DECREF(keep); return NULL; }
    uint32_t slot;
    struct io_uring_sqe *sqe = sqe_get(self, &slot);
    if (sqe == NULL) { Py_DECREF(keep); Py_RETURN_NONE; }
    self->slots[slot].keep = keep;
    sqe->opcode = IORING_OP_RENAMEAT;
    sqe->fd = old_dir_fd;
    sqe->addr = (uint64_t)(uintptr_t)old_path;
    sqe->len = (uint32_t)new_dir_fd;
    sqe->addr2 = (uint64_t)(uintptr_t)new_path;
    sqe->rename_flags = (uint32_t)flags;
    return sqe_commit(self, slot, args[5]);
}

PyDoc_STRVAR(unlinkat_doc,
"unlinkat(dir_fd, path, flags, token) -> slot or None\n\n"
"Queue an unlinkat(2) (flags AT_REMOVEDIR removes a directory).");

static PyObject *
Ring_unlinkat(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dir_fd, flags;
    if (parse_args(args, nargs, 4, "unlinkat") < 0 || as_int(args[0], &dir_fd) < 0 ||
        as_int(args[2], &flags) < 0)
        return NULL;
    const char *path = path_of(args[1]);
    if (!path) return NULL;
    PREP_BEGIN(self, sqe, slot);
    Py_INCREF(args[1]);
    self->slots[slot].keep = args[1];
    sqe->opcode = IORING_OP_UNLINKAT;
    sqe->fd = dir_fd;
    sqe->addr = (uint64_t)(uintptr_t)path;
    sqe->unlink_flags = (uint32_t)flags;
    return sqe_commit(self, slot, args[3]);
}

PyDoc_STRVAR(ftruncate_doc,
"ftruncate(fd, length, token) -> slot or None\n\nQueue an ftruncate(2) (Linux 6.9).");

static PyObject *
Ring_ftruncate(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd; uint64_t length;
    if (parse_args(args, nargs, 3, "ftruncate") < 0 || as_int(args[0], &fd) < 0 ||
        as_u64(args[1], &length) < 0)
        return NULL;
    PREP_BEGIN(self, sqe, slot);
    sqe->opcode = OP_FTRUNCATE;
    sqe->fd = fd;
    sqe->off = length;
    return sqe_commit(self, slot, args[2]);
}

PyDoc_STRVAR(nop_doc,
"nop(opcode, token) -> slot or None\n\n"
"Queue an SQE with only its opcode set: IORING_OP_NOP (0) completes with 0; an\n"
"opcode the kernel does not know completes with -EINVAL.");

static PyObject *
Ring_nop(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    int opcode;
    if (parse_args(args, nargs, 2, "nop") < 0 || as_int(args[0], &opcode) < 0) return NULL;
    if (opcode < 0 || opcode > 255) {
        PyErr_SetString(PyExc_ValueError, "opcode must be 0..255");
        return NULL;
    }
    PREP_BEGIN(self, sqe, slot);
    sqe->opcode = (uint8_t)opcode;
    sqe->fd = -1;
    return sqe_commit(self, slot, args[1]);
}

/* Drop token's interest in slot and queue an ASYNC_CANCEL; 0 if slot does not hold token. */
static int ring_cancel(Ring *r, long slot, PyObject *token)
{
    unsigned nslots = r->nfree + r->inflight;
    if (r->fd < 0 || slot < 0 || (unsigned long)slot >= nslots ||
        !r->slots[slot].in_use || r->slots[slot].token != token)
        return 0;
    Py_CLEAR(r->slots[slot].token);
    r->cancels++;
    struct io_uring_sqe *sqe = sqe_get(r, NULL);
    if (sqe) {  /* no free SQE: the op still completes in its own time */
        sqe->opcode = IORING_OP_ASYNC_CANCEL;
        sqe->fd = -1;
        sqe->addr = (uint64_t)slot;
        r->sq_local_tail++;
    }
    return 1;
}

PyDoc_STRVAR(cancel_doc,
"cancel(slot, token) -> bool\n\n"
"The caller of the op in slot (queued with token) no longer waits: drop the\n"
"token, so reap() will not hand it back, and queue an IORING_OP_ASYNC_CANCEL\n"
"for it. The slot's memory stays until the op's own CQE arrives. False if the\n"
"slot does not hold token (already completed).");

static PyObject *
Ring_cancel(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (parse_args(args, nargs, 2, "cancel") < 0) return NULL;
    long slot = PyLong_AsLong(args[0]);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ring_cancel(self, slot, args[1]));
}

/* ------------------------------------------------------------ submit/reap */

PyDoc_STRVAR(submit_doc,
"submit() -> int\n\n"
"Publish the queued SQEs and hand them to the kernel with io_uring_enter;\n"
"returns how many it took. Raises OSError if io_uring_enter fails (the SQEs\n"
"stay queued: retract() takes them back).");

/* Publish the prepared SQEs and io_uring_enter them: how many the kernel took, or -1 (errno). */
static long ring_submit(Ring *r)
{
    r->kick_pending = 0;  /* from here on, a new SQE needs a new kick */
    atomic_store_explicit(r->sq_tail, r->sq_local_tail, memory_order_release);
    uint32_t head = atomic_load_explicit(r->sq_head, memory_order_acquire);
    unsigned to_submit = r->sq_local_tail - head;
    if (to_submit == 0) return 0;
    long ret;
    do {
        ret = sys_enter(r->fd, to_submit, 0, 0);
    } while (ret < 0 && errno == EINTR);
    if (ret >= 0) r->enters++;
    return ret;
}

static PyObject *
Ring_submit(Ring *self, PyObject *noargs)
{
    if (check_open(self) < 0) return NULL;
    long ret = ring_submit(self);
    if (ret < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "io_uring_enter");
        return NULL;
    }
    return PyLong_FromLong(ret);
}

PyDoc_STRVAR(retract_doc,
"retract() -> list of tokens\n\n"
"Take back the SQEs the kernel has not consumed (after a failed submit):\n"
"their slots are released and their callers' tokens returned.");

static PyObject *
Ring_retract(Ring *self, PyObject *noargs)
{
    PyObject *tokens = PyList_New(0);
    if (!tokens || self->fd < 0) return tokens;
    uint32_t head = atomic_load_explicit(self->sq_head, memory_order_acquire);
    for (uint32_t t = head; t != self->sq_local_tail; t++) {
        uint64_t ud = self->sqes[t & self->sq_mask].user_data;
        if (ud == CANCEL_TAG) continue;
        Slot *s = &self->slots[ud];
        if (s->token && PyList_Append(tokens, s->token) < 0) {
            Py_DECREF(tokens);
            return NULL;
        }
        slot_release(self, (uint32_t)ud);
    }
    self->sq_local_tail = head;
    atomic_store_explicit(self->sq_tail, head, memory_order_release);
    return tokens;
}

static PyObject *statx_tuple(const struct statx *st)
{
    return Py_BuildValue(
        "(IKKIIIKLLLIKK)",
        (unsigned)st->stx_mode, (unsigned long long)st->stx_ino,
        (unsigned long long)makedev(st->stx_dev_major, st->stx_dev_minor),
        (unsigned)st->stx_nlink, (unsigned)st->stx_uid, (unsigned)st->stx_gid,
        (unsigned long long)st->stx_size,
        (long long)st->stx_atime.tv_sec * 1000000000LL + st->stx_atime.tv_nsec,
        (long long)st->stx_mtime.tv_sec * 1000000000LL + st->stx_mtime.tv_nsec,
        (long long)st->stx_ctime.tv_sec * 1000000000LL + st->stx_ctime.tv_nsec,
        (unsigned)st->stx_blksize, (unsigned long long)st->stx_blocks,
        (unsigned long long)makedev(st->stx_rdev_major, st->stx_rdev_minor));
}

/* The Python result of a CQE for slot s: an int (>= 0 or -errno), bytes, or a statx tuple. */
static PyObject *cqe_value(const Slot *s, int res)
{
    if (res < 0 || s->kind == RESULT_INT || s->kind == RESULT_FD)
        return PyLong_FromLong(res);
    if (s->kind == RESULT_BYTES)
        return PyBytes_FromStringAndSize(s->mem, res);
    return statx_tuple(s->mem);
}

PyDoc_STRVAR(reap_doc,
"reap() -> [token, result, token, result, ...]\n\n"
"Collect every posted CQE, as one flat list (no tuple per op). Results are ints\n"
"(>= 0, or -errno), bytes for reads and a tuple for statx (see statx). Cancelled\n"
"ops free their slots silently.");

static PyObject *
Ring_reap(Ring *self, PyObject *noargs)
{
    PyObject *done = PyList_New(0);
    if (!done || self->fd < 0) return done;
    uint32_t head = atomic_load_explicit(self->cq_head, memory_order_relaxed);
    uint32_t tail = atomic_load_explicit(self->cq_tail, memory_order_acquire);
    for (; head != tail; head++) {
        const struct io_uring_cqe *cqe = &self->cqes[head & self->cq_mask];
        uint64_t ud = cqe->user_data;
        int res = cqe->res;
        if (ud == CANCEL_TAG) continue;
        Slot *s = &self->slots[ud];
        if (s->token == NULL) {  /* its caller gave up */
            if (s->kind == RESULT_FD && res >= 0) close(res);
            slot_release(self, (uint32_t)ud);
            continue;
        }
        PyObject *value = cqe_value(s, res);
        if (!value || PyList_Append(done, s->token) < 0 || PyList_Append(done, value) < 0) {
            /* Out of memory: this CQE is lost to its caller but its slot is freed. */
            Py_XDECREF(value);
            slot_release(self, (uint32_t)ud);
            atomic_store_explicit(self->cq_head, head + 1, memory_order_release);
            Py_DECREF(done);
            return NULL;
        }
        Py_DECREF(value);
        slot_release(self, (uint32_t)ud);
    }
    atomic_store_explicit(self->cq_head, head, memory_order_release);
    return done;
}

static PyObject *str_wake;  /* "wake", interned */

PyDoc_STRVAR(complete_doc,
"complete(batch) -> int\n\n"
"Reap the CQEs posted so far and hand each result to its token at once:\n"
"token.wake(result) (the token's stack runs until it parks again), with no\n"
"list in between. Whenever batch (> 0) SQEs are queued meanwhile (by the\n"
"woken stacks), they are submitted, so the device works while later tokens\n"
"run; a failed io_uring_enter is not raised here: the SQEs stay queued for\n"
"the caller's submit(). Cancelled ops free their slots silently. Returns how\n"
"many CQEs were reaped; 0 when called from inside a wake (no nesting). If a\n"
"wake raises, the CQEs after it stay posted and the exception propagates.");

static PyObject *
Ring_complete(Ring *self, PyObject *arg)
{
    long batch = PyLong_AsLong(arg);
    if (batch == -1 && PyErr_Occurred()) return NULL;
    if (self->fd < 0 || self->completing) return PyLong_FromLong(0);
    self->completing = 1;
    int submit_ok = 1;
    long n = 0;
    uint32_t head = atomic_load_explicit(self->cq_head, memory_order_relaxed);
    uint32_t tail = atomic_load_explicit(self->cq_tail, memory_order_acquire);
    for (; head != tail; ) {
        const struct io_uring_cqe *cqe = &self->cqes[head & self->cq_mask];
        uint64_t ud = cqe->user_data;
        int res = cqe->res;
        head++;
        /* The CQE is copied out: give its entry back before running Python code. */
        atomic_store_explicit(self->cq_head, head, memory_order_release);
        n++;
        if (ud == CANCEL_TAG) continue;
        Slot *s = &self->slots[ud];
        PyObject *token = s->token;
        if (token == NULL) {  /* its caller gave up */
            if (s->kind == RESULT_FD && res >= 0) close(res);
            slot_release(self, (uint32_t)ud);
            continue;
        }
        PyObject *value = cqe_value(s, res);
        s->token = NULL;  /* the reference moves to us */
        slot_release(self, (uint32_t)ud);
        if (value == NULL) {  /* out of memory: the caller still gets an exception */
#if PY_VERSION_HEX >= 0x030C0000
            value = PyErr_GetRaisedException();
#else
            PyObject *type, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
#endif
            if (value == NULL) { Py_DECREF(token); self->completing = 0; return NULL; }
        }
        PyObject *ret = PyObject_CallMethodOneArg(token, str_wake, value);
        Py_DECREF(value);
        Py_DECREF(token);
        if (ret == NULL) { self->completing = 0; return NULL; }
        Py_DECREF(ret);
        if (self->fd < 0) break;  /* a woken stack closed the ring */
        if (submit_ok && batch > 0 &&
            self->sq_local_tail - atomic_load_explicit(self->sq_head, memory_order_acquire) >= (unsigned long)batch)
            submit_ok = ring_submit(self) >= 0;
    }
    self->completing = 0;
    return PyLong_FromLong(n);
}

static PyObject *str_park;  /* "park", interned */

/* Call kick() unless one is pending or complete() runs (it submits at its end). */
static int ring_kick(Ring *r, PyObject *kick)
{
    if (r->kick_pending || r->completing || r->fd < 0 || kick == Py_None) return 0;
    r->kick_pending = 1;
    PyObject *ret = PyObject_CallNoArgs(kick);
    if (ret == NULL) return -1;
    Py_DECREF(ret);
    return 0;
}

/* Park on the op queued in slot (token parked) and return its result: await_op's
   second half (see there), shared with read_direct. */
static PyObject *
await_slot(Ring *self, long slot, PyObject *parked, PyObject *kick,
           PyObject *filename, PyObject *filename2)
{
    if (ring_kick(self, kick) < 0) {
        /* The op is queued but nobody will submit it: take it back from the caller. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        ring_cancel(self, slot, parked);
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    PyObject *res = PyObject_CallMethodNoArgs(parked, str_park);
    if (res == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        int queued = ring_cancel(self, slot, parked);
        if (queued && ring_kick(self, kick) < 0) {
            PyErr_Clear();  /* the cancel SQE goes with the next submit */
        }
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    if (PyLong_CheckExact(res)) {
        long v = PyLong_AsLong(res);
        if (v < 0) {
            Py_DECREF(res);
            int code = (int)-v;
            PyObject *exc_args;
            if (filename2 != Py_None)
                exc_args = Py_BuildValue("(isOOO)", code, strerror(code), filename, Py_None, filename2);
            else if (filename != Py_None)
                exc_args = Py_BuildValue("(isO)", code, strerror(code), filename);
            else
                exc_args = Py_BuildValue("(is)", code, strerror(code));
            if (exc_args == NULL) return NULL;
            PyObject *exc = PyObject_Call(PyExc_OSError, exc_args, NULL);
            Py_DECREF(exc_args);
            if (exc == NULL) return NULL;
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
            return NULL;
        }
        return res;
    }
    if (PyExceptionInstance_Check(res)) {
        PyErr_SetObject((PyObject *)Py_TYPE(res), res);
        Py_DECREF(res);
        return NULL;
    }
    return res;
}

PyDoc_STRVAR(await_op_doc,
"await_op(prep, args, parked, kick, filename=None, filename2=None) -> result or None\n\n"
"The whole life of one op on a tame stack, in one call: prep(*args, parked)\n"
"queues its SQE (parked is the token), kick() is called if nothing has asked\n"
"for a submit() since the last one (the driver schedules it for the end of\n"
"the loop pass), then parked.park() waits until complete() wakes it with the\n"
"result. A negative result raises the OSError os.* would (with filename and\n"
"filename2); an exception woken in is raised. If park() raises (the stack is\n"
"cancelled), the op is cancelled in the kernel (its memory stays with its slot\n"
"until its CQE), kick() is called for the cancel SQE, and the exception\n"
"propagates. Returns None without parking when prep found no free SQE or slot.");

static PyObject *
Ring_await_op(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 4 || nargs > 6) {
        PyErr_SetString(PyExc_TypeError, "Ring.await_op takes 4 to 6 arguments");
        return NULL;
    }
    PyObject *prep = args[0], *prep_args = args[1], *parked = args[2], *kick = args[3];
    if (!PyTuple_CheckExact(prep_args)) {
        PyErr_SetString(PyExc_TypeError, "await_op: args must be a tuple");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(prep_args);
    PyObject *small[8], **vec = small;
    if (n + 1 > 8) {
        PyErr_SetString(PyExc_TypeError, "await_op: at most 7 prep arguments");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) vec[i] = PyTuple_GET_ITEM(prep_args, i);
    vec[n] = parked;
    PyObject *slot_obj = PyObject_Vectorcall(prep, vec, (size_t)n + 1, NULL);
    if (slot_obj == NULL) return NULL;
    if (slot_obj == Py_None) return slot_obj;  /* SQ or slots full: nothing queued */
    long slot = PyLong_AsLong(slot_obj);
    Py_DECREF(slot_obj);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    return await_slot(self, slot, parked, kick, nargs > 4 ? args[4] : Py_None,
                      nargs > 5 ? args[5] : Py_None);
}


static PyObject *str_io_uring, *str_read, *str_running_group;  /* interned */

PyDoc_STRVAR(configure_direct_reads_doc,
"configure_direct_reads(parked_type, kick, rt, waiters, max_inflight, slow, rest)\n\n"
"Set up read_direct(): parked_type(\"io_uring\", \"read\") makes its wake-up token,\n"
"kick is await_op's, rt.running_group and the waiters deque must be empty and\n"
"inflight below max_inflight for the fast path; slow(fd, n, offset) takes every\n"
"other case and rest(fd, n, offset, data) finishes a short read. Cleared by close().");

static void dr_clear(Ring *self)
{
    Py_CLEAR(self->dr_parked);
    Py_CLEAR(self->dr_kick);
    Py_CLEAR(self->dr_rt);
    Py_CLEAR(self->dr_waiters);
    Py_CLEAR(self->dr_slow);
    Py_CLEAR(self->dr_rest);
    self->dr_open = 0;
}

static PyObject *
Ring_configure_direct_reads(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (parse_args(args, nargs, 7, "configure_direct_reads") < 0) return NULL;
    long max_inflight = PyLong_AsLong(args[4]);
    if (max_inflight == -1 && PyErr_Occurred()) return NULL;
    if (max_inflight < 1) {
        PyErr_SetString(PyExc_ValueError, "configure_direct_reads: max_inflight must be >= 1");
        return NULL;
    }
    if (check_open(self) < 0) return NULL;
    dr_clear(self);
    PyObject **fields[] = {&self->dr_parked, &self->dr_kick, &self->dr_rt, &self->dr_waiters};
    for (int i = 0; i < 4; i++) { Py_INCREF(args[i]); *fields[i] = args[i]; }
    Py_INCREF(args[5]); self->dr_slow = args[5];
    Py_INCREF(args[6]); self->dr_rest = args[6];
    self->dr_max_inflight = (unsigned)max_inflight;
    self->dr_open = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(read_direct_doc,
"read_direct(fd, n, offset) -> bytes\n\n"
"A tame stack's O_DIRECT-style read through the ring, in one call: when the\n"
"driver is open, the stack runs in no scheduling group, nobody waits for a slot\n"
"and a slot is free, queue the read with a new Parked(\"io_uring\", \"read\"),\n"
"kick, park and return the bytes (cancel in the kernel if the park raises; a\n"
"negative result raises OSError). Any other case goes to slow(fd, n, offset);\n"
"a short, non-empty result to rest(fd, n, offset, data) (see\n"
"configure_direct_reads). direct_reads counts the reads this path completed.");

static PyObject *
Ring_read_direct(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (parse_args(args, nargs, 3, "read_direct") < 0) return NULL;
    if (self->dr_slow == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "read_direct: the ring is closed or configure_direct_reads was not called");
        return NULL;
    }
    int fast = self->dr_open && self->fd >= 0 && self->inflight < self->dr_max_inflight &&
               PyLong_CheckExact(args[0]) && PyLong_CheckExact(args[1]) &&
               PyLong_CheckExact(args[2]);
    long long n = 0, offset = 0;
    int fd = -1;
    if (fast) {
        n = PyLong_AsLongLong(args[1]);
        offset = PyLong_AsLongLong(args[2]);
        long f = PyLong_AsLong(args[0]);
        if (PyErr_Occurred()) { PyErr_Clear(); fast = 0; }
        fd = (int)f;
        fast = fast && n > 0 && n <= (long long)MAX_IO && offset >= 0 && f >= 0 && f <= INT32_MAX;
    }
    if (fast) {
        Py_ssize_t waiting = PyObject_Length(self->dr_waiters);
        if (waiting < 0) return NULL;
        fast = waiting == 0;
    }
    if (fast) {
        PyObject *group = PyObject_GetAttr(self->dr_rt, str_running_group);
        if (group == NULL) return NULL;
        fast = group == Py_None;
        Py_DECREF(group);
    }
    if (!fast) return PyObject_Vectorcall(self->dr_slow, args, 3, NULL);
    PyObject *what[2] = {str_io_uring, str_read};
    PyObject *parked = PyObject_Vectorcall(self->dr_parked, what, 2, NULL);
    if (parked == NULL) return NULL;
    long slot = prep_read(self, fd, (uint64_t)n, (uint64_t)offset, parked);
    if (slot < 0) {
        Py_DECREF(parked);
        if (slot == -2) return NULL;
        return PyObject_Vectorcall(self->dr_slow, args, 3, NULL);  /* SQ full */
    }
    PyObject *kick = self->dr_kick;
    Py_INCREF(kick);
    PyObject *res = await_slot(self, slot, parked, kick, Py_None, Py_None);
    Py_DECREF(kick);
    Py_DECREF(parked);
    if (res == NULL) return NULL;
    self->direct_reads++;
    if (PyBytes_CheckExact(res) && PyBytes_GET_SIZE(res) > 0 && PyBytes_GET_SIZE(res) < n &&
        self->dr_rest != NULL) {
        PyObject *rest = self->dr_rest;
        Py_INCREF(rest);
        PyObject *full[4] = {args[0], args[1], args[2], res};
        PyObject *ret = PyObject_Vectorcall(rest, full, 4, NULL);
        Py_DECREF(rest);
        Py_DECREF(res);
        return ret;
    }
    return res;
}

PyDoc_STRVAR(ready_doc, "ready() -> int\n\nHow many CQEs are posted and not yet reaped.");

static PyObject *
Ring_ready(Ring *self, PyObject *noargs)
{
    if (self->fd < 0) return PyLong_FromLong(0);
    uint32_t head = atomic_load_explicit(self->cq_head, memory_order_relaxed);
    uint32_t tail = atomic_load_explicit(self->cq_tail, memory_order_acquire);
    return PyLong_FromUnsignedLong(tail - head);
}

PyDoc_STRVAR(wait_doc,
"wait(timeout_ms) -> bool\n\n"
"Block (without the GIL) until a CQE is posted or timeout_ms passes; True if one is.");

static PyObject *
Ring_wait(Ring *self, PyObject *arg)
{
    int timeout = (int)PyLong_AsLong(arg);
    if (timeout == -1 && PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    struct pollfd pfd = {.fd = self->fd, .events = POLLIN};
    int ret;
    Py_BEGIN_ALLOW_THREADS
    ret = poll(&pfd, 1, timeout);
    Py_END_ALLOW_THREADS
    if (ret < 0 && errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(ret > 0);
}

PyDoc_STRVAR(supported_doc,
"supported(opcode) -> bool\n\nTrue if the kernel's IORING_REGISTER_PROBE lists opcode.");

static PyObject *
Ring_supported(Ring *self, PyObject *arg)
{
    long op = PyLong_AsLong(arg);
    if (op == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(op >= 0 && op < 256 && self->supported[op]);
}

static PyObject *Ring_get_fd(Ring *self, void *c) { return PyLong_FromLong(self->fd); }
static PyObject *Ring_get_inflight(Ring *self, void *c) { return PyLong_FromUnsignedLong(self->inflight); }
static PyObject *Ring_get_slots(Ring *self, void *c) { return PyLong_FromUnsignedLong(self->nfree + self->inflight); }
static PyObject *Ring_get_enters(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->enters); }
static PyObject *Ring_get_cancels(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->cancels); }
static PyObject *Ring_get_peak(Ring *self, void *c) { return PyLong_FromUnsignedLong(self->inflight_peak); }
static PyObject *Ring_get_leaked(Ring *self, void *c) { return PyLong_FromUnsignedLong(self->leaked); }
static PyObject *Ring_get_fixed(Ring *self, void *c) { return PyBool_FromLong(self->pages_registered); }
static PyObject *Ring_get_unsubmitted(Ring *self, void *c)
{
    if (self->fd < 0) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLong(
        self->sq_local_tail - atomic_load_explicit(self->sq_head, memory_order_acquire));
}

static PyObject *Ring_get_direct_reads(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->direct_reads); }
static PyObject *Ring_get_direct_open(Ring *self, void *c) { return PyBool_FromLong(self->dr_open); }
static int Ring_set_direct_open(Ring *self, PyObject *v, void *c)
{
    if (v == NULL) { PyErr_SetString(PyExc_TypeError, "direct_open cannot be deleted"); return -1; }
    int on = PyObject_IsTrue(v);
    if (on < 0) return -1;
    if (on && self->dr_slow == NULL) {
        PyErr_SetString(PyExc_ValueError, "direct_open: call configure_direct_reads first");
        return -1;
    }
    self->dr_open = on;
    return 0;
}

static PyGetSetDef Ring_getset[] = {
    {"direct_reads", (getter)Ring_get_direct_reads, NULL, "reads completed by read_direct's own path", NULL},
    {"direct_open", (getter)Ring_get_direct_open, (setter)Ring_set_direct_open,
     "read_direct may take its fast path (the driver clears it when broken or closed)", NULL},
    {"fd", (getter)Ring_get_fd, NULL, "the ring's file descriptor (-1 once closed)", NULL},
    {"inflight", (getter)Ring_get_inflight, NULL, "slots in use: ops queued or in the kernel", NULL},
    {"slots", (getter)Ring_get_slots, NULL, "how many ops can be in flight at once", NULL},
    {"unsubmitted", (getter)Ring_get_unsubmitted, NULL, "SQEs queued but not yet taken by the kernel", NULL},
    {"fixed_buffers", (getter)Ring_get_fixed, NULL, "True if reads of <= 4 KiB use registered buffers (READ_FIXED)", NULL},
    {"enters", (getter)Ring_get_enters, NULL, "io_uring_enter calls that submitted SQEs", NULL},
    {"cancels", (getter)Ring_get_cancels, NULL, "ops whose callers gave up while they were in flight", NULL},
    {"inflight_peak", (getter)Ring_get_peak, NULL, "the most slots ever in use at once", NULL},
    {"leaked", (getter)Ring_get_leaked, NULL, "slots abandoned at close() with the kernel still on them", NULL},
    {NULL},
};

static PyMethodDef Ring_methods[] = {
    {"read", (PyCFunction)(void (*)(void))Ring_read, METH_FASTCALL, read_doc},
    {"write", (PyCFunction)(void (*)(void))Ring_write, METH_FASTCALL, write_doc},
    {"fsync", (PyCFunction)(void (*)(void))Ring_fsync, METH_FASTCALL, fsync_doc},
    {"openat", (PyCFunction)(void (*)(void))Ring_openat, METH_FASTCALL, openat_doc},
    {"close_fd", (PyCFunction)(void (*)(void))Ring_close_fd, METH_FASTCALL, close_fd_doc},
    {"statx", (PyCFunction)(void (*)(void))Ring_statx, METH_FASTCALL, statx_doc},
    {"renameat", (PyCFunction)(void (*)(void))Ring_renameat, METH_FASTCALL, renameat_doc},
    {"unlinkat", (PyCFunction)(void (*)(void))Ring_unlinkat, METH_FASTCALL, unlinkat_doc},
    {"ftruncate", (PyCFunction)(void (*)(void))Ring_ftruncate, METH_FASTCALL, ftruncate_doc},
    {"nop", (PyCFunction)(void (*)(void))Ring_nop, METH_FASTCALL, nop_doc},
    {"cancel", (PyCFunction)(void (*)(void))Ring_cancel, METH_FASTCALL, cancel_doc},
    {"submit", (PyCFunction)Ring_submit, METH_NOARGS, submit_doc},
    {"retract", (PyCFunction)Ring_retract, METH_NOARGS, retract_doc},
    {"reap", (PyCFunction)Ring_reap, METH_NOARGS, reap_doc},
    {"complete", (PyCFunction)Ring_complete, METH_O, complete_doc},
    {"await_op", (PyCFunction)(void (*)(void))Ring_await_op, METH_FASTCALL, await_op_doc},
    {"read_direct", (PyCFunction)(void (*)(void))Ring_read_direct, METH_FASTCALL, read_direct_doc},
    {"configure_direct_reads", (PyCFunction)(void (*)(void))Ring_configure_direct_reads,
     METH_FASTCALL, configure_direct_reads_doc},
    {"ready", (PyCFunction)Ring_ready, METH_NOARGS, ready_doc},
    {"wait", (PyCFunction)Ring_wait, METH_O, wait_doc},
    {"supported", (PyCFunction)Ring_supported, METH_O, supported_doc},
    {"close", (PyCFunction)Ring_close, METH_NOARGS,
     "close() -> int\n\nRelease the ring; returns how many slots were leaked because the "
     "kernel still had them (wait for inflight == 0 first)."},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardio.io._uring.Ring",
    .tp_doc = PyDoc_STR("Ring(entries=128, flags=0): one io_uring instance; flags are extra\n"
                        "IORING_SETUP_* flags (see the module docstring)."),
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear,
    .tp_new = Ring_new,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

/* ------------------------------------------------------ module functions */

PyDoc_STRVAR(pread_nowait_doc,
"pread_nowait(fd, length, offset) -> bytes or None\n\n"
"preadv2(fd, length, offset, RWF_NOWAIT) into a new bytes object: the data if\n"
"the page cache had it, None if it would block (EAGAIN). Short only at EOF or\n"
"when only part was cached. Raises OSError on other errors.");

static PyObject *
pread_nowait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd; uint64_t length, offset;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "pread_nowait takes 3 arguments");
        return NULL;
    }
    if (as_int(args[0], &fd) < 0 || as_u64(args[1], &length) < 0 || as_u64(args[2], &offset) < 0)
        return NULL;
    if (length > PY_SSIZE_T_MAX) return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
    if (!out) return NULL;
    struct iovec iov = {.iov_base = PyBytes_AS_STRING(out), .iov_len = length};
    ssize_t got = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
    if (got < 0) {
        Py_DECREF(out);
        if (errno == EAGAIN) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if ((uint64_t)got < length && _PyBytes_Resize(&out, got) < 0)
        return NULL;
    return out;
}

PyDoc_STRVAR(cachestat_doc,
"cachestat(fd, offset, length) -> int or None\n\n"
"How many pages of [offset, offset+length) are in the page cache (cachestat(2),\n"
"Linux 6.5), without starting any I/O; None where the kernel lacks it.");

static PyObject *
cachestat_fn(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct { uint64_t off, len; } range;
    struct { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; } st;
    int fd;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "cachestat takes 3 arguments");
        return NULL;
    }
    if (as_int(args[0], &fd) < 0 || as_u64(args[1], &range.off) < 0 || as_u64(args[2], &range.len) < 0)
        return NULL;
    if (syscall(__NR_cachestat, fd, &range, &st, 0) != 0) {
        if (errno == ENOSYS || errno == EPERM) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(st.nr_cache);
}

static PyMethodDef module_methods[] = {
    {"pread_nowait", (PyCFunction)(void (*)(void))pread_nowait, METH_FASTCALL, pread_nowait_doc},
    {"cachestat", (PyCFunction)(void (*)(void))cachestat_fn, METH_FASTCALL, cachestat_doc},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardio.io._uring",
    .m_doc = PyDoc_STR("io_uring through the kernel's interface (no liburing); see _uring.c."),
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    if (PyType_Ready(&RingType) < 0) return NULL;
    if (!str_wake && !(str_wake = PyUnicode_InternFromString("wake"))) return NULL;
    if (!str_park && !(str_park = PyUnicode_InternFromString("park"))) return NULL;
    if (!str_io_uring && !(str_io_uring = PyUnicode_InternFromString("io_uring"))) return NULL;
    if (!str_read && !(str_read = PyUnicode_InternFromString("read"))) return NULL;
    if (!str_running_group && !(str_running_group = PyUnicode_InternFromString("running_group")))
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    struct { const char *name; long value; } consts[] = {
        {"OP_NOP", IORING_OP_NOP}, {"OP_READ", IORING_OP_READ}, {"OP_WRITE", IORING_OP_WRITE},
        {"OP_FSYNC", IORING_OP_FSYNC}, {"OP_OPENAT", IORING_OP_OPENAT},
        {"OP_CLOSE", IORING_OP_CLOSE}, {"OP_STATX", IORING_OP_STATX},
        {"OP_RENAMEAT", IORING_OP_RENAMEAT}, {"OP_UNLINKAT", IORING_OP_UNLINKAT},
        {"OP_FTRUNCATE", OP_FTRUNCATE}, {"OP_ASYNC_CANCEL", IORING_OP_ASYNC_CANCEL},
        {"STATX_BASIC_STATS", STATX_BASIC_STATS}, {"AT_EMPTY_PATH", AT_EMPTY_PATH},
        {"AT_SYMLINK_NOFOLLOW", AT_SYMLINK_NOFOLLOW}, {"AT_REMOVEDIR", AT_REMOVEDIR},
        {"AT_FDCWD", AT_FDCWD}, {"MAX_IO", MAX_IO},
    };
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++) {
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
