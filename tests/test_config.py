"""The config file: the shipped default, the article's route syntax, and errors with file, line and key."""

import subprocess
import sys
import textwrap

import pytest

from services.common.config import ConfigError, load_config, parse_config

FLEET = """
fleet:
  llama-70b: {task: text-generation}
  mistral-7b: {task: text-generation}
  gemma-2b: {task: text-generation}
  phi-3: {task: text-generation, tier: cold, keep_alive: 90s}
"""

ARTICLE_ROUTE = """
models:
  compliance_checker:
    primary: llama-70b
    fallback: mistral-7b
    validators: [gemma-2b, phi-3]
    consensus_threshold: 0.8
    timeout_ms: 1000
"""


def problems_of(text: str) -> list:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), "test.yaml")
    return caught.value.problems


def only_problem(text: str):
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


def test_shipped_default_config_loads_with_the_five_routes_and_default():
    config = load_config()
    assert {"compliance", "extraction", "coding", "reasoning", "chat", "default"} <= set(config.routes)
    assert config.services.router.port == 50051 and config.services.consensus.port == 50052
    assert config.services.quantizer.port == 50053 and config.services.model_host.port == 50061
    assert config.services.router.default_route == "default"


def test_article_example_loads_unchanged_as_a_route():
    config = parse_config(FLEET + ARTICLE_ROUTE, "article.yaml")
    route = config.routes["compliance_checker"]
    assert route.primary == "llama-70b"
    assert route.fallback == ("mistral-7b",)
    assert route.validators == ("gemma-2b", "phi-3")
    assert route.consensus_threshold == 0.8
    assert route.timeout_ms == 1000
    assert route.uses_consensus
    assert config.fleet["phi-3"].keep_alive_s == 90.0


def test_unknown_key_names_line_key_and_what_is_allowed():
    problem = only_problem(FLEET + ARTICLE_ROUTE.replace("timeout_ms: 1000", "timeout_ms: 1000\n    timout: 3"))
    assert problem.path == "test.yaml"
    assert problem.key == "models.compliance_checker.timout"
    assert problem.line == 15  # the line added after timeout_ms (line 14)
    assert "unknown key" in problem.message and "timeout_ms" in problem.message  # did-you-mean + allowed list


def test_route_naming_a_missing_model():
    problem = only_problem(FLEET + ARTICLE_ROUTE.replace("fallback: mistral-7b", "fallback: mistral-8x7b"))
    assert problem.key == "models.compliance_checker.fallback"
    assert problem.line == 11
    assert "mistral-8x7b" in problem.message and "llama-70b" in problem.message  # lists what is defined


@pytest.mark.parametrize("threshold", ["1.5", "-0.1", "high"])
def test_threshold_outside_zero_one(threshold):
    problem = only_problem(FLEET + ARTICLE_ROUTE.replace("0.8", threshold))
    assert problem.key == "models.compliance_checker.consensus_threshold"
    assert problem.line == 13
    assert "between 0 and 1" in problem.message


def test_negative_timeout():
    problem = only_problem(FLEET + ARTICLE_ROUTE.replace("1000", "-5"))
    assert problem.key == "models.compliance_checker.timeout_ms"
    assert problem.line == 14
    assert "at least 1" in problem.message


def test_duplicate_port():
    problem = only_problem("services:\n  router: {port: 6000}\n  consensus: {port: 6000}\n" + FLEET)
    assert problem.key == "services.consensus.port"
    assert problem.line == 3
    assert "services.router" in problem.message


@pytest.mark.parametrize("value", ["5 minutes", "-3s", "soon"])
def test_bad_duration(value):
    problem = only_problem(FLEET.replace("keep_alive: 90s", f"keep_alive: {value}"))
    assert problem.key == "fleet.phi-3.keep_alive"
    assert problem.line == 6


def test_duplicate_key_is_reported_not_silently_overwritten():
    problem = only_problem(FLEET + ARTICLE_ROUTE.replace("timeout_ms: 1000", "timeout_ms: 1000\n    timeout_ms: 2000"))
    assert problem.key == "models.compliance_checker.timeout_ms"
    assert "twice" in problem.message and "line 14" in problem.message


def test_every_problem_is_reported_at_once():
    text = FLEET + ARTICLE_ROUTE.replace("0.8", "2").replace("1000", "-1").replace("primary: llama-70b", "primary: gpt-9")
    assert {p.key.rsplit(".", 1)[1] for p in problems_of(text)} == {"primary", "consensus_threshold", "timeout_ms"}


def test_routes_and_models_sections_together_are_ambiguous():
    problem = only_problem(FLEET + ARTICLE_ROUTE + "routes: {}\n")
    assert problem.key == "models"


def test_threshold_without_validators_has_no_effect():
    text = FLEET + "routes:\n  r: {primary: llama-70b, consensus_threshold: 0.5}\n"
    assert only_problem(text).key == "routes.r.consensus_threshold"


def test_invalid_yaml_and_unreadable_file(tmp_path):
    assert "not valid YAML" in only_problem("fleet: [unclosed\n").message
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_cli_config_check_exit_codes(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(FLEET + ARTICLE_ROUTE)
    bad.write_text(FLEET + ARTICLE_ROUTE.replace("0.8", "1.8"))
    ok = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    failed = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert f"{bad}:13: models.compliance_checker.consensus_threshold" in failed.stderr


# --------------------------------------------------------------------------- replicas and router targets


def test_model_host_replicas_take_consecutive_ports_and_are_the_routers_default_targets():
    config = parse_config("services:\n  model_host: {port: 6000, replicas: 3}\n" + FLEET)
    host = config.services.model_host
    assert host.replicas == 3
    assert host.replica_addresses == ("127.0.0.1:6000", "127.0.0.1:6001", "127.0.0.1:6002")
    assert config.services.model_host_targets == host.replica_addresses
    assert parse_config(FLEET).services.model_host_targets == ("127.0.0.1:50061",)  # default: one replica


def test_a_service_is_dialled_at_its_target_when_it_listens_elsewhere():
    config = parse_config("services:\n  consensus: {host: 0.0.0.0, target: 'dns:///mirador-consensus:50052'}\n" + FLEET)
    assert config.services.consensus.address == "0.0.0.0:50052"  # where it listens
    assert config.services.consensus.client_target == "dns:///mirador-consensus:50052"  # where it is called
    assert config.services.router.client_target == "127.0.0.1:50051"  # no target: host:port
    problem = only_problem("services:\n  router: {target: [10.0.0.1:1, 10.0.0.2:1]}\n" + FLEET)
    assert problem.key == "services.router.target" and "one target" in problem.message
    problem = only_problem("services:\n  router: {target: 'no port here'}\n" + FLEET)
    assert problem.key == "services.router.target" and "not a gRPC target" in problem.message


def test_replica_port_clashing_with_another_service_names_the_replicas_key():
    problem = only_problem("services:\n  router: {port: 6002}\n  model_host: {port: 6000, replicas: 3}\n" + FLEET)
    assert problem.key == "services.model_host.replicas" and problem.line == 3
    assert "6002" in problem.message and "services.router" in problem.message


def test_replicas_must_be_a_sensible_count_and_fit_below_port_65536():
    assert only_problem("services:\n  model_host: {replicas: 0}\n" + FLEET).key == "services.model_host.replicas"
    problem = only_problem("services:\n  model_host: {port: 65535, replicas: 2}\n" + FLEET)
    assert problem.key == "services.model_host.replicas" and "65536" in problem.message


def test_router_model_host_targets():
    config = parse_config("services:\n  router: {model_host_targets: ['127.0.0.1:7001', '127.0.0.1:7002']}\n" + FLEET)
    assert config.services.model_host_targets == ("127.0.0.1:7001", "127.0.0.1:7002")
    config = parse_config("services:\n  router: {model_host_targets: 'dns:///mirador-model-host:50061'}\n" + FLEET)
    assert config.services.model_host_targets == ("dns:///mirador-model-host:50061",)
    for bad in ("['host-a:1', 'host-b:2']", "['127.0.0.1:1', '[::1]:2']", "'no port'", "['127.0.0.1:1', '127.0.0.1:1']"):
        problem = only_problem(f"services:\n  router: {{model_host_targets: {bad}}}\n" + FLEET)
        assert problem.key == "services.router.model_host_targets", bad


# --------------------------------------------------------------------------- route examples

EXAMPLES = """
services:
  router: {embedding_model: embedder}
fleet:
  lm: {task: text-generation}
  embedder: {task: embedding}
routes:
  greetings:
    primary: lm
    examples:
      - hello there
      - good morning
      - hi friend
  numbers:
    primary: lm
    examples:
      - count to ten
      - one two three
      - the sum of 4 and 5
"""


def test_route_examples_that_teach_well_load():
    assert parse_config(EXAMPLES, "test.yaml").routes["numbers"].examples == (
        "count to ten", "one two three", "the sum of 4 and 5")


def test_an_empty_example_is_refused_on_its_own_line():
    problem = only_problem(EXAMPLES.replace("      - good morning", '      - "  "'))
    assert (problem.key, problem.line) == ("routes.greetings.examples", 12)
    assert "empty example" in problem.message


def test_an_empty_examples_list_is_refused():
    problem = only_problem(EXAMPLES.replace("      - count to ten\n      - one two three\n      - the sum of 4 and 5\n",
                                            "      []\n"))
    assert (problem.key, problem.line) == ("routes.numbers.examples", 17)
    assert "is empty" in problem.message


def test_an_example_listed_by_two_routes_is_refused_naming_both_lines():
    # the same request up to case and spacing
    problem = only_problem(EXAMPLES.replace("      - one two three", "      - Hello   There"))
    assert (problem.key, problem.line) == ("routes.numbers.examples", 18)
    assert "route `greetings` (line 11)" in problem.message


def test_fewer_than_three_examples_are_refused():
    problem = only_problem(EXAMPLES.replace("      - the sum of 4 and 5\n", ""))
    assert (problem.key, problem.line) == ("routes.numbers.examples", 17)
    assert "has 2 examples" in problem.message and "at least 3" in problem.message
    problem = only_problem(EXAMPLES.replace("    examples:\n      - count to ten\n      - one two three\n"
                                            "      - the sum of 4 and 5\n", "    examples: count to ten\n"))
    assert "lists 1 request" in problem.message


def test_cli_config_check_names_the_duplicated_example(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLES.replace("      - one two three", "      - good morning"))
    failed = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode == 2
    assert f"{bad}:18: routes.numbers.examples: `good morning` is already an example of route `greetings`" \
        in failed.stderr


# --------------------------------------------------------------------------- state: (state_settings.py)


def test_without_a_state_section_every_service_keeps_its_own_state():
    state = parse_config(FLEET, "test.yaml").state
    assert not state.uses_postgresql and not state.uses_redis and state.rate_limit_without_redis == "open"


def test_the_state_section_loads_and_keeps_the_password_out_of_its_repr():
    state = parse_config(FLEET + textwrap.dedent("""
        state:
          database_url: postgresql://mirador:hunter2xyz@db.internal:5432/mirador
          database_schema: review_queue
          statement_timeout_ms: 2000
          pool_size: 4
          redis_url: redis://cache.internal:6379/1
          redis_prefix: "mesh-a:"
          redis_timeout_ms: 100
          rate_limit_without_redis: closed
        """), "test.yaml").state
    assert state.uses_postgresql and state.uses_redis and state.database_schema == "review_queue"
    assert (state.statement_timeout_ms, state.pool_size, state.redis_timeout_ms) == (2000, 4, 100)
    assert state.rate_limit_without_redis == "closed" and state.redis_prefix == "mesh-a:"
    assert "hunter2xyz" not in repr(state) and state.lines["database_url"] == 9


@pytest.mark.parametrize("entry, key, said", [
    ("database_url: mysql://db/x", "state.database_url", "scheme `mysql` is not one of postgresql, postgres"),
    ("database_url: postgresql:///x", "state.database_url", "names no host"),
    ("database_url: postgresql://db:port/x", "state.database_url", "not a URL"),
    ("redis_url: http://cache:6379", "state.redis_url", "redis://HOST:6379/0"),
    ("database_schema: Review-Queue", "state.database_schema", "not a plain schema name"),
    ("statement_timeout_ms: 0", "state.statement_timeout_ms", ""),
    ("rate_limit_without_redis: maybe", "state.rate_limit_without_redis", "use one of: open, closed"),
    ("rate_limit_without_redis: closed", "state.rate_limit_without_redis", "has no effect without `redis_url`"),
    ("database_uri: postgresql://db/x", "state.database_uri", "Did you mean `database_url`?"),
])
def test_state_problems_name_line_and_key(entry, key, said):
    problem = only_problem(FLEET + f"state:\n  {entry}\n")
    assert problem.key == key and said in problem.message and problem.line == FLEET.count("\n") + 2


def test_state_urls_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEST_MIRADOR_DB", "postgresql://mirador:s3cret@db.internal/mirador")
    monkeypatch.setenv("TEST_MIRADOR_REDIS", "redis://cache.internal:6379/2")
    state = parse_config(FLEET + "state:\n  database_url_env: TEST_MIRADOR_DB\n  redis_url_env: TEST_MIRADOR_REDIS\n"
                                 "  rate_limit_without_redis: closed\n", "test.yaml").state
    assert state.database_url == "postgresql://mirador:s3cret@db.internal/mirador" and state.lines["database_url"] == 8
    assert state.redis_url == "redis://cache.internal:6379/2" and state.rate_limit_without_redis == "closed"
    assert state.missing_url("database_url") is None and state.key_of("redis_url") == "state.redis_url_env"
    monkeypatch.setenv("TEST_MIRADOR_DB", "mysql://db/x")
    monkeypatch.delenv("TEST_MIRADOR_REDIS")
    problems = problems_of(FLEET + "state:\n  database_url_env: TEST_MIRADOR_DB\n  redis_url_env: TEST_MIRADOR_REDIS\n"
                                   "  redis_url: redis://x:1/0\n")
    said = [(p.key, p.message) for p in problems]
    assert len(said) == 2
    assert "scheme `mysql` (from $TEST_MIRADOR_DB) is not one of" in said[0][1]
    assert said[1][0] == "state.redis_url_env" and "give `redis_url` or `redis_url_env`" in said[1][1]
    assert "`redis://x` is not an environment variable name" in only_problem(
        FLEET + "state:\n  redis_url_env: redis://x\n").message


def test_a_state_url_variable_unset_here_loads_and_is_an_error_only_where_it_is_used(monkeypatch):
    """Every service reads the one file; only the consensus and the router need the URLs."""
    monkeypatch.delenv("TEST_MIRADOR_UNSET", raising=False)
    state = parse_config(FLEET + "state:\n  redis_url_env: TEST_MIRADOR_UNSET\n", "test.yaml").state
    assert state.uses_redis and not state.redis_url and not state.uses_postgresql
    assert state.missing_url("redis_url") == ("the environment variable TEST_MIRADOR_UNSET is not set or empty in "
                                              "this process; set it (e.g. from the Secret) before starting the service")
    assert (state.key_of("redis_url"), state.lines["redis_url"], state.source) == ("state.redis_url_env", 8, "test.yaml")


def test_router_feature_models_must_be_embedding_models_of_the_fleet():
    config = parse_config(EXAMPLES.replace("{embedding_model: embedder}", "{embedding_model: embedder, feature_models: [embedder]}"))
    assert config.services.router.feature_models == ("embedder",)
    for bad in ("[lm]", "[nowhere]"):
        problem = only_problem(EXAMPLES.replace("{embedding_model: embedder}",
                                                f"{{embedding_model: embedder, feature_models: {bad}}}"))
        assert problem.key == "services.router.feature_models", bad
        assert "not an embedding model of `fleet:`" in problem.message and "embedder" in problem.message
