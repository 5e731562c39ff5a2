"""Fault injection for chaos, failover and leak tests: delay a model's answers, leak memory.

    MIRADOR_INJECT_DELAY="model-a=1500,model-b=200"   # milliseconds before prefill
    MIRADOR_INJECT_LEAK_KB=256                        # every generation keeps 256 KB alive for good

Read once at start from the environment, never from the config file, so a
production config cannot turn it on by accident. Logged loudly when set.
"""

from __future__ import annotations

import asyncio
import logging
import os

from services.common.logs import log_event

ENV_VAR = "MIRADOR_INJECT_DELAY"
LEAK_ENV_VAR = "MIRADOR_INJECT_LEAK_KB"
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


def parse_leak_kb(value: str) -> int:
    try:
        kb = int(value.strip() or 0)
    except ValueError:
        raise ValueError(f"{LEAK_ENV_VAR}: `{value}` is not a whole number of KB") from None
    if kb < 0:
        raise ValueError(f"{LEAK_ENV_VAR}: `{value}` is negative")
    return kb


class InjectedDelays:
    def __init__(self, delays: dict[str, float], leak_kb: int = 0):
        self.delays = delays
        self.leak_kb = leak_kb
        self._leaked: list[bytes] = []  # never freed: the negative control of the memory-growth test
        if delays:
            log_event(log, "FAULT INJECTION ACTIVE: delaying models", logging.WARNING, delays_s=delays)
        if leak_kb:
            log_event(log, "FAULT INJECTION ACTIVE: leaking memory on every generation", logging.WARNING,
                      leak_kb=leak_kb)

    @classmethod
    def from_environment(cls) -> "InjectedDelays":
        return cls(parse_delays(os.environ.get(ENV_VAR, "")), parse_leak_kb(os.environ.get(LEAK_ENV_VAR, "")))

    async def before_prefill(self, model: str) -> None:
        if self.leak_kb:
            # written, not just reserved, so the pages are resident and show in RSS
            self._leaked.append(b"\x5a" * (self.leak_kb * 1024))
        if model in self.delays:
            await asyncio.sleep(self.delays[model])
