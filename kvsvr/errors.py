"""Typed errors of KVSvr. Each has a wire status code so a node's answer maps back to it."""

from __future__ import annotations


class KvError(Exception):
    """Base of every error KVSvr raises on purpose."""

    code = 99

    def __init__(self, message: str, *, field: str | None = None, version: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.version = version


class NotFound(KvError):
    """The key (or row) holds no value. `version` is the key's version (0: never written)."""

    code = 1


class VersionConflict(KvError):
    """An expected version did not match. `version` is the key's current version."""

    code = 2


class InvalidArgument(KvError):
    """A request was malformed or over a limit. `field` names the offending field."""

    code = 3


class Timeout(KvError):
    """No answer within the call's deadline. A write may or may not have been applied."""

    code = 4


class Unavailable(KvError):
    """The call was not taken: the node cannot serve now (shutting down, not ready), or no
    node of the key's group could be reached (no connection within the client's connect
    wait), so nothing was sent. Either way nothing was changed."""

    code = 5


class StorageFull(KvError):
    """The node's LMDB map is full: raise `storage.map_size_mib` in the config."""

    code = 6


class UnknownMethod(KvError):
    """The node does not know the requested method (a newer client, or a bad frame)."""

    code = 7


class Internal(KvError):
    """The node hit an unexpected error; the request changed nothing."""

    code = 8


class Compacted(KvError):
    """changes(since) from before the key's compaction horizon: tombstones older than
    `version` are gone, so the diff would be incomplete. Resync from version 0."""

    code = 9


class ResourceExhausted(KvError):
    """The node holds as much of something as its limit allows (parked watches, say): try
    again later or another replica. Nothing was changed."""

    code = 10


class WatchesFull(ResourceExhausted, Unavailable):
    """A replica parks as many watches as it may: as an Unavailable, the client asks the
    next replica of the key (raised to the caller only when none took the watch in time)."""

    code = ResourceExhausted.code


class ConfigError(ValueError):
    """A cluster config is invalid; the message names the field."""


ERRORS_BY_CODE: dict[int, type[KvError]] = {
    cls.code: cls
    for cls in (NotFound, VersionConflict, InvalidArgument, Timeout, Unavailable, StorageFull,
                UnknownMethod, Internal, Compacted, ResourceExhausted)
}

def error_class(status: int, *, watch: bool = False) -> type[KvError]:
    """The error an answer's status carries; for a watch (`watch`), a full replica's refusal
    is WatchesFull, so the client asks another replica."""
    found = ERRORS_BY_CODE.get(status, KvError)
    return WatchesFull if watch and found is ResourceExhausted else found


__all__ = [
    "ERRORS_BY_CODE",
    "Compacted",
    "ConfigError",
    "Internal",
    "InvalidArgument",
    "KvError",
    "NotFound",
    "ResourceExhausted",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "UnknownMethod",
    "VersionConflict",
    "WatchesFull",
    "error_class",
]
