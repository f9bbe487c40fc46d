# The version quorum: committing version v of a key is one single-decree Paxos instance
# among the group's replicas. This file is the whole protocol, as a state machine with no I/O.
#
# Time: every entry point takes `now_ms`, milliseconds on the caller's monotonic clock (the
# node converts its seconds once a round; the simulator counts one per tick). The timeouts of
# _consts.pxi (the *_MS) are in the same milliseconds.
#
# Inputs:  propose(key, version, value, now_ms), step(message, now_ms, floor), tick(now_ms),
#          step_all(messages, now_ms, floors, voting) (a frame of messages, each key's floor
#          given: floor_keys(messages) lists the keys), forget(key, version, chosen_value)
#          once the caller applied a chosen version.
# Outputs: ready() -> Ready(persist, send, decided), then advance(ready) once persisted:
#   persist: records to make durable BEFORE any message of the same ready() is sent:
#            InstanceRecord(INSTANCE, key, version, promised, accepted_ballot,
#                           accepted_value, chosen_value)
#            FenceRecord(FENCE, peer, incarnation)   drop that peer's messages from older lives
#            RebuiltRecord(REBUILT, incarnation)     this life may vote (it rebuilt from a quorum)
#            VerifiedRecord(VERIFIED, incarnation)   this life rebuilt from every peer: fast path
#   send:    Message objects
#   decided: Decided(key, version, value, own_value_chosen) for proposals of this replica that
#            finished; own_value_chosen is False when another value won the version (retry at
#            version + 1, or report a compare-and-set conflict). value is None when the
#            version is known chosen but not its value (an acceptor was past it: catch up
#            first), or when a recovery proposal (value None) found nothing that could have
#            been chosen.
#   take_learned() -> instance records learned chosen since the last call (applied by the
#            caller). Not in persist (see _learn): the caller may log them, but nothing it
#            sends waits for that.
# The records keep their kind string first: the vote log and the store encode each as the
# array of its fields, byte for byte what the plain tuples they replaced encoded to.
# The caller persists, acknowledges (advance), then sends, then acts on decided: ready()
# refuses to hand out more while a persist is unacknowledged. CHOSEN messages reveal no vote
# of this replica and need not wait for the persist.
#
# Rules worth reading twice:
# - Round 0 of every version belongs to the key's home replica. Its ballot is the lowest any
#   proposer can hold, so no lower ballot can have been accepted and phase 1 is skipped: the
#   home commits in one round trip to a majority. Everyone else starts at round 1 with a
#   prepare, and a prepare adopts the value of the highest ballot reported accepted.
# - An acceptor that lost its disk forgets its promises; voting at once could let two values
#   be chosen for one version. A wiped replica restarts with a new incarnation in the
#   `rebuilding` state: it answers no prepare or accept until it has merged the acceptor
#   state of every other replica (rebuild_quorum(n) = n - 1: a peer that answered has fenced
#   the old life, and only when all have can no proposer still count a vote of that life),
#   taking the highest promise and highest accepted ballot of each instance.
#   A peer's answer comes in parts (a frame has a size limit); records merge as they come,
#   but the peer counts toward the quorum only once every part of one answer arrived, so a
#   transfer is never taken half received.
# - A life must not be confused with an earlier one: ballots carry the incarnation, and a peer
#   that answers a state request fences the requester's older incarnations (persisted), so
#   messages of a dead life still in the network are dropped. The fast path (round 0 without
#   a prepare) is safe only if no earlier life may have used round 0 where this life cannot
#   see it: a first life, or a rebuilt life (every peer fenced its past).
# - Round 0 belongs to the key's home (xxh64(key) % n), computed here, not taken from the
#   caller; an acceptor refuses a round-0 ballot of any other node.
# - Floors. Instances are kept only until the caller has applied them; then forget() drops
#   them (memory and disk stay bounded by what is in flight). The caller passes the key's
#   applied version as `floor` with every message (step_all: in `floors`, and a key missing
#   there is an error, never floor 0): a version at or below it was chosen and applied, so
#   an acceptor answers BEHIND instead of voting (it must never vote again on an instance it
#   forgot), and a proposer that hears BEHIND stops: its version is taken.


from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_SET_ITEM
from cpython.type cimport PyType_GenericAlloc

from collections import namedtuple as _namedtuple
from xxhash import xxh64_intdigest as _xxh64


cpdef int majority(int replicas):
    return replicas // 2 + 1


cpdef int rebuild_quorum(int replicas):
    """Other replicas a wiped acceptor must hear from before it may vote again: all of them.

    A peer's state is a snapshot taken when it answers; it may still join a quorum with the
    dead life afterwards, and a proposer that has not fenced the dead life still counts its
    late votes. Only when every peer has fenced the old life (by answering) can no proposer
    count it any more. With 3 replicas that is the 2 others anyway; with 5 or 7, waiting for
    fewer let two values be chosen (found in review, tests/test_quorum.py replays it)."""
    return replicas - 1


PENDING = 0
WON = 1
LOST = 2


cpdef int vote_result(int yes, int no, int replicas):
    """PENDING, WON or LOST for a vote with `yes` and `no` answers so far."""
    cdef int need = majority(replicas)
    if yes >= need:
        return WON
    if no > replicas - need:
        return LOST
    return PENDING


cpdef uint64_t make_ballot(uint64_t round_number, int node, uint64_t incarnation=1):
    return ((round_number << 24) | (incarnation << 8) | <uint64_t> node) + 1


cpdef uint64_t ballot_round(uint64_t ballot):
    return 0 if ballot == 0 else (ballot - 1) >> 24


cpdef int ballot_node(uint64_t ballot):
    return -1 if ballot == 0 else <int> ((ballot - 1) & 0xFF)


cpdef uint64_t ballot_incarnation(uint64_t ballot):
    return 0 if ballot == 0 else ((ballot - 1) >> 8) & 0xFFFF


# --- what the core hands its caller: named tuples ------------------------------------------
# The kinds of persist records, each record's first field.
INSTANCE = "instance"
FENCE = "fence"
REBUILT = "rebuilt"
VERIFIED = "verified"
cdef str _INSTANCE = INSTANCE

cdef type _InstanceRecord = _namedtuple("InstanceRecord", (
    "kind", "key", "version", "promised", "accepted_ballot", "accepted_value", "chosen_value"),
    module=__name__)
cdef type _FenceRecord = _namedtuple("FenceRecord", ("kind", "peer", "incarnation"),
                                     module=__name__)
cdef type _RebuiltRecord = _namedtuple("RebuiltRecord", ("kind", "incarnation"),
                                       module=__name__)
cdef type _VerifiedRecord = _namedtuple("VerifiedRecord", ("kind", "incarnation"),
                                        module=__name__)
cdef type _Decided = _namedtuple("Decided", ("key", "version", "value", "own_value_chosen"),
                                 module=__name__)
cdef type _Ready = _namedtuple("Ready", ("persist", "send", "decided"), module=__name__)
_InstanceRecord.__doc__ = (
    "An acceptor's state for one (key, version): what it promised, accepted and knows chosen.")
_FenceRecord.__doc__ = "Messages of `peer` from lives before `incarnation` are dropped."
_RebuiltRecord.__doc__ = "Life `incarnation` rebuilt its acceptor state from its peers: it votes."
_VerifiedRecord.__doc__ = (
    "Life `incarnation` rebuilt from every peer: round 0 without a prepare is safe for it.")
_Decided.__doc__ = (
    "A proposal of this replica finished: `value` chosen for (key, version) (None: taken, "
    "value unknown, or a recovery that found nothing), `own_value_chosen` if it was its own.")
_Ready.__doc__ = (
    "What the core asks of its caller: make `persist` durable, acknowledge it with "
    "advance(), then send `send`, then act on `decided`.")
InstanceRecord = _InstanceRecord
FenceRecord = _FenceRecord
RebuiltRecord = _RebuiltRecord
VerifiedRecord = _VerifiedRecord
Decided = _Decided
Ready = _Ready
PersistRecord = _InstanceRecord | _FenceRecord | _RebuiltRecord | _VerifiedRecord
cdef dict _RECORD_TYPES = {INSTANCE: _InstanceRecord, FENCE: _FenceRecord,
                           REBUILT: _RebuiltRecord, VERIFIED: _VerifiedRecord}


cdef inline void _put(object out, Py_ssize_t i, object item):
    Py_INCREF(item)   # (SET_ITEM takes over a reference)
    PyTuple_SET_ITEM(out, i, item)


# The named tuples are built as tuple.__new__ builds a subclass's instance (allocate, fill),
# not by calling the class, whose __new__ is written in Python: these build every record and
# decision on the hot path.
cdef object _named(type cls, tuple fields):
    cdef Py_ssize_t i, n = len(fields)
    cdef object out = PyType_GenericAlloc(cls, n)
    for i in range(n):
        _put(out, i, <object> PyTuple_GET_ITEM(fields, i))
    return out


cdef inline object _instance_record(bytes key, uint64_t version, uint64_t promised,
                                    uint64_t accepted_ballot, object accepted_value,
                                    object chosen_value):
    cdef object out = PyType_GenericAlloc(_InstanceRecord, 7)
    _put(out, 0, _INSTANCE)
    _put(out, 1, key)
    _put(out, 2, version)
    _put(out, 3, promised)
    _put(out, 4, accepted_ballot)
    _put(out, 5, accepted_value)
    _put(out, 6, chosen_value)
    return out


cdef inline object _decided(bytes key, uint64_t version, object value, bint own_value_chosen):
    cdef object out = PyType_GenericAlloc(_Decided, 4)
    _put(out, 0, key)
    _put(out, 1, version)
    _put(out, 2, value)
    _put(out, 3, own_value_chosen)
    return out


def persist_record(fields):
    """The persist record of `fields`, a decoded array with its kind first (a vote log frame
    or an old caller's plain tuple). ValueError for an unknown kind or a wrong field count."""
    kind = fields[0] if len(fields) else None
    cls = _RECORD_TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        raise ValueError(f"record: unknown quorum record kind {kind!r}")
    if len(fields) != len(cls._fields):
        raise ValueError(f"record: a {kind} record has {len(cls._fields)} fields, "
                         f"not {len(fields)}")
    return _named(cls, tuple(fields))


cdef class Message:
    """One quorum message. `accepted_ballot` carries the acceptor's accepted ballot in a
    PROMISE and STATE, and its promise in a REJECT."""
    cdef readonly int kind
    cdef readonly int source
    cdef readonly int target
    cdef readonly uint64_t incarnation
    cdef readonly bytes key
    cdef readonly uint64_t version
    cdef readonly uint64_t ballot
    cdef readonly uint64_t accepted_ballot
    cdef readonly object value

    def __init__(self, int kind, int source, int target, uint64_t incarnation, bytes key,
                 uint64_t version, uint64_t ballot=0, uint64_t accepted_ballot=0,
                 object value=None):
        self.kind = kind
        self.source = source
        self.target = target
        self.incarnation = incarnation
        self.key = key
        self.version = version
        self.ballot = ballot
        self.accepted_ballot = accepted_ballot
        self.value = value

    def __repr__(self):
        return (f"Message(kind={self.kind}, {self.source}->{self.target}, key={self.key!r}, "
                f"version={self.version}, ballot={self.ballot}, "
                f"accepted_ballot={self.accepted_ballot}, value={self.value!r})")


cdef inline Py_ssize_t _size_of(object value):
    # Values are binlog records (bytes) in the node; the simulator proposes any object.
    return len(<bytes> value) if type(value) is bytes else 0


def any_kind(list messages not None, int kind):
    """Whether any of `messages` is of `kind` (a loop the shell asks for on every round)."""
    cdef Message m
    for m in messages:
        if m.kind == kind:
            return True
    return False


def floor_keys(list messages not None):
    """The distinct keys (in order of first mention) that a PREPARE, ACCEPT or CHOSEN message
    of `messages` names: those whose applied version QuorumReplica.step_all needs."""
    cdef Message m
    cdef int kind
    cdef list keys = []
    cdef set seen = set()
    for m in messages:
        kind = m.kind
        if m.key and (kind == MSG_PREPARE or kind == MSG_ACCEPT or kind == MSG_CHOSEN) \
                and m.key not in seen:
            seen.add(m.key)
            keys.append(m.key)
    return keys


cdef class _Instance:
    """An acceptor's state for one (key, version)."""
    cdef public uint64_t promised
    cdef public uint64_t accepted_ballot
    cdef public object accepted_value
    cdef public object chosen_value

    def __init__(self):
        self.promised = 0
        self.accepted_ballot = 0
        self.accepted_value = None
        self.chosen_value = None

    cdef object record(self, bytes key, uint64_t version):
        return _instance_record(key, version, self.promised, self.accepted_ballot,
                                self.accepted_value, self.chosen_value)


cdef enum Phase:
    PHASE_PREPARE = 1
    PHASE_ACCEPT = 2
    PHASE_WAIT = 3      # backing off before the next ballot


cdef class _Proposal:
    cdef bytes key
    cdef uint64_t version
    cdef object own_value
    cdef object value            # what is being proposed at this ballot (own or adopted)
    cdef bint home
    cdef Phase phase
    cdef uint64_t ballot
    cdef uint64_t highest_seen   # highest ballot heard of for this instance
    cdef dict promises           # node -> (accepted_ballot, accepted_value)
    cdef set accepted
    cdef set rejected
    cdef double deadline_ms
    cdef int attempts


cdef class QuorumReplica:
    """One replica's side of the version quorum for every key of its group."""
    cdef readonly int node
    cdef readonly int replicas
    cdef readonly uint64_t incarnation
    cdef readonly bint rebuilding
    cdef readonly bint fast_path  # round 0 without a prepare is safe for this life
    cdef dict _instances         # (key, version) -> _Instance
    cdef dict _versions          # key -> set of versions in _instances (for highest_open)
    cdef dict _fences            # peer -> lowest incarnation of it still listened to
    cdef dict _proposals         # (key, version) -> _Proposal
    cdef dict _rebuild_done      # node -> incarnation that finished sending its state
    cdef dict _state_parts       # node -> {answer: parts received} of its answers under way
    cdef uint32_t _answers       # state answers given (numbers them)
    cdef readonly Py_ssize_t state_part_bytes
    cdef list _persist
    cdef object _unacknowledged  # the last Ready with records, until advance() takes it
    cdef list _send
    cdef list _decided
    cdef list _learned
    cdef set _dirty
    cdef double _next_state_request_ms

    def __init__(self, int node, int replicas, uint64_t incarnation=1, bint rebuilding=False,
                 Py_ssize_t state_part_bytes=_STATE_PART_BYTES, uint32_t answer_base=0):
        if replicas < 1 or replicas > _REPLICAS_MAX:
            raise ValueError(f"replicas: {replicas}, expected 1..{_REPLICAS_MAX}")
        if node < 0 or node >= replicas:
            raise ValueError(f"node: {node}, expected 0..{replicas - 1}")
        if incarnation < 1 or incarnation > _INCARNATION_MAX:
            raise ValueError(f"incarnation: {incarnation}, expected 1..{_INCARNATION_MAX}")
        if rebuilding and replicas == 1:
            raise ValueError("rebuilding: a group of one replica has no peer to rebuild from; "
                             "its data is lost")
        self.node = node
        self.replicas = replicas
        self.incarnation = incarnation
        self.rebuilding = rebuilding
        self.fast_path = incarnation == 1 and not rebuilding
        self._instances = {}
        self._versions = {}
        self._fences = {}
        self._proposals = {}
        if state_part_bytes < 1:
            raise ValueError(f"state_part_bytes: {state_part_bytes}, expected >= 1")
        self.state_part_bytes = state_part_bytes  # smaller only in tests, to make many parts
        self._rebuild_done = {}
        self._state_parts = {}
        # Answers are numbered from a base the caller draws at random for each process life,
        # so parts of an answer given before a restart never complete one given after it.
        self._answers = answer_base
        self._persist = []
        self._unacknowledged = None
        self._send = []
        self._decided = []
        self._learned = []
        self._dirty = set()
        self._next_state_request_ms = 0
        if rebuilding:
            self._request_state(0)

    def home(self, bytes key):
        """The replica that owns round 0 of every version of `key`."""
        return _xxh64(key) % self.replicas

    # --- restoring from what was persisted ------------------------------------------------
    def restore(self, records):
        """Load persisted records after a restart that kept the disk. A life after the first
        that had not finished rebuilding when it stopped goes on rebuilding."""
        cdef _Instance instance
        cdef bint rebuilt = self.incarnation == 1
        for record in records:
            if isinstance(record, _InstanceRecord):
                instance = _Instance()
                instance.promised = record.promised
                instance.accepted_ballot = record.accepted_ballot
                instance.accepted_value = record.accepted_value
                instance.chosen_value = record.chosen_value
                self._instances[(record.key, record.version)] = instance
                self._versions.setdefault(record.key, set()).add(record.version)
            elif isinstance(record, _FenceRecord):
                self._fences[record.peer] = max(self._fences.get(record.peer, 0),
                                                record.incarnation)
            elif isinstance(record, _VerifiedRecord):
                self.fast_path = self.fast_path or record.incarnation == self.incarnation
            elif isinstance(record, _RebuiltRecord):
                rebuilt = rebuilt or record.incarnation == self.incarnation
            else:
                raise TypeError(f"records: {record!r} is not a persist record (InstanceRecord, "
                                "FenceRecord, RebuiltRecord or VerifiedRecord)")
        if not rebuilt and not self.rebuilding:
            self.rebuilding = True
            self._request_state(0)

    def acceptor_state(self, bytes key, uint64_t version):
        """(promised, accepted_ballot, accepted_value, chosen_value), for tests and status."""
        cdef _Instance instance = self._instances.get((key, version))
        if instance is None:
            return (0, 0, None, None)
        return (instance.promised, instance.accepted_ballot, instance.accepted_value,
                instance.chosen_value)

    def chosen_value(self, bytes key, uint64_t version):
        """The value known chosen for (key, version), not yet forgotten, else None."""
        cdef _Instance instance = self._instances.get((key, version))
        return None if instance is None else instance.chosen_value

    @property
    def proposals_in_flight(self):
        return len(self._proposals)

    @property
    def instances(self):
        """Instances held (not yet forgotten): what the caller has not applied."""
        return len(self._instances)

    def proposing(self, bytes key, uint64_t version):
        return (key, version) in self._proposals

    def highest_open(self, bytes key):
        """The highest version of `key` this acceptor holds a value for (accepted or chosen,
        not yet applied and forgotten), or 0. A linearizable read must not answer below it
        without finishing that instance: it may already be chosen."""
        cdef _Instance instance
        cdef uint64_t best = 0
        for version in self._versions.get(key, ()):
            instance = self._instances[(key, version)]
            if (instance.accepted_ballot or instance.chosen_value is not None) \
                    and version > best:
                best = version
        return best

    def forget_through(self, bytes key, uint64_t version):
        """The caller installed a copy of `key` at `version` (a snapshot): drop every instance
        at or below it. Returns the versions dropped (their persisted state goes too)."""
        dropped = sorted(v for v in self._versions.get(key, ()) if v <= version)
        for v in dropped:
            self.forget(key, v, None)
        for v in [v for (k, v) in self._proposals if k == key and v <= version]:
            self.forget(key, v, None)
        return dropped

    def forget(self, bytes key, uint64_t version, object chosen_value=None):
        """The caller applied `version` of `key` (durably): drop the instance. A proposal of
        ours still open on it finishes now, with `chosen_value` if known."""
        cdef tuple instance_key = (key, version)
        cdef _Proposal proposal = self._proposals.get(instance_key)
        if proposal is not None:
            self._finish(proposal, chosen_value)
        if self._instances.pop(instance_key, None) is not None:
            self._dirty.discard(instance_key)
            versions = self._versions.get(key)
            if versions is not None:
                versions.discard(version)
                if not versions:
                    del self._versions[key]

    # --- outputs ----------------------------------------------------------------------------
    def take_learned(self):
        """Instance records (as in persist) of the instances learned chosen since the last
        call, by a proposal of ours or a CHOSEN message: the caller applies them, and may
        log them so that a restart applies them at once, but no message waits for that."""
        cdef _Instance instance
        cdef list records = []
        for instance_key in self._learned:
            instance = self._instances.get(instance_key)
            if instance is not None:
                records.append(instance.record(instance_key[0], instance_key[1]))
        self._learned = []
        return records

    def ready(self):
        """Ready(persist, send, decided) since the last call. The caller makes `persist`
        durable, then acknowledges with advance(ready), then sends: until a Ready with records
        is acknowledged, ready() raises RuntimeError (a send must never overtake the votes it
        reveals)."""
        if self._unacknowledged is not None:
            raise RuntimeError("ready: the persist records of the last ready() are not "
                               "acknowledged; call advance(ready) once they are durable")
        cdef _Instance instance
        # Instance records first, markers (fences, rebuilt, verified) after them, so that a
        # caller persisting in order can never record "rebuilt" without the merged state.
        cdef list records = []
        for instance_key in self._dirty:
            instance = self._instances[instance_key]
            records.append(instance.record(instance_key[0], instance_key[1]))
        self._dirty.clear()
        if self._persist:
            records.extend(self._persist)
            self._persist = []
        out = _named(_Ready, (records, self._send, self._decided))
        self._send, self._decided = [], []
        if records:
            self._unacknowledged = out
        return out

    def advance(self, ready not None):
        """`ready.persist` (of the last ready()) is durable, or as durable as the caller's
        log makes it before anything is sent (the node: written into its vote log frame, the
        sends held for that frame's sync): ready() may hand out more. Acknowledging a Ready
        with records that is not the one outstanding (twice, or an older one) raises
        RuntimeError; one without records needs none and is let pass."""
        if ready is self._unacknowledged:
            self._unacknowledged = None
        elif ready.persist:
            raise RuntimeError("advance: this Ready is not the one awaiting acknowledgement "
                               "(acknowledged already, or not the last ready())")

    cdef void _emit(self, int kind, int target, bytes key, uint64_t version, uint64_t ballot=0,
                    uint64_t accepted_ballot=0, object value=None):
        self._send.append(Message(kind, self.node, target, self.incarnation, key, version,
                                  ballot, accepted_ballot, value))

    cdef _Instance _instance(self, bytes key, uint64_t version):
        cdef tuple instance_key = (key, version)
        cdef _Instance instance = self._instances.get(instance_key)
        if instance is None:
            instance = _Instance()
            self._instances[instance_key] = instance
            self._versions.setdefault(key, set()).add(version)
        return instance

    # --- proposer -----------------------------------------------------------------------------
    def propose(self, bytes key, uint64_t version, object value, double now_ms,
                bint recover=False):
        """Start committing `value` as `version` of `key`. Returns False if this replica
        cannot propose now (rebuilding, the instance is busy, or too many in flight).

        With recover=True and value None, finish the instance instead: a prepare, then the
        highest accepted value found is chosen; if a majority has accepted nothing, nothing
        can have been chosen and the proposal ends with chosen_value None."""
        if value is None and not recover:
            raise ValueError("value: a proposal needs a value (or recover=True)")
        if value is not None and recover:
            raise ValueError("value: a recovery proposes no value of its own")
        if version == 0:
            raise ValueError("version: versions start at 1")
        cdef bint home = self.home(key) == self.node
        cdef tuple instance_key = (key, version)
        if self.rebuilding or instance_key in self._proposals:
            return False
        if len(self._proposals) >= _PROPOSALS_IN_FLIGHT_MAX:
            return False
        cdef _Instance instance = self._instances.get(instance_key)
        if instance is not None and instance.chosen_value is not None:
            self._decided.append(_decided(
                key, version, instance.chosen_value,
                value is not None and instance.chosen_value == value))
            return True
        cdef _Proposal proposal = _Proposal()
        proposal.key = key
        proposal.version = version
        proposal.own_value = value
        proposal.value = value
        proposal.home = home
        proposal.attempts = 0
        proposal.highest_seen = instance.promised if instance is not None else 0
        self._proposals[instance_key] = proposal
        if home and self.fast_path and proposal.highest_seen == 0 and value is not None:
            # Round 0 is ours alone and we never used it (our own acceptor would have
            # recorded it): no lower ballot exists, so no prepare is needed.
            self._start_accept(proposal, make_ballot(0, self.node, self.incarnation), now_ms)
        else:
            self._start_prepare(proposal, now_ms)
        return True

    cdef void _start_prepare(self, _Proposal proposal, double now_ms):
        cdef _Instance own = self._instance(proposal.key, proposal.version)
        if own.chosen_value is not None:
            self._finish(proposal, own.chosen_value)
            return
        proposal.phase = PHASE_PREPARE
        proposal.ballot = make_ballot(
            max(ballot_round(max(proposal.highest_seen, own.promised)) + 1, 1), self.node,
            self.incarnation)
        proposal.highest_seen = proposal.ballot
        proposal.promises = {}
        proposal.accepted = set()
        proposal.rejected = set()
        proposal.value = proposal.own_value
        proposal.attempts += 1
        proposal.deadline_ms = now_ms + self._retry_delay(proposal, _PROPOSAL_TIMEOUT_MS)
        # Our own promise is recorded (and persisted before anything is sent), so a restart
        # can never reuse this ballot with another value.
        own.promised = proposal.ballot
        self._dirty.add((proposal.key, proposal.version))
        proposal.promises[self.node] = (own.accepted_ballot, own.accepted_value)
        self._send_to_peers(MSG_PREPARE, proposal.key, proposal.version, proposal.ballot, None)
        self._check_promises(proposal, now_ms)

    cdef void _start_accept(self, _Proposal proposal, uint64_t ballot, double now_ms):
        cdef _Instance own = self._instance(proposal.key, proposal.version)
        proposal.phase = PHASE_ACCEPT
        proposal.ballot = ballot
        if ballot > proposal.highest_seen:
            proposal.highest_seen = ballot
        proposal.accepted = set()
        proposal.rejected = set()
        proposal.deadline_ms = now_ms + self._retry_delay(proposal, _PROPOSAL_TIMEOUT_MS)
        if ballot < own.promised:
            self._back_off(proposal, now_ms)  # we promised someone higher meanwhile
            return
        own.promised = ballot
        own.accepted_ballot = ballot
        own.accepted_value = proposal.value
        self._dirty.add((proposal.key, proposal.version))
        proposal.accepted.add(self.node)
        self._send_to_peers(MSG_ACCEPT, proposal.key, proposal.version, ballot, proposal.value)
        self._check_accepts(proposal)

    cdef void _send_to_peers(self, int kind, bytes key, uint64_t version, uint64_t ballot,
                             object value):
        cdef int peer
        for peer in range(self.replicas):
            if peer != self.node:
                self._emit(kind, peer, key, version, ballot, 0, value)

    cdef void _check_promises(self, _Proposal proposal, double now_ms):
        if vote_result(len(proposal.promises), len(proposal.rejected),
                       self.replicas) != WON:
            return
        best_ballot, best_value = 0, None
        for accepted_ballot, accepted_value in proposal.promises.values():
            if accepted_ballot > best_ballot:
                best_ballot, best_value = accepted_ballot, accepted_value
        # Adopt a value some acceptor may have helped choose, else propose our own.
        proposal.value = best_value if best_ballot else proposal.own_value
        if proposal.value is None:
            # A recovery that found nothing accepted in a majority: nothing was chosen (and
            # our promises now stop the lower ballots that might still be under way).
            self._finish(proposal, None)
            return
        self._start_accept(proposal, proposal.ballot, now_ms)

    cdef void _check_accepts(self, _Proposal proposal):
        if vote_result(len(proposal.accepted), len(proposal.rejected),
                       self.replicas) != WON:
            return
        value = proposal.value
        key, version = proposal.key, proposal.version
        self._send_to_peers(MSG_CHOSEN, key, version, 0, value)
        self._learn(key, version, value)

    cdef void _back_off(self, _Proposal proposal, double now_ms):
        proposal.phase = PHASE_WAIT
        # Differs per node and grows with attempts, so two proposers do not duel forever.
        proposal.deadline_ms = now_ms + self._retry_delay(
            proposal, _RETRY_BACKOFF_MS * (1 + self.node))

    cdef double _retry_delay(self, _Proposal proposal, double base_ms):
        """`base_ms` doubled for every attempt after the first (up to _RETRY_DOUBLINGS_MAX),
        plus up to half again. A fixed phase timeout shorter than the round trip (a loaded
        machine, a disk slow to sync) re-prepared every instance before any answer came back,
        each time with a higher ballot that made the answers stale: no proposal finished, and
        the retries themselves (a persisted promise and a message per instance) kept the
        round trip long. The jitter, a hash of the instance, the node and the attempt (so a
        seeded run replays), keeps two proposers of one instance from retrying in step."""
        cdef int doublings = min(max(proposal.attempts - 1, 0), _RETRY_DOUBLINGS_MAX)
        cdef uint64_t mix = _xxh64(proposal.key, seed=(
            (proposal.version * 0x9E3779B97F4A7C15 + <uint64_t> self.node * 0x100
             + <uint64_t> proposal.attempts) & 0xFFFFFFFFFFFFFFFF))
        return base_ms * (1 << doublings) * (1.0 + <double> (mix & 0x3FF) / 2048.0)

    cdef void _finish(self, _Proposal proposal, object chosen_value):
        del self._proposals[(proposal.key, proposal.version)]
        self._decided.append(_decided(
            proposal.key, proposal.version, chosen_value,
            chosen_value is not None and chosen_value == proposal.own_value))

    cdef void _learn(self, bytes key, uint64_t version, object value):
        cdef _Instance instance = self._instance(key, version)
        if instance.chosen_value is None:
            # Not in persist: that a value is chosen is a fact about a majority's durable
            # acceptances, which a restart cannot undo; what a restart forgets here, a
            # recovery proposal learns again. (Persisting it before sending held the CHOSEN
            # message, so every follower's apply, behind a second vote log sync.)
            instance.chosen_value = value
            self._learned.append((key, version))
        cdef _Proposal proposal = self._proposals.get((key, version))
        if proposal is not None:
            self._finish(proposal, value)

    def tick(self, double now_ms):
        cdef _Proposal proposal
        # Keep asking until every peer has answered: rebuilding ends at rebuild_quorum,
        # the fast path needs them all.
        if (self.rebuilding or (not self.fast_path and self.incarnation > 1)) \
                and now_ms >= self._next_state_request_ms:
            self._request_state(now_ms)
        for proposal in list(self._proposals.values()):
            if now_ms < proposal.deadline_ms:
                continue
            # A phase without a majority in time, or a back-off that ran out: a new ballot.
            self._start_prepare(proposal, now_ms)

    # --- messages -----------------------------------------------------------------------------
    def step(self, Message message not None, double now_ms, uint64_t floor=0):
        """Handle one message addressed to this replica. `floor`: the version of
        message.key the caller has applied (see "Floors" above)."""
        self._step(message, now_ms, floor)

    cdef void _step(self, Message message, double now_ms, uint64_t floor):
        if message.target != self.node or message.source < 0 \
                or message.source >= self.replicas or message.source == self.node:
            return
        cdef uint64_t fence = self._fences.get(message.source, 0)
        if message.incarnation < fence:
            return  # a message from a life of that peer that has ended
        cdef int kind = message.kind
        if message.incarnation > fence:
            # A newer life of that peer: fence the older ones (persisted, so a restart of
            # ours cannot forget it and accept a dead life's message still in the network).
            self._set_fence(message.source, message.incarnation)
        cdef _Instance instance
        cdef _Proposal proposal
        if kind == MSG_PREPARE or kind == MSG_ACCEPT:
            if message.version <= floor:
                instance = self._instances.get((message.key, message.version))
                if instance is not None and instance.chosen_value is not None:
                    self._emit(MSG_CHOSEN, message.source, message.key, message.version, 0, 0,
                               instance.chosen_value)
                elif not self.rebuilding:
                    self._emit(MSG_BEHIND, message.source, message.key, message.version,
                               message.ballot, floor)
                return
            self._on_acceptor_request(message)
        elif kind == MSG_PROMISE or kind == MSG_ACCEPTED or kind == MSG_REJECT:
            self._on_acceptor_reply(message, now_ms)
        elif kind == MSG_BEHIND:
            proposal = self._proposals.get((message.key, message.version))
            if proposal is not None:
                self._finish(proposal, None)  # taken: the caller catches up, then retries
        elif kind == MSG_CHOSEN:
            if message.value is not None and message.version > floor:
                self._learn(message.key, message.version, message.value)
        elif kind == MSG_STATE_REQUEST:
            self._on_state_request(message)
        elif kind == MSG_STATE:
            self._on_state(message)

    def step_all(self, list messages not None, double now_ms, dict floors not None,
                 bint voting):
        """step() each message of a frame, in order, as a replica's loop does. A message's
        floor (PREPARE, ACCEPT and CHOSEN of a key) is `floors[key]`, the replica's applied
        version of the key: the caller fills `floors` for the keys floor_keys(messages)
        lists. A key missing there raises ValueError (floor 0 would let this acceptor vote
        again on an instance it applied and forgot). Skipped: messages not addressed to this
        replica (counted), and PREPARE and ACCEPT while the replica is not `voting` and not
        rebuilding (its data is not caught up).

        Returns (misaddressed, heard, follow_up): how many were misaddressed, a bit mask of
        the sources heard from, and the messages the loop acts on after this: STATE parts
        that arrived while rebuilding, and BEHIND answers about a key."""
        cdef Message message
        cdef int kind, misaddressed = 0
        cdef uint64_t heard = 0, floor
        cdef list follow_up = []
        for message in messages:
            if message.target != self.node or message.source < 0 \
                    or message.source >= self.replicas:
                misaddressed += 1
                continue
            heard |= (<uint64_t> 1) << message.source
            kind = message.kind
            if not voting and (kind == MSG_PREPARE or kind == MSG_ACCEPT) \
                    and not self.rebuilding:
                continue
            if kind == MSG_STATE and self.rebuilding:
                follow_up.append(message)   # (the step may end the rebuild)
            floor = 0
            if message.key and (kind == MSG_PREPARE or kind == MSG_ACCEPT
                                or kind == MSG_CHOSEN):
                found = floors.get(message.key)
                if found is None:
                    raise ValueError(f"floors: no applied version of {message.key!r}, which a "
                                     f"message of kind {kind} names (give one for every key "
                                     "floor_keys(messages) lists)")
                floor = found
            self._step(message, now_ms, floor)
            if kind == MSG_BEHIND and message.key:
                follow_up.append(message)
        return misaddressed, heard, follow_up

    cdef void _on_acceptor_request(self, Message message):
        if self.rebuilding:
            return  # amnesia guard: no vote before the state is rebuilt from peers
        cdef _Instance instance = self._instance(message.key, message.version)
        if instance.chosen_value is not None:
            self._emit(MSG_CHOSEN, message.source, message.key, message.version, 0, 0,
                       instance.chosen_value)
            return
        if message.kind == MSG_PREPARE:
            if message.ballot >= instance.promised and ballot_round(message.ballot) > 0:
                # (a repeated prepare of the promised ballot gets the same promise again)
                if message.ballot > instance.promised:
                    instance.promised = message.ballot
                    self._dirty.add((message.key, message.version))
                self._emit(MSG_PROMISE, message.source, message.key, message.version,
                           message.ballot, instance.accepted_ballot, instance.accepted_value)
            else:
                self._emit(MSG_REJECT, message.source, message.key, message.version,
                           message.ballot, instance.promised)
        else:
            if ballot_round(message.ballot) == 0 \
                    and ballot_node(message.ballot) != self.home(message.key):
                # Round 0 skips the prepare only because it is the home's alone.
                self._emit(MSG_REJECT, message.source, message.key, message.version,
                           message.ballot, instance.promised)
                return
            if message.ballot >= instance.promised and message.value is not None:
                instance.promised = message.ballot
                instance.accepted_ballot = message.ballot
                instance.accepted_value = message.value
                self._dirty.add((message.key, message.version))
                self._emit(MSG_ACCEPTED, message.source, message.key, message.version,
                           message.ballot)
            else:
                self._emit(MSG_REJECT, message.source, message.key, message.version,
                           message.ballot, instance.promised)

    cdef void _on_acceptor_reply(self, Message message, double now_ms):
        cdef _Proposal proposal = self._proposals.get((message.key, message.version))
        if proposal is None or message.ballot != proposal.ballot:
            return  # a reply to a finished proposal or an older ballot
        cdef int result
        if message.kind == MSG_REJECT:
            if message.accepted_ballot > proposal.highest_seen:
                proposal.highest_seen = message.accepted_ballot
            proposal.rejected.add(message.source)
            if proposal.phase == PHASE_PREPARE:
                result = vote_result(len(proposal.promises), len(proposal.rejected),
                                     self.replicas)
            else:
                result = vote_result(len(proposal.accepted), len(proposal.rejected),
                                     self.replicas)
            if result == LOST:
                self._back_off(proposal, now_ms)
            return
        if message.kind == MSG_PROMISE and proposal.phase == PHASE_PREPARE:
            proposal.promises[message.source] = (message.accepted_ballot, message.value)
            self._check_promises(proposal, now_ms)
        elif message.kind == MSG_ACCEPTED and proposal.phase == PHASE_ACCEPT:
            proposal.accepted.add(message.source)
            self._check_accepts(proposal)

    # --- rebuilding after a lost disk ----------------------------------------------------------
    cdef void _set_fence(self, int peer, uint64_t incarnation):
        self._fences[peer] = incarnation
        self._persist.append(_named(_FenceRecord, (FENCE, peer, incarnation)))

    cdef void _on_state_request(self, Message message):
        if self.rebuilding:
            return  # a rebuilding replica has nothing trustworthy to give
        cdef _Instance instance
        cdef list current = []
        cdef list parts = [current]
        cdef Py_ssize_t size = 0, record_size
        for (key, version), instance in self._instances.items():
            record_size = 64 + len(key) + _size_of(instance.accepted_value) \
                + _size_of(instance.chosen_value)
            if current and size + record_size > self.state_part_bytes \
                    and len(parts) < _STATE_PARTS_MAX:
                current = []
                parts.append(current)
                size = 0
            current.append(instance.record(key, version))
            size += record_size
        self._answers += 1  # wraps: only answers close in time must differ
        cdef uint64_t answer = self._answers
        cdef uint64_t count = len(parts)
        cdef uint64_t part
        for part in range(count):
            self._emit(MSG_STATE, message.source, b"", 0, message.incarnation,
                       (answer << 32) | (part << 16) | count, parts[part])

    cdef void _on_state(self, Message message):
        # `ballot` echoes the incarnation that asked: answers to an older life do not count.
        if message.ballot != self.incarnation or message.source in self._rebuild_done:
            return
        cdef uint64_t answer = message.accepted_ballot >> 32
        cdef uint64_t part = (message.accepted_ballot >> 16) & 0xFFFF
        cdef uint64_t count = message.accepted_ballot & 0xFFFF
        if count == 0 or part >= count:
            return  # not a part of any answer
        cdef _Instance instance
        # Merging is safe before the answer is whole (it only raises what we know); counting
        # the peer as rebuilt from is not.
        for record in message.value:
            key, version = record.key, record.version
            instance = self._instance(key, version)
            if record.promised > instance.promised:
                instance.promised = record.promised
            if record.accepted_ballot > instance.accepted_ballot:
                instance.accepted_ballot = record.accepted_ballot
                instance.accepted_value = record.accepted_value
            if record.chosen_value is not None and instance.chosen_value is None:
                instance.chosen_value = record.chosen_value
            self._dirty.add((key, version))
        # Parts of different answers never add up (each answer may split the records
        # differently); a few answers are followed at once, the oldest dropped first.
        answers = self._state_parts.setdefault(message.source, {})
        received = answers.get(answer)
        if received is None:
            if len(answers) >= _STATE_ANSWERS_FOLLOWED:
                del answers[next(iter(answers))]
            received = answers[answer] = set()
        received.add(part)
        if len(received) < count:
            return
        del self._state_parts[message.source]
        self._rebuild_done[message.source] = message.incarnation
        if self.rebuilding and len(self._rebuild_done) >= rebuild_quorum(self.replicas):
            self.rebuilding = False
            self._persist.append(_named(_RebuiltRecord, (REBUILT, self.incarnation)))
            if not self.fast_path:
                self.fast_path = True
                self._persist.append(_named(_VerifiedRecord, (VERIFIED, self.incarnation)))

    cdef void _request_state(self, double now_ms):
        cdef int peer
        for peer in range(self.replicas):
            if peer != self.node and peer not in self._rebuild_done:
                self._emit(MSG_STATE_REQUEST, peer, b"", 0)
        self._next_state_request_ms = now_ms + _PROPOSAL_TIMEOUT_MS
