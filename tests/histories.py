"""One random operation on a few hot keys, run and recorded for the linearizability checker:
shared by the single-node and the replicated history tests."""

from __future__ import annotations

import random
import time
from typing import Any

import kvsvr
from kvsvr import Client, NotFound, VersionConflict
from kvsvr.testing.linearizability import INFINITY, UNKNOWN, Op

KINDS = ["get", "put", "cas", "incr", "append", "scan"]


def invoke(client: Client, kind: str, key: bytes, argument: object) -> object:
    if kind == "get":
        return client.get(key)
    if kind in ("put", "cas"):
        value, expected = argument  # type: ignore[misc]
        return client.put(key, value, expected_version=expected)
    if kind == "incr":
        return client.incr(key, argument)  # type: ignore[arg-type]
    if kind == "append":
        return client.append(key, argument)
    # One page holds the whole inbox (a fast machine appends past the default 1,000 rows,
    # and a truncated page is not what the model's full-table read expects).
    page = client.scan(key, limit=kvsvr.limits.SCAN_ROWS_MAX)
    assert page.next_start is None, "the inbox outgrew one scan page: shorten the test"
    return page


def random_op(client: Client, rng: random.Random, process: int) -> tuple[Op, Any]:
    """Run one random call on reg:0/1 (get, put, CAS, incr) or inbox:0/1 (append, scan);
    returns its history entry and, for an acknowledged call, its result (else None). An
    unanswered call (Timeout, Unavailable) is recorded as UNKNOWN: it may or may not apply."""
    register = f"reg:{rng.randrange(2)}".encode()
    inbox = f"inbox:{rng.randrange(2)}".encode()
    kind = KINDS[rng.randrange(len(KINDS))]
    key = inbox if kind in ("append", "scan") else register
    argument: object = {
        "get": None, "put": (str(rng.randrange(100)).encode(), None),
        "cas": (str(rng.randrange(100)).encode(), rng.randrange(1, 40)),
        "incr": 1, "append": f"m{process}-{rng.random()}".encode(), "scan": None,
    }[kind]
    started = time.monotonic()
    value: Any = None
    try:
        value = invoke(client, kind, key, argument)
        if kind == "get":
            result: Any = ("ok", (value.version, value.value))
        elif kind == "scan":
            result = ("ok", tuple(r.value for r in value.rows))
        else:
            result = ("ok", value)
        ended = time.monotonic()
    except NotFound as e:
        result, ended = ("not_found", e.version), time.monotonic()
    except VersionConflict as e:
        result, ended = ("conflict", e.version), time.monotonic()
    except kvsvr.InvalidArgument:
        result, ended = ("invalid",), time.monotonic()
    except (kvsvr.Timeout, kvsvr.Unavailable):
        result, ended = UNKNOWN, INFINITY
    kind = "put" if kind == "cas" else kind  # the model knows CAS as a put
    return Op(process, kind, key, argument, result, started, ended), value
