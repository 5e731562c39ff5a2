"""Text around the model: chat templates, incremental detokenization, stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

ROLE_NAMES = ("system", "user", "assistant")


class ChatTemplate:
    """Renders a conversation with the markers in the manifest (`generation.chat_markers`).

    Only marker-based formats (ChatML and friends) are supported: they need no
    Jinja, and a manifest without markers is served with raw prompts only.
    """

    def __init__(self, generation: dict):
        markers = generation.get("chat_markers") or {}
        self.message_format: str | None = markers.get("message")
        self.generation_prompt: str = markers.get("generation_prompt", "")
        self.default_system_prompt: str = generation.get("default_system_prompt", "")

    @property
    def available(self) -> bool:
        return self.message_format is not None

    def render(self, messages: list[tuple[str, str]]) -> str:
        """`messages` are (role, content) pairs; returns the prompt ending with the assistant's turn."""
        if not self.available:
            raise ValueError("this model has no chat template; send a raw `prompt` instead of `messages`")
        if self.default_system_prompt and (not messages or messages[0][0] != "system"):
            messages = [("system", self.default_system_prompt), *messages]
        body = "".join(self.message_format.format(role=role, content=content) for role, content in messages)
        return body + self.generation_prompt


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding one token alone loses leading spaces and splits multi-byte
    characters, so each delta is the difference between two decodes of a short
    window, held back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""


@dataclass
class HeldToken:
    index: int
    token_id: int
    text: str
    logprob: float
    entropy: float


@dataclass
class StopStringScanner:
    """Holds tokens back while the answer's tail could be the start of a stop string.

    `push` returns the tokens that are safe to stream; `stopped` turns true when a
    stop string appears, and the tokens returned then are cut just before it.
    """

    stops: tuple[str, ...]
    text: str = ""  # everything released so far
    held: list[HeldToken] = field(default_factory=list)
    stopped: bool = False

    def push(self, token: HeldToken) -> list[HeldToken]:
        if not self.stops:
            self.text += token.text
            return [token]
        self.held.append(token)
        pending = "".join(t.text for t in self.held)
        window = self.text + pending
        hits = [i for i in (window.find(s, max(0, len(self.text) - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release_until(min(hits) - len(self.text))
        if any(self._tail_could_start(window, s) for s in self.stops):
            return []
        return self._release_until(len(pending))

    def flush(self) -> list[HeldToken]:
        return self._release_until(sum(len(t.text) for t in self.held))

    def _release_until(self, chars: int) -> list[HeldToken]:
        released = []
        for token in self.held:
            if chars <= 0:
                break
            if len(token.text) > chars:
                token.text = token.text[:chars]
            chars -= len(token.text)
            released.append(token)
        self.held = []
        self.text += "".join(t.text for t in released)
        return released

    @staticmethod
    def _tail_could_start(text: str, stop: str) -> bool:
        return any(text.endswith(stop[:k]) for k in range(1, len(stop)))
