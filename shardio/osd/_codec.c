/* The OSD frame codec's hot loops in C (protocol.py holds the format and the rules).
 *
 * parse(buffer, pos, max_name, max_payload) -> (frames, pos)
 *     Decode the consecutive frames at buffer[pos:] that are complete and valid
 *     (every check protocol._parse_one makes); stop at the first frame that is
 *     incomplete or breaks a rule and return its position: protocol.py decodes
 *     that one itself, raising the FrameError it deserves with its message.
 * reply_parts(op, tid, status, payload, length, flags) -> [header, payload]
 *     A reply frame's header (FLAG_REPLY set, no name) followed by its payload
 *     ([header] alone when the payload is empty), as encode_reply_parts builds it.
 * setup(frame_type, known_ops, magic, version, max_payload, too_large)
 *     Called once by protocol.py: the Frame class, the format's constants and the
 *     exception for a payload over the limit (FrameTooLarge).
 *
 * Checksums are zlib's crc32, the same function protocol.py calls. The extension
 * links the runtime library (libz.so.1, which every CPython with a zlib module
 * has) and declares the one function it uses itself, so that building needs no
 * zlib headers: crc32's signature is part of zlib's stable ABI since 1.0.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* zlib.h: uLong crc32(uLong crc, const Bytef *buf, uInt len); */
extern unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len);

#define HEADER_SIZE 56
#define HEADER_CRC_COVERS 52
#define FLAG_REPLY 0x0001u
#define KNOWN_FLAGS 0x0003u

static PyTypeObject *frame_type = NULL;
static unsigned char known_ops[256];
static uint32_t magic_value;
static unsigned version_value;
static unsigned long long max_payload_value;
static PyObject *too_large = NULL;  /* protocol.FrameTooLarge */

static inline uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t get64(const unsigned char *p) {
    return (uint64_t)get32(p) | ((uint64_t)get32(p + 4) << 32);
}
static inline void put16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}
static inline void put64(unsigned char *p, uint64_t v) { put32(p, (uint32_t)v); put32(p + 4, (uint32_t)(v >> 32)); }

static uint32_t crc(uint32_t start, const unsigned char *p, Py_ssize_t n) {
    unsigned long value = start;
    while (n > 0) {  /* zlib takes uInt lengths */
        unsigned int chunk = n > (Py_ssize_t)0x40000000 ? 0x40000000u : (unsigned int)n;
        value = crc32(value, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)value;
}

static PyObject *codec_setup(PyObject *self, PyObject *args) {
    PyObject *type, *ops, *error;
    unsigned long magic, version;
    unsigned long long max_payload;
    if (!PyArg_ParseTuple(args, "O!OkkKO", &PyType_Type, &type, &ops, &magic, &version,
                          &max_payload, &error))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "setup: the frame type must be a tuple subclass");
        return NULL;
    }
    memset(known_ops, 0, sizeof known_ops);
    PyObject *it = PyObject_GetIter(ops);
    if (it == NULL) return NULL;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        long op = PyLong_AsLong(item);
        Py_DECREF(item);
        if (op == -1 && PyErr_Occurred()) { Py_DECREF(it); return NULL; }
        if (op >= 0 && op < 256) known_ops[op] = 1;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    Py_INCREF(type);
    Py_XSETREF(frame_type, (PyTypeObject *)type);
    Py_INCREF(error);
    Py_XSETREF(too_large, error);
    magic_value = (uint32_t)magic;
    version_value = (unsigned)version;
    max_payload_value = max_payload;
    Py_RETURN_NONE;
}

static PyObject *new_frame(unsigned op, unsigned flags, uint64_t tid, int32_t status, uint32_t pool,
                           uint64_t offset, uint64_t length, const unsigned char *name, Py_ssize_t nlen,
                           const unsigned char *payload, Py_ssize_t plen) {
    PyObject *frame = frame_type->tp_alloc(frame_type, 9);
    if (frame == NULL) return NULL;
    PyObject *v[9];
    v[0] = PyLong_FromUnsignedLong(op);
    v[1] = PyLong_FromUnsignedLong(flags);
    v[2] = PyLong_FromUnsignedLongLong(tid);
    v[3] = PyLong_FromLong(status);
    v[4] = PyLong_FromUnsignedLong(pool);
    v[5] = PyLong_FromUnsignedLongLong(offset);
    v[6] = PyLong_FromUnsignedLongLong(length);
    v[7] = PyBytes_FromStringAndSize((const char *)name, nlen);
    v[8] = PyBytes_FromStringAndSize((const char *)payload, plen);
    int failed = 0;
    for (int i = 0; i < 9; i++) {
        if (v[i] == NULL) failed = 1;
        PyTuple_SET_ITEM(frame, i, v[i]);  /* NULL slots are fine for the dealloc */
    }
    if (failed) { Py_DECREF(frame); return NULL; }
    return frame;
}

static PyObject *codec_parse(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    unsigned long long max_name, max_payload;
    if (frame_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "shardio.osd._codec: setup() was not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*nKK", &view, &pos, &max_name, &max_payload)) return NULL;
    PyObject *frames = PyList_New(0);
    if (frames == NULL) { PyBuffer_Release(&view); return NULL; }
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t end = view.len;
    if (pos < 0) pos = end;  /* nothing to do */
    while (end - pos >= HEADER_SIZE) {
        const unsigned char *h = buf + pos;
        uint32_t magic = get32(h);
        unsigned version = h[4], op = h[5], flags = get16(h + 6);
        uint64_t tid = get64(h + 8);
        int32_t status = (int32_t)get32(h + 16);
        uint32_t pool = get32(h + 20);
        unsigned nlen = get16(h + 24), reserved = get16(h + 26);
        uint64_t offset = get64(h + 28), length = get64(h + 36);
        uint32_t plen = get32(h + 44), body_crc = get32(h + 48), header_crc = get32(h + 52);
        if (magic != magic_value || version != version_value) break;
        if (nlen > max_name || plen > max_payload) break;
        if (reserved || (flags & ~KNOWN_FLAGS) || (!known_ops[op] && !(flags & FLAG_REPLY))) break;
        Py_ssize_t body = pos + HEADER_SIZE;
        Py_ssize_t stop = body + (Py_ssize_t)nlen + (Py_ssize_t)plen;
        if (stop > end) break;
        if (crc(0, h, HEADER_CRC_COVERS) != header_crc) break;
        if (crc(0, buf + body, stop - body) != body_crc) break;
        PyObject *frame = new_frame(op, flags, tid, status, pool, offset, length, buf + body, nlen,
                                    buf + body + nlen, plen);
        if (frame == NULL || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            Py_DECREF(frames);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(frame);
        pos = stop;
    }
    PyBuffer_Release(&view);
    PyObject *result = Py_BuildValue("(Nn)", frames, pos);
    return result;
}

static int field(PyObject *value, unsigned long long limit, unsigned long long *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;  /* not an int */
        PyErr_Clear();
        goto out_of_range;  /* negative, or wider than 64 bits */
    }
    if (v > limit) goto out_of_range;
    *out = v;
    return 0;
out_of_range:
    PyErr_SetString(PyExc_ValueError, "frame field out of range");
    return -1;
}

static PyObject *codec_reply_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 6) {
        PyErr_SetString(PyExc_TypeError,
                        "reply_parts(op, tid, status, payload=b'', length=0, flags=0)");
        return NULL;
    }
    unsigned long long op, tid, length = 0, flags = 0;
    if (field(args[0], 0xFF, &op) < 0 || field(args[1], UINT64_MAX, &tid) < 0) return NULL;
    if (nargs > 4 && field(args[4], UINT64_MAX, &length) < 0) return NULL;
    if (nargs > 5 && field(args[5], 0xFFFF, &flags) < 0) return NULL;
    int overflow = 0;
    long long status = PyLong_AsLongLongAndOverflow(args[2], &overflow);
    if (status == -1 && PyErr_Occurred()) return NULL;
    if (overflow || status < INT32_MIN || status > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "frame field out of range");
        return NULL;
    }
    PyObject *payload = nargs > 3 ? args[3] : NULL;
    Py_buffer view = {0};
    const unsigned char *data = (const unsigned char *)"";
    Py_ssize_t plen = 0;
    if (payload != NULL) {
        if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) return NULL;
        data = (const unsigned char *)view.buf;
        plen = view.len;
    }
    if ((unsigned long long)plen > max_payload_value) {
        if (payload != NULL) PyBuffer_Release(&view);
        PyObject *message = PyUnicode_FromFormat(
            "payload of %zd bytes exceeds the %llu-byte limit", plen, max_payload_value);
        PyObject *kwargs = Py_BuildValue("{s:O}", "tid", args[1]);
        if (message != NULL && kwargs != NULL) {
            PyObject *exc = PyObject_VectorcallDict(too_large, &message, 1, kwargs);
            if (exc != NULL) {
                PyErr_SetObject(too_large, exc);
                Py_DECREF(exc);
            }
        }
        Py_XDECREF(message);
        Py_XDECREF(kwargs);
        return NULL;
    }
    PyObject *head = PyBytes_FromStringAndSize(NULL, HEADER_SIZE);
    if (head == NULL) {
        if (payload != NULL) PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *h = (unsigned char *)PyBytes_AS_STRING(head);
    memset(h, 0, HEADER_SIZE);
    put32(h, magic_value);
    h[4] = (unsigned char)version_value;
    h[5] = (unsigned char)op;
    put16(h + 6, (uint16_t)(flags | FLAG_REPLY));
    put64(h + 8, tid);
    put32(h + 16, (uint32_t)(int32_t)status);
    put64(h + 36, length);
    put32(h + 44, (uint32_t)plen);
    put32(h + 48, crc(0, data, plen));
    if (payload != NULL) PyBuffer_Release(&view);
    put32(h + 52, crc(0, h, HEADER_CRC_COVERS));
    PyObject *parts = PyList_New(plen ? 2 : 1);
    if (parts == NULL) {
        Py_DECREF(head);
        return NULL;
    }
    PyList_SET_ITEM(parts, 0, head);
    if (plen) {
        Py_INCREF(payload);
        PyList_SET_ITEM(parts, 1, payload);
    }
    return parts;
}

static PyMethodDef codec_methods[] = {
    {"setup", codec_setup, METH_VARARGS, "setup(frame_type, known_ops, magic, version, max_payload, too_large)"},
    {"parse", codec_parse, METH_VARARGS,
     "parse(buffer, pos, max_name, max_payload) -> (frames, pos): the complete, valid frames"},
    {"reply_parts", (PyCFunction)(void (*)(void))codec_reply_parts, METH_FASTCALL,
     "reply_parts(op, tid, status, payload=b'', length=0, flags=0) -> [header, payload]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT, "_codec", "The OSD frame codec's hot loops (see protocol.py).", -1,
    codec_methods,
};

PyMODINIT_FUNC PyInit__codec(void) { return PyModule_Create(&codec_module); }
