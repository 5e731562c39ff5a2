"""The review queue on its two backends (issue 15): SQLite (the embedded default: WAL,
synchronous=FULL, fsync per commit) against PostgreSQL (`state.database_url`: a psycopg 3
pool, the server's default synchronous_commit=on).

    python bench/state.py [--quick] [--writes 400] [--threads 8] [--decides 240] [--rounds 3]
                          [--database-url postgresql://postgres@127.0.0.1:5432/test] [--out bench/results]

1. Escalation writes: `record_decision` with a realistic case (three votes, a conversation),
   the one durable write a Decide that escalates makes before the caller hears of it:
   one writer after another, then `--threads` writers at once. Latency percentiles and
   writes per second. Goal: p99 <= 20 ms on PostgreSQL.
2. Decide end to end: a real consensus process in front of a real model host serving three
   tiny decoders (tests/tiny_models.py), every Decide escalating (threshold 1.0), from
   `--threads` clients; decides per second with each backend, `--rounds` times in turn
   (SQLite, PostgreSQL, SQLite, ...: the machine's load drifts), compared by their medians.
   Goal: PostgreSQL >= 0.9x SQLite.
3. Kill -9 mid-run (`--kill-decides`, default 1000): two consensus replicas on one PostgreSQL,
   clients alternating between them, one replica SIGKILLed when 30 % are acknowledged and its
   failed calls retried on the other with the same request id. Goal: 0 lost, 0 duplicated.

PostgreSQL runs in a schema of its own (dropped afterwards). Writes <out>/state.json and
the report fragment <out>/state.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402

import fragment  # noqa: E402
from services.common.state_settings import StateSettings  # noqa: E402
from services.consensus.escalations import DecisionTally, ModelTally, SqliteEscalationStore  # noqa: E402

GOAL_P99_MS = 20.0
GOAL_THROUGHPUT_RATIO = 0.9
VOTERS = ["voter-a", "voter-b", "voter-c"]


def percentiles_ms(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def a_case(index: int) -> tuple[DecisionTally, dict]:
    tally = DecisionTally(route="compliance", models=[ModelTally(m, True, i == 0, 0.5) for i, m in enumerate(VOTERS)],
                          escalated=True, primary_answered=True, primary_overturned=False, no_answer=False)
    votes = [{"model": m, "answer": "needs review", "confidence": {"calibratedConfidence": 0.41, "meanLogprob": -0.9},
              "latencyMs": 120.5} for m in VOTERS]
    case = {"route": "compliance", "request_id": f"bench-{uuid.uuid4().hex}-{index}",
            "messages": [{"role": "ROLE_USER", "content": "Does this contract clause comply with policy 4.2? " * 8}],
            "options": ["compliant", "non-compliant", "needs review"], "votes": votes,
            "verdict": {"answer": "needs review", "consistency": 0.41, "method": "weighted-label-vote"}}
    return tally, case


def time_writes(store, writes: int, threads: int) -> dict:
    def write(index: int) -> float:
        tally, case = a_case(index)
        started = time.perf_counter()
        store.record_decision(tally, case)
        return time.perf_counter() - started

    for i in range(20):  # warm: connections open, pages cached
        write(-i - 1)
    started = time.perf_counter()
    if threads == 1:
        latencies = [write(i) for i in range(writes)]
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            latencies = list(pool.map(write, range(writes)))
    elapsed = time.perf_counter() - started
    return {"writes": writes, "threads": threads, "writes_per_s": writes / elapsed, **percentiles_ms(latencies)}


def open_backend(backend: str, directory: Path, url: str, schema: str, pool_size: int):
    if backend == "sqlite":
        return SqliteEscalationStore(directory / f"bench-{uuid.uuid4().hex[:6]}.sqlite3")
    from services.consensus.escalations_pg import PostgresEscalationStore

    return PostgresEscalationStore(StateSettings(database_url=url, database_schema=schema, pool_size=pool_size))


def drop_schema(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# --------------------------------------------------------------------------- Decide end to end


def decide_throughput(directory: Path, backend: str, url: str, schema: str, decides: int, threads: int,
                      round_: int = 1) -> dict:
    import grpc
    from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc

    from conftest import write_config
    from services.cli.supervisor import Mesh
    from services.common.config import load_config

    fleet = "fleet:\n" + "".join(f"  {m}: {{task: text-generation, tier: hot}}\n" for m in VOTERS)
    state = f"state:\n  database_url: {url}\n  database_schema: {schema}\n" if backend == "postgresql" else ""
    run_dir = directory / f"{backend}-{round_}"
    run_dir.mkdir()
    (run_dir / "models").symlink_to(directory / "models")
    config = load_config(write_config(run_dir, body=fleet + state,
                                      service_extra={"consensus": "max_concurrent_rpcs: 256"}))
    mesh = Mesh(config, log_dir=run_dir / "logs", services=("model_host", "consensus"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start(timeout_s=120)
    try:
        with grpc.insecure_channel(config.services.consensus.address) as channel:
            stub = consensus_pb2_grpc.ConsensusStub(channel)

            def decide(index: int) -> float:
                request = consensus_pb2.DecideRequest(
                    route="compliance", models=VOTERS, options=["Y", "N", "R"], consensus_threshold=1.0,
                    request_id=f"{backend}-{index}-{uuid.uuid4().hex[:6]}",
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Is request {index} ok?")])
                started = time.perf_counter()
                responses = list(stub.Decide(request, timeout=60))
                assert responses[-1].verdict.escalation_id
                return time.perf_counter() - started

            for i in range(10):
                decide(-i - 1)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                latencies = list(pool.map(decide, range(decides)))
            elapsed = time.perf_counter() - started
    finally:
        mesh.stop()
    return {"backend": backend, "decides": decides, "threads": threads, "decides_per_s": decides / elapsed,
            **percentiles_ms(latencies)}


def kill_run(directory: Path, url: str, schema: str, decides: int, threads: int, kill_after: float = 0.3) -> dict:
    """`decides` Decides with their own request ids from `threads` clients, alternating two
    consensus replicas on one PostgreSQL; replica B is SIGKILLed once `kill_after` of them are
    acknowledged, and every call that fails is retried on replica A with the same request id.
    Then the database is read: every acknowledged request must have exactly the case its
    client was told (lost = acknowledged but absent or different; duplicated = two cases)."""
    import signal

    import grpc
    import psycopg
    import yaml
    from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc

    from conftest import free_port, write_config
    from services.cli.supervisor import Mesh
    from services.common.config import load_config

    fleet = "fleet:\n" + "".join(f"  {m}: {{task: text-generation, tier: hot}}\n" for m in VOTERS)
    state = f"state:\n  database_url: {url}\n  database_schema: {schema}\n"
    run_dir = directory / "kill"
    run_dir.mkdir()
    (run_dir / "models").symlink_to(directory / "models")
    path = write_config(run_dir, body=fleet + state, service_extra={"consensus": "max_concurrent_rpcs: 256"})
    data = yaml.safe_load(path.read_text())
    data["services"]["consensus"]["port"] = free_port()
    path_b = path.with_name("mirador.b.yaml")
    path_b.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {"XDG_CACHE_HOME": str(directory / "cache")}
    mesh_a = Mesh(load_config(path), log_dir=run_dir / "logs-a", services=("model_host", "consensus"), env=env)
    mesh_b = Mesh(load_config(path_b), log_dir=run_dir / "logs-b", services=("consensus",), env=env)
    mesh_a.start(timeout_s=120)
    mesh_b.start(timeout_s=120)
    acknowledged: dict[str, str] = {}
    failed_calls, unanswered = [], []
    killed_at = None
    try:
        channels = [grpc.insecure_channel(m.config.services.consensus.address) for m in (mesh_a, mesh_b)]
        survivor, doomed = (consensus_pb2_grpc.ConsensusStub(c) for c in channels)

        def decide(index: int) -> None:
            request = consensus_pb2.DecideRequest(
                route="compliance", models=VOTERS, options=["Y", "N", "R"], consensus_threshold=1.0,
                request_id=f"kill-{index}",
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Is request {index} ok?")])
            stub = doomed if index % 2 else survivor
            for _ in range(5):
                try:
                    acknowledged[request.request_id] = list(stub.Decide(request, timeout=60))[-1].verdict.escalation_id
                    return
                except grpc.RpcError as exc:
                    failed_calls.append(exc.code().name)
                    stub = survivor
            unanswered.append(request.request_id)

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(decide, i) for i in range(decides)]
            while len(acknowledged) < kill_after * decides:
                time.sleep(0.005)
            os.kill(mesh_b.processes["consensus"].process.pid, signal.SIGKILL)
            killed_at = len(acknowledged)
            for future in futures:
                future.result()
        elapsed = time.perf_counter() - started
        for channel in channels:
            channel.close()
    finally:
        mesh_b.stop()
        mesh_a.stop()
    with psycopg.connect(url) as connection:
        rows = connection.execute(f"SELECT request_id, id FROM {schema}.escalations WHERE request_id LIKE 'kill-%'")
        stored: dict[str, list[str]] = {}
        for request_id, case_id in rows.fetchall():
            stored.setdefault(request_id, []).append(case_id)
    lost = [r for r, case_id in acknowledged.items() if stored.get(r) != [case_id]]
    duplicated = [r for r, cases in stored.items() if len(cases) > 1]
    return {"decides": decides, "threads": threads, "acknowledged": len(acknowledged), "killed_after": killed_at,
            "failed_calls": len(failed_calls), "failed_codes": sorted(set(failed_calls)), "unanswered": len(unanswered),
            "cases_stored": sum(len(c) for c in stored.values()), "lost": len(lost), "duplicated": len(duplicated),
            "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 writes, 60 decides")
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--decides", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3, help="Decide runs per backend, alternating")
    parser.add_argument("--kill-decides", type=int, default=1000, help="Decides of the kill -9 run (0: none)")
    parser.add_argument("--database-url", default=os.environ.get("MIRADOR_TEST_DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.writes, args.decides, args.rounds, args.kill_decides = 100, 60, 1, 200

    machine = fragment.machine()
    print(f"machine: {machine}")
    results: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
                     "args": {k: str(v) for k, v in vars(args).items()}, "writes": [], "decides": []}
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="mirador-bench-state-") as tmp:
        directory = Path(tmp)
        try:
            for backend in ("sqlite", "postgresql"):
                for threads in (1, args.threads):
                    store = open_backend(backend, directory, args.database_url, schema, pool_size=args.threads)
                    try:
                        row = {"backend": backend, **time_writes(store, args.writes, threads)}
                    finally:
                        store.close()
                    results["writes"].append(row)
                    print(f"writes {backend:10} threads={threads}: {row['writes_per_s']:.0f}/s "
                          f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms")
            drop_schema(args.database_url, schema)

            from services.common.model_repository import ModelRepository
            from tiny_models import build_tiny_decoder

            repository = ModelRepository(directory / "models")
            for seed, name in enumerate(VOTERS, start=11):
                build_tiny_decoder(repository, name, seed=seed)
            for round_ in range(1, args.rounds + 1):
                for backend in ("sqlite", "postgresql"):
                    row = {"round": round_, **decide_throughput(directory, backend, args.database_url, schema,
                                                                 args.decides, args.threads, round_)}
                    results["decides"].append(row)
                    print(f"decide round {round_} {backend:10}: {row['decides_per_s']:.1f}/s p50 {row['p50_ms']:.1f} ms "
                          f"p99 {row['p99_ms']:.1f} ms")
            if args.kill_decides:
                kill_schema = f"{schema}_kill"
                try:
                    results["kill"] = kill_run(directory, args.database_url, kill_schema, args.kill_decides,
                                               args.threads)
                finally:
                    drop_schema(args.database_url, kill_schema)
                print(f"kill -9: {results['kill']}")
        finally:
            drop_schema(args.database_url, schema)

    pg_single = next(r for r in results["writes"] if r["backend"] == "postgresql" and r["threads"] == 1)
    median = {backend: float(np.median([r["decides_per_s"] for r in results["decides"] if r["backend"] == backend]))
              for backend in ("sqlite", "postgresql")}
    ratio = median["postgresql"] / median["sqlite"]
    results["goals"] = {
        "pg_write_p99_ms": pg_single["p99_ms"], "pg_write_p99_goal_ms": GOAL_P99_MS,
        "pg_write_p99_met": pg_single["p99_ms"] <= GOAL_P99_MS,
        "decide_throughput_ratio": ratio, "decide_throughput_ratio_goal": GOAL_THROUGHPUT_RATIO,
        "decide_throughput_ratio_met": ratio >= GOAL_THROUGHPUT_RATIO,
    }
    write_rows = [[r["backend"], r["threads"], r["writes"], r["writes_per_s"], r["p50_ms"], r["p90_ms"], r["p99_ms"],
                   r["max_ms"]] for r in results["writes"]]
    decide_rows = [[r["round"], r["backend"], r["threads"], r["decides"], r["decides_per_s"], r["p50_ms"], r["p99_ms"]]
                   for r in results["decides"]]
    goal_rows = [["escalation write p99, PostgreSQL, one writer", f"<= {GOAL_P99_MS:g} ms",
                  f"{pg_single['p99_ms']:.2f} ms", "met" if results["goals"]["pg_write_p99_met"] else "NOT met"],
                 ["Decide throughput PostgreSQL / SQLite (medians)", f">= {GOAL_THROUGHPUT_RATIO}", f"{ratio:.2f}x",
                  "met" if results["goals"]["decide_throughput_ratio_met"] else "NOT met"]]
    tables = [
        fragment.table(["backend", "writers", "writes", "writes/s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                       write_rows, "Escalation writes (record_decision, committed durably)"),
        fragment.table(["round", "backend", "clients", "decides", "decides/s", "p50 ms", "p99 ms"], decide_rows,
                       "Decide end to end (consensus process, three tiny decoders, every decision escalated)"),
        fragment.table(["goal", "target", "measured", ""], goal_rows, "Goals (issue 15)"),
    ]
    if "kill" in results:
        k = results["kill"]
        tables.append(fragment.table(
            ["decides", "clients", "acknowledged", "B killed after", "failed calls (retried)", "unanswered",
             "cases stored", "lost", "duplicated"],
            [[k["decides"], k["threads"], k["acknowledged"], k["killed_after"], k["failed_calls"], k["unanswered"],
              k["cases_stored"], k["lost"], k["duplicated"]]],
            "Two replicas on one PostgreSQL, replica B killed -9 mid-run, its failed calls retried on A"))
        results["goals"]["kill_lost_duplicated"] = [k["lost"], k["duplicated"]]
        results["goals"]["kill_met"] = k["lost"] == 0 and k["duplicated"] == 0 and k["unanswered"] == 0
        tables[2] = fragment.table(["goal", "target", "measured", ""], goal_rows + [[
            "escalations lost / duplicated, two replicas, one killed -9", "0 / 0", f"{k['lost']} / {k['duplicated']}",
            "met" if results["goals"]["kill_met"] else "NOT met"]], "Goals (issue 15)")
    for block in tables:
        print()
        print(block)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "state-quick" if args.quick else "state"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    fragment.write(args.out, name, [
        f"{results['date']}, {machine['cpu']}, {machine['cores']} cores, load average at start "
        f"{machine['load_average']}. SQLite: WAL, synchronous=FULL; PostgreSQL "
        "15 on the same machine over loopback, synchronous_commit=on.", *tables])
    return 0


if __name__ == "__main__":
    sys.exit(main())
