"""What a handler's downstream calls inherit: the deadline of the request it serves and the
request's priority. Held in context variables, so every asyncio task (each request runs in
its own) sees its own, and a stub called from a handler reads them without being told."""

from __future__ import annotations

import time
from contextvars import ContextVar

# The monotonic time by which the request being served must be answered (None: unbounded).
deadline_var: ContextVar[float | None] = ContextVar("kvsvr_rpc_deadline", default=None)
# The (business, user) priority of the request being served (None: this is an entry call).
priority_var: ContextVar[tuple[int, int] | None] = ContextVar("kvsvr_rpc_priority",
                                                              default=None)


def remaining_s() -> float | None:
    """Seconds left of the request this task serves (None: no deadline, or not serving)."""
    deadline = deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()


__all__ = ["deadline_var", "priority_var", "remaining_s"]
