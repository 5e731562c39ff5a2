"""`services.router:` in the config."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServiceSettings, choice, fraction, names, rate, setting, targets, text, whole

MODEL_HOST_BALANCING = ("auto", "placement", "round_robin")


@dataclass(frozen=True)
class RouterSettings(ServiceSettings):
    default_route: str | None = setting(None, text)  # where low-confidence requests go
    min_confidence: float = setting(0.5, fraction)  # below it the default route answers
    # fleet model that embeds requests for classification
    embedding_model: str = setting("minilm-l6", text)
    # more fleet embedding models whose pooled vectors join the embedding model's in the classifier
    # (e.g. smollm2-135m-features: a decoder's first layers); none = the embedding and lexical terms
    feature_models: tuple[str, ...] = setting((), names)
    # Model-host addresses the router balances over (gRPC round_robin with health checks).
    # Empty = every replica of services.model_host (see ServicesConfig.model_host_targets).
    model_host_targets: tuple[str, ...] = setting((), targets)
    model_host_balancing: str = setting("auto", choice(MODEL_HOST_BALANCING))
    # Per-client rate limit (token bucket): requests/s each client may send; 0 = off. A client is
    # its identity (identity.py): its bearer token, or the client a token holder names, else its
    # peer IP. Burst 0 = one second's worth.
    rate_limit_per_client: float = setting(0.0, rate)
    rate_limit_burst: int = setting(0, whole(0))
    # JSON file keeping rollouts rolled back or promoted across restarts;
    # empty = <state dir>/rollouts.json (see services/router/rollouts.py)
    rollout_state: str = setting("", text)


SETTINGS = RouterSettings
