/*
 * trackd._trackd: the CPython binding of libtrackd. A Client owns one
 * trackd_client; its log methods convert their arguments and call the shim
 * with the GIL held (a log call is a lock and a few stores, cheaper than
 * releasing the GIL), while flush, close and backend_uri wait with the GIL
 * released. A buffer-full drop returns False and never raises. A Client
 * created before fork() is stale in the child: its sender thread does not
 * exist there, so every method refuses and the object is leaked, not closed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "trackd.h"

/* Bumped in the child after every fork(); a Client remembers the value it was made in. */
static volatile unsigned long fork_generation;

/* How long one trackd_flush() waits before checking signals and close(). */
#define FLUSH_SLICE_MS 250
/* Metrics per trackd_log_metrics() call, well inside the agent's frame limit. */
#define METRICS_CHUNK 1000
#define STACK_METRICS 64

static void on_fork_child(void)
{
    fork_generation++;
}

/* PyObject_HEAD carries its own semicolon, which clang-format cannot see. */
// clang-format off
typedef struct {
    PyObject_HEAD
    trackd_client *c;
    unsigned long generation;
    int inflight;         /* calls waiting with the GIL released */
    int close_pending;    /* close() asked while calls were waiting */
    int close_timeout_ms; /* the timeout close() asked for */
    int blocking;         /* overflow="block": log calls may wait, so they release the GIL */
} ClientObject;
// clang-format on

static PyTypeObject ClientType;
static void leave_wait(ClientObject *self);

/*
 * Runs a shim log call. With the drop policy it never waits and is cheaper
 * than a GIL release; with the block policy it may wait for space up to
 * block_timeout_ms, and other Python threads must run meanwhile.
 */
#define SHIM_CALL(self, rc, expr)                                                                  \
    do {                                                                                           \
        if ((self)->blocking) {                                                                    \
            (self)->inflight++;                                                                    \
            Py_BEGIN_ALLOW_THREADS(rc) = (expr);                                                   \
            Py_END_ALLOW_THREADS leave_wait(self);                                                 \
        } else {                                                                                   \
            (rc) = (expr);                                                                         \
        }                                                                                          \
    } while (0)

/* ---- argument helpers ---------------------------------------------------- */

/*
 * Puts positional and keyword arguments into out[] in the order of names;
 * absent ones are NULL. The first `required` names must be present.
 */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const char *const *names, Py_ssize_t nnames, Py_ssize_t required,
                      PyObject **out)
{
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", fname, nnames,
                     nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nnames; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        while (i < nnames && PyUnicode_CompareWithASCIIString(name, names[i]) != 0)
            i++;
        if (i == nnames) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname,
                         name);
            return -1;
        }
        if (out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[i]);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* A str without NUL characters as UTF-8; the pointer lives as long as o. */
static int as_cstr(PyObject *o, const char *what, const char **out)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == NULL)
        return -1;
    if (strlen(s) != (size_t)n) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", what);
        return -1;
    }
    *out = s;
    return 0;
}

/* Like as_cstr, with None (or an absent argument) giving NULL. */
static int as_opt_cstr(PyObject *o, const char *what, const char **out)
{
    *out = NULL;
    if (o == NULL || o == Py_None)
        return 0;
    return as_cstr(o, what, out);
}

/* float, int, numpy scalars and anything with __float__ or __index__. */
static int as_double(PyObject *o, double *out)
{
    if (PyFloat_Check(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 0;
    }
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    *out = d;
    return 0;
}

/* An int (or __index__); absent gives dflt, None gives none_value. */
static int as_int64(PyObject *o, int64_t dflt, int64_t none_value, int64_t *out)
{
    if (o == NULL) {
        *out = dflt;
        return 0;
    }
    if (o == Py_None) {
        *out = none_value;
        return 0;
    }
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = (int64_t)v;
    return 0;
}

/* Seconds as float or None into milliseconds; None and +inf give -1 (forever). */
static int as_timeout_ms(PyObject *o, double dflt_s, int *out)
{
    double s = dflt_s;
    if (o == Py_None) {
        *out = -1;
        return 0;
    }
    if (o != NULL && as_double(o, &s) != 0)
        return -1;
    if (isnan(s)) {
        PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
        return -1;
    }
    if (s < 0)
        s = 0;
    if (s * 1000.0 >= (double)INT_MAX) {
        *out = -1;
        return 0;
    }
    *out = (int)ceil(s * 1000.0);
    return 0;
}

static int run_id_ok(const char *s)
{
    for (int i = 0; i < TRACKD_RUN_ID_SIZE - 1; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return s[TRACKD_RUN_ID_SIZE - 1] == '\0';
}

/*
 * Turns a shim result into Python: True when queued, False when the overflow
 * policy dropped the event, NULL with an exception for anything else.
 */
static PyObject *result(int rc, const char *run_id)
{
    switch (rc) {
    case 0: Py_RETURN_TRUE;
    case -ENOBUFS: Py_RETURN_FALSE;
    case -ENOMEM: return PyErr_NoMemory();
    case -EINVAL:
        if (run_id != NULL && !run_id_ok(run_id))
            return PyErr_Format(PyExc_ValueError,
                                "trackd: %s: run_id must be 32 lower-case hex characters "
                                "(see new_run_id()), got '%.64s'",
                                trackd_strerror(rc), run_id);
        return PyErr_Format(PyExc_ValueError, "trackd: %s", trackd_strerror(rc));
    case -EMSGSIZE: return PyErr_Format(PyExc_ValueError, "trackd: %s", trackd_strerror(rc));
    default: errno = rc < 0 ? -rc : EIO; return PyErr_SetFromErrno(PyExc_OSError);
    }
}

/* Returns the live shim client, or NULL with RuntimeError. */
static trackd_client *client_of(ClientObject *self)
{
    if (self->generation != fork_generation) {
        PyErr_SetString(PyExc_RuntimeError,
                        "trackd client belongs to the parent process; create a new "
                        "trackd._trackd.Client in the child after fork()");
        return NULL;
    }
    if (self->c == NULL || self->close_pending) {
        PyErr_SetString(PyExc_RuntimeError, "trackd client is closed");
        return NULL;
    }
    return self->c;
}

/* ---- key/value collections ------------------------------------------------ */

/*
 * A dict or an iterable of (key, value) pairs, held as a tuple of 2-tuples so
 * the UTF-8 pointers taken from them stay valid whatever Python code runs
 * meanwhile. Values must be str: the Python layer stringifies.
 */
struct kvs {
    PyObject *items; /* tuple of tuples, owned */
    struct trackd_kv *kv;
    size_t n;
};

static void kvs_free(struct kvs *k)
{
    Py_XDECREF(k->items);
    PyMem_Free(k->kv);
    k->items = NULL;
    k->kv = NULL;
}

static int kvs_from(PyObject *o, const char *what, struct kvs *out)
{
    out->items = NULL;
    out->kv = NULL;
    out->n = 0;
    if (o == NULL || o == Py_None)
        return 0;
    PyObject *seq = PyDict_Check(o) ? PyDict_Items(o) : PySequence_Tuple(o);
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    out->items = PyTuple_New(n);
    if (out->items == NULL) {
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Tuple(PySequence_Fast_GET_ITEM(seq, i));
        if (pair == NULL) {
            Py_DECREF(seq);
            goto fail;
        }
        PyTuple_SET_ITEM(out->items, i, pair);
    }
    Py_DECREF(seq);
    out->kv = PyMem_Calloc(n ? (size_t)n : 1, sizeof *out->kv);
    if (out->kv == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(out->items, i);
        if (PyTuple_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_ValueError, "%s items must be (key, value) pairs", what);
            goto fail;
        }
        if (as_cstr(PyTuple_GET_ITEM(pair, 0), "key", &out->kv[i].key) != 0 ||
            as_cstr(PyTuple_GET_ITEM(pair, 1), "value", &out->kv[i].value) != 0)
            goto fail;
    }
    out->n = (size_t)n;
    return 0;
fail:
    kvs_free(out);
    return -1;
}

/*
 * Metric points collected from Python: keys and values converted, with the
 * key objects held until the shim has copied them.
 */
struct points {
    struct trackd_metric stack[STACK_METRICS];
    struct trackd_metric *m;
    PyObject *keep; /* tuple holding every key object, owned */
    size_t n;
};

static void points_free(struct points *p)
{
    if (p->m != p->stack)
        PyMem_Free(p->m);
    p->m = NULL;
    Py_CLEAR(p->keep);
}

static int points_alloc(struct points *p, Py_ssize_t n)
{
    p->n = 0;
    p->keep = PyTuple_New(n);
    if (p->keep == NULL)
        return -1;
    p->m = n <= STACK_METRICS ? p->stack : PyMem_Malloc((size_t)n * sizeof *p->m);
    if (p->m == NULL) {
        Py_CLEAR(p->keep);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Sends the points in chunks; False if any chunk was dropped. */
static PyObject *send_points(ClientObject *self, trackd_client *c, const char *run_id,
                             const struct points *p)
{
    int dropped = 0;
    for (size_t off = 0; off < p->n; off += METRICS_CHUNK) {
        size_t k = p->n - off < METRICS_CHUNK ? p->n - off : METRICS_CHUNK;
        int rc;
        SHIM_CALL(self, rc, trackd_log_metrics(c, run_id, p->m + off, k));
        if (rc == -ENOBUFS)
            dropped = 1;
        else if (rc != 0)
            return result(rc, run_id);
    }
    return PyBool_FromLong(!dropped);
}

/* ---- Client ---------------------------------------------------------------------- */

static PyObject *Client_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    ClientObject *self = (ClientObject *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->generation = fork_generation;
    return (PyObject *)self;
}

static int Client_init(ClientObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"socket",      "buffer_bytes", "overflow",     "block_timeout_ms",
                             "source_name", "source_type",  "context_tags", NULL};
    PyObject *socket = Py_None, *source_name = Py_None, *source_type = Py_None;
    Py_ssize_t buffer_bytes = 0;
    int block_timeout_ms = 0;
    const char *overflow = "drop";
    int context_tags = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OnsiOOp:Client", kwlist, &socket, &buffer_bytes,
                                     &overflow, &block_timeout_ms, &source_name, &source_type,
                                     &context_tags))
        return -1;
    if (self->c != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "trackd client is already open");
        return -1;
    }
    struct trackd_options o = {0};
    if (as_opt_cstr(socket, "socket", &o.socket_path) != 0 ||
        as_opt_cstr(source_name, "source_name", &o.source_name) != 0 ||
        as_opt_cstr(source_type, "source_type", &o.source_type) != 0)
        return -1;
    if (buffer_bytes < 0 || block_timeout_ms < 0) {
        PyErr_SetString(PyExc_ValueError, "buffer_bytes and block_timeout_ms must be >= 0");
        return -1;
    }
    if (strcmp(overflow, "drop") == 0) {
        o.overflow = TRACKD_DROP_NEWEST;
    } else if (strcmp(overflow, "block") == 0) {
        o.overflow = TRACKD_BLOCK;
    } else {
        PyErr_Format(PyExc_ValueError, "overflow must be 'drop' or 'block', not '%s'", overflow);
        return -1;
    }
    o.buffer_bytes = (size_t)buffer_bytes;
    o.block_timeout_ms = block_timeout_ms;
    o.no_context_tags = !context_tags;
    trackd_client *c;
    int rc = trackd_open(&c, &o);
    if (rc == -ENAMETOOLONG) {
        PyErr_Format(PyExc_ValueError, "trackd: socket path is too long: %R", socket);
        return -1;
    }
    if (rc != 0) {
        result(rc, NULL);
        return -1;
    }
    self->c = c;
    self->close_pending = 0;
    self->blocking = o.overflow == TRACKD_BLOCK;
    self->generation = fork_generation;
    return 0;
}

/* Closes the shim client with the GIL released; self->c is already detached. */
static void close_detached(trackd_client *c, int timeout_ms)
{
    Py_BEGIN_ALLOW_THREADS trackd_close(c, timeout_ms < 0 ? INT_MAX : timeout_ms);
    Py_END_ALLOW_THREADS
}

/* Ends a call that waited with the GIL released; the last one performs a pending close. */
static void leave_wait(ClientObject *self)
{
    if (--self->inflight == 0 && self->close_pending && self->c != NULL) {
        trackd_client *c = self->c;
        self->c = NULL;
        close_detached(c, self->close_timeout_ms);
    }
}

static void Client_dealloc(ClientObject *self)
{
    if (self->c != NULL && self->generation == fork_generation) {
        trackd_client *c = self->c;
        self->c = NULL;
        close_detached(c, 5000);
    }
    /* In a forked child the client is leaked: its sender thread only exists in the parent. */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Client_create_experiment(ClientObject *self, PyObject *const *args,
                                          Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"name", "artifact_location"};
    PyObject *a[2];
    const char *name, *loc;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("create_experiment", args, nargs, kwnames, names, 2, 1, a) != 0 ||
        as_cstr(a[0], "name", &name) != 0 || as_opt_cstr(a[1], "artifact_location", &loc) != 0)
        return NULL;
    int rc;
    SHIM_CALL(self, rc,
              loc ? trackd_create_experiment_at(c, name, loc) : trackd_create_experiment(c, name));
    return result(rc, NULL);
}

static PyObject *Client_start_run(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    static const char *const names[] = {"run_id",     "experiment", "run_name",
                                        "start_time", "tags",       "experiment_id"};
    PyObject *a[6];
    const char *run_id, *experiment, *run_name;
    int64_t start, exp_id;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("start_run", args, nargs, kwnames, names, 6, 2, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_cstr(a[1], "experiment", &experiment) != 0 ||
        as_opt_cstr(a[2], "run_name", &run_name) != 0 ||
        as_int64(a[3], TRACKD_NOW, TRACKD_NOW, &start) != 0 ||
        as_int64(a[5], INT64_MIN, INT64_MIN, &exp_id) != 0)
        return NULL;
    struct kvs tags;
    if (kvs_from(a[4], "tags", &tags) != 0)
        return NULL;
    int rc;
    SHIM_CALL(
        self, rc,
        exp_id != INT64_MIN
            ? trackd_start_run_in(c, run_id, exp_id, experiment, run_name, start, tags.kv, tags.n)
            : trackd_start_run(c, run_id, experiment, run_name, start, tags.kv, tags.n));
    PyObject *r = result(rc, run_id);
    kvs_free(&tags);
    return r;
}

static PyObject *Client_log_metric(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    static const char *const names[] = {"run_id", "key", "value", "step", "timestamp"};
    PyObject *a[5];
    const char *run_id, *key;
    double value;
    int64_t step, ts;
    trackd_client *c = client_of(self);
    if (c == NULL)
        return NULL;
    if (kwnames == NULL && nargs >= 3 && nargs <= 5) {
        a[0] = args[0];
        a[1] = args[1];
        a[2] = args[2];
        a[3] = nargs > 3 ? args[3] : NULL;
        a[4] = nargs > 4 ? args[4] : NULL;
    } else if (parse_args("log_metric", args, nargs, kwnames, names, 5, 3, a) != 0) {
        return NULL;
    }
    if (as_cstr(a[0], "run_id", &run_id) != 0 || as_cstr(a[1], "key", &key) != 0 ||
        as_double(a[2], &value) != 0 || as_int64(a[3], 0, 0, &step) != 0 ||
        as_int64(a[4], TRACKD_NOW, TRACKD_NOW, &ts) != 0)
        return NULL;
    int rc;
    SHIM_CALL(self, rc, trackd_log_metric(c, run_id, key, value, step, ts));
    return result(rc, run_id);
}

static PyObject *Client_log_metrics(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    static const char *const names[] = {"run_id", "metrics", "step", "timestamp"};
    PyObject *a[4];
    const char *run_id;
    int64_t step, ts;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("log_metrics", args, nargs, kwnames, names, 4, 2, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_int64(a[2], 0, 0, &step) != 0 ||
        as_int64(a[3], TRACKD_NOW, TRACKD_NOW, &ts) != 0)
        return NULL;
    if (!PyDict_Check(a[1])) {
        PyErr_Format(PyExc_TypeError, "metrics must be a dict, not %.100s", Py_TYPE(a[1])->tp_name);
        return NULL;
    }
    /* Hold keys and values first: converting a value may run Python code. */
    Py_ssize_t n = PyDict_GET_SIZE(a[1]);
    PyObject *values = PyTuple_New(n);
    struct points p;
    if (values == NULL)
        return NULL;
    if (points_alloc(&p, n) != 0) {
        Py_DECREF(values);
        return NULL;
    }
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (i < n && PyDict_Next(a[1], &pos, &k, &v)) {
        Py_INCREF(k);
        Py_INCREF(v);
        PyTuple_SET_ITEM(p.keep, i, k);
        PyTuple_SET_ITEM(values, i, v);
        i++;
    }
    PyObject *r = NULL;
    for (Py_ssize_t j = 0; j < i; j++) {
        struct trackd_metric *m = &p.m[j];
        if (as_cstr(PyTuple_GET_ITEM(p.keep, j), "metric key", &m->key) != 0 ||
            as_double(PyTuple_GET_ITEM(values, j), &m->value) != 0)
            goto done;
        m->step = step;
        m->timestamp_ms = ts;
    }
    p.n = (size_t)i;
    r = send_points(self, c, run_id, &p);
done:
    Py_DECREF(values);
    points_free(&p);
    return r;
}

static PyObject *Client_log_batch(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    static const char *const names[] = {"run_id", "metrics", "params", "tags"};
    PyObject *a[4];
    const char *run_id;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("log_batch", args, nargs, kwnames, names, 4, 1, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0)
        return NULL;
    PyObject *seq = a[1] && a[1] != Py_None ? PySequence_Tuple(a[1]) : PyTuple_New(0);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    struct points p;
    struct kvs params = {0}, tags = {0};
    PyObject *r = NULL;
    if (points_alloc(&p, n) != 0) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* (key, value, timestamp_ms, step), the order of mlflow.entities.Metric. */
        PyObject *item = PySequence_Tuple(PyTuple_GET_ITEM(seq, i));
        if (item == NULL)
            goto done;
        PyTuple_SET_ITEM(p.keep, i, item);
        if (PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_ValueError,
                            "metrics items must be (key, value, timestamp_ms, step) tuples");
            goto done;
        }
        struct trackd_metric *m = &p.m[i];
        if (as_cstr(PyTuple_GET_ITEM(item, 0), "metric key", &m->key) != 0 ||
            as_double(PyTuple_GET_ITEM(item, 1), &m->value) != 0 ||
            as_int64(PyTuple_GET_ITEM(item, 2), TRACKD_NOW, TRACKD_NOW, &m->timestamp_ms) != 0 ||
            as_int64(PyTuple_GET_ITEM(item, 3), 0, 0, &m->step) != 0)
            goto done;
    }
    p.n = (size_t)n;
    if (kvs_from(a[2], "params", &params) != 0 || kvs_from(a[3], "tags", &tags) != 0)
        goto done;
    int dropped = 0, rc;
    if (p.n > 0) {
        r = send_points(self, c, run_id, &p);
        if (r == NULL)
            goto done;
        dropped = r == Py_False;
        Py_CLEAR(r);
    }
    if (params.n > 0) {
        SHIM_CALL(self, rc, trackd_log_params(c, run_id, params.kv, params.n));
        if (rc != 0 && rc != -ENOBUFS) {
            r = result(rc, run_id);
            goto done;
        }
        dropped |= rc == -ENOBUFS;
    }
    if (tags.n > 0) {
        SHIM_CALL(self, rc, trackd_set_tags(c, run_id, tags.kv, tags.n));
        if (rc != 0 && rc != -ENOBUFS) {
            r = result(rc, run_id);
            goto done;
        }
        dropped |= rc == -ENOBUFS;
    }
    r = PyBool_FromLong(!dropped);
done:
    Py_DECREF(seq);
    points_free(&p);
    kvs_free(&params);
    kvs_free(&tags);
    return r;
}

/* log_param and set_tag: (run_id, key, value) with str value. */
static PyObject *one_kv(ClientObject *self, const char *fname, PyObject *const *args,
                        Py_ssize_t nargs, PyObject *kwnames,
                        int (*fn)(trackd_client *, const char *, const char *, const char *))
{
    static const char *const names[] = {"run_id", "key", "value"};
    PyObject *a[3];
    const char *run_id, *key, *value;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args(fname, args, nargs, kwnames, names, 3, 3, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_cstr(a[1], "key", &key) != 0 ||
        as_cstr(a[2], "value", &value) != 0)
        return NULL;
    int rc;
    SHIM_CALL(self, rc, fn(c, run_id, key, value));
    return result(rc, run_id);
}

/* log_params and set_tags: (run_id, dict or pairs) with str values. */
static PyObject *many_kv(ClientObject *self, const char *fname, const char *what,
                         PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                         int (*fn)(trackd_client *, const char *, const struct trackd_kv *, size_t))
{
    const char *const names[] = {"run_id", what};
    PyObject *a[2];
    const char *run_id;
    struct kvs kv;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args(fname, args, nargs, kwnames, names, 2, 2, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || kvs_from(a[1], what, &kv) != 0)
        return NULL;
    int rc = 0;
    if (kv.n > 0)
        SHIM_CALL(self, rc, fn(c, run_id, kv.kv, kv.n));
    PyObject *r = result(rc, run_id);
    kvs_free(&kv);
    return r;
}

static PyObject *Client_log_param(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    return one_kv(self, "log_param", args, nargs, kwnames, trackd_log_param);
}

static PyObject *Client_log_params(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    return many_kv(self, "log_params", "params", args, nargs, kwnames, trackd_log_params);
}

static PyObject *Client_set_tag(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    return one_kv(self, "set_tag", args, nargs, kwnames, trackd_set_tag);
}

static PyObject *Client_set_tags(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    return many_kv(self, "set_tags", "tags", args, nargs, kwnames, trackd_set_tags);
}

static PyObject *Client_delete_tag(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    static const char *const names[] = {"run_id", "key"};
    PyObject *a[2];
    const char *run_id, *key;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("delete_tag", args, nargs, kwnames, names, 2, 2, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_cstr(a[1], "key", &key) != 0)
        return NULL;
    int rc;
    SHIM_CALL(self, rc, trackd_delete_tag(c, run_id, key));
    return result(rc, run_id);
}

/* log_artifact and log_artifacts: a file error names the file. */
static PyObject *artifact_call(ClientObject *self, const char *what, PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames, int dir)
{
    static const char *const names[] = {"run_id", "local_path", "artifact_path"};
    PyObject *a[3];
    const char *run_id, *path, *artifact_path;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args(what, args, nargs, kwnames, names, 3, 2, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_cstr(a[1], "local_path", &path) != 0 ||
        as_opt_cstr(a[2], "artifact_path", &artifact_path) != 0)
        return NULL;
    int rc;
    if (dir)
        SHIM_CALL(self, rc, trackd_log_artifacts(c, run_id, path, artifact_path));
    else
        SHIM_CALL(self, rc, trackd_log_artifact(c, run_id, path, artifact_path));
    if (rc < 0 && rc != -ENOBUFS && rc != -EINVAL && rc != -ENOMEM) {
        errno = -rc;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    if (dir && rc >= 0)
        return PyLong_FromLong(rc);
    return result(rc, run_id);
}

static PyObject *Client_log_artifact(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames)
{
    return artifact_call(self, "log_artifact", args, nargs, kwnames, 0);
}

static PyObject *Client_log_artifacts(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    return artifact_call(self, "log_artifacts", args, nargs, kwnames, 1);
}

static PyObject *Client_update_run(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    static const char *const names[] = {"run_id", "status", "end_time", "run_name"};
    PyObject *a[4];
    const char *run_id, *status, *run_name;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("update_run", args, nargs, kwnames, names, 4, 1, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_opt_cstr(a[1], "status", &status) != 0 ||
        as_opt_cstr(a[3], "run_name", &run_name) != 0)
        return NULL;
    int64_t end;
    if (as_int64(a[2], TRACKD_KEEP, TRACKD_KEEP, &end) != 0)
        return NULL;
    int rc;
    SHIM_CALL(self, rc, trackd_update_run(c, run_id, status, end, run_name));
    return result(rc, run_id);
}

static PyObject *Client_end_run(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const names[] = {"run_id", "status", "end_time"};
    PyObject *a[3];
    const char *run_id, *status;
    int64_t end;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("end_run", args, nargs, kwnames, names, 3, 1, a) != 0 ||
        as_cstr(a[0], "run_id", &run_id) != 0 || as_opt_cstr(a[1], "status", &status) != 0 ||
        as_int64(a[2], TRACKD_NOW, TRACKD_NOW, &end) != 0)
        return NULL;
    int rc;
    SHIM_CALL(self, rc, trackd_end_run(c, run_id, status ? status : "FINISHED", end));
    return result(rc, run_id);
}

static double monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/*
 * Waits in slices so that Ctrl-C and a close() from another thread are seen
 * while the agent is unreachable. A later barrier covers everything an
 * earlier one did, so waiting for the last slice's barrier is the same promise.
 */
static PyObject *Client_flush(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    static const char *const names[] = {"timeout"};
    PyObject *a[1];
    int timeout_ms;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("flush", args, nargs, kwnames, names, 1, 0, a) != 0)
        return NULL;
    if (a[0] == NULL)
        a[0] = Py_None;
    if (as_timeout_ms(a[0], 0, &timeout_ms) != 0)
        return NULL;
    double deadline = timeout_ms < 0 ? 0 : monotonic_ms() + timeout_ms;
    int rc;
    self->inflight++;
    for (;;) {
        int slice = FLUSH_SLICE_MS;
        if (timeout_ms >= 0) {
            double left = deadline - monotonic_ms();
            slice = left <= 0 ? 0 : left < FLUSH_SLICE_MS ? (int)ceil(left) : FLUSH_SLICE_MS;
        }
        Py_BEGIN_ALLOW_THREADS rc = trackd_flush(c, slice);
        Py_END_ALLOW_THREADS if (rc != -ETIMEDOUT || self->close_pending || slice == 0) break;
        if (timeout_ms >= 0 && monotonic_ms() >= deadline)
            break;
        if (PyErr_CheckSignals() != 0) {
            leave_wait(self);
            return NULL;
        }
    }
    leave_wait(self);
    if (rc == 0)
        Py_RETURN_TRUE;
    if (rc == -ETIMEDOUT)
        Py_RETURN_FALSE;
    return result(rc, NULL);
}

static PyObject *Client_stats(ClientObject *self, PyObject *unused)
{
    (void)unused;
    trackd_client *c = client_of(self);
    if (c == NULL)
        return NULL;
    struct trackd_counters k;
    trackd_get_counters(c, &k);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsi}", "queued", (unsigned long long)k.queued, "sent",
                         (unsigned long long)k.sent, "dropped", (unsigned long long)k.dropped,
                         "lost", (unsigned long long)k.lost, "errors", (unsigned long long)k.errors,
                         "errors_lost", (unsigned long long)k.errors_lost, "reconnects",
                         (unsigned long long)k.reconnects, "buffered_bytes",
                         (unsigned long long)k.buffered_bytes, "connected", k.connected);
}

static PyObject *Client_errors(ClientObject *self, PyObject *unused)
{
    (void)unused;
    trackd_client *c = client_of(self);
    if (c == NULL)
        return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    struct trackd_error e;
    while (trackd_next_error(c, &e)) {
        PyObject *msg = PyUnicode_DecodeUTF8(
            e.message, (Py_ssize_t)strnlen(e.message, sizeof e.message), "replace");
        PyObject *t =
            msg ? Py_BuildValue("(KIN)", (unsigned long long)e.seq, (unsigned)e.code, msg) : NULL;
        if (t == NULL || PyList_Append(list, t) != 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    return list;
}

static PyObject *Client_backend_uri(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    static const char *const names[] = {"timeout"};
    PyObject *a[1];
    int timeout_ms;
    trackd_client *c = client_of(self);
    if (c == NULL || parse_args("backend_uri", args, nargs, kwnames, names, 1, 0, a) != 0 ||
        as_timeout_ms(a[0], 5.0, &timeout_ms) != 0)
        return NULL;
    char uri[4096];
    int rc;
    self->inflight++;
    Py_BEGIN_ALLOW_THREADS rc =
        trackd_backend_uri(c, uri, sizeof uri, timeout_ms < 0 ? INT_MAX : timeout_ms);
    Py_END_ALLOW_THREADS leave_wait(self);
    if (rc == 0)
        return PyUnicode_DecodeUTF8(uri, (Py_ssize_t)strnlen(uri, sizeof uri), "replace");
    if (rc == -ETIMEDOUT || rc == -ENOENT)
        Py_RETURN_NONE;
    return result(rc, NULL);
}

static PyObject *Client_close(ClientObject *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    static const char *const names[] = {"timeout"};
    PyObject *a[1];
    int timeout_ms;
    if (parse_args("close", args, nargs, kwnames, names, 1, 0, a) != 0 ||
        as_timeout_ms(a[0], 5.0, &timeout_ms) != 0)
        return NULL;
    if (self->generation != fork_generation) {
        self->c = NULL; /* the parent's client: leak it, its sender thread is not here */
        Py_RETURN_NONE;
    }
    if (self->c == NULL || self->close_pending)
        Py_RETURN_NONE;
    if (self->inflight > 0) {
        /* Another thread waits in flush(): it closes the client when it returns. */
        self->close_pending = 1;
        self->close_timeout_ms = timeout_ms;
        Py_RETURN_NONE;
    }
    trackd_client *c = self->c;
    self->c = NULL;
    close_detached(c, timeout_ms);
    Py_RETURN_NONE;
}

static PyObject *Client_enter(ClientObject *self, PyObject *unused)
{
    (void)unused;
    if (client_of(self) == NULL)
        return NULL;
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Client_exit(ClientObject *self, PyObject *args)
{
    (void)args;
    return Client_close(self, NULL, 0, NULL);
}

static PyObject *Client_get_closed(ClientObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->c == NULL || self->close_pending ||
                           self->generation != fork_generation);
}

/* Docstrings start with a text signature, so inspect.signature() and help() show parameters. */
#define FAST(name, sig, doc)                                                                       \
    {                                                                                              \
#name, (PyCFunction)(void (*)(void))Client_##name, METH_FASTCALL | METH_KEYWORDS,          \
            PyDoc_STR(#name "($self, " sig ")\n--\n\n" doc)                                        \
    }

static PyMethodDef Client_methods[] = {
    FAST(create_experiment, "name, artifact_location=None",
         "Creates the experiment unless one has that name. Returns False if dropped."),
    FAST(start_run,
         "run_id, experiment, run_name=None, start_time=None, tags=None, experiment_id=None",
         "Starts a run (ids from new_run_id()); start_time in epoch ms, default now;\n"
         "tags: dict or pairs of str. With experiment_id (an int >= 0, as MLflow's\n"
         "create_run takes it) the run goes to that experiment, whatever its name now;\n"
         "else to the experiment named experiment, created if missing. Returns False if\n"
         "dropped."),
    FAST(log_metric, "run_id, key, value, step=0, timestamp=None",
         "Queues one point; value: float, int, numpy scalar or anything with __float__;\n"
         "timestamp in epoch ms, default now. Returns False if the overflow policy dropped it."),
    FAST(log_metrics, "run_id, metrics, step=0, timestamp=None",
         "Queues a dict {key: value} at one step. Returns False if any point was dropped."),
    FAST(log_batch, "run_id, metrics=(), params=(), tags=()",
         "metrics: (key, value, timestamp_ms, step) tuples; params, tags: dicts or (key, value)\n"
         "pairs of str. Returns False if anything was dropped."),
    FAST(log_param, "run_id, key, value", "value must be str. Returns False if dropped."),
    FAST(log_params, "run_id, params", "params: dict or pairs of str. Returns False if dropped."),
    FAST(set_tag, "run_id, key, value", "value must be str. Returns False if dropped."),
    FAST(set_tags, "run_id, tags", "tags: dict or pairs of str. Returns False if dropped."),
    FAST(delete_tag, "run_id, key", "Deletes a tag of the run. Returns False if dropped."),
    FAST(log_artifact, "run_id, local_path, artifact_path=None",
         "Hands a file to the agent for upload below the run's artifact root (in "
         "artifact_path). Returns at once; the file may be deleted right away. False if "
         "dropped."),
    FAST(log_artifacts, "run_id, local_dir, artifact_path=None",
         "Hands every file below local_dir over, keeping relative paths. Returns the count."),
    FAST(update_run, "run_id, status=None, end_time=None, run_name=None",
         "Changes what is given (None keeps the stored value); run_name also sets the\n"
         "mlflow.runName tag. Returns False if dropped."),
    FAST(end_run, "run_id, status='FINISHED', end_time=None",
         "Sets the run's status and end time (epoch ms, default now). Returns False if dropped."),
    FAST(flush, "timeout=None",
         "Returns True once everything logged before the call is committed (or rejected\n"
         "and reported), False after timeout seconds (None: no limit). Waits with the GIL\n"
         "released; Ctrl-C interrupts it."),
    {"stats", (PyCFunction)Client_stats, METH_NOARGS,
     PyDoc_STR("stats($self)\n--\n\nThe client's counters as a dict: queued, sent, dropped "
               "(buffer full),\nlost (in flight when a connection broke), errors, errors_lost, "
               "reconnects, buffered_bytes, connected.")},
    {"errors", (PyCFunction)Client_errors, METH_NOARGS,
     PyDoc_STR("errors($self)\n--\n\nRemoves and returns the errors the agent reported, as "
               "a list of\n(seq, code, message).")},
    FAST(backend_uri, "timeout=5.0",
         "The MLflow backend store URI the agent announces, or None if it announces\n"
         "none or no agent answers within timeout seconds."),
    FAST(close, "timeout=5.0",
         "Flushes for up to timeout seconds (None: no limit), stops the sender and\n"
         "releases the client. In a forked child it only forgets the parent's client."),
    {"__enter__", (PyCFunction)Client_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Client_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Client_getset[] = {{"closed", (getter)Client_get_closed, NULL,
                                       PyDoc_STR("True once closed (or in a forked child)"), NULL},
                                      {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject ClientType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "trackd._trackd.Client",
    .tp_basicsize = sizeof(ClientObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = PyDoc_STR(
        "Client(socket=None, buffer_bytes=0, overflow='drop', block_timeout_ms=0, "
        "source_name=None, source_type=None, context_tags=True)\n--\n\n"
        "A connection to the trackd agent. socket=None uses $TRACKD_SOCKET, else "
        "/run/trackd/trackd.sock; buffer_bytes=0 means 16 MiB; overflow 'drop' drops the "
        "newest event when the buffer is full, 'block' waits up to block_timeout_ms first; "
        "context_tags=False: the agent adds no mlflow.user / mlflow.source.* tags to runs. "
        "Thread-safe."),
    .tp_new = Client_new,
    .tp_init = (initproc)Client_init,
    .tp_dealloc = (destructor)Client_dealloc,
    .tp_methods = Client_methods,
    .tp_getset = Client_getset,
};

/* ---- module ---------------------------------------------------------------------- */

static PyObject *mod_new_run_id(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    char id[TRACKD_RUN_ID_SIZE];
    int rc = trackd_new_run_id(id);
    if (rc != 0)
        return result(rc, NULL);
    return PyUnicode_FromStringAndSize(id, TRACKD_RUN_ID_SIZE - 1);
}

static PyMethodDef module_methods[] = {
    {"new_run_id", mod_new_run_id, METH_NOARGS,
     PyDoc_STR("new_run_id($module)\n--\n\nA new run id: 32 lower-case hex characters, like "
               "MLflow's.")},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "trackd._trackd",
    .m_doc = PyDoc_STR("CPython binding of libtrackd, the trackd client library."),
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__trackd(void)
{
    static int atfork_registered;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, on_fork_child) != 0)
            return PyErr_NoMemory();
        atfork_registered = 1;
    }
    if (PyType_Ready(&ClientType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ClientType);
    if (PyModule_AddObject(m, "Client", (PyObject *)&ClientType) != 0 ||
        PyModule_AddStringConstant(m, "__version__", TRACKD_VERSION) != 0 ||
        PyModule_AddStringConstant(m, "DEFAULT_SOCKET", TRACKD_DEFAULT_SOCKET) != 0) {
        Py_DECREF(&ClientType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
