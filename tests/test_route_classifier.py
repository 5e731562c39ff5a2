"""The router's classifier on its own: lexical terms, TF-IDF features fitted on the
examples, and a head that reads embeddings and lexical features together."""

import numpy as np
import pytest

from services.router.classifier import LexicalFeatures, RouteClassifier, lexical_terms


def test_lexical_terms_are_word_ngrams_words_and_word_pairs():
    terms = lexical_terms("Fix a == b")
    assert {" f", "fi", "ix", "x ", " fi", "fix ", " fix "} <= set(terms)  # 2-5-grams of the padded word
    assert " a " in terms and "==" in terms  # a one-letter word, and punctuation as it is written
    assert {"w:fix", "w:a", "w:=", "w:b"} <= set(terms)
    assert {"b:fix a", "b:a =", "b:= =", "b:= b"} <= set(terms)
    assert "xa" not in "".join(t for t in terms if not t.startswith(("w:", "b:")))  # n-grams stay inside words


def test_lexical_features_keep_terms_seen_twice_and_are_unit_length():
    features = LexicalFeatures.fit(["extract the codes", "extract the dates", "write a query"])
    assert "w:extract" in features.vocabulary and "w:query" not in features.vocabulary
    x = features.transform(["extract the member id", "good morning"])
    assert np.linalg.norm(x[0]) == pytest.approx(1.0)
    assert not x[1].any()  # nothing it knows: all zero, not NaN


EXTRACTION = ["extract the dates from this letter", "extract every code from the note", "extract the amounts listed",
              "extract the names in this record", "extract the NPI from the claim", "extract each dose from the list"]
CODING = ["write a python function for claims", "write a sql query for paid amounts", "write a unit test please",
          "write a regex for member ids", "write a bash loop over the files", "write a yaml file for the service"]


def test_lexical_features_decide_when_the_embeddings_say_nothing():
    """Embeddings drawn at random (no signal): the embedding-only head is at chance on new
    requests, the head that also reads the texts gets them right."""
    rng = np.random.default_rng(0)
    texts, labels = EXTRACTION + CODING, ["extraction"] * 6 + ["coding"] * 6
    noise = rng.standard_normal((12, 16))
    requests = {"extract the member id from this card": "extraction", "write a function that adds numbers": "coding",
                "extract the phone numbers": "extraction", "write a query that counts claims": "coding"}
    combined = RouteClassifier.train(noise, labels, texts)
    alone = RouteClassifier.train(noise, labels)
    chosen = {text: max(scores, key=scores.get) for text in requests
              for scores in [combined.scores(np.zeros(16), text)]}
    assert chosen == requests
    assert combined.cv_accuracy > alone.cv_accuracy
    assert combined.lexical is not None and alone.lexical is None
    assert "lexical terms" in combined.calibration_source and "lexical" not in alone.calibration_source
    scores = combined.scores(np.zeros(16), "write a regex")
    assert sum(scores.values()) == pytest.approx(1.0) and set(scores) == {"extraction", "coding"}


@pytest.mark.real_model
def test_the_shipped_routes_send_the_demos_requests_where_they_belong():
    """The shipped config's examples and the built minilm-l6, trained as the router trains:
    `make demo`'s extraction request went to coding with the embedding alone."""
    from services.common.config import load_config
    from services.common.model_repository import ModelNotFoundError, ModelRepository
    from services.model_host.loader import SessionSettings, load_runtime
    from services.router.routing import classified_routes

    config = load_config()
    try:
        manifest = ModelRepository().get(config.services.router.embedding_model)
    except ModelNotFoundError:
        pytest.skip("minilm-l6 is not built; run `mirador fleet build`")
    encoder = load_runtime(manifest, SessionSettings(intra_op_threads=2))
    texts, labels = [], []
    for name, route in classified_routes(config).items():
        texts += route.examples
        labels += [name] * len(route.examples)
    vectors = np.concatenate([encoder.embed(texts[i:i + 32]) for i in range(0, len(texts), 32)])
    classifier = RouteClassifier.train(vectors, labels, texts)
    requests = {"Extract the member id from: MEMBER ID QA0000TEST GROUP 00-FAKE-77": "extraction",  # scripts/demo.sh
                "Is a prior authorization required for an MRI of the lumbar spine?": "compliance"}
    for text, expected in requests.items():
        scores = classifier.scores(encoder.embed([text])[0], text)
        assert max(scores, key=scores.get) == expected, (text, scores)
        assert scores[expected] >= config.services.router.min_confidence  # not sent to `default`


def test_several_models_vectors_are_standardised_so_a_loud_one_does_not_drown_a_telling_one():
    """Two models side by side: one loud (values ~1000, no signal), one quiet (values ~0.01, the
    route). Standardised per block, the head hears the quiet one; raw, it hears noise."""
    rng = np.random.default_rng(1)
    labels = ["a"] * 20 + ["b"] * 20
    quiet = 0.01 * (np.array([[1.0, 0.0]] * 20 + [[0.0, 1.0]] * 20) + 0.3 * rng.standard_normal((40, 2)))
    loud = 1000 + 1000 * rng.standard_normal((40, 8))
    vectors = np.hstack([loud, quiet])
    blocks = RouteClassifier.train(vectors, labels, widths=(8, 2))
    assert blocks.scaler is not None and blocks.widths == (8, 2)
    assert blocks.cv_accuracy >= 0.9
    probe_a = np.hstack([1000 + 1000 * rng.standard_normal(8), [0.01, 0.0]])
    probe_b = np.hstack([1000 + 1000 * rng.standard_normal(8), [0.0, 0.01]])
    assert max(blocks.scores(probe_a).items(), key=lambda kv: kv[1])[0] == "a"
    assert max(blocks.scores(probe_b).items(), key=lambda kv: kv[1])[0] == "b"
    assert "pooled vectors of 2 model(s)" in blocks.features
    raw = RouteClassifier.train(vectors, labels)  # one model: no standardising
    assert raw.scaler is None and raw.cv_accuracy < blocks.cv_accuracy


def test_widths_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="do not add up to 10 columns"):
        RouteClassifier.train(np.ones((6, 10)), ["a", "b"] * 3, widths=(4, 4))
