"""A host reads each tokenizer file once: models whose tokenizer file is the same share the
tokenizers built from it while any of them is loaded (services/model_host/runtimes/tokenizer_files.py)."""

from __future__ import annotations

import pytest
from tiny_models import build_tiny_decoder, build_tiny_encoder

from services.common.model_repository import ModelRepository
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.runtimes.tokenizer_files import SharedTokenizers

# a control token's spelling inside client text must stay text, shared or not
TEXT = "say <|im_start|>assistant and <|im_end|> as words"


@pytest.fixture()
def repository(tmp_path) -> ModelRepository:
    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "tiny-lm", seed=0)
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    build_tiny_encoder(repository, "tiny-embed")
    return repository


def test_models_of_one_tokenizer_file_share_its_tokenizers_until_the_last_is_closed(repository):
    shared = SharedTokenizers()
    settings = SessionSettings(intra_op_threads=1, optimized_cache=None, tokenizers=shared)
    own = load_runtime(repository.get("tiny-lm"), SessionSettings(intra_op_threads=1, optimized_cache=None))
    first = load_runtime(repository.get("tiny-lm"), settings)
    second = load_runtime(repository.get("tiny-lm-b"), settings)

    assert first.tokenizer is second.tokenizer
    assert first.prompts.tokenizer is second.prompts.tokenizer
    assert len(shared.entries) == 2  # the file as written, and the copy that reads text as text
    assert first.encode(TEXT) == own.encode(TEXT) == second.encode(TEXT)
    chat = [("user", TEXT)]
    assert first.prompt_ids(chat, "") == own.prompt_ids(chat, "")

    first.close()
    assert len(shared.entries) == 2, "the second model still holds them"
    assert second.encode(TEXT) == own.encode(TEXT)
    second.close()
    assert shared.entries == {}


def test_a_different_file_or_truncation_is_not_shared(repository):
    shared = SharedTokenizers()
    settings = SessionSettings(intra_op_threads=1, optimized_cache=None, tokenizers=shared)
    decoder = load_runtime(repository.get("tiny-lm"), settings)
    encoder = load_runtime(repository.get("tiny-embed"), settings)
    assert encoder.tokenizer is not decoder.prompts.tokenizer
    assert encoder.tokenizer.truncation["max_length"] == encoder.max_length
    assert decoder.prompts.tokenizer.truncation is None, "a decoder's prompt tokenizer must not truncate"
    assert len(shared.entries) == 3
    decoder.close()
    encoder.close()
    assert shared.entries == {}


def test_a_runtime_that_fails_to_build_gives_its_tokenizers_back(repository):
    shared = SharedTokenizers()
    manifest = repository.get("tiny-lm")
    broken = manifest.with_updates(generation={k: v for k, v in manifest.generation.items() if k != "past_key_values"})
    with pytest.raises(KeyError):
        load_runtime(broken, SessionSettings(intra_op_threads=1, optimized_cache=None, tokenizers=shared))
    assert shared.entries == {}
