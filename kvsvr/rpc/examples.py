"""Services for examples, tests and benchmarks: `echo` answers at once (or after a nap),
`burn` spends a given CPU time per request (a service with a fixed capacity), and `relay`
calls `burn` from its handler (deadline and priority inheritance, one hop down)."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec

from kvsvr.errors import InvalidArgument
from kvsvr.rpc.context import priority_var, remaining_s
from kvsvr.rpc.errors import Overloaded
from kvsvr.rpc.service import Service


class SayRequest(msgspec.Struct):
    text: str


class SayReply(msgspec.Struct):
    text: str


echo = Service("echo")


@echo.method(code=1, idempotent=True)
async def say(request: SayRequest) -> SayReply:
    return SayReply(request.text)


@echo.method(code=2)
async def fail(request: SayRequest) -> SayReply:
    """Raises what the text asks for: a typed error or a bug (for the tests)."""
    if request.text == "invalid":
        raise InvalidArgument("text: 'invalid' is refused on purpose", field="text")
    if request.text == "overloaded":   # as a downstream call's refusal passed up would be
        raise Overloaded("a downstream service is over capacity")
    raise RuntimeError(f"a handler bug: {request.text}")


class NapRequest(msgspec.Struct):
    ms: int


class NapReply(msgspec.Struct):
    pid: int


@echo.method(code=3, idempotent=True)
async def nap(request: NapRequest) -> NapReply:
    """Waits (without holding the loop) `ms` milliseconds: many such calls are in flight at
    once, none of them queuing."""
    await asyncio.sleep(request.ms / 1000)
    return NapReply(os.getpid())


class WorkRequest(msgspec.Struct):
    cpu_us: int = 1000
    tag: str = ""


class WorkReply(msgspec.Struct):
    pid: int
    tag: str
    remaining_ms: float       # the budget the handler saw left when it started
    business: int = -1        # the business priority the request carried


burn = Service("burn")


@burn.method(code=1, idempotent=True)
async def work(request: WorkRequest) -> WorkReply:
    left = remaining_s()
    end = time.perf_counter() + request.cpu_us / 1e6
    while time.perf_counter() < end:
        pass
    priority = priority_var.get()
    return WorkReply(os.getpid(), request.tag, -1.0 if left is None else left * 1000,
                     -1 if priority is None else priority[0])


relay = Service("relay")
_burn_stubs: dict[str, object] = {}


@relay.method(code=1)
async def forward(request: WorkRequest) -> WorkReply:
    from kvsvr.rpc.stub import AsyncStub

    stub = _burn_stubs.get("burn")
    if stub is None:
        stub = _burn_stubs["burn"] = AsyncStub(burn, os.environ["KVSVR_CONFIG"])
    assert isinstance(stub, AsyncStub)
    reply: WorkReply = await stub.work(request)
    return reply


__all__ = ["NapReply", "NapRequest", "SayReply", "SayRequest", "WorkReply", "WorkRequest",
           "burn", "echo", "relay"]
