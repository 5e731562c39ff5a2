"""The config of a mesh of several model hosts that the router and the consensus place models
across (tests/test_placement_hosts.py, test_placement_pinned.py, test_consensus_placement.py):
one builder, so each test says only what differs — its fleet, routes and a few keys per service."""

from __future__ import annotations

from pathlib import Path

from conftest import free_port, free_port_run


def write_placement_config(directory: Path, fleet: dict[str, str], routes: dict[str, str], *, hosts: int,
                           listed: int | None = None, port: int | None = None, model_host: dict | None = None,
                           router: dict | None = None) -> Path:
    """`hosts` model-host replicas on ports p .. p+hosts-1, of which the router (and the consensus)
    list the first `listed`; `fleet` and `routes` map names to their YAML flow mappings;
    `model_host` and `router` add keys to those services."""
    listed = listed or hosts
    port = port or free_port_run(max(hosts, listed))
    targets = ", ".join(f"127.0.0.1:{port + i}" for i in range(listed))

    def keys(extra: dict | None) -> str:
        return "".join(f", {key}: {value}" for key, value in (extra or {}).items())

    lines = [
        "services:",
        f"  model_host: {{port: {port}, replicas: {hosts}, shutdown_grace_s: 2s{keys(model_host)}}}",
        (f"  router: {{port: {free_port()}, shutdown_grace_s: 2s, model_host_targets: [{targets}], "
         f"rollout_state: {directory / 'rollouts.json'}{keys(router)}}}"),
        (f"  consensus: {{port: {free_port()}, shutdown_grace_s: 2s, "
         f"escalation_db: {directory / 'escalations.sqlite3'}}}"),
        f"  quantizer: {{port: {free_port()}}}",
        f"  gateway: {{port: {free_port()}}}",
        f"model_repository: {directory / 'models'}",
        "fleet:",
        *(f"  {name}: {spec}" for name, spec in fleet.items()),
        "routes:",
        *(f"  {name}: {spec}" for name, spec in routes.items()),
    ]
    path = directory / "mirador.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
