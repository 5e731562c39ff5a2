"""Builds a runtime from a manifest: an ONNX Runtime session with the configured
providers, the tokenizer, and the runtime class for the model's task.

The optimised graph is kept on disk (in the user cache, never in the model
repository, which the host only reads) so a reload skips graph optimisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.logs import log_event
from services.common.model_repository import ModelManifest
from services.model_host.runtimes import ModelRuntime
from services.model_host.runtimes.classifier import ClassifierRuntime, HeadClassifierRuntime
from services.model_host.runtimes.decoder import DecoderRuntime
from services.model_host.runtimes.encoder import EncoderRuntime
from services.model_host.runtimes.tokenizer_files import SharedTokenizers, TokenizerSource
from services.model_host.run_turns import TurnTakingSession
from services.model_host.settings import SPINNING_MODES

log = logging.getLogger("mirador.model_host.loader")
OPTIMIZE_NICENESS = 10  # graph optimisation (a first load) yields the CPU to serving and health checks


def default_optimized_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "mirador" / "optimized"


@dataclass(frozen=True)
class SessionSettings:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one per core)
    thread_spinning: str = "off"  # when idle intra-op threads spin: SPINNING_MODES (the host: ModelHostSettings)
    optimized_cache: Path | None = None  # None = do not keep optimised graphs
    # The host's tokenizers shared across models of the same tokenizer file (None = each reads its own)
    tokenizers: SharedTokenizers | None = None
    # Fault injection only (faults.py): called with the model's name once its session exists and
    # its optimised graph is written but not yet moved into the cache.
    during_load: Callable[[str], None] | None = None


def usable_providers(wanted: tuple[str, ...]) -> list[str]:
    """The configured providers this onnxruntime build has, CPU always last as the safety net."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def _optimized_path(manifest: ModelManifest, settings: SessionSettings, providers: list[str]) -> Path | None:
    if settings.optimized_cache is None or manifest.directory is None:
        return None
    # The optimised graph may hold hardware-specific layouts: key it by everything that shapes it.
    key = "|".join([manifest.sha256.get(manifest.files["model"], manifest.created_at), ort.__version__,
                    platform.machine(), platform.processor(), ",".join(providers)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.optimized_cache / manifest.name / manifest.version / f"model.{digest}.onnx"


def create_session(manifest: ModelManifest, settings: SessionSettings) -> ort.InferenceSession:
    session = _open_session(manifest, settings)
    return TurnTakingSession(session) if settings.thread_spinning == "in_turn" else session


def _open_session(manifest: ModelManifest, settings: SessionSettings) -> ort.InferenceSession:
    providers = usable_providers(settings.providers)
    model_path = manifest.path_of("model")
    external_data = any(p.suffix == ".onnx_data" or p.name.endswith(".data") for p in model_path.parent.iterdir())
    cached = None if external_data else _optimized_path(manifest, settings, providers)
    for _ in range(2 if cached is not None else 0):  # a bad cache entry is written again, once
        if not cached.exists():
            _write_optimized(manifest, model_path, cached, settings, providers)
        if not cached.exists():
            break  # ORT could not write it (too big for one protobuf, say): serve the original
        options = _options(settings)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a bad cache entry must never block a load
            log_event(log, "optimized graph unusable, rebuilding", logging.WARNING, path=str(cached), error=repr(exc))
            cached.unlink(missing_ok=True)
    session = ort.InferenceSession(str(model_path), _options(settings), providers=providers)
    if settings.during_load is not None:
        settings.during_load(manifest.name)
    return session


def _options(settings: SessionSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    spinning = settings.thread_spinning
    if spinning not in SPINNING_MODES:
        raise ValueError(f"thread_spinning `{spinning}` is not one of {', '.join(SPINNING_MODES)}")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "off" else "1")
    if spinning in ("during_runs", "in_turn"):
        # No wake-up per operator inside a run (hundreds per decode step), no core held between runs.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # warnings about optimised-graph portability are handled by the cache key
    return options


def _write_optimized(manifest: ModelManifest, model_path: Path, cached: Path, settings: SessionSettings,
                     providers: list[str]) -> None:
    """Optimises the graph once and writes it to the cache. The optimising session is dropped,
    not served: it holds scratch memory a session opened from the written graph does not,
    and the model's measured size must be what every later load will hold."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(cached)
    # Written under a name of its own and renamed into place (atomic): a crash mid-write
    # leaves only a .partial file, never a truncated graph under the cache's name.
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    options = _options(settings)
    options.optimized_model_filepath = str(partial)

    def optimize() -> None:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
        if settings.during_load is not None:
            settings.during_load(manifest.name)
        del session

    _at_low_priority(optimize)
    if partial.exists():
        os.replace(partial, cached)


def _at_low_priority(work: Callable[[], None]) -> None:
    """Runs `work` on a thread of its own at a lower CPU priority (Linux: nice +OPTIMIZE_NICENESS for that
    thread, and the threads ONNX Runtime starts from it). Optimising and writing a big graph takes seconds
    of CPU (6 s of a 519 MB graph's 7.6 s first load); on a busy machine, at normal priority, it left the
    host's event loop waiting for a core and health checks went unanswered. The optimising session is
    dropped, so no serving thread keeps the lower priority."""
    if not sys.platform.startswith("linux"):
        return work()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with contextlib.suppress(OSError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), OPTIMIZE_NICENESS))
            work()
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="optimize graph")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _remove_stale_partials(cached: Path) -> None:
    """Deletes the .partial graphs of `cached` left by processes that died while writing them
    (kill -9 mid-load): nothing else would, and each is as big as the model."""
    for partial in cached.parent.glob(f"{cached.stem}.*.partial"):
        pid = partial.name[len(cached.stem) + 1:-len(".partial")]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        partial.unlink(missing_ok=True)
        log_event(log, "removed an optimized graph a crashed process left half-written", logging.WARNING,
                  path=str(partial))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _encoders_tokenizer_file(manifest: ModelManifest, encoder: EncoderRuntime | None) -> bool:
    """Whether a head's tokenizer file is its encoder's, but for the truncation and padding settings
    that every runtime sets for itself: then the head shares the encoder's tokenizer without building
    its own (the heap a throwaway tokenizer leaves behind was counted as the head's size)."""
    if encoder is None or "tokenizer" not in manifest.files or "tokenizer" not in encoder.manifest.files:
        return False

    def vocabulary_on(path) -> bytes:
        # tokenizer.json is written key by key: version, truncation, padding, then what the vocabulary is
        text = path.read_bytes()
        start = text.find(b'"added_tokens"')
        return text[start:] if start >= 0 else text

    return vocabulary_on(manifest.path_of("tokenizer")) == vocabulary_on(encoder.manifest.path_of("tokenizer"))


def load_runtime(manifest: ModelManifest, settings: SessionSettings,
                 encoder: EncoderRuntime | None = None) -> ModelRuntime:
    """Loads a model for serving. Raises with a readable reason when the files are unusable.
    With `encoder` (a classifier declared as a head on it), only the manifest's `head` graph is loaded."""
    if manifest.task in ("text-generation", "embedding", "classification") and "tokenizer" not in manifest.files:
        raise ValueError(f"{manifest.reference} has no tokenizer file; add `tokenizer` to the manifest's files")
    if encoder is not None:
        if manifest.task != "classification" or "head" not in manifest.files:
            raise ValueError(f"{manifest.reference} has no `head` graph to run on {encoder.manifest.reference}; "
                             "rebuild it (`mirador fleet build`) or remove `encoder:` from its fleet entry")
        tokenizer = None if _encoders_tokenizer_file(manifest, encoder) else \
            Tokenizer.from_file(str(manifest.path_of("tokenizer")))
        options = _options(settings)
        options.intra_op_num_threads = 1  # one small MatMul: a thread pool costs more than it saves
        session = ort.InferenceSession(str(manifest.path_of("head")), options,
                                       providers=usable_providers(settings.providers))
        return HeadClassifierRuntime(manifest, session, tokenizer, encoder)
    runtime_class = {"text-generation": DecoderRuntime, "embedding": EncoderRuntime,
                     "classification": ClassifierRuntime}.get(manifest.task)
    if runtime_class is None:
        raise ValueError(f"{manifest.reference}: serving `{manifest.task}` models is not supported yet")
    session = create_session(manifest, settings)
    tokenizers = _tokenizer_source(manifest, settings)
    try:
        runtime = runtime_class(manifest, session, tokenizers)
    except BaseException:
        tokenizers.release()
        raise
    runtime.on_close(tokenizers.release)
    return runtime


def _tokenizer_source(manifest: ModelManifest, settings: SessionSettings) -> TokenizerSource:
    """The model's tokenizer file, shared with the host's other models of the same file where the
    settings give a table of shared tokenizers and the manifest the file's digest."""
    path = manifest.path_of("tokenizer")
    digest = manifest.sha256.get(manifest.files["tokenizer"])
    if settings.tokenizers is not None and digest:
        return settings.tokenizers.source(path, digest)
    return TokenizerSource(Tokenizer.from_file(str(path)))
