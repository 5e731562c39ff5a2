"""The model repository contract: layout, manifests, atomic publishing, integrity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.model_repository import (
    MANIFEST_FILENAME,
    STAGING_DIRNAME,
    IntegrityError,
    ManifestError,
    ModelManifest,
    ModelNotFoundError,
    ModelRepository,
    ModelVersionExistsError,
    default_repository_root,
)

onnx = pytest.importorskip("onnx")


def write_tiny_onnx(path: Path) -> None:
    """A 2x2 MatMul model: enough to be a real ONNX file with weights."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    weight = numpy_helper.from_array(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph), str(path))


def tiny_manifest(**changes) -> ModelManifest:
    fields = dict(name="tiny", version="1", task="embedding", architecture="matmul",
                  files={"model": "model.onnx"}, generation={"pooling": "mean", "normalize": True})
    fields.update(changes)
    return ModelManifest(**fields)


def publish_tiny(repository: ModelRepository, name: str = "tiny", version: str = "1") -> ModelManifest:
    def build(folder: Path) -> ModelManifest:
        write_tiny_onnx(folder / "model.onnx")
        return tiny_manifest(name=name, version=version)

    return repository.write_version(name, version, build)


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRADOR_MODEL_REPOSITORY", str(tmp_path / "explicit"))
    assert default_repository_root() == tmp_path / "explicit"
    monkeypatch.delenv("MIRADOR_MODEL_REPOSITORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_repository_root() == tmp_path / "xdg" / "mirador" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_repository_root() == tmp_path / "home" / ".cache" / "mirador" / "models"


def test_write_then_read_back(repository):
    published = publish_tiny(repository)
    folder = repository.model_dir("tiny", "1")
    assert published.directory == folder
    assert (folder / MANIFEST_FILENAME).is_file()
    assert set(published.sha256) == {"model.onnx"}
    assert published.size_bytes == (folder / "model.onnx").stat().st_size
    assert published.created_at.endswith("Z")

    again = repository.get("tiny")
    assert again == published
    assert again.path_of("model") == folder / "model.onnx"
    assert onnx.load(str(again.path_of("model"))).graph.node[0].op_type == "MatMul"
    assert repository.verify(again) == ["model.onnx"]
    assert [m.reference for m in repository.list_models()] == ["tiny:1"]


def test_manifest_round_trips_through_dict():
    manifest = tiny_manifest(source={"package": "p", "version": "1", "file": "f"}, extra={"k": [1, 2]})
    assert ModelManifest.from_dict(manifest.to_dict()) == manifest
    assert json.loads(json.dumps(manifest.to_dict())) == manifest.to_dict()


def test_latest_version_and_all_versions(repository):
    for version in ("1", "2", "10"):
        publish_tiny(repository, version=version)
    publish_tiny(repository, name="other")
    assert repository.versions("tiny") == ["1", "2", "10"]
    assert repository.get("tiny").version == "10"
    assert repository.get("tiny", "2").version == "2"
    assert sorted(m.reference for m in repository.list_models()) == ["other:1", "tiny:10"]
    assert len(repository.list_models(all_versions=True)) == 4


def test_missing_model_names_what_exists(repository):
    publish_tiny(repository)
    with pytest.raises(ModelNotFoundError, match="'tiny' version '7'.*tiny:1"):
        repository.get("tiny", "7")
    with pytest.raises(ModelNotFoundError, match="'nope'.*available: tiny"):
        repository.get("nope")
    with pytest.raises(LookupError):  # callers may catch the builtin
        repository.get("nope")


def test_failed_build_leaves_nothing(repository):
    def failing_build(folder: Path) -> ModelManifest:
        write_tiny_onnx(folder / "model.onnx")
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError, match="export crashed"):
        repository.write_version("tiny", "1", failing_build)
    assert not repository.exists("tiny")
    assert repository.list_models() == []
    assert list((repository.root / STAGING_DIRNAME).iterdir()) == []


def test_staging_is_invisible_until_complete(repository):
    with repository.staging("tiny", "1") as staged:
        write_tiny_onnx(staged.path / "model.onnx")
        assert staged.path.is_relative_to(repository.root)
        assert not repository.exists("tiny")
        assert repository.list_models() == []
        staged.manifest = tiny_manifest()
    assert repository.exists("tiny", "1")
    assert staged.published.directory == repository.model_dir("tiny", "1")


def test_staging_without_manifest_publishes_nothing(repository):
    with pytest.raises(Exception, match="without setting a manifest"):
        with repository.staging("tiny", "1") as staged:
            write_tiny_onnx(staged.path / "model.onnx")
    assert not repository.exists("tiny")


def test_staging_rejects_unwritten_files(repository):
    with pytest.raises(ManifestError, match="files.*tokenizer.json"):
        with repository.staging("tiny", "1") as staged:
            write_tiny_onnx(staged.path / "model.onnx")
            staged.manifest = tiny_manifest(files={"model": "model.onnx", "tokenizer": "tokenizer.json"})
    assert not repository.exists("tiny")


def test_existing_version_is_kept_unless_replaced(repository):
    first = publish_tiny(repository)
    with pytest.raises(ModelVersionExistsError, match="replace=True"):
        publish_tiny(repository)

    def build_bigger(folder: Path) -> ModelManifest:
        write_tiny_onnx(folder / "model.onnx")
        (folder / "model.onnx_data").write_bytes(b"\0" * 100)
        return tiny_manifest()

    second = repository.write_version("tiny", "1", build_bigger, replace=True)
    assert second.size_bytes == first.size_bytes + 100
    assert set(second.sha256) == {"model.onnx", "model.onnx_data"}  # companions are checksummed too
    assert repository.get("tiny", "1") == second


def test_verify_detects_tampering(repository):
    manifest = publish_tiny(repository)
    model_path = manifest.path_of("model")
    model_path.write_bytes(model_path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="model.onnx has sha256"):
        repository.verify(manifest)
    model_path.unlink()
    with pytest.raises(IntegrityError, match="model.onnx is missing"):
        repository.verify(manifest)


def test_hand_written_user_model_is_accepted(repository):
    folder = repository.root / "my-classifier" / "3"
    folder.mkdir(parents=True)
    write_tiny_onnx(folder / "model.onnx")
    (folder / "tokenizer.json").write_text("{}")
    (folder / MANIFEST_FILENAME).write_text(json.dumps({
        "task": "classification",
        "version": 3,  # people write numbers; the folder name is a string
        "files": {"model": "model.onnx", "tokenizer": "tokenizer.json"},
        "generation": {"labels": ["no", "yes"]},
    }))
    manifest = repository.get("my-classifier")
    assert (manifest.name, manifest.version, manifest.task) == ("my-classifier", "3", "classification")
    assert manifest.source == {"kind": "user"}
    assert manifest.size_bytes > 0  # computed since the user left it out
    assert repository.verify(manifest) == []  # nothing recorded, nothing to check
    assert [m.name for m in repository.list_models()] == ["my-classifier"]


@pytest.mark.parametrize(
    "content, key, message",
    [
        ({"files": {"model": "model.onnx"}}, "task", "required key is missing"),
        ({"task": "chat", "files": {"model": "model.onnx"}}, "task",
         "allowed: text-generation, embedding, classification"),
        ({"task": "embedding", "files": {"tokenizer": "tokenizer.json"}}, "files", "needs a 'model' role"),
        ({"task": "embedding", "files": {"model": "../elsewhere.onnx"}}, "files.model", "relative"),
        ({"task": "embedding", "files": {"model": "model.onnx"}, "modle": 1}, "modle", "allowed keys are name"),
        ({"task": "embedding", "files": {"model": "model.onnx"}, "size_bytes": "big"}, "size_bytes",
         "non-negative integer"),
        ({"task": "embedding", "files": {"model": "model.onnx"}, "name": "other"}, "name", "the folder is 'user'"),
        ({"task": "embedding", "files": {"model": "missing.onnx"}}, "files", "missing.onnx"),
        ({"task": "embedding", "files": {"model": "model.onnx"}, "sha256": {"model.onnx": "xyz"}},
         "sha256.model.onnx", "64 lowercase hex"),
    ],
)
def test_bad_manifest_names_file_key_and_allowed_values(repository, content, key, message):
    folder = repository.root / "user" / "1"
    folder.mkdir(parents=True)
    write_tiny_onnx(folder / "model.onnx")
    (folder / MANIFEST_FILENAME).write_text(json.dumps(content))
    with pytest.raises(ManifestError) as caught:
        repository.get("user")
    error = caught.value
    assert error.key == key
    assert str(folder / MANIFEST_FILENAME) in str(error)
    assert message in str(error)


def test_broken_folders_are_reported_not_fatal(repository):
    publish_tiny(repository)
    broken = repository.root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / MANIFEST_FILENAME).write_text("{not json")
    dropped = repository.root / "dropped" / "1"
    dropped.mkdir(parents=True)
    write_tiny_onnx(dropped / "model.onnx")  # no manifest at all

    scan = repository.scan()
    assert [m.name for m in scan.manifests] == ["tiny"]
    messages = sorted(str(e) for e in scan.errors)
    assert "not valid JSON" in messages[0]
    assert "file is missing" in messages[1] and '"task"' in messages[1]
    assert [m.name for m in repository.list_models()] == ["tiny"]


def test_newest_broken_version_falls_back_to_previous(repository):
    publish_tiny(repository, version="1")
    broken = repository.root / "tiny" / "2"
    broken.mkdir()
    (broken / MANIFEST_FILENAME).write_text(json.dumps({"task": "embedding", "files": {"model": "gone.onnx"}}))
    assert repository.get("tiny").version == "1"
    with pytest.raises(ManifestError, match="gone.onnx"):
        repository.get("tiny", "2")


def test_delete_version(repository):
    publish_tiny(repository, version="1")
    publish_tiny(repository, version="2")
    repository.delete_version("tiny", "2")
    assert repository.versions("tiny") == ["1"]
    repository.delete_version("tiny", "1")
    assert not (repository.root / "tiny").exists()


def test_names_cannot_escape_the_root(repository):
    with pytest.raises(ValueError, match="not allowed"):
        repository.model_dir("../etc", "1")
    with pytest.raises(ValueError, match="not allowed"):
        with repository.staging("tiny", "../../x"):
            pass


def test_abandoned_staging_of_a_dead_process_is_removed(repository):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    staging_root = repository.root / STAGING_DIRNAME
    (staging_root / f"p{dead_pid}-tiny-1-abc").mkdir(parents=True)
    (staging_root / f"p{dead_pid}-tiny-1-abc" / "model.onnx").write_bytes(b"half")
    with repository.staging("tiny", "2") as staged:  # a build in progress in this process
        removed = repository.remove_abandoned_staging()
        assert [p.name for p in removed] == [f"p{dead_pid}-tiny-1-abc"]
        assert staged.path.exists()
        write_tiny_onnx(staged.path / "model.onnx")
        staged.manifest = tiny_manifest(version="2")
    assert repository.versions("tiny") == ["2"]
