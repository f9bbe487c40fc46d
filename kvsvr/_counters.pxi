# Shared-memory monitor counters and the value blocks that carry their per-second values.
#
# One file per machine (normally in /dev/shm), mapped by every process that counts and by the
# agent that ships the values. Every change is a single compare-and-swap of one aligned 8-byte
# word, so any number of processes count at once without locks, a reader never waits, and a
# process killed at any instruction leaves every word either as it was or as it meant it.
#
# File layout, little-endian, layout version 1:
#
#   offset size field
#        0    4 magic          0x5443564B (b"KVCT")
#        4    2 layout         1
#        6    2 header_bytes   64
#        8    4 max_ids        ids 1..max_ids have a slot (1..MONITOR_IDS_MAX)
#       12    4 window_s       per-second buckets per id (WINDOW_S_MIN..WINDOW_S_MAX)
#       16    4 slot_bytes     8 + 8 * window_s
#       20    4 reserved       0
#       24    8 file_bytes     64 + max_ids * slot_bytes: the exact file size
#       32    8 created_s      unix second the file was made (nothing is counted before it)
#       40   16 reserved       0
#       56    8 checksum       xxh3_64 of bytes [0, 56): the header is written once, then only
#                              read, so a mismatch means the file is not ours or was damaged
#       64      slots          max_ids of them; the slot of id i starts at 64 + (i-1)*slot_bytes
#
# Slot of one id:
#
#        0    4 kind           0 free, 1 counter (add), 2 gauge (set); a registration claims
#                              it with one CAS 0 -> kind, so two processes registering the
#                              same id agree and a kind clash is refused
#        4    4 reserved       0
#        8      buckets        window_s words of 8 bytes; second s lives in bucket s % window_s
#
# Bucket word: bits 63..44 are a stamp saying which second the word holds, bits 43..0 the
# value as a 44-bit two's complement number (+-8.8e12 per id per second).
#
#     stamp(s) = (s // window_s) % (2**20 - 1) + 1
#
# The stamp is the cycle of the window (never 0, so an all-zero word means "never written").
# Seconds s and s + window_s share a bucket and differ by one in stamp; a stale word can only be
# mistaken for a current one after 2**20 - 1 cycles (about 20 years at the 600 s default,
# 97 days at the smallest window).
#
# Writing second s (add: value + delta; set: the value), in a loop:
#   1. load the word (acquire);
#   2. same stamp: the second is open, the new word is stamp | (value + delta);
#      older stamp or zero: the bucket still holds a second that left the window, the new word
#      is stamp | delta (this claims the bucket for s: the old value is dropped in the same
#      CAS that installs the first delta, so no count of s is lost and none of the old second
#      is carried over); newer stamp: the clock was stepped back by a whole window or more.
#      add()/set() write at the clock's second, and the clock is authoritative: they claim
#      the bucket all the same (the value of that "future" second is dropped; the agent had
#      normally shipped it already). Counting never fails for a time problem, so it can never
#      be what stops a node. add_at()/set_at() (explicit seconds: tests, replays) refuse
#      instead, since there the caller's second is the one out of place;
#   3. compare-and-swap the loaded word to the new one; if another writer changed it in
#      between, go back to 1 (add() also reads the clock again).
# Writers never hold anything, so a killed writer stops nothing; a CAS either happened (its
# count is in) or it did not (it is not): nothing is lost or counted twice.
#
# Readers load a word (acquire) and take its value when its stamp is that of the second asked
# for; otherwise nothing was recorded for that second (or it left the window: the caller, who
# knows the clock, decides which). A reader of the current second sees a value that may still
# grow; the agent ships a second only once it is complete.
#
# Value block (the per-second values of one machine, and their sum across machines, as the
# agent ships them and the center stores them): entries of 12 bytes, u32 id then i64 value,
# ids strictly ascending, nothing else. `block_invalid` says what is wrong with one.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memset

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    /* Atomics on the shared map: the compiler's builtins, no locks. */
    static inline uint64_t kvsvr_load64(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline int kvsvr_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline uint32_t kvsvr_load32(uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline int kvsvr_cas32(uint32_t *p, uint32_t expected, uint32_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline void kvsvr_store64(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    /* The coarse clock: a vDSO read of a few ns. Its tick (1-4 ms) is far below the
       second that buckets resolve, and the agent ships a second only 2 s after it ends.
       The core reads the clock itself (STYLE 1 keeps clocks out of the core) on purpose:
       the point of the counters is a one-line `add(ID, n)` at any call site, and a second
       passed in by every caller would cost a Python-level time() call per add. add_at() and
       set_at() take the second explicitly for tests and replays. */
    static inline int64_t kvsvr_now_s(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME_COARSE, &ts);
        return (int64_t) ts.tv_sec;
    }
    """
    uint64_t kvsvr_load64(uint64_t* p) noexcept nogil
    bint kvsvr_cas64(uint64_t* p, uint64_t expected, uint64_t desired) noexcept nogil
    uint32_t kvsvr_load32(uint32_t* p) noexcept nogil
    bint kvsvr_cas32(uint32_t* p, uint32_t expected, uint32_t desired) noexcept nogil
    void kvsvr_store64(uint64_t* p, uint64_t v) noexcept nogil
    int64_t kvsvr_now_s() noexcept nogil

cdef enum:
    _STAMP_MODULUS = (1 << 20) - 1
    _STAMP_HALF = 1 << 19
    _HEADER_CHECKSUMMED_BYTES = 56

cdef uint64_t _VALUE_MASK = (<uint64_t> 1 << _BUCKET_VALUE_BITS) - 1
cdef int64_t _VALUE_MAX = (<int64_t> 1 << (_BUCKET_VALUE_BITS - 1)) - 1
cdef int64_t _VALUE_MIN = -(<int64_t> 1 << (_BUCKET_VALUE_BITS - 1))

# What a write returns (the Python-facing calls turn them into exceptions).
cdef enum:
    _WRITE_OK = 0
    _WRITE_OVERFLOW = 1
    _WRITE_LEFT_WINDOW = 2


class CountersError(ValueError):
    """A counters file or call is not valid: unknown id, full table, bad file, bad value."""


cdef inline uint64_t _stamp(int64_t second, uint32_t window) noexcept nogil:
    return <uint64_t> ((second // window) % _STAMP_MODULUS) + 1


cdef inline int64_t _word_value(uint64_t word) noexcept nogil:
    # Sign-extend the low 44 bits.
    return (<int64_t> (word << (64 - _BUCKET_VALUE_BITS))) >> (64 - _BUCKET_VALUE_BITS)


cdef inline uint64_t _word(uint64_t stamp, int64_t value) noexcept nogil:
    return (stamp << _BUCKET_VALUE_BITS) | (<uint64_t> value & _VALUE_MASK)


def counters_file_bytes(int max_ids, int window_s) -> int:
    """The exact size of a counters file of this sizing (CountersError if out of range)."""
    _check_sizing(max_ids, window_s)
    return _COUNTERS_HEADER_BYTES + <Py_ssize_t> max_ids * (8 + 8 * <Py_ssize_t> window_s)


cdef _check_sizing(int max_ids, int window_s):
    if max_ids < 1 or max_ids > _MONITOR_IDS_MAX:
        raise CountersError(f"max_ids: {max_ids}, expected 1..{_MONITOR_IDS_MAX}")
    if window_s < _WINDOW_S_MIN or window_s > _WINDOW_S_MAX:
        raise CountersError(f"window_s: {window_s}, expected {_WINDOW_S_MIN}..{_WINDOW_S_MAX}")


def format_counters(buf, int max_ids, int window_s, int64_t created_s) -> None:
    """Write the header of a new counters file into `buf` (zeroed, exactly the file's size).
    The caller publishes the file only after this (see kvsvr.monitor.counters)."""
    cdef Py_ssize_t size = counters_file_bytes(max_ids, window_s)
    cdef uint8_t[::1] view = buf
    if view.shape[0] != size:
        raise CountersError(f"buffer: {view.shape[0]} bytes, this sizing needs {size}")
    cdef uint8_t* p = &view[0]
    memset(p, 0, _COUNTERS_HEADER_BYTES)
    _store32(p, _COUNTERS_MAGIC)
    _store16(p + 4, _COUNTERS_LAYOUT)
    _store16(p + 6, _COUNTERS_HEADER_BYTES)
    _store32(p + 8, <uint32_t> max_ids)
    _store32(p + 12, <uint32_t> window_s)
    _store32(p + 16, <uint32_t> (8 + 8 * window_s))
    _store64(p + 24, <uint64_t> size)
    _store64(p + 32, <uint64_t> created_s)
    _store64(p + 56, _xxh3_64(view[:_HEADER_CHECKSUMMED_BYTES]))


def counters_invalid(buf):
    """Why `buf` is not a valid counters file, or None if it is one."""
    cdef const uint8_t[::1] view
    try:
        view = buf
    except (TypeError, ValueError, BufferError):
        return "not a contiguous byte buffer"
    cdef Py_ssize_t n = view.shape[0]
    if n < _COUNTERS_HEADER_BYTES:
        return f"truncated: {n} bytes, the header alone is {_COUNTERS_HEADER_BYTES}"
    cdef const uint8_t* p = &view[0]
    if _load32(p) != _COUNTERS_MAGIC:
        return "magic: not a KVSvr counters file"
    if _load16(p + 4) != _COUNTERS_LAYOUT:
        return f"layout: {_load16(p + 4)}, this build reads layout {_COUNTERS_LAYOUT}"
    if _load16(p + 6) != _COUNTERS_HEADER_BYTES:
        return f"header_bytes: {_load16(p + 6)}, expected {_COUNTERS_HEADER_BYTES}"
    if _load64(p + 56) != <uint64_t> _xxh3_64(view[:_HEADER_CHECKSUMMED_BYTES]):
        return "checksum: the header is damaged"
    cdef uint32_t max_ids = _load32(p + 8)
    cdef uint32_t window = _load32(p + 12)
    if max_ids < 1 or max_ids > _MONITOR_IDS_MAX:
        return f"max_ids: {max_ids}, expected 1..{_MONITOR_IDS_MAX}"
    if window < _WINDOW_S_MIN or window > _WINDOW_S_MAX:
        return f"window_s: {window}, expected {_WINDOW_S_MIN}..{_WINDOW_S_MAX}"
    if _load32(p + 16) != 8 + 8 * window:
        return f"slot_bytes: {_load32(p + 16)}, expected {8 + 8 * window} for window_s {window}"
    cdef uint64_t size = _COUNTERS_HEADER_BYTES + <uint64_t> max_ids * (8 + 8 * window)
    if _load64(p + 24) != size:
        return f"file_bytes: header says {_load64(p + 24)}, its sizing needs {size}"
    if <uint64_t> n != size:
        return f"size: the file has {n} bytes, its header says {size} (truncated or padded)"
    return None


cdef class Counters:
    """The per-second counters of one machine, over a mapped counters file.

    `add(id, delta)` and `set(id, value)` are the hot path: a range check, one load of the
    slot's kind, a clock read and a CAS. Ids are ints (module constants in the callers' code),
    never names. CountersError for an id out of the table or not registered, OverflowError
    when a per-second value would leave the 44-bit range (nothing is changed then); never an
    error for the clock (a bucket holding a later second is claimed for the clock's second).
    """
    cdef uint8_t[::1] _view   # keeps the map exported (it cannot be closed under us)
    cdef uint8_t* _base
    cdef readonly int max_ids
    cdef readonly int window_s
    cdef readonly int64_t created_s
    cdef Py_ssize_t _slot_bytes

    def __cinit__(self, buf):
        problem = counters_invalid(buf)
        if problem is not None:
            raise CountersError(f"counters file: {problem}")
        self._view = buf
        self._base = &self._view[0]
        self.max_ids = _load32(self._base + 8)
        self.window_s = _load32(self._base + 12)
        self.created_s = <int64_t> _load64(self._base + 32)
        self._slot_bytes = 8 + 8 * <Py_ssize_t> self.window_s

    cdef inline uint32_t* _kind(self, int id) noexcept nogil:
        return <uint32_t*> (self._base + _COUNTERS_HEADER_BYTES
                            + (id - 1) * self._slot_bytes)

    cdef inline uint64_t* _bucket(self, int id, int64_t second) noexcept nogil:
        return <uint64_t*> (self._base + _COUNTERS_HEADER_BYTES + (id - 1) * self._slot_bytes
                            + 8 + 8 * (second % self.window_s))

    cdef _refuse(self, int id, uint32_t wanted):
        if id == 0:
            return CountersError("id: 0 is reserved (ids start at 1)")
        if id < 0 or id > _MONITOR_IDS_MAX:
            return CountersError(f"id: {id} is outside the id range 1..{_MONITOR_IDS_MAX}")
        if id > self.max_ids:
            return CountersError(
                f"id: {id} is past this counters file's max_ids {self.max_ids}: raise "
                "[monitor] max_ids and remove the file so that it is made again")
        kind = kvsvr_load32(self._kind(id))
        if kind == _KIND_FREE:
            return CountersError(f"id: {id} is not registered in this counters file")
        return CountersError(f"id: {id} is registered as a {_kind_name(kind)}, "
                             f"not a {_kind_name(wanted)}")

    cdef int _write(self, int id, int64_t second, int64_t delta, bint is_set,
                    bint fixed_second) noexcept nogil:
        cdef uint64_t* word_at
        cdef uint64_t old, stamp, old_stamp
        cdef int64_t value
        while True:
            if not fixed_second:
                second = kvsvr_now_s()
            word_at = self._bucket(id, second)
            stamp = _stamp(second, self.window_s)
            old = kvsvr_load64(word_at)
            old_stamp = old >> _BUCKET_VALUE_BITS
            if old_stamp == stamp:
                value = delta if is_set else _word_value(old) + delta
            elif old == 0 or (stamp + _STAMP_MODULUS - old_stamp) % _STAMP_MODULUS < _STAMP_HALF:
                value = delta       # older stamp (or empty): claim
            elif not fixed_second:
                # Newer stamp at the clock's second: the clock went back a window or more,
                # so claim too (see the layout notes). Unless this writer was only stalled
                # (SIGSTOP) between its clock read and here: then the clock has moved on, and
                # claiming would wipe the current second; read the clock again instead.
                if kvsvr_now_s() != second:
                    continue
                value = delta
            else:
                return _WRITE_LEFT_WINDOW
            if value > _VALUE_MAX or value < _VALUE_MIN:
                return _WRITE_OVERFLOW
            if kvsvr_cas64(word_at, old, _word(stamp, value)):
                return _WRITE_OK

    cpdef add(self, int id, long long delta):
        """Add `delta` to counter `id` in the current second."""
        if id < 1 or id > self.max_ids or kvsvr_load32(self._kind(id)) != _KIND_COUNTER:
            raise self._refuse(id, _KIND_COUNTER)
        if delta > _VALUE_MAX or delta < _VALUE_MIN:
            raise OverflowError(f"delta: {delta} is outside +-2**{_BUCKET_VALUE_BITS - 1}")
        if self._write(id, 0, delta, False, False) != _WRITE_OK:
            raise self._overflow(id)

    cpdef set(self, int id, long long value):
        """Set gauge `id` to `value` for the current second (the last set of a second wins)."""
        if id < 1 or id > self.max_ids or kvsvr_load32(self._kind(id)) != _KIND_GAUGE:
            raise self._refuse(id, _KIND_GAUGE)
        if value > _VALUE_MAX or value < _VALUE_MIN:
            raise OverflowError(f"value: {value} is outside +-2**{_BUCKET_VALUE_BITS - 1}")
        if self._write(id, 0, value, True, False) != _WRITE_OK:
            raise self._overflow(id)

    cdef _overflow(self, int id):
        # The only failure of a write at the clock's second (a set never overflows: its
        # value was range-checked above).
        return OverflowError(f"id {id}: this second's sum would leave "
                             f"+-2**{_BUCKET_VALUE_BITS - 1}; nothing was added")

    def add_at(self, int id, long long delta, int64_t second):
        """add() for a given second (tests, replays); CountersError if it left the window."""
        self._write_at(id, delta, second, False)

    def set_at(self, int id, long long value, int64_t second):
        """set() for a given second; CountersError if it left the window."""
        self._write_at(id, value, second, True)

    cdef _write_at(self, int id, long long amount, int64_t second, bint is_set):
        cdef uint32_t wanted = _KIND_GAUGE if is_set else _KIND_COUNTER
        if id < 1 or id > self.max_ids or kvsvr_load32(self._kind(id)) != wanted:
            raise self._refuse(id, wanted)
        if second < 0:
            raise CountersError(f"second: {second}, expected a unix second >= 0")
        if amount > _VALUE_MAX or amount < _VALUE_MIN:
            raise OverflowError(f"{amount} is outside +-2**{_BUCKET_VALUE_BITS - 1}")
        result = self._write(id, second, amount, is_set, True)
        if result == _WRITE_OVERFLOW:
            raise OverflowError(f"id {id}: second {second}'s sum would leave "
                                f"+-2**{_BUCKET_VALUE_BITS - 1}; nothing was added")
        if result == _WRITE_LEFT_WINDOW:
            raise CountersError(f"second: {second} has left the {self.window_s} s window "
                                "(its bucket holds a later second)")

    def register(self, int id, int kind):
        """Claim slot `id` for `kind` (KIND_COUNTER or KIND_GAUGE). Registering again with the
        same kind is a no-op (every process does it at start); another kind is refused."""
        if kind != _KIND_COUNTER and kind != _KIND_GAUGE:
            raise CountersError(f"kind: {kind}, expected {_KIND_COUNTER} (counter) or "
                                f"{_KIND_GAUGE} (gauge)")
        if id < 1 or id > self.max_ids:
            raise self._refuse(id, kind)
        cdef uint32_t* at = self._kind(id)
        if kvsvr_cas32(at, _KIND_FREE, <uint32_t> kind):
            return
        cdef uint32_t current = kvsvr_load32(at)
        if current != <uint32_t> kind:
            raise CountersError(f"id: {id} is already registered as a {_kind_name(current)} "
                                f"in this counters file, not a {_kind_name(kind)}")

    def kind(self, int id) -> int:
        """The kind id `id` is registered with (0: free)."""
        if id < 1 or id > self.max_ids:
            raise self._refuse(id, _KIND_COUNTER)
        return kvsvr_load32(self._kind(id))

    def registered(self) -> list:
        """[(id, kind)] of every registered id, ascending."""
        cdef int i
        cdef uint32_t kind
        out = []
        for i in range(1, self.max_ids + 1):
            kind = kvsvr_load32(self._kind(i))
            if kind != _KIND_FREE:
                out.append((i, kind))
        return out

    def value_at(self, int id, int64_t second):
        """The value of `id` recorded for `second`, or None if nothing was (or the second left
        the window: the caller knows the clock)."""
        if id < 1 or id > self.max_ids:
            raise self._refuse(id, _KIND_COUNTER)
        if second < 0:
            raise CountersError(f"second: {second}, expected a unix second >= 0")
        cdef uint64_t word = kvsvr_load64(self._bucket(id, second))
        if word >> _BUCKET_VALUE_BITS != _stamp(second, self.window_s):
            return None
        return _word_value(word)

    def snapshot(self, int64_t second) -> bytes:
        """A value block of every registered id with a value recorded for `second`."""
        if second < 0:
            raise CountersError(f"second: {second}, expected a unix second >= 0")
        cdef uint64_t stamp = _stamp(second, self.window_s)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self.max_ids * _VALUE_ENTRY_BYTES)
        cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
        cdef Py_ssize_t n = 0
        cdef int i
        cdef uint64_t word
        with nogil:
            for i in range(1, self.max_ids + 1):
                if kvsvr_load32(self._kind(i)) == _KIND_FREE:
                    continue
                word = kvsvr_load64(self._bucket(i, second))
                if word >> _BUCKET_VALUE_BITS != stamp:
                    continue
                _store32(p + n, <uint32_t> i)
                _store64(p + n + 4, <uint64_t> _word_value(word))
                n += _VALUE_ENTRY_BYTES
        return out[:n]

    @staticmethod
    def now_s() -> int:
        """The clock add() and set() stamp with (CLOCK_REALTIME_COARSE, whole seconds)."""
        return kvsvr_now_s()


cdef str _kind_name(uint32_t kind):
    if kind == _KIND_COUNTER:
        return "counter"
    if kind == _KIND_GAUGE:
        return "gauge"
    if kind == _KIND_FREE:
        return "free slot"
    return f"damaged slot (kind {kind})"


# --- value blocks --------------------------------------------------------------------------

def block_invalid(buf):
    """Why `buf` is not a value block, or None if it is one."""
    cdef const uint8_t[::1] view
    try:
        view = buf
    except (TypeError, ValueError, BufferError):
        return "not a contiguous byte buffer"
    cdef Py_ssize_t n = view.shape[0]
    if n % _VALUE_ENTRY_BYTES:
        return f"{n} bytes is not a whole number of {_VALUE_ENTRY_BYTES}-byte entries"
    if n == 0:
        return None
    cdef const uint8_t* p = &view[0]
    cdef Py_ssize_t pos
    cdef uint32_t id, previous = 0
    cdef int64_t value
    for pos in range(0, n, _VALUE_ENTRY_BYTES):
        id = _load32(p + pos)
        if id < 1 or id > _MONITOR_IDS_MAX:
            return f"entry {pos // _VALUE_ENTRY_BYTES}: id {id}, expected 1..{_MONITOR_IDS_MAX}"
        if id <= previous:
            return (f"entry {pos // _VALUE_ENTRY_BYTES}: id {id} after id {previous}, "
                    "ids must be strictly ascending")
        previous = id
        # A machine's value is one bucket's: within the counters' 44-bit range. This bound
        # is what lets sums over up to 2**19 machines stay far inside an i64.
        value = <int64_t> _load64(p + pos + 4)
        if value < _VALUE_MIN or value > _VALUE_MAX:
            return (f"entry {pos // _VALUE_ENTRY_BYTES} (id {id}): value {value} is outside "
                    f"the counters' range {_VALUE_MIN}..{_VALUE_MAX}")
    return None


def encode_block(pairs) -> bytes:
    """A value block from (id, value) pairs in any order (ValueError on a repeated id)."""
    items = sorted(pairs)
    cdef Py_ssize_t count = len(items)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, count * _VALUE_ENTRY_BYTES)
    cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    cdef int64_t previous = 0
    for i in range(count):
        id, value = items[i]
        if id < 1 or id > _MONITOR_IDS_MAX:
            raise ValueError(f"id: {id}, expected 1..{_MONITOR_IDS_MAX}")
        if id == previous:
            raise ValueError(f"id: {id} appears twice")
        previous = id
        _store32(p + i * _VALUE_ENTRY_BYTES, <uint32_t> id)
        _store64(p + i * _VALUE_ENTRY_BYTES + 4, <uint64_t> <int64_t> value)
    return out


def decode_block(buf) -> dict:
    """{id: value} of a value block (the caller checked it with block_invalid)."""
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t n = view.shape[0] - view.shape[0] % _VALUE_ENTRY_BYTES
    cdef Py_ssize_t pos
    out = {}
    if n == 0:
        return out
    cdef const uint8_t* p = &view[0]
    for pos in range(0, n, _VALUE_ENTRY_BYTES):
        out[_load32(p + pos)] = <int64_t> _load64(p + pos + 4)
    return out


cdef extern from *:
    """
    static inline int kvsvr_add_overflows(int64_t a, int64_t b, int64_t *out) {
        return __builtin_add_overflow(a, b, out);
    }
    """
    bint kvsvr_add_overflows(int64_t a, int64_t b, int64_t* out) noexcept nogil


cdef bytes _merge(const uint8_t[::1] a, const uint8_t[::1] b):
    """a + b id by id over the union of ids (both ascending blocks); OverflowError
    naming the id if an i64 sum overflows (checked: sums are built from untrusted blocks)."""
    cdef Py_ssize_t na = a.shape[0] // _VALUE_ENTRY_BYTES
    cdef Py_ssize_t nb = b.shape[0] // _VALUE_ENTRY_BYTES
    cdef bytes out = PyBytes_FromStringAndSize(NULL, (na + nb) * _VALUE_ENTRY_BYTES)
    cdef uint8_t* o = <uint8_t*> PyBytes_AS_STRING(out)
    cdef const uint8_t* pa = &a[0] if na else NULL
    cdef const uint8_t* pb = &b[0] if nb else NULL
    cdef Py_ssize_t i = 0, j = 0, n = 0
    cdef uint32_t ida, idb, id
    cdef int64_t va, vb, value
    cdef uint32_t overflowed = 0
    with nogil:
        while i < na or j < nb:
            ida = _load32(pa + i * _VALUE_ENTRY_BYTES) if i < na else 0xFFFFFFFF
            idb = _load32(pb + j * _VALUE_ENTRY_BYTES) if j < nb else 0xFFFFFFFF
            va = vb = 0
            if ida <= idb:
                id = ida
                va = <int64_t> _load64(pa + i * _VALUE_ENTRY_BYTES + 4)
                i += 1
            else:
                id = idb
            if idb == id:
                vb = <int64_t> _load64(pb + j * _VALUE_ENTRY_BYTES + 4)
                j += 1
            if kvsvr_add_overflows(va, vb, &value):
                overflowed = id
                break
            _store32(o + n, id)
            _store64(o + n + 4, <uint64_t> value)
            n += _VALUE_ENTRY_BYTES
    if overflowed:
        raise OverflowError(f"id {overflowed}: the sum across machines overflows a 64-bit "
                            "value")
    return out[:n]


def sum_blocks(blocks) -> bytes:
    """The value block summing the given blocks id by id (present where any block has it);
    OverflowError naming the id if a sum leaves the i64 range."""
    cdef bytes total = b""
    for block in blocks:
        total = _merge(total, block)
    return total


def merge_blocks(a, b) -> bytes:
    """a + b id by id over the union of their ids (a sum block plus a new machine block);
    OverflowError naming the id if a sum leaves the i64 range."""
    return _merge(a, b)


cdef inline Py_ssize_t _find(const uint8_t* p, Py_ssize_t count, uint32_t id) noexcept nogil:
    cdef Py_ssize_t low = 0, high = count - 1, middle
    cdef uint32_t at
    while low <= high:
        middle = (low + high) >> 1
        at = _load32(p + middle * _VALUE_ENTRY_BYTES)
        if at == id:
            return middle
        if at < id:
            low = middle + 1
        else:
            high = middle - 1
    return -1


def block_value(buf, uint32_t id):
    """The value of `id` in a value block, or None (binary search)."""
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t count = view.shape[0] // _VALUE_ENTRY_BYTES
    if count == 0:
        return None
    cdef Py_ssize_t at = _find(&view[0], count, id)
    if at < 0:
        return None
    return <int64_t> _load64(&view[0] + at * _VALUE_ENTRY_BYTES + 4)


def block_series(blocks, uint32_t id) -> list:
    """[value or None] of `id` in each of `blocks` (None for a missing block)."""
    cdef list out = []
    cdef const uint8_t[::1] view
    cdef Py_ssize_t count, at
    for block in blocks:
        if block is None:
            out.append(None)
            continue
        view = block
        count = view.shape[0] // _VALUE_ENTRY_BYTES
        if count == 0:
            out.append(None)
            continue
        at = _find(&view[0], count, id)
        out.append(None if at < 0 else <int64_t> _load64(&view[0] + at * _VALUE_ENTRY_BYTES + 4))
    return out
