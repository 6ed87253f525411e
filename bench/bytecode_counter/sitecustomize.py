"""Loaded by ``bench/bytecodes.py`` into the server it measures (through PYTHONPATH):
count the bytecode instructions every Python function executes, on every thread and
greenlet, and write the counts to ``$SHARDIO_BYTECODES.<pid>`` twice a second.

Not part of shardio: a tracing hook makes the server 20-50x slower, but the counts
per request do not depend on that.
"""

import os

_out = os.environ.get("SHARDIO_BYTECODES")
if _out:
    import collections
    import pickle
    import sys
    import threading
    import time

    _sleep = time.sleep  # (bound before a server monkey-patches time, as gevent does)
    _counts: collections.Counter = collections.Counter()
    _names: dict = {}

    def _name(code):
        name = _names.get(code)
        if name is None:
            name = _names[code] = f"{os.path.basename(code.co_filename)}:{code.co_qualname}"
        return name

    def _trace(frame, event, arg):
        if event == "opcode":
            _counts[_name(frame.f_code)] += 1
        elif event == "call":
            frame.f_trace_opcodes = True
        return _trace

    def _write_counts():
        path = f"{_out}.{os.getpid()}"
        while True:
            _sleep(0.5)
            snapshot = dict(_counts)
            with open(path + ".tmp", "wb") as f:
                pickle.dump(snapshot, f)
            os.replace(path + ".tmp", path)

    threading.Thread(target=_write_counts, name="bytecode-counter", daemon=True).start()
    sys.settrace(_trace)
    threading.settrace(_trace)
