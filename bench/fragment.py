"""The markdown fragment each benchmark writes next to its JSON (`<out>/NAME.md`), which
`mirador bench report` (services/cli/bench.py) puts into bench/results/report.md.

A fragment is plain markdown: a few lines of context, tables, and image links relative
to the fragment's own folder (`![...](NAME.png)`). Headings start at `###`; the report
gives each bench its own `##` section. The runner knows nothing of a bench's JSON.
"""

from __future__ import annotations

from pathlib import Path


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list], title: str | None = None) -> str:
    """A markdown table (numbers right-aligned), with an optional bold title line above it."""
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows for i in range(len(header))]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write(out: Path, name: str, parts: list[str]) -> Path:
    """Writes `<out>/<name>.md` from blocks of markdown, separated by blank lines."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text("\n\n".join(p.strip("\n") for p in parts if p) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


def machine() -> dict:
    """The machine a bench runs on: CPU model and features, cores, memory, load average now (call
    it before the bench starts), versions. Every bench records this one dict."""
    import os
    import platform

    import grpc
    import numpy
    import onnxruntime as ort
    import psutil

    cpuinfo = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    lines = cpuinfo.splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor() or "unknown")
    flags = next((l for l in lines if l.startswith("flags")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "avx2": " avx2" in flags, "avx512f": " avx512f" in flags,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "onnxruntime": ort.__version__, "grpcio": grpc.__version__, "numpy": numpy.__version__,
            "platform": platform.platform()}


def describe(machine: dict) -> str:
    """One line for a fragment: CPU, cores, memory."""
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (said once on stderr) when
    matplotlib is not installed: a bench then writes its tables without the PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("matplotlib not installed (pip install -e '.[bench]'): no PNG", file=sys.stderr)
        return None
    return plt
