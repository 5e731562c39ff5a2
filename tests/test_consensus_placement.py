"""The consensus service places its members' calls as the router does (services/common/placement.py):
a member READY on one host is asked there, one loaded nowhere loads on one host, not on every host
round robin picks. Real processes: two model hosts and a consensus, tiny decoders; the
`round_robin` setting is the negative control (the same calls load members on both hosts)."""

from __future__ import annotations

import time

import grpc
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc

from fault_scenarios import models_of
from placement_mesh import write_placement_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_decoder, build_tiny_encoder

MEMBERS = ["tiny-a", "tiny-b", "tiny-c"]
OPTIONS = ["approve", "reject"]


def write(directory, balancing: str):
    fleet = {"tiny-embed": "{task: embedding, tier: hot}",
             **{name: "{task: text-generation, tier: warm}" for name in MEMBERS}}
    routes = {"vote": f"{{primary: {MEMBERS[0]}, validators: [{', '.join(MEMBERS[1:])}], consensus_threshold: 0.5, "
                      "options: [approve, reject]}"}
    path = write_placement_config(directory, fleet, routes, hosts=2, router={"model_host_balancing": balancing})
    repository = ModelRepository(directory / "models")
    build_tiny_encoder(repository, "tiny-embed")
    for seed, name in enumerate(MEMBERS):
        build_tiny_decoder(repository, name, seed=seed)
    return load_config(path)


def decide_and_list(directory, balancing: str) -> dict[str, list[int]]:
    """tiny-b loaded on the second host first; then 4 decisions. Returns, per member, the hosts
    (0, 1) where it is READY, and checks every vote was answered."""
    config = write(directory, balancing)
    mesh = Mesh(config, log_dir=directory / "logs", services=("model_host", "consensus"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start(timeout_s=60)
    try:
        hosts = list(config.services.model_host_targets)
        with grpc.insecure_channel(hosts[1]) as channel:
            model_host_pb2_grpc.ModelHostStub(channel).LoadModel(model_host_pb2.LoadModelRequest(model="tiny-b"),
                                                                 timeout=30)
        with grpc.insecure_channel(config.services.consensus.address) as channel:
            stub = consensus_pb2_grpc.ConsensusStub(channel)
            time.sleep(2.5)  # one placement refresh: the consensus has seen tiny-b READY on the second host
            for i in range(4):
                request = consensus_pb2.DecideRequest(
                    request_id="", route="vote", models=MEMBERS, options=OPTIONS, consensus_threshold=0.5,
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Question {i}?")])
                votes = [r.vote for r in stub.Decide(request, timeout=60) if r.HasField("vote")]
                assert sorted(v.model for v in votes) == MEMBERS
                assert all(not v.error for v in votes), [v.error for v in votes]
        ready = {name: [i for i, address in enumerate(hosts) if models_of(address)[name].ready] for name in MEMBERS}
    finally:
        mesh.stop()
    return ready


def test_consensus_members_go_to_the_host_that_has_them_ready(tmp_path):
    ready = decide_and_list(tmp_path, "placement")
    assert ready["tiny-b"] == [1]  # asked where it was READY, never loaded on the other host
    assert all(len(ready[name]) == 1 for name in MEMBERS), ready  # each member on one host only


def test_negative_control_round_robin_loads_members_on_every_host(tmp_path):
    ready = decide_and_list(tmp_path, "round_robin")
    assert any(len(hosts) == 2 for hosts in ready.values()), ready
