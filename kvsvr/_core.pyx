# cython: language_level=3
"""KVSvr's compiled core: limits, the binlog record codec, the wire frame codec, the
version quorum state machine and its wire codec, and the shared-memory monitor counters.

The core does no I/O: no sockets, no LMDB, no threads. The one exception to "no clock" is the
counters' add()/set(), which stamp the current second themselves (a caller-supplied second
would cost a Python-level time call per add on the hot path); add_at()/set_at() take one.
The counters work on a buffer the Python shell maps (kvsvr/monitor/counters.py).
"""

cdef extern from *:
    int KVSVR_DEBUG  # set by setup.py: 1 in the debug build (assertions, bounds checks, tracing)

DEBUG_BUILD = bool(KVSVR_DEBUG)

include "_consts.pxi"
include "_record.pxi"
include "_frame.pxi"
include "_quorum.pxi"
include "_qwire.pxi"
include "_counters.pxi"
include "_qlog.pxi"
