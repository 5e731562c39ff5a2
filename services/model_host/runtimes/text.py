"""Text around the model: chat templates, incremental detokenization, stop strings."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from tokenizers import Encoding, Tokenizer

from services.model_host.answers import TokenEvent

ROLE_NAMES = ("system", "user", "assistant")
UNREADABLE = "\ufffd"  # what a character the vocabulary cannot spell is read as


def plain_text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that encodes text as text: a special token's spelling in it
    (`<|im_start|>`, `[SEP]`, `<start_of_turn>`) becomes the ordinary tokens of those characters,
    never the control token. Every runtime encodes client text with such a copy only; the
    post-processor's own tokens (BOS, [CLS] ... [SEP]) are still added where the model wants them.
    """
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's special (control) tokens: spelling -> id."""
    return {token.content: index for index, token in tokenizer.get_added_tokens_decoder().items() if token.special}


@dataclass(frozen=True)
class Prompt:
    """A prompt as the host built it: text (always encoded as text) and the chat template's
    markers, which are token ids placed by the host, never parsed out of text."""

    pieces: tuple[str | int, ...]
    # How many leading pieces come before the last message: the part many prompts share (the
    # system turn, or a conversation so far), which the engine may take from its prefix cache.
    shared_pieces: int = 0


class PromptEncoder:
    """Token ids of prompts, options and raw text, one path for every model family.

    Text pieces go through `plain_text_tokenizer`, marker pieces are appended as the ids
    the template named, and the tokenizer's post-processor (Gemma's BOS) runs once over the
    whole sequence when the manifest says `add_special_tokens`. For text without special
    spellings the ids equal those of the old way (format one string, let the tokenizer split
    out the markers), since that split happens at exactly the markers' places.
    """

    def __init__(self, tokenizer: Tokenizer, add_special_tokens: bool, plain: Tokenizer | None = None):
        # `plain`: the plain-text copy where the caller has one already (shared: runtimes/tokenizer_files.py)
        self.tokenizer = plain if plain is not None else plain_text_tokenizer(tokenizer)
        self.add_special_tokens = add_special_tokens
        self._markers: dict[int, Encoding] = {}  # marker id -> an Encoding holding just that id
        self.markers: dict[str, int] = {}  # what a chat template may place: spelling -> id
        for spelling, index in special_token_ids(tokenizer).items():
            marker = tokenizer.encode(spelling, add_special_tokens=False)
            if marker.ids == [index]:
                self._markers[index] = marker
                self.markers[spelling] = index
        # A character the vocabulary cannot spell becomes the model's unknown token, and some
        # tokenizers name a control token as such (SmolLM2's GGUF vocabulary: `<|endoftext|>`,
        # for bytes such as 0x04 that it lacks). Such characters are read as U+FFFD instead,
        # where the vocabulary spells that.
        unk = getattr(self.tokenizer.model, "unk_token", None)
        unk_id = self.tokenizer.token_to_id(unk) if unk else None
        replacement = self.tokenizer.encode(UNREADABLE, add_special_tokens=False).ids
        self._control_unk = unk_id if unk_id in self._markers and unk_id not in replacement else None

    def _encode_text(self, text: str) -> Encoding:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if self._control_unk is None or self._control_unk not in encoding.ids:
            return encoding
        chars = list(text)
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            if token == self._control_unk:
                chars[start:end] = [UNREADABLE] * (end - start)
        return self.tokenizer.encode("".join(chars), add_special_tokens=False)

    def shared_length(self, prompt: str | Prompt, ids: list[int]) -> int:
        """How many of `ids` (the prompt's) encode its shared pieces (0 when none, or when they
        are not a prefix of the whole: a post-processor that adds tokens at the end)."""
        if not isinstance(prompt, Prompt) or not prompt.shared_pieces:
            return 0
        shared = self.encode(Prompt(prompt.pieces[: prompt.shared_pieces]))
        return len(shared) if len(shared) < len(ids) and ids[: len(shared)] == shared else 0

    def encode(self, prompt: str | Prompt) -> list[int]:
        pieces = prompt.pieces if isinstance(prompt, Prompt) else (prompt,)
        encodings = [self._markers[piece] if isinstance(piece, int) else self._encode_text(piece) for piece in pieces]
        if not encodings:
            encodings = [self.tokenizer.encode("", add_special_tokens=False)]
        merged = encodings[0] if len(encodings) == 1 else Encoding.merge(encodings, growing_offsets=True)
        if not self.add_special_tokens:
            return list(merged.ids)
        return self.tokenizer.post_process(merged, add_special_tokens=True).ids


class ChatTemplate:
    """Renders a conversation with the markers in the manifest (`generation.chat_markers`).

    Only marker-based formats (ChatML, Gemma's turns and friends) are supported: they need no
    Jinja, and a manifest without markers is served with raw prompts only. The markers'
    special-token spellings in the manifest's format strings become token ids here, once;
    roles and contents are filled in as text, so a content that spells a marker stays text.
    """

    FIELDS = ("role", "content")

    def __init__(self, generation: dict, specials: dict[str, int]):
        """`specials`: the tokenizer's marker spellings and ids (`PromptEncoder.markers`)."""
        markers = generation.get("chat_markers") or {}
        self.message_format: str | None = markers.get("message")
        self.default_system_prompt: str = generation.get("default_system_prompt", "")
        self._message = self._parse(self.message_format, specials) if self.message_format is not None else ()
        self._generation_prompt = self._parse(markers.get("generation_prompt", ""), specials)

    @classmethod
    def _parse(cls, fmt: str, specials: dict[str, int]) -> tuple[str | int | tuple[str], ...]:
        """A format string as pieces: marker ids (int), literal text (str), fields (1-tuples)."""
        pieces: list[str | int | tuple[str]] = []
        spellings = sorted(specials, key=len, reverse=True)
        for literal, name, spec, conversion in string.Formatter().parse(fmt):
            while literal:
                found = [(literal.find(s), s) for s in spellings if s in literal]
                if not found:
                    pieces.append(literal)
                    break
                at, spelling = min(found, key=lambda f: (f[0], -len(f[1])))
                if at:
                    pieces.append(literal[:at])
                pieces.append(specials[spelling])
                literal = literal[at + len(spelling):]
            if name is not None:
                if name not in cls.FIELDS or spec or conversion:
                    raise ValueError(f"chat_markers: {fmt!r} may only use {{role}} and {{content}}, not {{{name}}}")
                pieces.append((name,))
        return tuple(pieces)

    @property
    def available(self) -> bool:
        return self.message_format is not None

    def render(self, messages: list[tuple[str, str]]) -> Prompt:
        """`messages` are (role, content) pairs; returns the prompt ending with the assistant's turn."""
        if not self.available:
            raise ValueError("this model has no chat template; send a raw `prompt` instead of `messages`")
        if self.default_system_prompt and (not messages or messages[0][0] != "system"):
            messages = [("system", self.default_system_prompt), *messages]
        pieces: list[str | int] = []
        last_message_at = 0
        for role, content in messages:
            if role not in ROLE_NAMES:
                raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLE_NAMES)}")
            last_message_at = len(pieces)
            pieces += self._fill(self._message, {"role": role, "content": content})
        pieces += self._fill(self._generation_prompt, {})
        merged: list[str | int] = []  # adjacent text is one piece, encoded as the old whole string was
        shared = 0
        for index, piece in enumerate(pieces):
            if index == last_message_at and len(messages) > 1:
                # the shared part ends here, unless this text runs on from the previous piece's
                shared = 0 if isinstance(piece, str) and merged and isinstance(merged[-1], str) else len(merged)
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            elif piece != "":
                merged.append(piece)
        return Prompt(tuple(merged), shared)

    @staticmethod
    def _fill(template: tuple, values: dict[str, str]) -> list[str | int]:
        return [values[piece[0]] if isinstance(piece, tuple) else piece for piece in template]


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
class StopStringScanner:
    """Holds tokens back while the answer's tail could be the start of a stop string.

    `push` returns the tokens that are safe to stream; `stopped` turns true when a
    stop string appears, and the tokens returned then are cut just before it.
    """

    stops: tuple[str, ...]
    text: str = ""  # everything released so far
    held: list[TokenEvent] = field(default_factory=list)
    stopped: bool = False

    def push(self, token: TokenEvent) -> list[TokenEvent]:
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

    def flush(self) -> list[TokenEvent]:
        return self._release_until(sum(len(t.text) for t in self.held))

    def _release_until(self, chars: int) -> list[TokenEvent]:
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
