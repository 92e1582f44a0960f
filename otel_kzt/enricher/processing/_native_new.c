/* A new flow's common case in C: its two ends found in the resolver's cache and its class
 * (resolution.py `Resolver._ends_of`, `classify`, `_crossing`), its slim naming (`Resolved.slim`) and its
 * Series made by copying a prototype's slots (state/series.py `Series`), each in one call.
 *
 * resolution.py and series.py are the statement and the Python reference. These calls take only the
 * common case and hand back None for anything else, which then goes the Python way: an address not cached
 * or measured outside its cached window, an end that is neither pod nor node (link-local, Services'
 * cluster IPs and cluster ranges are decided in Python). tests/unit/test_enricher_newc.py drives both on
 * generated ends and objects and requires the same answers, field by field.
 *
 * Slots objects: `slots_of(type, names)` checks the type's instances are nothing but object slots (no
 * __dict__, no __weakref__, no items, every pointer of the body a slot of the type or its bases) and gives
 * the named slots' offsets; `copied` and `slim` only take objects of such a type.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *s_endpoint, *s_node, *s_valid_from, *s_valid_until, *s_node_name, *s_zone, *s_region;

static int interned(void) {
    if (s_endpoint != NULL) return 0;
    s_endpoint = PyUnicode_InternFromString("endpoint");
    s_node = PyUnicode_InternFromString("node");
    s_valid_from = PyUnicode_InternFromString("valid_from");
    s_valid_until = PyUnicode_InternFromString("valid_until");
    s_node_name = PyUnicode_InternFromString("node_name");
    s_zone = PyUnicode_InternFromString("zone");
    s_region = PyUnicode_InternFromString("region");
    return s_region == NULL ? -1 : 0;
}

/* The cached end of `address` if its window holds `at` (a new reference), Py_None (a new reference) when
 * it is not cached or not in its window, NULL on error. */
static PyObject *cached_end(PyObject *ends, PyObject *address, PyObject *at) {
    PyObject *end = PyDict_GetItemWithError(ends, address);
    if (end == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    PyObject *lo = PyObject_GetAttr(end, s_valid_from), *hi = NULL;
    if (lo == NULL || (hi = PyObject_GetAttr(end, s_valid_until)) == NULL) goto error;
    int in = PyObject_RichCompareBool(lo, at, Py_LE);
    if (in > 0) in = PyObject_RichCompareBool(at, hi, Py_LT);
    if (in < 0) goto error;
    Py_DECREF(lo);
    Py_DECREF(hi);
    return Py_NewRef(in ? end : Py_None);
error:
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    return NULL;
}

enum { C_SAME_NODE, C_SAME_ZONE, C_CROSS_ZONE, C_CROSS_REGION, C_UNKNOWN, N_CLASSES };

/* `_crossing(src_node, dst_node)` as an index into the classes; -1 on error. */
static int crossing(PyObject *src, PyObject *dst) {
    PyObject *sz = NULL, *dz = NULL, *sr = NULL, *dr = NULL;
    int cls = -1, t;
    if (src == Py_None || dst == Py_None) return C_UNKNOWN;
    if ((sz = PyObject_GetAttr(src, s_zone)) == NULL || (dz = PyObject_GetAttr(dst, s_zone)) == NULL) goto done;
    if (sz == Py_None || dz == Py_None) {
        cls = C_UNKNOWN;
        goto done;
    }
    if ((sr = PyObject_GetAttr(src, s_region)) == NULL || (dr = PyObject_GetAttr(dst, s_region)) == NULL) goto done;
    if ((t = PyObject_IsTrue(sr)) < 0) goto done;
    if (t && (t = PyObject_IsTrue(dr)) < 0) goto done;
    if (t && (t = PyObject_RichCompareBool(sr, dr, Py_NE)) < 0) goto done;
    if (t) {
        cls = C_CROSS_REGION;
        goto done;
    }
    if ((t = PyObject_RichCompareBool(sz, dz, Py_NE)) < 0) goto done;
    cls = t ? C_CROSS_ZONE : C_SAME_ZONE;
done:
    Py_XDECREF(sz);
    Py_XDECREF(dz);
    Py_XDECREF(sr);
    Py_XDECREF(dr);
    return cls;
}

/* The class of two ends whose endpoints are both known (`classify`'s first branches); -1 on error. */
static int classified(PyObject *src, PyObject *dst, PyObject *src_ep, PyObject *dst_ep) {
    PyObject *sn = PyObject_GetAttr(src_ep, s_node_name), *dn = NULL, *snode = NULL, *dnode = NULL;
    int cls = -1, t;
    if (sn == NULL || (t = PyObject_IsTrue(sn)) < 0) goto done;
    if (t) {
        if ((dn = PyObject_GetAttr(dst_ep, s_node_name)) == NULL) goto done;
        if ((t = PyObject_RichCompareBool(sn, dn, Py_EQ)) < 0) goto done;
        if (t) {
            cls = C_SAME_NODE;
            goto done;
        }
    }
    if ((snode = PyObject_GetAttr(src, s_node)) == NULL || (dnode = PyObject_GetAttr(dst, s_node)) == NULL) goto done;
    cls = crossing(snode, dnode);
done:
    Py_XDECREF(sn);
    Py_XDECREF(dn);
    Py_XDECREF(snode);
    Py_XDECREF(dnode);
    return cls;
}

/* ends(ends, src_addr, dst_addr, at, classes) -> (class, src, dst) or None: `Resolver._ends_of` of a ready
 * index, a source not named by its node and a measurement time `at`, when both addresses are cached with
 * `at` in their windows and both ends are a pod or a node; classes: (same node, same zone, cross zone,
 * cross region, unknown). None: the Python way. */
PyObject *ends(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyDict_CheckExact(args[0]) || !PyTuple_CheckExact(args[4]) ||
        PyTuple_GET_SIZE(args[4]) != N_CLASSES) {
        PyErr_SetString(PyExc_TypeError, "ends(dict, src_addr, dst_addr, at, classes: 5-tuple)");
        return NULL;
    }
    if (interned() < 0) return NULL;
    PyObject *src = NULL, *dst = NULL, *src_ep = NULL, *dst_ep = NULL, *out = NULL;
    if ((src = cached_end(args[0], args[1], args[3])) == NULL || src == Py_None) goto done;
    if ((dst = cached_end(args[0], args[2], args[3])) == NULL || dst == Py_None) goto done;
    if ((src_ep = PyObject_GetAttr(src, s_endpoint)) == NULL || src_ep == Py_None) goto done;
    if ((dst_ep = PyObject_GetAttr(dst, s_endpoint)) == NULL || dst_ep == Py_None) goto done;
    int cls = classified(src, dst, src_ep, dst_ep);
    if (cls >= 0) out = PyTuple_Pack(3, PyTuple_GET_ITEM(args[4], cls), src, dst);
done:
    if (out == NULL && !PyErr_Occurred()) out = Py_NewRef(Py_None);
    Py_XDECREF(src);
    Py_XDECREF(dst);
    Py_XDECREF(src_ep);
    Py_XDECREF(dst_ep);
    return out;
}

/* Object slots a type's instances hold: how many of the body's pointers are slots; -1 if not all are. */
static Py_ssize_t slot_count(PyTypeObject *type) {
    Py_ssize_t n = 0;
    for (PyTypeObject *t = type; t != NULL && t != &PyBaseObject_Type; t = t->tp_base) {
        if (t->tp_dictoffset || t->tp_weaklistoffset || t->tp_itemsize) return -1;
        for (PyMemberDef *m = t->tp_members; m != NULL && m->name != NULL; m++) {
            if (m->type != T_OBJECT_EX || m->flags & READONLY) return -1;
            n++;
        }
    }
    Py_ssize_t body = (type->tp_basicsize - (Py_ssize_t)sizeof(PyObject)) / (Py_ssize_t)sizeof(PyObject *);
    return n == body && type->tp_base != NULL && type->tp_basicsize % sizeof(PyObject *) == 0 ? n : -1;
}

/* slots_of(type, names) -> the named slots' offsets (a tuple of ints), for `copied` and `slim`; a
 * TypeError for a type that is not only object slots or a name that is not one. */
PyObject *slots_of(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[0]) || !PyTuple_CheckExact(args[1]) ||
        slot_count((PyTypeObject *)args[0]) < 0) {
        PyErr_SetString(PyExc_TypeError, "slots_of(type of object slots only, names: tuple)");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args[1]);
    PyObject *out = PyTuple_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *d = PyObject_GetAttr(args[0], PyTuple_GET_ITEM(args[1], i));
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) {
            if (d != NULL) PyErr_SetString(PyExc_TypeError, "slots_of: not a slot");
            Py_XDECREF(d);
            Py_CLEAR(out);
            break;
        }
        PyObject *offset = PyLong_FromSsize_t(((PyMemberDescrObject *)d)->d_member->offset);
        Py_DECREF(d);
        if (offset == NULL) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, i, offset);
    }
    return out;
}

#define AT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

/* A new object of `proto`'s type holding `proto`'s slots (new references), NULL on error. */
static PyObject *copy_of(PyObject *proto) {
    PyTypeObject *type = Py_TYPE(proto);
    if (slot_count(type) < 0) {
        PyErr_SetString(PyExc_TypeError, "copied: not an object of object slots only");
        return NULL;
    }
    PyObject *made = type->tp_alloc(type, 0); /* zeroed, tracked when the type is */
    if (made == NULL) return NULL;
    for (Py_ssize_t at = sizeof(PyObject); at < type->tp_basicsize; at += sizeof(PyObject *))
        AT(made, at) = Py_XNewRef(AT(proto, at));
    return made;
}

/* Sets slot `offset` of `obj` to `value` (a new reference taken); -1 for an offset outside its slots. */
static int set_at(PyObject *obj, PyObject *offset, PyObject *value) {
    Py_ssize_t at = PyLong_AsSsize_t(offset);
    if (at == -1 && PyErr_Occurred()) return -1;
    if (at < (Py_ssize_t)sizeof(PyObject) || at >= Py_TYPE(obj)->tp_basicsize || at % sizeof(PyObject *)) {
        PyErr_SetString(PyExc_ValueError, "copied: an offset outside the object's slots");
        return -1;
    }
    Py_XSETREF(AT(obj, at), Py_NewRef(value));
    return 0;
}

/* copied(proto, offsets, values) -> a new object of proto's type with its slots, those at `offsets`
 * (from slots_of) set to `values` instead: a dataclass made without running its __init__ (the prototype
 * was made by it: its defaults stay the statement). */
PyObject *copied(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_CheckExact(args[1]) || !PyTuple_CheckExact(args[2]) ||
        PyTuple_GET_SIZE(args[1]) != PyTuple_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError, "copied(proto, offsets: tuple, values: tuple of the same length)");
        return NULL;
    }
    PyObject *made = copy_of(args[0]);
    for (Py_ssize_t i = 0; made != NULL && i < PyTuple_GET_SIZE(args[1]); i++)
        if (set_at(made, PyTuple_GET_ITEM(args[1], i), PyTuple_GET_ITEM(args[2], i)) < 0) Py_CLEAR(made);
    return made;
}

/* slim(resolved, attrs_offset, keys) -> `Resolved.slim`: a copy of `resolved` whose attrs (a dict, at
 * attrs_offset) keep only `keys` (a tuple), in the order of `keys`; None when attrs is not a dict. */
PyObject *slim(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "slim(resolved, attrs_offset, keys: tuple)");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    if (at == -1 && PyErr_Occurred()) return NULL;
    PyTypeObject *type = Py_TYPE(args[0]);
    if (at < (Py_ssize_t)sizeof(PyObject) || at >= type->tp_basicsize || at % sizeof(PyObject *) ||
        AT(args[0], at) == NULL) {
        PyErr_SetString(PyExc_TypeError, "slim: attrs_offset is not a slot");
        return NULL;
    }
    if (!PyDict_CheckExact(AT(args[0], at))) Py_RETURN_NONE; /* another mapping: the Python way */
    PyObject *attrs = AT(args[0], at), *keep = PyDict_New();
    if (keep == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[2]); i++) {
        PyObject *key = PyTuple_GET_ITEM(args[2], i), *value = PyDict_GetItemWithError(attrs, key);
        if ((value == NULL && PyErr_Occurred()) || (value != NULL && PyDict_SetItem(keep, key, value) < 0)) {
            Py_DECREF(keep);
            return NULL;
        }
    }
    PyObject *made = copy_of(args[0]);
    if (made != NULL) Py_XSETREF(AT(made, at), Py_NewRef(keep));
    Py_DECREF(keep);
    return made;
}
