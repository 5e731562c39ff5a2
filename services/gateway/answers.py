"""One Ask's events gathered into what OpenAI's formats need: the answer's text, model, usage
and finish reason, the `mirador` object (docs/gateway.md), and the logprobs shapes of the chat
and the legacy completions APIs."""

from __future__ import annotations

import time

from mirador.v1 import common_pb2, router_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTEXT_LENGTH: "length",
}
ROUTE_REASONS = {router_pb2.ROUTE_REASON_EXPLICIT: "explicit", router_pb2.ROUTE_REASON_CLASSIFIED: "classified",
                 router_pb2.ROUTE_REASON_LOW_CONFIDENCE: "low_confidence"}


class Answer:
    """The events of one Ask, gathered into what the OpenAI formats need."""

    def __init__(self) -> None:
        self.decision: router_pb2.RouteDecision | None = None
        self.tokens: list[common_pb2.TokenChunk] = []
        self.votes: list = []
        self.verdict = None
        self.summary: router_pb2.AskSummary | None = None

    def add(self, event: router_pb2.AskResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "route":
            self.decision = event.route
        elif kind == "token":
            self.tokens.append(event.token)
        elif kind == "vote":
            self.votes.append(event.vote)
        elif kind == "verdict":
            self.verdict = event.verdict
        elif kind == "summary":
            self.summary = event.summary

    @property
    def model(self) -> str:
        """The model that answered (the primary named by the route decision until the summary says)."""
        if self.summary is not None and self.summary.model:
            return self.summary.model
        return self.decision.model if self.decision is not None else ""

    @property
    def text(self) -> str:
        if self.summary is not None:
            return self.summary.text
        return "".join(t.text for t in self.tokens)

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS.get(self.summary.finish_reason, "stop") if self.summary is not None else "stop"

    def usage(self) -> dict:
        usage = self.summary.usage if self.summary is not None else common_pb2.Usage()
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens}

    def extra(self, started: float) -> dict:
        """The `mirador` object (docs/gateway.md)."""
        d, s = self.decision, self.summary
        extra = {
            "route": d.route or None if d is not None else None,
            "route_reason": ROUTE_REASONS.get(d.reason) if d is not None else None,
            "route_confidence": round(d.confidence, 6) if d is not None else None,
            "route_scores": {r.route: round(r.score, 6) for r in d.scores} if d is not None else {},
            "model": self.model,
            "primary": d.model if d is not None else None,
            "fell_back": bool(s and s.fell_back),
            "attempted_models": list(s.attempted_models) if s is not None else [],
            "finish_reason": common_pb2.FinishReason.Name(s.finish_reason).removeprefix("FINISH_REASON_").lower()
            if s is not None and s.finish_reason else None,
            "timings": {**({k: round(getattr(s.timings, k), 3) for k in
                            ("queue_ms", "load_ms", "prefill_ms", "decode_ms", "first_token_ms", "total_ms")}
                           if s is not None else {}),
                        "gateway_total_ms": round((time.perf_counter() - started) * 1000, 3)},
            "confidence": _confidence(s.confidence) if s is not None and s.HasField("confidence") else None,
            "consensus": None,
        }
        if self.verdict is not None or self.votes:
            v = self.verdict
            extra["consensus"] = {
                "votes": [{"model": vote.model, "primary": vote.primary, "answer": vote.answer,
                           "confidence": _confidence(vote.confidence), "weight": round(vote.weight, 6),
                           "error": vote.error or None, "latency_ms": round(vote.latency_ms, 3)} for vote in self.votes],
                "answer": v.answer if v is not None else None,
                "consistency": round(v.consistency, 6) if v is not None else None,
                "threshold": round(v.consensus_threshold, 6) if v is not None else None,
                "method": v.method if v is not None else None,
                "combined_distribution": {p.label: round(p.probability, 6) for p in v.combined_distribution}
                if v is not None else {},
                "escalated": bool(v and v.escalated),
                "escalation_id": (v.escalation_id or None) if v is not None else None,
                "primary_overturned": bool(v and v.primary_overturned),
            }
        return extra


def _confidence(c: common_pb2.ConfidenceMetadata) -> dict:
    return {"calibrated_confidence": round(c.calibrated_confidence, 6), "calibration_source": c.calibration_source,
            "mean_logprob": round(c.mean_logprob, 6), "min_logprob": round(c.min_logprob, 6),
            "mean_entropy": round(c.mean_entropy, 6),
            "label_distribution": {p.label: round(p.probability, 6) for p in c.label_distribution}}


def token_logprob(token: common_pb2.TokenChunk) -> dict:
    """One entry of a chat answer's `logprobs.content`, with the alternatives the model host gave."""
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode("utf-8")),
            "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode("utf-8"))}
                             for a in token.top_logprobs]}


def completion_logprobs(tokens: list[common_pb2.TokenChunk], offset: int = 0) -> dict:
    """The legacy /v1/completions `logprobs` object: tokens, their logprobs, the alternatives of
    each ({text: logprob}) and each token's character offset in the answer."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.text: a.logprob for a in t.top_logprobs} for t in tokens], "text_offset": offsets}
