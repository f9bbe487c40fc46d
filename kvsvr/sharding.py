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
    """Where a client sends a key: its group's replica (one address per group for now)."""

    def __init__(self, config: ClusterConfig | None = None, address: str | None = None):
        if address is not None:
            self._shards: ShardMap | None = None
            self._addresses = [address]
        else:
            assert config is not None
            self._shards = ShardMap(config)
            self._addresses = [r.address for g in config.groups for r in g.replicas]

    def address_for(self, key: bytes | None) -> str:
        if key is None or self._shards is None:
            return self._addresses[0]
        return self._shards.group_of(key).replicas[0].address

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)
