"""Campus shielding: an operator's switch, kept in KVSvr itself, that makes every RPC caller
stop sending to one campus's instances (and send again once released), with no restart.

A shielded campus is a key `SHIELD_KEY_PREFIX + campus` holding b"on"; releasing deletes its
value. Stubs read the keys of their instances' campuses every SHIELD_POLL_S (so a switch
takes effect within about that long) and skip shielded campuses in Failover. A read that
fails keeps the last state read: losing the store must not unshield a campus by surprise.

    kvsvr-shield --config cluster.toml CAMPUS on|off|status
    kvsvr-shield --config cluster.toml status          (every campus of the config)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvsvr import config as config_module
from kvsvr.errors import ConfigError, KvError, NotFound
from kvsvr.health import Health
from kvsvr.process import add_config_argument, program_parser
from kvsvr.rpc.limits import SHIELD_KEY_PREFIX

SHIELD_ON = b"on"


def shield_key(campus: str) -> bytes:
    return (SHIELD_KEY_PREFIX + campus).encode()


async def read_shielded(client: Any, campuses: Iterable[str]) -> frozenset[str]:
    """The campuses among `campuses` that are shielded (an AsyncClient asked)."""
    shielded = set()
    for campus in campuses:
        try:
            answer = await client.get(shield_key(campus))
        except NotFound:
            continue
        if bytes(answer.value) == SHIELD_ON:
            shielded.add(campus)
    return frozenset(shielded)


def is_shielded(client: Any, campus: str) -> bool:
    """Whether `campus` is shielded (a blocking Client asked)."""
    try:
        return bytes(client.get(shield_key(campus)).value) == SHIELD_ON
    except NotFound:
        return False


def set_shielded(client: Any, campus: str, on: bool) -> None:
    """Shield `campus` (on) or release it (a blocking Client writes)."""
    if on:
        client.put(shield_key(campus), SHIELD_ON)
    else:
        client.delete(shield_key(campus))


class ShieldedHealth(Health):
    """The storage client's Health (kvsvr.health) that also skips replicas of shielded
    campuses, for the storage client to adopt in place of Health: `shield()` is fed by a
    poller of `read_shielded` (the stubs' way) or `is_shielded`. When every candidate of a
    key is shielded they are all kept: the store must still answer, and shielding is for
    spreading traffic, not for refusing it."""

    def __init__(self, campus_of: dict[str, str]):
        """`campus_of`: replica address -> campus (from the config's groups)."""
        super().__init__()
        self.campus_of = campus_of
        self.shielded: frozenset[str] = frozenset()

    def shield(self, campuses: frozenset[str]) -> None:
        self.shielded = campuses

    def choose(self, candidates: Sequence[str], now: float,
               exclude: str | None = None) -> tuple[str, float]:
        shielded = self.shielded
        if shielded:
            kept = [a for a in candidates if self.campus_of.get(a) not in shielded]
            if kept:
                candidates = kept
        return super().choose(candidates, now, exclude)


def replica_campuses(config: config_module.ClusterConfig) -> dict[str, str]:
    """Replica address -> campus, for ShieldedHealth."""
    return {replica.address: replica.campus for group in config.groups
            for replica in group.replicas}


def campuses_of(config: config_module.ClusterConfig) -> list[str]:
    found = {instance.campus for entry in config.services for instance in entry.instances}
    found |= {replica.campus for group in config.groups for replica in group.replicas}
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    from kvsvr.client import Client

    parser = program_parser(
        "kvsvr-shield", "Shield a campus (RPC callers stop sending to its instances within "
        "seconds), release it, or show which campuses are shielded.")
    add_config_argument(parser, "cluster TOML (the switch is kept in its KV store)")
    parser.add_argument("campus", help="the campus, or 'status' alone for every campus")
    parser.add_argument("action", nargs="?", choices=["on", "off", "status"],
                        help="on: shield; off: release; status: show")
    args = parser.parse_args(argv)
    try:
        config = config_module.load(Path(args.config) if args.config else None)
        config.require_kv_groups()
        known = campuses_of(config)
        if args.action is None:
            if args.campus != "status":
                parser.error("expected CAMPUS on|off|status, or status alone")
            campuses = known
        else:
            if args.campus not in known:
                raise ConfigError(f"campus: {args.campus!r} is not a campus of the config "
                                  f"(campuses: {', '.join(known)})")
            campuses = [args.campus]
        with Client(config) as client:
            if args.action in ("on", "off"):
                set_shielded(client, args.campus, args.action == "on")
            for campus in campuses:
                state = "shielded" if is_shielded(client, campus) else "serving"
                print(f"{campus}\t{state}")
    except ConfigError as e:
        print(f"kvsvr-shield: {e}", file=sys.stderr)
        return 2
    except KvError as e:
        print(f"kvsvr-shield: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["ShieldedHealth", "campuses_of", "is_shielded", "main", "read_shielded",
           "replica_campuses", "set_shielded", "shield_key"]


if __name__ == "__main__":
    sys.exit(main())
