"""Declaring a service: its name and its methods, each with a typed request and response.

    echo = Service("echo")

    @echo.method
    async def say(request: SayRequest) -> SayReply:
        return SayReply(request.text)

The same object is the server's table of handlers and the stubs' table of types, so caller
and instance agree on the schema by importing one module. A method's wire code is its
position in declaration order (1, 2, ...) unless given (`@echo.method(code=7)`); give codes
explicitly once a service is deployed, so that adding a method never renumbers the others.

The wire (docs/rpc.md): an RPC travels in KVSvr's own frame (kvsvr/_frame.pxi) with the
method code in the header's `code`, the remaining budget in `budget_ms`, and a body that starts
with an 8-byte RPC prefix followed by the msgpack of the request or response struct (of an
ErrorReply when the response's status is not 0):

    request prefix   u32 service tag (crc32 of the service name), u8 business priority,
                     u8 user priority, u16 flags (bit 0: a sample, standing for
                     SAMPLE_EVERY calls its caller dropped locally; others reserved, 0)
    response prefix  u16 admission level of the instance, u16 flags (bit 0: the error came
                     from the handler, e.g. a downstream call's Overloaded, not from this
                     instance's own refusal), u32 reserved (0)
"""

from __future__ import annotations

import inspect
import struct
import typing
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec

from kvsvr.errors import InvalidArgument
from kvsvr.protocol import describe_validation_error
from kvsvr.rpc.limits import BODY_BYTES_MAX, METHODS_PER_SERVICE_MAX, RPC_PREFIX_BYTES

REQUEST_PREFIX = struct.Struct("<IBBH")
FLAG_SAMPLE = 1
FLAG_FROM_HANDLER = 1   # in a response's flags
RESPONSE_PREFIX = struct.Struct("<HHI")
assert REQUEST_PREFIX.size == RESPONSE_PREFIX.size == RPC_PREFIX_BYTES

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any], Awaitable[Any]]


def service_tag(name: str) -> int:
    return zlib.crc32(name.encode())


class Method(Generic[Request, Response]):
    """One method of a service: its code, types, handler and codecs."""

    def __init__(self, service: Service, name: str, code: int, request_type: type[Request],
                 response_type: type[Response], handler: Handler, idempotent: bool):
        self.service = service
        self.name = name
        self.full_name = f"{service.name}.{name}"
        self.code = code
        self.request_type = request_type
        self.response_type = response_type
        self.handler = handler
        self.idempotent = idempotent
        self.request_decoder = msgspec.msgpack.Decoder(request_type)
        self.response_decoder = msgspec.msgpack.Decoder(response_type)

    def decode_request(self, body: Any) -> Request:
        """The request in `body` (no prefix); InvalidArgument naming the field if it is not
        one."""
        return _decode(self.request_decoder, self.request_type, body, "request")

    def decode_response(self, body: Any) -> Response:
        return _decode(self.response_decoder, self.response_type, body, "response")

    def __repr__(self) -> str:
        return f"<method {self.full_name} code={self.code}>"


def _decode(decoder: msgspec.msgpack.Decoder[Any], root: type, body: Any, what: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        message, field = describe_validation_error(root, str(e))
        raise InvalidArgument(f"{what}.{message}" if field else f"{what}: {message}",
                              field=f"{what}.{field}" if field else what) from None
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"{what}: not msgpack ({e})", field=what) from None


class Service:
    """A named set of methods (see the module docstring)."""

    def __init__(self, name: str):
        if not name or len(name) > 64 or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"name: {name!r}, expected 1..64 of [A-Za-z0-9_-]")
        self.name = name
        self.tag = service_tag(name)
        self.by_code: dict[int, Method[Any, Any]] = {}
        self.by_name: dict[str, Method[Any, Any]] = {}

    def method(self, handler: Handler | None = None, /, *, code: int | None = None,
               idempotent: bool = False) -> Any:
        """Declare `handler` (async def name(request: Req) -> Resp) as a method. A call
        that timed out is retried on another instance only if `idempotent`."""
        def declare(function: Handler) -> Handler:
            self._add(function, code, idempotent)
            return function
        return declare(handler) if handler is not None else declare

    def _add(self, function: Handler, code: int | None, idempotent: bool) -> None:
        name = function.__name__
        where = f"{self.name}.{name}"
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"{where}: a method is an async def (a coroutine function)")
        hints = typing.get_type_hints(function)
        parameters = list(inspect.signature(function).parameters)
        if len(parameters) != 1 or parameters[0] not in hints or "return" not in hints:
            raise TypeError(f"{where}: expected one annotated parameter (the request type) "
                            "and an annotated return (the response type)")
        request_type, response_type = hints[parameters[0]], hints["return"]
        for role, tp in (("request", request_type), ("response", response_type)):
            if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
                raise TypeError(f"{where}: the {role} type {tp!r} is not a msgspec.Struct")
        if code is None:
            code = max(self.by_code, default=0) + 1
        if not 1 <= code <= METHODS_PER_SERVICE_MAX:
            raise ValueError(f"{where}: code {code}, expected 1..{METHODS_PER_SERVICE_MAX}")
        if code in self.by_code or name in self.by_name:
            raise ValueError(f"{where}: code {code} or name {name!r} is declared twice")
        method: Method[Any, Any] = Method(self, name, code, request_type, response_type,
                                          function, idempotent)
        self.by_code[code] = method
        self.by_name[name] = method

    def __repr__(self) -> str:
        return f"<service {self.name} methods={sorted(self.by_name)}>"


def encode_body(prefix: bytes, value: Any, encoder: msgspec.msgpack.Encoder) -> bytearray:
    """The prefix and the msgpack of `value`; InvalidArgument if it is too big for a frame."""
    buffer = bytearray(prefix)
    encoder.encode_into(value, buffer, RPC_PREFIX_BYTES)
    if len(buffer) - RPC_PREFIX_BYTES > BODY_BYTES_MAX:
        raise InvalidArgument(f"body: {len(buffer) - RPC_PREFIX_BYTES} bytes, at most "
                              f"{BODY_BYTES_MAX} fit in a frame", field="body")
    return buffer


__all__ = [
    "FLAG_FROM_HANDLER",
    "FLAG_SAMPLE",
    "REQUEST_PREFIX",
    "RESPONSE_PREFIX",
    "Method",
    "Service",
    "encode_body",
    "service_tag",
]
