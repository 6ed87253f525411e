/*
 * shardio.tame._parking: how a tame stack parks, is resumed and checks its quota.
 *
 * The hot protocol of shardio/tame/stacks.py, in C so that a blocking call
 * costs no Python frame of its own:
 *
 *   Parked(kind, target)   the wake-up token of a stack about to wait;
 *   p.park()               record what it waits on, end the slice, switch to the
 *                          hub; on arrival, the window's quota check;
 *   p.wake(value)          (on the hub) resume the stack; the first wake wins;
 *   checkpoint()           one clock read against the window's deadline;
 *   suspend(g, what)       park()'s bookkeeping and switch for a wait with no token
 *                          (the loop resumes the stack with g.switch);
 *   sleep(seconds)         the tamed time.sleep: a loop timer resumes the stack.
 *
 * RuntimeCore is the base of stacks.Runtime: the fields these paths read on
 * every call (the hub's bound switch, the window's deadlines, the end of the
 * last slice, whether slices are accounted) live in its struct, and Python
 * code reads and writes them as ordinary attributes.
 *
 * Switches go through bound methods (the runtime's hub_switch; a stack's
 * "switch" looked up on the stack, so the gated switch a scheduling group
 * sets on it is honoured), never through greenlet's internals.  Every slow
 * path calls back into the runtime's Python methods: _account_start/_end
 * (CPU accounting), _arrive_late (past half the window: may the stack go on,
 * else requeue it), yield_now (the quota is spent).
 *
 * The clock is CLOCK_MONOTONIC, converted to seconds the way CPython's
 * time.perf_counter() does on Linux, so deadlines computed in Python from
 * perf_counter() compare exactly with it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <alloca.h>
#include <structmember.h>
#include <time.h>

/* Set once by setup(): the stack type, greenlet.getcurrent, the hub's "blocked"
   marker and the exception raised off a tame stack. */
static PyTypeObject *tame_greenlet_type;
static PyObject *getcurrent;
static PyObject *blocked_marker;
static PyObject *not_on_tame_stack;
static PyObject *tame_error;

static PyObject *str_sleep, *str_call_later, *str_cancel;
static PyObject *str_rt, *str_parked, *str_parked_at, *str_switch, *str_wake,
    *str_account_start, *str_account_end, *str_arrive_late, *str_yield_now;

static inline double
monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* As CPython: nanoseconds as an integer, then _PyTime_AsSecondsDouble. */
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    if (ns % 1000000000LL == 0) return (double)(ns / 1000000000LL);
    return (double)ns / 1e9;
}

/* -- RuntimeCore ------------------------------------------------------------------ */

/* The fields are objects (members of type T_OBJECT_EX), not C doubles: CPython
   specializes attribute access to such members as it does to instance attributes, so
   the Python side (tame.call, the sync primitives' quota check) reads and writes them
   as fast as before; C unboxes the floats. */
typedef struct {
    PyObject_HEAD
    PyObject *hub_switch;     /* the hub greenlet's bound switch */
    PyObject *call_soon;      /* the loop's bound call_soon */
    PyObject *deadline;       /* float: past it, a stack yields at its next tamed call */
    PyObject *half_deadline;  /* float: past it, an arriving stack asks _arrive_late */
    PyObject *last_end;       /* float: clock at the end of the last slice */
    PyObject *account_cpu;    /* bool: call _account_start/_account_end around slices */
} RuntimeCore;

/* A float field as a C double; a field that is not a float (or is missing) counts
   as +inf for deadlines: never past it. */
static inline double
as_seconds(PyObject *o)
{
    if (o != NULL && PyFloat_CheckExact(o)) return PyFloat_AS_DOUBLE(o);
    if (o == NULL) return Py_HUGE_VAL;
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return Py_HUGE_VAL;
    }
    return d;
}

static inline int
accounts_cpu(RuntimeCore *rt)
{
    PyObject *o = rt->account_cpu;
    if (o == Py_False || o == NULL) return 0;
    if (o == Py_True) return 1;
    int truth = PyObject_IsTrue(o);
    if (truth < 0) {
        PyErr_Clear();
        return 0;
    }
    return truth;
}

static int
core_traverse(RuntimeCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hub_switch);
    Py_VISIT(self->call_soon);
    Py_VISIT(self->deadline);
    Py_VISIT(self->half_deadline);
    Py_VISIT(self->last_end);
    Py_VISIT(self->account_cpu);
    return 0;
}

static int
core_clear(RuntimeCore *self)
{
    Py_CLEAR(self->hub_switch);
    Py_CLEAR(self->call_soon);
    Py_CLEAR(self->deadline);
    Py_CLEAR(self->half_deadline);
    Py_CLEAR(self->last_end);
    Py_CLEAR(self->account_cpu);
    return 0;
}

static void
core_dealloc(RuntimeCore *self)
{
    PyObject_GC_UnTrack(self);
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* No tp_new of its own (object's, set at import): Runtime instances are made by
   object.__new__, which also sets
   up their (inline) instance attributes, so that CPython specializes the Python
   side's attribute access to them. The fields start NULL (absent) until
   Runtime.__init__ sets them; the C paths treat an absent field as "no hub, no loop,
   no deadline, no accounting". */

static PyMemberDef core_members[] = {
    {"hub_switch", T_OBJECT_EX, offsetof(RuntimeCore, hub_switch), 0,
     "The hub greenlet's bound switch (every park switches through it)."},
    {"call_soon", T_OBJECT_EX, offsetof(RuntimeCore, call_soon), 0,
     "The loop's bound call_soon (wake_soon uses it)."},
    {"deadline", T_OBJECT_EX, offsetof(RuntimeCore, deadline), 0,
     "perf_counter() past which a stack yields at its next tamed call (a float)."},
    {"half_deadline", T_OBJECT_EX, offsetof(RuntimeCore, half_deadline), 0,
     "perf_counter() past which an arriving stack asks whether it may run (a float)."},
    {"last_end", T_OBJECT_EX, offsetof(RuntimeCore, last_end), 0,
     "perf_counter() at the end of the last slice (a float)."},
    {"account_cpu", T_OBJECT_EX, offsetof(RuntimeCore, account_cpu), 0,
     "Measure every slice in thread CPU time (_account_start/_account_end)."},
    {NULL},
};

static PyTypeObject RuntimeCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardio.tame._parking.RuntimeCore",
    .tp_doc = PyDoc_STR("The per-loop fields the park/wake/checkpoint paths read (base of "
                        "tame.Runtime)."),
    .tp_basicsize = sizeof(RuntimeCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_members = core_members,
};

static int
call_method_noargs(PyObject *obj, PyObject *name)
{
    PyObject *r = PyObject_CallMethodNoArgs(obj, name);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The slice of the stack running on rt ends now: switch to the hub (the stack
   waits on `what`, shown by dump_stacks), then, back on the stack, start the
   new slice and (with check_arrival) check the window.  Returns the value the stack was resumed
   with (a new reference) or NULL with the exception that was thrown in. */
static PyObject *
suspend_stack(PyObject *g, RuntimeCore *rt, PyObject *what, int check_arrival)
{
    if (PyObject_SetAttr(g, str_parked, what) < 0) return NULL;
    PyObject *at = PyFloat_FromDouble(monotonic_seconds());
    if (at == NULL) return NULL;
    if (PyObject_SetAttr(g, str_parked_at, at) < 0) {
        Py_DECREF(at);
        return NULL;
    }
    Py_XSETREF(rt->last_end, at);  /* our reference moves to the field */
    int account = accounts_cpu(rt);
    if (account && call_method_noargs((PyObject *)rt, str_account_end) < 0)
        return NULL;
    PyObject *hub_switch = rt->hub_switch;
    if (hub_switch == NULL) {
        PyErr_SetString(tame_error, "the tame runtime has no hub");
        return NULL;
    }
    Py_INCREF(rt);
    Py_INCREF(hub_switch);
    PyObject *value = PyObject_CallOneArg(hub_switch, blocked_marker);
    Py_DECREF(hub_switch);
    if (value == NULL) {
        if (accounts_cpu(rt)) {
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            if (call_method_noargs((PyObject *)rt, str_account_start) < 0) {
                Py_XDECREF(type);  /* the accounting's own error wins */
                Py_XDECREF(exc);
                Py_XDECREF(tb);
            } else {
                PyErr_Restore(type, exc, tb);
            }
        }
        Py_DECREF(rt);
        return NULL;
    }
    /* The arrival check: past half the window, may the stack go on? */
    if (accounts_cpu(rt) && call_method_noargs((PyObject *)rt, str_account_start) < 0)
        goto fail;
    double now = monotonic_seconds();
    if (check_arrival && now > as_seconds(rt->half_deadline)) {
        PyObject *t = PyFloat_FromDouble(now);
        if (t == NULL) goto fail;
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)rt, str_arrive_late, t);
        Py_DECREF(t);
        if (r == NULL) goto fail;
        Py_DECREF(r);
    }
    Py_DECREF(rt);
    return value;
fail:
    Py_DECREF(value);
    Py_DECREF(rt);
    return NULL;
}

/* -- the running stack --------------------------------------------------------------- */

/* The running tame stack (new reference), or NULL without an exception when
   the current greenlet is not one (or setup() has not run). */
static PyObject *
current_stack(void)
{
    if (getcurrent == NULL) return NULL;
    PyObject *g = PyObject_CallNoArgs(getcurrent);
    if (g == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (Py_TYPE(g) != tame_greenlet_type) {
        Py_DECREF(g);
        return NULL;
    }
    return g;
}

/* g.rt, checked to be a runtime (new reference), or NULL with an exception. */
static RuntimeCore *
stack_runtime(PyObject *g)
{
    PyObject *rt = PyObject_GetAttr(g, str_rt);
    if (rt == NULL) return NULL;
    if (!PyObject_TypeCheck(rt, &RuntimeCoreType)) {
        PyErr_Format(tame_error, "tame stack %R has no runtime (its rt is %R)", g, rt);
        Py_DECREF(rt);
        return NULL;
    }
    return (RuntimeCore *)rt;
}

/* -- Parked ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *g;        /* the waiting stack; NULL once woken or disarmed */
    RuntimeCore *rt;
    PyObject *kind;     /* what it waits on: "fd", "io_uring", "lock", "timer"... */
    PyObject *target;   /* which one (the fd, the op, the lock...) */
    char deferred;      /* its wake-up waits in the runtime's ready queue */
} Parked;

static PyTypeObject ParkedType;
static PyObject *str_event;

static PyObject *
parked_make(PyTypeObject *type, PyObject *kind, PyObject *target)
{
    PyObject *g = current_stack();
    if (g == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(not_on_tame_stack,
                            "this blocking operation needs a tame stack (run it with tame.call)");
        return NULL;
    }
    RuntimeCore *rt = stack_runtime(g);
    if (rt == NULL) {
        Py_DECREF(g);
        return NULL;
    }
    Parked *self = (Parked *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(g);
        Py_DECREF(rt);
        return NULL;
    }
    self->g = g;
    self->rt = rt;
    Py_INCREF(kind);
    self->kind = kind;
    Py_INCREF(target);
    self->target = target;
    return (PyObject *)self;
}

static PyObject *
parked_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "target", NULL};
    PyObject *kind = str_event, *target = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO:Parked", kwlist, &kind, &target))
        return NULL;
    return parked_make(type, kind, target);
}

static PyObject *
parked_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {
        PyObject *tuple = PyTuple_New(nargs);
        if (tuple == NULL) return NULL;
        for (Py_ssize_t i = 0; i < nargs; i++) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(tuple, i, args[i]);
        }
        PyObject *kwds = PyDict_New();
        if (kwds == NULL) { Py_DECREF(tuple); return NULL; }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            if (PyDict_SetItem(kwds, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
                Py_DECREF(tuple);
                Py_DECREF(kwds);
                return NULL;
            }
        }
        PyObject *r = parked_new((PyTypeObject *)type, tuple, kwds);
        Py_DECREF(tuple);
        Py_DECREF(kwds);
        return r;
    }
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "Parked() takes at most 2 arguments (%zd given)", nargs);
        return NULL;
    }
    return parked_make((PyTypeObject *)type, nargs > 0 ? args[0] : str_event,
                       nargs > 1 ? args[1] : Py_None);
}

static int
parked_traverse(Parked *self, visitproc visit, void *arg)
{
    Py_VISIT(self->g);
    Py_VISIT(self->rt);
    Py_VISIT(self->kind);
    Py_VISIT(self->target);
    return 0;
}

static int
parked_clear(Parked *self)
{
    Py_CLEAR(self->g);
    Py_CLEAR(self->rt);
    Py_CLEAR(self->kind);
    Py_CLEAR(self->target);
    return 0;
}

static void
parked_dealloc(Parked *self)
{
    PyObject_GC_UnTrack(self);
    parked_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(park_doc,
"park() -> the wake value\n\n"
"Switch to the hub until woken; return the wake value. An exception thrown\n"
"in (a cancellation) disarms the token and propagates. Woken when the\n"
"window's quota is spent, the stack queues itself for a later turn before it\n"
"goes on (Runtime._arrive_late).");

static PyObject *
parked_park(Parked *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *g = self->g;
    if (g == NULL) {
        PyErr_SetString(tame_error,
                        "Parked.park: this token is not armed (it was woken, or an earlier park "
                        "of it was interrupted): make a new Parked for every wait");
        return NULL;
    }
    /* g.parked stays set while g runs again: dump_stacks tells a running stack
       by its gr_frame (None), so the hot path need not clear it. */
    /* A stack requeued by the quota (Runtime._requeue: the token is deferred) is
       resumed by the ready queue only once the window lets it run: checking again
       on arrival could requeue it for ever, one nested park per turn. */
    int check_arrival = !self->deferred;
    Py_INCREF(g);
    PyObject *value = suspend_stack(g, self->rt, (PyObject *)self, check_arrival);
    Py_DECREF(g);
    if (value == NULL) {
        /* Disarm only for an exception thrown in while parked or on arrival; the
           wake that resumed us has already cleared g. */
        Py_CLEAR(self->g);
    }
    return value;
}

/* Resume the parked stack with value (the first wake wins). */
static int
parked_do_wake(Parked *self, PyObject *value)
{
    PyObject *g = self->g;
    if (g == NULL) return 0;
    self->g = NULL;  /* our reference moves to this call */
    PyObject *args[2] = {g, value};
    PyObject *r = PyObject_VectorcallMethod(str_switch, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                            NULL);
    Py_DECREF(g);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

PyDoc_STRVAR(wake_doc,
"wake(value=None)\n\n"
"Resume the parked stack with value, through its switch (hub only; the first\n"
"wake wins, later ones and wakes of a disarmed token do nothing).");

static PyObject *
parked_wake(Parked *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "wake() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    if (parked_do_wake(self, nargs ? args[0] : Py_None) < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(wake_deferred_doc,
"_wake_deferred(value)\n\nThe runtime's ready queue resumes the stack: no longer deferred.");

static PyObject *
parked_wake_deferred(Parked *self, PyObject *value)
{
    self->deferred = 0;
    if (parked_do_wake(self, value) < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(wake_soon_doc,
"wake_soon(value=None)\n\n"
"Resume the parked stack from the loop's next iteration (safe from a tame stack).");

static PyObject *
parked_wake_soon(Parked *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "wake_soon() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    if (self->rt == NULL || self->rt->call_soon == NULL) {
        PyErr_SetString(tame_error, "Parked.wake_soon: the token's runtime has no loop");
        return NULL;
    }
    PyObject *wake = PyObject_GetAttr((PyObject *)self, str_wake);
    if (wake == NULL) return NULL;
    PyObject *call_args[2] = {wake, nargs ? args[0] : Py_None};
    PyObject *r = PyObject_Vectorcall(self->rt->call_soon, call_args, 2, NULL);
    Py_DECREF(wake);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyObject *
parked_get_armed(Parked *self, void *closure)
{
    return PyBool_FromLong(self->g != NULL);
}

static PyObject *
parked_get_g(Parked *self, void *closure)
{
    PyObject *g = self->g ? self->g : Py_None;
    Py_INCREF(g);
    return g;
}

static PyObject *
parked_repr(Parked *self)
{
    return PyUnicode_FromFormat("<tame.Parked %S %R%s>", self->kind ? self->kind : Py_None,
                                self->target ? self->target : Py_None,
                                self->g ? " armed" : "");
}

static PyMethodDef parked_methods[] = {
    {"park", (PyCFunction)parked_park, METH_NOARGS, park_doc},
    {"wake", (PyCFunction)(void (*)(void))parked_wake, METH_FASTCALL, wake_doc},
    {"_wake_deferred", (PyCFunction)parked_wake_deferred, METH_O, wake_deferred_doc},
    {"wake_soon", (PyCFunction)(void (*)(void))parked_wake_soon, METH_FASTCALL, wake_soon_doc},
    {NULL},
};

static PyMemberDef parked_members[] = {
    {"rt", T_OBJECT, offsetof(Parked, rt), READONLY, "The runtime of the waiting stack."},
    {"kind", T_OBJECT, offsetof(Parked, kind), 0,
     "What the stack waits on (\"fd\", \"io_uring\", \"lock\", \"timer\", \"future\"...)."},
    {"target", T_OBJECT, offsetof(Parked, target), 0,
     "Which one (the fd, the op, the lock...), for dump_stacks."},
    {"deferred", T_BOOL, offsetof(Parked, deferred), 0,
     "Its wake-up waits in the runtime's ready queue (\"ready\" in dump_stacks)."},
    {NULL},
};

static PyGetSetDef parked_getset[] = {
    {"armed", (getter)parked_get_armed, NULL, "True while the stack still waits for this wake-up.",
     NULL},
    {"g", (getter)parked_get_g, NULL, "The waiting stack (None once woken or disarmed).", NULL},
    {NULL},
};

static PyTypeObject ParkedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shardio.tame.stacks.Parked",
    .tp_doc = PyDoc_STR(
        "Parked(kind='event', target=None): a tame stack waiting for one event.\n\n"
        "Usage on a tame stack: p = Parked(\"lock\", obj); <arrange for p.wake(v)\n"
        "later>; v = p.park(). kind and target say what the stack waits on for\n"
        "dump_stacks. wake must run on the hub (a loop callback); from anywhere on\n"
        "the loop's thread use wake_soon. Waking a stack that no longer waits\n"
        "(cancelled meanwhile) does nothing; the first wake wins. Made anywhere\n"
        "but on a tame stack, it raises NotOnTameStack."),
    .tp_basicsize = sizeof(Parked),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = parked_new,
    .tp_vectorcall = parked_vectorcall,
    .tp_traverse = (traverseproc)parked_traverse,
    .tp_clear = (inquiry)parked_clear,
    .tp_dealloc = (destructor)parked_dealloc,
    .tp_repr = (reprfunc)parked_repr,
    .tp_methods = parked_methods,
    .tp_members = parked_members,
    .tp_getset = parked_getset,
};

/* -- module functions --------------------------------------------------------------------- */

PyDoc_STRVAR(checkpoint_doc,
"checkpoint() -> Runtime or None\n\n"
"Yield to the loop if this stack's window has spent its quota (one clock read\n"
"against rt.deadline, then rt.yield_now()); return the stack's runtime. Off a\n"
"tame stack: None, and nothing happens.");

static PyObject *
parking_checkpoint(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyObject *g = current_stack();
    if (g == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    RuntimeCore *rt = stack_runtime(g);
    Py_DECREF(g);
    if (rt == NULL) return NULL;
    if (monotonic_seconds() > as_seconds(rt->deadline) && call_method_noargs((PyObject *)rt, str_yield_now) < 0) {
        Py_DECREF(rt);
        return NULL;
    }
    return (PyObject *)rt;
}

PyDoc_STRVAR(current_runtime_doc,
"current_runtime() -> Runtime or None\n\nThe runtime of the tame stack running this code, else None.");

static PyObject *
parking_current_runtime(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyObject *g = current_stack();
    if (g == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *rt = PyObject_GetAttr(g, str_rt);
    Py_DECREF(g);
    return rt;
}

PyDoc_STRVAR(suspend_doc,
"suspend(g, what) -> the value g is resumed with\n\n"
"On the running tame stack g: record `what` as what it waits on (g.parked),\n"
"end its slice and switch to the hub; back on the stack, start the new slice\n"
"and check the window (as Parked.park does). For waits with no token: the\n"
"caller has arranged for the loop to resume g with g.switch (a sleep's timer)\n"
"and undoes that arrangement if this raises.");

static PyObject *
parking_suspend(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "suspend(g, what) takes 2 arguments");
        return NULL;
    }
    PyObject *g = args[0];
    if (Py_TYPE(g) != tame_greenlet_type) {
        PyErr_Format(not_on_tame_stack, "suspend: %R is not a tame stack", g);
        return NULL;
    }
    RuntimeCore *rt = stack_runtime(g);
    if (rt == NULL) return NULL;
    PyObject *value = suspend_stack(g, rt, args[1], 1);
    Py_DECREF(rt);
    return value;
}

static PyObject *time_module, *int_zero;

PyDoc_STRVAR(sleep_doc,
"sleep(seconds)\n\n"
"time.sleep that parks the calling tame stack on a loop timer (plain time.sleep\n"
"elsewhere). sleep(0) lets the loop run one turn, whatever the quota says. The\n"
"loop resumes the stack with the stack's own switch (a scheduling group's gated\n"
"one when it has one); the timer handle is cancelled on any early exit (a\n"
"cancellation thrown in), so it can only fire while the stack sleeps here.");

static PyObject *
parking_sleep(PyObject *module, PyObject *seconds)
{
    PyObject *g = current_stack();
    if (g == NULL) {
        if (PyErr_Occurred()) return NULL;
        PyObject *plain = PyObject_GetAttr(time_module, str_sleep);
        if (plain == NULL) return NULL;
        PyObject *r = PyObject_CallOneArg(plain, seconds);
        Py_DECREF(plain);
        return r;
    }
    PyObject *handle = NULL, *value = NULL, *resume = NULL;
    RuntimeCore *rt = stack_runtime(g);
    if (rt == NULL) goto done;
    int positive = PyFloat_CheckExact(seconds) ? PyFloat_AS_DOUBLE(seconds) > 0.0
                                                : PyObject_RichCompareBool(seconds, int_zero, Py_GT);
    if (positive < 0) goto done;
    resume = PyObject_GetAttr(g, str_switch);
    if (resume == NULL) goto done;
    if (positive) {
        PyObject *call_later = PyObject_GetAttr((PyObject *)rt, str_call_later);
        if (call_later == NULL) goto done;
        PyObject *args[2] = {seconds, resume};
        handle = PyObject_Vectorcall(call_later, args, 2, NULL);
        Py_DECREF(call_later);
    } else if (rt->call_soon == NULL) {
        PyErr_SetString(tame_error, "sleep: the stack's runtime has no loop");
    } else {
        handle = PyObject_CallOneArg(rt->call_soon, resume);
    }
    if (handle == NULL) goto done;
    value = suspend_stack(g, rt, seconds, 1);
    if (value == NULL) {
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyObject *r = PyObject_CallMethodNoArgs(handle, str_cancel);
        if (r == NULL) {
            Py_XDECREF(type);  /* the cancel's own error wins */
            Py_XDECREF(exc);
            Py_XDECREF(tb);
        } else {
            Py_DECREF(r);
            PyErr_Restore(type, exc, tb);
        }
    } else {
        Py_DECREF(value);
        value = Py_None;
        Py_INCREF(value);
    }
done:
    Py_XDECREF(handle);
    Py_XDECREF(resume);
    Py_XDECREF(rt);
    Py_DECREF(g);
    return value;
}

PyDoc_STRVAR(clock_doc, "clock() -> float\n\nThe clock of the deadlines: time.perf_counter()'s.");

static PyObject *
parking_clock(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyFloat_FromDouble(monotonic_seconds());
}

PyDoc_STRVAR(setup_doc,
"setup(tame_greenlet_type, getcurrent, blocked, not_on_tame_stack, tame_error)\n\n"
"Called once by shardio.tame.stacks: the stack type (exact type checks), the\n"
"function that returns the running greenlet, what a parking stack hands the\n"
"hub, and the exceptions to raise.");

static PyObject *
parking_setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "setup() takes 5 arguments");
        return NULL;
    }
    if (!PyType_Check(args[0]) || !PyCallable_Check(args[1]) ||
        !PyExceptionClass_Check(args[3]) || !PyExceptionClass_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "setup(type, callable, object, exception class, exception class)");
        return NULL;
    }
    PyObject *old[5] = {(PyObject *)tame_greenlet_type, getcurrent, blocked_marker,
                        not_on_tame_stack, tame_error};
    for (int i = 0; i < 5; i++) Py_INCREF(args[i]);
    tame_greenlet_type = (PyTypeObject *)args[0];
    getcurrent = args[1];
    blocked_marker = args[2];
    not_on_tame_stack = args[3];
    tame_error = args[4];
    for (int i = 0; i < 5; i++) Py_XDECREF(old[i]);
    Py_RETURN_NONE;
}

/* Greenlet copies stacks: switching to a stack saves whatever live data of other
 * greenlets lies between the current stack pointer and the target's base (where
 * it was first switched to), and restores the target's own. A pooled tame stack
 * first entered where the loop's C stack is shallow is then overlapped by the
 * loop's deeper callback frames on every later switch: measured ~28 KiB copied
 * per pass of an OSD connection. Entered once from this far below, its frames
 * lie under any depth the loop reaches, so a switch copies only the stack's own
 * few KiB. */
PyDoc_STRVAR(call_below_doc,
"call_below(nbytes, func, *args) -> func(*args), called nbytes further down the C\n"
"stack (0 < nbytes <= 1 MiB): where a new tame stack is first entered (stacks.py).");

static PyObject *
parking_call_below(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "call_below(nbytes, func, *args)");
        return NULL;
    }
    Py_ssize_t nbytes = PyLong_AsSsize_t(args[0]);
    if (nbytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (nbytes <= 0 || nbytes > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "call_below: nbytes must be in 1..1048576, got %zd",
                     nbytes);
        return NULL;
    }
    volatile char *pad = alloca((size_t)nbytes);
    pad[0] = 0;
    PyObject *result = PyObject_Vectorcall(args[1], args + 2, (size_t)(nargs - 2), NULL);
    pad[0] = 1; /* used after the call: the pad stays below this frame until it returns */
    return result;
}

static PyMethodDef parking_methods[] = {
    {"call_below", (PyCFunction)(void (*)(void))parking_call_below, METH_FASTCALL,
     call_below_doc},
    {"checkpoint", parking_checkpoint, METH_NOARGS, checkpoint_doc},
    {"current_runtime", parking_current_runtime, METH_NOARGS, current_runtime_doc},
    {"suspend", (PyCFunction)(void (*)(void))parking_suspend, METH_FASTCALL, suspend_doc},
    {"sleep", parking_sleep, METH_O, sleep_doc},
    {"clock", parking_clock, METH_NOARGS, clock_doc},
    {"setup", (PyCFunction)(void (*)(void))parking_setup, METH_FASTCALL, setup_doc},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardio.tame._parking",
    .m_doc = "How a tame stack parks, is resumed and checks its quota (see the C file's header).",
    .m_size = -1,
    .m_methods = parking_methods,
};

#define INTERN(var, text) \
    if (!(var = PyUnicode_InternFromString(text))) return NULL

PyMODINIT_FUNC
PyInit__parking(void)
{
    INTERN(str_rt, "rt");
    INTERN(str_parked, "parked");
    INTERN(str_parked_at, "parked_at");
    INTERN(str_switch, "switch");
    INTERN(str_wake, "wake");
    INTERN(str_account_start, "_account_start");
    INTERN(str_account_end, "_account_end");
    INTERN(str_arrive_late, "_arrive_late");
    INTERN(str_yield_now, "yield_now");
    INTERN(str_event, "event");
    INTERN(str_sleep, "sleep");
    INTERN(str_call_later, "call_later");
    INTERN(str_cancel, "cancel");
    if (!time_module && !(time_module = PyImport_ImportModule("time"))) return NULL;
    if (!int_zero && !(int_zero = PyLong_FromLong(0))) return NULL;
    if (tame_error == NULL) {
        /* Until setup(): the types work, and misuse raises RuntimeError. */
        tame_error = PyExc_RuntimeError;
        Py_INCREF(tame_error);
        not_on_tame_stack = PyExc_RuntimeError;
        Py_INCREF(not_on_tame_stack);
        blocked_marker = Py_None;
        Py_INCREF(blocked_marker);
    }
    RuntimeCoreType.tp_new = PyBaseObject_Type.tp_new;
    if (PyType_Ready(&RuntimeCoreType) < 0 || PyType_Ready(&ParkedType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&RuntimeCoreType);
    if (PyModule_AddObject(m, "RuntimeCore", (PyObject *)&RuntimeCoreType) < 0) {
        Py_DECREF(&RuntimeCoreType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ParkedType);
    if (PyModule_AddObject(m, "Parked", (PyObject *)&ParkedType) < 0) {
        Py_DECREF(&ParkedType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
