"""How a label decision is put to a model: the one wording shared by who asks and who answers.

The consensus service asks every voter this way; the model host's score calibration was fitted
on questions asked this way (`python -m services.model_host.calibrate`, format `system-options`;
config/calibration/<model>.json records it under `score.prompt_format`), so a calibrated
confidence only means something for questions asked the same way; and a classifier model reads
the question back without the instructions written for language models (`question_of`).
"""

from __future__ import annotations

from typing import Sequence

from mirador.v1 import common_pb2

SYSTEM = "You answer questions with exactly one of the given options, written exactly as shown, and nothing else."
USER = "{prompt}\n\nOptions: {options}\nAnswer with one option."
OPTIONS_JOINER = " / "


def decision_messages(messages: Sequence[common_pb2.ChatMessage], options: Sequence[str]) -> list[common_pb2.ChatMessage]:
    """The conversation with the decision instructions as system prompt and the options
    appended to the last (user) turn; earlier turns are kept as context."""
    *history, question = messages
    history = [m for m in history if m.role != common_pb2.ROLE_SYSTEM]
    asked = USER.format(prompt=question.content, options=OPTIONS_JOINER.join(options))
    return [
        common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=SYSTEM),
        *history,
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=asked),
    ]


def question_of(asked: str, options: Sequence[str]) -> str:
    """The question inside a user turn written by `decision_messages` (the text unchanged if it
    was not asked that way)."""
    suffix = USER.format(prompt="", options=OPTIONS_JOINER.join(options))
    return asked[: -len(suffix)] if suffix and asked.endswith(suffix) else asked
