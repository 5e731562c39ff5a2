"""Which models this host knows and where each one is in its lifecycle.

The fleet comes from the config; whether a model is built comes from the model
repository. Loading, tiers and the memory budget arrive with the model-host
milestone; until then every built model is UNLOADED and loads are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirador.v1 import model_host_pb2 as pb

from services.common.config import MiradorConfig, ModelSpec
from services.common.model_repository import ModelNotFoundError, ModelRepository, ModelRepositoryError

TASKS = {
    "text-generation": pb.MODEL_TASK_TEXT_GENERATION,
    "embedding": pb.MODEL_TASK_EMBEDDING,
    "classification": pb.MODEL_TASK_CLASSIFICATION,
}
TIERS = {"hot": pb.MODEL_TIER_HOT, "warm": pb.MODEL_TIER_WARM, "cold": pb.MODEL_TIER_COLD}


@dataclass
class ModelEntry:
    spec: ModelSpec
    version: str = ""
    state: int = pb.MODEL_STATE_NOT_BUILT
    detail: str = ""


class ModelRegistry:
    def __init__(self, config: MiradorConfig, repository: ModelRepository):
        self.config = config
        self.repository = repository
        self.entries = {name: ModelEntry(spec) for name, spec in config.fleet.items()}

    def refresh(self) -> None:
        """Re-reads the repository: which fleet models are built, and which version."""
        for entry in self.entries.values():
            try:
                manifest = self.repository.get(entry.spec.name, entry.spec.version)
            except ModelNotFoundError:
                entry.version, entry.state = "", pb.MODEL_STATE_NOT_BUILT
                entry.detail = "not in the model repository; build it with `mirador fleet build`"
            except ModelRepositoryError as exc:
                entry.version, entry.state, entry.detail = "", pb.MODEL_STATE_FAILED, str(exc)
            else:
                entry.version, entry.state = manifest.version, pb.MODEL_STATE_UNLOADED
                entry.detail = "built, not loaded"

    def status(self, name: str) -> pb.ModelStatus:
        entry = self.entries[name]
        return pb.ModelStatus(
            name=name,
            version=entry.version,
            task=TASKS[entry.spec.task],
            tier=TIERS[entry.spec.tier],
            state=entry.state,
            ready=entry.state == pb.MODEL_STATE_READY,
            detail=entry.detail,
        )

    def statuses(self) -> list[pb.ModelStatus]:
        return [self.status(name) for name in sorted(self.entries)]
