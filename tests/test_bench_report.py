"""`mirador bench report` for real, on stand-in benches (tiny scripts in a temp bench folder):
the report names the machine and versions, includes a bench's fragment with its plot, says
which bench failed and with what stderr, and reuses earlier results saying when they were made."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GOOD = '''
import argparse, pathlib
parser = argparse.ArgumentParser()
parser.add_argument("--out", type=pathlib.Path)
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "good.json").write_text('{"created_at": "2030-01-01T00:00:00"}')
(args.out / "good.png").write_bytes(b"not really a png")
(args.out / "good.md").write_text(
    "# Good numbers\\n\\n| measure | value |\\n|---|---:|\\n| calls/s | {} |\\n\\n![plot](good.png)\\n"
    .format(42 if args.quick else 7))
print("good bench done")
'''

BROKEN = '''
import sys
print("working ...")
print("Traceback (most recent call last):\\nValueError: the stand-in bench broke on purpose", file=sys.stderr)
sys.exit(3)
'''

SILENT = '''
import argparse, pathlib
parser = argparse.ArgumentParser()
parser.add_argument("--out", type=pathlib.Path)
args = parser.parse_args()
(args.out / "silent.json").write_text("{}")
print("| a table only printed | 1 |")
'''


def report(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, str]:
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir(exist_ok=True)
    for name, body in (("good", GOOD), ("broken", BROKEN), ("silent", SILENT)):
        (bench_dir / f"{name}.py").write_text(textwrap.dedent(body))
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "services.cli", "bench", "report", "--bench-dir", str(bench_dir),
                           "--out", str(out), *options], cwd=REPO, capture_output=True, text=True, timeout=60)
    return done, (out / "report.md").read_text() if (out / "report.md").exists() else ""


def test_report_has_header_sections_and_a_failed_bench(tmp_path):
    done, text = report(tmp_path, "--only", "good", "broken", "silent", "--quick")
    assert done.returncode == 1, done.stderr  # a bench failed; the report is still written
    header = text.split("\n## ", 1)[0]
    for needle in ("# Mirador benchmark report", "- git commit: ", "- machine: ", " cores, ", "GiB RAM", "GPU: ",
                   "python ", "onnxruntime ", "grpcio ", "protobuf ", "numpy ", "mode: quick"):
        assert needle in header, needle
    assert "| [good](#good) | ok |" in header and "| [broken](#broken) | failed |" in header

    good = text.split("## good\n", 1)[1].split("\n## ", 1)[0]
    assert "### Good numbers" in good          # the fragment's heading, under the bench's section
    assert "| calls/s | 42 |" in good           # its --quick table
    assert "![plot](good.png)" in good and "run time" in good

    broken = text.split("## broken\n", 1)[1].split("\n## ", 1)[0]
    assert "**failed**" in broken and "exit status 3" in broken
    assert "ValueError: the stand-in bench broke on purpose" in broken

    silent = text.split("## silent\n", 1)[1].split("\n## ", 1)[0]
    assert "writes no markdown fragment" in silent and "| a table only printed | 1 |" in silent
    assert "[silent.json](silent.json)" in silent

    runs = json.loads((tmp_path / "results" / "runs.json").read_text())
    assert runs["good"]["status"] == "ok" and runs["broken"]["status"] == "failed"


def test_reuse_includes_earlier_results_and_says_when(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "routing.md").write_text("| classifier | accuracy |\n|---|---:|\n| logistic | 90% |\n")
    (out / "routing.json").write_text(json.dumps({"created_at": "2029-05-06T07:08:09"}))
    done, text = report(tmp_path, "--only", "good", "--reuse")
    assert done.returncode == 0, done.stderr
    routing = text.split("## routing\n", 1)[1].split("\n## ", 1)[0]
    assert "**reused** results produced 2029-05-06T07:08:09" in routing and "| logistic | 90% |" in routing
    assert "| calls/s | 7 |" in text  # good ran now, in its full mode
    assert "| [topics](#topics) | not run |" in text  # nothing earlier to reuse

    done, text = report(tmp_path, "--reuse", "--only")  # run nothing, rebuild the report
    assert done.returncode == 0, done.stderr
    assert "| [good](#good) | reused |" in text and "| calls/s | 7 |" in text and "| logistic | 90% |" in text


def test_unknown_bench_is_a_usage_error(tmp_path):
    done, _ = report(tmp_path, "--only", "no_such_bench")
    assert done.returncode == 2 and "no such bench: no_such_bench" in done.stderr


def test_a_bench_past_its_timeout_is_stopped_and_reported(tmp_path):
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "slow.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "services.cli", "bench", "report", "--bench-dir", str(bench_dir),
                           "--out", str(tmp_path / "results"), "--only", "slow", "--timeout", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30
    text = (tmp_path / "results" / "report.md").read_text()
    assert "| [slow](#slow) | failed |" in text and "stopped after the 2 s timeout" in text


def test_reuse_believes_the_results_over_a_run_record_they_postdate(tmp_path):
    """A bench rerun by hand after `mirador bench report` ran it: the report must not credit the new
    results to the old run (its date and duration); a record the results do not postdate stands."""
    from services.cli.bench import BENCHES, find_existing

    soak = next(b for b in BENCHES if b.name == "soak")
    (tmp_path / "soak.md").write_text("| availability | 99.9% |\n")
    (tmp_path / "runs.json").write_text(json.dumps({"soak": {
        "finished_at": "2026-11-27T21:35:55+00:00", "seconds": 230.5, "status": "ok", "mode": "full", "command": []}}))
    (tmp_path / "soak.json").write_text(json.dumps({"date": "2026-11-27T22:24:44"}))  # an 18-minute run, later
    later = find_existing(soak, [tmp_path], quick=False)
    assert later.produced == "2026-11-27T22:24:44 (written in soak.json)" and later.seconds is None
    (tmp_path / "soak.json").write_text(json.dumps({"date": "2026-11-27T21:35:30"}))  # written by that run
    same = find_existing(soak, [tmp_path], quick=False)
    assert same.produced == "2026-11-27T21:35:55+00:00 (full run, 230 s)" and same.seconds == 230.5


def test_a_bench_json_that_is_a_list_is_dated_by_its_file(tmp_path):
    from services.cli.bench import BENCHES, find_existing

    soak = next(b for b in BENCHES if b.name == "soak")
    (tmp_path / "soak.json").write_text("[1, 2, 3]")
    found = find_existing(soak, [tmp_path], quick=False)
    assert "(modification time of soak.json)" in found.produced


def test_a_result_file_belongs_to_the_bench_with_the_longest_matching_name(monkeypatch):
    from services.cli import bench

    _belongs = bench._belongs
    monkeypatch.setattr(bench, "BENCHES", [*bench.BENCHES, bench.Bench("topics_extra", "a bench named after another")])
    assert _belongs("topics_extra-2layers.md", "topics_extra")
    assert not _belongs("topics_extra-2layers.md", "topics")
    assert _belongs("topics_risk_coverage.png", "topics")
    assert _belongs("model_host_throughput-quick-smollm2.png", "model_host")
    assert not _belongs("serving-spinning_off.md", "soak")
