"""`mirador.v1.Router` over gRPC: validate, route, then relay the answer of the
model (with fallbacks) or of the consensus service, keeping sessions."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

import grpc
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from mirador.v1 import router_pb2, router_pb2_grpc
from prometheus_client import Counter

from services.common import telemetry
from services.common.call_marks import CRITICAL, HEDGE, HEDGE_METADATA_KEY, PRIORITY_METADATA_KEY
from services.common.config import ModelSpec, RouteSpec
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.validation import require_messages, require_sampling, require_text
from services.router.fallback import RETRYABLE, Breakers
from services.router.identity import CallerIdentity
from services.router.rate_limit import RateLimiter
from services.router.rollouts import Outcome, Plan, Rollouts
from services.router.routing import RouteTable
from services.router.sessions import SessionStore

# With a fallback behind it, a model that has not begun answering within this share of its time
# is late: the fallback joins it, and the first of them to answer answers.
FIRST_TOKEN_SHARE = 0.5
# Shadow and comparison calls are the first traffic to shed: past this many in flight, none is sent.
MAX_MIRRORS_IN_FLIGHT = 8
_tracer = telemetry.tracer("mirador.router")
ROUTED = Counter("mirador_router_requests", "Ask requests by the route chosen and its primary model", ["route", "model"])
ROLES = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}
# A request naming a fleet model instead of a route gets the time a route gets by default.
MODEL_TIMEOUT_MS = RouteSpec(name="", primary="").timeout_ms
EMBED_TIMEOUT_S = 60.0


def chat(turns: list[tuple[str, str]]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=ROLES[role], content=content) for role, content in turns]


@dataclass
class _Attempt:
    """One model asked for the answer, until it begins answering."""

    model: str
    call: grpc.aio.UnaryStreamCall
    first: asyncio.Future  # its first message (or _AttemptFailed)
    started: float  # perf_counter
    late_at: float  # monotonic: when the next model joins


class _AttemptFailed(Exception):
    def __init__(self, model: str, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.model, self.code, self.reason = model, code, reason


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, routes: RouteTable, sessions: SessionStore, breakers: Breakers, rollouts: Rollouts):
        self.routes = routes
        self.sessions = sessions
        self.breakers = breakers
        self.rollouts = rollouts
        self._mirrors: set[asyncio.Task] = set()  # background calls of shadow/comparison traffic
        self.model_host: model_host_pb2_grpc.ModelHostStub | None = None  # set on start
        self.consensus: consensus_pb2_grpc.ConsensusStub | None = None  # set on start
        self.rate_limiter: RateLimiter | None = None  # per-client limits (rate_limit.py); None = none
        self.identify = CallerIdentity()  # who calls (identity.py): rate limits and sessions count by it
        self.fleet: dict[str, ModelSpec] = {}  # for requests that name a model (AskRequest.model, Embed)

    async def Route(self, request: router_pb2.RouteRequest, context) -> router_pb2.RouteDecision:
        if self.rate_limiter is not None:
            await self.rate_limiter.admit_async(context, self.identify(context))
        require_text(request.text, "text")
        return await self.routes.decide(request.text, request.route, timeout_s=context.time_remaining())

    async def Embed(self, request: model_host_pb2.EmbedRequest, context) -> model_host_pb2.EmbedResponse:
        if self.rate_limiter is not None:
            await self.rate_limiter.admit_async(context, self.identify(context))
        self._fleet_model(request.model, "embedding")
        remaining = context.time_remaining()
        try:
            return await self.model_host.Embed(request, timeout=min(remaining or EMBED_TIMEOUT_S, EMBED_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            raise ServiceError(f"model `{request.model}` on the model host: {exc.details()}", exc.code()) from None

    def _fleet_model(self, name: str, task: str) -> ModelSpec:
        known = ", ".join(sorted(m for m, spec in self.fleet.items() if spec.task == task)) or "none"
        if not name:
            raise InvalidArgument(f"`model` is empty; name a {task} model of the fleet: {known}")
        spec = self.fleet.get(name)
        if spec is None:
            raise NotFound(f"model `{name}` is not in the fleet; {task} models: {known}")
        if spec.task != task:
            raise InvalidArgument(f"model `{name}` does {spec.task}, not {task}; use one of: {known}")
        return spec

    async def _conversation(self, request: router_pb2.AskRequest, caller: str) -> tuple[list[common_pb2.ChatMessage], str]:
        """Validates the request's input; returns its turns (the history of `caller`'s session included)
        and the text to route by."""
        given = [name for name in ("text", "messages", "prompt") if getattr(request, name)]
        if len(given) > 1:
            raise InvalidArgument(f"set one of `text`, `messages` or `prompt`, not {' and '.join(given)}")
        if request.session_id and (request.messages or request.prompt):
            raise InvalidArgument("`session_id` keeps the conversation at the router; with `messages` or `prompt` "
                                  "the caller keeps it: send `text` with the session, or drop `session_id`")
        if request.messages:
            require_messages(request.messages, allow_prompt=False)
            users = [m.content for m in request.messages if m.role == common_pb2.ROLE_USER]
            return list(request.messages), (users or [request.messages[-1].content])[-1]
        if request.prompt:
            require_text(request.prompt, "prompt")
            return [], request.prompt
        require_text(request.text, "text")
        if request.session_id:
            self.sessions.validate_id(request.session_id)
            history = await self.sessions.history_async(request.session_id, caller)
            return chat([*history, ("user", request.text)]), request.text
        return chat([("user", request.text)]), request.text

    def _model_decision(self, request: router_pb2.AskRequest) -> router_pb2.RouteDecision:
        if request.route:
            raise InvalidArgument("set `route` or `model`, not both: a named model answers without a route")
        self._fleet_model(request.model, "text-generation")
        return router_pb2.RouteDecision(model=request.model, timeout_ms=MODEL_TIMEOUT_MS, confidence=1.0,
                                        reason=router_pb2.ROUTE_REASON_EXPLICIT)

    async def Ask(self, request: router_pb2.AskRequest, context):
        caller = self.identify(context)
        if self.rate_limiter is not None:
            await self.rate_limiter.admit_async(context, caller)
        messages, routing_text = await self._conversation(request, caller)
        require_sampling(request.sampling)
        received = time.perf_counter()
        if request.model:
            decision, route = self._model_decision(request), None
        else:
            with _tracer.start_as_current_span("route") as span:
                decision = await self.routes.decide(routing_text, request.route, timeout_s=context.time_remaining())
                span.set_attributes({"mirador.route": decision.route, "mirador.model": decision.model,
                                     "mirador.confidence": decision.confidence,
                                     "mirador.reason": router_pb2.RouteReason.Name(decision.reason)})
            route = self.routes.get(decision.route)
            if route.uses_consensus and request.prompt:
                raise InvalidArgument(f"route `{route.name}` decides by consensus, which answers a conversation, not a "
                                      "raw `prompt`; send `text` or `messages`, or name another route")
        ROUTED.labels(decision.route, decision.model).inc()
        # A model in a rollout may be answered by its candidate version: the decision says which.
        # A model named by the caller answers itself.
        plan = Plan(decision.model) if route is None or route.uses_consensus else self.rollouts.plan(decision.model)
        if plan.answer != decision.model:
            decision.fallbacks.insert(0, decision.model)  # the stable version answers if the candidate cannot
            decision.model = plan.answer
        yield router_pb2.AskResponse(route=decision)

        budget_s = decision.timeout_ms / 1000.0
        if context.time_remaining() is not None:
            budget_s = min(budget_s, context.time_remaining())
        deadline = time.monotonic() + budget_s
        request_id = request.request_id or uuid.uuid4().hex
        answered = asyncio.get_running_loop().create_future()  # (model, text) of the answer, for comparisons
        if plan.mirror:
            self._mirror(plan, decision.route, messages, request, deadline, answered)
        if route is not None and route.uses_consensus:
            answer = self._decide(route, messages, request, request_id, deadline)
        else:
            answer = self._generate(decision, messages, request, request_id, deadline)
        summary = None
        try:
            async with contextlib.aclosing(answer):  # a caller gone: the model host's call is cancelled now
                async for response in answer:
                    if response.HasField("summary"):
                        summary = response.summary
                        summary.session_id = request.session_id
                        summary.timings.total_ms = (time.perf_counter() - received) * 1000
                    yield response
        finally:
            if not answered.done():
                answered.set_result((summary.model, summary.text) if summary is not None else None)
        if request.session_id and summary is not None:
            await self.sessions.record_async(request.session_id, request.text, summary.text, caller)

    # ------------------------------------------------------------------ one model, with fallbacks

    async def _generate(self, decision: router_pb2.RouteDecision, messages, request, request_id: str, deadline: float):
        """The first of the route's models to begin answering answers. The primary is asked first; the
        next model joins when the ones asked have failed, or are late (no first message within
        FIRST_TOKEN_SHARE of the time they had). A late model is not cancelled: under load its
        place in its host's queue is worth more than a fresh start elsewhere (the soak's lost calls
        were primaries cancelled at half their time for fallbacks that then ran out of it)."""
        waiting = [decision.model, *decision.fallbacks]  # models not asked yet, in order
        attempted: list[str] = []
        failures: list[_AttemptFailed] = []
        racing: dict[asyncio.Task, _Attempt] = {}  # each asked model's wait for its first message
        winner: tuple[_Attempt, object] | None = None
        try:
            while winner is None:
                latest = max(racing.values(), key=lambda a: a.late_at, default=None)
                if waiting and (latest is None or time.monotonic() >= latest.late_at):
                    model = waiting.pop(0)
                    if not self.breakers[model].allow():
                        failures.append(_AttemptFailed(model, grpc.StatusCode.UNAVAILABLE, f"model `{model}`: circuit open after repeated failures"))
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.breakers[model].release()
                        failures.append(_AttemptFailed(model, grpc.StatusCode.DEADLINE_EXCEEDED, f"model `{model}`: no time left"))
                        waiting.clear()
                        continue
                    attempt = self._ask(model, decision, messages, request, request_id, remaining,
                                        has_next=bool(waiting), hedge=bool(racing))
                    attempted.append(model)
                    racing[attempt.first] = attempt
                    continue
                if not racing:
                    break
                # every wait ends by the deadline on its own (_first_message); only a joining model needs a timer
                join_in = max(0.0, latest.late_at - time.monotonic()) if waiting else None
                done, _ = await asyncio.wait(racing, timeout=join_in, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    attempt = racing.pop(task)
                    try:
                        winner = attempt, task.result()
                        break
                    except _AttemptFailed as failure:
                        self._attempt_failed(attempt, failure)
                        failures.append(failure)
                    except BaseException:
                        self._abandon(attempt, overtaken=False)
                        raise
        finally:
            for attempt in racing.values():  # overtaken, or the caller left: they stop now
                self._abandon(attempt, overtaken=winner is not None)
        if winner is None:
            codes = {f.code for f in failures}
            reasons = "; ".join(f.reason for f in failures)
            message = (f"no model of route `{decision.route}` could answer: {reasons}" if decision.route
                       else f"the model asked for could not answer: {reasons}")
            if codes == {grpc.StatusCode.DEADLINE_EXCEEDED}:
                raise DeadlineExceeded(message)
            raise ServiceError(message, codes.pop() if len(codes) == 1 else grpc.StatusCode.UNAVAILABLE)
        attempt, first = winner
        model, call, breaker = attempt.model, attempt.call, self.breakers[attempt.model]
        first_token_ms = (time.perf_counter() - attempt.started) * 1000
        # This model has begun to answer: from here on, its answer is the answer.
        try:
            async with contextlib.aclosing(self._relay(call, first, decision, model, attempted)) as relayed:
                async for response in relayed:
                    yield response
        except grpc.aio.AioRpcError as exc:
            breaker.record_failure()
            self.rollouts.record(model, Outcome.FAILED)
            raise ServiceError(f"model `{model}` on the model host failed after it began answering: {exc.details()}", exc.code()) from None
        except BaseException:  # cancelled or closed: the model stops generating now, not when the call is freed
            call.cancel()
            self.rollouts.record(model, Outcome.IGNORED)
            raise
        breaker.record_success()
        self.rollouts.record(model, Outcome.OK, first_token_ms)

    def _ask(self, model: str, decision: router_pb2.RouteDecision, messages, request, request_id: str,
             remaining: float, has_next: bool, hedge: bool = False) -> _Attempt:
        started, now = time.perf_counter(), time.monotonic()
        metadata = (*(self._priority_metadata(decision.route) or ()),
                    *([(HEDGE_METADATA_KEY, HEDGE)] if hedge else ()))
        call = self.model_host.Generate(
            model_host_pb2.GenerateRequest(request_id=request_id, model=model, messages=messages, prompt=request.prompt,
                                           sampling=request.sampling),
            timeout=remaining, metadata=metadata or None,
        )
        # a rollout's candidate is never the caller's problem: whatever it fails with, the stable version answers
        first = asyncio.ensure_future(self._first_message(
            call, model, remaining, any_failure_retryable=has_next and self.rollouts.is_candidate(model)))
        late_at = now + remaining * (FIRST_TOKEN_SHARE if has_next else 1.0)
        return _Attempt(model, call, first, started, late_at)

    def _attempt_failed(self, attempt: _Attempt, failure: _AttemptFailed) -> None:
        attempt.call.cancel()
        if failure.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.breakers[attempt.model].release()  # busy (full queue) or slow under load is not broken: keep it in rotation
        else:
            self.breakers[attempt.model].record_failure()
        busy = failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        self.rollouts.record(attempt.model, Outcome.IGNORED if busy else Outcome.FAILED)

    def _abandon(self, attempt: _Attempt, overtaken: bool) -> None:
        """A model that did not answer first (or whose caller left) stops now. It is not broken, but a
        rollout's candidate overtaken because it was late counts as a failed call, as it did alone."""
        attempt.first.cancel()
        attempt.call.cancel()
        self.breakers[attempt.model].release()
        late = overtaken and time.monotonic() >= attempt.late_at
        self.rollouts.record(attempt.model, Outcome.FAILED if late else Outcome.IGNORED)

    def _priority_metadata(self, route_name: str) -> tuple[tuple[str, str], ...] | None:
        route = self.routes.routes.get(route_name)
        return ((PRIORITY_METADATA_KEY, CRITICAL),) if route is not None and route.priority == "critical" else None

    async def _first_message(self, call, model: str, budget_s: float, any_failure_retryable: bool = False):
        try:
            first = await asyncio.wait_for(call.read(), budget_s)
        except asyncio.TimeoutError:
            raise _AttemptFailed(model, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"model `{model}` on the model host: no first token within {budget_s * 1000:.0f} ms") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE and not any_failure_retryable:
                raise ServiceError(f"model `{model}` on the model host: {exc.details()}", exc.code()) from None
            raise _AttemptFailed(model, exc.code(), f"model `{model}` on the model host: {exc.details()}") from None
        if first is grpc.aio.EOF:
            raise _AttemptFailed(model, grpc.StatusCode.INTERNAL, f"model `{model}` on the model host ended without answering")
        return first

    @staticmethod
    async def _relay(call, first, decision: router_pb2.RouteDecision, model: str, attempted: list[str]):
        chunk = first
        while chunk is not grpc.aio.EOF:
            if chunk.HasField("token"):
                yield router_pb2.AskResponse(token=chunk.token)
            else:
                s = chunk.summary
                yield router_pb2.AskResponse(summary=router_pb2.AskSummary(
                    route=decision.route, model=model, fell_back=model != decision.model,
                    attempted_models=attempted, finish_reason=s.finish_reason, text=s.text, usage=s.usage,
                    timings=s.timings, confidence=s.confidence,
                ))
            chunk = await call.read()

    # ------------------------------------------------------------------ consensus routes

    async def _decide(self, route: RouteSpec, messages, request, request_id: str, deadline: float):
        members = [self.rollouts.serving(m) for m in (route.primary, *route.validators)]  # promoted versions vote
        decide = consensus_pb2.DecideRequest(
            request_id=request_id, route=route.name, models=members, messages=messages,
            options=list(route.options), consensus_threshold=route.consensus_threshold or 1.0, sampling=request.sampling,
        )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"route `{route.name}` has no time left for a consensus; allow more time")
        votes, verdict = [], None
        try:
            async for event in self.consensus.Decide(decide, timeout=remaining):
                if event.HasField("vote"):
                    votes.append(event.vote)
                    yield router_pb2.AskResponse(vote=event.vote)
                else:
                    verdict = event.verdict
                    yield router_pb2.AskResponse(verdict=verdict)
        except grpc.aio.AioRpcError as exc:
            raise ServiceError(f"the consensus service: {exc.details()}", exc.code()) from None
        if verdict is None:
            raise Unavailable("the consensus service ended without a verdict")
        primary = next((v for v in votes if v.primary), None)
        yield router_pb2.AskResponse(summary=router_pb2.AskSummary(
            route=route.name, model=members[0], attempted_models=[v.model for v in votes], text=verdict.answer,
            confidence=primary.confidence if primary else None, escalation_id=verdict.escalation_id,
        ))

    # ------------------------------------------------------------------ rollouts: mirrored calls

    def _mirror(self, plan: Plan, route_name: str, messages, request, deadline: float, answered: asyncio.Future) -> None:
        """Sends the request to `plan.mirror` in the background (never to the caller) and compares
        its answer with the one the caller got."""
        if len(self._mirrors) >= MAX_MIRRORS_IN_FLIGHT:
            self.rollouts.record(plan.mirror, Outcome.SHED)
            return

        async def run() -> None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            started, first_token_ms, text = time.perf_counter(), None, None
            try:
                call = self.model_host.Generate(
                    model_host_pb2.GenerateRequest(request_id=uuid.uuid4().hex, model=plan.mirror, messages=messages,
                                                   prompt=request.prompt, sampling=request.sampling), timeout=remaining)
                async for chunk in call:
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - started) * 1000
                    if chunk.HasField("summary"):
                        text = chunk.summary.text
            except grpc.aio.AioRpcError as exc:
                busy = exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
                self.rollouts.record(plan.mirror, Outcome.IGNORED if busy else Outcome.FAILED)
                return
            self.rollouts.record(plan.mirror, Outcome.OK, first_token_ms)
            try:
                answer = await asyncio.wait_for(asyncio.shield(answered), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return
            if answer is None or text is None or answer[0] != plan.answer:
                return  # the caller got no answer, or one from a fallback: nothing to compare
            rollout = self.rollouts.owner(plan.mirror)
            if rollout is not None:
                stable, candidate = (text, answer[1]) if plan.mirror == rollout.model else (answer[1], text)
                self.rollouts.compare(rollout.model, stable, candidate)

        task = asyncio.create_task(run(), name=f"mirror to {plan.mirror}")
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def stop_mirrors(self) -> None:
        for task in list(self._mirrors):
            task.cancel()
        await asyncio.gather(*self._mirrors, return_exceptions=True)
