/* A request's flow logs written in C: its OTLP records (processing/flowlogs.py `FlowRecords.otlp_request`),
 * and below its JSON lines (`FlowRecords.json_lines`).
 *
 * flowlogs.py is the statement of the encoding and its Python reference; this writes the same bytes in
 * one buffer (no piece per number, no join): per record the ScopeLogs.log_records head, the template's
 * static part, the times and doubles as `_NUMBERS` packs them, the bytes and packets KeyValues as
 * `AttributeEncoder.int_value` writes them. Any value outside what it handles (a count that is not a
 * finite number in [0, 2^64), a time that is not an int of 64 bits, an attribute missing) gives None: the
 * caller runs the Python code, which writes it or raises as it always did.
 * tests/unit/test_enricher_native.py compares the two on the same deliveries.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject *statics; /* borrowed from the template */
    Py_ssize_t size;   /* the record's length after its head */
    uint64_t end, byte_count, packet_count;
    double cost, start_s;
} Record;

Py_ssize_t varint_len(uint64_t n) { /* also _native_named.c's */
    Py_ssize_t len = 1;
    while (n >= 0x80) {
        n >>= 7;
        len++;
    }
    return len;
}

char *put_varint(char *p, uint64_t n) { /* also _native_named.c's */
    while (n >= 0x80) {
        *p++ = (char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    *p++ = (char)n;
    return p;
}

static char *put_bytes(char *p, PyObject *b) {
    Py_ssize_t n = PyBytes_GET_SIZE(b);
    memcpy(p, PyBytes_AS_STRING(b), n);
    return p + n;
}

static char *put_u64(char *p, uint64_t v) { /* little-endian fixed64 */
    for (int i = 0; i < 8; i++) p[i] = (char)(v >> (8 * i));
    return p + 8;
}

static char *put_double(char *p, double d) {
    uint64_t v;
    memcpy(&v, &d, 8);
    return put_u64(p, v);
}

/* A count as `int(value)` then `varint` take it, when in [0, 2^64); 0 otherwise. */
static int count_of(PyObject *o, uint64_t *out) {
    if (PyFloat_CheckExact(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        if (!(d >= 0.0 && d < 18446744073709551616.0)) return 0;
        *out = (uint64_t)d;
        return 1;
    }
    if (PyLong_CheckExact(o)) {
        *out = PyLong_AsUnsignedLongLong(o);
        if (*out == (uint64_t)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

/* An int of 64 bits (unsigned), 0 otherwise. */
static int u64_of(PyObject *o, uint64_t *out) {
    if (!PyLong_CheckExact(o)) return 0;
    *out = PyLong_AsUnsignedLongLong(o);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* A float as struct's "d" takes it (`start / 1e9` for the start), 0 with no error set otherwise. */
static int double_of(PyObject *o, double *out) {
    if (PyFloat_CheckExact(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 1;
    }
    if (PyLong_CheckExact(o)) {
        *out = PyLong_AsDouble(o);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

static PyObject *get_head(PyObject *heads, Py_ssize_t len) {
    if (len >= PyTuple_GET_SIZE(heads)) return NULL;
    PyObject *h = PyTuple_GET_ITEM(heads, len);
    return PyBytes_CheckExact(h) ? h : NULL;
}

enum {
    A_RESOURCE, A_SCOPE, A_BYTES_HEADS, A_PACKETS_HEADS, A_COST_HEAD, A_START_HEAD,
    A_TEMPLATES, A_STARTS, A_ENDS, A_BYTE_COUNTS, A_PACKET_COUNTS, A_COSTS, N_ARGS
};
#define LOG_RECORDS_TAG 0x12
#define SCOPE_LOGS_TAG 0x12
#define RESOURCE_LOGS_TAG 0x0A
#define TIME_TAG 0x09
#define OBSERVED_TAG 0x59

/* otlp_logs(resource_field, scope_field, bytes_heads, packets_heads, cost_head, start_head, templates,
 *           starts, ends, byte_counts, packet_counts, costs) -> the request's bytes, or None. */
PyObject *otlp_logs(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != N_ARGS) {
        PyErr_SetString(PyExc_TypeError, "otlp_logs() takes 12 arguments");
        return NULL;
    }
    for (int i = A_RESOURCE; i <= A_START_HEAD; i++)
        if (!(i == A_BYTES_HEADS || i == A_PACKETS_HEADS ? PyTuple_CheckExact(args[i]) : PyBytes_CheckExact(args[i])))
            Py_RETURN_NONE;
    Py_ssize_t n = -1;
    for (int i = A_TEMPLATES; i < N_ARGS; i++) {
        if (!PyList_CheckExact(args[i])) Py_RETURN_NONE;
        if (n < 0) n = PyList_GET_SIZE(args[i]);
        if (PyList_GET_SIZE(args[i]) != n) Py_RETURN_NONE;
    }
    static PyObject *static_name = NULL, *fixed_name = NULL;
    if (static_name == NULL && (static_name = PyUnicode_InternFromString("otlp_static")) == NULL) return NULL;
    if (fixed_name == NULL && (fixed_name = PyUnicode_InternFromString("otlp_fixed")) == NULL) return NULL;
    PyObject *cost_head = args[A_COST_HEAD], *start_head = args[A_START_HEAD];
    PyObject *bytes_heads = args[A_BYTES_HEADS], *packets_heads = args[A_PACKETS_HEADS];
    Record *records = PyMem_Malloc(sizeof(Record) * (n ? n : 1));
    if (records == NULL) return PyErr_NoMemory();
    PyObject *out = NULL, *held = PyList_New(0); /* the templates' static parts, kept alive */
    if (held == NULL) goto done;
    Py_ssize_t total = PyBytes_GET_SIZE(args[A_RESOURCE]) + PyBytes_GET_SIZE(args[A_SCOPE]);
    for (Py_ssize_t i = 0; i < n; i++) {
        Record *r = &records[i];
        PyObject *template = PyList_GET_ITEM(args[A_TEMPLATES], i);
        PyObject *start = PyList_GET_ITEM(args[A_STARTS], i);
        if (!count_of(PyList_GET_ITEM(args[A_BYTE_COUNTS], i), &r->byte_count) ||
            !count_of(PyList_GET_ITEM(args[A_PACKET_COUNTS], i), &r->packet_count) ||
            !u64_of(PyList_GET_ITEM(args[A_ENDS], i), &r->end) ||
            !double_of(PyList_GET_ITEM(args[A_COSTS], i), &r->cost) || !double_of(start, &r->start_s))
            goto fallback;
        r->start_s = r->start_s / 1e9;
        PyObject *statics = PyObject_GetAttr(template, static_name);
        if (statics == NULL || !PyBytes_CheckExact(statics) || PyList_Append(held, statics) < 0) {
            Py_XDECREF(statics);
            goto fallback;
        }
        Py_DECREF(statics);
        r->statics = statics; /* held alive by `held` */
        PyObject *fixed_o = PyObject_GetAttr(template, fixed_name);
        if (fixed_o == NULL) goto fallback;
        Py_ssize_t fixed = PyLong_CheckExact(fixed_o) ? PyLong_AsSsize_t(fixed_o) : -1;
        Py_DECREF(fixed_o);
        if (fixed < 0) goto fallback;
        Py_ssize_t blen = varint_len(r->byte_count), plen = varint_len(r->packet_count);
        PyObject *bh = get_head(bytes_heads, blen), *ph = get_head(packets_heads, plen);
        if (bh == NULL || ph == NULL) goto fallback;
        r->size = fixed + PyBytes_GET_SIZE(bh) + blen + PyBytes_GET_SIZE(ph) + plen;
        total += 1 + varint_len((uint64_t)r->size) + PyBytes_GET_SIZE(statics) + 18 +
                 PyBytes_GET_SIZE(cost_head) + 8 + PyBytes_GET_SIZE(start_head) + 8 + PyBytes_GET_SIZE(bh) +
                 blen + PyBytes_GET_SIZE(ph) + plen;
    }
    /* the envelope, as otlp_request computes it: scope_logs = everything but the two heads */
    Py_ssize_t scope_len = total - PyBytes_GET_SIZE(args[A_RESOURCE]);
    Py_ssize_t scope_head = 1 + varint_len((uint64_t)scope_len);
    Py_ssize_t whole = total + scope_head;
    out = PyBytes_FromStringAndSize(NULL, 1 + varint_len((uint64_t)whole) + whole);
    if (out == NULL) goto done;
    char *p = PyBytes_AS_STRING(out);
    *p++ = RESOURCE_LOGS_TAG;
    p = put_varint(p, (uint64_t)whole);
    p = put_bytes(p, args[A_RESOURCE]);
    *p++ = SCOPE_LOGS_TAG;
    p = put_varint(p, (uint64_t)scope_len);
    p = put_bytes(p, args[A_SCOPE]);
    for (Py_ssize_t i = 0; i < n; i++) {
        Record *r = &records[i];
        *p++ = LOG_RECORDS_TAG;
        p = put_varint(p, (uint64_t)r->size);
        p = put_bytes(p, r->statics);
        *p++ = TIME_TAG;
        p = put_u64(p, r->end);
        *p++ = OBSERVED_TAG;
        p = put_u64(p, r->end);
        p = put_bytes(p, cost_head);
        p = put_double(p, r->cost);
        p = put_bytes(p, start_head);
        p = put_double(p, r->start_s);
        p = put_bytes(p, PyTuple_GET_ITEM(bytes_heads, varint_len(r->byte_count)));
        p = put_varint(p, r->byte_count);
        p = put_bytes(p, PyTuple_GET_ITEM(packets_heads, varint_len(r->packet_count)));
        p = put_varint(p, r->packet_count);
    }
    if (p != PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(out)) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_SystemError, "otlp_logs: size computed wrong");
    }
    goto done;
fallback:
    PyErr_Clear();
    out = Py_NewRef(Py_None);
done:
    Py_XDECREF(held);
    PyMem_Free(records);
    return out;
}

/* ---- JSON lines (flowlogs.py `FlowRecords.json_lines`) ----------------------------------------------
 * Per record: the template's `json_prefix`, then the glue around the numbers as `_JSON_NUMBERS` puts
 * them: start, end (floats), bytes, packets (`%d` of `int(value)`), cost (float). The floats are orjson's
 * tokens, written by one orjson call in Python ("[s0,...,e0,...,c0,...]": starts, ends, costs) and copied
 * here as they are: the same bytes as the Python code. With `shared` (the agents' case: every record of a
 * request spans the same interval) the floats are "[start,end,c0,...]", the start and end tokens written
 * in every line. None for anything else (a count not a finite float or an int of 64 bits, a prefix not
 * bytes, the floats not 3n tokens, n + 2 when shared): the Python code writes it. */

static char *put_i64(char *p, long long v) {
    char digits[24];
    int k = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        digits[k++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *p++ = '-';
    while (k) *p++ = digits[--k];
    return p;
}

/* `int(value)` of a float or int, as a long long; 0 when it is neither or out of range. */
static int int_of(PyObject *o, long long *out) {
    if (PyFloat_CheckExact(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        if (!(d > -9.2e18 && d < 9.2e18)) return 0; /* NaN and infinities too */
        *out = (long long)d;                         /* truncation, as int() */
        return 1;
    }
    if (PyLong_CheckExact(o)) {
        int overflow = 0;
        *out = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow || (*out == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

enum { J_GLUE, J_TEMPLATES, J_FLOATS, J_BYTE_COUNTS, J_PACKET_COUNTS, J_ARGS };
#define GLUES 6

/* json_lines(glue, templates, floats, byte_counts, packet_counts[, shared]) -> the lines' bytes, or None.
 * glue: the 6 bytes around the 5 numbers of a line's tail. */
PyObject *json_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != J_ARGS && nargs != J_ARGS + 1) {
        PyErr_SetString(PyExc_TypeError, "json_lines() takes 5 or 6 arguments");
        return NULL;
    }
    int shared = nargs > J_ARGS ? PyObject_IsTrue(args[J_ARGS]) : 0;
    if (shared < 0) return NULL;
    PyObject *glue = args[J_GLUE], *templates = args[J_TEMPLATES], *floats = args[J_FLOATS];
    PyObject *byte_counts = args[J_BYTE_COUNTS], *packet_counts = args[J_PACKET_COUNTS];
    if (!PyTuple_CheckExact(glue) || PyTuple_GET_SIZE(glue) != GLUES || !PyBytes_CheckExact(floats) ||
        !PyList_CheckExact(templates) || !PyList_CheckExact(byte_counts) || !PyList_CheckExact(packet_counts))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(templates), glue_len = 0;
    if (PyList_GET_SIZE(byte_counts) != n || PyList_GET_SIZE(packet_counts) != n) Py_RETURN_NONE;
    for (int g = 0; g < GLUES; g++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(glue, g))) Py_RETURN_NONE;
        glue_len += PyBytes_GET_SIZE(PyTuple_GET_ITEM(glue, g));
    }
    const char *f = PyBytes_AS_STRING(floats), *f_end = f + PyBytes_GET_SIZE(floats);
    if (n == 0 || f_end - f < 2 || f[0] != '[' || f_end[-1] != ']') Py_RETURN_NONE;
    /* the three cursors: the first start, end and cost token (shared: the one start and end token) */
    const char *cur[3] = {f + 1, NULL, NULL};
    Py_ssize_t seen = 0, per = shared ? 1 : n;
    for (const char *q = f + 1; q < f_end; q++) {
        if (*q != ',' && *q != ']') continue;
        seen++;
        if (seen == per) cur[1] = q + 1;
        if (seen == 2 * per) cur[2] = q + 1;
    }
    if (seen != 2 * per + n) Py_RETURN_NONE;
    static PyObject *prefix_name = NULL;
    if (prefix_name == NULL && (prefix_name = PyUnicode_InternFromString("json_prefix")) == NULL) return NULL;
    PyObject *prefixes = PyList_New(n); /* held while writing */
    if (prefixes == NULL) return NULL;
    PyObject *out = NULL;
    /* bound: prefixes, glue, the float tokens (less the brackets and commas), two counts of <= 20 chars */
    Py_ssize_t bound = (f_end - f) + n * (glue_len + 40);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *prefix = PyObject_GetAttr(PyList_GET_ITEM(templates, i), prefix_name);
        if (prefix == NULL) {
            PyErr_Clear();
            goto fallback;
        }
        PyList_SET_ITEM(prefixes, i, prefix);
        if (!PyBytes_CheckExact(prefix)) goto fallback;
        bound += PyBytes_GET_SIZE(prefix);
    }
    out = PyBytes_FromStringAndSize(NULL, bound);
    if (out == NULL) goto done;
    char *p = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        long long counts[2];
        if (!int_of(PyList_GET_ITEM(byte_counts, i), &counts[0]) ||
            !int_of(PyList_GET_ITEM(packet_counts, i), &counts[1]))
            goto fallback;
        p = put_bytes(p, PyList_GET_ITEM(prefixes, i));
        for (int g = 0; g < 5; g++) {
            p = put_bytes(p, PyTuple_GET_ITEM(glue, g));
            if (g == 2 || g == 3) {
                p = put_i64(p, counts[g - 2]);
                continue;
            }
            int c = g < 2 ? g : 2;
            const char *end = memchr(cur[c], ',', f_end - cur[c]);
            if (end == NULL) end = f_end - 1; /* the last token, before ']' */
            memcpy(p, cur[c], end - cur[c]);
            p += end - cur[c];
            if (c == 2 || !shared) cur[c] = end + 1;
        }
        p = put_bytes(p, PyTuple_GET_ITEM(glue, 5));
    }
    if (_PyBytes_Resize(&out, p - PyBytes_AS_STRING(out)) < 0) out = NULL;
    goto done;
fallback:
    Py_CLEAR(out);
    out = Py_NewRef(Py_None);
done:
    Py_DECREF(prefixes);
    return out;
}
