"""Wires the consensus process: the escalation store (SQLite file, or PostgreSQL when
`state.database_url` is set) and the model hosts: placed as the router places them
(services/common/placement.py: each member goes to a host that has it READY, else to its
placement target), or one channel balanced round robin, as `services.router.model_host_balancing`
decides for both."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

import grpc
from mirador.v1 import consensus_pb2, consensus_pb2_grpc, model_host_pb2_grpc

from services.common.channels import model_host_channel
from services.common.config import ConfigError, ConfigProblem, MiradorConfig
from services.common.faults import CrashPoints
from services.common.logs import log_event
from services.common.placement import ModelHosts, uses_placement
from services.common.server import MiradorService, run_service_main
from services.common.paths import state_file
from services.consensus.escalations import EscalationStore, SqliteEscalationStore, StoreError
from services.consensus.servicer import CRASH_POINTS, ConsensusServicer

log = logging.getLogger("mirador.consensus")
PURGE_INTERVAL_S = 3600.0  # how often resolved cases past their retention are deleted (also at start)


def open_escalation_store(config: MiradorConfig) -> EscalationStore:
    """The review queue the config names, migrated. A database that cannot be used is a
    ConfigError naming the key (the process exits with the config error's code)."""
    state = config.state
    if state.uses_postgresql:
        from services.consensus.escalations_pg import DatabaseUnreachable, PostgresEscalationStore  # psycopg only here

        try:
            missing = state.missing_url("database_url")
            if missing:
                raise DatabaseUnreachable(missing)
            store: EscalationStore = PostgresEscalationStore(state)
        except (StoreError, DatabaseUnreachable) as exc:
            raise ConfigError([ConfigProblem(str(config.path), state.lines.get("database_url", 0),
                                             state.key_of("database_url"), str(exc))]) from None
        log_event(log, "escalation store open", backend="postgresql", schema=state.database_schema,
                  migrated=store.migrated)
        return store
    path = state_file(config.services.consensus.escalation_db, "escalations.sqlite3", config.path.parent)
    try:
        store = SqliteEscalationStore(path)
    except (StoreError, sqlite3.Error, OSError) as exc:
        raise ConfigError([ConfigProblem(str(config.path), 0, "services.consensus.escalation_db",
                                         f"cannot open the review queue at {path}: {exc}")]) from None
    log_event(log, "escalation store open", backend="sqlite", path=str(path), migrated=store.migrated)
    return store


class ConsensusService(MiradorService):
    name = "consensus"

    def __init__(self, config: MiradorConfig):
        self.config = config
        # Opened here, before the server starts: a database that cannot be used stops the process
        # with the config error's exit code and a sentence naming the key.
        self.servicer = ConsensusServicer(config, store=open_escalation_store(config),
                                          crash_points=CrashPoints.from_environment(self.name, CRASH_POINTS))
        self.channel: grpc.aio.Channel | None = None
        self.model_hosts: ModelHosts | None = None  # with placement: every host, and what each holds
        self.purging: asyncio.Task | None = None  # deletes resolved cases past their retention

    @property
    def grpc_service_names(self) -> list[str]:
        return [consensus_pb2.DESCRIPTOR.services_by_name["Consensus"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        consensus_pb2_grpc.add_ConsensusServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        if uses_placement(self.config):
            self.model_hosts = ModelHosts(self.config.services.model_host_targets, self.config.fleet, self.config.security)
            await self.model_hosts.start()
            self.servicer.model_host = self.model_hosts
            log_event(log, "members placed across model hosts", hosts=self.model_hosts.describe())
        else:
            self.channel = model_host_channel(self.config.services.model_host_targets, self.config.security)
            self.servicer.model_host = model_host_pb2_grpc.ModelHostStub(self.channel)
        days = self.config.services.consensus.escalation_retention_days
        if days:
            self.purging = asyncio.create_task(self._purge_resolved(days), name="escalation retention")

    async def _purge_resolved(self, days: int) -> None:
        """Deletes the cases resolved more than `days` ago, now and every PURGE_INTERVAL_S; a database
        that does not answer is logged and tried again at the next round (calls are not affected)."""
        while True:
            try:
                deleted = await asyncio.to_thread(self.servicer.store.purge_resolved, days * 86_400.0)
                log_event(log, "resolved escalations past their retention deleted", retention_days=days,
                          deleted=deleted)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log_event(log, "escalation retention: purge failed, retried in an hour", logging.WARNING,
                          error=str(exc)[:300])
            await asyncio.sleep(PURGE_INTERVAL_S)

    async def on_config_reload(self, new_config: MiradorConfig) -> None:
        """The review queue's database is opened once: a reload that moves it needs a restart."""
        moved = [key for key, before, after in (
            ("state", self.config.state, new_config.state),
            ("services.consensus.escalation_db", self.config.services.consensus.escalation_db,
             new_config.services.consensus.escalation_db),
        ) if before != after]
        if moved:
            log_event(log, "config reload: restart the consensus to apply these changes", logging.WARNING, keys=moved)
        if self.model_hosts is not None:
            self.model_hosts.fleet = new_config.fleet

    async def on_stop(self) -> None:
        if self.purging is not None:
            self.purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.purging
        if self.channel is not None:
            await self.channel.close()
        if self.model_hosts is not None:
            await self.model_hosts.close()
        if self.servicer.store is not None:
            self.servicer.store.close()


def main(argv: list[str] | None = None) -> int:
    return run_service_main("consensus", ConsensusService, argv)
