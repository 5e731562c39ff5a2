"""The OpenAI-compatible HTTP API, as a Starlette app that asks the router over gRPC.

    GET  /healthz               the gateway is up (the supervisor waits for it)
    GET  /v1/models             `auto`, the routes and the fleet's models, OpenAI's list shape
    POST /v1/chat/completions   model = a route, a fleet model or `auto`; stream with SSE
    POST /v1/completions        a raw prompt, continued without the chat template
    POST /v1/embeddings         an embedding model of the fleet (`auto` = the router's)
    GET  /review, /review/{id}  the human review queue, as HTML for people (services/gateway/review.py)

Each answer names the model that actually answered and carries one extra object, `mirador`
(format in docs/gateway.md): the route and why, fallbacks, timings, confidence and, on
consensus routes, every vote, the consistency and the escalation id. Errors are OpenAI's
error JSON with the HTTP status an OpenAI client expects (services/gateway/errors.py).

A streamed answer is relayed token by token; when the client goes away, the gRPC call to
the router is cancelled at the next token at the latest (the router cancels the model's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator
from urllib.parse import quote

import grpc
import numpy as np
from opentelemetry import propagate, trace
from mirador.v1 import common_pb2, consensus_pb2_grpc, model_host_pb2, router_pb2, router_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import telemetry
from services.common.channels import open_channel
from services.common.config import MiradorConfig
from services.common.faults import InjectedFault, injected_internal_errors
from services.gateway import requests as openai_requests
from services.gateway import review
from services.gateway.answers import Answer, completion_logprobs, token_logprob
from services.gateway.errors import GatewayError, from_rpc_error, invalid
from services.gateway.observability import MetricsMiddleware
from services.gateway.requests import AUTO, GenerationRequest
from services.gateway.review import ReviewError

log = logging.getLogger("mirador.gateway")
_tracer = telemetry.tracer("mirador.gateway")
TRACE_ID_HEADER = "x-mirador-trace-id"

# The router applies each route's timeout_ms; this only bounds a router that never answers.
ROUTER_TIMEOUT_S = 600.0
CLIENT_METADATA_KEY = "x-mirador-client"  # the router's rate-limit client id (services/router/rate_limit.py)



class Gateway:
    """What the endpoints share: the config (routes, fleet, token), the router's stub and, for the
    review page, the consensus service's."""

    def __init__(self, config: MiradorConfig):
        self.config = config
        self.channel: grpc.aio.Channel | None = None
        self.router: router_pb2_grpc.RouterStub | None = None
        self.consensus_channel: grpc.aio.Channel | None = None
        self.consensus: consensus_pb2_grpc.ConsensusStub | None = None

    async def open(self) -> None:
        # open_channel adds the configured bearer token to every router call
        self.channel = open_channel(self.config, self.config.services.router.client_target, aio=True, service="router")
        self.router = router_pb2_grpc.RouterStub(self.channel)
        # the review queue (/review); channels connect on first use, so a mesh without consensus still serves /v1
        self.consensus_channel = open_channel(self.config, self.config.services.consensus.client_target, aio=True,
                                              service="consensus")
        self.consensus = consensus_pb2_grpc.ConsensusStub(self.consensus_channel)

    async def close(self) -> None:
        for channel in (self.channel, self.consensus_channel):
            if channel is not None:
                await channel.close()

    # ------------------------------------------------------------------ checks shared by endpoints

    def authorize(self, request: Request) -> None:
        """The router's bearer token, checked as the router checks it (constant-time, one header)."""
        token = self.config.security.bearer_token
        if not token:
            return
        values = request.headers.getlist("authorization")
        if not values:
            raise GatewayError(401, "the gateway requires a bearer token: send the header `Authorization: Bearer "
                                    "<token>` (the OpenAI SDKs send their api_key so) with the token that the mesh's "
                                    "config names under security.auth", code="invalid_api_key")
        scheme, _, credential = values[0].strip().partition(" ")
        presented = f"{scheme.lower()} {credential.strip()}".encode("utf-8", "replace")
        if len(values) != 1 or not hmac.compare_digest(presented, f"bearer {token}".encode()):
            raise GatewayError(401, "the bearer token sent is not the configured one: send `Authorization: Bearer "
                                    "<token>` with the token named under security.auth in the mesh's config",
                               code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.config.services.gateway.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit)
        if not body:
            raise invalid("the body is empty; send a JSON object")
        return openai_requests.parse_json(bytes(body))

    def target(self, name: str) -> dict[str, str]:
        """AskRequest fields for OpenAI's `model`: `auto` (classify), a route, or a fleet model.
        A name that is both a route and a model means the route."""
        if name == AUTO:
            return {}
        if name in self.config.routes:
            return {"route": name}
        spec = self.config.fleet.get(name)
        if spec is not None and spec.task == "text-generation":
            return {"model": name}
        if spec is not None:
            raise invalid(f"model `{name}` does {spec.task}, not text generation; name a route, a text-generation "
                          "model or `auto`"
                          + (" (embedding models answer POST /v1/embeddings)" if spec.task == "embedding" else ""),
                          "model")
        raise GatewayError(404, f"model `{name[:120]}` does not exist; use `auto`, a route ({', '.join(self.config.routes)}) "
                                f"or a text-generation model of the fleet ({', '.join(self._generators())})",
                           "model", code="model_not_found")

    def _generators(self) -> list[str]:
        return sorted(n for n, spec in self.config.fleet.items() if spec.task == "text-generation")

    @staticmethod
    def metadata(request: Request, user: str) -> tuple[tuple[str, str], ...]:
        """The rate-limit client id: OpenAI's `user`, else the HTTP client's address (gRPC metadata is ASCII)."""
        client = user or (request.client.host if request.client else "")
        return ((CLIENT_METADATA_KEY, quote(client, safe="")),) if client else ()

    def ask(self, request: Request, parsed: GenerationRequest, request_id: str):
        ask = router_pb2.AskRequest(request_id=request_id, messages=parsed.messages, prompt=parsed.prompt,
                                    sampling=parsed.sampling, **self.target(parsed.model))
        return self.router.Ask(ask, timeout=ROUTER_TIMEOUT_S, metadata=self.metadata(request, parsed.user))


def _too_large(size: int, limit: int) -> GatewayError:
    return GatewayError(413, f"the body is {size} bytes, more than this gateway takes ({limit}); send less, or raise "
                             "services.gateway.max_body_bytes in the config")


# --------------------------------------------------------------------------- endpoints


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def list_models(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    return JSONResponse({"object": "list", "data": _models(gateway.config)})


async def get_model(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    name = request.path_params["model"]
    for entry in _models(gateway.config):
        if entry["id"] == name:
            return JSONResponse(entry)
    raise GatewayError(404, f"model `{name[:120]}` does not exist; GET /v1/models lists what does", "model",
                       code="model_not_found")


def _models(config: MiradorConfig) -> list[dict]:
    def entry(name: str, **mirador) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "mirador", "mirador": mirador}

    models = [entry(AUTO, kind="auto", description="the router classifies each request and picks a route")]
    models += [entry(name, kind="route", primary=r.primary, fallback=list(r.fallback), validators=list(r.validators),
                     consensus=r.uses_consensus, description=r.description) for name, r in config.routes.items()]
    models += [entry(name, kind="model", task=spec.task, description=spec.description)
               for name, spec in config.fleet.items() if name not in config.routes]
    return models


async def chat_completions(request: Request) -> Response:
    return await _generation(request, chat=True)


async def completions(request: Request) -> Response:
    return await _generation(request, chat=False)


def _server_span(request: Request) -> trace.Span:
    """A span continuing the caller's W3C `traceparent` (a new trace without one); the router's
    calls made while it is current carry it on, so one trace runs HTTP client → gateway → mesh."""
    return _tracer.start_span(f"{request.method} {request.url.path}", context=propagate.extract(request.headers),
                              kind=trace.SpanKind.SERVER)


def _trace_headers(span: trace.Span) -> dict[str, str]:
    trace_id = telemetry.trace_id_hex(span)
    return {TRACE_ID_HEADER: trace_id} if trace_id else {}


async def _generation(request: Request, chat: bool) -> Response:
    started = time.perf_counter()
    gateway = _gateway(request)
    gateway.authorize(request)
    data = await gateway.read_json(request)
    parsed = openai_requests.parse_chat(data) if chat else openai_requests.parse_completion(data)
    request_id = uuid.uuid4().hex
    gateway.target(parsed.model)  # an unknown model is a 404 before any call
    span = _server_span(request)
    headers = {"x-request-id": request_id, **_trace_headers(span)}
    streaming = False
    try:
        with trace.use_span(span, end_on_exit=False):
            call = gateway.ask(request, parsed, request_id)
        answer = Answer()
        try:
            if not parsed.stream:
                if not await _collect_unless_disconnected(request, call, answer):
                    return Response(status_code=499)  # nobody is listening; the call was cancelled
                return JSONResponse(_complete(answer, parsed, request_id, started, chat), headers=headers)
            # Errors before the first token get their HTTP status; the stream starts with it.
            prefetched = []
            async for event in call:
                prefetched.append(event)
                if not event.HasField("route"):
                    break
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            span.set_attribute("http.response.status_code", error.status)
            raise error from None
        except BaseException:
            call.cancel()
            raise
        streaming = True
        return _EventStream(_stream(call, prefetched, answer, parsed, request_id, started, chat, span),
                            headers={**headers, "cache-control": "no-cache"})
    finally:
        if not streaming:
            span.end()


async def _collect_unless_disconnected(request: Request, call, answer: Answer) -> bool:
    """Gathers a whole answer; False (the call cancelled) when the client leaves before it is complete,
    so an abandoned request stops costing the model its time."""

    async def collect() -> None:
        async for event in call:
            answer.add(event)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting, watching = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            call.cancel()
            collecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    if collecting.cancelled():
        return False
    collecting.result()  # the router's error, if it failed
    return True


def _complete(answer: Answer, parsed: GenerationRequest, request_id: str, started: float, chat: bool) -> dict:
    if chat:
        logprobs = {"content": [token_logprob(t) for t in answer.tokens], "refusal": None} if parsed.logprobs else None
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": answer.finish_reason}
    else:
        choice = {"index": 0, "text": answer.text,
                  "logprobs": completion_logprobs(answer.tokens) if parsed.logprobs else None,
                  "finish_reason": answer.finish_reason}
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": answer.model, "choices": [choice], "usage": answer.usage(), "system_fingerprint": None,
            "mirador": answer.extra(started)}


async def _stream(call, prefetched: list, answer: Answer, parsed: GenerationRequest, request_id: str, started: float,
                  chat: bool, span: trace.Span) -> AsyncIterator[bytes]:
    """OpenAI's server-sent events: a chunk per token, a last chunk with finish_reason, the model that
    answered and the `mirador` object, the usage chunk when asked for, then `data: [DONE]`."""
    created = int(time.time())
    usage_field = {"usage": None} if parsed.include_usage else {}

    def chunk(choices: list, **extra) -> bytes:
        body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
                "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": answer.model, "system_fingerprint": None, "choices": choices, **usage_field, **extra}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    written = [0]  # characters of the answer sent so far: the legacy logprobs' text_offset

    def piece(text: str, token: common_pb2.TokenChunk | None = None, finish: str | None = None) -> dict:
        if chat:
            delta = {"content": text} if finish is None else {}
            logprobs = ({"content": [token_logprob(token)] if token is not None else [], "refusal": None}
                        if parsed.logprobs and finish is None else None)
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        logprobs = completion_logprobs([token], written[0]) if parsed.logprobs and token is not None else None
        written[0] += len(text)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    async def events():
        for event in prefetched:
            yield event
        async for event in call:
            yield event

    for event in prefetched:
        if event.HasField("route"):
            answer.add(event)  # the first chunk names the route's model
    try:
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for event in events():
            answer.add(event)
            kind = event.WhichOneof("event")
            if kind == "token":
                yield chunk([piece(event.token.text, event.token)])
            elif kind == "verdict" and not answer.tokens:  # consensus routes: the decided answer at once
                yield chunk([piece(event.verdict.answer)])
            elif kind == "summary":
                yield chunk([piece("", finish=answer.finish_reason)], mirador=answer.extra(started))
        if parsed.include_usage:
            usage_field.clear()
            yield chunk([], usage=answer.usage())
        yield b"data: [DONE]\n\n"
    except grpc.aio.AioRpcError as exc:
        # The stream has begun (status 200): the error is an event, as OpenAI sends it; no [DONE] follows.
        yield b"data: " + json.dumps(from_rpc_error(exc).body()).encode() + b"\n\n"
    finally:
        call.cancel()  # no-op once finished; a client gone mid-answer stops the router's work
        span.end()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its iterator: when the client disconnects, send()
    fails and Starlette stops iterating; closing runs the generator's `finally`, which cancels
    the gRPC call now rather than whenever the generator is garbage-collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


async def embeddings(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    data = await gateway.read_json(request)
    parsed = openai_requests.parse_embeddings(data)
    model = gateway.config.services.router.embedding_model if parsed.model == AUTO else parsed.model
    span = _server_span(request)
    try:
        with trace.use_span(span, end_on_exit=True):
            reply = await gateway.router.Embed(
                model_host_pb2.EmbedRequest(request_id=uuid.uuid4().hex, model=model, texts=parsed.texts),
                timeout=ROUTER_TIMEOUT_S, metadata=gateway.metadata(request, parsed.user))
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    base64_encoded = openai_requests.embedding_encoding(data) == "base64"

    def vector(values) -> list[float] | str:
        if base64_encoded:
            return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
        return list(values)

    return JSONResponse({
        "object": "list", "model": reply.model,
        "data": [{"object": "embedding", "index": i, "embedding": vector(e.values)} for i, e in enumerate(reply.embeddings)],
        # the model host does not count embedded tokens
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }, headers=_trace_headers(span))


# --------------------------------------------------------------------------- errors and the app


async def _gateway_error(request: Request, exc: GatewayError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if _is_review_page(request):
        return _review_http_error(request, exc)
    if exc.status_code == 404:
        message = (f"no endpoint at {request.url.path[:200]}; this gateway serves GET /v1/models, POST "
                   "/v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /healthz and the "
                   "review page at /review")
    elif exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "another method")
        message = f"{request.method} is not allowed on {request.url.path[:200]}; use {allowed}"
    else:
        message = str(exc.detail)
    return GatewayError(exc.status_code, message).response()


def _is_review_page(request: Request) -> bool:
    return request.url.path == "/review" or request.url.path.startswith("/review/")


def _review_http_error(request: Request, exc: HTTPException) -> Response:
    """The review page's own 404/405 in HTML: its readers are people, not SDKs."""
    if exc.status_code == 404:
        error = ReviewError(404, "No such page", f"There is no page at {request.url.path[:200]}; the review queue is "
                                                 "at /review and each case at /review/<id>.")
    elif exc.status_code == 405:
        error = ReviewError(405, "Not allowed", f"{request.method} is not allowed on {request.url.path[:200]}; "
                                                "open the page in a browser and use its forms.")
    else:
        error = ReviewError(exc.status_code, "Refused", str(exc.detail))
    return review.error_page(request, error)


async def _review_error(request: Request, exc: ReviewError) -> Response:
    return review.error_page(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The client gets a sentence and an id, never the exception; the log line with the id has the traceback.
    error_id = uuid.uuid4().hex[:16]
    log.error("unexpected error", exc_info=exc,
              extra={"fields": {"path": request.url.path, "error_id": error_id, "error": repr(exc)[:500]}})
    if _is_review_page(request):
        return review.error_page(request, ReviewError(500, "Something went wrong", "The review page failed "
                                                      f"unexpectedly (error id {error_id}, in the gateway's log); "
                                                      "retry, and report the id if it persists."))
    return GatewayError(500, f"the gateway failed because of a fault of its own, not of this request (error id "
                             f"{error_id}); retry, and if it happens again report the id: the gateway's log has the "
                             "details under it").response()


class _InjectedFaults:
    """MIRADOR_INJECT_INTERNAL_ERROR naming HTTP paths (tests): those requests fail as a bug would."""

    def __init__(self, app, paths: frozenset[str]):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") in self.paths:
            raise InjectedFault(f"injected fault in {scope['path']}: secret=/etc/mirador/hunter2 at 0x7f00dead")
        await self.app(scope, receive, send)


def _fault_injection() -> list[Middleware]:
    paths = frozenset(p for p in injected_internal_errors("gateway") if not p.startswith("/mirador."))
    return [Middleware(_InjectedFaults, paths=paths)] if paths else []


def build_app(config: MiradorConfig) -> Starlette:
    gateway = Gateway(config)
    pages = review.ReviewPages()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.open()
        try:
            yield
        finally:
            await gateway.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/review", pages.queue, methods=["GET"]),
            Route("/review/login", pages.login_form, methods=["GET"]),
            Route("/review/login", pages.login, methods=["POST"]),
            Route("/review/logout", pages.logout, methods=["POST"]),
            Route("/review/{case_id}", pages.case, methods=["GET"]),
            Route("/review/{case_id}", pages.resolve, methods=["POST"]),
        ],
        exception_handlers={GatewayError: _gateway_error, ReviewError: _review_error, HTTPException: _http_error,
                            Exception: _unexpected},
        middleware=[Middleware(MetricsMiddleware), *_fault_injection()],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
