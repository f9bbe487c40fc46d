# cython: language_level=3
"""fdatasync on a native thread that never takes the GIL: the vote log's group commit.

A Python thread would do the same job badly here. The replica's loop gives up the GIL for
every LMDB call (py-lmdb releases it around each get and put), and a Python sync thread that
woke from its fdatasync would take it at one of those points and then have to be scheduled
before handing it back; on a busy 2-core machine the loop spent about a quarter of its time
waiting for it (measured with py-spy --native). This thread only touches a mutex the loop
holds for a few instructions, and wakes the loop through an eventfd.

The protocol: the loop writes frames (pwrite) and calls request(seq) with the last frame's
sequence number; the thread fdatasyncs and then publishes `synced` = the highest sequence
number requested before that fdatasync began (every pwrite of those frames had returned, so
the fdatasync covers them), and writes 1 to the eventfd (unless the loop said nothing of its
own waits for it: wake_on_sync). While one fdatasync runs, further
requests wait for the next one, which covers them all. A failed fdatasync is never retried
(after a failure the kernel may have dropped the pages it could not write): `error` is set
and the thread stops.

It also sends what waited for a sync. The messages that reveal votes must not leave before
the frames holding those votes are durable; left to the loop, they went out when the loop
next looked, which under load was after the round it was in: about as long again as the
fdatasync itself, twice per write (the proposer's sync, then the acceptor's). So the loop
hands such a message over with the sequence number it waits for (`send_after`), and this
thread sends it on a ZeroMQ socket of its own the moment that sequence number is durable.
A socket handed over (`add_socket`) is used by this thread alone from then on (the mutex
taken to hand it over is the full memory barrier ZeroMQ asks for between threads), and it
sends outside the mutex, so the loop never waits for a send. It calls libzmq's zmq_send
through a pointer the caller looks up in the libzmq pyzmq loaded, so this module links to
no libzmq of its own.
"""

from libc.errno cimport errno
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, strerror

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport fdatasync, write


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **result)
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *cond)
    int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
    int pthread_cond_broadcast(pthread_cond_t *cond)


ctypedef int (*_send_fn)(void *socket, const void *data, size_t length, int flags) noexcept nogil

cdef enum:
    _ZMQ_DONTWAIT = 1
    _SOCKETS_MAX = 16


cdef struct _Outgoing:        # a message that waits for a sync; its bytes follow the struct
    uint64_t seq
    int slot
    size_t length
    _Outgoing *next


cdef struct _State:
    int fd
    int wake_fd
    pthread_mutex_t mutex
    pthread_cond_t cond       # signalled on a request, a finished sync, an error and closing
    uint64_t requested
    uint64_t synced
    uint64_t syncs
    uint64_t sync_ns
    int error                 # errno of a failed fdatasync, 0 if none
    bint closing
    bint idle                 # the thread waits for a request (else it sees one when done)
    bint wake_after_sync      # write the eventfd after every sync (else only after a failure)
    _send_fn send             # libzmq's zmq_send (NULL: no socket handed over)
    void *sockets[_SOCKETS_MAX]
    int socket_count
    _Outgoing *head           # messages waiting for `synced`, in the order handed over
    _Outgoing *tail
    uint64_t sent
    uint64_t send_drops       # refused by a full (or unconnected) socket: the peer is behind


cdef inline bint _sendable(_State *s) noexcept nogil:
    """Something waits for frames that are durable now (the mutex is held)."""
    return s.head != NULL and s.head.seq <= s.synced


cdef void _send_durable(_State *s) noexcept nogil:
    """Send what waits for frames now durable: called with the mutex held, it lets go of it
    while it sends. Sequence numbers are handed over in order, so those are a prefix."""
    cdef _Outgoing *first = s.head
    cdef _Outgoing *last = NULL
    cdef _Outgoing *item
    cdef uint64_t sent = 0, dropped = 0
    while s.head != NULL and s.head.seq <= s.synced:
        last = s.head
        s.head = last.next
    if last == NULL:
        return
    last.next = NULL
    if s.head == NULL:
        s.tail = NULL
    pthread_mutex_unlock(&s.mutex)
    while first != NULL:
        item = first
        first = item.next
        if s.send(s.sockets[item.slot], <char *>item + sizeof(_Outgoing), item.length,
                  _ZMQ_DONTWAIT) < 0:
            dropped += 1
        else:
            sent += 1
        free(item)
    pthread_mutex_lock(&s.mutex)
    s.sent += sent
    s.send_drops += dropped


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef void *_run(void *arg) noexcept nogil:
    cdef _State *s = <_State *>arg
    cdef uint64_t through, started, elapsed, one = 1
    cdef int failed
    cdef bint wake
    while True:
        pthread_mutex_lock(&s.mutex)
        while s.requested <= s.synced and not s.closing and not _sendable(s):
            s.idle = True
            pthread_cond_wait(&s.cond, &s.mutex)
            s.idle = False
        if _sendable(s):
            _send_durable(s)   # (handed over after their frames were durable: no sync)
            pthread_mutex_unlock(&s.mutex)
            continue
        if s.requested <= s.synced:
            pthread_mutex_unlock(&s.mutex)
            return NULL   # closing with nothing left to sync
        through = s.requested
        pthread_mutex_unlock(&s.mutex)
        started = _now_ns()
        failed = errno if fdatasync(s.fd) != 0 else 0
        elapsed = _now_ns() - started
        pthread_mutex_lock(&s.mutex)
        if failed:
            s.error = failed
        else:
            if through > s.synced:
                s.synced = through
            s.syncs += 1
            s.sync_ns += elapsed
        pthread_cond_broadcast(&s.cond)
        if not failed:
            _send_durable(s)   # first: they are what a write waits for
        wake = failed or s.wake_after_sync
        pthread_mutex_unlock(&s.mutex)
        if wake:
            write(s.wake_fd, &one, sizeof(one))   # an eventfd: 8 bytes, never blocks for long
        if failed:
            return NULL


cdef class Syncer:
    """fdatasync(fd) on a native thread for frames written up to a sequence number."""

    cdef _State _s
    cdef pthread_t _thread
    cdef bint _running

    def __cinit__(self, int fd, int wake_fd, uint64_t synced=0):
        self._s.fd = fd
        self._s.wake_fd = wake_fd
        self._s.requested = synced
        self._s.synced = synced
        self._s.syncs = 0
        self._s.sync_ns = 0
        self._s.error = 0
        self._s.closing = False
        self._s.idle = False
        self._s.wake_after_sync = True
        self._s.send = NULL
        self._s.socket_count = 0
        self._s.head = NULL
        self._s.tail = NULL
        self._s.sent = 0
        self._s.send_drops = 0
        self._running = False
        pthread_mutex_init(&self._s.mutex, NULL)
        pthread_cond_init(&self._s.cond, NULL)
        cdef int rc = pthread_create(&self._thread, NULL, _run, &self._s)
        if rc != 0:
            raise OSError(rc, f"vote log sync thread: {strerror(rc).decode()}")
        self._running = True

    def request(self, uint64_t seq) -> None:
        """Frames up to `seq` are written: make them durable."""
        cdef bint wake = False
        pthread_mutex_lock(&self._s.mutex)
        if seq > self._s.requested:
            self._s.requested = seq
            # A thread in the middle of a sync looks again when it is done: only an idle one
            # is woken (a futex syscall saved for most rounds under load).
            wake = self._s.idle
        pthread_mutex_unlock(&self._s.mutex)
        if wake:
            pthread_cond_broadcast(&self._s.cond)

    def wake_on_sync(self, bint on) -> None:
        """Whether a finished sync writes the eventfd (a failed one always does). The loop
        turns it off while nothing of its own waits for a sync (the thread sends the votes
        itself): under load that is one wake-up of the loop saved per fdatasync. Turned on
        before the loop looks at `synced` one last time, a sync that ends after that look
        wakes it, so nothing waits for a later event."""
        pthread_mutex_lock(&self._s.mutex)
        self._s.wake_after_sync = on
        pthread_mutex_unlock(&self._s.mutex)

    def mark_durable(self, uint64_t seq) -> None:
        """Frames up to `seq` are durable by other means (a checkpoint committed them)."""
        pthread_mutex_lock(&self._s.mutex)
        if seq > self._s.synced:
            self._s.synced = seq
        if seq > self._s.requested:
            self._s.requested = seq
        pthread_cond_broadcast(&self._s.cond)   # (also: what waited for it can be sent)
        pthread_mutex_unlock(&self._s.mutex)

    def add_socket(self, uintptr_t send_fn, uintptr_t socket) -> int:
        """Hand over a ZeroMQ socket (its libzmq handle; `send_fn` is libzmq's zmq_send):
        from now on only the sync thread uses it, until close() returns. Its slot number."""
        if not send_fn or not socket:
            raise ValueError("send_fn, socket: libzmq handles, not NULL")
        pthread_mutex_lock(&self._s.mutex)
        if not self._running or self._s.closing:
            pthread_mutex_unlock(&self._s.mutex)
            raise ValueError("socket: the sync thread is closed")
        if self._s.socket_count >= _SOCKETS_MAX:
            pthread_mutex_unlock(&self._s.mutex)
            raise ValueError(f"socket: a sync thread takes at most {_SOCKETS_MAX}")
        if self._s.send != NULL and self._s.send != <_send_fn>send_fn:
            pthread_mutex_unlock(&self._s.mutex)
            raise ValueError("send_fn: every socket must use the same libzmq")
        self._s.send = <_send_fn>send_fn
        slot = self._s.socket_count
        self._s.sockets[slot] = <void *>socket
        self._s.socket_count += 1
        pthread_mutex_unlock(&self._s.mutex)
        return slot

    def send_after(self, uint64_t seq, int slot, const unsigned char[:] data) -> bool:
        """Send `data` on socket `slot` once frames up to `seq` are durable (now, if they
        are). False if it was not taken: the thread stopped (a sync failed, or closing)."""
        cdef size_t length = data.shape[0]
        cdef _Outgoing *item
        cdef bint wake
        if not self._running:
            return False   # closed: its sockets may be gone
        if not 0 <= slot < self._s.socket_count:
            raise ValueError(f"slot: {slot} is not a socket handed over")
        item = <_Outgoing *>malloc(sizeof(_Outgoing) + length)
        if item == NULL:
            raise MemoryError()
        item.seq = seq
        item.slot = slot
        item.length = length
        item.next = NULL
        if length:
            memcpy(<char *>item + sizeof(_Outgoing), &data[0], length)
        pthread_mutex_lock(&self._s.mutex)
        if self._s.error != 0 or self._s.closing:
            pthread_mutex_unlock(&self._s.mutex)
            free(item)
            return False
        if self._s.tail == NULL:
            self._s.head = item
        else:
            self._s.tail.next = item
        self._s.tail = item
        # Durable already: the thread sends it now (a busy one looks when its sync ends).
        wake = self._s.idle and seq <= self._s.synced
        pthread_mutex_unlock(&self._s.mutex)
        if wake:
            pthread_cond_broadcast(&self._s.cond)
        return True

    @property
    def sends(self) -> tuple:
        """(messages sent, refused by a full or unconnected socket, still waiting)."""
        cdef uint64_t waiting = 0
        cdef _Outgoing *item
        pthread_mutex_lock(&self._s.mutex)
        item = self._s.head
        while item != NULL:
            waiting += 1
            item = item.next
        result = (self._s.sent, self._s.send_drops, waiting)
        pthread_mutex_unlock(&self._s.mutex)
        return result

    def wait(self, uint64_t seq) -> None:
        """Block until frames up to `seq` are durable (or a sync failed)."""
        with nogil:
            pthread_mutex_lock(&self._s.mutex)
            while self._s.synced < seq and self._s.error == 0 and self._running:
                pthread_cond_wait(&self._s.cond, &self._s.mutex)
            pthread_mutex_unlock(&self._s.mutex)

    cdef tuple _read(self):
        pthread_mutex_lock(&self._s.mutex)
        result = (self._s.synced, self._s.syncs, self._s.sync_ns, self._s.error)
        pthread_mutex_unlock(&self._s.mutex)
        return result

    @property
    def synced(self) -> int:
        """Every frame up to this sequence number is durable."""
        return self._read()[0]

    @property
    def stats(self) -> tuple:
        """(synced, fdatasyncs done, nanoseconds they took, errno of a failure or 0)."""
        return self._read()

    def close(self) -> None:
        """Finish the sync under way (and one for frames requested before), then stop."""
        self._stop()

    cdef void _stop(self) noexcept:
        if not self._running:
            return
        pthread_mutex_lock(&self._s.mutex)
        self._s.closing = True
        pthread_cond_broadcast(&self._s.cond)
        pthread_mutex_unlock(&self._s.mutex)
        with nogil:
            pthread_join(self._thread, NULL)
        self._running = False
        # What still waits is dropped (its votes are not durable: it must never leave), and
        # no socket is touched after this: the caller may close them.
        cdef _Outgoing *item
        while self._s.head != NULL:
            item = self._s.head
            self._s.head = item.next
            free(item)
        self._s.tail = NULL
        self._s.socket_count = 0

    def __dealloc__(self):
        self._stop()
        pthread_cond_destroy(&self._s.cond)
        pthread_mutex_destroy(&self._s.mutex)
