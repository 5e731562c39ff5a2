"""`mirador bench report`: run the benchmarks in bench/ and write one markdown report.

    mirador bench report [--only NAME ...] [--quick] [--reuse] [--out DIR] [--timeout S]

Each benchmark runs as a child process through its own command line, writing its JSON,
PNGs and a markdown fragment (`NAME.md`, see bench/fragment.py) to the results folder.
The report (`report.md` there) is a header naming the date, commit, machine and versions,
a summary table, then one section per benchmark: its fragment (or, for a bench that writes
none, the tail of what it printed and its PNGs), its run time, and for a failed one its
exit status and last stderr lines. A failure does not stop the others.

`--quick` runs each bench's short mode (a smoke run of the whole set in minutes) into
bench/results/quick/ unless --out says otherwise, so full results are never overwritten
by quick ones; a bench without a usable short mode is skipped with a note. `--reuse`
puts the existing results of benches not run now into the report, saying when they were
produced. The runner knows each bench's name, what it measures, and how to make it
short; it does not know any bench's JSON layout.

Why one module of ~510 lines: running the benches, finding reusable results and rendering the
report share the Bench/Outcome records and one notion of "this run"; it is the command's whole
job, split by sections below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "bench"
RESULTS = BENCH_DIR / "results"
RUNS_FILE = "runs.json"  # the runner's own record: when each bench last ran, for how long, how it ended
STDERR_TAIL = 20
STDOUT_TAIL = 60
MAX_FRAGMENT_LINES = 150  # longer fragments are cut at a heading; the whole file is linked


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    what: str
    # With --quick: the bench's own --quick when it has one, else these (none: its full run); None: skipped.
    quick_args: tuple[str, ...] | None = ()
    no_quick_reason: str = ""
    full_args: tuple[str, ...] = ()

    def script(self, bench_dir: Path) -> Path:
        return bench_dir / f"{self.name}.py"

    def fragment_names(self, quick: bool) -> list[str]:
        return [f"{self.name}-quick", self.name] if quick else [self.name]


# In the order of the report. A bench's own --quick is used when it has one; quick_args otherwise.
BENCHES = [
    Bench("routing", "route classification (three classifiers, held-out split) and Route latency through a real router"),
    Bench("route_latency", "where a Route call's time goes: the router's models in-process, real routers side by side "
          "per variant (fp32 / int8 models, intra-op threads)", quick_args=("--rounds", "1")),
    Bench("topics", "topic specialists vs a generalist: errors, their correlation, every vote of 2-4 specialists "
          "and the route's, risk-coverage of escalation"),
    Bench("decisions", "the consensus label vote on BIG-bench decisions and its risk-coverage curve",
          quick_args=("--per-source", "4")),
    Bench("model_host", "the model host against a bare ONNX Runtime loop: decode, loading, switching, throughput, memory"),
    Bench("decode_graphs", "decode speed and greedy agreement of the SmolLM2 graphs (optimum, fused fp32/int8/int4)"),
    Bench("serving", "streaming throughput at 1-16 concurrent clients, Mirador (router and host) against llama.cpp's "
                     "llama-server built from source, same weights, same run"),
    Bench("gateway", "the HTTP gateway's overhead: streamed chat completions through it against Router.Ask direct "
                     "(first token and inter-token p50), on the real fleet and on a tiny model"),
    Bench("batched_prefill", "whether prefills batched across requests (Score calls of one fan-out) pay on this "
                             "machine: ms per prompt at batch 1/2/4"),
    Bench("thread_spinning", "ONNX Runtime's idle-thread spinning on and off: one session alone and two at once "
                             "(decode + embed, two decoders), the model host's own loader and KV slots"),
    Bench("shared_weights", "two sessions of one SmolLM2 graph: RSS with ONNX Runtime's add_initializer sharing, "
                            "with and without prepacking, and what each costs in decode speed",
          quick_args=("--models", "fused-int8", "--tokens", "4")),
    Bench("quantizer", "mixed-precision quantization of SmolLM2: size, perplexity, KL, decode speed",
          quick_args=None, no_quick_reason="no short mode: its per-layer sensitivity pass alone takes ~10 minutes "
                                           "here (run it with `--only quantizer`)"),
    Bench("fuzz", "malformed RPCs and config documents against a real mesh on tiny models (crashes, not timings)"),
    Bench("faults", "fault injection: slow, hung and corrupt models, model hosts and consensus killed mid-call, "
                    "a full memory budget; what the clients saw", quick_args=("--repeats", "1")),
    Bench("memory_growth", "model-host RSS over load/unload/stream rounds, clean and with a leaking control"),
    Bench("soak", "capacity probe, then an open-loop soak at a stated load through the router: "
                  "throughput, latency, errors, RSS, availability"),
    Bench("fleet_scale", "78 models (73 synthetic) on 4 model hosts holding a third of them, one placing router, "
                         "Zipf traffic: static tiers vs LRU vs usage-driven promotion, then kill -9 of one host"),
]


@dataclasses.dataclass
class Outcome:
    bench: Bench
    status: str                # ok | failed | skipped | reused | not run
    note: str = ""
    seconds: float | None = None
    produced: str = ""         # when the results were produced
    results_dir: Path | None = None
    command: list[str] = dataclasses.field(default_factory=list)
    returncode: int | None = None
    stderr_tail: str = ""
    started: float = 0.0       # wall clock, when run now


# --------------------------------------------------------------------------- machine and versions


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _command(args: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    gpus = _command(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]) if shutil.which(
        "nvidia-smi") else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "gpu": "; ".join(gpus.splitlines()) or "none", "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


VERSIONED = ["onnxruntime", "onnxruntime-gpu", "grpcio", "protobuf", "numpy", "optimum", "optimum-onnx",
             "transformers", "torch", "matplotlib"]


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package not in ("onnxruntime-gpu", "optimum-onnx", "torch"):
                found[package] = "not installed"
    return found


def git_commit(repo: Path = REPO) -> str:
    commit = _command(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo)
    if not commit:
        return "unknown (not a git checkout)"
    subject, _, date = _command(["git", "log", "-1", "--format=%s%n%cI"], cwd=repo).partition("\n")
    subject = f"“{subject[:72]}{'…' if len(subject) > 72 else ''}” ({date})"
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return f"{commit} {subject}" + (" — with uncommitted changes" if dirty else "")


# --------------------------------------------------------------------------- running


def _supports(script: Path, flag: str) -> bool:
    """Whether the bench's command line has `flag` (a look at its source: cheaper than --help,
    which would import onnxruntime and the rest)."""
    return f'"{flag}"' in script.read_text(encoding="utf-8", errors="replace")


def run_bench(bench: Bench, bench_dir: Path, out: Path, quick: bool, timeout_s: float) -> Outcome:
    script = bench.script(bench_dir)
    if not script.exists():
        return Outcome(bench, "skipped", f"{_shown(str(script))} does not exist (yet)")
    args, note = list(bench.full_args), ""
    if quick:
        if bench.quick_args is None:
            return Outcome(bench, "skipped", bench.no_quick_reason or "no short mode")
        args = ["--quick"] if _supports(script, "--quick") else list(bench.quick_args)
        note = "" if args else "no short mode: ran in full"
    writes_to = out
    if _supports(script, "--out"):
        args += ["--out", str(out)]
    else:
        writes_to = bench_dir / "results"  # a bench without --out writes next to itself
    command = [sys.executable, str(script), *args]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    print(f"[bench] {bench.name}: {' '.join(command[1:])}", flush=True)
    started_wall, started, timed_out = time.time(), time.monotonic(), ""
    with open(logs / f"{bench.name}.stdout.txt", "w") as stdout, open(logs / f"{bench.name}.stderr.txt", "w") as stderr:
        # Its own session: on a timeout the whole group goes (a bench may have started a mesh).
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode, timed_out = _stop_group(process), f"stopped after the {timeout_s:g} s timeout (--timeout)"
        except KeyboardInterrupt:  # the group does not get the terminal's Ctrl-C: stop it here
            _stop_group(process)
            raise
    seconds = time.monotonic() - started
    stderr_tail = "\n".join(_read(str(logs / f"{bench.name}.stderr.txt")).splitlines()[-STDERR_TAIL:])
    if writes_to != out:
        _copy_new_results(bench.name, writes_to, out, started_wall)
    status = "ok" if returncode == 0 and not timed_out else "failed"
    if status == "failed":
        note = timed_out or f"exit status {returncode}"
    print(f"[bench] {bench.name}: {status} in {seconds:.0f} s", flush=True)
    return Outcome(bench, status, note, seconds,
                   dt.datetime.fromtimestamp(time.time()).astimezone().isoformat(timespec="seconds"), out, command,
                   returncode, "" if status == "ok" else stderr_tail, started_wall)


def _stop_group(process: subprocess.Popen) -> int:
    """SIGTERM to the bench's process group (its services stop with grace), SIGKILL after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def _copy_new_results(name: str, source: Path, out: Path, since: float) -> None:
    if source.resolve() == out.resolve() or not source.is_dir():
        return
    for path in source.iterdir():
        if path.is_file() and _belongs(path.name, name) and path.stat().st_mtime >= since - 1:
            shutil.copy2(path, out / path.name)


def _belongs(filename: str, name: str) -> bool:
    """Whether a result file is bench `name`'s: its name starts with the bench's, and with no longer
    bench name (a bench topics_extra would own topics_extra-2layers.md, not topics)."""
    stem = filename.split(".", 1)[0]
    owners = [n for n in {name, *(b.name for b in BENCHES)} if stem == n or stem.startswith((f"{n}-", f"{n}_"))]
    return bool(owners) and max(owners, key=len) == name


def _runs(directory: Path) -> dict:
    try:
        return json.loads((directory / RUNS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _record_runs(out: Path, outcomes: list[Outcome], quick: bool) -> None:
    path = out / RUNS_FILE
    runs = _runs(out)
    for o in outcomes:
        if o.status in ("ok", "failed"):
            runs[o.bench.name] = {"finished_at": o.produced, "seconds": round(o.seconds or 0, 1), "status": o.status,
                                  "mode": "quick" if quick else "full", "command": o.command[1:]}
    path.write_text(json.dumps(runs, indent=2) + "\n")


def find_existing(bench: Bench, dirs: list[Path], quick: bool) -> Outcome | None:
    """Earlier results of a bench in the first of `dirs` that has any: a fragment, or its JSON."""
    for directory in dirs:
        files = [directory / f"{n}.md" for n in bench.fragment_names(quick)] + [directory / f"{bench.name}.json"]
        present = [f for f in files if f.exists()]
        if not present:
            continue
        run = _runs(directory).get(bench.name, {})
        if run.get("status") == "ok" and not _written_after(present, run["finished_at"]):
            produced = f"{run['finished_at']} ({run.get('mode', 'full')} run, {run['seconds']:.0f} s)"
            seconds = run["seconds"]
        else:  # no run on record, or the results were written by a later run of the bench by hand
            produced, seconds = _date_of(present), None
        where = "" if directory == dirs[0] else f" (from {_shown(str(directory))}/)"
        return Outcome(bench, "reused", f"results of an earlier run{where}, not rerun now", seconds, produced, directory)
    return None


def _written_after(files: list[Path], finished_at: str, slack_s: float = 60.0) -> bool:
    """Whether a bench's JSON says it was written after the recorded run finished (a later run of the
    bench outside `mirador bench report`, whose record would then describe other results). Dates
    without a zone are read as UTC, as the benches write them on these machines."""
    written = _date_of(files)
    if "(written in" not in written:
        return False  # only a modification time: says nothing across a git checkout
    try:
        when = dt.datetime.fromisoformat(written.split(" ", 1)[0])
        finished = dt.datetime.fromisoformat(finished_at)
    except ValueError:
        return False
    when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    finished = finished if finished.tzinfo else finished.replace(tzinfo=dt.timezone.utc)
    return (when - finished).total_seconds() > slack_s


def _date_of(files: list[Path]) -> str:
    """The date a bench wrote into its JSON, else the files' modification time."""
    for path in files:
        if path.suffix != ".json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):  # e.g. a list of rows: no date in it
            continue
        for holder in (data, data.get("machine") if isinstance(data.get("machine"), dict) else {}):
            for key in ("created_at", "date", "finished_at"):
                if isinstance(holder.get(key), str):
                    return f"{holder[key]} (written in {path.name})"
    newest = max(files, key=lambda p: p.stat().st_mtime)
    stamp = dt.datetime.fromtimestamp(newest.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    return f"{stamp} (modification time of {newest.name})"


# --------------------------------------------------------------------------- the report


def _relink(text: str, source_dir: Path, report_dir: Path) -> str:
    """Makes a fragment's relative links (images, files) point at the same files from the report."""
    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z]+:|^#|^/", target):
            return match.group(0)
        return f"{match.group(1)}({os.path.relpath(source_dir / target, report_dir)})"
    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, text)


def _demote(text: str) -> str:
    """Headings of a fragment go under the bench's `##` section (`#` becomes `###`)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("##" + line if not fenced and re.match(r"#{1,4} ", line) else line)
    return "\n".join(lines)


def _cut(text: str, link: str) -> str:
    """At most MAX_FRAGMENT_LINES, cut before a heading, with a link to the whole fragment."""
    lines = text.splitlines()
    if len(lines) <= MAX_FRAGMENT_LINES:
        return text
    headings = [i for i, line in enumerate(lines) if line.startswith("#") and 0 < i <= MAX_FRAGMENT_LINES]
    cut = headings[-1] if headings else MAX_FRAGMENT_LINES
    return "\n".join(lines[:cut]) + f"\n\n… ({len(lines) - cut} more lines in [{Path(link).name}]({link}))"


def section(outcome: Outcome, report_dir: Path, quick: bool) -> str:
    bench = outcome.bench
    lines = [f"## {bench.name}", "", f"_{bench.what}._", ""]
    if outcome.status in ("skipped", "not run"):
        return "\n".join(lines + [f"**{outcome.status}**: {outcome.note}", ""])
    run = f"run time {outcome.seconds:.0f} s" if outcome.seconds is not None else "run time not recorded"
    if outcome.status == "reused":
        lines.append(f"**reused** results produced {outcome.produced}; {run}.")
    else:
        lines.append(f"**{outcome.status}** — {run}, finished {outcome.produced}; command "
                     f"`{' '.join(_shown(a) for a in outcome.command[1:])}`.")
    if outcome.status == "failed":
        lines += ["", f"It failed ({outcome.note}). Last lines of its stderr:", "", "```text",
                  outcome.stderr_tail or "(nothing on stderr)", "```"]
    lines.append("")
    directory = outcome.results_dir or report_dir
    fragment = next((directory / f"{n}.md" for n in bench.fragment_names(quick) if (directory / f"{n}.md").exists()),
                    None)
    if outcome.started and fragment is not None and fragment.stat().st_mtime < outcome.started - 1:
        fragment = None  # an older fragment is not this run's result
    if fragment is not None:
        link = os.path.relpath(fragment, report_dir)
        text = fragment.read_text(encoding="utf-8")
        body = _cut(_demote(_relink(text, directory, report_dir)), link)
        lines += [body, ""]
        if ".png" not in text:  # a fragment without plots: show the bench's PNGs after it
            lines += _images(bench, directory, report_dir)
    elif outcome.status != "failed":
        lines += _fallback(bench, directory, report_dir)
    return "\n".join(lines)


def _shown(arg: str) -> str:
    with_repo = arg.replace(str(REPO) + os.sep, "")
    return with_repo if " " not in with_repo else f"'{with_repo}'"


def _fallback(bench: Bench, directory: Path, report_dir: Path) -> list[str]:
    """A bench that writes no fragment: the tail of its printed output, its PNGs, its JSON."""
    lines = []
    stdout = directory / "logs" / f"{bench.name}.stdout.txt"
    if stdout.exists():
        tail = stdout.read_text(encoding="utf-8", errors="replace").splitlines()[-STDOUT_TAIL:]
        lines += [f"This bench writes no markdown fragment; the last {len(tail)} lines it printed:", "",
                  "```text", *tail, "```", ""]
    else:
        lines += ["This bench writes no markdown fragment, and its printed output was not kept.", ""]
    lines += _images(bench, directory, report_dir)
    data = sorted(p for p in directory.glob("*.json") if _belongs(p.name, bench.name))
    if data:
        lines += ["Results: " + ", ".join(f"[{p.name}]({os.path.relpath(p, report_dir)})" for p in data), ""]
    return lines


def _images(bench: Bench, directory: Path, report_dir: Path) -> list[str]:
    lines = []
    for png in sorted(p for p in directory.glob("*.png") if _belongs(p.name, bench.name)):
        lines += [f"![{png.stem}]({os.path.relpath(png, report_dir)})", ""]
    return lines


def render(outcomes: list[Outcome], out: Path, quick: bool, argv: list[str], began: str, load_start: list[float]) -> str:
    info, found = machine(), versions()
    header = [
        "# Mirador benchmark report", "",
        f"- date: {began} (finished {dt.datetime.now().astimezone().isoformat(timespec='seconds')})",
        f"- git commit: {git_commit()}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, GPU: {info['gpu']}; "
        f"{info['platform']}",
        f"- load average (1/5/15 min) at start {load_start}, at end {info['load_average']}: on a shared machine "
        "the timings are ratios, not promises",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in found.items()),
        f"- mode: {'quick (each bench in its short mode)' if quick else 'full'}; command: "
        f"`mirador bench report{' ' + ' '.join(argv) if argv else ''}`",
        "",
        "| bench | status | run time | results produced | note |",
        "|---|---|---:|---|---|",
    ]
    for o in outcomes:
        seconds = f"{o.seconds:.0f} s" if o.seconds is not None else ""
        header.append(f"| [{o.bench.name}](#{o.bench.name}) | {o.status} | {seconds} | "
                      f"{o.produced if o.status in ('ok', 'failed', 'reused') else ''} | "
                      f"{o.note.replace('|', '/')} |")
    return "\n".join(header + [""] + [section(o, out, quick) for o in outcomes])


# --------------------------------------------------------------------------- command


def select(names: list[str] | None) -> list[Bench]:
    known = {b.name: b for b in BENCHES}
    if names is None:
        return list(BENCHES)
    return [known.get(n) or Bench(n, f"bench/{n}.py") for n in names]


def cmd_bench_report(args: argparse.Namespace) -> int:
    quick = args.quick
    out = Path(args.out) if args.out else (RESULTS / "quick" if quick else RESULTS)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench_dir = Path(args.bench_dir).resolve() if args.bench_dir else BENCH_DIR
    began = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = [round(x, 2) for x in os.getloadavg()]
    chosen = select(args.only)
    unknown = [b.name for b in chosen if b not in BENCHES and not b.script(bench_dir).exists()]
    if unknown:
        print(f"mirador bench report: no such bench: {', '.join(unknown)} (known: "
              f"{', '.join(b.name for b in BENCHES)})", file=sys.stderr)
        return 2
    # Quick results fall back on the full ones when reused.
    reuse_dirs = [out] + ([RESULTS] if out != RESULTS and RESULTS in out.parents else [])
    extra = [b for b in chosen if b not in BENCHES]
    if args.reuse:  # benches outside the list that this folder has results of (runs.json)
        extra += [b for b in select(sorted(_runs(out))) if b not in BENCHES and b not in extra]
    outcomes: list[Outcome] = []
    for bench in BENCHES + extra:
        if bench in chosen:
            outcome = run_bench(bench, bench_dir, out, quick, args.timeout)
            if outcome.status == "skipped" and args.reuse:
                outcome = _reused(find_existing(bench, reuse_dirs, quick), outcome)
        elif args.reuse:
            outcome = find_existing(bench, reuse_dirs, quick) or Outcome(bench, "not run", "no earlier results")
        else:
            continue
        outcomes.append(outcome)
        _record_runs(out, [outcome], quick)
    report = out / "report.md"
    report.write_text(render(outcomes, out, quick, _options(args), began, load_start) + "\n", encoding="utf-8")
    failed = [o.bench.name for o in outcomes if o.status == "failed"]
    print(f"wrote {report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _reused(existing: Outcome | None, skipped: Outcome) -> Outcome:
    if existing is None:
        return skipped
    existing.note = f"{skipped.note}; earlier results reused"
    return existing


def add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", help="run the benchmarks in bench/ and write a report")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    report = bench_commands.add_parser(
        "report", help="run the benchmarks and write bench/results/report.md (tables and plots)",
        description=__doc__.split("\n\n", 2)[2].strip() if __doc__.count("\n\n") >= 2 else None)
    report.add_argument("--only", nargs="*", metavar="NAME",
                        help=f"run only these (of: {', '.join(b.name for b in BENCHES)}); "
                             "none, with --reuse: rebuild the report from the existing results")
    report.add_argument("--quick", action="store_true",
                        help="each bench's short mode; results in bench/results/quick/ unless --out")
    report.add_argument("--reuse", action="store_true",
                        help="put the existing results of benches not run now into the report")
    report.add_argument("--out", help="results folder (default bench/results, bench/results/quick with --quick)")
    report.add_argument("--timeout", type=float, default=None,
                        help="seconds one bench may run before it is stopped (default 3600; 600 with --quick)")
    report.add_argument("--bench-dir", help="where the bench scripts are (default bench/; for tests)")
    report.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    args.timeout = args.timeout or (600.0 if args.quick else 3600.0)
    return cmd_bench_report(args)


def _options(args: argparse.Namespace) -> list[str]:
    """The options the report was asked with, as a command line."""
    shown = (["--only", *args.only] if args.only is not None else []) + (["--quick"] if args.quick else [])
    shown += (["--reuse"] if args.reuse else []) + (["--out", args.out] if args.out else [])
    return shown + (["--bench-dir", args.bench_dir] if args.bench_dir else [])
