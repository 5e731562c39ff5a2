"""How a label decision is put to a language model.

The wording is the one the score calibration was fitted with
(config/calibration/<model>.json, `score.prompt_format`, by
`python -m services.model_host.calibrate`): a calibrated confidence only means
something for questions asked the same way.
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
