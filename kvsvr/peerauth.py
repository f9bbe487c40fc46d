"""Peer requests authenticated with the cluster's shared secret ([security] peer_secret).

Replicas take votes, binlog pulls and snapshot requests on the same port as clients' calls.
Without a secret, anyone who reaches that port can send a well-formed vote and be believed:
four forged messages with a peer's incarnation set to its maximum fenced that peer out for
good, and writes stopped until the data was rebuilt. With a secret, every peer request
(QUORUM, VERSIONS, PULL, HELLO, SNAPSHOT) carries a MAC, and a replica refuses one whose MAC
is missing or wrong (an InvalidArgument answer naming `frame.mac`, counted as
`peer_auth_refused`) before it reads anything else of it.

Layout: the frame's body is MAC (PEER_MAC_BYTES) + the msgpack body. The MAC is BLAKE2b-128
keyed with a key derived from the secret, over (u8 method, u64 request id, body), so a MAC
cannot be moved to another method or request. Answers are not sealed: a replica reads them
only on the connection it opened to the peer's configured address. A recorded request can be
replayed; the protocol takes a repeated vote, pull or question as it takes a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from kvsvr.errors import InvalidArgument
from kvsvr.limits import PEER_MAC_BYTES

_HEAD = struct.Struct("<BQ")
_PERSON = b"kvsvr-peer-v1"


class PeerAuth:
    def __init__(self, secret: str):
        self._key = hashlib.blake2b(secret.encode(), digest_size=64,
                                    person=b"kvsvr-peer-key").digest()

    def _mac(self, method: int, request_id: int, body: bytes | memoryview) -> bytes:
        mac = hashlib.blake2b(key=self._key, digest_size=PEER_MAC_BYTES, person=_PERSON)
        mac.update(_HEAD.pack(method, request_id))
        mac.update(body)
        return mac.digest()

    def seal(self, method: int, request_id: int, body: bytes) -> bytes:
        """The body to send: its MAC, then the body."""
        return self._mac(method, request_id, body) + body

    def open(self, method: int, request_id: int, body: bytes | memoryview) -> memoryview:
        """The body without its MAC; InvalidArgument if the MAC is missing or wrong."""
        view = memoryview(body)
        if len(view) < PEER_MAC_BYTES or not hmac.compare_digest(
                view[:PEER_MAC_BYTES], self._mac(method, request_id, view[PEER_MAC_BYTES:])):
            raise InvalidArgument("frame.mac: a peer request without a valid MAC (not from a "
                                  "replica of this cluster, or its security.peer_secret "
                                  "differs)", field="frame.mac")
        return view[PEER_MAC_BYTES:]


__all__ = ["PeerAuth"]
