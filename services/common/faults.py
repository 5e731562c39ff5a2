"""Crash points for fault-injection tests: a service SIGKILLs itself at a named point of its work.

    MIRADOR_INJECT_CRASH="after-escalation-commit"   # consensus: die once an escalation is committed,
                                                     # before the verdict is sent
    MIRADOR_INJECT_INTERNAL_ERROR="/mirador.v1.Router/Route"   # any service: these methods fail with an
                                                     # unexpected exception (what a bug looks like to a client)

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
INTERNAL_ERROR_ENV_VAR = "MIRADOR_INJECT_INTERNAL_ERROR"
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


class InjectedFault(RuntimeError):
    """The unexpected exception MIRADOR_INJECT_INTERNAL_ERROR raises (it quotes a made-up secret,
    so a test can see that nothing of an exception reaches the client)."""


def injected_internal_errors(service: str, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The methods ("/package.Service/Method") that fail as a bug would, from MIRADOR_INJECT_INTERNAL_ERROR."""
    value = environ.get(INTERNAL_ERROR_ENV_VAR, "")
    methods = frozenset(filter(None, (part.strip() for part in value.split(","))))
    if methods:
        log_event(log, "FAULT INJECTION ACTIVE: these methods fail with an unexpected error", logging.WARNING,
                  service=service, methods=sorted(methods))
    return methods
