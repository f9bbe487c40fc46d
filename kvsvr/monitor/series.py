"""The monitor center's durable store (LMDB): per-second value blocks, sums, machines, the id
catalog, gaps and the alert history.

One machine's values for one second are ONE LMDB value (a value block, see _counters.pxi),
keyed by (second, machine): a resent report overwrites it with the same bytes, so resending is
never counting twice. The sum across machines of a second is one more block: a machine's
first block of a second is merged into it (one pass in C, whatever the number of machines);
a resend of the same block changes nothing; a different block for a second already held (a
clock step made the agent re-ship it) makes the sum rebuilt from that second's machine
blocks. So nothing is counted twice. A report is stored in one durable transaction, and
acknowledged after it.

  db        key                              value
  values    u64be second + machine           value block
  sums      u64be second                     value block (sum of that second's machines)
  machines  machine                          msgpack MachineState
  catalog   u32be id                         msgpack [kind, name, description]
  gaps      machine + 0x00 + u64be first     u64be last (seconds lost on that machine)
  alerts    u64be sequence                   msgpack AlertEvent
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from kvsvr import _core
from kvsvr.monitor.report import Report

SECOND = struct.Struct(">Q")
ID = struct.Struct(">I")
SERIES_MAP_SIZE_MIB_DEFAULT = 64 * 1024        # address space only; the file grows as data comes
TRIM_BATCH = 10_000                      # entries deleted per trim call (bounded work)
SERIES_SECONDS_MAX = 86_400              # one query reads at most a day of seconds


class MachineState(msgspec.Struct):
    through: int = 0            # every second up to here is stored (or was empty)
    first: int = 0              # the first second it ever reported
    reported_at: float = 0.0    # center clock at its last report
    reports: int = 0
    values: int = 0


class AlertEvent(msgspec.Struct):
    sequence: int
    at: float
    rule: str
    machine: str                # "" for a rule on the sum across machines
    state: str                  # "firing" or "cleared"
    value: float | None
    message: str


_state_decoder = msgspec.msgpack.Decoder(MachineState)
_alert_decoder = msgspec.msgpack.Decoder(AlertEvent)
_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode


class SeriesStore:
    def __init__(self, path: str | Path, *, map_size_mib: int = SERIES_MAP_SIZE_MIB_DEFAULT,
                 sync: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.path), map_size=map_size_mib << 20, max_dbs=8,
                             sync=sync, metasync=sync, lock=True)
        self.values = self.env.open_db(b"values")
        self.sums = self.env.open_db(b"sums")
        self.machine_db = self.env.open_db(b"machines")
        self.catalog_db = self.env.open_db(b"catalog")
        self.gap_db = self.env.open_db(b"gaps")
        self.alert_db = self.env.open_db(b"alerts")
        with self.env.begin() as txn:
            last = txn.cursor(db=self.alert_db)
            self._next_alert = SECOND.unpack(last.key())[0] + 1 if last.last() else 1

    def close(self) -> None:
        self.env.close()

    # --- ingest ---------------------------------------------------------------------------
    def ingest(self, report: Report, now: float) -> int:
        """Store a decoded report durably; the second through which the machine is covered."""
        machine = report.machine.encode()
        with self.env.begin(write=True) as txn:
            raw = txn.get(machine, db=self.machine_db)
            state = _state_decoder.decode(raw) if raw is not None else MachineState(
                first=report.first_second)
            put = txn.put
            values_db, sums_db = self.values, self.sums
            get = txn.get
            cursor = txn.cursor(db=values_db)
            for second, block in report.blocks:
                prefix = SECOND.pack(second)
                old = get(prefix + machine, db=values_db)
                if old == block:
                    continue            # a resend: the value and the sum stay as they are
                put(prefix + machine, block, db=values_db)
                if not old:
                    # The common case, this machine's first block of the second: the sum
                    # grows by it (one merge in C, whatever the number of machines).
                    put(prefix, _core.merge_blocks(get(prefix, db=sums_db) or b"", block),
                        db=sums_db)
                    continue
                # A block replaced by another (a clock step re-shipped a second): rebuild
                # the sum from this second's machine blocks, so nothing is counted twice.
                blocks = []
                if cursor.set_range(prefix):
                    for key, value in cursor:
                        if not key.startswith(prefix):
                            break
                        blocks.append(value)
                put(prefix, _core.sum_blocks(blocks), db=sums_db)
            for first, last in report.gaps:
                put(machine + b"\0" + SECOND.pack(first), SECOND.pack(last), db=self.gap_db)
            for id, kind, name, description in report.catalog:
                entry = _encode([kind, name, description])
                key = ID.pack(id)
                if txn.get(key, db=self.catalog_db) != entry:
                    put(key, entry, db=self.catalog_db)
            state.through = max(state.through, report.through_second)
            state.first = min(state.first or report.first_second, report.first_second)
            state.reported_at = now
            state.reports += 1
            state.values += report.values
            put(machine, _encode(state), db=self.machine_db)
        return state.through

    def forget(self, machine: str) -> bool:
        """Drop a machine's state and gaps (its values age out with the retention)."""
        name = machine.encode()
        with self.env.begin(write=True) as txn:
            found = txn.delete(name, db=self.machine_db)
            cursor = txn.cursor(db=self.gap_db)
            prefix = name + b"\0"
            while cursor.set_range(prefix) and cursor.key().startswith(prefix):
                cursor.delete()
        return bool(found)

    # --- reads ----------------------------------------------------------------------------
    def machines(self) -> dict[str, MachineState]:
        with self.env.begin() as txn:
            return {key.decode(): _state_decoder.decode(value)
                    for key, value in txn.cursor(db=self.machine_db)}

    def catalog(self) -> dict[int, tuple[int, str, str]]:
        with self.env.begin() as txn:
            return {ID.unpack(key)[0]: tuple(_decode(value))
                    for key, value in txn.cursor(db=self.catalog_db)}

    def ids(self) -> list[int]:
        """Every id in the catalog or in the newest sum block."""
        ids = set(self.catalog())
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.sums)
            if cursor.last():
                ids.update(_core.decode_block(cursor.value()))
        return sorted(ids)

    def gaps(self, machine: str | None = None) -> list[tuple[str, int, int]]:
        out = []
        with self.env.begin() as txn:
            for key, value in txn.cursor(db=self.gap_db):
                name, first = key[:-9], key[-8:]
                if machine is None or name.decode() == machine:
                    out.append((name.decode(), SECOND.unpack(first)[0], SECOND.unpack(value)[0]))
        return out

    def blocks(self, first: int, last: int, machine: str | None = None) -> list[bytes | None]:
        """The value blocks of seconds first..last (None where there is none): the sums, or
        one machine's."""
        if last < first:
            return []
        if last - first + 1 > SERIES_SECONDS_MAX:
            raise ValueError(f"range: {last - first + 1} seconds, at most {SERIES_SECONDS_MAX}")
        out: list[bytes | None] = [None] * (last - first + 1)
        with self.env.begin() as txn:
            if machine is None:
                cursor = txn.cursor(db=self.sums)
                if cursor.set_range(SECOND.pack(first)):
                    for key, value in cursor:
                        second = SECOND.unpack(key)[0]
                        if second > last:
                            break
                        out[second - first] = value
            else:
                suffix = machine.encode()
                get, db = txn.get, self.values
                for second in range(first, last + 1):
                    out[second - first] = get(SECOND.pack(second) + suffix, db=db)
        return out

    def series(self, id: int, first: int, last: int,
               machine: str | None = None) -> list[int | None]:
        """Per-second values of `id` over first..last (None: no value that second)."""
        return _core.block_series(self.blocks(first, last, machine), id)

    def value_count(self) -> int:
        with self.env.begin() as txn:
            return sum(len(v) for _, v in txn.cursor(db=self.values)) // _core.VALUE_ENTRY_BYTES

    # --- alerts ---------------------------------------------------------------------------
    def append_alert(self, at: float, rule: str, machine: str, state: str,
                     value: float | None, message: str) -> AlertEvent:
        event = AlertEvent(self._next_alert, at, rule, machine, state, value, message)
        with self.env.begin(write=True) as txn:
            txn.put(SECOND.pack(event.sequence), _encode(event), db=self.alert_db)
        self._next_alert += 1
        return event

    def alerts(self, limit: int = 1000) -> list[AlertEvent]:
        """The newest `limit` alert events, newest first."""
        out: list[AlertEvent] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.alert_db)
            if cursor.last():
                for value in cursor.iterprev(keys=False, values=True):
                    out.append(_alert_decoder.decode(value))
                    if len(out) >= limit:
                        break
        return out

    def firing(self) -> dict[tuple[str, str], AlertEvent]:
        """(rule, machine) -> its last event, for those whose last event is 'firing'."""
        last: dict[tuple[str, str], AlertEvent] = {}
        with self.env.begin() as txn:
            for value in txn.cursor(db=self.alert_db).iternext(keys=False, values=True):
                event = _alert_decoder.decode(value)
                last[(event.rule, event.machine)] = event
        return {k: e for k, e in last.items() if e.state == "firing"}

    # --- retention ------------------------------------------------------------------------
    def trim(self, before_second: int) -> int:
        """Delete blocks of seconds before `before_second`, at most TRIM_BATCH a call."""
        deleted = 0
        bound = SECOND.pack(before_second)
        with self.env.begin(write=True) as txn:
            for db in (self.values, self.sums):
                cursor = txn.cursor(db=db)
                while deleted < TRIM_BATCH and cursor.first() and cursor.key() < bound:
                    cursor.delete()
                    deleted += 1
        return deleted

    def stats(self) -> dict[str, Any]:
        with self.env.begin() as txn:
            return {"value_blocks": txn.stat(self.values)["entries"],
                    "sum_blocks": txn.stat(self.sums)["entries"],
                    "alerts": txn.stat(self.alert_db)["entries"]}


__all__ = ["AlertEvent", "MachineState", "SeriesStore"]
