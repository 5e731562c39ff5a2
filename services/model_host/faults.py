"""Fault injection for chaos and failover tests: delay a model's answers.

    MIRADOR_INJECT_DELAY="model-a=1500,model-b=200"   # milliseconds before prefill

Read once at start from the environment, never from the config file, so a
production config cannot turn it on by accident. Logged loudly when set.
"""

from __future__ import annotations

import asyncio
import logging
import os

from services.common.logs import log_event

ENV_VAR = "MIRADOR_INJECT_DELAY"
log = logging.getLogger("mirador.model_host.faults")


def parse_delays(value: str) -> dict[str, float]:
    delays = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        model, _, milliseconds = item.partition("=")
        try:
            delays[model.strip()] = float(milliseconds) / 1000.0
        except ValueError:
            raise ValueError(f"{ENV_VAR}: `{item}` is not model=milliseconds") from None
    return delays


class InjectedDelays:
    def __init__(self, delays: dict[str, float]):
        self.delays = delays
        if delays:
            log_event(log, "FAULT INJECTION ACTIVE: delaying models", logging.WARNING, delays_s=delays)

    @classmethod
    def from_environment(cls) -> "InjectedDelays":
        return cls(parse_delays(os.environ.get(ENV_VAR, "")))

    async def before_prefill(self, model: str) -> None:
        if model in self.delays:
            await asyncio.sleep(self.delays[model])
