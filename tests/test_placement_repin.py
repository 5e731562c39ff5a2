"""Hot pins that follow the hosts, with real model-host processes (services/model_host/hot_placement.py).

* The host pinning a hot model is killed (kill -9): the next host in the model's hash order pins it
  and loads it by itself, without any call for it; when a host comes back at that address and is
  its target again, it takes the pin, and the host that held it lets it go only once the newcomer
  holds it READY (keeping its copy loaded as a warm model: nothing busy is moved).
* A starting host that is not among the model-host targets (a pod behind a headless Service is not
  among its records until it is ready) pins no hot model; once the list holds it, it pins what it
  is a target of, and the host that held that pin hands it over. The old code pinned every hot
  model on such a host. Both ways: a `dns://SERVER/name:port` target answered by a DNS server on
  loopback whose records the test changes (three hosts on 127.0.0.1-3, one port, like pods), and
  a static list that grows by a reload.

Budgets keep placement on (the fleet does not fit one host: 3 decoders of 128 MiB of KV slots
besides); no router runs: hosts find their peers themselves. Loopback only; every process is
stopped by PID (Mesh.stop).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import yaml
from conftest import free_port_run
from fault_scenarios import models_of, wait_for
from mirador.v1 import model_host_pb2
from placement_mesh import write_placement_config
from test_placement_hosts import DECODER_KEYS, start
from tiny_models import build_tiny_decoder, build_tiny_encoder

from services.cli.supervisor import Mesh, write_config_variant
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.common.placement_policy import placement_targets

HOT = "lm-hot"
PINNED_WITHIN_S = 10.0  # a dead target's hot model pinned and READY on the next host (probes every 1 s, 2 missed)


def write_fleet(directory, *, hosts: int, listed: int, port: int, hot: str = HOT):
    fleet = {"tiny-embed": "{task: embedding, tier: warm}",
             hot: "{task: text-generation, tier: hot}",
             **{f"lm-warm-{i}": DECODER_KEYS for i in range(3)}}
    path = write_placement_config(directory, fleet, {"chat": f"{{primary: {hot}}}"}, hosts=hosts, listed=listed,
                                  port=port, model_host={"memory_budget_mb": 300})
    repository = ModelRepository(directory / "models")
    if not (directory / "models" / "tiny-embed").exists():
        build_tiny_encoder(repository, "tiny-embed")
        build_tiny_decoder(repository, hot, seed=1)
        for i in range(3):
            build_tiny_decoder(repository, f"lm-warm-{i}", seed=10 + i, kv_heads=2)
    return path


def holds(address: str, model: str) -> tuple[bool, bool]:
    """(READY, pinned) of `model` on `address`; (False, False) when the host does not answer."""
    try:
        status = models_of(address)[model]
    except AssertionError:
        return False, False
    return status.state == model_host_pb2.MODEL_STATE_READY, status.pinned


def host_logged(mesh: Mesh, event: str) -> int:
    return sum(f'"{event}"' in line for p in mesh.processes.values()
               for line in p.log_path.read_text(errors="replace").splitlines())


def three_hosts(tmp_path):
    """Three listed hosts on consecutive ports: (config, addresses, HOT's target, the next in its hash order)."""
    port = free_port_run(3)
    addresses = [f"127.0.0.1:{port + i}" for i in range(3)]
    config = load_config(write_fleet(tmp_path, hosts=3, listed=3, port=port))
    (target,) = placement_targets(HOT, addresses, 1)
    (after,) = placement_targets(HOT, [a for a in addresses if a != target], 1)
    return config, addresses, target, after


def test_a_dead_targets_hot_model_is_pinned_on_the_next_host_and_a_returning_host_takes_it_back(tmp_path):
    config, addresses, target, after = three_hosts(tmp_path)
    mesh = start(config, tmp_path, services=("model_host",))
    returned = None
    try:
        wait_for(lambda: holds(target, HOT) == (True, True), 60, f"{HOT} READY and pinned on its target {target}")
        assert holds(after, HOT) == (False, False)  # the scene: pinned on its target only
        wait_for(lambda: host_logged(mesh, "model host up: it takes its hot pins") >= 6, 20, "the hosts knowing each other")
        victim = next(p for p in mesh.processes.values() if p.settings.address == target)
        killed_at = time.monotonic()
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        wait_for(lambda: holds(after, HOT) == (True, True), PINNED_WITHIN_S,
                 f"{HOT} READY and pinned on {after}, the next in its hash order", interval_s=0.1)
        took = time.monotonic() - killed_at
        status = models_of(after)[HOT]
        assert status.requests_total == 0  # loaded without any call for it
        third = next(a for a in addresses if a not in (target, after))
        assert holds(third, HOT) == (False, False)  # nothing else moved
        print(f"\n[repin] kill -9 of {target}: {HOT} READY and pinned on {after} after {took:.1f} s, no call")

        # a host comes back at the target's address: it takes the pin, and the other lets it go after
        variant = write_config_variant(config, tmp_path / "returning.yaml", port=int(target.rsplit(":", 1)[1]),
                                       replicas=1)
        returned = Mesh(load_config(variant), log_dir=tmp_path / "logs-returning", services=("model_host",),
                        env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
        returned.start(timeout_s=90)
        wait_for(lambda: holds(target, HOT) == (True, True), 30, f"{HOT} pinned on {target} again", interval_s=0.1)
        wait_for(lambda: holds(after, HOT) == (True, False), 10, f"{after} letting its pin go", interval_s=0.1)
        assert models_of(after)[HOT].tier == model_host_pb2.MODEL_TIER_HOT  # a hot model, warm there now
        assert host_logged(mesh, "model host down: its hot pins go to the next hosts") >= 1
    finally:
        if returned is not None:
            returned.stop()
        mesh.stop()


def test_a_hung_targets_hot_model_is_pinned_on_the_next_host_and_handed_back_after_sigcont(tmp_path):
    """SIGSTOP: the target answers no probe (each times out after 1 s) but its connections stay open."""
    config, addresses, target, after = three_hosts(tmp_path)
    mesh = start(config, tmp_path, services=("model_host",))
    try:
        wait_for(lambda: holds(target, HOT) == (True, True), 60, f"{HOT} READY and pinned on its target {target}")
        wait_for(lambda: host_logged(mesh, "model host up: it takes its hot pins") >= 6, 20, "the hosts knowing each other")
        pid = next(p for p in mesh.processes.values() if p.settings.address == target).process.pid
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: holds(after, HOT) == (True, True), PINNED_WITHIN_S,
                     f"{HOT} READY and pinned on {after} while {target} is stopped", interval_s=0.1)
            took = time.monotonic() - stopped_at
        finally:
            os.kill(pid, signal.SIGCONT)
        assert models_of(after)[HOT].requests_total == 0
        # back: the target still holds it READY and pinned, so the other lets its pin go
        wait_for(lambda: holds(after, HOT) == (True, False), 15, f"{after} letting its pin go after SIGCONT",
                 interval_s=0.1)
        assert holds(target, HOT) == (True, True)
        print(f"\n[repin] SIGSTOP of {target}: {HOT} READY and pinned on {after} after {took:.1f} s; handed back")
    finally:
        mesh.stop()


def test_a_starting_host_not_yet_among_the_targets_pins_nothing_until_the_list_holds_it(tmp_path):
    port = free_port_run(3)
    addresses = [f"127.0.0.1:{port + i}" for i in range(3)]
    newcomer = addresses[2]
    # a hot model whose target is the third host once it is listed
    hot = next(name for name in (f"lm-hot-{i}" for i in range(200))
               if placement_targets(name, addresses, 1) == [newcomer])
    (holder,) = placement_targets(hot, addresses[:2], 1)
    config = load_config(write_fleet(tmp_path, hosts=3, listed=2, port=port, hot=hot))
    mesh = start(config, tmp_path, services=("model_host",))
    try:
        wait_for(lambda: holds(holder, hot) == (True, True), 60, f"{hot} pinned on {holder}")
        time.sleep(2.0)  # a few rounds of the newcomer's watch
        assert holds(newcomer, hot) == (False, False)  # not listed: pins nothing (it used to pin every hot model)
        assert all(not m.pinned for m in models_of(newcomer).values())
        assert host_logged(mesh, "this host is not among the model-host targets (yet): it pins no hot model "
                                 "until it is, and serves them on demand") == 1
        # the list grows to hold it (a headless Service's records once the pod is ready); a reload applies it
        for path in [config.path, *(tmp_path / "logs").glob("model_host-*.yaml")]:  # each replica's config file
            data = yaml.safe_load(path.read_text())
            data["services"]["router"]["model_host_targets"] = addresses
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        for process in mesh.processes.values():
            process.process.send_signal(signal.SIGHUP)
        wait_for(lambda: holds(newcomer, hot) == (True, True), 30, f"{hot} pinned on the newcomer", interval_s=0.1)
        wait_for(lambda: holds(holder, hot) == (True, False), 10, f"{holder} letting its pin go", interval_s=0.1)
        others = {name for name, m in models_of(newcomer).items() if m.pinned}
        assert others == {hot}, others  # only what it is a target of
    finally:
        mesh.stop()




class LoopbackDns:
    """A DNS server on 127.0.0.1 answering A queries for one name from a list the test changes (the
    records of a Kubernetes headless Service, which lists a pod once its readiness probe passes)."""

    def __init__(self, name: str, records: list[str]):
        self.name, self.records = name, list(records)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                query, client = self.sock.recvfrom(512)
            except OSError:
                continue
            end = 12
            labels = []
            while query[end]:
                labels.append(query[13 + end - 12:end + 1 + query[end]].decode())
                end += 1 + query[end]
            qtype = int.from_bytes(query[end + 1:end + 3], "big")
            question = query[12:end + 5]
            asked = ".".join(labels)
            answers = [ip for ip in self.records] if qtype == 1 and asked == self.name else []
            header = query[:2] + b"\x81\x80" + b"\x00\x01" + len(answers).to_bytes(2, "big") + b"\x00\x00\x00\x00"
            body = b"".join(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + socket.inet_aton(ip)
                            for ip in answers)
            self.sock.sendto(header + question + body, client)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def test_a_pod_behind_a_headless_service_pins_nothing_until_its_record_appears(tmp_path):
    """Three hosts on 127.0.0.1-3, one port, found through a dns:// target whose DNS server (on
    loopback) lists the first two; the third starts and is not among the records. It pins nothing
    until its record appears, then pins the model it is the target of, and the holder hands it over."""
    port = free_port_run(1)
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    addresses = [f"{ip}:{port}" for ip in ips]
    hot = next(name for name in (f"lm-hot-{i}" for i in range(200))
               if placement_targets(name, addresses, 1) == [addresses[2]])
    (holder,) = placement_targets(hot, addresses[:2], 1)
    dns = LoopbackDns("mirador-model-host.test", ips[:2])
    meshes = []
    try:
        base = load_config(write_fleet(tmp_path, hosts=1, listed=1, port=port, hot=hot))
        data = yaml.safe_load(base.path.read_text())
        data["services"]["router"]["model_host_targets"] = f"dns://127.0.0.1:{dns.port}/mirador-model-host.test:{port}"
        base.path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_config(base.path)
        for index, ip in enumerate(ips):  # one host per address, like pods
            variant = write_config_variant(config, tmp_path / f"pod-{index}.yaml", host=ip, port=port, replicas=1)
            mesh = Mesh(load_config(variant), log_dir=tmp_path / f"logs-{index}", services=("model_host",),
                        env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
            mesh.start(timeout_s=90)
            meshes.append(mesh)
        wait_for(lambda: holds(holder, hot) == (True, True), 60, f"{hot} pinned on {holder}")
        time.sleep(2.0)  # a few rounds of the newcomer's watch
        assert holds(addresses[2], hot) == (False, False)  # not among the records: pins nothing
        assert all(not m.pinned for m in models_of(addresses[2]).values())
        assert host_logged(meshes[2], "this host is not among the model-host targets (yet): it pins no hot model "
                                      "until it is, and serves them on demand") == 1
        dns.records.append(ips[2])  # its readiness probe passed: the Service lists it
        appeared = time.monotonic()
        wait_for(lambda: holds(addresses[2], hot) == (True, True), 30, f"{hot} pinned on the new pod", interval_s=0.1)
        wait_for(lambda: holds(holder, hot) == (True, False), 10, f"{holder} letting its pin go", interval_s=0.1)
        print(f"\n[repin] a pod's record appeared: {hot} pinned there {time.monotonic() - appeared:.1f} s later")
    finally:
        for mesh in reversed(meshes):
            mesh.stop()
        dns.close()


def test_a_dns_target_that_names_its_server_is_resolved_there():
    import asyncio

    from services.common.placement_policy import dns_authority, resolve

    dns = LoopbackDns("hosts.test", ["127.0.0.5", "127.0.0.6"])
    try:
        assert dns_authority(f"dns://127.0.0.1:{dns.port}/hosts.test:50061") == ("127.0.0.1", dns.port)
        assert dns_authority("dns://8.8.8.8/hosts.test:50061") == ("8.8.8.8", 53)
        assert dns_authority("dns:///hosts.test:50061") is None  # the system's resolver
        assert asyncio.run(resolve([f"dns://127.0.0.1:{dns.port}/hosts.test:50061"])) == \
            ["127.0.0.5:50061", "127.0.0.6:50061"]
        assert asyncio.run(resolve([f"dns://127.0.0.1:{dns.port}/other.test:50061"])) == []  # no such name
    finally:
        dns.close()
    # a server that does not answer: no addresses (logged), within the query's 1 s
    assert asyncio.run(resolve([f"dns://127.0.0.1:{dns.port}/hosts.test:50061", "10.0.0.5:50061"])) == ["10.0.0.5:50061"]
