"""Decoder language models exported with a KV cache (optimum's text-generation-with-past):
prefill, one-token decode steps, and option scoring after one shared prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.model_repository import ModelManifest
from services.model_host.runtimes import ModelRuntime
from services.model_host.runtimes.sampling import log_softmax
from services.model_host.runtimes.text import ChatTemplate


@dataclass
class DecodeState:
    """One sequence being generated: its KV cache and length."""

    past: dict[str, np.ndarray]
    length: int = 0
    token_ids: list[int] = field(default_factory=list)


class DecoderRuntime(ModelRuntime):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: Tokenizer):
        super().__init__(manifest, session)
        self.tokenizer = tokenizer
        generation = manifest.generation
        self.chat = ChatTemplate(generation)
        self.add_special_tokens = bool(generation.get("add_special_tokens", False))
        self.eos_token_ids = frozenset(generation.get("eos_token_ids") or [])
        past = generation["past_key_values"]
        self.num_layers = int(past["num_layers"])
        self.past_inputs = [
            past["input_pattern"].format(layer=layer, kind=kind) for layer in range(self.num_layers) for kind in past["kinds"]
        ]
        self.present_outputs = [
            past["output_pattern"].format(layer=layer, kind=kind) for layer in range(self.num_layers) for kind in past["kinds"]
        ]
        self.kv_heads = int(generation["num_kv_heads"])
        self.head_dim = int(generation["head_dim"])
        self.output_names = ["logits", *self.present_outputs]
        self.takes_position_ids = "position_ids" in {i.name for i in session.get_inputs()}
        self.max_length = int(generation.get("max_position_embeddings", 2048))
        # Whether option rows can run as one batch on a shared cache (fused attention ops may refuse).
        self.batched_continuation = bool(generation.get("batched_continuation", True))

    # -- text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        return self.chat.render(messages)

    # -- model

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=np.float32) for name in self.past_inputs}

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray], past_length: int):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **past}
        if self.takes_position_ids:
            steps = input_ids.shape[1]
            feeds["position_ids"] = np.broadcast_to(
                np.arange(past_length, past_length + steps, dtype=np.int64), input_ids.shape
            ).copy()
        outputs = self.session.run(self.output_names, feeds)
        presents = dict(zip(self.past_inputs, outputs[1:]))
        return outputs[0], presents

    def prefill(self, prompt_ids: list[int]) -> tuple[DecodeState, np.ndarray]:
        """Runs the prompt; returns the state and the logits for the first new token."""
        if len(prompt_ids) >= self.max_length:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; this model takes at most {self.max_length - 1}")
        ids = np.asarray([prompt_ids], dtype=np.int64)
        logits, past = self._run(ids, np.ones_like(ids), self._empty_past(1), 0)
        return DecodeState(past=past, length=len(prompt_ids), token_ids=list(prompt_ids)), logits[0, -1]

    def step(self, state: DecodeState, token_id: int) -> np.ndarray:
        """Appends one token; returns the logits for the next."""
        ids = np.asarray([[token_id]], dtype=np.int64)
        mask = np.ones((1, state.length + 1), dtype=np.int64)
        logits, state.past = self._run(ids, mask, state.past, state.length)
        state.length += 1
        state.token_ids.append(token_id)
        return logits[0, -1]

    def score_options(self, prompt_ids: list[int], options: list[str]) -> tuple[list[float], list[int]]:
        """Log-likelihood of each option's tokens after the prompt, with one shared prefill.

        The options run as one right-padded batch on copies of the prompt's KV
        cache; pads come after the real tokens, so they never influence them.
        Returns the summed log-probabilities and each option's token count.
        """
        option_ids = [self.encode(option) for option in options]
        if any(not ids for ids in option_ids):
            raise ValueError("an option encodes to no tokens; give every option visible text")
        longest = max(len(ids) for ids in option_ids)
        if len(prompt_ids) + longest > self.max_length:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) and its longest option ({longest} tokens) are "
                             f"longer than this model reads ({self.max_length} tokens); shorten them")
        state, first_logits = self.prefill(prompt_ids)
        first_logprobs = log_softmax(first_logits)
        if self.batched_continuation:
            logprobs = self._continuation_logprobs(state, option_ids)
        else:
            logprobs = [self._continuation_logprobs(state, [ids])[0] for ids in option_ids]
        totals = []
        for row, ids in enumerate(option_ids):
            total = first_logprobs[ids[0]]
            total += sum(logprobs[row][j - 1, ids[j]] for j in range(1, len(ids)))
            totals.append(float(total))
        return totals, [len(ids) for ids in option_ids]

    def _continuation_logprobs(self, state: DecodeState, option_ids: list[list[int]]) -> np.ndarray:
        """Log-probabilities after each option token, all options as one right-padded batch."""
        width = max(len(ids) for ids in option_ids)
        batch = len(option_ids)
        input_ids = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros((batch, state.length + width), dtype=np.int64)
        mask[:, : state.length] = 1
        for row, ids in enumerate(option_ids):
            input_ids[row, : len(ids)] = ids
            mask[row, state.length : state.length + len(ids)] = 1
        past = {name: np.repeat(value, batch, axis=0) for name, value in state.past.items()}
        logits, _ = self._run(input_ids, mask, past, state.length)
        return log_softmax(logits)
