"""What runs a loaded model: one runtime class per task, built from a manifest and
an ONNX Runtime session. Runtimes are synchronous; the data plane calls them
from worker threads."""

from __future__ import annotations

import abc
import ctypes
import gc
from typing import Callable

import onnxruntime as ort

from services.common.model_repository import ModelManifest


class ModelRuntime(abc.ABC):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession):
        self.manifest = manifest
        self.session = session
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, release: Callable[[], None]) -> None:
        """Runs `release` when the runtime is closed (what it shares with other runtimes, say)."""
        self._on_close.append(release)

    @property
    def execution_provider(self) -> str:
        return self.session.get_providers()[0]

    def close(self) -> None:
        """Drops the session and hands its memory back to the system."""
        self.session = None
        releases, self._on_close = self._on_close, []
        for release in releases:
            release()
        release_freed_memory()


def release_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse; an unloaded model's hundreds of MB
    should go back to the system (and out of RSS, which the memory budget reads)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
