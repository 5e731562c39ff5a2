"""`mirador rollout list | promote MODEL | rollback MODEL [--reason TEXT]`: see and decide
the versioned rollouts the router runs (`fleet.NAME.rollout` in the config)."""

from __future__ import annotations

import argparse

from mirador.v1 import rollouts_pb2, rollouts_pb2_grpc

from services.common.channels import open_channel
from services.common.config import MiradorConfig, load_config

_STATE = {rollouts_pb2.ROLLOUT_STATE_ACTIVE: "active", rollouts_pb2.ROLLOUT_STATE_ROLLED_BACK: "rolled back",
          rollouts_pb2.ROLLOUT_STATE_PROMOTED: "promoted"}
_MODE = {rollouts_pb2.ROLLOUT_MODE_CANARY: "canary", rollouts_pb2.ROLLOUT_MODE_SHADOW: "shadow"}


def list_rollouts(config: MiradorConfig, timeout_s: float = 3.0) -> list[rollouts_pb2.Rollout]:
    with open_channel(config, config.services.router.client_target, aio=False, service="router") as channel:
        reply = rollouts_pb2_grpc.RolloutsStub(channel).ListRollouts(rollouts_pb2.ListRolloutsRequest(), timeout=timeout_s)
    return list(reply.rollouts)


def format_rollout(r: rollouts_pb2.Rollout) -> str:
    w = r.window
    line = (f"{r.model:<28} {r.stable_version:>6} -> {r.candidate_version:<6} {_MODE.get(r.mode, '?'):<6} "
            f"{r.share:>4.0%}  {_STATE.get(r.state, '?'):<11} calls {w.candidate_calls:>4}  errors {w.error_rate:>4.0%} "
            f"(max {w.max_error_rate:.0%})  first token {w.candidate_p50_ms:>6.0f} vs {w.stable_p50_ms:>6.0f} ms "
            f"(max x{w.max_latency_ratio:.1f})")
    if w.max_disagreement:
        line += f"  disagree {w.disagreement:.0%} of {w.compared} (max {w.max_disagreement:.0%})"
    if r.reason:
        line += f"\n{'':<28} {r.reason} ({r.changed_at.ToJsonString()})"
    return line


ROLLOUT_HEADER = f"{'rollout of':<28} {'stable':>6}    {'cand.':<6} {'mode':<6} share  state"


def cmd_rollout(args) -> int:
    config = load_config(args.config)
    if args.rollout_command == "list":
        rollouts = list_rollouts(config)
        if not rollouts:
            print("no rollouts: no model of the fleet has `rollout:` in the config")
            return 0
        print(ROLLOUT_HEADER)
        for rollout in rollouts:
            print(format_rollout(rollout))
        return 0
    request = rollouts_pb2.RolloutActionRequest(model=args.model, reason=args.reason or "")
    with open_channel(config, config.services.router.client_target, aio=False, service="router") as channel:
        stub = rollouts_pb2_grpc.RolloutsStub(channel)
        rollout = (stub.Promote if args.rollout_command == "promote" else stub.Rollback)(request, timeout=args.timeout)
    print(format_rollout(rollout))
    if args.rollout_command == "promote":
        print(f"all traffic of `{rollout.model}` now goes to version {rollout.candidate_version}; to make it permanent, "
              f"set fleet.{rollout.model}.version: \"{rollout.candidate_version}\" and remove its `rollout:`")
    return 0


def add_rollout_commands(commands: argparse._SubParsersAction) -> None:
    rollout = commands.add_parser("rollout", help="list, promote or roll back model version rollouts")
    sub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser("list", help="every rollout with its state and figures").set_defaults(run=cmd_rollout)
    for name, what in (("promote", "send all of MODEL's traffic to its candidate version"),
                       ("rollback", "send all of MODEL's traffic back to its stable version")):
        command = sub.add_parser(name, help=what)
        command.add_argument("model", help="the fleet model (its stable name)")
        command.add_argument("--reason", help="why, for the record")
        command.add_argument("--timeout", type=float, default=5.0)
        command.set_defaults(run=cmd_rollout)
