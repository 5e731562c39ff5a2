"""The review queue in PostgreSQL (`state.database_url`), shared by every consensus replica.

The queries and migrations are escalations.py's, unchanged; the connections come from
services/common/postgres.py (a psycopg 3 pool with the schema, statement timeouts and the
migration lock).
"""

from __future__ import annotations

from services.common.postgres import DatabaseUnavailable, DatabaseUnreachable, PostgresDatabase, UnstorableText
from services.common.state_settings import StateSettings
from services.consensus.escalations import EscalationStore

# The names the consensus uses for the shared errors (a StoreUnavailable call fails UNAVAILABLE).
StoreUnavailable = DatabaseUnavailable
__all__ = ["DatabaseUnreachable", "PostgresEscalationStore", "StoreUnavailable", "UnstorableText"]


class PostgresEscalationStore(EscalationStore):
    dialect = "postgresql"

    def __init__(self, settings: StateSettings, application_name: str = "mirador-consensus"):
        self.settings = settings
        self.schema = settings.database_schema
        self.database = PostgresDatabase(settings, application_name, "the review queue")
        try:
            self.migrated = self._migrate()
        except BaseException:
            self.database.close()
            raise

    def _transaction(self):
        return self.database.transaction()

    def _read(self):
        return self.database.read()

    def _migration_transaction(self):
        return self.database.migration_transaction()

    def close(self) -> None:
        self.database.close()
