"""The model repository: the one place that reads and writes model artefacts.

Layout on disk::

    <root>/<model_name>/<version>/manifest.json
    <root>/<model_name>/<version>/model.onnx        (+ model.onnx_data if external)
    <root>/<model_name>/<version>/tokenizer.json    (if the model has one)
    <root>/.staging/...                              (builds in progress, never listed)

Writers (the fleet builder, the quantizer) publish a version through
`ModelRepository.staging`, which renames a finished folder into place, so a reader
never sees a half-written model. Readers (the model host) use `get` and
`list_models`. A user may also drop a folder with a hand-written manifest.json;
only `task` and `files` (with a "model" role) are required in that case.

This module is on the serving path: it imports only the standard library.

Why one module of ~520 lines: the manifest's format, its checks and the repository's atomic
writes (staging, locks, integrity) are one contract; every reader and writer goes through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
STAGING_DIRNAME = ".staging"
ENV_REPOSITORY_ROOT = "MIRADOR_MODEL_REPOSITORY"

TASKS = ("text-generation", "embedding", "classification")
MODEL_ROLE = "model"
TOKENIZER_ROLE = "tokenizer"

# Names become folder names: keep them portable and free of path tricks.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------- errors


class ModelRepositoryError(Exception):
    """Base class of every error this module raises."""


class ModelNotFoundError(ModelRepositoryError, LookupError):
    def __init__(self, name: str, version: str | None, root: Path, available: list[str]):
        self.name, self.version, self.root, self.available = name, version, root, available
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        hint = f"available: {', '.join(available)}" if available else "the repository holds no such model"
        super().__init__(f"{what} not found in model repository {root} ({hint})")


class ModelVersionExistsError(ModelRepositoryError, FileExistsError):
    def __init__(self, name: str, version: str, path: Path):
        self.name, self.version, self.path = name, version, path
        super().__init__(
            f"model {name!r} version {version!r} already exists at {path}; "
            "choose another version or pass replace=True"
        )


class ManifestError(ModelRepositoryError, ValueError):
    """A manifest is malformed. Says which file, which key, and what is allowed."""

    def __init__(self, source: str | Path | None, key: str | None, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = str(source) if source else "manifest"
        at = f", key {key!r}" if key else ""
        super().__init__(f"{where}{at}: {problem}")


class IntegrityError(ModelRepositoryError):
    """Files on disk do not match the checksums recorded in the manifest."""

    def __init__(self, manifest_path: Path | None, problems: list[str]):
        self.manifest_path, self.problems = manifest_path, problems
        super().__init__(f"{manifest_path or 'model'} failed verification: " + "; ".join(problems))


# ------------------------------------------------------------------------ manifest


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class ModelManifest:
    """What a model folder holds, and what serving needs to know to run it.

    `generation` carries facts a serving loop needs without transformers, e.g.
    eos_token_ids, bos_token_id, chat_format / chat_template, num_layers,
    num_kv_heads, head_dim, input_names, output_names, past_key_values naming,
    and for encoders pooling ("mean") and normalize (true).
    """

    name: str
    version: str
    task: str
    files: dict[str, str]
    architecture: str = "unknown"
    size_bytes: int = 0
    sha256: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "user"})
    licence: str = "unknown"
    created_at: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the manifest was read from; not serialised.
    directory: Path | None = field(default=None, compare=False, repr=False)

    _SERIALISED = (
        "name", "version", "task", "architecture", "files", "size_bytes", "sha256",
        "source", "licence", "created_at", "generation", "extra",
    )
    _REQUIRED = ("task", "files")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._SERIALISED}

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        origin: str | Path | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> "ModelManifest":
        """Validate and build a manifest. `defaults` fills keys the data leaves out
        (the repository passes the folder's name and version)."""
        if not isinstance(data, Mapping):
            raise ManifestError(origin, None, f"expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls._SERIALISED))
        if unknown:
            raise ManifestError(
                origin, unknown[0], f"unknown key; allowed keys are {', '.join(cls._SERIALISED)}"
            )
        merged = {**(defaults or {}), **data}
        for key in ("name", "version", *cls._REQUIRED):
            if key not in merged:
                raise ManifestError(origin, key, "required key is missing")

        def expect(key: str, kind: type, what: str) -> Any:
            value = merged[key]
            if not isinstance(value, kind):
                raise ManifestError(origin, key, f"expected {what}, got {_show(value)}")
            return value

        name = expect("name", str, "a string")
        if not _NAME_PATTERN.match(name):
            raise ManifestError(origin, "name", f"{name!r} is not allowed; use letters, digits, '.', '_' or '-'")
        version = merged["version"]
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)  # hand-written manifests often say "version": 1
        if not isinstance(version, str) or not _NAME_PATTERN.match(version):
            raise ManifestError(origin, "version", f"{version!r} is not allowed; use a string such as \"1\"")
        task = expect("task", str, "a string")
        if task not in TASKS:
            raise ManifestError(origin, "task", f"{task!r} is not a task; allowed: {', '.join(TASKS)}")
        files = expect("files", dict, 'an object mapping role to file name, e.g. {"model": "model.onnx"}')
        if MODEL_ROLE not in files:
            raise ManifestError(origin, "files", f'needs a {MODEL_ROLE!r} role, e.g. {{"model": "model.onnx"}}')
        for role, filename in files.items():
            _check_relative_filename(origin, f"files.{role}", filename)
        sha256 = merged.get("sha256", {})
        if not isinstance(sha256, dict):
            raise ManifestError(origin, "sha256", "expected an object mapping file name to hex digest")
        for filename, digest in sha256.items():
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise ManifestError(origin, f"sha256.{filename}", "expected 64 lowercase hex characters")
        size = merged.get("size_bytes", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(origin, "size_bytes", f"expected a non-negative integer, got {_show(size)}")
        for key in ("architecture", "licence", "created_at"):
            if key in merged:
                expect(key, str, "a string")
        for key in ("source", "generation", "extra"):
            if key in merged:
                expect(key, dict, "an object")
        kwargs = {key: merged[key] for key in cls._SERIALISED if key in merged}
        kwargs["version"] = version
        return cls(**kwargs)

    def with_updates(self, **changes: Any) -> "ModelManifest":
        return dataclasses.replace(self, **changes)

    def path_of(self, role: str) -> Path:
        """Absolute path of the file playing `role` ("model", "tokenizer", ...)."""
        if self.directory is None:
            raise ModelRepositoryError(f"manifest of {self.name!r} was not read from a repository folder")
        if role not in self.files:
            raise KeyError(f"model {self.name!r} has no {role!r} file; it has {', '.join(self.files)}")
        return self.directory / self.files[role]

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.version}"


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_relative_filename(origin: str | Path | None, key: str, filename: Any) -> None:
    if not isinstance(filename, str) or not filename:
        raise ManifestError(origin, key, f"expected a file name, got {_show(filename)}")
    parts = Path(filename).parts
    if Path(filename).is_absolute() or ".." in parts or filename.startswith("~"):
        raise ManifestError(origin, key, f"{filename!r} must be a path relative to the model folder")


def sha256_of_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _version_sort_key(version: str) -> tuple:
    # "10" sorts after "9"; non-numeric parts sort after numeric ones.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._-]", version))


def default_repository_root() -> Path:
    if os.environ.get(ENV_REPOSITORY_ROOT):
        return Path(os.environ[ENV_REPOSITORY_ROOT]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "mirador" / "models"


# --------------------------------------------------------------------- repository


@dataclass
class RepositoryScan:
    """Every readable manifest, and every folder whose manifest could not be read."""

    manifests: list[ModelManifest]
    errors: list[ModelRepositoryError]


class StagedVersion:
    """A folder being built. Write files into `path`, then set `manifest`.

    The repository fills name, version, size_bytes, sha256 and created_at when it
    publishes; everything else comes from the manifest given here."""

    def __init__(self, name: str, version: str, path: Path):
        self.name, self.version, self.path = name, version, path
        self.manifest: ModelManifest | None = None
        self.published: ModelManifest | None = None


class ModelRepository:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_repository_root()

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    # ---- reading

    def model_dir(self, name: str, version: str) -> Path:
        _check_name("model name", name)
        _check_name("version", version)
        return self.root / name / version

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        """Versions of `name` that have a manifest, oldest first."""
        folder = self.root / name
        if not _NAME_PATTERN.match(name) or not folder.is_dir():
            return []
        found = [
            p.name for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILENAME).is_file()
        ]
        return sorted(found, key=_version_sort_key)

    def get(self, name: str, version: str | None = None) -> ModelManifest:
        """The manifest of `name` at `version` (latest readable version if None)."""
        versions = self.versions(name)
        if version is not None:
            version = str(version)
            if version not in versions:
                available = [f"{name}:{v}" for v in versions] or self.model_names()
                raise ModelNotFoundError(name, version, self.root, available)
            return self.read_manifest(self.root / name / version)
        if not versions:
            raise ModelNotFoundError(name, None, self.root, self.model_names())
        last_error: ModelRepositoryError | None = None
        for candidate in reversed(versions):
            try:
                return self.read_manifest(self.root / name / candidate)
            except ModelRepositoryError as error:
                log.warning("skipping unreadable version: %s", error)
                last_error = error
        assert last_error is not None
        raise last_error

    def exists(self, name: str, version: str | None = None) -> bool:
        versions = self.versions(name)
        return bool(versions) if version is None else str(version) in versions

    def scan(self) -> RepositoryScan:
        manifests, errors = [], []
        for name in self.model_names():
            folders = [p for p in (self.root / name).iterdir() if p.is_dir() and not p.name.startswith(".")]
            for folder in sorted(folders, key=lambda p: _version_sort_key(p.name)):
                try:
                    manifests.append(self.read_manifest(folder))
                except ModelRepositoryError as error:
                    errors.append(error)
        return RepositoryScan(manifests, errors)

    def list_models(self, all_versions: bool = False) -> list[ModelManifest]:
        """Latest readable version of each model (every version if all_versions).

        Broken folders are logged and left out; `scan()` returns them."""
        scan = self.scan()
        for error in scan.errors:
            log.warning("model repository: %s", error)
        if all_versions:
            return scan.manifests
        latest: dict[str, ModelManifest] = {}
        for manifest in scan.manifests:  # oldest first within each name
            latest[manifest.name] = manifest
        return list(latest.values())

    def read_manifest(self, version_dir: Path) -> ModelManifest:
        path = version_dir / MANIFEST_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(
                path, None,
                'file is missing; a model folder needs one with at least "task" and "files", '
                'e.g. {"task": "embedding", "files": {"model": "model.onnx"}}',
            ) from None
        except json.JSONDecodeError as error:
            raise ManifestError(path, None, f"not valid JSON: {error}") from None
        defaults = {"name": version_dir.parent.name, "version": version_dir.name}
        manifest = ModelManifest.from_dict(data, origin=path, defaults=defaults)
        for key in ("name", "version"):
            if getattr(manifest, key) != defaults[key]:
                raise ManifestError(
                    path, key,
                    f"says {getattr(manifest, key)!r} but the folder is {defaults[key]!r}; "
                    "make them equal or leave the key out",
                )
        missing = [f for f in manifest.files.values() if not (version_dir / f).is_file()]
        if missing:
            raise ManifestError(path, "files", f"listed file(s) not in {version_dir}: {', '.join(missing)}")
        if not manifest.size_bytes:  # hand-written manifests may leave it out
            manifest.size_bytes = _folder_payload_size(version_dir, manifest.files.values())
        manifest.directory = version_dir
        return manifest

    def verify(self, manifest: ModelManifest) -> list[str]:
        """Check recorded checksums and sizes. Returns the files verified;
        raises IntegrityError naming every file that is missing or differs."""
        folder = manifest.directory or self.model_dir(manifest.name, manifest.version)
        problems, verified = [], []
        for filename, expected in sorted(manifest.sha256.items()):
            path = folder / filename
            if not path.is_file():
                problems.append(f"{filename} is missing")
                continue
            actual = sha256_of_file(path)
            if actual != expected:
                problems.append(f"{filename} has sha256 {actual[:12]}…, manifest says {expected[:12]}…")
            else:
                verified.append(filename)
        if problems:
            raise IntegrityError(folder / MANIFEST_FILENAME, problems)
        return verified

    # ---- writing

    @contextlib.contextmanager
    def staging(self, name: str, version: str, *, replace: bool = False) -> Iterator[StagedVersion]:
        """Build a version in a private folder; publish it atomically on success.

        On an exception (or if no manifest was set) the folder is deleted and the
        repository is left as it was."""
        target = self.model_dir(name, version)
        if target.exists() and not replace:
            raise ModelVersionExistsError(name, version, target)
        staging_root = self.root / STAGING_DIRNAME
        staging_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"p{os.getpid()}-{name}-{version}-", dir=staging_root))
        # mkdtemp makes the folder private (0700); a published model must be readable
        # by a model host running as another user.
        os.chmod(work, 0o755)
        staged = StagedVersion(name, version, work)
        try:
            yield staged
            if staged.manifest is None:
                raise ModelRepositoryError(f"staging of {name}:{version} finished without setting a manifest")
            staged.published = self._publish(staged, target, replace)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def write_version(
        self,
        name: str,
        version: str,
        build: Callable[[Path], ModelManifest],
        *,
        replace: bool = False,
    ) -> ModelManifest:
        """Run `build(folder)`, which writes files and returns a manifest; publish."""
        with self.staging(name, version, replace=replace) as staged:
            staged.manifest = build(staged.path)
        assert staged.published is not None
        return staged.published

    def delete_version(self, name: str, version: str) -> None:
        target = self.model_dir(name, version)
        if not target.exists():
            raise ModelNotFoundError(name, version, self.root, [f"{name}:{v}" for v in self.versions(name)])
        self._move_aside_and_delete(target)
        with contextlib.suppress(OSError):
            target.parent.rmdir()  # only succeeds when no version is left

    def remove_abandoned_staging(self) -> list[Path]:
        """Delete staging folders whose builder process is gone (killed mid-build).

        Staging folders carry their creator's pid; this assumes one host per root."""
        staging_root = self.root / STAGING_DIRNAME
        removed = []
        for entry in sorted(staging_root.iterdir()) if staging_root.is_dir() else []:
            match = re.match(r"^p(\d+)-", entry.name)
            if match and _process_alive(int(match.group(1))):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        return removed

    def _publish(self, staged: StagedVersion, target: Path, replace: bool) -> ModelManifest:
        assert staged.manifest is not None
        folder = staged.path
        files = staged.manifest.files
        origin = f"manifest for {staged.name}:{staged.version}"
        missing = [f for f in files.values() if not (folder / f).is_file()]
        if missing:
            raise ManifestError(origin, "files", f"listed file(s) were not written: {', '.join(missing)}")
        payload = _payload_files(folder, files.values())
        manifest = staged.manifest.with_updates(
            name=staged.name,
            version=staged.version,
            size_bytes=sum((folder / f).stat().st_size for f in payload),
            sha256={f: sha256_of_file(folder / f) for f in payload},
            created_at=staged.manifest.created_at or _utc_now(),
        )
        # Round-trip through validation so a writer cannot publish what readers reject.
        manifest = ModelManifest.from_dict(manifest.to_dict(), origin=origin)
        manifest_path = folder / MANIFEST_FILENAME
        with open(manifest_path, "w", encoding="utf-8") as handle:
            json.dump(manifest.to_dict(), handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if not replace:
                raise ModelVersionExistsError(staged.name, staged.version, target)
            self._move_aside_and_delete(target)
        os.rename(folder, target)  # atomic on one filesystem; staging lives under root
        manifest.directory = target
        return manifest

    def _move_aside_and_delete(self, folder: Path) -> None:
        # Rename first so readers never see a half-deleted version.
        staging_root = self.root / STAGING_DIRNAME
        staging_root.mkdir(parents=True, exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix=f"p{os.getpid()}-deleted-", dir=staging_root))
        os.rename(folder, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_PATTERN.match(value):
        raise ValueError(f"{what} {value!r} is not allowed; use letters, digits, '.', '_' or '-'")


def _payload_files(folder: Path, listed: Any) -> list[str]:
    """Files whose checksums go in the manifest: the listed files plus any companions
    (e.g. model.onnx_data) that sit beside them, excluding the manifest itself."""
    names = {str(Path(p.relative_to(folder))) for p in folder.rglob("*") if p.is_file()}
    names.discard(MANIFEST_FILENAME)
    return sorted(names | set(listed))


def _folder_payload_size(folder: Path, listed: Any) -> int:
    return sum((folder / f).stat().st_size for f in _payload_files(folder, listed))
