/* The layout pass's per-point loop in C (processing/points.py `_repeat`): its fast path, not a second rule.
 *
 * The counting rule's one home is state/counting.py (`Rule.count`, the statement and the Python
 * reference). This loop takes only the rule's common branch itself: the point belongs to the series'
 * newest run and its start, time, value and the run's last value and time are all integers that fit 64
 * bits; then a grown value adds `value - last` and an idle report (same value, later time) adds nothing,
 * exactly as `Rule.count` writes them. Every other point (another run, a duplicate, a stale value, a
 * float, a huge integer, a slot not set) is handed to `Rule.count` itself. What follows the answer is
 * `_repeat`'s: the increment into `acc[0]`, a billed tuple for flow logs, the declined held back.
 * tests/unit/test_enricher_native.py drives the real core with and without this module on the same
 * deliveries and requires identical output.
 *
 * Series are slots dataclasses: the loop reads and writes their slots at the offsets Python's own member
 * descriptors give (`bind`), and only for objects of exactly the bound type (anything else: None, and
 * the caller runs the Python loop).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

enum { S_START, S_LAST, S_LAST_TIME, S_SINCE, S_SEEN, S_ACC, S_TEMPLATE, N_SLOTS };
static const char *slot_names[N_SLOTS] = {"start", "last", "last_time", "since", "seen", "acc", "template"};
static Py_ssize_t offsets[N_SLOTS];
static PyTypeObject *bound_type = NULL;

#define SLOT(obj, i) (*(PyObject **)((char *)(obj) + offsets[i]))

static void set_slot(PyObject *obj, int i, PyObject *value) {
    Py_INCREF(value);
    Py_XSETREF(SLOT(obj, i), value);
}

/* bind(Series): remember where the slots the loop uses lie in its instances. */
static PyObject *bind(PyObject *self, PyObject *type) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "bind() takes the Series class");
        return NULL;
    }
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *d = PyObject_GetAttrString(type, slot_names[i]);
        if (d == NULL) return NULL;
        if (Py_TYPE(d) != &PyMemberDescr_Type ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(d);
            PyErr_Format(PyExc_TypeError, "%s is not an object slot", slot_names[i]);
            return NULL;
        }
        offsets[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
    }
    Py_INCREF(type);
    Py_XSETREF(bound_type, (PyTypeObject *)type);
    Py_RETURN_NONE;
}

/* An exact int that fits 64 bits, into *out; 0 for anything else (no error left set). */
static int as_i64(PyObject *o, long long *out) {
    int overflow;
    if (o == NULL || !PyLong_CheckExact(o)) return 0;
    *out = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return 0;
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* The rule's common branch (counting.py `Rule.count`, first branch) for one point, or NULL with no
 * error set when the point is not in it (the caller asks the rule). A new reference on success. */
static PyObject *count_common(PyObject *s, PyObject *start, PyObject *t, PyObject *value) {
    long long s_start, p_start, last, last_time, tv, v, inc;
    if (!as_i64(start, &p_start) || !as_i64(SLOT(s, S_START), &s_start) || p_start != s_start) return NULL;
    PyObject *last_o = SLOT(s, S_LAST), *last_time_o = SLOT(s, S_LAST_TIME);
    if (!as_i64(last_o, &last) || !as_i64(last_time_o, &last_time) || !as_i64(t, &tv) ||
        !as_i64(value, &v) || SLOT(s, S_SINCE) == NULL)
        return NULL;
    if (v > last) {
        if (__builtin_sub_overflow(v, last, &inc)) return NULL;
        PyObject *result = PyLong_FromLongLong(inc);
        if (result == NULL) {
            PyErr_Clear();
            return NULL;
        }
        set_slot(s, S_SINCE, last_time_o); /* s.since = s.last_time */
        if (tv > last_time) set_slot(s, S_LAST_TIME, t); /* before `last` goes: last_time_o is borrowed */
        set_slot(s, S_LAST, value);
        return result;
    }
    if (v == last && tv > last_time) { /* an idle report: nothing new */
        set_slot(s, S_LAST_TIME, t);
        return PyFloat_FromDouble(0.0);
    }
    return NULL; /* declined: the rule tallies why */
}

/* repeat(entries, keys, flat, now, count) -> (billed, declined) or None.
 * `_repeat`'s loop over a Sum read from its layout: each point counted, its increment accumulated and
 * billed, the declined collected as a set of id(entry) (None when there are none). None when an entry is
 * not of the bound type (nothing changed then). */
static PyObject *repeat(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "repeat() takes 5 arguments");
        return NULL;
    }
    PyObject *entries = args[0], *keys = args[1], *flat = args[2], *now = args[3], *count = args[4];
    if (!PyTuple_CheckExact(entries) || !PyTuple_CheckExact(keys) || !PyList_CheckExact(flat)) {
        PyErr_SetString(PyExc_TypeError, "repeat() takes a tuple of entries, a tuple of keys, a list");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(entries);
    if (PyTuple_GET_SIZE(keys) != n || PyList_GET_SIZE(flat) != 6 * n) {
        PyErr_SetString(PyExc_ValueError, "repeat(): entries, keys and flat differ in length");
        return NULL;
    }
    if (bound_type == NULL) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < n; i++)
        if (Py_TYPE(PyTuple_GET_ITEM(entries, i)) != bound_type) Py_RETURN_NONE;
    PyObject *billed = PyList_New(0), *declined = NULL, *zero = PyLong_FromLong(0);
    if (billed == NULL || zero == NULL) goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyTuple_GET_ITEM(entries, i);
        PyObject *start = PyList_GET_ITEM(flat, 6 * i + 1), *t = PyList_GET_ITEM(flat, 6 * i + 3);
        PyObject *value = PyList_GET_ITEM(flat, 6 * i + 5);
        set_slot(entry, S_SEEN, now);
        PyObject *inc = count_common(entry, start, t, value);
        if (inc == NULL) {
            PyObject *call[5] = {entry, start, t, value, now};
            inc = PyObject_Vectorcall(count, call, 5, NULL);
            if (inc == NULL) goto error;
        }
        int nonzero = PyObject_IsTrue(inc);
        if (nonzero <= 0) {
            Py_DECREF(inc);
            if (nonzero < 0) goto error;
            continue;
        }
        int negative = PyObject_RichCompareBool(inc, zero, Py_LT);
        if (negative) {
            Py_DECREF(inc);
            if (negative < 0) goto error;
            if (declined == NULL && (declined = PySet_New(NULL)) == NULL) goto error;
            PyObject *id = PyLong_FromVoidPtr(entry);
            if (id == NULL || PySet_Add(declined, id) < 0) {
                Py_XDECREF(id);
                goto error;
            }
            Py_DECREF(id);
            continue;
        }
        /* entry.acc[0] += inc */
        PyObject *acc = SLOT(entry, S_ACC);
        if (acc == NULL) {
            Py_DECREF(inc);
            PyErr_SetString(PyExc_AttributeError, "acc");
            goto error;
        }
        PyObject *held = PySequence_GetItem(acc, 0);
        PyObject *sum = held == NULL ? NULL : PyNumber_InPlaceAdd(held, inc);
        Py_XDECREF(held);
        if (sum == NULL || PySequence_SetItem(acc, 0, sum) < 0) {
            Py_XDECREF(sum);
            Py_DECREF(inc);
            goto error;
        }
        Py_DECREF(sum);
        PyObject *template = SLOT(entry, S_TEMPLATE), *since = SLOT(entry, S_SINCE);
        if (template == NULL || since == NULL) {
            Py_DECREF(inc);
            PyErr_SetString(PyExc_AttributeError, template == NULL ? "template" : "since");
            goto error;
        }
        if (template != Py_None) {
            PyObject *row = PyTuple_Pack(5, template, PyTuple_GET_ITEM(keys, i), inc, since, t);
            if (row == NULL || PyList_Append(billed, row) < 0) {
                Py_XDECREF(row);
                Py_DECREF(inc);
                goto error;
            }
            Py_DECREF(row);
        }
        Py_DECREF(inc);
    }
    Py_DECREF(zero);
    return Py_BuildValue("(NN)", billed, declined == NULL ? Py_NewRef(Py_None) : declined);
error:
    Py_XDECREF(billed);
    Py_XDECREF(declined);
    Py_XDECREF(zero);
    return NULL;
}

PyObject *otlp_logs(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_flowlogs.c */
PyObject *json_lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_flowlogs.c */
PyObject *read_layout(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_layout.c */
PyObject *received_given(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_named.c */
PyObject *joined(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_named.c */
PyObject *encoded(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_named.c */
PyObject *rendered(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_named.c */
PyObject *ends(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_new.c */
PyObject *slots_of(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_new.c */
PyObject *copied(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_new.c */
PyObject *slim(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* _native_new.c */

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "bind(Series): the class whose slots the loop reads and writes."},
    {"repeat", (PyCFunction)(void (*)(void))repeat, METH_FASTCALL,
     "repeat(entries, keys, flat, now, count) -> (billed, declined) or None: _repeat's per-point loop."},
    {"otlp_logs", (PyCFunction)(void (*)(void))otlp_logs, METH_FASTCALL,
     "otlp_logs(resource, scope, bytes_heads, packets_heads, cost_head, start_head, templates, starts, ends, "
     "byte_counts, packet_counts, costs) -> the OTLP flow-log request's bytes, or None (_native_flowlogs.c)."},
    {"json_lines", (PyCFunction)(void (*)(void))json_lines, METH_FASTCALL,
     "json_lines(glue, templates, floats, byte_counts, packet_counts) -> the JSON flow-log lines' bytes, or "
     "None (_native_flowlogs.c)."},
    {"read_layout", (PyCFunction)(void (*)(void))read_layout, METH_FASTCALL,
     "read_layout(buf, body, end, received, keys, trailer, lo, hi) -> (raws, flat) or None: Layout.read "
     "(_native_layout.c)."},
    {"received_given", (PyCFunction)(void (*)(void))received_given, METH_FASTCALL,
     "received_given(key, by_field, parse, limit) -> (pieces, given) or None: pieces.received and its "
     "attributes "
     "(_native_named.c)."},
    {"joined", (PyCFunction)(void (*)(void))joined, METH_FASTCALL,
     "joined(given, computed, services) -> (added, attrs, extra): Resolver.resolve_encoded's join "
     "(_native_named.c)."},
    {"encoded", (PyCFunction)(void (*)(void))encoded, METH_FASTCALL,
     "encoded(key, value) -> pieces or None: one string attribute's pieces (_native_named.c)."},
    {"rendered", (PyCFunction)(void (*)(void))rendered, METH_FASTCALL,
     "rendered(encoded, order, json_head, before, body, after) -> (json_prefix, otlp_static): a flow-log "
     "template's rendering (_native_named.c)."},
    {"ends", (PyCFunction)(void (*)(void))ends, METH_FASTCALL,
     "ends(ends, src_addr, dst_addr, at, classes) -> (class, src, dst) or None: Resolver._ends_of's common "
     "case (_native_new.c)."},
    {"slots_of", (PyCFunction)(void (*)(void))slots_of, METH_FASTCALL,
     "slots_of(type, names) -> the named slots' offsets, for copied and slim (_native_new.c)."},
    {"copied", (PyCFunction)(void (*)(void))copied, METH_FASTCALL,
     "copied(proto, offsets, values) -> a copy of a slots object, those slots set (_native_new.c)."},
    {"slim", (PyCFunction)(void (*)(void))slim, METH_FASTCALL,
     "slim(resolved, attrs_offset, keys) -> Resolved.slim, or None (_native_new.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
