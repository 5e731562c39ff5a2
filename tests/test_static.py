"""Static checks that catch what a test run may not reach: an undefined name in a rarely taken
branch, an import left behind (pyflakes' rules, run by ruff)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: `pip install -e '.[dev]'` installs it")
    return [found]


@pytest.mark.parametrize("paths, ignored", [(["services", "bench", "deploy", "protos", "scripts"], []),
                                             (["tests"], ["F811"])],  # pytest fixtures are imported, then named
                         ids=["code", "tests"])
def test_pyflakes_finds_nothing(paths, ignored):
    command = [*_ruff(), "check", "--no-cache", "--select", "F", "--output-format", "concise", *paths]
    if ignored:
        command += ["--ignore", ",".join(ignored)]
    checked = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
