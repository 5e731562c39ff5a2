"""Classification models (the fleet's trained specialists) served by a real model-host
process: Score over a classifier's labels, subsets renormalised, unknown labels refused.
Tiny classifiers are built here with the builder's own graph code; the real topics-minilm
is checked when `mirador fleet build` has built it."""

import json
import time

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.calibration_math import softmax
from services.common.config import load_config
from services.common.model_repository import ModelManifest, ModelNotFoundError, ModelRepository
from services.common.decision_prompt import decision_messages
from services.fleet import char_ngrams, linear_heads, specialists, topics_data
from tiny_models import build_tiny_encoder, embedding_tokenizer

LABELS = list(topics_data.TOPIC_LABELS)
# The user's repository, resolved now: the module's host fixture points XDG_CACHE_HOME elsewhere.
REAL_REPOSITORY = ModelRepository()
USER = common_pb2.ROLE_USER
FLEET = """
fleet:
  tiny-topics: {task: classification, tier: hot}
  tiny-bow: {task: classification, tier: warm}
  tiny-embed: {task: embedding, tier: warm}
routes:
  topics:
    primary: tiny-topics
    validators: [tiny-bow]
    consensus_threshold: 0.9
    options: [business, entertainment, politics, sports, tech]
"""


def classifier_tokenizer():
    tokenizer = embedding_tokenizer()
    tokenizer.no_padding()  # the builder turns minilm's baked-in padding off
    return tokenizer


def publish_classifier(repository, name, model: onnx.ModelProto, temperature: float) -> ModelManifest:
    input_names = [i.name for i in model.graph.input]

    def build(folder):
        onnx.save(model, str(folder / "model.onnx"))
        classifier_tokenizer().save(str(folder / "tokenizer.json"))
        return ModelManifest(
            name=name, version="1", task="classification", architecture="test",
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/test_classifier.py"}, licence="MIT",
            generation={"labels": LABELS, "input_names": input_names, "output": "probabilities",
                        "max_length": 64,
                        "calibration": {"temperature": temperature, "fit_on": "nothing (a test model)",
                                        "applied": "in-graph"}},
        )

    return repository.write_version(name, "1", build)


def build_tiny_classifiers(repository):
    """tiny-topics: tiny encoder + mean pool + L2 + linear head (the topics-minilm recipe's
    graph code); tiny-bow: in-graph TF-IDF bag of ids + linear head (topics-bow's)."""
    rng = np.random.default_rng(7)
    encoder = build_tiny_encoder(repository, "tiny-embed")
    weights = rng.standard_normal((32, len(LABELS))).astype(np.float32) * 3
    bias = rng.standard_normal(len(LABELS)).astype(np.float32)
    graph = specialists.minilm_classifier_graph(encoder.path_of("model"), weights, bias, temperature=1.5)
    publish_classifier(repository, "tiny-topics", graph, 1.5)

    vocab = classifier_tokenizer().get_vocab_size()
    idf = rng.uniform(0.5, 3.0, vocab).astype(np.float32)
    idf[:5] = 0  # specials
    bag = specialists.BagOfWordPieces(idf)
    bow_weights = (rng.standard_normal((vocab, len(LABELS))) * 2).astype(np.float32)
    bow_bias = np.zeros(len(LABELS), np.float32)
    publish_classifier(repository, "tiny-bow", specialists.bow_classifier_graph(bag, bow_weights, bow_bias, 0.8), 0.8)
    return bag, bow_weights, bow_bias


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    directory = tmp_path_factory.mktemp("classifier-host")
    repository = ModelRepository(directory / "models")
    bow = build_tiny_classifiers(repository)
    mesh = Mesh(load_config(write_config(directory, body=FLEET)), log_dir=directory / "logs",
                services=("model_host", "consensus"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start()
        with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            deadline = time.monotonic() + 30
            while not all(m.ready for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models
                          if m.name == "tiny-topics"):
                assert time.monotonic() < deadline, "tiny-topics did not load"
                time.sleep(0.1)
            yield stub, repository, bow, mesh
    finally:
        mesh.stop()


def score(stub, text, options, model="tiny-topics", messages=None):
    request = model_host_pb2.ScoreRequest(model=model, options=options)
    if messages is not None:
        request.messages.extend(messages)
    else:
        request.prompt = text
    return stub.Score(request, timeout=20)


def distribution(reply) -> dict[str, float]:
    return {label.label: label.probability for label in reply.confidence.label_distribution}


def reference(repository, name, text) -> np.ndarray:
    """The graph run directly on the tokenizer's ids: what the host must serve."""
    manifest = repository.get(name)
    session = ort.InferenceSession(str(manifest.path_of("model")), providers=["CPUExecutionProvider"])
    ids = np.array([classifier_tokenizer().encode(text).ids], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in {i.name for i in session.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return session.run(["probabilities"], feeds)[0][0]


TEXT = "the cat sat on the mat, said the model"


def test_score_over_all_labels_is_the_graph_distribution(host):
    stub, repository, _, _ = host
    reply = score(stub, TEXT, LABELS)
    probabilities = distribution(reply)
    assert list(probabilities) == LABELS
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert [probabilities[l] for l in LABELS] == pytest.approx(reference(repository, "tiny-topics", TEXT), abs=1e-5)
    assert reply.best_option == max(probabilities, key=probabilities.get)
    assert reply.confidence.calibrated_confidence == pytest.approx(max(probabilities.values()), abs=1e-6)
    assert "T=1.50" in reply.confidence.calibration_source
    assert "nothing (a test model)" in reply.confidence.calibration_source
    assert reply.model == "tiny-topics" and reply.model_version == "1"
    for label in reply.confidence.label_distribution:
        assert label.logprob == pytest.approx(np.log(label.probability), abs=1e-4)


def test_a_subset_of_labels_is_renormalised(host):
    stub, _, _, _ = host
    full = distribution(score(stub, TEXT, LABELS))
    subset = ["tech", "business", "sports"]
    reply = score(stub, TEXT, subset)
    probabilities = distribution(reply)
    assert list(probabilities) == subset  # in the order asked
    total = sum(full[l] for l in subset)
    assert [probabilities[l] for l in subset] == pytest.approx([full[l] / total for l in subset], abs=1e-5)
    assert reply.best_option == max(subset, key=full.get)
    assert reply.confidence.calibrated_confidence == pytest.approx(max(probabilities.values()), abs=1e-6)


def test_an_unknown_label_is_refused_with_the_model_labels(host):
    stub, _, _, _ = host
    with pytest.raises(grpc.RpcError) as caught:
        score(stub, TEXT, ["business", "weather"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "'weather'" in details and all(label in details for label in LABELS)


def test_consensus_wording_is_classified_as_the_bare_question(host):
    stub, _, _, _ = host
    options = ["business", "politics", "tech"]
    asked = decision_messages([common_pb2.ChatMessage(role=USER, content=TEXT)], options)
    assert asked[-1].content != TEXT  # the consensus service adds its option list and instruction
    from_messages = distribution(score(stub, None, options, messages=asked))
    from_prompt = distribution(score(stub, TEXT, options))
    assert from_messages == pytest.approx(from_prompt, abs=1e-6)


def test_bag_of_ids_graph_counts_tokens_as_the_builder_does(host):
    stub, repository, (bag, weights, bias), _ = host
    texts = ["the dog sat on the mat the mat", "hello world, hello model"]
    for text in texts:
        served = distribution(score(stub, text, LABELS, model="tiny-bow"))
        ids = classifier_tokenizer().encode(text).ids
        features = bag.transform(specialists.BagOfWordPieces.counts([ids], len(bag.idf)))
        expected = softmax((features @ weights + bias).astype(np.float64), 0.8)[0]
        assert [served[l] for l in LABELS] == pytest.approx(expected, abs=1e-5)


def test_character_ngram_graph_served_by_the_runtime_equals_the_builders_naive_bayes(tmp_path):
    """topics-char's graph (character ids -> hashed 2-5-grams counted in-graph -> TF-IDF ->
    naive Bayes), loaded by the model host's classifier runtime, gives the distribution the
    builder's numpy code computes, for texts shorter than an n-gram, padded in a batch with
    longer ones, and cut at max_length."""
    from services.model_host.loader import SessionSettings, load_runtime

    tokenizer = char_ngrams.char_tokenizer(max_length=40)
    train = ["Chelsea won the cup final", "Shares fell after profits", "The minister told MPs",
             "A new film award", "Chips and software", "United beat Arsenal"]
    labels = np.array([3, 0, 2, 1, 4, 3])
    model = char_ngrams.CharNaiveBayes.fit(char_ngrams.CharNGramCounts.of(specialists.encode(tokenizer, train)),
                                           labels, alpha=0.01)
    graph = char_ngrams.char_classifier_graph(model, temperature=1.7)

    def build(folder):
        onnx.save(graph, str(folder / "model.onnx"))
        tokenizer.save(str(folder / "tokenizer.json"))
        return ModelManifest(
            name="tiny-char", version="1", task="classification", architecture="test",
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/test_classifier.py"}, licence="MIT",
            generation={"labels": LABELS, "input_names": ["input_ids", "attention_mask"], "output": "probabilities",
                        "max_length": 40, "calibration": {"temperature": 1.7, "fit_on": "nothing", "applied": "in-graph"}})

    runtime = load_runtime(ModelRepository(tmp_path).write_version("tiny-char", "1", build), SessionSettings())
    texts = ["Arsenal won", "ok", "", "  MPs   told the\nminister  ", "shares " * 20]
    served = runtime.classify(texts)
    expected = softmax(model.logits(char_ngrams.CharNGramCounts.of(specialists.encode(tokenizer, texts))), 1.7)
    assert served == pytest.approx(expected, abs=1e-5)
    assert [LABELS[i] for i in served[[0, 3]].argmax(axis=1)] == ["sports", "politics"]
    counts = char_ngrams.CharNGramCounts.of(specialists.encode(tokenizer, texts))
    assert counts.count[counts.text == 1].sum() == 1  # "ok": one 2-gram, nothing longer
    assert counts.count[counts.text == 4].sum() == 39 + 38 + 37 + 36  # cut at 40 characters
    subset = counts.rows(np.array([3, 0]))
    assert model.logits(subset) == pytest.approx(model.logits(counts)[[3, 0]])


def test_classifiers_vote_in_a_consensus_on_label_decisions(host):
    """The `topics` route's path: the consensus service asks each classifier through Score."""
    stub, _, _, mesh = host
    options = ["business", "entertainment", "politics", "sports", "tech"]
    request = consensus_pb2.DecideRequest(
        request_id="topics-1", route="topics", models=["tiny-topics", "tiny-bow"], options=options,
        messages=[common_pb2.ChatMessage(role=USER, content=TEXT)], consensus_threshold=0.9)
    with grpc.insecure_channel(mesh.config.services.consensus.address) as channel:
        consensus = consensus_pb2_grpc.ConsensusStub(channel)
        events = list(consensus.Decide(request, timeout=30))
        votes, verdict = [e.vote for e in events[:-1]], events[-1].verdict
        assert sorted(v.model for v in votes) == ["tiny-bow", "tiny-topics"]  # in the order they answered
        for vote in votes:  # each classifier's distribution over the options, as Score gives it
            expected = distribution(score(stub, TEXT, options, model=vote.model))
            assert not vote.error and vote.answer == max(expected, key=expected.get)
        assert verdict.answer in options and 0 < verdict.consistency <= 1
        with pytest.raises(grpc.RpcError) as caught:  # no options: a classifier cannot vote on free text
            list(consensus.Decide(consensus_pb2.DecideRequest(
                route="topics", models=["tiny-topics", "tiny-bow"], consensus_threshold=0.9,
                messages=[common_pb2.ChatMessage(role=USER, content=TEXT)]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "votes only on label decisions" in caught.value.details()


def test_embed_and_generate_still_refuse_a_classifier(host):
    stub, _, _, _ = host
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(model_host_pb2.EmbedRequest(model="tiny-topics", texts=["x"]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- builder pieces


def test_training_set_is_the_same_from_the_jsonl_or_the_corpus_folder(tmp_path):
    texts = {"business/001.txt": "Shares rose £5m.", "tech/002.txt": "New phone chip.",
             "tech/003.txt": "New phone chip.", "sports/004.txt": "Not in the list."}
    corpus = tmp_path / "data"
    for identifier, text in texts.items():
        (corpus / identifier).parent.mkdir(parents=True, exist_ok=True)
        (corpus / identifier).write_bytes(text.encode() + b"\n")
    kept = ["business/001.txt", "tech/002.txt"]  # the duplicate 003 and 004 are not in topics-dev
    hashes = tmp_path / "hashes"
    hashes.write_text("# comment\n" + "".join(f"{topics_data.text_digest(texts[i])}  {i}\n" for i in kept))
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": texts[i], "label": i.split("/")[0]}) + "\n" for i in kept))
    from_folder = topics_data.load_examples(corpus, hashes)
    assert from_folder == topics_data.load_examples(jsonl, hashes)
    assert [(e.id, e.label) for e in from_folder] == [("business/001.txt", "business"), ("tech/002.txt", "tech")]
    (corpus / "tech/002.txt").write_text("Edited.")
    with pytest.raises(ValueError, match="1 of the 2 topics-dev texts are missing"):
        topics_data.load_examples(corpus, hashes)


def test_logistic_head_is_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 6)) * 2
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.standard_normal((120, 6))
    first = linear_heads.fit_logistic(features, labels, 3, l2=1e-3)
    second = linear_heads.fit_logistic(features, labels, 3, l2=1e-3)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert ((features @ first[0] + first[1]).argmax(axis=1) == labels).mean() > 0.9


# --------------------------------------------------------------------------- real model


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["topics-minilm", "topics-bow", "topics-char", "topics-finetuned",
                                  "topics-finetuned-tail"])
def test_built_topic_specialist_classifies_obvious_bbc_sentences(name):
    from services.model_host.loader import SessionSettings, load_runtime

    try:
        manifest = REAL_REPOSITORY.get(name)
    except ModelNotFoundError:
        pytest.skip(f"{name} is not built; run `mirador fleet build --only {name}`")
    runtime = load_runtime(manifest, SessionSettings())
    texts = {
        "Chelsea beat Arsenal 2-0 at Stamford Bridge to go top of the Premiership, with two goals from Drogba.":
            "sports",
        "The Chancellor Gordon Brown told MPs the government would cut taxes before the general election.":
            "politics",
        "Shares in the bank fell 5% after it reported lower annual profits and warned of weaker sales.":
            "business",
    }
    probabilities = runtime.classify(list(texts))
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert [runtime.labels[i] for i in probabilities.argmax(axis=1)] == list(texts.values())
    assert manifest.generation["calibration"]["temperature"] > 0
