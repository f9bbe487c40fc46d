"""A plain-Python model of the binlog record layout in kvsvr/_record.pxi, written from its
docstring, to check the compiled codec against (STYLE: test the core against a reference)."""

from __future__ import annotations

import struct

import xxhash

# checksum, magic, layout, op_count, lsn, version, client_id, client_seq, key_len, body_len
HEADER = struct.Struct("<QIHHQQQQII")
OP = struct.Struct("<BII")
MAGIC = 0x4C42564B


def encode(lsn: int, version: int, client_id: int, client_seq: int, key: bytes,
           ops: list[tuple[int, bytes, bytes]]) -> bytes:
    body = key + b"".join(OP.pack(kind, len(row), len(value)) + row + value
                          for kind, row, value in ops)
    header = HEADER.pack(0, MAGIC, 1, len(ops), lsn, version, client_id, client_seq, len(key),
                         len(body))
    unsummed = header[8:] + body
    return struct.pack("<Q", xxhash.xxh3_64_intdigest(unsummed)) + unsummed


def decode(raw: bytes) -> tuple[int, int, int, int, bytes, list[tuple[int, bytes, bytes]]]:
    (checksum, magic, layout, op_count, lsn, version, client_id, client_seq, key_len,
     body_len) = HEADER.unpack_from(raw)
    assert magic == MAGIC and layout == 1 and body_len == len(raw) - HEADER.size
    assert checksum == xxhash.xxh3_64_intdigest(raw[8:])
    position = HEADER.size
    key = raw[position:position + key_len]
    position += key_len
    ops = []
    for _ in range(op_count):
        kind, row_len, value_len = OP.unpack_from(raw, position)
        position += OP.size
        row = raw[position:position + row_len]
        position += row_len
        ops.append((kind, row, raw[position:position + value_len]))
        position += value_len
    assert position == len(raw)
    return lsn, version, client_id, client_seq, key, ops
