"""The agent -> center report: one machine's per-second values for a span of seconds.

A report travels as the body of one KVSvr request frame (method REPORT) and is answered with
an ack naming the last second the center now holds durably, or an InvalidArgument error frame
saying what was wrong (then nothing of it was stored). Layout, little-endian, layout 1:

  offset size field
       0    8 checksum       xxh3_64 of bytes [8, end)
       8    4 magic          0x524D564B (b"KVMR")
      12    2 layout         1
      14    2 flags          0 (reserved)
      16    8 first_second   the span this report covers: every second in
      24    8 through_second [first, through] was read; a second with no block had no values
      32    4 block_count    0..REPORT_SECONDS_MAX
      36    4 machine_len    1..MACHINE_BYTES_MAX
      40    4 meta_len       0..META_BYTES_MAX
      44    4 reserved       0
      48      machine        UTF-8 name of the reporting machine
              meta           msgpack {"catalog": [[id, kind, name, description], ...],
                                      "gaps": [[first, last], ...],
                                      "campus": the machine's campus label, optional}
                             (may be empty)
              blocks         block_count times: u64 second, u32 byte_len, u32 reserved (0),
                             then byte_len bytes of value block (see kvsvr/_counters.pxi);
                             seconds strictly ascending inside [first, through]

A gap is a span of seconds the agent could not read any more (it was down longer than the
counters window): those values are gone, and the center shows the gap instead of zeros.
"""

from __future__ import annotations

import struct
from typing import Annotated

import msgspec
from msgspec import Meta
from xxhash import xxh3_64_intdigest

from kvsvr import _core

METHOD_REPORT = 40            # request frame code of a report (a center serves only this)
MAGIC = 0x524D564B
LAYOUT = 1
HEADER = struct.Struct("<QIHHQQIIII")
BLOCK_HEADER = struct.Struct("<QII")
assert HEADER.size == 48 and BLOCK_HEADER.size == 16
MACHINE_BYTES_MAX = 64
CAMPUS_BYTES_MAX = 64
META_BYTES_MAX = 1 << 20      # the catalog of a full table: 65,536 ids x ~330 bytes is more;
#                               a machine with that many names ships them over several reports
REPORT_SECONDS_MAX = 3600
GAPS_MAX = 64
BLOCK_BYTES_MAX = _core.MONITOR_IDS_MAX * _core.VALUE_ENTRY_BYTES
REPORT_BYTES_MAX = _core.FRAME_BYTES_MAX - _core.FRAME_HEADER_BYTES
SECOND_MAX = 1 << 40          # far beyond any clock; bounds arithmetic on hostile input

CatalogEntry = tuple[int, int, str, str]   # id, kind, name, description


class ReportError(ValueError):
    """A report is truncated, corrupted, out of bounds or inconsistent."""


class _Meta(msgspec.Struct, forbid_unknown_fields=True):
    catalog: Annotated[list[tuple[Annotated[int, Meta(ge=1, le=_core.MONITOR_IDS_MAX)],
                                  Annotated[int, Meta(ge=1, le=2)],
                                  Annotated[str, Meta(min_length=1, max_length=256)],
                                  Annotated[str, Meta(max_length=1024)]]],
                       Meta(max_length=_core.MONITOR_IDS_MAX)] = []
    gaps: Annotated[list[tuple[Annotated[int, Meta(ge=0, le=SECOND_MAX)],
                               Annotated[int, Meta(ge=0, le=SECOND_MAX)]]],
                    Meta(max_length=GAPS_MAX)] = []
    campus: Annotated[str, Meta(max_length=CAMPUS_BYTES_MAX)] = ""


_meta_decoder = msgspec.msgpack.Decoder(_Meta)
_meta_encoder = msgspec.msgpack.Encoder()


class Report(msgspec.Struct):
    machine: str
    first_second: int
    through_second: int
    blocks: list[tuple[int, bytes]]          # (second, value block), ascending seconds
    catalog: list[CatalogEntry] = []
    gaps: list[tuple[int, int]] = []
    campus: str = ""                         # the machine's campus (a /metrics label)

    @property
    def values(self) -> int:
        return sum(len(block) for _, block in self.blocks) // _core.VALUE_ENTRY_BYTES


def machine_problem(machine: str) -> str | None:
    size = len(machine.encode())
    if not 1 <= size <= MACHINE_BYTES_MAX:
        return f"machine: {size} bytes, expected 1..{MACHINE_BYTES_MAX}"
    if not machine.isprintable() or "/" in machine:
        return f"machine: {machine!r} has a control character or a '/'"
    return None


def encode_report(report: Report) -> bytes:
    """The report's bytes; ValueError naming the field if it breaks a bound."""
    problem = machine_problem(report.machine)
    if problem:
        raise ValueError(problem)
    if not 0 <= report.first_second <= report.through_second <= SECOND_MAX:
        raise ValueError(f"seconds: first {report.first_second}, through "
                         f"{report.through_second}: expected 0 <= first <= through")
    if len(report.blocks) > REPORT_SECONDS_MAX:
        raise ValueError(f"blocks: {len(report.blocks)}, at most {REPORT_SECONDS_MAX}")
    meta = b""
    if report.catalog or report.gaps or report.campus:
        fields: dict[str, object] = {"catalog": report.catalog, "gaps": report.gaps}
        if report.campus:
            fields["campus"] = report.campus
        meta = _meta_encoder.encode(fields)
    if len(meta) > META_BYTES_MAX:
        raise ValueError(f"meta: {len(meta)} bytes, at most {META_BYTES_MAX}")
    machine = report.machine.encode()
    parts = [b"", machine, meta]
    previous = report.first_second - 1
    for second, block in report.blocks:
        if not previous < second <= report.through_second:
            raise ValueError(f"blocks: second {second} out of order or outside the span")
        previous = second
        parts.append(BLOCK_HEADER.pack(second, len(block), 0))
        parts.append(block)
    parts[0] = HEADER.pack(0, MAGIC, LAYOUT, 0, report.first_second, report.through_second,
                           len(report.blocks), len(machine), len(meta), 0)
    body = b"".join(parts)
    if len(body) > REPORT_BYTES_MAX:
        raise ValueError(f"report: {len(body)} bytes, a frame carries {REPORT_BYTES_MAX}")
    return struct.pack("<Q", xxh3_64_intdigest(memoryview(body)[8:])) + body[8:]


def decode_report(buf: bytes | memoryview) -> Report:
    """Decode and check a report; ReportError saying what is wrong (nothing is half-read)."""
    view = memoryview(buf)
    size = view.nbytes
    if size < HEADER.size:
        raise ReportError(f"truncated: {size} bytes, the header is {HEADER.size}")
    if size > REPORT_BYTES_MAX:
        raise ReportError(f"size: {size} bytes, a report is at most {REPORT_BYTES_MAX}")
    (checksum, magic, layout, flags, first, through, count, machine_len, meta_len,
     reserved) = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ReportError("magic: not a monitor report")
    if layout != LAYOUT:
        raise ReportError(f"layout: {layout}, this build reads layout {LAYOUT}")
    if checksum != xxh3_64_intdigest(view[8:]):
        raise ReportError("checksum: the report is corrupted")
    # The checksum passed; the bounds below still guard against a buggy or hostile agent.
    if flags or reserved:
        raise ReportError("flags: reserved bits set")
    if not first <= through <= SECOND_MAX:
        raise ReportError(f"seconds: first {first}, through {through}: expected first <= "
                          f"through <= {SECOND_MAX}")
    if count > REPORT_SECONDS_MAX or count > through - first + 1:
        raise ReportError(f"block_count: {count} for {through - first + 1} seconds "
                          f"(at most {REPORT_SECONDS_MAX})")
    if not 1 <= machine_len <= MACHINE_BYTES_MAX:
        raise ReportError(f"machine_len: {machine_len}, expected 1..{MACHINE_BYTES_MAX}")
    if meta_len > META_BYTES_MAX:
        raise ReportError(f"meta_len: {meta_len}, at most {META_BYTES_MAX}")
    pos = HEADER.size
    if pos + machine_len + meta_len > size:
        raise ReportError(f"truncated: machine and meta need {machine_len + meta_len} bytes, "
                          f"{size - pos} present")
    try:
        machine = bytes(view[pos:pos + machine_len]).decode()
    except UnicodeDecodeError:
        raise ReportError("machine: not UTF-8") from None
    problem = machine_problem(machine)
    if problem:
        raise ReportError(problem)
    pos += machine_len
    meta = _Meta()
    if meta_len:
        try:
            meta = _meta_decoder.decode(view[pos:pos + meta_len])
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise ReportError(f"meta: {e}") from None
        pos += meta_len
    for gap_first, gap_last in meta.gaps:
        if gap_first > gap_last or gap_last >= first:
            raise ReportError(f"meta.gaps: [{gap_first}, {gap_last}] must be ordered and end "
                              f"before the report's first second {first}")
    blocks: list[tuple[int, bytes]] = []
    previous = first - 1
    for index in range(count):
        if pos + BLOCK_HEADER.size > size:
            raise ReportError(f"blocks[{index}]: header runs past the end")
        second, byte_len, block_reserved = BLOCK_HEADER.unpack_from(view, pos)
        pos += BLOCK_HEADER.size
        if block_reserved:
            raise ReportError(f"blocks[{index}]: reserved bits set")
        if not previous < second <= through:
            raise ReportError(f"blocks[{index}].second: {second}, expected ascending seconds "
                              f"in [{first}, {through}]")
        previous = second
        if byte_len > BLOCK_BYTES_MAX or byte_len > size - pos:
            raise ReportError(f"blocks[{index}].byte_len: {byte_len}, {size - pos} bytes left "
                              f"(a block is at most {BLOCK_BYTES_MAX})")
        block = bytes(view[pos:pos + byte_len])
        problem = _core.block_invalid(block)
        if problem:
            raise ReportError(f"blocks[{index}]: {problem}")
        blocks.append((second, block))
        pos += byte_len
    if pos != size:
        raise ReportError(f"{size - pos} trailing bytes after the last block")
    return Report(machine, first, through, blocks, list(meta.catalog), list(meta.gaps),
                  meta.campus)


class Ack(msgspec.Struct):
    """The center's answer to a report: it holds everything through `through` durably.
    Unknown fields are ignored, so a newer center can say more to an older agent."""

    through: int


__all__ = ["METHOD_REPORT", "Ack", "Report", "ReportError", "decode_report", "encode_report"]
