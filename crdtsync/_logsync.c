/* crdtsync._logsync: a thread of its own that runs fdatasync without ever taking the GIL.
 *
 * SQLiteWorker.durable makes the commits that ran on the event loop's thread durable by
 * syncing SQLite's write-ahead log in another thread. Done by a Python thread, every sync
 * cost that thread the GIL several times (woken from its queue, around fdatasync, to hand
 * the result back), each time taken from the busy event loop: a futex wake-up and a forced
 * switch, about 3 % of a busy server's CPU. This thread never touches a Python object:
 *
 * - LogSyncer(fd) starts it; the syncer owns fd from then on (set_fd replaces it, close and
 *   the deallocator close it).
 * - request() asks for a round and returns its number (1, 2, ...). A round starts after the
 *   request, so it covers every write made before the request; requests made while a round
 *   runs share the next one.
 * - After each round the thread adds 1 to an eventfd (fileno()), which the event loop
 *   watches; collect() then returns (finished, failures, failed_from, failed_to): every
 *   round up to `finished` is done, `failures` counts the rounds that failed so far, and the
 *   last of them covered the requests failed_from < n <= failed_to (errno in `error`).
 * - close() lets the rounds already requested finish, stops the thread and closes the file.
 *
 * Linux only (eventfd, fdatasync); elsewhere the module is not built and the Python thread
 * does the work (crdtsync._sqlite_worker._LogSync).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __linux__
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    int running;              /* the thread was started and not yet joined */
    int stopping;
    int fd;                   /* the file each round syncs; -1 after close */
    int retired;              /* a replaced fd in use by the running round, else -1 */
    int busy;                 /* a round is running */
    int efd;                  /* the eventfd; -1 once closed */
    unsigned long long requested, finished, failures, failed_from, failed_to;
    int error;
} LogSyncer;

static void *syncer_main(void *arg) {
    LogSyncer *s = (LogSyncer *)arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->finished == s->requested && !s->stopping)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->finished == s->requested)
            break; /* stopping, and every round requested is done */
        unsigned long long from = s->finished, to = s->requested;
        int fd = s->fd;
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);
        int err = fdatasync(fd) == 0 ? 0 : errno;
        pthread_mutex_lock(&s->mu);
        s->busy = 0;
        if (s->retired >= 0) { /* replaced while this round used it */
            close(s->retired);
            s->retired = -1;
        }
        if (err) {
            s->failures++;
            s->failed_from = from;
            s->failed_to = to;
            s->error = err;
        }
        s->finished = to;
        uint64_t one = 1;
        ssize_t written = write(s->efd, &one, sizeof one);
        (void)written; /* the counter cannot overflow here; collect() reads the counts */
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int syncer_init(PyObject *self, PyObject *args, PyObject *kwds) {
    LogSyncer *s = (LogSyncer *)self;
    static char *kwlist[] = {"fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:LogSyncer", kwlist, &fd))
        return -1;
    if (s->running || s->efd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "LogSyncer is already initialised");
        return -1;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
        return -1;
    }
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->fd = fd;
    int rc = pthread_create(&s->thread, NULL, syncer_main, s);
    if (rc != 0) {
        close(s->efd);
        s->efd = -1;
        s->fd = -1;
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->running = 1;
    return 0;
}

static PyObject *syncer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    LogSyncer *s = (LogSyncer *)type->tp_alloc(type, 0);
    if (!s)
        return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->fd = s->retired = s->efd = -1;
    return (PyObject *)s;
}

/* Stop the thread after the rounds requested and close the file; the eventfd stays open
 * until the deallocator, so that a last collect() still works. */
static void syncer_stop(LogSyncer *s) {
    if (s->running) {
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(s->thread, NULL);
        Py_END_ALLOW_THREADS
        s->running = 0;
    }
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
}

static void syncer_dealloc(PyObject *self) {
    LogSyncer *s = (LogSyncer *)self;
    syncer_stop(s);
    if (s->efd >= 0)
        close(s->efd);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    Py_TYPE(self)->tp_free(self);
}

static int syncer_open(LogSyncer *s) {
    if (s->running && !s->stopping)
        return 1;
    PyErr_SetString(PyExc_ValueError, "the LogSyncer is closed");
    return 0;
}

static PyObject *syncer_request(PyObject *self, PyObject *unused) {
    LogSyncer *s = (LogSyncer *)self;
    if (!syncer_open(s))
        return NULL;
    pthread_mutex_lock(&s->mu);
    unsigned long long round = ++s->requested;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return PyLong_FromUnsignedLongLong(round);
}

static PyObject *syncer_collect(PyObject *self, PyObject *unused) {
    LogSyncer *s = (LogSyncer *)self;
    if (s->efd >= 0) {
        uint64_t count;
        ssize_t got = read(s->efd, &count, sizeof count); /* non-blocking: drains it */
        (void)got;
    }
    pthread_mutex_lock(&s->mu);
    unsigned long long finished = s->finished, failures = s->failures;
    unsigned long long from = s->failed_from, to = s->failed_to;
    int error = s->error;
    pthread_mutex_unlock(&s->mu);
    return Py_BuildValue("(KKKKi)", finished, failures, from, to, error);
}

static PyObject *syncer_set_fd(PyObject *self, PyObject *arg) {
    LogSyncer *s = (LogSyncer *)self;
    int fd = _PyLong_AsInt(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
        return NULL;
    }
    if (!syncer_open(s))
        return NULL;
    pthread_mutex_lock(&s->mu);
    int old = s->fd;
    s->fd = fd;
    if (s->busy && s->retired < 0) {
        s->retired = old; /* the running round closes it when it is done */
        old = -1;
    }
    pthread_mutex_unlock(&s->mu);
    if (old >= 0)
        close(old);
    Py_RETURN_NONE;
}

static PyObject *syncer_close(PyObject *self, PyObject *unused) {
    syncer_stop((LogSyncer *)self);
    Py_RETURN_NONE;
}

static PyObject *syncer_fileno(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(((LogSyncer *)self)->efd);
}

static PyObject *syncer_get_fd(PyObject *self, void *closure) {
    return PyLong_FromLong(((LogSyncer *)self)->fd);
}

static PyMethodDef syncer_methods[] = {
    {"request", syncer_request, METH_NOARGS,
     "request() -> n: ask for a round of fdatasync; rounds up to n cover every write made "
     "before this call."},
    {"collect", syncer_collect, METH_NOARGS,
     "collect() -> (finished, failures, failed_from, failed_to, errno), draining fileno()."},
    {"set_fd", syncer_set_fd, METH_O,
     "set_fd(fd): sync fd from the next round on; the syncer owns it, and closes the "
     "one it replaces once no round uses it."},
    {"close", syncer_close, METH_NOARGS,
     "close(): finish the rounds requested, stop the thread, close the file."},
    {"fileno", syncer_fileno, METH_NOARGS,
     "fileno() -> the eventfd that counts the rounds done (watch it for reading)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef syncer_getset[] = {
    {"fd", syncer_get_fd, NULL, "The file synced (-1 once closed).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LogSyncerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crdtsync._logsync.LogSyncer",
    .tp_basicsize = sizeof(LogSyncer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thread that runs fdatasync(fd) in rounds, without the GIL (see the source).",
    .tp_new = syncer_new,
    .tp_init = syncer_init,
    .tp_dealloc = syncer_dealloc,
    .tp_methods = syncer_methods,
    .tp_getset = syncer_getset,
};
#endif /* __linux__ */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "crdtsync._logsync",
    "fdatasync in a thread that never takes the GIL (see the source).", -1, NULL,
};

PyMODINIT_FUNC PyInit__logsync(void) {
#ifdef __linux__
    if (PyType_Ready(&LogSyncerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&LogSyncerType);
    if (PyModule_AddObject(m, "LogSyncer", (PyObject *)&LogSyncerType) < 0) {
        Py_DECREF(&LogSyncerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
#else
    PyErr_SetString(PyExc_ImportError, "crdtsync._logsync is built on Linux only");
    return NULL;
#endif
}
