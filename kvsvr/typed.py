"""Signatures for type checkers only: the calls of `ClientCalls` are written once, and each
client says what its calls give (the blocking client the result, the asyncio client an awaitable of
it, a pipeline nothing until execute()) by restating them with these in an
`if TYPE_CHECKING:` block, so the parameters never drift apart. Nothing here runs in a
program: each function hands its argument back unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def awaiting(result: type[R]) -> Callable[[Callable[Concatenate[S, P], Any]],
                                        Callable[Concatenate[S, P], Awaitable[R]]]:
    """`awaiting(T)(method)`: `method`, giving an awaitable of a T (the asyncio client)."""
    return lambda method: method


def queued(method: Callable[Concatenate[S, P], Any]) -> Callable[Concatenate[S, P], None]:
    """`method`, giving nothing: the call is queued (a pipeline)."""
    return method


def returning(result: type[R]) -> Callable[[Callable[Concatenate[S, P], Any]],
                                         Callable[Concatenate[S, P], R]]:
    """`returning(T)(method)`: `method`, giving a T. (Two calls, not one: with the method and
    T in one call, mypy took T from the base class's Any.)"""
    return lambda method: method


__all__ = ["awaiting", "queued", "returning"]
