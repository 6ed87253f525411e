/*
 * shardio.fabric._ring: the hot path of the cross-shard fabric.
 *
 * A Ring is a single-producer/single-consumer byte ring that lives in a
 * shared buffer (a memfd mapping shared by all shard processes).  Messages
 * are byte strings; a message larger than one record is split into
 * fragments that the consumer side reassembles, so any size crosses a ring
 * of any capacity.
 *
 * Shared layout at `offset` (64-byte aligned):
 *
 *   +0    u64 tail               written by the producer only
 *   +64   u64 head               written by the consumer only
 *   +128  u32 producer_waiting   set by a producer that found the ring full
 *   +192  data[capacity]         capacity is a power of two
 *
 * Records are 8-byte aligned: [u32 length][u32 flags][payload, padded].
 * FLAG_MORE marks a fragment that is followed by more of the same message;
 * FLAG_PAD marks filler up to the end of the data area (the next record
 * starts at offset 0).  head and tail are free-running byte counters.
 *
 * Memory ordering: the producer writes a record and then publishes it with
 * a release store of tail; the consumer loads tail with acquire before it
 * reads the record, and releases head after it has copied the record out,
 * which the producer loads with acquire before it reuses the space.
 *
 * A Flag is one u32 in the shared buffer: a reactor's `sleeping` flag or a
 * shard's `alive` flag.  The sleep/wake protocol (DESIGN.md section 4):
 *   consumer: flag.set() [store 1 + full fence]; poll all rings once more;
 *             sleep on the doorbell only if they were all empty.
 *   producer: publish a record; flag.test_and_clear() [full fence +
 *             exchange(0)]; write the doorbell only if it returned True.
 * The two full fences make it a Dekker handshake: at least one side sees
 * the other's store, so either the consumer finds the record or the
 * producer finds the flag set and rings.  No wake-up is lost.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define OFF_TAIL 0
#define OFF_HEAD 64
#define OFF_WAITING 128
#define HEADER_BYTES 192
#define RECORD_HEADER 8
#define FLAG_MORE 1u
#define FLAG_PAD 2u
/* A fragment never shrinks below this while more than this remains:
   tiny fragments would cost more in headers and calls than they gain. */
#define MIN_FRAGMENT 4096

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

/* ------------------------------------------------------------------ Ring */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    char *base;               /* start of this ring's header */
    char *data;               /* start of the data area */
    uint64_t capacity;
    uint64_t mask;
    uint64_t max_fragment;
    uint64_t cached_head;     /* producer side: last head seen */
    uint64_t cached_tail;     /* consumer side: last tail seen */
    PyObject *partial;        /* consumer side: bytearray of a message being reassembled */
    uint64_t max_message;     /* consumer side: largest message accepted, 0 = no limit */
} Ring;

static inline _Atomic uint64_t *tail_ptr(Ring *r) { return (_Atomic uint64_t *)(r->base + OFF_TAIL); }
static inline _Atomic uint64_t *head_ptr(Ring *r) { return (_Atomic uint64_t *)(r->base + OFF_HEAD); }
static inline _Atomic uint32_t *waiting_ptr(Ring *r) { return (_Atomic uint32_t *)(r->base + OFF_WAITING); }

static int
Ring_init(Ring *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", "capacity", "initialize", NULL};
    PyObject *buffer;
    Py_ssize_t offset, capacity;
    int initialize = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onn|p", kwlist, &buffer, &offset, &capacity,
                                     &initialize))
        return -1;
    if (capacity < 4096 || (capacity & (capacity - 1)) != 0) {
        PyErr_Format(PyExc_ValueError, "ring capacity must be a power of two >= 4096, got %zd",
                     capacity);
        return -1;
    }
    if (offset < 0 || offset % 64 != 0) {
        PyErr_Format(PyExc_ValueError, "ring offset must be a non-negative multiple of 64, got %zd",
                     offset);
        return -1;
    }
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is already initialized");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_view = 1;
    if (offset + HEADER_BYTES + capacity > self->view.len) {
        PyErr_Format(PyExc_ValueError,
                     "ring at offset %zd with capacity %zd does not fit a buffer of %zd bytes",
                     offset, capacity, self->view.len);
        return -1;
    }
    if (((uintptr_t)self->view.buf) % 64 != 0) {
        PyErr_SetString(PyExc_ValueError, "ring buffer must be 64-byte aligned (use mmap)");
        return -1;
    }
    self->base = (char *)self->view.buf + offset;
    self->data = self->base + HEADER_BYTES;
    self->capacity = (uint64_t)capacity;
    self->mask = (uint64_t)capacity - 1;
    self->max_fragment = (uint64_t)capacity / 4 - RECORD_HEADER;
    if (initialize) {
        atomic_store_explicit(tail_ptr(self), 0, memory_order_relaxed);
        atomic_store_explicit(head_ptr(self), 0, memory_order_relaxed);
        atomic_store_explicit(waiting_ptr(self), 0, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
    }
    self->cached_head = atomic_load_explicit(head_ptr(self), memory_order_acquire);
    self->cached_tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
    return 0;
}

static void
Ring_release_view(Ring *self)
{
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    self->base = NULL;
    self->data = NULL;
}

static void
Ring_dealloc(Ring *self)
{
    Ring_release_view(self);
    Py_CLEAR(self->partial);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Ring_check(Ring *self)
{
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return -1;
    }
    return 0;
}

/* put(data, start=0) -> int
 * Write data[start:] as records while there is room; return the offset
 * reached (len(data) when the whole message is in the ring).  Records are
 * published with one release store at the end. */
static PyObject *
Ring_put(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "put(data, start=0)");
        return NULL;
    }
    if (Ring_check(self) < 0)
        return NULL;
    Py_buffer src;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t start = 0;
    if (nargs == 2) {
        start = PyLong_AsSsize_t(args[1]);
        if (start == -1 && PyErr_Occurred()) {
            PyBuffer_Release(&src);
            return NULL;
        }
    }
    if (src.len == 0 || start < 0 || start >= src.len) {
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError, "put needs a non-empty message and 0 <= start < len, got start=%zd len=%zd",
                     start, src.len);
        return NULL;
    }
    const char *p = (const char *)src.buf;
    uint64_t pos = (uint64_t)start, len = (uint64_t)src.len;
    uint64_t tail = atomic_load_explicit(tail_ptr(self), memory_order_relaxed);
    uint64_t cap = self->capacity;
    int wrote = 0;
    while (pos < len) {
        uint64_t free_bytes = cap - (tail - self->cached_head);
        uint64_t idx = tail & self->mask;
        uint64_t to_end = cap - idx;
        uint64_t remaining = len - pos;
        uint64_t want = remaining < self->max_fragment ? remaining : self->max_fragment;
        uint64_t need = RECORD_HEADER + align8(want);
        /* Room is measured against the contiguous span; a record never wraps. */
        if (need > to_end || need > free_bytes) {
            self->cached_head = atomic_load_explicit(head_ptr(self), memory_order_acquire);
            free_bytes = cap - (tail - self->cached_head);
            uint64_t usable = to_end < free_bytes ? to_end : free_bytes;
            if (need > usable) {
                /* A smaller fragment that fits here, if it is not tiny. */
                uint64_t fit = usable >= RECORD_HEADER ? ((usable - RECORD_HEADER) & ~(uint64_t)7u) : 0;
                if (fit >= MIN_FRAGMENT || (fit >= remaining && fit > 0)) {
                    want = fit < remaining ? fit : remaining;
                    need = RECORD_HEADER + align8(want);
                } else if (to_end < free_bytes && to_end < need) {
                    /* Fill the end of the area with a pad record and start over at 0. */
                    uint32_t *h = (uint32_t *)(self->data + idx);
                    h[0] = (uint32_t)(to_end - RECORD_HEADER);
                    h[1] = FLAG_PAD;
                    tail += to_end;
                    wrote = 1;
                    continue;
                } else {
                    break; /* full: the caller waits for the consumer */
                }
            }
        }
        uint32_t *h = (uint32_t *)(self->data + idx);
        h[0] = (uint32_t)want;
        h[1] = (pos + want < len) ? FLAG_MORE : 0;
        memcpy(self->data + idx + RECORD_HEADER, p + pos, (size_t)want);
        tail += need;
        pos += want;
        wrote = 1;
    }
    if (wrote)
        atomic_store_explicit(tail_ptr(self), tail, memory_order_release);
    PyBuffer_Release(&src);
    return PyLong_FromUnsignedLongLong(pos);
}

/* get(max_messages) -> list of complete messages (bytes, or bytearray for
 * reassembled fragments), or None when there was nothing to read.  An empty
 * list means fragments were consumed (space was freed) but no message is
 * complete yet; either way the caller checks take_space_waiter() after a
 * non-None result. */
static PyObject *
Ring_get(Ring *self, PyObject *arg)
{
    if (Ring_check(self) < 0)
        return NULL;
    Py_ssize_t max_messages = PyLong_AsSsize_t(arg);
    if (max_messages == -1 && PyErr_Occurred())
        return NULL;
    uint64_t head = atomic_load_explicit(head_ptr(self), memory_order_relaxed);
    uint64_t tail = self->cached_tail;
    if (head == tail) {
        tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
        self->cached_tail = tail;
        if (head == tail)
            Py_RETURN_NONE;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t count = 0;
    while (count < max_messages) {
        if (head == tail) {
            tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
            self->cached_tail = tail;
            if (head == tail)
                break;
        }
        /* head and tail live in memory the other side can write (an attached
           client's rings): never trust them, nor a record, beyond the data area. */
        if (((head | tail) & 7u) != 0 || tail - head > self->capacity) {
            PyErr_Format(PyExc_RuntimeError, "corrupt ring indexes (head %llu, tail %llu, capacity %llu)",
                         (unsigned long long)head, (unsigned long long)tail,
                         (unsigned long long)self->capacity);
            Py_DECREF(out);
            return NULL;
        }
        uint64_t idx = head & self->mask;
        uint32_t *h = (uint32_t *)(self->data + idx);
        uint32_t rlen = h[0], rflags = h[1];
        uint64_t advance = RECORD_HEADER + align8(rlen);
        if (advance > self->capacity - idx || advance > tail - head) {
            PyErr_Format(PyExc_RuntimeError, "corrupt ring record (length %u at index %llu)", rlen,
                         (unsigned long long)idx);
            Py_DECREF(out);
            return NULL;
        }
        if (rflags & FLAG_PAD) {
            head += advance;
            atomic_store_explicit(head_ptr(self), head, memory_order_release);
            continue;
        }
        if (self->max_message != 0 && (uint64_t)rlen +
                (self->partial == NULL ? 0 : (uint64_t)PyByteArray_GET_SIZE(self->partial)) >
                self->max_message) {
            PyErr_Format(PyExc_ValueError, "ring message larger than its limit of %llu bytes",
                         (unsigned long long)self->max_message);
            Py_DECREF(out);
            return NULL;
        }
        const char *payload = self->data + idx + RECORD_HEADER;
        if (self->partial == NULL && !(rflags & FLAG_MORE)) {
            PyObject *msg = PyBytes_FromStringAndSize(payload, rlen);
            if (msg == NULL || PyList_Append(out, msg) < 0) {
                Py_XDECREF(msg);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(msg);
            count++;
        } else {
            if (self->partial == NULL) {
                self->partial = PyByteArray_FromStringAndSize(NULL, 0);
                if (self->partial == NULL) {
                    Py_DECREF(out);
                    return NULL;
                }
            }
            Py_ssize_t old = PyByteArray_GET_SIZE(self->partial);
            if (PyByteArray_Resize(self->partial, old + rlen) < 0) {
                Py_DECREF(out);
                return NULL;
            }
            memcpy(PyByteArray_AS_STRING(self->partial) + old, payload, rlen);
            if (!(rflags & FLAG_MORE)) {
                if (PyList_Append(out, self->partial) < 0) {
                    Py_DECREF(out);
                    return NULL;
                }
                Py_CLEAR(self->partial);
                count++;
            }
        }
        head += advance;
        /* Free the space as we go, so a producer that is writing a large
           message in fragments can make progress while we reassemble. */
        atomic_store_explicit(head_ptr(self), head, memory_order_release);
    }
    return out;
}

/* ready() -> bool: is there at least one record to read? */
static PyObject *
Ring_ready(Ring *self, PyObject *Py_UNUSED(ignored))
{
    if (Ring_check(self) < 0)
        return NULL;
    uint64_t head = atomic_load_explicit(head_ptr(self), memory_order_relaxed);
    if (head != self->cached_tail)
        Py_RETURN_TRUE;
    self->cached_tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
    return PyBool_FromLong(head != self->cached_tail);
}

/* request_space() -> bool: producer side, after put() made no progress.
 * Marks the producer as waiting, then re-checks; True means space appeared
 * meanwhile (retry now), False means the consumer will wake the producer. */
static PyObject *
Ring_request_space(Ring *self, PyObject *Py_UNUSED(ignored))
{
    if (Ring_check(self) < 0)
        return NULL;
    atomic_store_explicit(waiting_ptr(self), 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t tail = atomic_load_explicit(tail_ptr(self), memory_order_relaxed);
    uint64_t head = atomic_load_explicit(head_ptr(self), memory_order_acquire);
    uint64_t before = self->cached_head;
    self->cached_head = head;
    return PyBool_FromLong(head != before || self->capacity - (tail - head) >= self->capacity / 2);
}

/* take_space_waiter() -> bool: consumer side, after get() freed space.
 * True (once) when a producer asked to be woken for space. */
static PyObject *
Ring_take_space_waiter(Ring *self, PyObject *Py_UNUSED(ignored))
{
    if (Ring_check(self) < 0)
        return NULL;
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(waiting_ptr(self), memory_order_relaxed) == 0)
        Py_RETURN_FALSE;
    return PyBool_FromLong(atomic_exchange_explicit(waiting_ptr(self), 0, memory_order_seq_cst) != 0);
}

/* used() -> int: bytes currently occupied (a racy snapshot, for metrics). */
static PyObject *
Ring_used(Ring *self, PyObject *Py_UNUSED(ignored))
{
    if (Ring_check(self) < 0)
        return NULL;
    uint64_t tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
    uint64_t head = atomic_load_explicit(head_ptr(self), memory_order_acquire);
    return PyLong_FromUnsignedLongLong(tail >= head ? tail - head : 0);
}

/* reset_consumer(): drop everything unread and any partial message (the
 * producer is known to be dead). */
static PyObject *
Ring_reset_consumer(Ring *self, PyObject *Py_UNUSED(ignored))
{
    if (Ring_check(self) < 0)
        return NULL;
    uint64_t tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
    self->cached_tail = tail;
    atomic_store_explicit(head_ptr(self), tail, memory_order_release);
    Py_CLEAR(self->partial);
    Py_RETURN_NONE;
}

/* limit_messages(max_bytes): consumer side, refuse (ValueError from get) a message
 * larger than max_bytes, reassembled fragments included; 0 lifts the limit. */
static PyObject *
Ring_limit_messages(Ring *self, PyObject *arg)
{
    unsigned long long limit = PyLong_AsUnsignedLongLong(arg);
    if (limit == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    self->max_message = limit;
    Py_RETURN_NONE;
}

static PyObject *
Ring_close(Ring *self, PyObject *Py_UNUSED(ignored))
{
    Ring_release_view(self);
    Py_CLEAR(self->partial);
    Py_RETURN_NONE;
}

static PyObject *
Ring_get_capacity(Ring *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->capacity);
}

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL,
     "put(data, start=0) -> int: write data[start:]; return the offset reached."},
    {"get", (PyCFunction)Ring_get, METH_O, "get(max_messages) -> list of complete messages, or None if the ring was empty."},
    {"ready", (PyCFunction)Ring_ready, METH_NOARGS, "True when a record is waiting."},
    {"request_space", (PyCFunction)Ring_request_space, METH_NOARGS,
     "Producer: ask to be woken when space frees; True if space appeared meanwhile."},
    {"take_space_waiter", (PyCFunction)Ring_take_space_waiter, METH_NOARGS,
     "Consumer: True (once) if a producer waits for space."},
    {"used", (PyCFunction)Ring_used, METH_NOARGS, "Bytes occupied (snapshot)."},
    {"reset_consumer", (PyCFunction)Ring_reset_consumer, METH_NOARGS,
     "Discard unread records and partial messages."},
    {"limit_messages", (PyCFunction)Ring_limit_messages, METH_O,
     "Consumer: refuse messages larger than max_bytes (0: no limit)."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "Release the shared buffer."},
    {NULL}};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "data area size in bytes", NULL},
    {NULL}};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shardio.fabric._ring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(buffer, offset, capacity, initialize=False): an SPSC byte ring in shared memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

/* ------------------------------------------------------------------ Flag */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    _Atomic uint32_t *word;
} Flag;

static int
Flag_init(Flag *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buffer", "offset", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On", kwlist, &buffer, &offset))
        return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Flag is already initialized");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_view = 1;
    if (offset < 0 || offset % 4 != 0 || offset + 4 > self->view.len) {
        PyErr_Format(PyExc_ValueError, "flag offset %zd is not an aligned offset inside the buffer",
                     offset);
        return -1;
    }
    self->word = (_Atomic uint32_t *)((char *)self->view.buf + offset);
    return 0;
}

static void
Flag_dealloc(Flag *self)
{
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define FLAG_CHECK(self)                                                  \
    if ((self)->word == NULL || !(self)->has_view) {                      \
        PyErr_SetString(PyExc_ValueError, "flag is closed");              \
        return NULL;                                                      \
    }

/* set(): store 1, then a full fence (the consumer half of the handshake). */
static PyObject *
Flag_set(Flag *self, PyObject *Py_UNUSED(ignored))
{
    FLAG_CHECK(self);
    atomic_store_explicit(self->word, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyObject *
Flag_clear(Flag *self, PyObject *Py_UNUSED(ignored))
{
    FLAG_CHECK(self);
    atomic_store_explicit(self->word, 0, memory_order_release);
    Py_RETURN_NONE;
}

/* test_and_clear() -> bool: a full fence, then exchange(0) if it is set
 * (the producer half of the handshake; True means: ring the doorbell). */
static PyObject *
Flag_test_and_clear(Flag *self, PyObject *Py_UNUSED(ignored))
{
    FLAG_CHECK(self);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(self->word, memory_order_relaxed) == 0)
        Py_RETURN_FALSE;
    return PyBool_FromLong(atomic_exchange_explicit(self->word, 0, memory_order_seq_cst) != 0);
}

static PyObject *
Flag_is_set(Flag *self, PyObject *Py_UNUSED(ignored))
{
    FLAG_CHECK(self);
    return PyBool_FromLong(atomic_load_explicit(self->word, memory_order_acquire) != 0);
}

static PyObject *
Flag_close(Flag *self, PyObject *Py_UNUSED(ignored))
{
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    self->word = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Flag_methods[] = {
    {"set", (PyCFunction)Flag_set, METH_NOARGS, "Store 1, then a full fence."},
    {"clear", (PyCFunction)Flag_clear, METH_NOARGS, "Store 0."},
    {"test_and_clear", (PyCFunction)Flag_test_and_clear, METH_NOARGS,
     "Full fence, then atomically clear; True if it was set."},
    {"is_set", (PyCFunction)Flag_is_set, METH_NOARGS, "Load the flag."},
    {"close", (PyCFunction)Flag_close, METH_NOARGS, "Release the shared buffer."},
    {NULL}};

static PyTypeObject FlagType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shardio.fabric._ring.Flag",
    .tp_basicsize = sizeof(Flag),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Flag(buffer, offset): an atomic u32 flag in shared memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Flag_init,
    .tp_dealloc = (destructor)Flag_dealloc,
    .tp_methods = Flag_methods,
};

/* ---------------------------------------------------------------- module */

static struct PyModuleDef ringmodule = {
    PyModuleDef_HEAD_INIT, "_ring", "SPSC rings and atomic flags in shared memory.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&FlagType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ringmodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    Py_INCREF(&FlagType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(m, "Flag", (PyObject *)&FlagType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
