"""`services.consensus:` in the config."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServiceSettings, setting, text


@dataclass(frozen=True)
class ConsensusSettings(ServiceSettings):
    escalation_db: str = setting("", text)  # SQLite file; empty = <state dir>/escalations.sqlite3
    # embeds free-text answers to compare them (an embedding model of the fleet)
    embedding_model: str = setting("minilm-l6", text)


SETTINGS = ConsensusSettings
