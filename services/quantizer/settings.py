"""`services.quantizer:` in the config."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServiceSettings, setting, whole


@dataclass(frozen=True)
class QuantizerSettings(ServiceSettings):
    block_size: int = setting(32, whole(1))


SETTINGS = QuantizerSettings
