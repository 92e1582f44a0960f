/* A new flow's attributes read, encoded and joined in C (processing/pieces.py `received_given`,
 * `_encoded_py` and `joined_py`, the last Resolver.resolve_encoded's join): the same answers, one call
 * each per new flow.
 *
 * pieces.py and resolution.py are the statement and the Python reference; these are their loops over
 * bytes, tuples and dicts, nothing else. What decides (which end a flow has, its class, its Services) stays
 * in Python. tests/unit/test_enricher_named.py drives both on generated keys and pieces and requires the
 * same output.
 *
 * `encoded` makes one attribute's pieces (pieces.py `_encoded_py`): every new pod's name, uid and node,
 * once per role, and every attribute value a series key brings that no earlier key did.
 *
 * Pieces are pieces.py's 5-tuples (point field, log field, JSON member, key, value); anything else is a
 * TypeError (a caller's bug, not an input's).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ATTRIBUTES_TAG 0x3A /* NumberDataPoint.attributes: field 7, length-delimited */
#define SHORT 0x80
enum { P_POINT, P_LOG, P_JSON, P_KEY, P_VALUE, P_SIZE };

static int check_pieces(PyObject *p) {
    if (PyTuple_CheckExact(p) && PyTuple_GET_SIZE(p) == P_SIZE) return 0;
    PyErr_SetString(PyExc_TypeError, "pieces are 5-tuples (point, log, JSON, key, value)");
    return -1;
}

PyObject *encoded(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* pieces.py `_parsed` of a point field `3a L (0a len key) (12 len (0a len value))`, every length one
 * byte, while by_field holds fewer than `limit` (else parse(field): the Python one makes room): its
 * pieces, cached in by_field; None (a new reference) for a field not in that shape or not UTF-8. */
static PyObject *parsed(PyObject *field, PyObject *by_field, Py_ssize_t limit, PyObject *parse) {
    if (PyDict_GET_SIZE(by_field) >= limit) return PyObject_CallOneArg(parse, field);
    const unsigned char *f = (const unsigned char *)PyBytes_AS_STRING(field);
    Py_ssize_t size = PyBytes_GET_SIZE(field);
    Py_ssize_t key_len = size > 3 && f[2] == 0x0A ? f[3] : SHORT, value_at = 4 + key_len;
    if (!(0 < key_len && key_len < SHORT) || size < value_at + 4 || f[value_at] != 0x12) Py_RETURN_NONE;
    Py_ssize_t any_len = f[value_at + 1], string_len = f[value_at + 3];
    if (f[value_at + 2] != 0x0A || any_len != size - value_at - 2 || string_len != any_len - 2) Py_RETURN_NONE;
    PyObject *pair[2] = {PyUnicode_DecodeUTF8((const char *)f + 4, key_len, NULL), NULL};
    if (pair[0] != NULL) pair[1] = PyUnicode_DecodeUTF8((const char *)f + value_at + 4, string_len, NULL);
    if (pair[1] == NULL) {
        Py_XDECREF(pair[0]);
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *made = encoded(NULL, pair, 2); /* never None: decoded text has a UTF-8 form */
    Py_DECREF(pair[0]);
    Py_DECREF(pair[1]);
    if (made != NULL && PyDict_SetItem(by_field, field, made) < 0) Py_CLEAR(made);
    return made;
}

/* received_given(key, by_field, parse, limit) -> (pieces, given) or None: pieces.received(key) and the
 * dict {key: value} of its attributes in order. A field missing from by_field is parsed (see `parsed`)
 * and cached, looked up only after every field was, as pieces.received does; one not parsed: None. */
PyObject *received_given(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_CheckExact(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "received_given(bytes, dict, parse, int)");
        return NULL;
    }
    PyObject *key = args[0], *by_field = args[1], *parse = args[2];
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(key);
    Py_ssize_t pos = 0, end = PyBytes_GET_SIZE(key), n = 0;
    while (pos < end) { /* count and check the fields */
        if (k[pos] != ATTRIBUTES_TAG || pos + 1 == end || k[pos + 1] >= SHORT) Py_RETURN_NONE;
        pos += 2 + k[pos + 1];
        n++;
    }
    if (pos != end) Py_RETURN_NONE;
    PyObject *found = PyList_New(n), *fields = PyList_New(n), *given = NULL;
    if (found == NULL || fields == NULL) goto error;
    Py_ssize_t missing = 0;
    pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t after = pos + 2 + k[pos + 1];
        PyObject *field = PyBytes_FromStringAndSize((const char *)k + pos, after - pos);
        if (field == NULL) goto error;
        PyList_SET_ITEM(fields, i, field);
        PyObject *got = PyDict_GetItemWithError(by_field, field);
        if (got == NULL && PyErr_Occurred()) goto error;
        if (got == NULL) missing++;
        PyList_SET_ITEM(found, i, Py_NewRef(got == NULL ? Py_None : got));
        pos = after;
    }
    for (Py_ssize_t i = 0; missing && i < n; i++) {
        if (PyList_GET_ITEM(found, i) != Py_None) continue;
        PyObject *made = parsed(PyList_GET_ITEM(fields, i), by_field, limit, parse);
        if (made == NULL) goto error;
        if (made == Py_None) {
            Py_DECREF(made);
            Py_DECREF(found);
            Py_DECREF(fields);
            Py_RETURN_NONE;
        }
        PyList_SetItem(found, i, made); /* steals made, drops the None */
    }
    Py_CLEAR(fields);
    if ((given = PyDict_New()) == NULL) goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(found, i);
        if (check_pieces(p) < 0 || PyDict_SetItem(given, PyTuple_GET_ITEM(p, P_KEY), PyTuple_GET_ITEM(p, P_VALUE)) < 0)
            goto error;
    }
    return Py_BuildValue("(NN)", found, given);
error:
    Py_XDECREF(found);
    Py_XDECREF(fields);
    Py_XDECREF(given);
    return NULL;
}

/* Appends the pieces of `seq` (a tuple or list) whose key `given` lacks to `out`. */
static int add_missing(PyObject *out, PyObject *given, PyObject *seq) {
    PyObject *fast = PySequence_Fast(seq, "joined() takes sequences of pieces");
    if (fast == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (check_pieces(items[i]) < 0) goto error;
        int has = PyDict_Contains(given, PyTuple_GET_ITEM(items[i], P_KEY));
        if (has < 0 || (!has && PyList_Append(out, items[i]) < 0)) goto error;
    }
    Py_DECREF(fast);
    return 0;
error:
    Py_DECREF(fast);
    return -1;
}

/* joined(given, computed, services) -> (added, attrs, extra): resolve_encoded's join. `added`: the
 * pieces of each sequence in `computed` whose key `given` lacks, then every piece of `services` (the
 * caller filtered those); `attrs`: given, then the added keys and values; `extra`: their point fields. */
PyObject *joined(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyTuple_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "joined(dict, tuple of sequences, sequence)");
        return NULL;
    }
    PyObject *given = args[0], *computed = args[1], *services = args[2];
    PyObject *added = PyList_New(0), *attrs = NULL, *extra = NULL, *fast = NULL;
    if (added == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(computed); i++)
        if (add_missing(added, given, PyTuple_GET_ITEM(computed, i)) < 0) goto error;
    if ((fast = PySequence_Fast(services, "joined() takes sequences of pieces")) == NULL) goto error;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *p = PySequence_Fast_GET_ITEM(fast, i);
        if (check_pieces(p) < 0 || PyList_Append(added, p) < 0) goto error;
    }
    Py_CLEAR(fast);
    if ((attrs = PyDict_Copy(given)) == NULL) goto error;
    Py_ssize_t n = PyList_GET_SIZE(added), size = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(added, i), *point = PyTuple_GET_ITEM(p, P_POINT);
        if (!PyBytes_CheckExact(point)) {
            PyErr_SetString(PyExc_TypeError, "a piece's point field is bytes");
            goto error;
        }
        size += PyBytes_GET_SIZE(point);
        if (PyDict_SetItem(attrs, PyTuple_GET_ITEM(p, P_KEY), PyTuple_GET_ITEM(p, P_VALUE)) < 0) goto error;
    }
    if ((extra = PyBytes_FromStringAndSize(NULL, size)) == NULL) goto error;
    char *at = PyBytes_AS_STRING(extra);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *point = PyTuple_GET_ITEM(PyList_GET_ITEM(added, i), P_POINT);
        memcpy(at, PyBytes_AS_STRING(point), PyBytes_GET_SIZE(point));
        at += PyBytes_GET_SIZE(point);
    }
    return Py_BuildValue("(NNN)", added, attrs, extra);
error:
    Py_XDECREF(added);
    Py_XDECREF(attrs);
    Py_XDECREF(fast);
    return NULL;
}

Py_ssize_t varint_len(uint64_t n);   /* _native_flowlogs.c: a varint's size */
char *put_varint(char *p, uint64_t n); /* ... and the varint at p: the position after it */

/* put_varint at out[at], `at` moved past it */
#define PUT_VARINT(out, at, n) ((at) = (unsigned char *)put_varint((char *)(out) + (at), (n)) - (out))

/* The JSON string of `s` as orjson writes it, at `out` (NULL: only its size): `"` and `\` escaped, the
 * control characters as \b \t \n \f \r or \u00xx (lowercase), everything else (DEL, non-ASCII) as is. */
static Py_ssize_t put_json(unsigned char *out, const unsigned char *s, Py_ssize_t n) {
    static const char hex[] = "0123456789abcdef";
    Py_ssize_t i = 0;
#define PUT(c) (out ? (void)(out[i] = (unsigned char)(c)) : (void)0, i++)
    PUT('"');
    for (Py_ssize_t j = 0; j < n; j++) {
        unsigned char c = s[j];
        if (c == '"' || c == '\\') {
            PUT('\\');
            PUT(c);
        } else if (c >= 0x20) {
            PUT(c);
        } else {
            char e = c == '\b'   ? 'b'
                     : c == '\t' ? 't'
                     : c == '\n' ? 'n'
                     : c == '\f' ? 'f'
                     : c == '\r' ? 'r'
                                 : 0;
            PUT('\\');
            if (e) {
                PUT(e);
            } else {
                PUT('u');
                PUT('0');
                PUT('0');
                PUT(hex[c >> 4]);
                PUT(hex[c & 15]);
            }
        }
    }
    PUT('"');
#undef PUT
    return i;
}

/* encoded(key, value) -> pieces or None: pieces.py `_encoded_py`'s 5-tuple (the KeyValue as
 * NumberDataPoint.attributes and LogRecord.attributes fields, every length written, and the JSON member
 * `,"key":"value"`); None when either string has no UTF-8 form (a lone surrogate: the Python one raises). */
PyObject *encoded(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "encoded(str, str)");
        return NULL;
    }
    Py_ssize_t kn, vn;
    const char *k = PyUnicode_AsUTF8AndSize(args[0], &kn);
    const char *v = k == NULL ? NULL : PyUnicode_AsUTF8AndSize(args[1], &vn);
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    size_t any = 1 + varint_len(vn) + vn, kv = 1 + varint_len(kn) + kn + 1 + varint_len(any) + any;
    Py_ssize_t size = 1 + varint_len(kv) + kv;
    PyObject *point = PyBytes_FromStringAndSize(NULL, size), *log = NULL, *json = NULL;
    if (point == NULL) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(point);
    Py_ssize_t at = 0;
    p[at++] = ATTRIBUTES_TAG;
    PUT_VARINT(p, at, kv);
    p[at++] = 0x0A; /* KeyValue.key */
    PUT_VARINT(p, at, kn);
    memcpy(p + at, k, kn);
    at += kn;
    p[at++] = 0x12; /* KeyValue.value */
    PUT_VARINT(p, at, any);
    p[at++] = 0x0A; /* AnyValue.string_value */
    PUT_VARINT(p, at, vn);
    memcpy(p + at, v, vn);
    if ((log = PyBytes_FromStringAndSize(NULL, size)) == NULL) goto error;
    memcpy(PyBytes_AS_STRING(log), p, size);
    PyBytes_AS_STRING(log)[0] = 0x32; /* LogRecord.attributes: field 6 */
    Py_ssize_t jk = put_json(NULL, (const unsigned char *)k, kn);
    Py_ssize_t jv = put_json(NULL, (const unsigned char *)v, vn);
    if ((json = PyBytes_FromStringAndSize(NULL, 2 + jk + jv)) == NULL) goto error;
    unsigned char *j = (unsigned char *)PyBytes_AS_STRING(json);
    j[0] = ',';
    put_json(j + 1, (const unsigned char *)k, kn);
    j[1 + jk] = ':';
    put_json(j + 2 + jk, (const unsigned char *)v, vn);
    return Py_BuildValue("(NNNOO)", point, log, json, args[0], args[1]);
error:
    Py_XDECREF(point);
    Py_XDECREF(log);
    return NULL;
}

/* Appends item `field` of each piece of `encoded` taken in `order` at `out` (NULL: only the size). */
static Py_ssize_t put_ordered(char *out, PyObject *encoded, PyObject *order, int field) {
    Py_ssize_t size = 0, n = PyList_GET_SIZE(encoded);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(order); i++) {
        Py_ssize_t at = PyLong_AsSsize_t(PyTuple_GET_ITEM(order, i));
        if (at == -1 && PyErr_Occurred()) return -1;
        if (at < 0 || at >= n) {
            PyErr_SetString(PyExc_IndexError, "rendered(): an order past the pieces");
            return -1;
        }
        PyObject *p = PyList_GET_ITEM(encoded, at);
        if (check_pieces(p) < 0) return -1;
        PyObject *b = PyTuple_GET_ITEM(p, field);
        if (!PyBytes_CheckExact(b)) {
            PyErr_SetString(PyExc_TypeError, "a piece's fields are bytes");
            return -1;
        }
        if (out) memcpy(out + size, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
        size += PyBytes_GET_SIZE(b);
    }
    return size;
}

/* rendered(encoded, order, json_head, before, body, after) -> (json_prefix, otlp_static): flowlogs.py
 * `rendered_py`. json_prefix: json_head and the JSON members of `encoded` in `order` (b"" when json_head
 * is None); otlp_static: before, the LogRecord body field of the text `body`, after, and the log fields
 * in `order` (b"" when body is None). */
PyObject *rendered(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyTuple_CheckExact(args[1]) ||
        (args[2] != Py_None && !PyBytes_CheckExact(args[2])) || !PyBytes_CheckExact(args[3]) ||
        (args[4] != Py_None && !PyUnicode_Check(args[4])) || !PyBytes_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "rendered(list, tuple, bytes | None, bytes, str | None, bytes)");
        return NULL;
    }
    PyObject *encoded = args[0], *order = args[1], *head = args[2], *before = args[3], *after = args[5];
    PyObject *json = NULL, *otlp = NULL;
    if (head == Py_None) {
        json = PyBytes_FromStringAndSize(NULL, 0);
    } else {
        Py_ssize_t size = put_ordered(NULL, encoded, order, P_JSON);
        if (size < 0) return NULL;
        Py_ssize_t n = PyBytes_GET_SIZE(head);
        if ((json = PyBytes_FromStringAndSize(NULL, n + size)) == NULL) return NULL;
        memcpy(PyBytes_AS_STRING(json), PyBytes_AS_STRING(head), n);
        put_ordered(PyBytes_AS_STRING(json) + n, encoded, order, P_JSON);
    }
    if (json == NULL) return NULL;
    if (args[4] == Py_None) {
        otlp = PyBytes_FromStringAndSize(NULL, 0);
    } else {
        Py_ssize_t tn, size = put_ordered(NULL, encoded, order, P_LOG);
        const char *text = size < 0 ? NULL : PyUnicode_AsUTF8AndSize(args[4], &tn);
        if (text == NULL) goto error;
        size_t inner = 1 + varint_len(tn) + tn; /* AnyValue.string_value */
        Py_ssize_t nb = PyBytes_GET_SIZE(before), na = PyBytes_GET_SIZE(after);
        Py_ssize_t total = nb + 1 + varint_len(inner) + inner + na + size;
        if ((otlp = PyBytes_FromStringAndSize(NULL, total)) == NULL) goto error;
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(otlp);
        Py_ssize_t at = 0;
        memcpy(o, PyBytes_AS_STRING(before), nb);
        at += nb;
        o[at++] = 0x2A; /* LogRecord.body: field 5 (AnyValue) */
        PUT_VARINT(o, at, inner);
        o[at++] = 0x0A;
        PUT_VARINT(o, at, tn);
        memcpy(o + at, text, tn);
        at += tn;
        memcpy(o + at, PyBytes_AS_STRING(after), na);
        at += na;
        put_ordered((char *)o + at, encoded, order, P_LOG);
    }
    if (otlp == NULL) goto error;
    return Py_BuildValue("(NN)", json, otlp);
error:
    Py_XDECREF(json);
    return NULL;
}
