"""Asks every model at once under one deadline and yields the answers as they arrive.

`fan_out` is generic (any `call(model, timeout_s)` coroutine); the `score`, `generate`
and `embed` helpers are the model-host calls a decision makes. A model that fails or
runs out of time becomes an `Answer` with `error` set, never an exception: the vote
goes on with the others.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import grpc
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

# Part of the call's time kept back from the models, to store and send the verdict once
# they answered or timed out: 10 % of the budget, at most this many seconds.
RESERVE_FRACTION = 0.1
MAX_RESERVE_S = 0.25
DEFAULT_BUDGET_S = 30.0  # when neither the caller nor the route sets a deadline


@dataclass(frozen=True)
class Answer:
    index: int  # position of the model in the request (0 = primary)
    model: str
    value: Any = None  # what `call` returned; None when it failed
    error: str = ""
    latency_ms: float = 0.0


def downstream_budget(remaining_s: float | None, route_timeout_s: float | None = None) -> float:
    """Seconds the models get: the caller's remaining time (or the route's timeout, if
    shorter), less a small reserve for the verdict. <= 0 means no time is left."""
    budgets = [b for b in (remaining_s, route_timeout_s) if b is not None]
    budget = min(budgets) if budgets else DEFAULT_BUDGET_S
    return budget - min(MAX_RESERVE_S, RESERVE_FRACTION * max(budget, 0.0))


class NoVote(Exception):
    """A model answered with nothing to vote for (a generation without tokens)."""


def describe_error(exc: BaseException, timeout_s: float) -> str:
    """A short reason for a vote's `error`, naming the status a model host gave."""
    if isinstance(exc, NoVote):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timed out after {timeout_s * 1000:.0f} ms"
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"timed out after {timeout_s * 1000:.0f} ms"
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


async def fan_out(models: Sequence[str], call: Callable[[str, float], Awaitable[Any]],
                  timeout_s: float) -> AsyncIterator[Answer]:
    """Runs `call(model, timeout_s)` for every model in parallel and yields one Answer per
    model in arrival order; each call is cut off after `timeout_s`. Closing the iterator
    early (the caller went away) cancels the calls still running."""

    async def one(index: int, model: str) -> Answer:
        started = time.monotonic()
        try:
            value = await asyncio.wait_for(call(model, timeout_s), timeout=max(timeout_s, 0.0))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a vote with `error`
            return Answer(index, model, None, describe_error(exc, timeout_s), _ms_since(started))
        return Answer(index, model, value, "", _ms_since(started))

    tasks = [asyncio.create_task(one(i, m)) for i, m in enumerate(models)]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000.0


# --------------------------------------------------------------------------- model-host calls


async def score(stub: model_host_pb2_grpc.ModelHostStub, request_id: str, model: str,
                messages: Sequence[common_pb2.ChatMessage], options: Sequence[str],
                timeout_s: float) -> model_host_pb2.ScoreResponse:
    request = model_host_pb2.ScoreRequest(request_id=request_id, model=model, messages=messages, options=options)
    return await stub.Score(request, timeout=timeout_s)


async def generate(stub: model_host_pb2_grpc.ModelHostStub, request_id: str, model: str,
                   messages: Sequence[common_pb2.ChatMessage], sampling: common_pb2.SamplingParams,
                   timeout_s: float) -> model_host_pb2.GenerateSummary:
    """The whole answer (the stream's summary). An answer without tokens is no vote (NoVote):
    it says nothing, and the confidence it carries is not a judgement of any text."""
    request = model_host_pb2.GenerateRequest(request_id=request_id, model=model, messages=messages, sampling=sampling)
    summary = None
    async for response in stub.Generate(request, timeout=timeout_s):
        if response.HasField("summary"):
            summary = response.summary
    if summary is None:
        raise RuntimeError("the model host ended the stream without a summary")
    if summary.usage.completion_tokens == 0:
        raise NoVote("no vote: the model ended its turn before its first token (an empty answer)")
    return summary


async def embed(stub: model_host_pb2_grpc.ModelHostStub, request_id: str, model: str, texts: Sequence[str],
                timeout_s: float) -> list[list[float]]:
    """One L2-normalised vector per text."""
    reply = await stub.Embed(model_host_pb2.EmbedRequest(request_id=request_id, model=model, texts=texts),
                             timeout=timeout_s)
    return [list(e.values) for e in reply.embeddings]
