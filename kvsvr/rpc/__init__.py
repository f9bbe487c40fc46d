"""Svrkit, KVSvr's RPC kit: services declared with typed msgspec requests and responses,
served as asyncio coroutines over ZeroMQ in KVSvr's own frame, called through stubs with
deadlines, FastReject overload control (after DAGOR), caller-side failover and campus
shielding. docs/rpc.md explains how it works inside."""

from kvsvr.rpc.context import remaining_s
from kvsvr.rpc.errors import Overloaded
from kvsvr.rpc.server import Server
from kvsvr.rpc.service import Method, Service
from kvsvr.rpc.stub import AsyncStub, Stub

__all__ = ["AsyncStub", "Method", "Overloaded", "Server", "Service", "Stub", "remaining_s"]
