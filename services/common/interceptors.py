"""The one way Mirador's server interceptors wrap a service's handlers.

A subclass of `HandlerInterceptor` writes only what it adds around a call (`wrap_unary`,
`wrap_stream`, optionally `wrap_deserializer` and `applies_to`); the base rebuilds grpcio's
method handler around it. Stream wrappers are async generators that close what they wrap
(`contextlib.aclosing`), so closing the outermost one closes every layer at once.
"""

from __future__ import annotations

import inspect
from typing import Callable

import grpc

Behaviour = Callable  # (request, context) -> awaitable response, or async iterator of responses


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-unary and unary-stream handlers of async servicers; others pass through."""

    def applies_to(self, method: str) -> bool:
        """Whether this interceptor wraps `method` ("/package.Service/Method")."""
        return True

    def wrap_deserializer(self, deserializer):
        return deserializer

    def wrap_unary(self, behaviour: Behaviour, method: str) -> Behaviour:
        return behaviour

    def wrap_stream(self, behaviour: Behaviour, method: str) -> Behaviour:
        """Returns an async generator function; it should close `behaviour`'s stream (aclosing)."""
        return behaviour

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies_to(method):
            return handler
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(handler.unary_unary, method),
                request_deserializer=self.wrap_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(handler.unary_stream, method),
                request_deserializer=self.wrap_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
