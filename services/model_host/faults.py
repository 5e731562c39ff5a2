"""Fault injection for chaos, failover and leak tests: slow, hang or drip a model's answers,
slow its load, leak memory.

    MIRADOR_INJECT_DELAY="model-a=1500,model-b=hang"   # milliseconds before prefill; `hang` = never answers
    MIRADOR_INJECT_TOKEN_DELAY="model-a=50"            # milliseconds before every decode step, spent on the
                                                       # model's engine thread (a slow model, for every stream on it)
    MIRADOR_INJECT_LOAD_DELAY="model-a=3000"           # milliseconds a load of the model takes longer, spent
                                                       # after its optimised graph is written, before it is
                                                       # moved into the cache (where a crash hurts most)
    MIRADOR_INJECT_LEAK_KB=256                         # every generation keeps 256 KB alive for good

Read once at start from the environment, never from the config file, so a
production config cannot turn it on by accident. Logged loudly when set.
A hung call waits until its caller gives up (cancellation ends the wait).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from services.common.logs import log_event

ENV_VAR = "MIRADOR_INJECT_DELAY"
TOKEN_DELAY_ENV_VAR = "MIRADOR_INJECT_TOKEN_DELAY"
LOAD_DELAY_ENV_VAR = "MIRADOR_INJECT_LOAD_DELAY"
LEAK_ENV_VAR = "MIRADOR_INJECT_LEAK_KB"
HANG = "hang"
log = logging.getLogger("mirador.model_host.faults")


def parse_delays(value: str, env_var: str = ENV_VAR, allow_hang: bool = True) -> dict[str, float]:
    """`model=ms,...` as seconds per model; `model=hang` is infinity (where `allow_hang`)."""
    delays = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        model, _, milliseconds = item.partition("=")
        if allow_hang and milliseconds.strip() == HANG:
            delays[model.strip()] = math.inf
            continue
        try:
            seconds = float(milliseconds) / 1000.0
        except ValueError:
            hang = " or model=hang" if allow_hang else ""
            raise ValueError(f"{env_var}: `{item}` is not model=milliseconds{hang}") from None
        if not model.strip() or not 0 <= seconds < math.inf:
            raise ValueError(f"{env_var}: `{item}` needs a model name and a finite, non-negative delay")
        delays[model.strip()] = seconds
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
    def __init__(self, delays: dict[str, float], leak_kb: int = 0, token_delays: dict[str, float] | None = None,
                 load_delays: dict[str, float] | None = None):
        self.delays = delays
        self.leak_kb = leak_kb
        self.token_delays = token_delays or {}
        self.load_delays = load_delays or {}
        self._leaked: list[bytes] = []  # never freed: the negative control of the memory-growth test
        if delays:
            log_event(log, "FAULT INJECTION ACTIVE: delaying models before prefill", logging.WARNING,
                      delays_s={m: (HANG if math.isinf(s) else s) for m, s in delays.items()})
        if self.token_delays:
            log_event(log, "FAULT INJECTION ACTIVE: delaying every decode step", logging.WARNING,
                      delays_s=self.token_delays)
        if self.load_delays:
            log_event(log, "FAULT INJECTION ACTIVE: slowing model loads", logging.WARNING, delays_s=self.load_delays)
        if leak_kb:
            log_event(log, "FAULT INJECTION ACTIVE: leaking memory on every generation", logging.WARNING,
                      leak_kb=leak_kb)

    @classmethod
    def from_environment(cls) -> "InjectedDelays":
        return cls(
            parse_delays(os.environ.get(ENV_VAR, "")),
            parse_leak_kb(os.environ.get(LEAK_ENV_VAR, "")),
            token_delays=parse_delays(os.environ.get(TOKEN_DELAY_ENV_VAR, ""), TOKEN_DELAY_ENV_VAR, allow_hang=False),
            load_delays=parse_delays(os.environ.get(LOAD_DELAY_ENV_VAR, ""), LOAD_DELAY_ENV_VAR, allow_hang=False),
        )

    async def before_prefill(self, model: str) -> None:
        if self.leak_kb:
            # written, not just reserved, so the pages are resident and show in RSS
            self._leaked.append(b"\x5a" * (self.leak_kb * 1024))
        delay = self.delays.get(model)
        if delay is None:
            return
        if math.isinf(delay):
            await asyncio.get_running_loop().create_future()  # never set: only the caller's cancel ends it
            return
        await asyncio.sleep(delay)

    def during_load(self, model: str) -> None:
        """Called in the loader's worker thread, with the optimised graph written but not yet committed."""
        if model in self.load_delays:
            log_event(log, "FAULT INJECTION: pausing a load", logging.WARNING, model=model,
                      delay_s=self.load_delays[model])
            time.sleep(self.load_delays[model])
