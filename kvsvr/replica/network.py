"""What the replica's round needs of the network: the interface the ZeroMQ edge
(kvsvr/replica/edge.py) implements, and a simulator's fake network can implement instead."""

from __future__ import annotations

from typing import Any, Protocol

from kvsvr import protocol


class Network(Protocol):
    def send_peer(self, index: int, frames: list[bytes], now: float) -> None:
        """Frames to peer `index` (through the fault hook, if any)."""

    def send_after_sync(self, seq: int, index: int, frames: list[bytes]) -> bool:
        """Frames to peer `index` sent the moment vote log frames up to `seq` are durable,
        without the loop; False if that cannot be done (the round holds them instead)."""

    def release_delayed(self, now: float) -> None:
        """Send what the fault hook held back and is due by `now`."""

    def answer(self, identity: bytes, frame: bytes) -> None:
        """A response to a client's or a peer's request, sent by the next `flush`."""

    def flush(self) -> None:
        """Send the answers so far."""

    @property
    def answering(self) -> bool:
        """Answers wait for `flush`."""

    def set_faults(self, peer: str, drop: float, delay_ms: int) -> dict[str, Any]:
        """The fault hook on the links to `peer` (every peer if empty): the chance a message
        is lost, and the most it is held back; InvalidArgument for an unknown peer. Each
        peer's faults now, by name."""

    def faults(self) -> dict[int, tuple[float, int]]:
        """(drop, delay_ms) of each peer's link, by index."""


class Outbox:
    """The answers of a round (to clients and to peers' requests), kept until its end and
    then taken as few messages per destination as the frame limits allow: what every
    Network implementation does with `answer`, `answering` and `flush`, whatever sends."""

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames: dict[bytes, list[bytes]] = {}

    def add(self, identity: bytes, frame: bytes) -> None:
        self._frames.setdefault(identity, []).append(frame)

    def __bool__(self) -> bool:
        return bool(self._frames)

    def take(self) -> list[tuple[bytes, bytes]]:
        """(identity, message) for everything added since the last take, which it empties."""
        frames, self._frames = self._frames, {}
        return [(identity, message) for identity, pending in frames.items()
                for message in protocol.pack(pending)]


__all__ = ["Network", "Outbox"]
