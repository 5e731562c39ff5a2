"""`mirador review`: the human side of consensus escalations.

    mirador review list [--state pending|resolved|all] [--limit N] [--json]
    mirador review show ID [--json]
    mirador review resolve ID --decision D --note N [--reviewer NAME]   (reviewer: $USER)
"""

from __future__ import annotations

import getpass
import json
import os
import time

from google.protobuf import json_format
from mirador.v1 import consensus_pb2, consensus_pb2_grpc

from services.common.channels import open_channel
from services.common.config import load_config

STATES = {
    "pending": consensus_pb2.ESCALATION_STATE_PENDING,
    "resolved": consensus_pb2.ESCALATION_STATE_RESOLVED,
    "all": consensus_pb2.ESCALATION_STATE_UNSPECIFIED,
}


def add_review_commands(subparsers) -> None:
    """Adds `review list|show|resolve` to the `mirador` command's subparsers."""
    review = subparsers.add_parser("review", help="list, show and resolve escalated consensus decisions")
    commands = review.add_subparsers(dest="review_command", required=True, metavar="SUBCOMMAND")

    listing = commands.add_parser("list", help="escalations, newest first")
    listing.add_argument("--state", choices=list(STATES), default="pending", help="which cases (default: pending)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50, at most 1000)")
    listing.add_argument("--json", action="store_true", help="print the cases as JSON")
    listing.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    listing.set_defaults(run=cmd_review_list)

    show = commands.add_parser("show", help="one escalation with every model's answer")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print the case as JSON")
    show.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    show.set_defaults(run=cmd_review_show)

    resolve = commands.add_parser("resolve", help="record the reviewer's decision (once per case)")
    resolve.add_argument("id")
    resolve.add_argument("--decision", required=True, help="the answer (one of the case's options, when it had options)")
    resolve.add_argument("--note", required=True, help="why")
    resolve.add_argument("--reviewer", default=None, help="who decides (default: $USER)")
    resolve.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    resolve.set_defaults(run=cmd_review_resolve)


def _stub(args):
    config = load_config(args.config)
    channel = open_channel(config, config.services.consensus.client_target, aio=False, service="consensus")
    return channel, consensus_pb2_grpc.ConsensusStub(channel)


def _when(stamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp.seconds))


def _as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _question(escalation) -> str:
    users = [m.content for m in escalation.messages if m.role == 2]  # ROLE_USER
    text = (users[-1] if users else (escalation.messages[-1].content if escalation.messages else "")).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def cmd_review_list(args) -> int:
    channel, stub = _stub(args)
    with channel:
        reply = stub.ListEscalations(
            consensus_pb2.ListEscalationsRequest(state=STATES[args.state], limit=args.limit), timeout=args.timeout)
    if args.json:
        print(json.dumps([_as_dict(e) for e in reply.escalations], indent=2))
        return 0
    if not reply.escalations:
        print(f"no {'' if args.state == 'all' else args.state + ' '}escalations")
        return 0
    print(f"{'id':<30} {'created':<19} {'state':<8} {'route':<14} {'consistency':>11}  {'verdict':<16} question")
    for e in reply.escalations:
        state = consensus_pb2.EscalationState.Name(e.state)[len("ESCALATION_STATE_"):].lower()
        answer = e.resolution if e.resolution else e.verdict.answer
        print(f"{e.id:<30} {_when(e.created_at):<19} {state:<8} {e.route or '-':<14} "
              f"{e.verdict.consistency:>11.3f}  {answer[:16]:<16} {_question(e)}")
    return 0


def cmd_review_show(args) -> int:
    channel, stub = _stub(args)
    with channel:
        e = stub.GetEscalation(consensus_pb2.GetEscalationRequest(id=args.id), timeout=args.timeout)
    if args.json:
        print(json.dumps(_as_dict(e), indent=2))
        return 0
    state = consensus_pb2.EscalationState.Name(e.state)[len("ESCALATION_STATE_"):].lower()
    v = e.verdict
    print(f"escalation {e.id} ({state})")
    print(f"  created     {_when(e.created_at)}   route {e.route or '-'}   request {e.request_id}")
    print("  question:")
    for m in e.messages:
        role = {1: "system", 2: "user", 3: "assistant"}.get(m.role, "?")
        print(f"    [{role}] {m.content}")
    if e.options:
        print(f"  options     {', '.join(e.options)}")
    print(f"  verdict     {v.answer!r}  consistency {v.consistency:.3f} < threshold {v.consensus_threshold:.3f}")
    print(f"  method      {v.method}")
    if v.combined_distribution:
        print("  combined    (calibrated) " + ", ".join(f"{p.label}: {p.probability:.3f}" for p in v.combined_distribution))
    if v.primary_overturned:
        print("  the validators overturned the primary's answer")
    print("  votes:")
    for vote in e.votes:
        tag = " (primary)" if vote.primary else ""
        if vote.error:
            print(f"    {vote.model}{tag}: FAILED after {vote.latency_ms:.0f} ms: {vote.error}")
            continue
        c = vote.confidence
        print(f"    {vote.model}{tag}: {vote.answer!r}  weight {vote.weight:.3f}  "
              f"confidence {c.calibrated_confidence:.3f} ({c.calibration_source or 'no source'})  {vote.latency_ms:.0f} ms")
        if c.label_distribution:
            print("      raw (T=1) " + ", ".join(f"{p.label}: {p.probability:.3f}" for p in c.label_distribution))
    if e.state == consensus_pb2.ESCALATION_STATE_RESOLVED:
        print(f"  resolved    {e.resolution!r} by {e.reviewer} at {_when(e.resolved_at)}")
        if e.note:
            print(f"  note        {e.note}")
    return 0


def default_reviewer() -> str:
    name = os.environ.get("USER", "").strip()
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry: ask for --reviewer
        return ""


def cmd_review_resolve(args) -> int:
    reviewer = (args.reviewer or default_reviewer()).strip()
    if not reviewer:
        raise SystemExit("mirador review resolve: who decides? pass --reviewer NAME ($USER is not set)")
    channel, stub = _stub(args)
    with channel:
        e = stub.ResolveEscalation(
            consensus_pb2.ResolveEscalationRequest(id=args.id, resolution=args.decision, reviewer=reviewer,
                                                   note=args.note),
            timeout=args.timeout)
    print(f"resolved {e.id} as {e.resolution!r} by {e.reviewer} at {_when(e.resolved_at)}"
          + (f" (the models' verdict was {e.verdict.answer!r})" if e.verdict.answer != e.resolution else ""))
    return 0
