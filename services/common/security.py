"""Credentials between Mirador's processes: TLS/mTLS and the router's bearer token.

Everything here reads `config.security` (see `services.common.config.SecurityConfig`):

* `server_credentials` — what `serve()` binds with when `security.tls` is set;
* `channel_credentials` — what `services.common.channels.open_channel` connects with
  (this process's certificate and key go along, so servers that require client
  certificates accept it);
* `BearerTokenServerInterceptor` — the router's check of `authorization: Bearer <token>`;
* `bearer_client_interceptors` — the clients' side of it, sync and aio.

Certificate files are read when a server binds or a channel opens, so a process
that opens a new channel after the files were replaced uses the new ones.
"""

from __future__ import annotations

import collections
import hmac
import logging

import grpc

from services.common.config import SecurityConfig, TlsSettings
from services.common.logs import log_event

log = logging.getLogger("mirador.security")

AUTHORIZATION = "authorization"
BEARER = "bearer"

#: Methods every caller may use without a token, so probes and tools work: health checks
#: (`mirador status`, Kubernetes, the supervisor) and server reflection (grpcurl).
EXEMPT_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

#: Services whose calls need the bearer token when one is configured: the front door.
#: Service-to-service calls (router → model host, consensus → model host) are protected by mTLS.
TOKEN_PROTECTED_SERVICES = ("router",)


# --------------------------------------------------------------------------- TLS


def _read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """This process's certificate and key; with `ca`, client certificates are checked against it
    (and required when `require_client_cert` is true)."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=_read(tls.ca) if tls.ca else None,
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """Server certificates are checked against `ca` (the system's roots without it); this
    process presents `client_cert`/`client_key` (default: `cert`/`key`) for mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca) if tls.ca else None,
        private_key=_read(tls.client_key or tls.key),
        certificate_chain=_read(tls.client_cert or tls.cert),
    )


def channel_options(tls: TlsSettings | None) -> list[tuple[str, str]]:
    if tls is not None and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


# --------------------------------------------------------------------------- bearer token, server side


def _abort_handler(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that answers `code` without running it."""

    async def unary_request(request, context):
        await context.abort(code, message)

    async def stream_request(request_iterator, context):
        await context.abort(code, message)

    async def unary_request_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    async def stream_request_stream(request_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_request, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary_request_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_request, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_request_stream, **kwargs)


class BearerTokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless the call carries `authorization: Bearer <token>`.
    Health checks and reflection are exempt. The comparison takes constant time."""

    def __init__(self, token: str, service: str):
        self._expected = f"{BEARER} {token}".encode()
        self.service = service

    def _authorized(self, metadata) -> bool | None:
        """True when the right token is sent, False for a wrong one, None for none."""
        values = [value for key, value in (metadata or ()) if key.lower() == AUTHORIZATION]
        if not values:
            return None
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, credential = value.strip().partition(" ")
        presented = f"{scheme.lower()} {credential.strip()}".encode("utf-8", "replace")
        return hmac.compare_digest(presented, self._expected) and len(values) == 1

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_METHOD_PREFIXES):
            return handler
        verdict = self._authorized(handler_call_details.invocation_metadata)
        if verdict:
            return handler
        if verdict is None:
            message = (f"the {self.service} requires a bearer token: send the metadata "
                       "`authorization: Bearer <token>` with the token that the mesh's config names under "
                       "security.auth (bearer_token_env or bearer_token_file)")
        else:
            message = (f"the bearer token sent to the {self.service} is not the configured one: send "
                       "`authorization: Bearer <token>` with the token named under security.auth in the mesh's config")
        log_event(log, "unauthenticated call refused", logging.WARNING, method=method,
                  reason="no token" if verdict is None else "wrong token")
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def server_interceptors(security: SecurityConfig, service: str) -> list[grpc.aio.ServerInterceptor]:
    """The authentication interceptors `serve()` puts first for `service`."""
    if security.bearer_token and service in TOKEN_PROTECTED_SERVICES:
        return [BearerTokenServerInterceptor(security.bearer_token, service)]
    return []


# --------------------------------------------------------------------------- bearer token, client side


class _SyncCallDetails(
    collections.namedtuple("_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


def _with_token(metadata, token: str) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in (metadata or ()) if k.lower() != AUTHORIZATION]
    return [*kept, (AUTHORIZATION, f"Bearer {token}")]


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self._token = token

    def _details(self, details):
        return _SyncCallDetails(
            details.method, details.timeout, _with_token(details.metadata, self._token),
            details.credentials, getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _aio_details(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*_with_token(details.metadata, token))
    return details._replace(metadata=metadata)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details, self._token), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_aio_details(client_call_details, self._token), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_aio_details(client_call_details, self._token), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_aio_details(client_call_details, self._token), request_iterator)


def bearer_client_interceptors(token: str, *, aio: bool) -> list:
    """Interceptors that add `authorization: Bearer <token>` to every call of a channel."""
    if aio:
        return [_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamUnary(token), _AioStreamStream(token)]
    return [_SyncBearer(token)]
