/* crdtsync._speedups: optional C versions of two checks the server runs on every sync,
 * and a setter of record slots.
 *
 * The pure-Python modules are the reference and stay complete: crdtsync.yupdate (the
 * bounded reader of Yjs v1 updates) and crdtsync.values (the value checks). This file only
 * speeds up their accepting path:
 *
 * - read_update(data) returns (structs, starts, ends, refs, skips), the fields of
 *   yupdate.UpdateInfo (refs as yupdate.outside_refs leaves them), for an update the
 *   Python reader accepts, and None for anything
 *   else: the caller then runs the Python reader, which raises the typed error with its
 *   message and detail. So errors have one implementation.
 * - parse_state_vector(data, max_entries) returns what crdtsync.protocol.parse_state_vector
 *   returns for a state vector it accepts, and None for anything else (the same pattern).
 * - valid(value, max_int, depth, allow_bytes) and event_body_ok(value) return exactly what
 *   values._valid and values.event_body_ok return (False means "ask the full check").
 *
 * - slot_filler(cls, names) returns a callable that sets the named slots of an instance of
 *   cls, a frozen dataclass with slots: filler(obj, v0, v1, ...) stores each value in its
 *   slot as the slot's own descriptor would (crdtsync._fastinit: the __init__ of the records
 *   built on every sync). Offsets come from cls's own member descriptors, checked when the
 *   filler is made; every call checks obj's type and the number of values.
 *
 * Hostile bytes: every read checks the bytes that remain first; no count declared by the
 * input is allocated from; recursion is bounded by MAX_DEPTH (32). tests/test_speedups.py
 * checks both checks against the Python reference on random, real and mutated input,
 * and the slot filler's refusals and reference counts.
 * Build with CRDTSYNC_NO_EXTENSIONS=1 set to leave this module out (setup.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 32
#define MAX_KEY_LENGTH 256
#define MAX_CLIENT ((uint64_t)9007199254740991ULL) /* 2**53 - 1 */
#define MAX_CLOCK ((uint64_t)4294967295ULL)        /* 2**32 - 1 */
#define MAX_SAFE_INTEGER ((uint64_t)9007199254740991ULL)

enum { GC = 0, DELETED = 1, JSON = 2, BINARY = 3, STRING = 4, EMBED = 5, FORMAT = 6,
       TYPE = 7, ANY = 8, DOC = 9, SKIP = 10 };

/* --- small hash maps: client -> item runs, (client, clock) -> type level ------------- */

typedef struct {
    uint64_t clock;
    uint64_t end;
    int level;
} Place;

typedef struct {
    uint64_t client;
    int used;
    Place *places; /* in read order (the first clock of each item) */
    Py_ssize_t count, capacity;
} Run;

typedef struct {
    Run *slots;
    size_t mask;
    size_t used;
} Runs;

typedef struct {
    uint64_t client, clock;
    int level; /* 0: empty slot (a type's level is at least 1) */
} TypeSlot;

typedef struct {
    TypeSlot *slots;
    size_t mask;
    size_t used;
} Types;

static uint64_t seed_a = 0x9E3779B97F4A7C15ULL, seed_b = 0x632BE59BD9B4E019ULL;
/* Set from os.urandom when the module loads: ids chosen to collide in one process's tables
 * cannot be computed in advance. */

static size_t mix(uint64_t a, uint64_t b) {
    uint64_t h = (a ^ seed_a) * 0x9E3779B97F4A7C15ULL ^ (b + seed_b + (a << 6));
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 32;
    return (size_t)h;
}

static int runs_init(Runs *m) {
    m->mask = 7;
    m->used = 0;
    m->slots = PyMem_Calloc(m->mask + 1, sizeof(Run));
    return m->slots ? 0 : -1;
}

static void runs_free(Runs *m) {
    if (!m->slots)
        return;
    for (size_t i = 0; i <= m->mask; i++)
        PyMem_Free(m->slots[i].places);
    PyMem_Free(m->slots);
    m->slots = NULL;
}

static Run *runs_find(Runs *m, uint64_t client) {
    for (size_t i = mix(client, 0) & m->mask;; i = (i + 1) & m->mask) {
        Run *r = &m->slots[i];
        if (!r->used)
            return NULL;
        if (r->client == client)
            return r;
    }
}

static Run *runs_get(Runs *m, uint64_t client) {
    Run *found = runs_find(m, client);
    if (found)
        return found;
    if ((m->used + 1) * 2 > m->mask + 1) { /* grow: keep the load under a half */
        size_t old_mask = m->mask;
        Run *old = m->slots;
        Run *slots = PyMem_Calloc(old_mask * 2 + 2, sizeof(Run));
        if (!slots)
            return NULL;
        m->slots = slots;
        m->mask = old_mask * 2 + 1;
        for (size_t i = 0; i <= old_mask; i++) {
            if (!old[i].used)
                continue;
            size_t j = mix(old[i].client, 0) & m->mask;
            while (m->slots[j].used)
                j = (j + 1) & m->mask;
            m->slots[j] = old[i];
        }
        PyMem_Free(old);
    }
    size_t i = mix(client, 0) & m->mask;
    while (m->slots[i].used)
        i = (i + 1) & m->mask;
    Run *r = &m->slots[i];
    r->used = 1;
    r->client = client;
    m->used++;
    return r;
}

static int run_append(Run *r, uint64_t clock, uint64_t end, int level) {
    if (r->count == r->capacity) {
        Py_ssize_t capacity = r->capacity ? r->capacity * 2 : 8;
        Place *places = PyMem_Realloc(r->places, (size_t)capacity * sizeof(Place));
        if (!places)
            return -1;
        r->places = places;
        r->capacity = capacity;
    }
    r->places[r->count++] = (Place){clock, end, level};
    return 0;
}

static int types_init(Types *m) {
    m->mask = 7;
    m->used = 0;
    m->slots = PyMem_Calloc(m->mask + 1, sizeof(TypeSlot));
    return m->slots ? 0 : -1;
}

static int types_get(const Types *m, uint64_t client, uint64_t clock) {
    for (size_t i = mix(client, clock) & m->mask;; i = (i + 1) & m->mask) {
        const TypeSlot *s = &m->slots[i];
        if (!s->level)
            return 0;
        if (s->client == client && s->clock == clock)
            return s->level;
    }
}

static int types_put(Types *m, uint64_t client, uint64_t clock, int level) {
    if ((m->used + 1) * 2 > m->mask + 1) {
        size_t old_mask = m->mask;
        TypeSlot *old = m->slots;
        TypeSlot *slots = PyMem_Calloc(old_mask * 2 + 2, sizeof(TypeSlot));
        if (!slots)
            return -1;
        m->slots = slots;
        m->mask = old_mask * 2 + 1;
        m->used = 0;
        for (size_t i = 0; i <= old_mask; i++)
            if (old[i].level)
                types_put(m, old[i].client, old[i].clock, old[i].level);
        PyMem_Free(old);
    }
    for (size_t i = mix(client, clock) & m->mask;; i = (i + 1) & m->mask) {
        TypeSlot *s = &m->slots[i];
        if (!s->level) {
            *s = (TypeSlot){client, clock, level};
            m->used++;
            return 0;
        }
        if (s->client == client && s->clock == clock) { /* as dict assignment: replace */
            s->level = level;
            return 0;
        }
    }
}

/* The ids an update's items build on (origins, right origins, parents), in read order with
 * repeats. Kept as plain pairs while reading: most of them lie inside the update's own runs
 * and are dropped at the end (refs_outside) without ever becoming Python objects. Each one
 * consumed at least two bytes of input, so their number is bounded by the update's size. */
typedef struct {
    uint64_t client, clock;
} Ref;

typedef struct {
    Ref *items;
    size_t count, capacity;
} Refs;

static int refs_append(Refs *m, uint64_t client, uint64_t clock) {
    if (m->count == m->capacity) {
        size_t capacity = m->capacity ? m->capacity * 2 : 16;
        Ref *items = PyMem_Realloc(m->items, capacity * sizeof(Ref));
        if (!items)
            return -1;
        m->items = items;
        m->capacity = capacity;
    }
    m->items[m->count++] = (Ref){client, clock};
    return 0;
}

/* --- the reader ------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *data;
    Py_ssize_t len;
    Py_ssize_t pos;
    Runs runs;
    Types types;
    Refs refs;
} Reader;

/* Return codes of the reading functions: OK, REFUSED (the Python reader raises: let it say
 * why), or FAILED (a Python exception is set: memory). */
#define OK 0
#define REFUSED 1
#define FAILED (-1)

static int uint_read(Reader *r, uint64_t maximum, uint64_t *out) {
    /* A lib0 varuint at most ``maximum`` (which is below 2**53); as _uint/_uint_tail: the
     * first four bytes unchecked (28 bits), then a check after each byte. An over-long
     * encoding whose extra bytes carry zero bits is read as the Python reader reads it. */
    uint64_t value = 0;
    int shift = 0;
    for (;;) {
        if (r->pos >= r->len)
            return REFUSED;
        unsigned byte = r->data[r->pos++];
        uint64_t bits = byte & 0x7F;
        if (shift < 53)
            value |= bits << shift;
        else if (bits)
            return REFUSED; /* above 2**53 - 1, so above any maximum */
        if (shift >= 28 && value > maximum)
            return REFUSED;
        if (byte < 0x80)
            break;
        shift += 7;
    }
    *out = value; /* below 2**28 when shorter than five bytes: under every maximum */
    return OK;
}

static int count_read(Reader *r, uint64_t least_bytes, uint64_t *out) {
    uint64_t value;
    if (uint_read(r, MAX_CLIENT, &value) != OK)
        return REFUSED;
    if (value * least_bytes > (uint64_t)(r->len - r->pos))
        return REFUSED;
    *out = value;
    return OK;
}

static int id_read(Reader *r, uint64_t *client, uint64_t *clock) {
    if (uint_read(r, MAX_CLIENT, client) != OK || uint_read(r, MAX_CLOCK, clock) != OK)
        return REFUSED;
    return OK;
}

static int add_ref(Reader *r, uint64_t client, uint64_t clock) {
    if (refs_append(&r->refs, client, clock) < 0) {
        PyErr_NoMemory();
        return FAILED;
    }
    return OK;
}

/* ``(client, clock)`` into ``set``. The tuple is built item by item: ``Py_BuildValue``
 * parses its format string at every call, which cost more than the tuple (about 2,000
 * instructions per reference). */
static int set_add_id(PyObject *set, uint64_t client, uint64_t clock) {
    PyObject *id = PyTuple_New(2);
    if (!id)
        return -1;
    PyObject *a = PyLong_FromUnsignedLongLong(client);
    PyObject *b = a ? PyLong_FromUnsignedLongLong(clock) : NULL;
    if (!b) {
        Py_XDECREF(a);
        Py_DECREF(id);
        return -1;
    }
    PyTuple_SET_ITEM(id, 0, a);
    PyTuple_SET_ITEM(id, 1, b);
    int status = PySet_Add(set, id);
    Py_DECREF(id);
    return status;
}

/* The set of ``refs`` at or after their client's end in ``ends`` (0 for a client the update
 * does not hold): yupdate.outside_refs. An id below that end is an item of the update
 * itself, or one the receiver must hold for the update's run to begin where it does, which
 * ``UpdateInfo.missing`` checks through ``starts``: it can never be the missing one. */
static PyObject *refs_outside(const Refs *refs, PyObject *ends) {
    PyObject *set = PySet_New(NULL);
    uint64_t client = 0, end = 0;
    int looked = 0;
    for (size_t i = 0; set && i < refs->count; i++) {
        Ref ref = refs->items[i];
        if (!looked || ref.client != client) { /* refs come in runs of one client */
            PyObject *key = PyLong_FromUnsignedLongLong(ref.client);
            PyObject *value = key ? PyDict_GetItemWithError(ends, key) : NULL;
            Py_XDECREF(key);
            if (!value && (!key || PyErr_Occurred()))
                goto failed;
            end = value ? PyLong_AsUnsignedLongLong(value) : 0;
            if (end == (uint64_t)-1 && PyErr_Occurred())
                goto failed;
            client = ref.client;
            looked = 1;
        }
        if (ref.clock >= end && set_add_id(set, ref.client, ref.clock) < 0)
            goto failed;
    }
    return set;
failed:
    Py_DECREF(set);
    return NULL;
}

/* A lib0 string: its UTF-8 byte length (bounded by the bytes that remain), the bytes, which
 * must decode strictly. ``*chars`` gets its length in code points, ``*units`` (if not
 * NULL) in UTF-16 code units. */
static int string_read(Reader *r, Py_ssize_t *chars, Py_ssize_t *units) {
    uint64_t size;
    if (count_read(r, 1, &size) != OK)
        return REFUSED;
    const unsigned char *s = r->data + r->pos;
    Py_ssize_t n = (Py_ssize_t)size;
    r->pos += n;
    Py_ssize_t i = 0;
    while (i < n && s[i] < 0x80)
        i++;
    if (i == n) { /* ASCII */
        *chars = n;
        if (units)
            *units = n;
        return OK;
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    if (!text) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return FAILED;
        PyErr_Clear();
        return REFUSED;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    *chars = length;
    if (units) {
        Py_ssize_t extra = 0;
        if (PyUnicode_KIND(text) == PyUnicode_4BYTE_KIND) {
            const Py_UCS4 *u = PyUnicode_4BYTE_DATA(text);
            for (Py_ssize_t k = 0; k < length; k++)
                extra += u[k] > 0xFFFF;
        }
        *units = length + extra;
    }
    Py_DECREF(text);
    return OK;
}

static int key_read(Reader *r) {
    Py_ssize_t chars;
    int status = string_read(r, &chars, NULL);
    if (status != OK)
        return status;
    return chars > 0 && chars <= MAX_KEY_LENGTH ? OK : REFUSED;
}

static int any_read(Reader *r, int depth) {
    if (depth > MAX_DEPTH)
        return REFUSED;
    if (r->pos >= r->len)
        return REFUSED;
    unsigned tag = r->data[r->pos++];
    if (tag == 125) { /* a signed lib0 varint (sign in bit 6): a safe integer */
        if (r->pos >= r->len)
            return REFUSED;
        unsigned byte = r->data[r->pos++];
        uint64_t value = byte & 0x3F;
        int shift = 6;
        while (byte & 0x80) {
            if (r->pos >= r->len)
                return REFUSED;
            byte = r->data[r->pos++];
            uint64_t bits = byte & 0x7F;
            if (shift <= 56)
                value |= bits << shift;
            else if (bits)
                return REFUSED; /* at least 2**57: above MAX_SAFE_INTEGER */
            shift += 7;
            if (shift > 70)
                return REFUSED; /* over-long */
        }
        return value > MAX_SAFE_INTEGER ? REFUSED : OK;
    }
    if (tag == 123 || tag == 124) {
        Py_ssize_t size = tag == 123 ? 8 : 4;
        if (r->pos + size > r->len)
            return REFUSED;
        const unsigned char *p = r->data + r->pos;
        double number;
        if (size == 8) {
            uint64_t bits = 0;
            for (int k = 0; k < 8; k++)
                bits = bits << 8 | p[k];
            memcpy(&number, &bits, 8);
        } else {
            uint32_t bits = 0;
            for (int k = 0; k < 4; k++)
                bits = bits << 8 | p[k];
            float f;
            memcpy(&f, &bits, 4);
            number = f;
        }
        if (!isfinite(number))
            return REFUSED;
        r->pos += size;
        return OK;
    }
    if (tag == 119) {
        Py_ssize_t chars;
        return string_read(r, &chars, NULL);
    }
    if (tag == 126 || tag == 121 || tag == 120)
        return OK;
    if (tag == 118) {
        uint64_t entries;
        if (count_read(r, 2, &entries) != OK)
            return REFUSED;
        for (uint64_t k = 0; k < entries; k++) {
            int status = key_read(r);
            if (status != OK)
                return status;
            if ((status = any_read(r, depth + 1)) != OK)
                return status;
        }
        return OK;
    }
    if (tag == 117) {
        uint64_t items;
        if (count_read(r, 1, &items) != OK)
            return REFUSED;
        for (uint64_t k = 0; k < items; k++) {
            int status = any_read(r, depth + 1);
            if (status != OK)
                return status;
        }
        return OK;
    }
    return REFUSED;
}

/* The content of item (client, clock) at parent level ``level``; ``*length`` its clocks. */
static int content_read(Reader *r, int kind, int level, uint64_t client, uint64_t clock,
                        uint64_t *length) {
    int status;
    if (kind == ANY) {
        uint64_t n;
        if (uint_read(r, MAX_CLIENT, &n) != OK || n > (uint64_t)(r->len - r->pos))
            return REFUSED;
        for (uint64_t k = 0; k < n; k++)
            if ((status = any_read(r, level + 1)) != OK)
                return status;
        *length = n;
        return OK;
    }
    if (kind == STRING) {
        Py_ssize_t chars, units;
        if ((status = string_read(r, &chars, &units)) != OK)
            return status;
        *length = (uint64_t)units;
        return OK;
    }
    if (kind == DELETED)
        return uint_read(r, MAX_CLOCK, length);
    if (kind == TYPE) {
        uint64_t ref;
        if (uint_read(r, MAX_CLIENT, &ref) != OK || ref > 2 || level + 1 > MAX_DEPTH)
            return REFUSED;
        if (types_put(&r->types, client, clock, level + 1) < 0) {
            PyErr_NoMemory();
            return FAILED;
        }
        *length = 1;
        return OK;
    }
    return REFUSED;
}

/* Explicit parent info: a root name or a type's id, then the map key if ``has_key``. */
static int parent_read(Reader *r, int has_key, int *level) {
    uint64_t form;
    int status;
    if (uint_read(r, MAX_CLIENT, &form) != OK)
        return REFUSED;
    if (form == 1) {
        Py_ssize_t chars;
        if ((status = string_read(r, &chars, NULL)) != OK)
            return status;
        if (chars < 1 || chars > MAX_KEY_LENGTH)
            return REFUSED;
        *level = 0;
    } else {
        uint64_t client, clock;
        if (id_read(r, &client, &clock) != OK)
            return REFUSED;
        if (add_ref(r, client, clock) != OK)
            return FAILED;
        int known = types_get(&r->types, client, clock);
        *level = known ? known : 1;
    }
    if (!has_key)
        return *level == 0 ? REFUSED : OK;
    return key_read(r);
}

/* The level of an item placed next to ``(client, clock)``, as _UpdateReader._inherit. */
static int inherit(Reader *r, uint64_t client, uint64_t clock) {
    Run *run = runs_find(&r->runs, client);
    if (!run || !run->count)
        return 0;
    Py_ssize_t lo = 0, hi = run->count; /* bisect_right over the first clocks */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (clock < run->places[mid].clock)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo - 1 >= 0 && clock < run->places[lo - 1].end)
        return run->places[lo - 1].level;
    return 0;
}

static int set_int(PyObject *dict, uint64_t key, uint64_t value, int only_new) {
    PyObject *k = PyLong_FromUnsignedLongLong(key);
    PyObject *v = k ? PyLong_FromUnsignedLongLong(value) : NULL;
    int status = -1;
    if (v) {
        if (only_new) {
            PyObject *got = PyDict_SetDefault(dict, k, v);
            status = got ? 0 : -1;
        } else {
            status = PyDict_SetItem(dict, k, v);
        }
    }
    Py_XDECREF(k);
    Py_XDECREF(v);
    return status;
}

static int structs_read(Reader *r, PyObject *starts, PyObject *ends, uint64_t *total,
                        int *skips) {
    uint64_t clients;
    int status;
    if (count_read(r, 3, &clients) != OK)
        return REFUSED;
    for (uint64_t c = 0; c < clients; c++) {
        uint64_t structs, client, clock;
        if (count_read(r, 1, &structs) != OK || uint_read(r, MAX_CLIENT, &client) != OK
            || uint_read(r, MAX_CLOCK, &clock) != OK)
            return REFUSED;
        if (set_int(starts, client, clock, 1) < 0)
            return FAILED;
        if (!runs_get(&r->runs, client)) {
            PyErr_NoMemory();
            return FAILED;
        }
        *total += structs;
        for (uint64_t s = 0; s < structs; s++) {
            if (r->pos >= r->len)
                return REFUSED;
            unsigned head = r->data[r->pos++];
            int kind = head & 0x1F;
            uint64_t length;
            if (kind == GC || kind == SKIP) {
                if (uint_read(r, MAX_CLOCK, &length) != OK)
                    return REFUSED;
                *skips |= kind == SKIP;
            } else {
                int level;
                if (head & 0xC0) {
                    uint64_t n_client, n_clock;
                    if (id_read(r, &n_client, &n_clock) != OK)
                        return REFUSED;
                    if (add_ref(r, n_client, n_clock) != OK)
                        return FAILED;
                    if ((head & 0xC0) == 0xC0) {
                        uint64_t o_client, o_clock;
                        if (id_read(r, &o_client, &o_clock) != OK)
                            return REFUSED;
                        if (add_ref(r, o_client, o_clock) != OK)
                            return FAILED;
                    }
                    level = inherit(r, n_client, n_clock);
                } else if ((status = parent_read(r, head & 0x20, &level)) != OK) {
                    return status;
                }
                if ((status = content_read(r, kind, level, client, clock, &length)) != OK)
                    return status;
                /* looked up again: runs_get may have moved the runs since */
                if (run_append(runs_find(&r->runs, client), clock, clock + length, level) < 0) {
                    PyErr_NoMemory();
                    return FAILED;
                }
            }
            if (length < 1 || clock + length > MAX_CLOCK + 1)
                return REFUSED;
            clock += length;
        }
        if (set_int(ends, client, clock, 0) < 0)
            return FAILED;
    }
    return OK;
}

static int delete_set_read(Reader *r) {
    uint64_t clients;
    if (count_read(r, 2, &clients) != OK)
        return REFUSED;
    for (uint64_t c = 0; c < clients; c++) {
        uint64_t client, ranges;
        if (uint_read(r, MAX_CLIENT, &client) != OK || count_read(r, 2, &ranges) != OK)
            return REFUSED;
        for (uint64_t k = 0; k < ranges; k++) {
            uint64_t start, length;
            if (uint_read(r, MAX_CLOCK, &start) != OK || uint_read(r, MAX_CLOCK, &length) != OK
                || start + length > MAX_CLOCK + 1)
                return REFUSED;
        }
    }
    return OK;
}

static PyObject *read_update(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Reader r = {view.buf, view.len, 0, {0}, {0}, {0}};
    PyObject *starts = PyDict_New(), *ends = PyDict_New(), *refs = NULL, *result = NULL;
    uint64_t total = 0;
    int skips = 0, status = FAILED;
    if (starts && ends && runs_init(&r.runs) == 0 && types_init(&r.types) == 0) {
        status = structs_read(&r, starts, ends, &total, &skips);
        if (status == OK)
            status = delete_set_read(&r);
        if (status == OK && r.pos != r.len)
            status = REFUSED;
    } else if (!PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    if (status == OK && (refs = refs_outside(&r.refs, ends)) != NULL)
        result = Py_BuildValue("(KOOOO)", (unsigned long long)total, starts, ends, refs,
                               skips ? Py_True : Py_False);
    else if (status == REFUSED)
        result = Py_NewRef(Py_None);
    runs_free(&r.runs);
    PyMem_Free(r.types.slots);
    Py_XDECREF(starts);
    Py_XDECREF(ends);
    PyMem_Free(r.refs.items);
    Py_XDECREF(refs);
    PyBuffer_Release(&view);
    return result;
}

/* --- state vectors ---------------------------------------------------------------------- */

#define SV_MAX_VARUINT_BYTES 10
/* As the Python parser: a number of more bytes is over-long (refused), whatever its bits; a
 * zero-padded one of at most ten bytes is read (uint_read refuses bits above 2**53). */

static int sv_uint_read(Reader *r, uint64_t maximum, uint64_t *out) {
    Py_ssize_t start = r->pos;
    if (uint_read(r, maximum, out) != OK || r->pos - start > SV_MAX_VARUINT_BYTES)
        return REFUSED;
    return OK;
}

static int sv_read(Reader *r, long long max_entries, PyObject *clocks) {
    uint64_t count, client, clock;
    if (sv_uint_read(r, MAX_CLIENT, &count) != OK || count > (uint64_t)max_entries)
        return REFUSED;
    for (uint64_t i = 0; i < count; i++) { /* each entry takes two bytes: the input bounds i */
        if (sv_uint_read(r, MAX_CLIENT, &client) != OK
                || sv_uint_read(r, MAX_CLOCK, &clock) != OK)
            return REFUSED;
        PyObject *key = PyLong_FromUnsignedLongLong(client);
        PyObject *value = key ? PyLong_FromUnsignedLongLong(clock) : NULL;
        int status = value ? PyDict_Contains(clocks, key) : -1;
        if (status == 0)
            status = PyDict_SetItem(clocks, key, value) < 0 ? -1 : 0;
        else if (status == 1)
            status = 2; /* a repeated client: refused */
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (status < 0)
            return FAILED;
        if (status == 2)
            return REFUSED;
    }
    return r->pos == r->len ? OK : REFUSED;
}

static PyObject *parse_state_vector(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_state_vector(data, max_entries)");
        return NULL;
    }
    long long max_entries = PyLong_AsLongLong(args[1]);
    if (max_entries == -1 && PyErr_Occurred())
        return NULL;
    if (max_entries < 0) {
        PyErr_SetString(PyExc_ValueError, "max_entries must not be negative");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Reader r = {view.buf, view.len, 0, {0}, {0}, {0}};
    PyObject *clocks = PyDict_New();
    int status = clocks ? sv_read(&r, max_entries, clocks) : FAILED;
    PyBuffer_Release(&view);
    if (status == OK)
        return clocks;
    Py_XDECREF(clocks);
    return status == REFUSED ? Py_NewRef(Py_None) : NULL;
}

/* --- value checks --------------------------------------------------------------------- */

#define MAX_EVENT_INT 9223372036854775807LL /* 2**63 - 1 */

/* -max_int <= value <= max_int for an exact int (max_int at most 2**63 - 1). */
static int int_ok(PyObject *value, long long max_int) {
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow)
        return 0;
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return v >= -max_int && v <= max_int;
}

static int keys_ok(PyObject *dict) {
    Py_ssize_t i = 0;
    PyObject *key, *item;
    while (PyDict_Next(dict, &i, &key, &item)) {
        if (!PyUnicode_CheckExact(key))
            return 0;
        Py_ssize_t n = PyUnicode_GET_LENGTH(key);
        if (n < 1 || n > MAX_KEY_LENGTH)
            return 0;
    }
    return 1;
}

static int valid(PyObject *value, long long max_int, int depth, int allow_bytes);

/* The member loop of values._valid: scalars inline, containers one level down. */
static int member_ok(PyObject *item, long long max_int, int depth, int allow_bytes) {
    PyTypeObject *kind = Py_TYPE(item);
    if (kind == &PyFloat_Type)
        return isfinite(PyFloat_AS_DOUBLE(item));
    if (kind == &PyLong_Type)
        return int_ok(item, max_int);
    if (kind == &PyUnicode_Type || kind == &PyBool_Type || item == Py_None)
        return 1;
    return valid(item, max_int, depth + 1, allow_bytes);
}

static int valid(PyObject *value, long long max_int, int depth, int allow_bytes) {
    if (depth > MAX_DEPTH)
        return 0;
    PyTypeObject *kind = Py_TYPE(value);
    if (kind == &PyDict_Type) {
        if (!keys_ok(value))
            return 0;
        if (depth == MAX_DEPTH)
            return PyDict_GET_SIZE(value) == 0;
        Py_ssize_t i = 0;
        PyObject *key, *item;
        while (PyDict_Next(value, &i, &key, &item))
            if (!member_ok(item, max_int, depth, allow_bytes))
                return 0;
        return 1;
    }
    if (kind == &PyList_Type || kind == &PyTuple_Type) {
        if (depth == MAX_DEPTH)
            return Py_SIZE(value) == 0;
        /* no Python code runs while the items are checked: the list cannot change */
        for (Py_ssize_t i = 0; i < Py_SIZE(value); i++) {
            PyObject *item = kind == &PyList_Type ? PyList_GET_ITEM(value, i)
                                                  : PyTuple_GET_ITEM(value, i);
            if (!member_ok(item, max_int, depth, allow_bytes))
                return 0;
        }
        return 1;
    }
    if (kind == &PyUnicode_Type || kind == &PyBool_Type || value == Py_None)
        return 1;
    if (kind == &PyLong_Type)
        return int_ok(value, max_int);
    if (kind == &PyFloat_Type)
        return isfinite(PyFloat_AS_DOUBLE(value));
    return allow_bytes && kind == &PyBytes_Type;
}

static PyObject *py_valid(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "valid(value, max_int, depth, allow_bytes)");
        return NULL;
    }
    long long max_int = PyLong_AsLongLong(args[1]);
    long depth = PyLong_AsLong(args[2]);
    int allow_bytes = PyObject_IsTrue(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (max_int < 0 || depth < 0) {
        PyErr_SetString(PyExc_ValueError, "max_int and depth must not be negative");
        return NULL;
    }
    return PyBool_FromLong(valid(args[0], max_int, depth > MAX_DEPTH ? MAX_DEPTH + 1 : (int)depth,
                                 allow_bytes));
}

static PyObject *event_body_ok(PyObject *module, PyObject *value) {
    return PyBool_FromLong(valid(value, MAX_EVENT_INT, 0, 1));
}

/* --- slot_filler: set a record's slots in one call ----------------------------------- */

typedef struct {
    PyObject_VAR_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;
    Py_ssize_t offsets[1];
} SlotFiller;

static PyObject *filler_call(PyObject *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    SlotFiller *f = (SlotFiller *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyErr_SetString(PyExc_TypeError, "a slot filler takes no keyword arguments");
        return NULL;
    }
    if (nargs != Py_SIZE(f) + 1) {
        PyErr_Format(PyExc_TypeError, "a slot filler of %s takes %zd arguments (the object "
                     "and %zd values), not %zd", f->cls->tp_name, Py_SIZE(f) + 1, Py_SIZE(f),
                     nargs);
        return NULL;
    }
    PyObject *obj = args[0];
    if (!PyObject_TypeCheck(obj, f->cls)) {
        PyErr_Format(PyExc_TypeError, "a slot filler of %s cannot fill a %s",
                     f->cls->tp_name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < Py_SIZE(f); i++) {
        PyObject **slot = (PyObject **)((char *)obj + f->offsets[i]);
        PyObject *old = *slot;
        Py_INCREF(args[i + 1]);
        *slot = args[i + 1];
        Py_XDECREF(old);
    }
    Py_RETURN_NONE;
}

static int filler_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((SlotFiller *)self)->cls);
    return 0;
}

static void filler_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    Py_CLEAR(((SlotFiller *)self)->cls);
    PyObject_GC_Del(self);
}

static PyTypeObject SlotFillerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "crdtsync._speedups.SlotFiller",
    .tp_basicsize = offsetof(SlotFiller, offsets),
    .tp_itemsize = sizeof(Py_ssize_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(SlotFiller, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = filler_traverse,
    .tp_dealloc = filler_dealloc,
    .tp_doc = "filler(obj, *values): set obj's slots (see slot_filler).",
};

/* The offset of slot `name` of `cls`, from cls's own member descriptor: a writable object
 * slot (T_OBJECT_EX) of a type cls derives from. -1 with an exception otherwise. */
static Py_ssize_t slot_offset(PyTypeObject *cls, PyObject *name) {
    PyObject *descr = PyObject_GetAttr((PyObject *)cls, name);
    if (descr == NULL)
        return -1;
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDescrObject *member = (PyMemberDescrObject *)descr;
        PyMemberDef *def = member->d_member;
        if (def->type == T_OBJECT_EX && !(def->flags & READONLY)
                && PyType_IsSubtype(cls, PyDescr_TYPE(member)))
            offset = def->offset;
    }
    Py_DECREF(descr);
    if (offset < (Py_ssize_t)sizeof(PyObject))
        PyErr_Format(PyExc_TypeError, "%R is not a writable slot of %s", name, cls->tp_name);
    return offset < (Py_ssize_t)sizeof(PyObject) ? -1 : offset;
}

static PyObject *slot_filler(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "slot_filler(cls, names: tuple[str, ...])");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    PyObject *names = args[1];
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    SlotFiller *f = PyObject_GC_NewVar(SlotFiller, &SlotFillerType, n);
    if (f == NULL)
        return NULL;
    f->vectorcall = filler_call;
    f->cls = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "slot names must be strings");
            Py_DECREF(f);
            return NULL;
        }
        f->offsets[i] = slot_offset(cls, name);
        if (f->offsets[i] < 0) {
            Py_DECREF(f);
            return NULL;
        }
    }
    Py_INCREF(cls);
    f->cls = cls;
    PyObject_GC_Track(f);
    return (PyObject *)f;
}

/* --- decode_events: the entries of a sync's ``ev`` on the fast path ---------------------- */

/* decode_events(raw, max_body, topics, unpack, kwnames, kwvalues, filler) -> (events, consecutive)
 * or None. Every entry must be a list [seq, topic, time, data] that crdtsync.protocol's fast
 * path takes as it is: seq an int in 1..2**63-1, time an int in 0..2**63-1, topic a str in
 * ``topics`` (names already checked), data bytes of at most ``max_body`` whose body
 * ``unpack(data, **kw)`` decodes and the value check accepts. Each event is made as
 * ``object.__new__`` makes one and filled by ``filler`` (a slot filler of the event class).
 * None for anything else, with no exception: the caller decodes the whole list again in
 * Python, which gives the same events or names the fault. The entries' items are borrowed
 * across the ``unpack`` call: msgpack and the caller's ext_hook never reach ``raw``. */
static PyObject *decode_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7 || !PyList_CheckExact(args[0]) || !PyAnySet_Check(args[2])
            || !PyTuple_CheckExact(args[4]) || !PyTuple_CheckExact(args[5])
            || PyTuple_GET_SIZE(args[4]) != PyTuple_GET_SIZE(args[5])
            || !Py_IS_TYPE(args[6], &SlotFillerType) || Py_SIZE(args[6]) != 4) {
        PyErr_SetString(PyExc_TypeError, "decode_events(raw: list, max_body, topics: set, "
                        "unpack, kwnames: tuple, kwvalues: tuple, filler of 4 slots)");
        return NULL;
    }
    PyObject *raw = args[0], *topics = args[2], *unpack = args[3], *kwnames = args[4];
    PyObject *kwvalues = args[5];
    SlotFiller *fill = (SlotFiller *)args[6];
    Py_ssize_t max_body = PyLong_AsSsize_t(args[1]);
    if (max_body == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(raw), nkw = PyTuple_GET_SIZE(kwnames);
    if (nkw > 7) {
        PyErr_SetString(PyExc_ValueError, "at most 7 keyword arguments for unpack");
        return NULL;
    }
    PyObject *events = PyTuple_New(n);
    if (!events)
        return NULL;
    PyObject *call[8];
    for (Py_ssize_t k = 0; k < nkw; k++)
        call[1 + k] = PyTuple_GET_ITEM(kwvalues, k);
    int consecutive = 1;
    unsigned long long after = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(raw, i);
        if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 4)
            goto refused;
        PyObject *seq = PyList_GET_ITEM(entry, 0), *topic = PyList_GET_ITEM(entry, 1);
        PyObject *time = PyList_GET_ITEM(entry, 2), *data = PyList_GET_ITEM(entry, 3);
        if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) > max_body
                || !PyLong_CheckExact(seq) || !PyLong_CheckExact(time)
                || !PyUnicode_CheckExact(topic))
            goto refused;
        int overflow;
        long long s = PyLong_AsLongLongAndOverflow(seq, &overflow);
        if (overflow || s < 1)
            goto refused;
        long long t = PyLong_AsLongLongAndOverflow(time, &overflow);
        if (overflow || t < 0)
            goto refused;
        int known = PySet_Contains(topics, topic);
        if (known != 1)
            goto refused;
        call[0] = data;
        PyObject *body = PyObject_Vectorcall(unpack, call, 1, nkw ? kwnames : NULL);
        if (!body)
            goto refused;
        if (!valid(body, MAX_EVENT_INT, 0, 1)) {
            Py_DECREF(body);
            goto refused;
        }
        PyObject *event = fill->cls->tp_alloc(fill->cls, 0);
        if (!event) {
            Py_DECREF(body);
            Py_DECREF(events);
            return NULL;
        }
        PyObject *values[4] = {seq, topic, time, body};
        for (Py_ssize_t k = 0; k < 4; k++) {
            PyObject **slot = (PyObject **)((char *)event + fill->offsets[k]);
            Py_INCREF(values[k]);
            Py_XSETREF(*slot, values[k]);
        }
        Py_DECREF(body);
        PyTuple_SET_ITEM(events, i, event);
        if (after && (unsigned long long)s != after)
            consecutive = 0;
        after = (unsigned long long)s + 1;
    }
    PyObject *result = PyTuple_Pack(2, events, consecutive ? Py_True : Py_False);
    Py_DECREF(events);
    return result;
refused:
    PyErr_Clear();
    Py_DECREF(events);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read_update", read_update, METH_O,
     "read_update(data) -> (structs, starts, ends, refs, skips) for an update "
     "crdtsync.yupdate accepts, else None (ask the Python reader why)."},
    {"parse_state_vector", (PyCFunction)(void (*)(void))parse_state_vector, METH_FASTCALL,
     "parse_state_vector(data, max_entries) -> {client: clock} for a state vector "
     "crdtsync.protocol.parse_state_vector accepts, else None (ask it why)."},
    {"valid", (PyCFunction)(void (*)(void))py_valid, METH_FASTCALL,
     "valid(value, max_int, depth, allow_bytes): what crdtsync.values._valid answers."},
    {"event_body_ok", event_body_ok, METH_O,
     "event_body_ok(value): what crdtsync.values.event_body_ok answers."},
    {"slot_filler", (PyCFunction)(void (*)(void))slot_filler, METH_FASTCALL,
     "slot_filler(cls, names) -> filler: filler(obj, *values) sets obj's named slots."},
    {"decode_events", (PyCFunction)(void (*)(void))decode_events, METH_FASTCALL,
     "decode_events(raw, max_body, topics, unpack, kwnames, kwvalues, filler) -> "
     "(events, consecutive) for the entries crdtsync.protocol decodes on its fast path, "
     "else None (decode them in Python)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "crdtsync._speedups",
    "Optional C versions of crdtsync's update reader and value checks (see the source).", -1,
    methods,
};

static int seed_from_urandom(void) {
    PyObject *os = PyImport_ImportModule("os");
    PyObject *bytes = os ? PyObject_CallMethod(os, "urandom", "i", 16) : NULL;
    Py_XDECREF(os);
    if (!bytes)
        return -1;
    if (!PyBytes_Check(bytes) || PyBytes_GET_SIZE(bytes) != 16) {
        Py_DECREF(bytes);
        PyErr_SetString(PyExc_RuntimeError, "os.urandom(16) did not give 16 bytes");
        return -1;
    }
    memcpy(&seed_a, PyBytes_AS_STRING(bytes), 8);
    memcpy(&seed_b, PyBytes_AS_STRING(bytes) + 8, 8);
    Py_DECREF(bytes);
    return 0;
}

PyMODINIT_FUNC PyInit__speedups(void) {
    if (seed_from_urandom() < 0 || PyType_Ready(&SlotFillerType) < 0)
        return NULL;
    return PyModule_Create(&module);
}
