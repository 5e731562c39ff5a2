"""Who is who (issue 15, item 5), on real processes:

* without a bearer token the router knows a caller by its address, never by metadata it picks:
  `x-mirador-client` neither opens a fresh rate-limit bucket nor reaches another address's
  session (the router listens on `localhost`, so 127.0.0.1 and [::1] are two real callers);
* a session belongs to the caller that started it: another one gets PERMISSION_DENIED and a
  sentence, never its turns, and nothing it sends is recorded into it;
* a fault inside any service (router, consensus, model host, quantizer; injected with
  MIRADOR_INJECT_INTERNAL_ERROR) reaches the client as INTERNAL with a sentence and an error
  id, never the exception; the service's log has the id with the traceback; the gateway
  relays the sentence and id;
* resolved escalations past `escalation_retention_days` are deleted when the consensus starts,
  pending ones never, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import re
import time

import grpc
import httpx
import pytest
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.faults import INTERNAL_ERROR_ENV_VAR
from services.common.model_repository import ModelRepository
from services.consensus.escalations import DecisionTally, ModelTally, SqliteEscalationStore
from state_servers import POSTGRES_URL, drop_schema, new_schema_name, require_postgres
from tiny_models import build_tiny_decoder, build_tiny_encoder

ROUTES = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
routes:
  one: {primary: tiny-lm}
"""
RATE, BURST = 1, 3


@contextlib.contextmanager
def started(mesh: Mesh):
    mesh.start(timeout_s=90)  # a loaded 2-core machine starts processes slowly
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def open_router(tmp_path_factory):
    """A router without a token on `localhost` (both loopback addresses), a model host behind it."""
    directory = tmp_path_factory.mktemp("who-is-who")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm", seed=0)
    build_tiny_encoder(repository, "tiny-embed")
    config = load_config(write_config(directory, body=ROUTES, service_extra={
        "router": f"host: localhost\nembedding_model: tiny-embed\nrate_limit_per_client: {RATE}\n"
                  f"rate_limit_burst: {BURST}"}))
    with started(Mesh(config, log_dir=directory / "logs", services=("model_host", "router"),
                      env={"XDG_CACHE_HOME": str(directory / "cache")})):
        port = config.services.router.port
        channels = {peer: grpc.insecure_channel(f"{peer}:{port}") for peer in ("127.0.0.1", "[::1]")}
        try:
            yield {peer: router_pb2_grpc.RouterStub(channel) for peer, channel in channels.items()}
        finally:
            for channel in channels.values():
                channel.close()


def ask(router, text, session, client="", timeout=60):
    metadata = (("x-mirador-client", client),) if client else ()
    responses = list(router.Ask(router_pb2.AskRequest(
        text=text, route="one", session_id=session, sampling=common_pb2.SamplingParams(max_tokens=2)),
        metadata=metadata, timeout=timeout))
    return responses[-1].summary


def wait_for_tokens(seconds: float = BURST / RATE + 0.2) -> None:
    time.sleep(seconds)  # the bucket refills at RATE/s: a full one after BURST / RATE seconds


def test_without_a_token_the_metadata_picks_no_rate_limit_bucket(open_router):
    v4, v6 = open_router["127.0.0.1"], open_router["[::1]"]
    wait_for_tokens()
    refused = []
    for index in range(BURST + 3):  # a fresh client name every call: if it were believed, none would be refused
        try:
            v4.Route(router_pb2.RouteRequest(text="hi", route="one"), metadata=(("x-mirador-client", f"c{index}"),),
                     timeout=10)
        except grpc.RpcError as exc:
            refused.append(exc)
    assert BURST + 3 - len(refused) in (BURST, BURST + 1)  # the burst (and a token refilled meanwhile at most)
    assert all(exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for exc in refused)
    assert "client `127.0.0.1` is over its rate limit" in refused[0].details()
    v6.Route(router_pb2.RouteRequest(text="hi", route="one"), timeout=10)  # another address is another client


def test_a_session_belongs_to_the_address_that_started_it(open_router):
    v4, v6 = open_router["127.0.0.1"], open_router["[::1]"]
    wait_for_tokens()
    first = ask(v4, "my account number is 1234", "private-session", client="alice")
    assert first.session_id == "private-session"
    with pytest.raises(grpc.RpcError) as caught:
        ask(v6, "what did I say?", "private-session", client="alice")  # same name, other address
    error = caught.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "session `private-session` was started by another client" in error.details()
    assert "start a session with a new `session_id`" in error.details() and "1234" not in error.details()
    # The metadata is not the identity: the same address continues its session whatever name it sends.
    second = ask(v4, "and then?", "private-session", client="mallory")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the first exchange was sent along
    wait_for_tokens()
    # [::1] can start sessions of its own, and the refused call recorded nothing into the other one.
    own = ask(v6, "hello", "v6-session")
    assert own.session_warning == ""
    third = ask(v4, "and then?", "private-session")
    assert third.usage.prompt_tokens > second.usage.prompt_tokens


# --------------------------------------------------------------------------- INTERNAL: a sentence and an id

FAULTY = {  # one method of each service, unary and streaming
    "router": "/mirador.v1.Router/Ask",
    "consensus": "/mirador.v1.Consensus/ListEscalations",
    "model_host": "/mirador.v1.ModelHost/ListModels",
    "quantizer": "/mirador.v1.Quantizer/Quantize",
}
STREAMING = {"/mirador.v1.Router/Ask", "/mirador.v1.Quantizer/Quantize"}
ERROR_ID = re.compile(r"\(error id ([0-9a-f]{16})\)")


def log_entries(mesh: Mesh, name: str) -> list[dict]:
    entries = []
    for line in mesh.processes[name].log_path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass
    return entries


def call_raw(address: str, method: str) -> grpc.RpcError:
    """Calls `method` with an empty message (the injected fault comes before the handler reads it)."""
    with grpc.insecure_channel(address) as channel:
        identity = lambda data: data  # noqa: E731
        if method in STREAMING:
            call = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
            with pytest.raises(grpc.RpcError) as caught:
                list(call(b"", timeout=30))
        else:
            call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=30)
    return caught.value


def test_an_internal_fault_sends_a_sentence_and_an_error_id_never_the_exception(tmp_path):
    build_tiny_decoder(ModelRepository(tmp_path / "models"), "tiny-lm")
    config = load_config(write_config(tmp_path, body="fleet:\n  tiny-lm: {task: text-generation}\n"
                                                    "routes:\n  chat: {primary: tiny-lm}\n"))
    services = ("model_host", "consensus", "quantizer", "router", "gateway")
    with started(Mesh(config, log_dir=tmp_path / "logs", services=services,
                      env={INTERNAL_ERROR_ENV_VAR: ",".join([*FAULTY.values(), "/v1/models"]),
                           "XDG_CACHE_HOME": str(tmp_path / "cache")})) as mesh:
        for service, method in FAULTY.items():
            error = call_raw(getattr(config.services, service).address, method)
            details = error.details()
            assert error.code() == grpc.StatusCode.INTERNAL, (service, details)
            found = ERROR_ID.search(details)
            assert found, details
            assert f"the {service} failed on {method} because of a fault of its own" in details
            for leaked in ("hunter2", "InjectedFault", "Traceback", "0x7f00dead"):
                assert leaked not in details, (service, details)
            logged = [e for e in log_entries(mesh, service) if e.get("error_id") == found.group(1)]
            assert len(logged) == 1 and "InjectedFault" in logged[0]["exception"], (service, logged)
            assert "Traceback" in logged[0]["exception"]
        # The gateway relays the router's sentence and id (HTTP 502), and nothing of the exception.
        reply = httpx.post(f"http://{config.services.gateway.address}/v1/chat/completions", timeout=60,
                           json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        message = reply.json()["error"]["message"]
        assert reply.status_code == 502 and ERROR_ID.search(message) and "hunter2" not in message, reply.text
        # The gateway's own fault: HTTP 500, a sentence and an id; the gateway's log has the traceback.
        reply = httpx.get(f"http://{config.services.gateway.address}/v1/models", timeout=30)
        message = reply.json()["error"]["message"]
        found = ERROR_ID.search(message)
        assert reply.status_code == 500 and found and "the gateway failed because of a fault of its own" in message
        assert "hunter2" not in reply.text and "InjectedFault" not in reply.text, reply.text
        logged = [e for e in log_entries(mesh, "gateway") if e.get("error_id") == found.group(1)]
        assert len(logged) == 1 and "Traceback" in logged[0]["exception"], logged


# --------------------------------------------------------------------------- retention of escalated conversations

DAY = 86_400.0


def _tally() -> DecisionTally:
    return DecisionTally(route="compliance", models=[ModelTally("a", True, True, 1.0)], escalated=True,
                         primary_answered=True, primary_overturned=False, no_answer=False)


def _case(request_id: str) -> dict:
    return {"route": "compliance", "request_id": request_id, "messages": [{"role": "ROLE_USER", "content": "private"}],
            "options": ["Y", "N"], "votes": [], "verdict": {"answer": "Y", "consistency": 0.5}}


def _fill(store, now: float) -> dict[str, str]:
    """An old resolved case, an old pending one, a recently resolved one; their ids by name."""
    ids = {}
    for name, created, resolved in (("old-resolved", now - 40 * DAY, now - 31 * DAY),
                                    ("old-pending", now - 40 * DAY, None),
                                    ("recent-resolved", now - 40 * DAY, now - 29 * DAY)):
        record = store.record_decision(_tally(), _case(name), now=created)
        if resolved is not None:
            store.resolve(record.id, "N", "ana", now=resolved)
        ids[name] = record.id
    return ids


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_consensus_deletes_resolved_cases_past_their_retention_and_keeps_pending_ones(tmp_path, backend):
    schema = None
    if backend == "postgresql":
        require_postgres()
        schema = new_schema_name()
        from services.common.state_settings import StateSettings
        from services.consensus.escalations_pg import PostgresEscalationStore

        store = PostgresEscalationStore(StateSettings(database_url=POSTGRES_URL, database_schema=schema))
        state = f"state:\n  database_url: {POSTGRES_URL}\n  database_schema: {schema}\n"
    else:
        store = SqliteEscalationStore(tmp_path / "queue.sqlite3")
        state = ""
    try:
        ids = _fill(store, time.time())
        decisions_before = store.stats().decisions
        store.close()
        config = load_config(write_config(tmp_path, body="fleet:\n  m: {task: text-generation}\n" + state,
                                          service_extra={"consensus": f"escalation_db: {tmp_path / 'queue.sqlite3'}\n"
                                                                      "escalation_retention_days: 30"}))
        with started(Mesh(config, log_dir=tmp_path / "logs", services=("consensus",))) as mesh:
            deadline = time.monotonic() + 20
            while not [e for e in log_entries(mesh, "consensus") if e.get("event", "").startswith("resolved escal")]:
                assert time.monotonic() < deadline, "no purge logged"
                time.sleep(0.1)
            with grpc.insecure_channel(config.services.consensus.address) as channel:
                stub = consensus_pb2_grpc.ConsensusStub(channel)
                listed = {e.id for e in stub.ListEscalations(consensus_pb2.ListEscalationsRequest(), timeout=10).escalations}
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetEscalation(consensus_pb2.GetEscalationRequest(id=ids["old-resolved"]), timeout=10)
                stats = stub.GetStats(consensus_pb2.GetStatsRequest(), timeout=10)
            purges = [e["deleted"] for e in log_entries(mesh, "consensus") if e.get("event", "").startswith("resolved escal")]
        assert listed == {ids["old-pending"], ids["recent-resolved"]}  # pending cases are never deleted
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert purges == [1]
        assert stats.decisions == decisions_before  # the counters still count what was deleted
    finally:
        if schema:
            drop_schema(schema)
