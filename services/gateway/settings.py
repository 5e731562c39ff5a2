"""`services.gateway:` in the config (the HTTP gateway)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServiceSettings, setting, whole


@dataclass(frozen=True)
class GatewaySettings(ServiceSettings):
    """The OpenAI-compatible HTTP gateway in front of the router (services/gateway/)."""

    port: int = setting(8080, whole(1, 65535))
    max_body_bytes: int = setting(1 << 20, whole(1024))  # larger request bodies are refused with 413


SETTINGS = GatewaySettings
