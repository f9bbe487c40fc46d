# cython: language_level=3
"""KVSvr's compiled core: limits, the binlog record codec, the wire frame codec and the
version quorum state machine.

The core does no I/O: no sockets, no LMDB, no threads, no clock. Later parts (the
shared-memory counters) join it as further `include`d files.
"""

cdef extern from *:
    int KVSVR_DEBUG  # set by setup.py: 1 in the debug build (assertions, bounds checks, tracing)

DEBUG_BUILD = bool(KVSVR_DEBUG)

include "_consts.pxi"
include "_record.pxi"
include "_frame.pxi"
include "_quorum.pxi"
include "_qlog.pxi"
