"""Exactly-once handlers on KVSvr: the effect and "message applied" in one atomic write.

A handler whose effect is a KVSvr write on one key (a value, rows of a key-table, an inbox
append, a counter) is wrapped by `ExactlyOnce`. For each delivered message it reads the key's
version and a marker row holding the highest seq of that producer applied to the key, skips
the message if its seq is not above it, and otherwise commits the effect and the new marker
in one KVSvr batch conditional on the version it read (compare-and-set). Why this is exact:

- The effect and the marker are one version of the key: both are applied or neither.
- A message delivered again (the consumer crashed before committing its offset, or a
  duplicate copy) finds its seq at or below the marker: consumers deliver each producer's
  messages in seq order, so everything of that producer up to the marker was applied.
- A commit that timed out may or may not have been applied: the retry re-reads the marker.
- Two consumers racing on the key: one compare-and-set wins, the other re-reads and skips.

Marker rows are named b"\\x00quorumq:" + producer id (8 bytes, big-endian); keep handler
rows out of that prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvsvr.client import Batch, Client
from kvsvr.errors import NotFound, Timeout, Unavailable, VersionConflict
from quorumq.consumer import Delivery

MARKER_PREFIX = b"\x00quorumq:"
RETRY_PAUSE_S = 0.05
ATTEMPTS_MAX = 100


def marker_row(producer_id: int) -> bytes:
    return MARKER_PREFIX + producer_id.to_bytes(8, "big")


class ExactlyOnce:
    """`ExactlyOnce(client, key_of, apply)`: a consumer handler. `key_of(delivery)` names the
    KVSvr key the message changes; `apply(delivery, batch)` adds its effect to `batch` (a
    kvsvr Batch of that key: put, incr, row_put, append, ...). Calling it returns True if
    the message was applied now, False if it had been applied before."""

    def __init__(self, client: Client, key_of: Callable[[Delivery], Any],
                 apply: Callable[[Delivery, Batch], None]):
        self.client = client
        self.key_of = key_of
        self.apply = apply
        self.applied = 0
        self.skipped = 0

    def __call__(self, delivery: Delivery) -> bool:
        key = self.key_of(delivery)
        row = marker_row(delivery.producer_id)
        for _attempt in range(ATTEMPTS_MAX):
            try:
                try:
                    marker = self.client.row_get(key, row)
                    version, applied = marker.key_version, int.from_bytes(marker.value, "big")
                except NotFound as e:
                    version, applied = e.version or 0, -1
                if delivery.seq <= applied:
                    self.skipped += 1
                    return False
                batch = self.client.batch(key, expected_version=version)
                self.apply(delivery, batch)
                batch.row_put(row, delivery.seq.to_bytes(8, "big"))
                batch.commit()
                self.applied += 1
                return True
            except VersionConflict:
                continue            # someone else wrote the key: read again
            except (Timeout, Unavailable):
                time.sleep(RETRY_PAUSE_S)   # maybe applied: the marker will say
        raise Timeout(f"message {delivery.message_id}: not applied after {ATTEMPTS_MAX} "
                      "attempts (the key is contended or KVSvr is unavailable)")
