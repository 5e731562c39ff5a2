"""Memory growth, measured: the loop of tests/test_memory_growth.py (load/unload a model,
stream generations, embed) on a real model-host process with tiny models, once clean and
once with the deliberately leaking runtime (MIRADOR_INJECT_LEAK_KB) that the test's
check must catch. Prints the model host's RSS per round and the fitted growth of each.

    python bench/memory_growth.py [--out bench/results] [--quick]

Writes memory_growth.json, memory_growth.md and memory_growth.png (RSS per round) to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import fragment  # noqa: E402
import test_memory_growth as growth  # noqa: E402  (the test's loop and check, not a copy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="the same loop (it is short already: ~1 minute)")
    args = parser.parse_args(argv)
    injected_mb = growth.MEASURED_ROUNDS * 3 * growth.LEAK_KB / 1024
    results = {}
    with tempfile.TemporaryDirectory(prefix="mirador-memory-") as scratch:
        for name, leak_kb in (("clean", 0), ("leaking control", growth.LEAK_KB)):
            mesh = growth.host(Path(scratch) / name.split()[0], leak_kb)
            try:
                trend = growth.rss_trend(mesh)
            finally:
                mesh.stop()
            trend["settles"] = growth.settles(trend)
            results[name] = trend
            print(f"{name:<16} RSS {trend['first_mb']:.1f} -> {trend['last_mb']:.1f} MB over "
                  f"{growth.MEASURED_ROUNDS} rounds, fitted growth {trend['growth_mb']:+.1f} MB "
                  f"(limit {growth.GROWTH_LIMIT_MB:.0f} MB): {'settles' if trend['settles'] else 'GROWS'}", flush=True)
    report = {"created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "rounds": growth.MEASURED_ROUNDS, "warmup_rounds": growth.WARMUP_ROUNDS,
              "limit_mb": growth.GROWTH_LIMIT_MB, "leak_injected_mb": injected_mb, "runs": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_growth.json").write_text(json.dumps(report, indent=2))
    plotted = plot(results, args.out / "memory_growth.png")
    rows = [[name, round(t["first_mb"], 1), round(t["last_mb"], 1), round(t["growth_mb"], 1),
             round(t["growth_mb"] / max(growth.MEASURED_ROUNDS - 1, 1), 2), "settles" if t["settles"] else "grows"]
            for name, t in results.items()]
    fragment.write(args.out, "memory_growth", [
        f"Model host on tiny models: {growth.WARMUP_ROUNDS} warm-up rounds, then {growth.MEASURED_ROUNDS} measured "
        "rounds of load a model, stream 3 generations, embed, unload; RSS after each round, growth = the fitted "
        f"linear trend over the measured rounds. The control leaks {growth.LEAK_KB} KB per generation "
        f"({injected_mb:.0f} MB in all); the check (growth under {growth.GROWTH_LIMIT_MB:.0f} MB) must catch it.",
        fragment.table(["run", "first MB", "last MB", "fitted growth MB", "MB / round", "check"], rows),
        "![RSS per round](memory_growth.png)" if plotted else "",
    ])
    clean_ok, control_caught = results["clean"]["settles"], not results["leaking control"]["settles"]
    return 0 if clean_ok and control_caught else 1


def plot(results: dict, path: Path) -> bool:
    plt = fragment.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, trend in results.items():
        ax.plot(range(1, len(trend["samples_mb"]) + 1), trend["samples_mb"], marker=".", label=name)
    ax.set_xlabel("measured round")
    ax.set_ylabel("model host RSS (MB)")
    ax.set_title("Memory growth: clean host vs leaking control")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
