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
 * dispatch() and any_ready() are consumers by the same rules: tail loaded
 * with acquire before a record is read, head released only after the
 * record's bytes were copied into new objects (see dispatch's comment).
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

/* --------------------------------------------------------- compact values
 *
 * The common cross-shard call carries a few small plain values (None,
 * bool, int, float, str, bytes, tuples of them) and returns one.
 * Pickling those costs a Pickler per message (~0.3 us each way, four times
 * per round trip); this encoding writes them in one pass.  Only exact types
 * are encoded (a subclass could carry state or a custom __reduce__), ints
 * only within 64 bits, nesting only to COMPACT_MAX_DEPTH; anything else
 * makes the encoder answer None and the caller pickles the message.
 * Lists are left to pickle on purpose: pickle keeps two references to one
 * list as one list on the other side, and this encoding would not.
 *
 *   'N' | 'T' | 'F'                 None, True, False
 *   'i' i64                         int
 *   'd' f64                         float (its bits)
 *   's' u32 n, n bytes of UTF-8     str
 *   'b' u32 n, n bytes              bytes
 *   't' u32 n, n values             tuple
 *
 * All numbers little-endian.  The decoder checks every length against the
 * message's end, so a malformed message raises ValueError, never reads out
 * of bounds.
 */

#define COMPACT_MAX_DEPTH 32
#define KIND_CALL 5
#define KIND_RESULT 6
#define MESSAGE_HEADER 9 /* u8 kind, u64 request id (messages.HEADER) */

static inline void put_le64(char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (char)(v >> (8 * i)); }
static inline void put_le32(char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (char)(v >> (8 * i)); }
static inline uint64_t get_le64(const char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | (unsigned char)p[i];
    return v;
}
static inline uint32_t get_le32(const char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | (unsigned char)p[i];
    return v;
}

/* Bytes needed to encode o; 0 when o cannot be encoded compactly, -1 on error. */
static Py_ssize_t
compact_size(PyObject *o, int depth)
{
    PyTypeObject *t = Py_TYPE(o);
    if (o == Py_None || o == Py_True || o == Py_False)
        return 1;
    if (t == &PyLong_Type) {
        int overflow = 0;
        (void)PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow)
            return 0;
        return 9;
    }
    if (t == &PyFloat_Type)
        return 9;
    if (t == &PyUnicode_Type) {
        Py_ssize_t n;
        if (PyUnicode_AsUTF8AndSize(o, &n) == NULL) {
            PyErr_Clear(); /* lone surrogates: pickle knows how */
            return 0;
        }
        return n > (Py_ssize_t)UINT32_MAX ? 0 : 5 + n;
    }
    if (t == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        return n > (Py_ssize_t)UINT32_MAX ? 0 : 5 + n;
    }
    if (t == &PyTuple_Type) {
        if (depth >= COMPACT_MAX_DEPTH)
            return 0;
        Py_ssize_t n = PyTuple_GET_SIZE(o);
        if (n > (Py_ssize_t)UINT32_MAX)
            return 0;
        Py_ssize_t total = 5;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t s = compact_size(PyTuple_GET_ITEM(o, i), depth + 1);
            if (s <= 0)
                return s;
            total += s;
        }
        return total;
    }
    return 0;
}

/* Write o (already sized by compact_size) at p; return the end. */
static char *
compact_write(PyObject *o, char *p)
{
    PyTypeObject *t = Py_TYPE(o);
    if (o == Py_None) { *p = 'N'; return p + 1; }
    if (o == Py_True) { *p = 'T'; return p + 1; }
    if (o == Py_False) { *p = 'F'; return p + 1; }
    if (t == &PyLong_Type) {
        *p = 'i';
        put_le64(p + 1, (uint64_t)PyLong_AsLongLong(o));
        return p + 9;
    }
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        *p = 'd';
        put_le64(p + 1, bits);
        return p + 9;
    }
    if (t == &PyUnicode_Type || t == &PyBytes_Type) {
        Py_ssize_t n;
        const char *s;
        if (t == &PyUnicode_Type) {
            s = PyUnicode_AsUTF8AndSize(o, &n); /* cached by compact_size */
            *p = 's';
        } else {
            s = PyBytes_AS_STRING(o);
            n = PyBytes_GET_SIZE(o);
            *p = 'b';
        }
        put_le32(p + 1, (uint32_t)n);
        memcpy(p + 5, s, (size_t)n);
        return p + 5 + n;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(o);
    *p = 't';
    put_le32(p + 1, (uint32_t)n);
    p += 5;
    for (Py_ssize_t i = 0; i < n; i++)
        p = compact_write(PyTuple_GET_ITEM(o, i), p);
    return p;
}

static PyObject *
compact_malformed(const char *what)
{
    PyErr_Format(PyExc_ValueError, "malformed compact value: %s", what);
    return NULL;
}

/* Decode one value from [*pp, end); advance *pp.  NULL with ValueError if malformed. */
static PyObject *
compact_read(const char **pp, const char *end, int depth)
{
    const char *p = *pp;
    if (p >= end)
        return compact_malformed("truncated");
    char tag = *p++;
    PyObject *o = NULL;
    switch (tag) {
    case 'N': o = Py_NewRef(Py_None); break;
    case 'T': o = Py_NewRef(Py_True); break;
    case 'F': o = Py_NewRef(Py_False); break;
    case 'i':
        if (end - p < 8)
            return compact_malformed("truncated int");
        o = PyLong_FromLongLong((long long)get_le64(p));
        p += 8;
        break;
    case 'd': {
        if (end - p < 8)
            return compact_malformed("truncated float");
        uint64_t bits = get_le64(p);
        double d;
        memcpy(&d, &bits, 8);
        o = PyFloat_FromDouble(d);
        p += 8;
        break;
    }
    case 's':
    case 'b': {
        if (end - p < 4)
            return compact_malformed("truncated length");
        uint32_t n = get_le32(p);
        p += 4;
        if ((uint64_t)(end - p) < n)
            return compact_malformed("string runs past the end");
        o = tag == 's' ? PyUnicode_DecodeUTF8(p, n, "strict") : PyBytes_FromStringAndSize(p, n);
        p += n;
        break;
    }
    case 't': {
        if (depth >= COMPACT_MAX_DEPTH)
            return compact_malformed("nested too deep");
        if (end - p < 4)
            return compact_malformed("truncated length");
        uint32_t n = get_le32(p);
        p += 4;
        if ((uint64_t)(end - p) < n) /* every item takes at least one byte */
            return compact_malformed("sequence runs past the end");
        o = PyTuple_New(n);
        if (o == NULL)
            return NULL;
        for (uint32_t i = 0; i < n; i++) {
            PyObject *item = compact_read(&p, end, depth + 1);
            if (item == NULL) {
                Py_DECREF(o);
                return NULL;
            }
            PyTuple_SET_ITEM(o, i, item);
        }
        break;
    }
    default:
        return compact_malformed("unknown tag");
    }
    *pp = p;
    return o;
}

/* A message: [u8 kind][u64 request id][prefix (0 or 4 bytes)][compact value];
   None when the value cannot be encoded compactly. */
static PyObject *
compact_message(int kind, PyObject *request_id, const uint32_t *number, PyObject *value)
{
    uint64_t rid = PyLong_AsUnsignedLongLong(request_id);
    if (rid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = compact_size(value, 0);
    if (size < 0)
        return NULL;
    if (size == 0)
        Py_RETURN_NONE;
    Py_ssize_t prefix = MESSAGE_HEADER + (number ? 4 : 0);
    PyObject *out = PyBytes_FromStringAndSize(NULL, prefix + size);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    p[0] = (char)kind;
    put_le64(p + 1, rid);
    if (number)
        put_le32(p + MESSAGE_HEADER, *number);
    compact_write(value, p + prefix);
    return out;
}

/* encode_call(request_id, number, args) -> bytes | None */
static PyObject *
fabric_encode_call(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_call(request_id, number, args: tuple)");
        return NULL;
    }
    unsigned long number = PyLong_AsUnsignedLong(args[1]);
    if (number == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (number > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "function number does not fit 32 bits");
        return NULL;
    }
    uint32_t n32 = (uint32_t)number;
    return compact_message(KIND_CALL, args[0], &n32, args[2]);
}

/* encode_result(request_id, value) -> bytes | None */
static PyObject *
fabric_encode_result(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_result(request_id, value)");
        return NULL;
    }
    return compact_message(KIND_RESULT, args[0], NULL, args[1]);
}

/* decode_value(buffer, offset=0) -> object: the compact value at offset, which must
   end exactly at the buffer's end. */
static PyObject *
fabric_decode_value(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "decode_value(buffer, offset=0)");
        return NULL;
    }
    Py_ssize_t offset = 0;
    if (nargs == 2) {
        offset = PyLong_AsSsize_t(args[1]);
        if (offset == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *value = NULL;
    if (offset < 0 || offset > view.len) {
        compact_malformed("offset outside the buffer");
    } else {
        const char *p = (const char *)view.buf + offset, *end = (const char *)view.buf + view.len;
        value = compact_read(&p, end, 0);
        if (value != NULL && p != end) {
            Py_CLEAR(value);
            compact_malformed("trailing bytes");
        }
    }
    PyBuffer_Release(&view);
    return value;
}

/* ------------------------------------------------------------------ Ring */

static PyTypeObject RingType;

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
    int dispatching;          /* consumer side: inside dispatch() (its callbacks run) */
    PyObject *real_call_soon; /* dispatch(): the loop's own call_soon while captured */
    PyObject *captured_callback, *captured_args, *captured_context;
    int capturing;            /* dispatch(): inside future.set_result(), keep its first callback */
    uint64_t served_calls;    /* consumer side: calls dispatch() ran itself (its ``serve`` path) */
    uint64_t dispatched_messages; /* consumer side: messages dispatch() took, counted */
    uint64_t dispatched_bytes;    /* before their callbacks run (a callback may read them) */
    uint64_t eager_wakeups;       /* callbacks dispatch() ran at once (see set_result_eagerly) */
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

/* The record at ``head`` (tail: the last tail loaded), checked before it is used:
 * head, tail and the record header live in memory the producer can write (an
 * attached client's rings), so none of them is trusted beyond the data area, and
 * each is read once.  0 with the record's length, flags and size in the ring, or
 * -1 with RuntimeError (corrupt) or ValueError (over limit_messages). */
static inline int
checked_record(Ring *self, uint64_t head, uint64_t tail, uint32_t *rlen, uint32_t *rflags,
               uint64_t *advance)
{
    if (((head | tail) & 7u) != 0 || tail - head > self->capacity) {
        PyErr_Format(PyExc_RuntimeError, "corrupt ring indexes (head %llu, tail %llu, capacity %llu)",
                     (unsigned long long)head, (unsigned long long)tail,
                     (unsigned long long)self->capacity);
        return -1;
    }
    uint64_t idx = head & self->mask;
    volatile uint32_t *h = (volatile uint32_t *)(self->data + idx);
    *rlen = h[0];
    *rflags = h[1];
    *advance = RECORD_HEADER + align8(*rlen);
    if (*advance > self->capacity - idx || *advance > tail - head) {
        PyErr_Format(PyExc_RuntimeError, "corrupt ring record (length %u at index %llu)", *rlen,
                     (unsigned long long)idx);
        return -1;
    }
    if (!(*rflags & FLAG_PAD) && self->max_message != 0 &&
        (uint64_t)*rlen + (self->partial == NULL ? 0 : (uint64_t)PyByteArray_GET_SIZE(self->partial)) >
            self->max_message) {
        PyErr_Format(PyExc_ValueError, "ring message larger than its limit of %llu bytes",
                     (unsigned long long)self->max_message);
        return -1;
    }
    return 0;
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
        uint32_t rlen, rflags;
        uint64_t advance;
        if (checked_record(self, head, tail, &rlen, &rflags, &advance) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        if (rflags & FLAG_PAD) {
            head += advance;
            atomic_store_explicit(head_ptr(self), head, memory_order_release);
            continue;
        }
        uint64_t idx = head & self->mask;
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

/* ------------------------------------------------------------ dispatch
 *
 * Ring.dispatch(max_messages, pending, functions, on_call, on_message, loop, serve):
 * the consumer's poll step.  It takes up to max_messages complete messages
 * and acts on each, in ring order:
 *
 *   - a compact result (KIND_RESULT) for a call in ``pending`` (request id
 *     -> future): the future is removed from ``pending`` and, unless it is
 *     done (cancelled), gets ``set_result(value)``; a result nobody waits
 *     for any more is dropped;
 *   - a compact call (KIND_CALL) of a function in ``functions`` (number ->
 *     function): ``on_call(request_id, function, args)``;
 *   - anything else (pickled messages, a function this side never learned,
 *     a value that does not decode): ``on_message(message)``, as bytes.
 *
 * A record's bytes are decoded into new objects, and its space is released
 * (the release store of head, as in get()), before any callback runs: a
 * callback may then reset or close this ring (a peer declared dead), which
 * dispatch notices before it reads again.  An exception from a callback
 * ends the dispatch with that exception, after its message was consumed;
 * the messages after it stay in the ring for the next call.  Returns the
 * number of messages taken, or None when the ring was empty; the ring's
 * dispatched_messages/dispatched_bytes count them before their callbacks
 * run, so a callback that reads them sees its own message counted.
 *
 * Eager wake-up (the optional sixth argument, ``loop``): a future's
 * set_result() schedules its first done callback (the awaiting task's
 * wake-up) with loop.call_soon, so the task would run one loop iteration
 * later, after an epoll_wait.  With ``loop`` given, dispatch shadows the
 * loop's ``call_soon`` with an instance attribute for the duration of
 * set_result(), keeps the first callback scheduled, lets any further ones go
 * to the real call_soon, removes the shadow, and then runs the kept
 * callback itself, in its context, before the next message: the task resumes
 * in this iteration.  Its exception, if any, goes to the loop's exception
 * handler, as the loop would do.  The caller passes ``loop`` only when the
 * loop's class allows instance attributes and nothing else shadows call_soon.
 * The shadow goes in at the batch's first reply and stays until the batch
 * ends (one attribute dance per batch, not per reply); outside set_result()
 * it passes every call on to the real call_soon, so handlers and the woken
 * tasks that run meanwhile schedule as usual.
 *
 * The serve path (the optional seventh argument, ``serve``: a tuple
 * (context, reply, finish)): a compact call is run by dispatch itself,
 * ``function(*args)`` in ``context``, and a result the compact encoding
 * takes goes back through ``reply(compact RESULT message)``; an exception,
 * an awaitable or any other result goes to ``finish(request_id, result,
 * error)``.  Without it, calls go to ``on_call``.
 */

static PyObject *str_done, *str_set_result, *str_call_soon, *str_context;
static PyObject *str_call_exception_handler, *str_message, *str_exception;

/* How many times dispatch() handed work to Python or to the loop (on_call,
 * on_message, finish, a call_soon it did not keep, a set_result without the
 * shadow): while it stays put, everything dispatch did completed inside it,
 * and the reactor may keep polling instead of going round its loop. */
static uint64_t handovers;

/* loop.call_soon while dispatch() captures: keep the first callback, pass the rest on. */
static PyObject *
ring_capture_call_soon(PyObject *ring, PyObject *args, PyObject *kwargs)
{
    Ring *self = (Ring *)ring;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *context = NULL;
    int only_context = 1;
    if (kwargs != NULL) {
        context = PyDict_GetItemWithError(kwargs, str_context);
        if (context == NULL && PyErr_Occurred())
            return NULL;
        only_context = PyDict_GET_SIZE(kwargs) == (context != NULL);
    }
    if (self->capturing && self->captured_callback == NULL && self->real_call_soon != NULL && n >= 1 &&
        only_context) {
        PyObject *rest = PyTuple_GetSlice(args, 1, n);
        if (rest == NULL)
            return NULL;
        self->captured_callback = Py_NewRef(PyTuple_GET_ITEM(args, 0));
        self->captured_args = rest;
        self->captured_context = context == NULL || context == Py_None ? NULL : Py_NewRef(context);
        Py_RETURN_NONE; /* futures drop call_soon's handle */
    }
    if (self->real_call_soon == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Ring's call_soon capture was called outside dispatch()");
        return NULL;
    }
    handovers++;
    return PyObject_Call(self->real_call_soon, args, kwargs);
}

static PyMethodDef capture_def = {"call_soon", (PyCFunction)(void (*)(void))ring_capture_call_soon,
                                  METH_VARARGS | METH_KEYWORDS,
                                  "Ring.dispatch's stand-in for loop.call_soon."};

/* Report an exception of a callback the way the loop does. */
static void
report_to_loop(PyObject *loop, PyObject *callback)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *context = PyDict_New();
    PyObject *message = PyUnicode_FromFormat("Exception in callback %R", callback);
    if (context != NULL && message != NULL && value != NULL &&
        PyDict_SetItem(context, str_message, message) == 0 &&
        PyDict_SetItem(context, str_exception, value) == 0) {
        PyObject *r = PyObject_CallMethodOneArg(loop, str_call_exception_handler, context);
        Py_XDECREF(r);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(callback);
    Py_XDECREF(context);
    Py_XDECREF(message);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* Shadow loop.call_soon with the capture for the rest of a dispatch() batch. */
static int
shadow_call_soon(Ring *self, PyObject *loop)
{
    /* Made per batch: kept on the Ring it would make a reference cycle. */
    PyObject *capture = PyCFunction_New(&capture_def, (PyObject *)self);
    if (capture == NULL)
        return -1;
    PyObject *real = PyObject_GetAttr(loop, str_call_soon);
    if (real == NULL) {
        Py_DECREF(capture);
        return -1;
    }
    int shadowed = PyObject_SetAttr(loop, str_call_soon, capture);
    Py_DECREF(capture); /* the loop holds it until unshadow_call_soon() */
    if (shadowed < 0) {
        Py_DECREF(real);
        return -1;
    }
    self->real_call_soon = real;
    return 0;
}

/* Give the loop its own call_soon back; a pending exception survives. */
static int
unshadow_call_soon(Ring *self, PyObject *loop)
{
    PyObject *type, *err, *tb;
    PyErr_Fetch(&type, &err, &tb);
    int removed = PyObject_DelAttr(loop, str_call_soon);
    Py_CLEAR(self->real_call_soon);
    if (removed < 0) {
        Py_XDECREF(type); Py_XDECREF(err); Py_XDECREF(tb);
        return -1;
    }
    PyErr_Restore(type, err, tb);
    return 0;
}

/* future.set_result(value), then run the future's first callback here (see above);
   call_soon is already shadowed (shadow_call_soon). */
static PyObject *
set_result_eagerly(Ring *self, PyObject *loop, PyObject *future, PyObject *value)
{
    PyObject *real = self->real_call_soon;
    self->capturing = 1;
    PyObject *r = PyObject_CallMethodOneArg(future, str_set_result, value);
    self->capturing = 0;
    PyObject *callback = self->captured_callback, *args = self->captured_args;
    PyObject *context = self->captured_context;
    self->captured_callback = self->captured_args = self->captured_context = NULL;
    if (callback != NULL && r != NULL) {
        self->eager_wakeups++;
        if (context != NULL && PyContext_Enter(context) < 0) {
            /* Already entered somewhere up the stack: let the loop run it. */
            PyErr_Clear();
            handovers++;
            PyObject *kw = PyDict_New();
            PyObject *call = NULL;
            if (kw != NULL && PyDict_SetItem(kw, str_context, context) == 0) {
                PyObject *first = PyTuple_Pack(1, callback);
                PyObject *all = first != NULL ? PySequence_Concat(first, args) : NULL;
                Py_XDECREF(first);
                if (all != NULL) {
                    call = PyObject_Call(real, all, kw);
                    Py_DECREF(all);
                }
            }
            Py_XDECREF(kw);
            if (call == NULL)
                report_to_loop(loop, callback);
            Py_XDECREF(call);
        } else {
            PyObject *done = PyObject_Call(callback, args, NULL);
            if (done == NULL)
                report_to_loop(loop, callback);
            Py_XDECREF(done);
            if (context != NULL && PyContext_Exit(context) < 0)
                PyErr_WriteUnraisable(callback);
        }
    }
    Py_XDECREF(callback);
    Py_XDECREF(args);
    Py_XDECREF(context);
    return r;
}

/*
 * dispatch()'s serve path: a compact call from another shard run right here.
 * ``serve`` is (context, reply, finish): func(*args) runs in ``context`` (the
 * reactor's serving context), a plain result goes back as a compact RESULT
 * through ``reply(payload)``, and anything else (an exception, an awaitable,
 * a result the compact encoding does not take) through
 * ``finish(request_id, result, error)``, in Python.
 */
static PyObject *
serve_call(Ring *self, PyObject *key, PyObject *func, PyObject *args, PyObject *serve,
           PyObject *on_call)
{
    PyObject *context = PyTuple_GET_ITEM(serve, 0);
    PyObject *reply = PyTuple_GET_ITEM(serve, 1);
    PyObject *finish = PyTuple_GET_ITEM(serve, 2);
    if (PyContext_Enter(context) < 0) {
        /* Entered already (a caller up the stack): the general path knows what to do. */
        PyErr_Clear();
        handovers++;
        PyObject *argv[3] = {key, func, args};
        return PyObject_Vectorcall(on_call, argv, 3, NULL);
    }
    PyObject *result = PyObject_Call(func, args, NULL);
    PyObject *type = NULL, *error = NULL, *tb = NULL;
    if (result == NULL) {
        PyErr_Fetch(&type, &error, &tb);
        PyErr_NormalizeException(&type, &error, &tb);
        if (tb != NULL && error != NULL)
            PyException_SetTraceback(error, tb);
    }
    if (PyContext_Exit(context) < 0) {
        Py_XDECREF(result); Py_XDECREF(type); Py_XDECREF(error); Py_XDECREF(tb);
        return NULL;
    }
    self->served_calls++;
    PyObject *r;
    if (result == NULL) {
        handovers++;
        Py_XDECREF(type);
        Py_XDECREF(tb);
        if (error == NULL) /* cannot happen: a failed call sets an exception */
            error = Py_NewRef(Py_None);
        PyObject *argv[3] = {key, Py_None, error};
        r = PyObject_Vectorcall(finish, argv, 3, NULL);
        Py_DECREF(error);
        return r;
    }
    PyObject *payload = compact_message(KIND_RESULT, key, NULL, result);
    if (payload == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    if (payload != Py_None) {
        r = PyObject_CallOneArg(reply, payload);
    } else {
        handovers++;
        PyObject *argv[3] = {key, result, Py_None};
        r = PyObject_Vectorcall(finish, argv, 3, NULL);
    }
    Py_DECREF(payload);
    Py_DECREF(result);
    return r;
}

enum { ACT_DROP, ACT_RESULT, ACT_CALL, ACT_OTHER };

/* Decide what message [p, p+len) is and build the objects for it.  msg is the
   message object when it was reassembled (NULL while it is still in the ring). */
static int
dispatch_decode(const char *p, uint64_t len, PyObject *msg, PyObject *pending, PyObject *functions,
                PyObject **a, PyObject **b, PyObject **c)
{
    const char *end = p + len;
    int kind = len >= MESSAGE_HEADER ? (unsigned char)p[0] : -1;
    if (kind == KIND_RESULT || (kind == KIND_CALL && len >= MESSAGE_HEADER + 4)) {
        PyObject *key = PyLong_FromUnsignedLongLong(get_le64(p + 1));
        if (key == NULL)
            return -1;
        if (kind == KIND_RESULT) {
            PyObject *future = PyDict_GetItemWithError(pending, key); /* borrowed */
            if (future == NULL) {
                Py_DECREF(key);
                return PyErr_Occurred() ? -1 : ACT_DROP;
            }
            const char *q = p + MESSAGE_HEADER;
            PyObject *value = compact_read(&q, end, 0);
            if (value != NULL && q == end) {
                Py_INCREF(future);
                if (PyDict_DelItem(pending, key) < 0) {
                    Py_DECREF(future);
                    Py_DECREF(value);
                    Py_DECREF(key);
                    return -1;
                }
                Py_DECREF(key);
                *a = future;
                *b = value;
                return ACT_RESULT;
            }
            Py_XDECREF(value);
            PyErr_Clear(); /* malformed: on_message reports it */
        } else {
            PyObject *number = PyLong_FromUnsignedLong(get_le32(p + MESSAGE_HEADER));
            if (number == NULL) {
                Py_DECREF(key);
                return -1;
            }
            PyObject *func = PyDict_GetItemWithError(functions, number); /* borrowed */
            Py_DECREF(number);
            if (func == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                return -1;
            }
            /* Only real functions: a function that failed to arrive is
               recorded as something else, and on_message explains it. */
            if (func != NULL && (PyFunction_Check(func) || PyCFunction_Check(func))) {
                const char *q = p + MESSAGE_HEADER + 4;
                PyObject *args = compact_read(&q, end, 0);
                if (args != NULL && q == end && PyTuple_CheckExact(args)) {
                    Py_INCREF(func);
                    *a = key;
                    *b = func;
                    *c = args;
                    return ACT_CALL;
                }
                Py_XDECREF(args);
                PyErr_Clear();
            }
        }
        Py_DECREF(key);
    }
    if (msg != NULL) {
        Py_INCREF(msg);
        *a = msg;
    } else {
        *a = PyBytes_FromStringAndSize(p, (Py_ssize_t)len);
        if (*a == NULL)
            return -1;
    }
    return ACT_OTHER;
}

static int
dispatch_act(Ring *self, int action, PyObject *a, PyObject *b, PyObject *c, PyObject *on_call,
             PyObject *on_message, PyObject *loop, PyObject *serve, int *shadowed)
{
    PyObject *r = NULL;
    if (action == ACT_RESULT) {
        PyObject *done = PyObject_CallMethodNoArgs(a, str_done);
        if (done != NULL) {
            int is_done = PyObject_IsTrue(done);
            Py_DECREF(done);
            if (is_done == 0 && loop != NULL && !*shadowed) {
                if (shadow_call_soon(self, loop) < 0)
                    is_done = -1;
                else
                    *shadowed = 1;
            }
            if (is_done == 0 && loop == NULL)
                handovers++; /* its callbacks go to the loop */
            if (is_done == 0)
                r = loop != NULL ? set_result_eagerly(self, loop, a, b)
                                 : PyObject_CallMethodOneArg(a, str_set_result, b);
            else if (is_done == 1)
                r = Py_NewRef(Py_None);
        }
        Py_DECREF(a);
        Py_DECREF(b);
    } else if (action == ACT_CALL) {
        if (serve != NULL) {
            r = serve_call(self, a, b, c, serve, on_call);
        } else {
            handovers++;
            PyObject *argv[3] = {a, b, c};
            r = PyObject_Vectorcall(on_call, argv, 3, NULL);
        }
        Py_DECREF(a);
        Py_DECREF(b);
        Py_DECREF(c);
    } else {
        handovers++;
        r = PyObject_CallOneArg(on_message, a);
        Py_DECREF(a);
    }
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
Ring_dispatch(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 5 || nargs > 7 || !PyDict_Check(args[1]) || !PyDict_Check(args[2]) ||
        (nargs == 7 && args[6] != Py_None &&
         (!PyTuple_CheckExact(args[6]) || PyTuple_GET_SIZE(args[6]) != 3 ||
          !PyContext_CheckExact(PyTuple_GET_ITEM(args[6], 0))))) {
        PyErr_SetString(PyExc_TypeError,
                        "dispatch(max_messages, pending: dict, functions: dict, on_call, on_message, "
                        "loop=None, serve: (Context, reply, finish) | None = None)");
        return NULL;
    }
    if (Ring_check(self) < 0)
        return NULL;
    Py_ssize_t max_messages = PyLong_AsSsize_t(args[0]);
    if (max_messages == -1 && PyErr_Occurred())
        return NULL;
    PyObject *pending = args[1], *functions = args[2], *on_call = args[3], *on_message = args[4];
    PyObject *loop = nargs >= 6 && args[5] != Py_None ? args[5] : NULL;
    PyObject *serve = nargs == 7 && args[6] != Py_None ? args[6] : NULL;
    int shadowed = 0; /* loop.call_soon is shadowed from the first reply to the batch's end */
    uint64_t head = atomic_load_explicit(head_ptr(self), memory_order_relaxed);
    if (head == self->cached_tail) {
        self->cached_tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
        if (head == self->cached_tail)
            Py_RETURN_NONE;
    }
    if (self->dispatching) {
        PyErr_SetString(PyExc_RuntimeError, "Ring.dispatch() re-entered from one of its callbacks");
        return NULL;
    }
    self->dispatching = 1;
    Py_ssize_t count = 0;
    int failed = 0;
    while (count < max_messages && self->base != NULL) {
        /* Re-read: a callback may have reset this consumer. */
        head = atomic_load_explicit(head_ptr(self), memory_order_relaxed);
        if (head == self->cached_tail) {
            self->cached_tail = atomic_load_explicit(tail_ptr(self), memory_order_acquire);
            if (head == self->cached_tail)
                break;
        }
        uint32_t rlen, rflags;
        uint64_t advance;
        if (checked_record(self, head, self->cached_tail, &rlen, &rflags, &advance) < 0) {
            failed = 1;
            break;
        }
        if (rflags & FLAG_PAD) {
            atomic_store_explicit(head_ptr(self), head + advance, memory_order_release);
            continue;
        }
        uint64_t idx = head & self->mask;
        const char *payload = self->data + idx + RECORD_HEADER;
        PyObject *a = NULL, *b = NULL, *c = NULL;
        int action;
        if (self->partial == NULL && !(rflags & FLAG_MORE)) {
            action = dispatch_decode(payload, rlen, NULL, pending, functions, &a, &b, &c);
            if (action < 0) {
                failed = 1;
                break;
            }
            atomic_store_explicit(head_ptr(self), head + advance, memory_order_release);
            self->dispatched_bytes += rlen;
        } else {
            if (self->partial == NULL) {
                self->partial = PyByteArray_FromStringAndSize(NULL, 0);
                if (self->partial == NULL) {
                    failed = 1;
                    break;
                }
            }
            Py_ssize_t old = PyByteArray_GET_SIZE(self->partial);
            if (PyByteArray_Resize(self->partial, old + rlen) < 0) {
                failed = 1;
                break;
            }
            memcpy(PyByteArray_AS_STRING(self->partial) + old, payload, rlen);
            atomic_store_explicit(head_ptr(self), head + advance, memory_order_release);
            if (rflags & FLAG_MORE)
                continue;
            PyObject *whole = self->partial;
            self->partial = NULL;
            Py_ssize_t size = PyByteArray_GET_SIZE(whole);
            action = dispatch_decode(PyByteArray_AS_STRING(whole), (uint64_t)size, whole, pending,
                                     functions, &a, &b, &c);
            Py_DECREF(whole);
            if (action < 0) {
                failed = 1;
                break;
            }
            self->dispatched_bytes += (uint64_t)size;
        }
        count++;
        self->dispatched_messages++;
        if (action != ACT_DROP &&
            dispatch_act(self, action, a, b, c, on_call, on_message, loop, serve, &shadowed) < 0) {
            failed = 1;
            break;
        }
    }
    self->dispatching = 0;
    if (shadowed && unshadow_call_soon(self, loop) < 0)
        failed = 1;
    if (failed)
        return NULL;
    return PyLong_FromSsize_t(count);
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

/* any_ready(rings: tuple) -> bool: is a record waiting in any of them?  One call
   for a reactor's whole poll when all its rings are empty (the common case while
   it spins); the acquire load of tail is the same as in ready(). */
static PyObject *
fabric_any_ready(PyObject *Py_UNUSED(module), PyObject *rings)
{
    if (!PyTuple_CheckExact(rings)) {
        PyErr_SetString(PyExc_TypeError, "any_ready(rings: tuple of Ring)");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(rings);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(rings, i);
        if (!PyObject_TypeCheck(item, &RingType)) {
            PyErr_SetString(PyExc_TypeError, "any_ready(rings: tuple of Ring)");
            return NULL;
        }
        Ring *r = (Ring *)item;
        if (r->base == NULL)
            continue;
        uint64_t head = atomic_load_explicit(head_ptr(r), memory_order_relaxed);
        if (head != r->cached_tail)
            Py_RETURN_TRUE;
        r->cached_tail = atomic_load_explicit(tail_ptr(r), memory_order_acquire);
        if (head != r->cached_tail)
            Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
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

/* resolve_eagerly(loop, future, value): future.set_result(value), the awaiting
 * task resumed at once (dispatch()'s eager wake-up, above), for a consumer that
 * took the value off the ring under a lock of its own and resolves it after
 * releasing that lock (shardio.external's asyncio callers).  The same rules as
 * dispatch's ``loop``: the caller passes a loop whose class allows instance
 * attributes and whose call_soon nothing else shadows, on the loop's thread,
 * outside any task, and a future not yet done.  True when the awaiting
 * callback ran here, False when it went to the loop (no callback, or its
 * context was entered already). */
static PyObject *
Ring_resolve_eagerly(Ring *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "resolve_eagerly(loop, future, value)");
        return NULL;
    }
    if (self->real_call_soon != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring.resolve_eagerly() re-entered from set_result()");
        return NULL;
    }
    PyObject *loop = args[0];
    uint64_t eager_before = self->eager_wakeups;
    /* set_result_eagerly captures through the shadow: without it the wake-up would
       go to the real call_soon, one loop iteration later. */
    if (shadow_call_soon(self, loop) < 0)
        return NULL;
    PyObject *r = set_result_eagerly(self, loop, args[1], args[2]);
    if (unshadow_call_soon(self, loop) < 0) {
        Py_XDECREF(r);
        return NULL;
    }
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return PyBool_FromLong(self->eager_wakeups != eager_before);
}

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL,
     "put(data, start=0) -> int: write data[start:]; return the offset reached."},
    {"get", (PyCFunction)Ring_get, METH_O, "get(max_messages) -> list of complete messages, or None if the ring was empty."},
    {"dispatch", (PyCFunction)(void (*)(void))Ring_dispatch, METH_FASTCALL,
     "dispatch(max_messages, pending, functions, on_call, on_message, loop=None, serve=None)"
     " -> int | None:"
     " act on up to max_messages messages (see _ring.c)."},
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
    {"resolve_eagerly", (PyCFunction)(void (*)(void))Ring_resolve_eagerly, METH_FASTCALL,
     "resolve_eagerly(loop, future, value) -> bool: set_result, then run the awaiting task's wake-up"
     " at once (see _ring.c)."},
    {NULL}};

static PyObject *
Ring_get_dispatched_messages(Ring *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->dispatched_messages);
}

static PyObject *
Ring_get_dispatched_bytes(Ring *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->dispatched_bytes);
}

static PyObject *
Ring_get_eager_wakeups(Ring *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->eager_wakeups);
}

static PyObject *
Ring_get_served_calls(Ring *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->served_calls);
}

static PyGetSetDef Ring_getset[] = {
    {"served_calls", (getter)Ring_get_served_calls, NULL,
     "calls dispatch() ran itself through its serve path", NULL},
    {"eager_wakeups", (getter)Ring_get_eager_wakeups, NULL,
     "done callbacks of replies that dispatch() ran at once", NULL},
    {"dispatched_messages", (getter)Ring_get_dispatched_messages, NULL,
     "messages dispatch() has taken (counted before their callbacks run)", NULL},
    {"dispatched_bytes", (getter)Ring_get_dispatched_bytes, NULL,
     "payload bytes of the messages dispatch() has taken", NULL},
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

/* ready_mask(rings: tuple) -> int: bit i set when rings[i] has a record waiting
   (bit 62 stands for every ring from 62 on); 0 when none has. */
static PyObject *
fabric_ready_mask(PyObject *Py_UNUSED(module), PyObject *rings)
{
    if (!PyTuple_CheckExact(rings)) {
        PyErr_SetString(PyExc_TypeError, "ready_mask(rings: tuple of Ring)");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(rings);
    uint64_t mask = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(rings, i);
        if (!PyObject_TypeCheck(item, &RingType)) {
            PyErr_SetString(PyExc_TypeError, "ready_mask(rings: tuple of Ring)");
            return NULL;
        }
        Ring *r = (Ring *)item;
        if (r->base == NULL)
            continue;
        uint64_t bit = (uint64_t)1 << (i < 62 ? i : 62);
        if (mask & bit)
            continue;
        uint64_t head = atomic_load_explicit(head_ptr(r), memory_order_relaxed);
        if (head == r->cached_tail) {
            r->cached_tail = atomic_load_explicit(tail_ptr(r), memory_order_acquire);
            if (head == r->cached_tail)
                continue;
        }
        mask |= bit;
    }
    return PyLong_FromUnsignedLongLong(mask);
}

/* dispatch_handovers() -> int: see ``handovers`` above. */
static PyObject *
fabric_dispatch_handovers(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(handovers);
}

static PyMethodDef module_methods[] = {
    {"ready_mask", (PyCFunction)fabric_ready_mask, METH_O,
     "ready_mask(rings: tuple) -> int: bit i set when rings[i] has a record waiting (bit 62: "
     "any ring from 62 on); 0 when none has."},
    {"dispatch_handovers", (PyCFunction)fabric_dispatch_handovers, METH_NOARGS,
     "dispatch_handovers() -> int: how often Ring.dispatch() in this process handed work to "
     "Python callbacks or the loop; unchanged across a dispatch, all it did completed inside."},
    {"encode_call", (PyCFunction)(void (*)(void))fabric_encode_call, METH_FASTCALL,
     "encode_call(request_id, number, args) -> bytes | None: a compact call message, or None "
     "when args hold something the compact encoding does not cover."},
    {"encode_result", (PyCFunction)(void (*)(void))fabric_encode_result, METH_FASTCALL,
     "encode_result(request_id, value) -> bytes | None: a compact result message, or None."},
    {"any_ready", (PyCFunction)fabric_any_ready, METH_O,
     "any_ready(rings: tuple) -> bool: is a record waiting in any of the rings?"},
    {"decode_value", (PyCFunction)(void (*)(void))fabric_decode_value, METH_FASTCALL,
     "decode_value(buffer, offset=0) -> object: the compact value filling buffer[offset:]; "
     "ValueError if malformed."},
    {NULL}};

static struct PyModuleDef ringmodule = {
    PyModuleDef_HEAD_INIT, "_ring", "SPSC rings, atomic flags and the compact call encoding.", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&FlagType) < 0)
        return NULL;
    str_done = PyUnicode_InternFromString("done");
    str_set_result = PyUnicode_InternFromString("set_result");
    str_call_soon = PyUnicode_InternFromString("call_soon");
    str_context = PyUnicode_InternFromString("context");
    str_call_exception_handler = PyUnicode_InternFromString("call_exception_handler");
    str_message = PyUnicode_InternFromString("message");
    str_exception = PyUnicode_InternFromString("exception");
    if (str_done == NULL || str_set_result == NULL || str_call_soon == NULL || str_context == NULL ||
        str_call_exception_handler == NULL || str_message == NULL || str_exception == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&ringmodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    Py_INCREF(&FlagType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(m, "Flag", (PyObject *)&FlagType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "KIND_CALL", KIND_CALL) < 0 ||
        PyModule_AddIntConstant(m, "KIND_RESULT", KIND_RESULT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
