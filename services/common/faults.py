"""Crash points for fault-injection tests: a service SIGKILLs itself at a named point of its work.

    MIRADOR_INJECT_CRASH="after-escalation-commit"   # consensus: die once an escalation is committed,
                                                     # before the verdict is sent

Read once at start from the environment, never from the config file, so a production
config cannot turn it on by accident; logged loudly when set. A name the service does
not have stops it from starting, so a typo never passes for a test that ran.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Mapping

from services.common.logs import log_event

CRASH_ENV_VAR = "MIRADOR_INJECT_CRASH"
log = logging.getLogger("mirador.faults")


class CrashPoints:
    def __init__(self, service: str, armed: frozenset[str] = frozenset()):
        self.service = service
        self.armed = armed
        if armed:
            log_event(log, "FAULT INJECTION ACTIVE: this process kills itself at these points", logging.WARNING,
                      service=service, points=sorted(armed))

    @classmethod
    def from_environment(cls, service: str, known: tuple[str, ...],
                         environ: Mapping[str, str] = os.environ) -> "CrashPoints":
        value = environ.get(CRASH_ENV_VAR, "")
        armed = frozenset(filter(None, (part.strip() for part in value.split(","))))
        unknown = sorted(armed - set(known))
        if unknown:
            raise ValueError(f"{CRASH_ENV_VAR}: {', '.join(unknown)} is not a crash point of the {service} service; "
                             f"it has: {', '.join(known)}")
        return cls(service, armed)

    def reached(self, point: str) -> None:
        """SIGKILLs this process if `point` is armed: no cleanup, no graceful stop, as a crash."""
        if point in self.armed:
            log_event(log, "FAULT INJECTION: killing this process", logging.WARNING, service=self.service,
                      point=point, pid=os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)
