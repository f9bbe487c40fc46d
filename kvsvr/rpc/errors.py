"""Errors of the RPC kit: KVSvr's typed errors (kvsvr.errors) plus `Overloaded`.

Each has a wire status code; a response frame with that status carries an ErrorReply.
"""

from __future__ import annotations

from kvsvr.errors import ERRORS_BY_CODE, KvError


class Overloaded(KvError):
    """The instance (or the caller, on its behalf) refused the call before doing any work: it
    is past its capacity and the call's priority is below its admission level. Nothing was
    changed; another instance, or later, may take it."""

    code = 64


RPC_ERRORS_BY_CODE: dict[int, type[KvError]] = {**ERRORS_BY_CODE, Overloaded.code: Overloaded}

__all__ = ["RPC_ERRORS_BY_CODE", "Overloaded"]
