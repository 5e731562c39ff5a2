"""PostgreSQL restarted under the review queue, for real: a private server of the machine's
PostgreSQL binaries (initdb in a temporary folder, its own port; the shared server on 5432 is
never restarted), `pg_ctl restart -m fast` while writers and a consensus process are busy.
Calls caught by the restart fail UNAVAILABLE with a sentence; the ones after succeed on new
connections; every write that was acknowledged is there afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from mirador.v1 import consensus_pb2, consensus_pb2_grpc

from conftest import free_port, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.state_settings import StateSettings
from test_escalation_store import case, tally


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class PrivatePostgres:
    def __init__(self, directory: Path, binaries: Path):
        self.binaries, self.directory = binaries, directory
        self.data, self.port = directory / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # PostgreSQL refuses to run as root: as root, run it as the `postgres` user.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(directory, "postgres")
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.prefix, str(self.binaries / tool), *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self.run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"), "-m", "fast",
                 "-w", action)


@pytest.fixture
def private_postgres(tmp_path_factory):
    binaries = postgres_bin()
    if binaries is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("PostgreSQL's server binaries (pg_ctl, initdb) are not installed", pytrace=False)
        pytest.skip("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
    directory = Path(f"/tmp/mirador-pg-{os.getpid()}-{time.monotonic_ns()}")  # a short socket path
    directory.mkdir()
    server = PrivatePostgres(directory, binaries)
    server.pg_ctl("start")
    try:
        yield server
    finally:
        server.pg_ctl("stop")
        shutil.rmtree(directory, ignore_errors=True)


def test_writers_through_a_restart_fail_unavailable_then_go_on_and_lose_nothing(private_postgres):
    from services.consensus.escalations_pg import PostgresEscalationStore, StoreUnavailable

    store = PostgresEscalationStore(StateSettings(database_url=private_postgres.url, statement_timeout_ms=2000,
                                                  pool_size=4))
    acknowledged, refusals, other_errors, stop = [], [], [], threading.Event()

    def writer(index):
        n = 0
        while not stop.is_set():
            n += 1
            try:
                acknowledged.append(store.record_decision(tally(), case(f"w{index}-{n}")).id)
            except StoreUnavailable as exc:
                refusals.append(exc.message)
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001 - anything else is a finding
                other_errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        before = len(acknowledged)
        private_postgres.pg_ctl("restart")
        restarted = len(acknowledged)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert not other_errors, other_errors[:3]
        assert before > 0 and len(acknowledged) > restarted + 10  # writing again after the restart
        assert all("PostgreSQL" in r and ("retry" in r) for r in refusals), refusals[:3]
        stored = {r.id for r in store.list(limit=100_000)}
        assert set(acknowledged) <= stored  # nothing acknowledged is lost
        # A commit the restart cut off before its answer may be there, unacknowledged: its caller got
        # UNAVAILABLE and a retry with the same request id replays it. Nothing else is.
        assert len(stored) <= len(acknowledged) + len(refusals)
        assert store.stats().decisions == len(stored)  # counters and cases committed together
    finally:
        stop.set()
        store.close()


def test_a_consensus_process_answers_unavailable_during_a_restart_and_serves_after(private_postgres, tmp_path):
    path = write_config(tmp_path, body=f"fleet:\n  m: {{task: text-generation}}\n"
                                       f"state:\n  database_url: {private_postgres.url}\n")
    mesh = Mesh(load_config(path), log_dir=tmp_path / "logs", services=("consensus",))
    mesh.start(timeout_s=60)
    try:
        with grpc.insecure_channel(mesh.config.services.consensus.address) as channel:
            stub = consensus_pb2_grpc.ConsensusStub(channel)
            assert stub.GetStats(consensus_pb2.GetStatsRequest(), timeout=10).decisions == 0
            private_postgres.pg_ctl("stop")
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListEscalations(consensus_pb2.ListEscalationsRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "review queue's PostgreSQL" in refused.value.details()
            assert "Traceback" not in refused.value.details()
            private_postgres.pg_ctl("start")
            assert stub.ListEscalations(consensus_pb2.ListEscalationsRequest(), timeout=30).escalations == []
            assert stub.GetStats(consensus_pb2.GetStatsRequest(), timeout=10).decisions == 0
    finally:
        mesh.stop()
