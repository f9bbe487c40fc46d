"""Key routing: xxh64(key) -> virtual shard -> group. Moving a shard never rehashes keys."""

from __future__ import annotations

from xxhash import xxh64_intdigest

from kvsvr.config import ClusterConfig, GroupConfig


def shard_of(key: bytes, virtual_shards: int) -> int:
    return xxh64_intdigest(key) % virtual_shards


def home_index(key: bytes, replicas: int) -> int:
    """The key's home replica within its group (owner of round 0 of every version)."""
    return xxh64_intdigest(key) % replicas


class ShardMap:
    def __init__(self, config: ClusterConfig):
        self.virtual_shards = config.virtual_shards
        self.groups = config.groups
        self._owner = config.shard_table()

    def group_of(self, key: bytes) -> GroupConfig:
        return self.groups[self._owner[xxh64_intdigest(key) % self.virtual_shards]]


class Router:
    """Where a client may send a key: its group's replicas, the key's home first.

    The home (`home_index`) owns round 0 of every version of the key, so a write sent there
    commits in one round trip; the others follow in ring order (home+1, home+2, ... mod n) so
    that every client fails over from a given home to the same next replica. Which of them is
    used is the client's choice (kvsvr.health): the first that is not failing."""

    def __init__(self, config: ClusterConfig | None = None, address: str | None = None):
        self._owner: list[int] | None = None
        self._virtual_shards = 1
        # _rings[group][home]: the group's addresses starting at `home`, computed once.
        self._rings: list[list[tuple[str, ...]]] = []
        if address is not None:
            self._addresses: tuple[str, ...] = (address,)
            return
        if config is None:
            raise ValueError("Router needs a config or an address")
        self._owner = config.shard_table()
        self._virtual_shards = config.virtual_shards
        self._addresses = tuple(r.address for g in config.groups for r in g.replicas)
        for group in config.groups:
            addresses = [r.address for r in group.replicas]
            n = len(addresses)
            self._rings.append([tuple(addresses[(home + i) % n] for i in range(n))
                                for home in range(n)])

    def replicas_for(self, key: bytes | None) -> tuple[str, ...]:
        """The addresses to try for `key`, home first; None (ping, status) or a router of one
        address: every address, in config order."""
        if key is None or self._owner is None:
            return self._addresses
        digest = xxh64_intdigest(key)   # one hash for both the shard and the home
        ring = self._rings[self._owner[digest % self._virtual_shards]]
        return ring[digest % len(ring)]

    def address_for(self, key: bytes | None) -> str:
        """The key's home address (the clients pick among replicas_for with their health)."""
        return self.replicas_for(key)[0]

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)
