"""`services.consensus:` in the config."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServiceSettings, setting, text, whole


@dataclass(frozen=True)
class ConsensusSettings(ServiceSettings):
    escalation_db: str = setting("", text)  # SQLite file; empty = <state dir>/escalations.sqlite3
    # embeds free-text answers to compare them (an embedding model of the fleet)
    embedding_model: str = setting("minilm-l6", text)
    # Resolved cases (the escalated conversation, votes and resolution) are deleted this many days
    # after their resolution, at start and hourly; pending cases are never deleted. 0 = kept for good.
    escalation_retention_days: int = setting(0, whole(0, 36_500))


SETTINGS = ConsensusSettings
