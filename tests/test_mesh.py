"""Four real service processes, started as `mirador up` starts them: health,
reflection, and a clear status for every kind of bad request."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from mirador.v1 import common_pb2, consensus_pb2, model_host_pb2, quantizer_pb2, router_pb2
from mirador.v1 import consensus_pb2_grpc, model_host_pb2_grpc, quantizer_pb2_grpc, router_pb2_grpc

SERVICES = {
    "router": "mirador.v1.Router",
    "consensus": "mirador.v1.Consensus",
    "quantizer": "mirador.v1.Quantizer",
    "model_host": "mirador.v1.ModelHost",
}
USER = common_pb2.ROLE_USER


def user(text):
    return [common_pb2.ChatMessage(role=USER, content=text)]


def status_of(call):
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if not hasattr(result, "SerializeToString"):  # a stream: read it to the end
            list(result)
    return caught.value.code(), caught.value.details()


@pytest.mark.parametrize("service", SERVICES)
def test_health_serving_overall_and_per_service(channel_to, service):
    health = health_pb2_grpc.HealthStub(channel_to(service))
    for name in ("", SERVICES[service]):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", SERVICES)
def test_reflection_lists_the_service_health_and_reflection(channel_to, service):
    listed = set(ProtoReflectionDescriptorDatabase(channel_to(service)).get_services())
    assert {SERVICES[service], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
    assert not (set(SERVICES.values()) - {SERVICES[service]}) & listed  # one service per process


def test_reflection_describes_request_fields(channel_to):
    database = ProtoReflectionDescriptorDatabase(channel_to("router"))
    from google.protobuf.descriptor_pool import DescriptorPool

    ask = DescriptorPool(database).FindMessageTypeByName("mirador.v1.AskRequest")
    assert {"text", "route", "session_id", "sampling"} <= set(ask.fields_by_name)


# --------------------------------------------------------------------------- model host


def test_model_host_lists_the_fleet_with_tiers(channel_to):
    host = model_host_pb2_grpc.ModelHostStub(channel_to("model_host"))
    listing = host.ListModels(model_host_pb2.ListModelsRequest(), timeout=5)
    by_name = {m.name: m for m in listing.models}
    assert set(by_name) == {"tiny-lm", "tiny-lm-b", "tiny-embed"}
    assert by_name["tiny-lm"].tier == model_host_pb2.MODEL_TIER_HOT
    assert by_name["tiny-lm-b"].tier == model_host_pb2.MODEL_TIER_WARM
    assert by_name["tiny-embed"].task == model_host_pb2.MODEL_TASK_EMBEDDING
    assert listing.memory_budget_bytes == 0 and listing.memory_used_bytes == 0
    assert all(m.state == model_host_pb2.MODEL_STATE_NOT_BUILT and "mirador fleet build" in m.detail for m in listing.models)


MODEL_HOST_ERRORS = [
    ("Generate", model_host_pb2.GenerateRequest(model="gpt-9", messages=user("hi")), grpc.StatusCode.NOT_FOUND, "not in the fleet"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-lm"), grpc.StatusCode.INVALID_ARGUMENT, "no input"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-embed", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "needs a text-generation model"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-lm", prompt="x", messages=user("y")), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-lm", messages=[common_pb2.ChatMessage(content="x")]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-lm", prompt="x", sampling=common_pb2.SamplingParams(temperature=3)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-lm", prompt="x", sampling=common_pb2.SamplingParams(max_tokens=100000)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("Generate", model_host_pb2.GenerateRequest(model="tiny-lm", messages=user("hi")), grpc.StatusCode.FAILED_PRECONDITION, "build it with `mirador fleet build`"),
    ("Score", model_host_pb2.ScoreRequest(model="tiny-lm", prompt="x", options=["yes"]), grpc.StatusCode.INVALID_ARGUMENT, "between 2 and 32"),
    ("Score", model_host_pb2.ScoreRequest(model="tiny-lm", prompt="x", options=["yes", "yes"]), grpc.StatusCode.INVALID_ARGUMENT, "distinct"),
    ("Embed", model_host_pb2.EmbedRequest(model="tiny-embed"), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 256"),
    ("Embed", model_host_pb2.EmbedRequest(model="tiny-embed", texts=["ok", " "]), grpc.StatusCode.INVALID_ARGUMENT, "texts[1]"),
    ("Embed", model_host_pb2.EmbedRequest(model="tiny-lm", texts=["ok"]), grpc.StatusCode.INVALID_ARGUMENT, "needs a embedding model"),
    ("LoadModel", model_host_pb2.LoadModelRequest(model=""), grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
    ("LoadModel", model_host_pb2.LoadModelRequest(model="gpt-9"), grpc.StatusCode.NOT_FOUND, "known models"),
    ("UnloadModel", model_host_pb2.UnloadModelRequest(model="gpt-9"), grpc.StatusCode.NOT_FOUND, "known models"),
]


@pytest.mark.parametrize("rpc, request_, code, phrase", MODEL_HOST_ERRORS)
def test_model_host_errors(channel_to, rpc, request_, code, phrase):
    host = model_host_pb2_grpc.ModelHostStub(channel_to("model_host"))
    got, details = status_of(lambda: getattr(host, rpc)(request_, timeout=5))
    assert got == code, details
    assert phrase in details


# --------------------------------------------------------------------------- router


def test_route_with_explicit_route_returns_the_route_table_entry(channel_to):
    router = router_pb2_grpc.RouterStub(channel_to("router"))
    decision = router.Route(router_pb2.RouteRequest(text="hello", route="chat"), timeout=5)
    assert (decision.route, decision.model, list(decision.fallbacks)) == ("chat", "tiny-lm", ["tiny-lm-b"])
    assert decision.reason == router_pb2.ROUTE_REASON_EXPLICIT and decision.timeout_ms == 5000


ROUTER_ERRORS = [
    ("Route", router_pb2.RouteRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "`text` is empty"),
    ("Route", router_pb2.RouteRequest(text="x" * 40000), grpc.StatusCode.INVALID_ARGUMENT, "at most 32768 bytes"),
    ("Route", router_pb2.RouteRequest(text="hi", route="nowhere"), grpc.StatusCode.NOT_FOUND, "known routes: chat, compliance"),
    ("Route", router_pb2.RouteRequest(text="hi"), grpc.StatusCode.FAILED_PRECONDITION, "cannot classify"),  # no route has examples
    ("Ask", router_pb2.AskRequest(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "`text` is empty"),
    ("Ask", router_pb2.AskRequest(text="hi", route="chat", sampling=common_pb2.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    # the router relays the model host's own answer, naming the hop
    ("Ask", router_pb2.AskRequest(text="hi", route="chat"), grpc.StatusCode.FAILED_PRECONDITION, "model `tiny-lm` on the model host"),
]


@pytest.mark.parametrize("rpc, request_, code, phrase", ROUTER_ERRORS)
def test_router_errors(channel_to, rpc, request_, code, phrase):
    router = router_pb2_grpc.RouterStub(channel_to("router"))
    got, details = status_of(lambda: getattr(router, rpc)(request_, timeout=5))
    assert got == code, details
    assert phrase in details


def test_consensus_route_with_no_working_model_escalates_to_a_human(channel_to):
    router = router_pb2_grpc.RouterStub(channel_to("router"))
    events = list(router.Ask(router_pb2.AskRequest(text="Is this compliant?", route="compliance"), timeout=30))
    votes = [e.vote for e in events if e.HasField("vote")]
    verdict = next(e.verdict for e in events if e.HasField("verdict"))
    assert {v.model for v in votes} == {"tiny-lm", "tiny-lm-b"} and all(v.error for v in votes)  # none is built
    assert verdict.escalated and verdict.escalation_id
    assert events[-1].summary.escalation_id == verdict.escalation_id


# --------------------------------------------------------------------------- consensus and quantizer


def decide(**fields):
    base = dict(models=["tiny-lm", "tiny-lm-b"], messages=user("Is this compliant?"), consensus_threshold=0.8)
    return consensus_pb2.DecideRequest(**{**base, **fields})


CONSENSUS_ERRORS = [
    ("Decide", decide(models=["tiny-lm"]), grpc.StatusCode.INVALID_ARGUMENT, "1 models given"),
    ("Decide", decide(models=["tiny-lm", "tiny-lm"]), grpc.StatusCode.INVALID_ARGUMENT, "twice"),
    ("Decide", decide(models=["tiny-lm", "gpt-9"]), grpc.StatusCode.NOT_FOUND, "gpt-9"),
    ("Decide", decide(consensus_threshold=0), grpc.StatusCode.INVALID_ARGUMENT, "consensus_threshold"),
    ("Decide", decide(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "send `messages`"),
    ("Decide", decide(options=["yes"]), grpc.StatusCode.INVALID_ARGUMENT, "between 2 and 32"),
    ("Decide", decide(), grpc.StatusCode.FAILED_PRECONDITION, "services.consensus.embedding_model"),  # no minilm-l6 here
    ("ListEscalations", consensus_pb2.ListEscalationsRequest(limit=5000), grpc.StatusCode.INVALID_ARGUMENT, "at most 1000"),
    ("GetEscalation", consensus_pb2.GetEscalationRequest(), grpc.StatusCode.INVALID_ARGUMENT, "`id` is empty"),
    ("ResolveEscalation", consensus_pb2.ResolveEscalationRequest(id="e1", resolution="compliant"), grpc.StatusCode.INVALID_ARGUMENT, "`reviewer` is empty"),
    ("ResolveEscalation", consensus_pb2.ResolveEscalationRequest(id="e1", resolution="ok", reviewer="ana"), grpc.StatusCode.NOT_FOUND, "no escalation `e1`"),
]


@pytest.mark.parametrize("rpc, request_, code, phrase", CONSENSUS_ERRORS)
def test_consensus_errors(channel_to, rpc, request_, code, phrase):
    consensus = consensus_pb2_grpc.ConsensusStub(channel_to("consensus"))
    got, details = status_of(lambda: getattr(consensus, rpc)(request_, timeout=5))
    assert got == code, details
    assert phrase in details


QUANTIZER_ERRORS = [
    ("Quantize", quantizer_pb2.QuantizeRequest(model="gpt-9", budget_mb=50), grpc.StatusCode.NOT_FOUND, "gpt-9"),
    ("Quantize", quantizer_pb2.QuantizeRequest(model="tiny-embed", budget_mb=50), grpc.StatusCode.INVALID_ARGUMENT, "measures decoders"),
    ("Quantize", quantizer_pb2.QuantizeRequest(model="tiny-lm"), grpc.StatusCode.INVALID_ARGUMENT, "no budget"),
    ("Quantize", quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_bits_per_weight=1.5), grpc.StatusCode.INVALID_ARGUMENT, "use 2 to 32"),
    ("Quantize", quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=-1), grpc.StatusCode.INVALID_ARGUMENT, "positive size"),
    ("Quantize", quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=50, block_size=48), grpc.StatusCode.INVALID_ARGUMENT, "block_size"),
    ("Quantize", quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=50), grpc.StatusCode.FAILED_PRECONDITION, "build it with `mirador fleet build`"),
    ("Analyze", quantizer_pb2.AnalyzeRequest(model="tiny-lm", bits=[3]), grpc.StatusCode.INVALID_ARGUMENT, "subset of (8, 4, 2)"),
    ("Analyze", quantizer_pb2.AnalyzeRequest(model="tiny-lm"), grpc.StatusCode.FAILED_PRECONDITION, "build it with `mirador fleet build`"),
]


@pytest.mark.parametrize("rpc, request_, code, phrase", QUANTIZER_ERRORS)
def test_quantizer_errors(channel_to, rpc, request_, code, phrase):
    quantizer = quantizer_pb2_grpc.QuantizerStub(channel_to("quantizer"))
    got, details = status_of(lambda: getattr(quantizer, rpc)(request_, timeout=5))
    assert got == code, details
    assert phrase in details


def test_garbage_bytes_get_a_status_and_the_service_stays_up(channel_to):
    channel = channel_to("model_host")
    raw = channel.unary_unary("/mirador.v1.ModelHost/ListModels")  # no serializer: we send raw bytes
    got, details = status_of(lambda: raw(b"\xff\xff\xff\xff", timeout=5))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "generate your client" in details
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
