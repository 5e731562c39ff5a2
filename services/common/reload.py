"""Hot config reload: on SIGHUP a service reads its config file again.

A bad file is refused with its problems logged and the old config keeps
serving; a good one goes to the service's `on_config_reload` hook, which applies
what can change while running. Settings only a restart can change are named.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from services.common.config import ConfigError, SecurityConfig, load_config
from services.common.settings import ServiceSettings
from services.common.logs import log_event

if TYPE_CHECKING:
    from services.common.server import MiradorService

log = logging.getLogger("mirador.server")


# Settings a running server cannot change: a reload that changes them logs "restart needed".
_RESTART_ONLY_SETTINGS = ("host", "port", "max_concurrent_rpcs", "metrics_port")


class ConfigReloader:
    """SIGHUP: read and validate the config file again; a bad file is refused with its problems
    logged (the old config keeps serving); a good one goes to `service.on_config_reload`.
    Reloads run one at a time."""

    def __init__(self, service: MiradorService, settings: ServiceSettings, security: SecurityConfig,
                 config_path: str | os.PathLike):
        self.service, self.settings, self.security = service, settings, security
        self.config_path = config_path
        self.lock = asyncio.Lock()

    async def reload(self) -> None:
        async with self.lock:
            log_event(log, "config reload requested (SIGHUP)", path=str(self.config_path))
            try:
                config = await asyncio.get_running_loop().run_in_executor(None, load_config, self.config_path)
            except ConfigError as exc:
                log_event(log, "config reload rejected: the old config keeps serving", logging.ERROR,
                          path=str(self.config_path), problems=[str(p) for p in exc.problems])
                return
            except Exception as exc:  # noqa: BLE001 - a reload must never take the service down
                log_event(log, "config reload rejected: the old config keeps serving", logging.ERROR,
                          path=str(self.config_path), problems=[repr(exc)])
                return
            new_settings = getattr(config.services, self.service.name, None)
            changed = [f"services.{self.service.name}.{key}" for key in _RESTART_ONLY_SETTINGS
                       if new_settings is not None and getattr(new_settings, key) != getattr(self.settings, key)]
            if config.security != self.security:
                changed.append("security")
            if changed:
                log_event(log, "config reload: restart needed to apply these changes", logging.WARNING,
                          keys=changed)
            try:
                await self.service.on_config_reload(config)
            except Exception as exc:  # noqa: BLE001
                log_event(log, "config reload failed in the service; it keeps serving", logging.ERROR,
                          error=repr(exc))
                log.debug("traceback", exc_info=exc)
                return
            log_event(log, "config reload done", path=str(self.config_path))
