"""Listing keys by prefix across groups: each group's replica answers a sorted page of its
own keys (LIST, from its applied state, as a local read is), and the client merges the
groups' pages into one sorted page (a k-way merge), cut where every group's answer is still
complete, so paging with `after` never skips or repeats a key.

`KeyListing` is mixed into both clients (kvsvr.client and kvsvr.aio): `list_keys` runs one
LIST per group through the client's normal call path (failover included), routed by a key
found to map to that group (`group_routes`).
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from kvsvr import calls
from kvsvr.calls import CallSpec
from kvsvr.limits import LIST_KEYS_DEFAULT, LIST_ROUTE_PROBES_MAX
from kvsvr.protocol import KeysPage, Method, list_request

_PROBE = struct.Struct(">I")


def merge_pages(pages: list[KeysPage], limit: int) -> KeysPage:
    """One sorted page of at most `limit` keys from the groups' pages (each sorted, their keys
    disjoint). A group with more to say (next_after set) has told every key up to its
    next_after: keys past the lowest of those may have gaps, so the page ends there."""
    bound = min((page.next_after for page in pages if page.next_after is not None),
                default=None)
    keys = [key for key in heapq.merge(*(page.keys for page in pages))
            if bound is None or key <= bound]
    if len(keys) > limit:
        return KeysPage(keys[:limit], keys[limit - 1])
    return KeysPage(keys, bound)


def group_routes(replicas_for: Callable[[CallSpec], tuple[str, ...]]) -> list[bytes]:
    """A key routed to each group: probe keys are hashed until their groups' replicas cover
    every address the client knows (a client of one address: one route)."""
    def ring(key: bytes | None) -> tuple[str, ...]:
        return replicas_for(CallSpec(key, Method.LIST, None, _same))

    everyone = set(ring(None))
    covered: set[str] = set()
    routes: list[bytes] = []
    for i in range(LIST_ROUTE_PROBES_MAX):
        key = b"\x00list" + _PROBE.pack(i)
        addresses = set(ring(key))
        if not addresses <= covered:
            covered |= addresses
            routes.append(key)
            if covered >= everyone:
                break
    return routes


def _same(reply: Any) -> Any:
    return reply


async def _merged(answers: list[Awaitable[KeysPage]], limit: int) -> KeysPage:
    return merge_pages(list(await asyncio.gather(*answers)), limit)


class KeyListing:
    """`list_keys` for a client class that has `_run(spec)` and `replicas_for(spec)`."""

    _group_routes: list[bytes] | None = None

    def _run(self, spec: CallSpec) -> Any:
        raise NotImplementedError

    def replicas_for(self, spec: CallSpec) -> tuple[str, ...]:
        raise NotImplementedError

    def list_keys(self, prefix: Any = b"", *, after: Any = None,
                  limit: int = LIST_KEYS_DEFAULT) -> Any:
        """Keys that start with `prefix` and hold a value or live rows (expired ones left
        out), in key order, at most `limit` (1..10,000): a KeysPage; while its next_after is
        not None, call again with after=next_after for the rest (a page may hold fewer keys
        than `limit`, even none). One replica of each group answers from its applied state,
        as a local read does (possibly a moment behind the newest writes). Asyncio client:
        an awaitable of the page."""
        request = list_request(prefix, after, limit)
        if self._group_routes is None:
            self._group_routes = group_routes(self.replicas_for)
        answers = [self._run(spec) for spec in calls.list_keys(self._group_routes, request)]
        if answers and inspect.isawaitable(answers[0]):
            return _merged(answers, request.limit)
        return merge_pages(answers, request.limit)


__all__ = ["KeyListing", "group_routes", "merge_pages"]
