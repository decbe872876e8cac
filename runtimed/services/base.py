"""What every gRPC service shares: the one place errors become status codes, and the
request context (containerd namespace and lease from the call metadata).
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from runtimed import identifiers
from runtimed.errors import status_of
from runtimed.services.h2server import AbortError

# what context.abort raises: grpc.aio's, or the daemon's own server's (h2server)
_ABORTS = (grpc.aio.AbortError, AbortError)

log = logging.getLogger("runtimed.services")

NAMESPACE_KEY = "containerd-namespace"
LEASE_KEY = "containerd-lease"
DEFAULT_NAMESPACE = "default"


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    known = status_of(exc)
    if known is not None:
        return grpc.StatusCode[known[0]], known[1]
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException):
    code, message = _status(exc)
    await context.abort(code, message)


def _wrap(method):
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (*_ABORTS, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never UNKNOWN
                await _abort(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except _ABORTS:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    return unary


def service(cls):
    """Class decorator: every RPC method (CamelCase, defined on the class) maps
    RuntimedError subclasses to their status codes and anything else to INTERNAL."""
    for name, member in list(vars(cls).items()):
        is_rpc = inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
        if name[:1].isupper() and is_rpc:
            setattr(cls, name, _wrap(member))
    return cls


class _Malformed:
    """What a request body that is not its message parses to; the handler never sees it."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:  # the handler takes the raw bytes
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - answered with a status below
            return _Malformed(exc)

    return parse


async def _refuse(request, context) -> None:
    # INTERNAL, as gRPC-Go (and so containerd) answers a body it cannot unmarshal
    await context.abort(grpc.StatusCode.INTERNAL, f"malformed request: {request.error}")


def refuse_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with a request parser that cannot fail: grpc.aio answers UNKNOWN when a
    unary request body does not parse, this answers INTERNAL with the parse error before
    the method runs. (Streamed request bodies fail inside the method, where `service`
    maps the error.)"""
    if handler.request_streaming:
        return handler
    parse = _tolerant(handler.request_deserializer)
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            if request.__class__ is _Malformed:
                return await _refuse(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=parse,
            response_serializer=handler.response_serializer)
    inner_stream = handler.unary_stream

    async def unary_stream(request, context):
        if request.__class__ is _Malformed:
            await _refuse(request, context)
        result = inner_stream(request, context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        else:
            await result

    return grpc.unary_stream_rpc_method_handler(
        unary_stream, request_deserializer=parse,
        response_serializer=handler.response_serializer)


class MethodTable(grpc.GenericRpcHandler):
    """Every method the daemon serves, in one dict, as the one generic handler of the server.

    Services register into this table (it has the two `add_*` methods the generated
    `add_XServicer_to_server` calls) instead of into the server, for per-call cost:
    grpc.aio keeps one pending request per *registered* method and waits on all of them
    (`asyncio.wait` over ~100 futures) for every call it accepts, and an interceptor runs
    per call. Here the handlers are wrapped once, at registration, and a call costs one
    dict lookup."""

    def __init__(self):
        self.methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list = []

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service_name}/{name}"] = refuse_malformed(handler)

    def add_generic_rpc_handlers(self, handlers) -> None:
        # generated code adds the same methods here too; kept for services added only so
        self._generic.extend(handlers)

    def service(self, handler_call_details):
        handler = self.methods.get(handler_call_details.method)
        if handler is not None:
            return handler
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return refuse_malformed(handler)
        return None


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return None


def namespace(context: grpc.aio.ServicerContext) -> str:
    """The containerd namespace the call acts in (metadata `containerd-namespace`)."""
    value = _metadata(context, NAMESPACE_KEY) or DEFAULT_NAMESPACE
    return identifiers.validate(value, "namespace")


def lease(context: grpc.aio.ServicerContext) -> str | None:
    """The lease the call's new objects belong to (metadata `containerd-lease`), if any."""
    return _metadata(context, LEASE_KEY) or None
