"""What runs a loaded model: one runtime class per task, built from a manifest and
an ONNX Runtime session. Runtimes are synchronous; the data plane calls them
from worker threads."""

from __future__ import annotations

import abc

import onnxruntime as ort

from services.common.model_repository import ModelManifest


class ModelRuntime(abc.ABC):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession):
        self.manifest = manifest
        self.session = session

    @property
    def execution_provider(self) -> str:
        return self.session.get_providers()[0]

    def close(self) -> None:
        """Drops the session so its memory can be freed."""
        self.session = None
