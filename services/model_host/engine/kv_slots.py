"""Where each running sequence's KV cache lives, and the two calls the engine makes on it:
`prefill` (a chunk of one sequence's prompt) and `decode` (one new token for each of several
sequences, in one forward pass).

`SharedKVSlots` is the fast path, for graphs that take one buffer as both past and present
(`generation.kv_cache: shared-buffer`, Mirador's fused llama graph): per layer one
preallocated [slots, kv_heads, max_context, head_dim] buffer, bound by IO binding as both
GroupQueryAttention's past and present, so nothing is copied per step and a step costs the
same at token 10 and token 1,000. Row i is slot i. A decode step runs the rows 0..n-1 that
cover every active slot; each row's length comes from its mask's sum. A row in between that
is not decoding (a free slot, or a sequence whose prompt is still being prefilled in chunks)
runs a dummy token written just past what its slot holds, where its next write lands anyway:
it never touches a cache entry in use.

`PerSequenceSlots` serves graphs without that interface (the optimum export): each slot
keeps its own growing cache and a decode step runs the slots one after another. Same
results, no batching gain.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from services.model_host.runtimes.decoder import DecodeState, DecoderRuntime, kv_dtype
from services.model_host.runtimes.prefix_cache import PREFIX_CACHE_TOKENS, PREFIX_CACHES_PER_DECODER


class KVSlots:
    """The interface the engine drives."""

    slots: int
    max_context: int  # tokens a sequence may hold (prompt + answer)

    @property
    def reserved_bytes(self) -> int:
        """Memory held for the slots' caches (counted in the model's size by the registry)."""
        return 0

    def prefill(self, slot: int, token_ids: list[int], start: int) -> np.ndarray:
        """Writes `token_ids` at positions start.. of `slot`'s cache; returns the last token's logits."""
        raise NotImplementedError

    def decode(self, slots: list[int], token_ids: list[int], lengths: list[int]) -> np.ndarray:
        """Appends one token to each slot (whose cache holds `lengths[i]` tokens); returns logits [len(slots), vocab]."""
        raise NotImplementedError

    def release(self, slot: int) -> None:
        """The slot's sequence left; its cache may be reused."""

    # A prompt's shared beginning, copied out of a slot once prefilled and into another instead of
    # running it again (the engine's prefix cache). Arrays are [1, kv_heads, tokens, head_dim].
    copies_prefixes = False

    def copy_out(self, slot: int, tokens: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def copy_in(self, slot: int, past: dict[str, np.ndarray], tokens: int) -> None:
        raise NotImplementedError


def kv_device(providers: list[str]) -> str:
    """Where a session's KV buffers belong: `cuda` when CUDA runs it, else host memory."""
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"


def slots_for(runtime: DecoderRuntime, slots: int, max_context: int) -> KVSlots:
    max_context = min(max_context, runtime.max_length)
    if runtime.shared_kv_buffer:
        return SharedKVSlots(runtime, slots, max_context)
    return PerSequenceSlots(runtime, slots, max_context)


def kv_bytes_per_token(runtime_facts: dict) -> int:
    past = runtime_facts["past_key_values"]
    return int(past["num_layers"]) * len(past["kinds"]) * int(runtime_facts["num_kv_heads"]) * int(
        runtime_facts["head_dim"]) * np.dtype(kv_dtype(runtime_facts)).itemsize


def reserved_bytes_for(runtime_facts: dict, slots: int, max_context: int) -> int:
    """The KV memory `slots` full sequences hold, from a manifest's `generation` facts (known
    before a load): preallocated by `SharedKVSlots`, the bound that `PerSequenceSlots` grows to."""
    return kv_bytes_per_token(runtime_facts) * slots * min(
        max_context, int(runtime_facts.get("max_position_embeddings", max_context)))


def decoder_cache_bytes(runtime_facts: dict, slots: int, max_context: int) -> int:
    """Every KV cache a loaded decoder may hold: its engine's slots and its two prefix caches."""
    prefixes = PREFIX_CACHES_PER_DECODER * PREFIX_CACHE_TOKENS
    return reserved_bytes_for(runtime_facts, slots, max_context) + prefixes * kv_bytes_per_token(runtime_facts)


def runtime_kv_bytes(runtime: DecoderRuntime, slots: int, max_context: int) -> int:
    return reserved_bytes_for(runtime.manifest.generation, slots, max_context)


class SharedKVSlots(KVSlots):
    def __init__(self, runtime: DecoderRuntime, slots: int, max_context: int):
        self.runtime = runtime
        self.slots = slots
        self.max_context = max_context
        self.session: ort.InferenceSession = runtime.session
        self.row_shape = [runtime.kv_heads, max_context, runtime.head_dim]
        self.row_bytes = int(np.prod(self.row_shape)) * runtime.kv_dtype.itemsize
        # The buffers live where the session computes: device memory (OrtValues) under CUDA, so a step
        # copies nothing between host and device; numpy on the CPU, where np.zeros maps fresh pages:
        # untouched slots cost no resident memory until used, but the budget counts them all
        # (reserved_bytes), so a full house never overruns it. Rows are bound by address: row i of a
        # [slots, ...] buffer starts i * row_bytes in.
        self.device = kv_device(self.session.get_providers())
        shape = [slots, *self.row_shape]
        if self.device == "cpu":
            self.buffers = {name: np.zeros(shape, runtime.kv_dtype) for name in runtime.past_inputs}
            self._addresses = {name: buffer.ctypes.data for name, buffer in self.buffers.items()}
        else:
            self.buffers = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, runtime.kv_dtype, self.device, 0)
                            for name in runtime.past_inputs}
            self._addresses = {name: value.data_ptr() for name, value in self.buffers.items()}
        self.vocab = int(runtime.manifest.generation.get("vocab_size") or self.session.get_outputs()[0].shape[-1])
        # Logits come back to the host (sampling runs there): one row per slot, the graph's float type.
        self.logits = np.zeros((slots, 1, self.vocab), runtime.kv_dtype)
        self.filled = np.zeros(slots, np.int64)  # tokens each slot's cache holds
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}

    @property
    def reserved_bytes(self) -> int:
        return runtime_kv_bytes(self.runtime, self.slots, self.max_context)

    def _run(self, first: int, stop: int, input_ids: np.ndarray, mask: np.ndarray) -> None:
        binding = self._bindings.get((first, stop))
        if binding is None:
            binding = self._bindings[(first, stop)] = self._bind_rows(first, stop)
        binding.bind_cpu_input("input_ids", input_ids)  # replaces the last step's
        binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(binding)

    def _bind_rows(self, first: int, stop: int) -> ort.IOBinding:
        """A binding of rows first..stop-1 of every cache buffer and of the logits: the addresses
        never change, so it is made once per row range (at most 2 x slots of them) and kept; a
        step then rebinds only its ids and mask (binding 2 x layers buffers cost ~0.25 ms a step)."""
        binding = self.session.io_binding()
        if self.runtime.takes_logits_to_keep:
            binding.bind_cpu_input("logits_to_keep", np.asarray([1], np.int64))
        rows = [stop - first, *self.row_shape]
        dtype = self.runtime.kv_dtype.type
        for past, present in zip(self.runtime.past_inputs, self.runtime.present_outputs):
            address = self._addresses[past] + first * self.row_bytes
            binding.bind_input(past, self.device, 0, dtype, rows, address)
            binding.bind_output(present, self.device, 0, dtype, rows, address)  # the same rows: GQA appends in place
        binding.bind_output("logits", "cpu", 0, dtype, [stop - first, 1, self.vocab], self.logits.ctypes.data)
        return binding

    def prefill(self, slot: int, token_ids: list[int], start: int) -> np.ndarray:
        end = start + len(token_ids)
        if end > self.max_context:
            raise ValueError(f"{end} tokens do not fit a slot of {self.max_context}")
        ids = np.asarray([token_ids], np.int64)
        self._run(slot, slot + 1, ids, np.ones((1, end), np.int64))
        self.filled[slot] = end
        return self.logits[0, 0].astype(np.float32)  # a copy: the buffer is reused

    def decode(self, slots: list[int], token_ids: list[int], lengths: list[int]) -> np.ndarray:
        rows = max(slots) + 1
        ids = np.zeros((rows, 1), np.int64)
        row_lengths = self.filled[:rows] + 1  # rows not decoding: a dummy token just past their cache
        for slot, token, length in zip(slots, token_ids, lengths):
            ids[slot, 0] = token
            row_lengths[slot] = length + 1
        width = int(row_lengths.max())
        if width > self.max_context:
            raise ValueError(f"{width} tokens do not fit a slot of {self.max_context}")
        mask = (np.arange(width)[None, :] < row_lengths[:, None]).astype(np.int64)
        self._run(0, rows, ids, mask)
        self.filled[slots] = np.asarray(lengths) + 1
        return self.logits[slots, 0].astype(np.float32, copy=False)

    def release(self, slot: int) -> None:
        self.filled[slot] = 0

    @property
    def copies_prefixes(self) -> bool:
        return self.device == "cpu"  # device buffers would need a copy through the host: not worth it

    def copy_out(self, slot: int, tokens: int) -> dict[str, np.ndarray]:
        return {name: self.buffers[name][slot : slot + 1, :, :tokens, :].copy() for name in self.runtime.past_inputs}

    def copy_in(self, slot: int, past: dict[str, np.ndarray], tokens: int) -> None:
        for name in self.runtime.past_inputs:
            self.buffers[name][slot, :, :tokens, :] = past[name][0, :, :tokens, :]
        self.filled[slot] = tokens


class PerSequenceSlots(KVSlots):
    def __init__(self, runtime: DecoderRuntime, slots: int, max_context: int):
        self.runtime = runtime
        self.slots = slots
        self.max_context = max_context
        self.states: dict[int, DecodeState] = {}

    @property
    def reserved_bytes(self) -> int:
        return runtime_kv_bytes(self.runtime, self.slots, self.max_context)

    def prefill(self, slot: int, token_ids: list[int], start: int) -> np.ndarray:
        state = self.states.get(slot) if start else None
        if state is None:
            state = self.states[slot] = DecodeState(past=self.runtime._empty_past(1))
        ids = np.asarray([token_ids], np.int64)
        mask = np.ones((1, state.length + len(token_ids)), np.int64)
        logits, state.past = self.runtime._run(ids, mask, state.past, state.length, keep=1)
        state.length += len(token_ids)
        return logits[0, -1]

    def decode(self, slots: list[int], token_ids: list[int], lengths: list[int]) -> np.ndarray:
        return np.stack([self.prefill(slot, [token], length) for slot, token, length in zip(slots, token_ids, lengths)])

    def release(self, slot: int) -> None:
        self.states.pop(slot, None)

    copies_prefixes = True

    def copy_out(self, slot: int, tokens: int) -> dict[str, np.ndarray]:
        return {name: value[:, :, :tokens, :].copy() for name, value in self.states[slot].past.items()}

    def copy_in(self, slot: int, past: dict[str, np.ndarray], tokens: int) -> None:
        self.states[slot] = DecodeState(past={name: value[:, :, :tokens, :] for name, value in past.items()}, length=tokens)
