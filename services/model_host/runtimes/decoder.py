"""Decoder language models exported with a KV cache (optimum's text-generation-with-past):
prefill, one-token decode steps, and option scoring after one shared prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.model_repository import ModelManifest
from services.model_host.runtimes import ModelRuntime
from services.model_host.runtimes.prefix_cache import PrefixCache
from services.model_host.runtimes.sampling import log_softmax
from services.model_host.runtimes.text import ChatTemplate, Prompt, PromptEncoder
from services.model_host.runtimes.tokenizer_files import TokenizerSource, source_of

# Score's option rows per forward pass on graphs that take them as one batch.
OPTION_ROWS_PER_CALL = 4


def kv_dtype(generation: dict) -> str:
    """A decoder manifest's KV cache element type (`generation.dtype`, float32 when absent)."""
    return "float16" if generation.get("dtype") == "float16" else "float32"


@dataclass
class DecodeState:
    """One sequence being generated: its KV cache and length."""

    past: dict[str, np.ndarray]
    length: int = 0
    token_ids: list[int] = field(default_factory=list)


class DecoderRuntime(ModelRuntime):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: Tokenizer | TokenizerSource):
        super().__init__(manifest, session)
        tokenizers = source_of(tokenizer)
        self.tokenizer = tokenizers.as_written()
        generation = manifest.generation
        # Client text is encoded as text; only the template's markers become control tokens.
        self.prompts = PromptEncoder(self.tokenizer, bool(generation.get("add_special_tokens", False)),
                                     plain=tokenizers.plain())
        self.chat = ChatTemplate(generation, self.prompts.markers)
        self.eos_token_ids = frozenset(generation.get("eos_token_ids") or [])
        past = generation["past_key_values"]
        self.num_layers = int(past["num_layers"])
        self.past_inputs = [
            past["input_pattern"].format(layer=layer, kind=kind) for layer in range(self.num_layers) for kind in past["kinds"]
        ]
        self.present_outputs = [
            past["output_pattern"].format(layer=layer, kind=kind) for layer in range(self.num_layers) for kind in past["kinds"]
        ]
        # The KV cache's (and the logits') element type: float16 for a GPU variant of the graph.
        self.kv_dtype = np.dtype(kv_dtype(generation))
        self.kv_heads = int(generation["num_kv_heads"])
        self.head_dim = int(generation["head_dim"])
        self.output_names = ["logits", *self.present_outputs]
        input_names = {i.name for i in session.get_inputs()}
        self.takes_position_ids = "position_ids" in input_names
        # Mirador's fused graph computes logits for the last `logits_to_keep` positions only.
        self.takes_logits_to_keep = "logits_to_keep" in input_names
        # Whether past and present can be one preallocated buffer with per-row lengths (a ragged
        # batch of decode steps in one call; services/model_host/engine/kv_slots.py).
        self.shared_kv_buffer = generation.get("kv_cache") == "shared-buffer"
        self.max_length = int(generation.get("max_position_embeddings", 2048))
        # Whether option rows can run as one batch on a shared cache (fused attention ops may refuse).
        self.batched_continuation = bool(generation.get("batched_continuation", True))
        # Beginnings of the prompts Score prefilled (the decision instructions every vote starts with).
        self.prefix_cache = PrefixCache()

    # -- text

    def encode(self, prompt: str | Prompt) -> list[int]:
        """Token ids of raw text (a prompt, an option) or of a rendered chat; text is always text."""
        return self.prompts.encode(prompt)

    def render_chat(self, messages: list[tuple[str, str]]) -> Prompt:
        return self.chat.render(messages)

    def prompt_ids(self, messages: list[tuple[str, str]], prompt: str) -> list[int]:
        """The ids a request's messages (or, without messages, its raw prompt) are answered from.
        Raises ValueError with what to change."""
        return self.encode(self.render_chat(messages) if messages else prompt)

    def prompt_ids_and_shared(self, messages: list[tuple[str, str]], prompt: str) -> tuple[list[int], int]:
        """`prompt_ids`, and how many of them come before the last message (the part other
        prompts may share: 0 for a raw prompt or a single message)."""
        rendered = self.render_chat(messages) if messages else prompt
        ids = self.encode(rendered)
        return ids, self.prompts.shared_length(rendered, ids)

    # -- model

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=self.kv_dtype) for name in self.past_inputs}

    def kv_bytes_per_token(self) -> int:
        return len(self.past_inputs) * self.kv_heads * self.head_dim * self.kv_dtype.itemsize  # every layer

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray], past_length: int,
             keep: int | None = None):
        """One forward pass; `keep` = how many last positions need logits (None: all; graphs without
        `logits_to_keep` always return all)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **past}
        if self.takes_logits_to_keep:
            feeds["logits_to_keep"] = np.asarray([keep or input_ids.shape[1]], dtype=np.int64)
        if self.takes_position_ids:
            steps = input_ids.shape[1]
            feeds["position_ids"] = np.broadcast_to(
                np.arange(past_length, past_length + steps, dtype=np.int64), input_ids.shape
            ).copy()
        outputs = self.session.run(self.output_names, feeds)
        presents = dict(zip(self.past_inputs, outputs[1:]))
        return outputs[0].astype(np.float32, copy=False), presents  # sampling works in float32

    def prefill(self, prompt_ids: list[int], reuse_prefix: bool = False,
                then: list[int] | None = None) -> tuple[DecodeState, np.ndarray]:
        """Runs the prompt; returns the state and the logits for the first new token. With
        `reuse_prefix`, only the part after the longest beginning in `prefix_cache` runs.

        With `then` (a list, maybe empty), those tokens follow the prompt in the same forward pass
        (one pass over the weights instead of two): the logits are (1 + len(then), vocab), after the
        prompt and after each of them, and the state is still the prompt's alone (a K/V row
        depends only on the tokens before it, so the prompt's cache is a slice of the longer one)."""
        extra = list(then or [])
        if len(prompt_ids) + len(extra) >= self.max_length:
            raise ValueError(f"the prompt is {len(prompt_ids) + len(extra)} tokens; this model takes at most "
                             f"{self.max_length - 1}")
        cached, past = self.prefix_cache.longest(prompt_ids) if reuse_prefix else (0, None)
        ids = np.asarray([[*prompt_ids[cached:], *extra]], dtype=np.int64)
        mask = np.ones((1, len(prompt_ids) + len(extra)), dtype=np.int64)
        keep = 1 + len(extra)
        logits, past = self._run(ids, mask, past if past is not None else self._empty_past(1), cached, keep=keep)
        if extra:
            past = {name: value[:, :, : len(prompt_ids)] for name, value in past.items()}
        if reuse_prefix:
            self.prefix_cache.add(prompt_ids, past)
        state = DecodeState(past=past, length=len(prompt_ids), token_ids=list(prompt_ids))
        return state, (logits[0, -keep:] if then is not None else logits[0, -1])

    def step(self, state: DecodeState, token_id: int) -> np.ndarray:
        """Appends one token; returns the logits for the next."""
        ids = np.asarray([[token_id]], dtype=np.int64)
        mask = np.ones((1, state.length + 1), dtype=np.int64)
        logits, state.past = self._run(ids, mask, state.past, state.length, keep=1)
        state.length += 1
        state.token_ids.append(token_id)
        return logits[0, -1]

    def score_options(self, prompt_ids: list[int], options: list[str]) -> tuple[list[float], list[int]]:
        """Log-likelihood of each option's tokens after the prompt, with one shared prefill.

        The longest option rides along the prompt's own forward pass (`prefill(then=...)`); the
        others continue from the prompt's KV cache, as right-padded rows of one batch where the
        graph takes them, else in lockstep: one batched one-token step per option position. A
        forward pass reads every weight once, so on CPU its count, not its width, is the cost:
        the three compliance options (2, 4 and 2 tokens) take 2 passes instead of 4.
        Returns the summed log-probabilities and each option's token count.
        """
        option_ids = [self.encode(option) for option in options]
        if any(not ids for ids in option_ids):
            raise ValueError("an option encodes to no tokens; give every option visible text")
        riding = max(range(len(option_ids)), key=lambda i: len(option_ids[i]))
        ride = option_ids[riding]  # the longest
        if len(prompt_ids) + len(ride) > self.max_length:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) and its longest option ({len(ride)} tokens) are "
                             f"longer than this model reads ({self.max_length} tokens); shorten them")
        state, logits = self.prefill(prompt_ids, reuse_prefix=True, then=ride[:-1])  # the decision instructions, once
        ride_logprobs = log_softmax(logits)
        first_logprobs = ride_logprobs[0]
        totals: dict[int, float] = {riding: float(sum(ride_logprobs[j, ids_j] for j, ids_j in enumerate(ride)))}
        # Option rows run in small groups, and of each group's logits only the option tokens'
        # log-probabilities are kept: memory stays bounded by the group, not by the number of
        # options (a 32-option Score asked for gigabytes when run as one batch).
        others = [i for i in range(len(option_ids)) if i != riding]
        for first in range(0, len(others), OPTION_ROWS_PER_CALL):
            group = others[first : first + OPTION_ROWS_PER_CALL]
            rows = [option_ids[i] for i in group]
            continued = [ids for ids in rows if len(ids) > 1]
            logprobs = iter(self._continuation_logprobs(state, continued) if continued else ())
            for i, ids in zip(group, rows):
                row_logprobs = next(logprobs) if len(ids) > 1 else None
                totals[i] = float(first_logprobs[ids[0]] + sum(row_logprobs[j - 1, ids[j]] for j in range(1, len(ids))))
        return [totals[i] for i in range(len(option_ids))], [len(ids) for ids in option_ids]

    def _continuation_logprobs(self, state: DecodeState, option_ids: list[list[int]]) -> np.ndarray:
        """Log-probabilities after each option token but the last: (rows, longest - 1, vocab)."""
        if self.batched_continuation:
            return self._padded_continuation(state, option_ids)
        return self._lockstep_continuation(state, option_ids)

    def _padded_continuation(self, state: DecodeState, option_ids: list[list[int]]) -> np.ndarray:
        """The options as one right-padded batch on copies of the prompt's cache (pads come after
        the real tokens, so they never influence them)."""
        width = max(len(ids) for ids in option_ids) - 1
        batch = len(option_ids)
        input_ids = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros((batch, state.length + width), dtype=np.int64)
        mask[:, : state.length] = 1
        for row, ids in enumerate(option_ids):
            input_ids[row, : len(ids) - 1] = ids[:-1]
            mask[row, state.length : state.length + len(ids) - 1] = 1
        past = {name: np.repeat(value, batch, axis=0) for name, value in state.past.items()}
        logits, _ = self._run(input_ids, mask, past, state.length)
        return log_softmax(logits)

    def _lockstep_continuation(self, state: DecodeState, option_ids: list[list[int]]) -> np.ndarray:
        """One one-token step per option position for every row at once (GroupQueryAttention
        refuses several new tokens on a cache with batch > 1, but rows of equal length step
        together); a row whose option has ended steps on a pad whose logits are never read."""
        width = max(len(ids) for ids in option_ids) - 1
        batch = len(option_ids)
        tokens = np.zeros((batch, width), dtype=np.int64)
        for row, ids in enumerate(option_ids):
            tokens[row, : len(ids) - 1] = ids[:-1]
        past = {name: np.repeat(value, batch, axis=0) for name, value in state.past.items()}
        steps = []
        for j in range(width):
            length = state.length + j
            logits, past = self._run(tokens[:, j : j + 1], np.ones((batch, length + 1), dtype=np.int64), past,
                                     length, keep=1)
            steps.append(log_softmax(logits[:, -1]))
        return np.stack(steps, axis=1)
