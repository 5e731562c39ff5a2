"""llama.cpp as a peer, built from the sources vendored in llama-cpp-python's sdist (PyPI only).

`ensure_binaries()` downloads the sdist (`pip download --no-binary`), builds `llama-server`,
`llama-bench` and `llama-quantize` with cmake (~6 min on 2 cores), and caches them in
`~/.cache/mirador/peers/llama.cpp-<version>/`. `ensure_gguf(kind)` writes the SmolLM2 GGUF at
Q8_0 / Q4_1 next to them (`llama-quantize --allow-requantize` from the package's Q4_1 file:
lossy from Q4_1, fine for speed; Q4_1 is the package file itself).

CLI: ``python -m bench.peers.llama_cpp`` builds everything and prints the paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is what gets built
BUILD = 2  # bump when the build flags change: a new cache folder
TARGETS = ("llama-server", "llama-bench", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON",
    # The web UI is downloaded at build time by default: off, offline.
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    # Native code, but no AMX tiles: a CPU can advertise AMX while the (virtual) machine traps its
    # instructions (seen here: SIGILL on `tilezero` in a Xeon VM). AVX-512/VNNI stay on where present.
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
)


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "mirador" / "peers" / f"llama.cpp-{VERSION}-b{BUILD}"


def binary(name: str) -> Path:
    return cache_dir() / "bin" / name


def ensure_binaries(log=print) -> Path:
    """The folder holding llama-server / llama-bench / llama-quantize, built once."""
    bin_dir = cache_dir() / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    if not shutil.which("cmake"):
        raise SystemExit("building llama.cpp needs cmake (apt-get install cmake)")
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as scratch:
        scratch = Path(scratch)
        log(f"[llama.cpp] downloading llama-cpp-python=={VERSION} (sdist) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(scratch)], check=True)
        sdist = next(scratch.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(scratch, filter="data")
        source = next(scratch.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = scratch / "build"
        build_log = cache_dir().parent / f"llama.cpp-{VERSION}-build.log"
        build_log.parent.mkdir(parents=True, exist_ok=True)
        log(f"[llama.cpp] configuring and building (about 6 minutes on 2 cores; compiler output in {build_log}) ...")
        with open(build_log, "w") as output:
            for command in (["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
                            ["cmake", "--build", str(build), f"-j{os.cpu_count() or 2}", "--target", *TARGETS]):
                if subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"building llama.cpp failed: see {build_log}")
        staging = cache_dir().with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        for built in (build / "bin").iterdir():  # the tools and the shared libraries they link
            if built.is_file():
                shutil.copy2(built, staging / "bin" / built.name)
        for library in build.rglob("*.so*"):
            shutil.copy2(library, staging / "bin" / library.name)
        shutil.rmtree(cache_dir(), ignore_errors=True)
        staging.rename(cache_dir())
    log(f"[llama.cpp] built → {bin_dir}")
    return bin_dir


def environment() -> dict[str, str]:
    """Environment for running the binaries (their shared libraries sit beside them)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{cache_dir() / 'bin'}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def ensure_gguf(kind: str, source: Path, log=print) -> Path:
    """SmolLM2 at `kind` (Q8_0, Q4_1, ...) made from the package's Q4_1 GGUF `source`."""
    if kind.upper() == "Q4_1":
        return source
    target = cache_dir() / "models" / f"{source.stem.rsplit('.', 1)[0]}.{kind.upper()}.gguf"
    if not target.exists():
        ensure_binaries(log)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        subprocess.run([str(binary("llama-quantize")), "--allow-requantize", str(source), str(partial), kind.upper()],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
        partial.rename(target)
    return target


if __name__ == "__main__":
    print(ensure_binaries())
