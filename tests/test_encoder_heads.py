"""Classifiers declared as heads on a shared encoder (`fleet.NAME.encoder`): the encoder loads
once, is counted once and is held while a head is loaded; each text is embedded once for all heads;
the head path gives the whole graph's probabilities.

Tiny models built here (real ONNX Runtime sessions through the host's own loader) for the
lifecycle; the real fleet (minilm-l6 + topics-minilm) for the scores and the memory, in a real
model-host process."""

import asyncio
import json
import threading
import time

import grpc
import numpy as np
import onnx
import pytest
from mirador.v1 import model_host_pb2, model_host_pb2_grpc
from tokenizers import Tokenizer, models

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import ConfigError, ModelSpec, load_config
from services.common.errors import FailedPrecondition, ResourceExhausted, Unavailable
from services.common.model_repository import ModelManifest, ModelNotFoundError, ModelRepository
from services.fleet import specialists
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.registry import ModelRegistry, State
from services.model_host.runtimes.embedding_cache import EmbeddingCache
from test_classifier import LABELS, classifier_tokenizer
from tiny_models import build_tiny_encoder

MB = 1024 * 1024
TEXTS = ["Shares in the bank rose after the profit report.", "The striker scored twice in the cup final.",
         "Parliament voted on the budget.", "A new phone with a faster chip.", "x"]


def publish(repository, name, files: dict, head: dict | None = None, tokenizer=None,
            max_length: int = 64) -> ModelManifest:
    """A classifier with the given ONNX graphs (role -> model), as the fleet builder writes one."""
    def build(folder):
        for role, model in files.items():
            onnx.save(model, str(folder / f"{role}.onnx"))
        (tokenizer or classifier_tokenizer()).save(str(folder / "tokenizer.json"))
        generation = {"labels": LABELS, "output": "probabilities", "max_length": max_length,
                      "calibration": {"temperature": 1.5, "fit_on": "nothing (a test model)"}}
        if head:
            generation["head"] = head
        return ModelManifest(
            name=name, version="1", task="classification", architecture="test",
            files={**{role: f"{role}.onnx" for role in files}, "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/test_encoder_heads.py"}, licence="MIT", generation=generation)

    return repository.write_version(name, "1", build)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp("heads") / "models")
    encoder = build_tiny_encoder(repository, "tiny-embed")
    rng = np.random.default_rng(3)
    head_facts = {"input": specialists.HEAD_INPUT, "encoder": "tiny-embed", "pooling": "mean", "normalize": True}
    for name in ("tiny-topics", "tiny-other"):
        weights = (rng.standard_normal((32, len(LABELS))) * 3).astype(np.float32)
        bias = rng.standard_normal(len(LABELS)).astype(np.float32)
        whole = specialists.minilm_classifier_graph(encoder.path_of("model"), weights, bias, 1.5)
        publish(repository, name, {"model": whole, "head": specialists.head_graph(weights, bias, 1.5)}, head_facts)
    return repository


SIZES = {"tiny-embed": 90 * MB, "tiny-topics": 91 * MB, "tiny-other": 91 * MB}  # a whole graph holds the encoder
HEAD_MB = 1


def registry_of(repository, fleet: dict[str, ModelSpec], budget_mb: int = 0) -> ModelRegistry:
    """The real loader; memory as the loads would use it (fixed sizes per model, a head 1 MB)."""
    resident: dict[str, int] = {}

    def loader(manifest, encoder=None):
        runtime = load_runtime(manifest, SessionSettings(), encoder=encoder)
        resident[manifest.name + ("#head" if encoder else "")] = HEAD_MB * MB if encoder else SIZES[manifest.name]
        return runtime

    class Forget:
        def on_model_load(self, record):
            pass

        def on_model_unload(self, record):
            resident.pop(record.spec.artifact + ("#head" if record.spec.encoder else ""), None)

    registry = ModelRegistry(fleet, repository, loader, budget_bytes=budget_mb * MB,
                             memory_meter=lambda: sum(resident.values()), hooks=[Forget()])
    registry.refresh()
    return registry


def heads_fleet(**encoder_spec) -> dict[str, ModelSpec]:
    return {
        "tiny-embed": ModelSpec("tiny-embed", "embedding", **encoder_spec),
        "tiny-topics": ModelSpec("tiny-topics", "classification", encoder="tiny-embed"),
        "tiny-other": ModelSpec("tiny-other", "classification", encoder="tiny-embed"),
        "tiny-topics-whole": ModelSpec("tiny-topics-whole", "classification", repository_name="tiny-topics"),
    }


def test_a_head_loads_its_encoder_and_gives_the_whole_graphs_probabilities(repository):
    async def run():
        registry = registry_of(repository, heads_fleet())
        head = await registry.ensure_loaded("tiny-topics")
        encoder = registry.record("tiny-embed")
        assert encoder.state == State.READY and encoder.pinned  # loaded first, held for the head
        whole = await registry.ensure_loaded("tiny-topics-whole")
        return head.runtime.classify(TEXTS), whole.runtime.classify(TEXTS), registry

    by_head, by_whole, registry = asyncio.run(run())
    assert by_head.shape == (len(TEXTS), len(LABELS))
    np.testing.assert_allclose(by_head, by_whole, atol=1e-5)
    assert np.abs(by_head - by_head[::-1]).max() > 0.01  # the texts are told apart: not a constant
    # the budget counts the encoder once and each head as the head alone
    sizes = {n: r.measured_bytes // MB for n, r in registry.records.items() if r.state == State.READY}
    assert sizes == {"tiny-embed": 90, "tiny-topics": HEAD_MB, "tiny-topics-whole": 91}


def test_every_head_reuses_the_embedding_of_a_text_computed_once(repository):
    async def run():
        registry = registry_of(repository, heads_fleet())
        topics, other = await registry.ensure_loaded("tiny-topics"), await registry.ensure_loaded("tiny-other")
        return topics.runtime, other.runtime, registry.record("tiny-embed").runtime

    topics, other, encoder = asyncio.run(run())
    topics.classify([TEXTS[0]])
    assert (encoder.head_cache.misses, encoder.head_cache.hits) == (1, 0)
    other.classify([TEXTS[0]])  # the fan-out's second head: no encoder run
    assert (encoder.head_cache.misses, encoder.head_cache.hits) == (1, 1)
    other.classify([TEXTS[1], TEXTS[0]])
    assert (encoder.head_cache.misses, encoder.head_cache.hits) == (2, 2)


def test_the_encoder_is_never_evicted_under_a_loaded_head(repository):
    async def run():
        registry = registry_of(repository, heads_fleet(tier="warm"), budget_mb=180)
        await registry.ensure_loaded("tiny-topics-whole")  # measured once (91 MB), then out of the way
        await registry.unload("tiny-topics-whole")
        await registry.ensure_loaded("tiny-topics")  # the encoder (90 MB) and its head (1 MB)
        encoder = registry.record("tiny-embed")
        with pytest.raises(ResourceExhausted, match="needs 91 MB"):
            await registry.ensure_loaded("tiny-topics-whole")  # only the idle head could go: not enough
        assert encoder.state == State.READY
        with pytest.raises(FailedPrecondition, match="`tiny-embed` is the encoder of loaded head.s. tiny-topics"):
            await registry.unload("tiny-embed")
        await registry.unload("tiny-topics")
        assert not encoder.pinned  # no head holds it: a warm model again
        whole = await registry.ensure_loaded("tiny-topics-whole")  # now the idle encoder may be evicted
        return encoder.state, whole.state

    assert asyncio.run(run()) == (State.UNLOADED, State.READY)


def test_a_head_is_estimated_as_its_head_plus_an_unloaded_encoder(repository):
    registry = registry_of(repository, heads_fleet())
    encoder, head = registry.record("tiny-embed"), registry.record("tiny-topics")
    head_files = sum(head.manifest.path_of(r).stat().st_size for r in ("head", "tokenizer"))
    assert registry.needed_bytes(head) == int(head_files * 1.2) + registry.needed_bytes(encoder)
    assert head_files < head.manifest.size_bytes / 10  # not the whole graph's files


def test_a_head_shares_its_encoders_tokenizer_only_where_it_tokenizes_the_same(repository, tmp_path):
    """The same vocabulary and truncation: the encoder's own tokenizer (no copy, nothing to count);
    another truncation: a copy of its own; another vocabulary: refused with a reason."""
    encoder = load_runtime(repository.get("tiny-embed"), SessionSettings())  # truncates at 128
    weights, bias = np.ones((32, len(LABELS)), np.float32), np.zeros(len(LABELS), np.float32)
    graphs = {"model": specialists.minilm_classifier_graph(encoder.manifest.path_of("model"), weights, bias, 1.0),
              "head": specialists.head_graph(weights, bias, 1.0)}
    facts = {"input": specialists.HEAD_INPUT, "encoder": "tiny-embed", "pooling": "mean", "normalize": True}
    other_vocabulary = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    heads = ModelRepository(tmp_path / "models")
    for name, tokenizer, max_length in (("same", None, 128), ("shorter", None, 8),
                                        ("foreign", other_vocabulary, 128)):
        publish(heads, name, graphs, facts, tokenizer=tokenizer, max_length=max_length)

    same = load_runtime(heads.get("same"), SessionSettings(), encoder=encoder)
    assert same.tokenizer is encoder.tokenizer
    shorter = load_runtime(heads.get("shorter"), SessionSettings(), encoder=encoder)
    assert shorter.tokenizer is not encoder.tokenizer
    long_text = " ".join(["cat"] * 50)
    assert len(shorter.tokenizer.encode(long_text).ids) == 8 < len(encoder.tokenizer.encode(long_text).ids)
    with pytest.raises(ValueError, match="its tokenizer is not tiny-embed.*a head must be trained on its encoder's tokens"):
        load_runtime(heads.get("foreign"), SessionSettings(), encoder=encoder)


def test_a_model_without_a_head_graph_is_refused_with_a_reason(repository, tmp_path):
    repository_b = ModelRepository(tmp_path / "models")
    build_tiny_encoder(repository_b, "tiny-embed")
    encoder = repository_b.get("tiny-embed")
    whole_only = specialists.minilm_classifier_graph(encoder.path_of("model"), np.ones((32, 5), np.float32),
                                                     np.zeros(5, np.float32), 1.0)
    publish(repository_b, "tiny-topics", {"model": whole_only})

    async def run():
        registry = registry_of(repository_b, heads_fleet())
        await registry.ensure_loaded("tiny-topics")

    with pytest.raises(Unavailable, match="has no `head` graph to run on tiny-embed"):
        asyncio.run(run())


def test_config_check_names_a_bad_encoder(tmp_path):
    path = tmp_path / "mirador.yaml"
    path.write_text("""
fleet:
  enc: {task: embedding}
  gen: {task: text-generation}
  ok: {task: classification, encoder: enc}
  missing: {task: classification, encoder: nobody}
  wrong: {task: classification, encoder: gen}
  notahead: {task: embedding, encoder: enc}
routes:
  r: {primary: gen}
""")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert "fleet.missing.encoder: model `nobody` is not in `fleet:`; embedding models defined: enc, notahead" in text
    assert "fleet.wrong.encoder: `gen` has task text-generation; a head runs on an embedding model" in text
    assert "fleet.notahead.encoder: only classification models run as a head on an encoder" in text
    assert "fleet.ok" not in text


def test_the_cache_computes_each_key_once_even_for_callers_at_the_same_time():
    cache = EmbeddingCache(capacity=3)
    computed = []
    gate = threading.Event()

    def compute(rows):
        computed.append(rows)
        gate.wait(5)
        return np.array([[float(sum(row))] for row in rows], np.float32)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute([[1, 2]], compute)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert computed == [[[1, 2]]] and [r.tolist() for r in results] == [[[3.0]]] * 4
    assert cache.get_or_compute([[1], [2], [1], [3]], compute).ravel().tolist() == [1, 2, 1, 3]
    assert computed[-1] == [[1], [2], [3]]  # a key repeated in one call is computed once
    cache.get_or_compute([[4]], compute)
    assert len(cache) == 3  # bounded: the least recently used went
    cache.get_or_compute([[1, 2]], compute)
    assert computed[-1] == [[1, 2]]  # it was the one evicted


# --------------------------------------------------------------------------- the real fleet

REAL_FLEET = """
fleet:
  minilm-l6: {task: embedding, tier: hot}
  topics-minilm: {task: classification, tier: warm, encoder: minilm-l6}
  topics-minilm-b: {task: classification, tier: warm, encoder: minilm-l6}
  topics-minilm-whole: {task: classification, tier: warm}
routes:
  topics: {primary: topics-minilm, validators: [topics-minilm-b], options: [business, sports]}
"""
REAL_TEXTS = [
    "The central bank raised interest rates by half a point to curb inflation, and shares fell.",
    "The midfielder signed a three-year contract and will make his debut in Saturday's derby.",
    "The prime minister faced questions in parliament over the election pledge on taxes.",
    "The film's lead actress won the award at the festival for her role as a jazz singer.",
    "Broadband speeds will double as the operator upgrades its network, with new handsets next year.",
    "hello",
]


@pytest.mark.real_model
def test_real_topics_heads_share_one_minilm_and_score_as_the_whole_graph(tmp_path):
    repository = ModelRepository()
    try:
        manifest = repository.get("topics-minilm")
        repository.get("minilm-l6")
    except ModelNotFoundError as exc:
        pytest.skip(f"the real fleet is not built ({exc}); run `mirador fleet build`")
    if "head" not in manifest.files:
        pytest.skip("topics-minilm was built before heads existed; run `mirador fleet build`")
    # topics-minilm-b: a second head of the same artefact (the fleet has one minilm specialist);
    # topics-minilm-whole: the same model as one whole graph, the encoder inside it
    config_path = write_config(tmp_path, body=REAL_FLEET)
    # The two extra names are the same repository model: a repository of links points them at its files.
    links = tmp_path / "repo"
    for name, source in (("minilm-l6", "minilm-l6"), ("topics-minilm", "topics-minilm"),
                         ("topics-minilm-b", "topics-minilm"), ("topics-minilm-whole", "topics-minilm")):
        built = repository.get(source)
        folder = links / name / built.version
        folder.mkdir(parents=True)
        for file in built.files.values():
            (folder / file).symlink_to(built.directory / file)
        (folder / "manifest.json").write_text(json.dumps({**built.to_dict(), "name": name}))
    config_path.write_text(config_path.read_text().replace(f"model_repository: {tmp_path / 'models'}",
                                                           f"model_repository: {links}"))
    mesh = Mesh(load_config(config_path), log_dir=tmp_path / "logs", services=("model_host",),
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    mesh.start(timeout_s=120)
    try:
        with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            for name in ("topics-minilm", "topics-minilm-b", "topics-minilm-whole"):
                stub.LoadModel(model_host_pb2.LoadModelRequest(model=name), timeout=120)
            options = list(manifest.generation["labels"])

            def probabilities(model):
                rows = []
                for text in REAL_TEXTS:
                    reply = stub.Score(model_host_pb2.ScoreRequest(model=model, prompt=text, options=options),
                                       timeout=60)
                    rows.append([l.probability for l in reply.confidence.label_distribution])
                return np.array(rows)

            by_head, by_whole = probabilities("topics-minilm"), probabilities("topics-minilm-whole")
            np.testing.assert_allclose(by_head, by_whole, atol=1e-5)
            assert [options[i] for i in by_head.argmax(axis=1)[:5]] == \
                ["business", "sports", "politics", "entertainment", "tech"]
            np.testing.assert_allclose(probabilities("topics-minilm-b"), by_head, atol=1e-6)
            sizes = {m.name: m.memory_bytes / MB
                     for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}
    finally:
        mesh.stop()
    print("\nmemory counted against the budget (MB):", {k: round(v, 1) for k, v in sizes.items()})
    encoder = sizes["minilm-l6"]
    assert sizes["topics-minilm"] < 0.05 * encoder and sizes["topics-minilm-b"] < 0.05 * encoder
    assert sizes["topics-minilm-whole"] > 0.5 * encoder  # the whole graph carries its own encoder
    # minilm-l6 + two specialists: one encoder's memory plus heads, where whole graphs cost one encoder each
    assert sizes["minilm-l6"] + sizes["topics-minilm"] + sizes["topics-minilm-b"] < 1.1 * encoder



def test_a_consensus_fan_out_to_two_heads_embeds_each_text_once(repository):
    """Real processes: a model host and a consensus; the Decide asks both heads about one text."""
    import urllib.request

    from conftest import free_port
    from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc

    metrics_port = free_port()
    body = f"""
fleet:
  tiny-embed: {{task: embedding, tier: hot}}
  tiny-topics: {{task: classification, tier: warm, encoder: tiny-embed}}
  tiny-other: {{task: classification, tier: warm, encoder: tiny-embed}}
routes:
  topics: {{primary: tiny-topics, validators: [tiny-other], consensus_threshold: 0.1, options: [{', '.join(LABELS)}]}}
"""
    directory = repository.root.parent
    config = load_config(write_config(directory, service_extra={"model_host": f"metrics_port: {metrics_port}"},
                                      body=body))
    mesh = Mesh(config, log_dir=directory / "logs", services=("model_host", "consensus"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start(timeout_s=60)

    def head_embeddings() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        return {line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith('mirador_model_head_embeddings_total{encoder="tiny-embed"')}

    try:
        with grpc.insecure_channel(config.services.consensus.address) as channel:
            stub = consensus_pb2_grpc.ConsensusStub(channel)
            for text in TEXTS[:2]:
                request = consensus_pb2.DecideRequest(
                    route="topics", models=["tiny-topics", "tiny-other"], options=LABELS, consensus_threshold=0.1,
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)])
                votes = [r.vote for r in stub.Decide(request, timeout=30) if r.HasField("vote")]
                assert sorted(v.model for v in votes) == ["tiny-other", "tiny-topics"]
                assert all(not v.error for v in votes), [v.error for v in votes]
        assert head_embeddings() == {"computed": 2.0, "reused": 2.0}  # one encoder run per text, for both heads
    finally:
        mesh.stop()
