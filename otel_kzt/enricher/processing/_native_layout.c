/* A Sum read from its group's layout in C (processing/repeats.py `Layout.read`): the same answer.
 *
 * repeats.py is the statement and the Python reference. A layout fixes everything in a Sum but its
 * points' 27-byte canonical prefixes (start, time, integer value): each point's received header, its
 * series key and the fields after the points. This checks those bytes in place, the prefixes' tags, every
 * time inside [lo, hi] (the series' windows, clamped to what a fixed64 holds) and no negative value,
 * then returns what `Layout.read` does: each point's bytes and the prefixes' fields flat, or None.
 * tests/unit/test_enricher_native.py runs both on the same deliveries.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PREFIX 27
#define START_TAG 0x11
#define TIME_TAG 0x19
#define INT_TAG 0x31

static uint64_t u64_at(const unsigned char *p) { /* little-endian fixed64 */
    uint64_t v = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&v, p, 8);
#else
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
#endif
    return v;
}

/* The int of a point's start or time: the previous point's object when it is the same value (a Sum's
 * points mostly share them), else a new one; a new reference. */
static PyObject *time_int(uint64_t v, uint64_t *last_v, PyObject **last) {
    if (*last == NULL || v != *last_v) {
        PyObject *made = PyLong_FromUnsignedLongLong(v);
        if (made == NULL) return NULL;
        Py_XSETREF(*last, made);
        *last_v = v;
    }
    return Py_NewRef(*last);
}

/* read_layout(buf, body, end, received, keys, trailer, lo, hi) -> (raws, flat) or None */
PyObject *read_layout(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8 || !PyBytes_CheckExact(args[0]) || !PyTuple_CheckExact(args[3]) ||
        !PyTuple_CheckExact(args[4]) || !PyBytes_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "read_layout(bytes, int, int, tuple, tuple, bytes, int, int)");
        return NULL;
    }
    PyObject *buf = args[0], *received = args[3], *keys = args[4], *trailer = args[5];
    Py_ssize_t body = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    if ((body == -1 || end == -1) && PyErr_Occurred()) return NULL;
    if (body < 0 || end > PyBytes_GET_SIZE(buf) || body > end) {
        PyErr_SetString(PyExc_ValueError, "read_layout: the Sum lies outside the buffer");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (PyTuple_GET_SIZE(received) != n) {
        PyErr_SetString(PyExc_ValueError, "read_layout: received headers and keys differ in number");
        return NULL;
    }
    /* lo: the earliest time allowed (beyond 2^64: none is); hi: the latest (negative: none is) */
    uint64_t lo = PyLong_AsUnsignedLongLong(args[6]);
    if (lo == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    uint64_t hi = PyLong_AsUnsignedLongLong(args[7]);
    if (hi == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE; /* hi < 0 (the caller clamps it below 2^64) */
    }
    const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(buf);
    const unsigned char *p = base + body, *stop = base + end;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *head = PyTuple_GET_ITEM(received, i), *key = PyTuple_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(head) || !PyBytes_CheckExact(key)) Py_RETURN_NONE;
        Py_ssize_t w = PyBytes_GET_SIZE(head), k = PyBytes_GET_SIZE(key);
        if (stop - p < w + PREFIX + k || memcmp(p, PyBytes_AS_STRING(head), w) != 0) Py_RETURN_NONE;
        p += w;
        if (p[0] != START_TAG || p[9] != TIME_TAG || p[18] != INT_TAG ||
            memcmp(p + PREFIX, PyBytes_AS_STRING(key), k) != 0)
            Py_RETURN_NONE;
        uint64_t t = u64_at(p + 10);
        if (t < lo || t > hi || (int64_t)u64_at(p + 19) < 0) Py_RETURN_NONE;
        p += PREFIX + k;
    }
    Py_ssize_t tl = PyBytes_GET_SIZE(trailer);
    if (stop - p != tl || memcmp(p, PyBytes_AS_STRING(trailer), tl) != 0) Py_RETURN_NONE;
    PyObject *raws = PyTuple_New(n), *flat = PyList_New(6 * n), *last_start = NULL, *last_time = NULL;
    uint64_t last_start_v = 0, last_time_v = 0;
    if (raws == NULL || flat == NULL) goto error;
    p = base + body;
    for (Py_ssize_t i = 0; i < n; i++) {
        p += PyBytes_GET_SIZE(PyTuple_GET_ITEM(received, i));
        Py_ssize_t size = PREFIX + PyBytes_GET_SIZE(PyTuple_GET_ITEM(keys, i));
        PyObject *raw = PyBytes_FromStringAndSize((const char *)p, size);
        if (raw == NULL) goto error;
        PyTuple_SET_ITEM(raws, i, raw);
        PyObject *fields[6] = {
            PyLong_FromLong(START_TAG), time_int(u64_at(p + 1), &last_start_v, &last_start),
            PyLong_FromLong(TIME_TAG),  time_int(u64_at(p + 10), &last_time_v, &last_time),
            PyLong_FromLong(INT_TAG),   PyLong_FromLongLong((int64_t)u64_at(p + 19)),
        };
        for (int f = 0; f < 6; f++) {
            if (fields[f] == NULL) {
                for (int g = f; g < 6; g++) Py_XDECREF(fields[g]);
                goto error;
            }
            PyList_SET_ITEM(flat, 6 * i + f, fields[f]);
        }
        p += size;
    }
    Py_XDECREF(last_start);
    Py_XDECREF(last_time);
    return Py_BuildValue("(NN)", raws, flat);
error:
    Py_XDECREF(raws);
    Py_XDECREF(flat);
    Py_XDECREF(last_start);
    Py_XDECREF(last_time);
    return NULL;
}
