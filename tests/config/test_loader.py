from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, default_config_path, load_config, parse_config
from gateway.config.loader import format_loc, interpolate

REPO = Path(__file__).resolve().parents[2]

MINIMAL: dict[str, Any] = {
    "store": {"url": "memory://"},
    "upstreams": {"openai": {"base_url": "https://api.openai.com/v1/", "api_key": "${KEY}"}},
    "models": {"gpt-4o": {"upstream": "openai"}},
    "tenants": {"t": {"api_keys": [{"id": "k1", "key": "sk-gw-1"}]}},
}


def _problems(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test.yaml", env=env or {})
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def _with(**sections: Any) -> dict[str, Any]:
    return {**MINIMAL, **sections}


# --- parse_config: what a valid document becomes ------------------------------------------------


def test_a_minimal_config_parses_with_defaults() -> None:
    config = parse_config(MINIMAL, "test.yaml", env={"KEY": "sk-upstream"})
    upstream = config.upstreams["openai"]
    assert upstream.base_url == "https://api.openai.com/v1"  # trailing slash removed
    assert upstream.api_key.get_secret_value() == "sk-upstream"
    assert upstream.kind == "openai"
    assert upstream.max_retries == 2
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    assert config.server.host == "127.0.0.1"
    assert config.policies["default"].allows_model("anything")
    assert config.tenants["t"].policy == "default"


def test_none_means_an_empty_config() -> None:
    config = parse_config(None, "empty.yaml", env={})
    assert config == GatewayConfig()
    assert config.models == {}


def test_the_api_key_is_not_shown_by_repr() -> None:
    config = parse_config(MINIMAL, "test.yaml", env={"KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(config)
    assert "sk-very-secret" not in str(config.upstreams)


def test_forward_headers_are_lowercased() -> None:
    data = _with(upstreams={"o": {"base_url": "http://o.test", "forward_headers": ["X-Trace-Id", "OpenAI-*"]}})
    data["models"] = {"m": {"upstream": "o"}}
    config = parse_config(data, "test.yaml", env={})
    assert config.upstreams["o"].forward_headers == ["x-trace-id", "openai-*"]


def test_empty_admin_keys_are_dropped() -> None:
    data = _with(admin={"api_keys": ["${ADMIN:-}", "real-admin-key"]})
    config = parse_config(data, "test.yaml", env={"KEY": "k"})
    assert [key.get_secret_value() for key in config.admin.api_keys] == ["real-admin-key"]


def test_the_config_is_frozen() -> None:
    config = parse_config(MINIMAL, "test.yaml", env={"KEY": "k"})
    with pytest.raises(ValueError, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


# --- interpolation --------------------------------------------------------------------------------


def test_interpolation_replaces_variables_in_nested_strings_only() -> None:
    value = {"a": ["${X}", {"b": "pre-${X}-post"}], "n": 3, "t": True, "none": None}
    assert interpolate(value, {"X": "1"}) == {"a": ["1", {"b": "pre-1-post"}], "n": 3, "t": True, "none": None}


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${X:-fallback}", {}, "fallback"),
        ("${X:-fallback}", {"X": "set"}, "set"),
        ("${X:-}", {}, ""),
        ("${X:-}", {"X": ""}, ""),
        ("${X}", {"X": ""}, ""),  # set to empty is set
        ("$$", {}, "$"),
        ("$${X}", {"X": "no"}, "${X}"),  # an escaped $ does not start a variable
        ("cost: $5", {}, "cost: $5"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${X:-a:-b}", {}, "a:-b"),
    ],
)
def test_interpolation_forms(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_a_variable_value_is_not_interpolated_again() -> None:
    assert interpolate("${X}", {"X": "${Y}", "Y": "nope"}) == "${Y}"


def test_a_variable_cannot_change_the_document_structure() -> None:
    config = parse_config(MINIMAL, "test.yaml", env={"KEY": "x\nmodels: {evil: {upstream: openai}}"})
    assert list(config.models) == ["gpt-4o"]
    assert config.upstreams["openai"].api_key.get_secret_value().startswith("x\nmodels")


def test_an_unset_variable_names_the_key_path_and_the_variable() -> None:
    problems = _problems(MINIMAL, env={})
    assert len(problems) == 1
    assert problems[0].startswith("test.yaml:upstreams.openai.api_key: environment variable KEY is not set")
    assert "${KEY:-default}" in problems[0]


def test_an_unset_variable_inside_a_list_names_the_index() -> None:
    problems = _problems(_with(admin={"api_keys": ["ok", "${NOPE}"]}), env={"KEY": "k"})
    assert problems == [
        "test.yaml:admin.api_keys[1]: environment variable NOPE is not set "
        "(set it, or give a default with ${NOPE:-default})"
    ]


def test_os_environ_is_used_when_env_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY", "from-the-environment")
    config = parse_config(MINIMAL, "test.yaml")
    assert config.upstreams["openai"].api_key.get_secret_value() == "from-the-environment"


# --- validation errors: file:key.path: message --------------------------------------------------


@pytest.mark.parametrize("data", [[], "text", 3])
def test_the_top_level_must_be_a_mapping(data: Any) -> None:
    problems = _problems(data)
    assert problems == [f"test.yaml: expected a mapping at the top level, got {type(data).__name__}"]


def test_an_unknown_key_is_reported_with_its_path() -> None:
    data = _with(upstreams={"openai": {"base_url": "http://o.test", "max_retry": 3}})
    assert _problems(data) == [
        "test.yaml:upstreams.openai.max_retry: unknown key (check its spelling; see docs/config.md)"
    ]


def test_an_unknown_top_level_key_is_reported() -> None:
    problems = _problems({"modles": {}})
    assert problems == ["test.yaml:modles: unknown key (check its spelling; see docs/config.md)"]


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "server": {"port": 70000, "max_body_bytes": 0},
        "store": {"url": "postgres://x"},
        "upstreams": {"u": {"base_url": "ftp://x"}},
    }
    problems = _problems(data)
    assert len(problems) == 4
    locations = [problem.split(": ", 1)[0] for problem in problems]
    assert locations == [
        "test.yaml:server.port",
        "test.yaml:server.max_body_bytes",
        "test.yaml:store.url",
        "test.yaml:upstreams.u.base_url",
    ]
    assert "expected an http:// or https:// URL, got 'ftp://x'" in problems[3]
    assert "memory://" in problems[2]


def test_validator_messages_lose_pydantics_prefix() -> None:
    problems = _problems(_with(upstreams={"az": {"kind": "azure", "base_url": "https://az.test"}}))
    assert problems[0] == (
        "test.yaml:upstreams.az: an upstream of kind 'azure' needs api_version, e.g. api_version: '2024-10-21'"
    )
    assert all("Value error" not in problem for problem in problems)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ({"id": "k"}, "give exactly one of sha256 (preferred) or key"),
        ({"id": "k", "key": "a", "sha256": "0" * 64}, "give exactly one of sha256 (preferred) or key"),
    ],
)
def test_an_api_key_needs_exactly_one_secret(key: dict[str, str], message: str) -> None:
    problems = _problems(_with(tenants={"t": {"api_keys": [key]}}), env={"KEY": "k"})
    assert problems == [f"test.yaml:tenants.t.api_keys[0]: {message}"]


@pytest.mark.parametrize("digest", ["A" * 64, "0" * 63, "g" * 64, "0" * 65])
def test_sha256_must_be_64_lowercase_hex(digest: str) -> None:
    problems = _problems(_with(tenants={"t": {"api_keys": [{"id": "k", "sha256": digest}]}}), env={"KEY": "k"})
    assert len(problems) == 1
    assert problems[0].startswith("test.yaml:tenants.t.api_keys[0].sha256: expected 64 lowercase hex characters")


# --- cross-references ----------------------------------------------------------------------------


def test_a_model_with_an_unknown_upstream() -> None:
    problems = _problems(_with(models={"m": {"upstream": "nope"}}), env={"KEY": "k"})
    assert problems == ["test.yaml:models.m.upstream: unknown upstream 'nope' (known: openai)"]


def test_a_model_with_an_unknown_upstream_and_no_upstreams() -> None:
    problems = _problems({"models": {"m": {"upstream": "nope"}}})
    assert problems == ["test.yaml:models.m.upstream: unknown upstream 'nope' (known: none defined)"]


def test_fallback_problems() -> None:
    models = {
        "m": {"upstream": "openai", "fallbacks": ["gone", "m"]},
    }
    problems = _problems(_with(models=models), env={"KEY": "k"})
    assert problems == [
        "test.yaml:models.m.fallbacks[0]: unknown model 'gone'",
        "test.yaml:models.m.fallbacks[1]: a model cannot fall back to itself",
    ]


def test_a_policy_listing_an_unknown_model() -> None:
    problems = _problems(_with(policies={"default": {"models": ["gpt-4o", "gpt-5"]}}), env={"KEY": "k"})
    assert problems == ["test.yaml:policies.default.models[1]: unknown model 'gpt-5'"]


def test_a_tenant_with_an_unknown_policy() -> None:
    data = _with(tenants={"t": {"policy": "gold", "api_keys": []}})
    assert _problems(data, env={"KEY": "k"}) == ["test.yaml:tenants.t.policy: unknown policy 'gold' (known: default)"]


def test_duplicate_key_ids_across_tenants() -> None:
    tenants = {
        "a": {"api_keys": [{"id": "same", "key": "sk-1"}]},
        "b": {"api_keys": [{"id": "same", "key": "sk-2"}]},
    }
    problems = _problems(_with(tenants=tenants), env={"KEY": "k"})
    assert problems == ["test.yaml:tenants.b.api_keys[0].id: duplicate key id 'same' (also at tenants.a.api_keys[0])"]


def test_the_same_sha256_twice() -> None:
    digest = "ab" * 32
    tenants = {"a": {"api_keys": [{"id": "k1", "sha256": digest}, {"id": "k2", "sha256": digest}]}}
    problems = _problems(_with(tenants=tenants), env={"KEY": "k"})
    assert problems == ["test.yaml:tenants.a.api_keys[1].sha256: the same key is configured twice"]


def test_the_same_plain_key_in_two_tenants_is_refused() -> None:
    """Otherwise one tenant's key would silently authenticate as the other tenant."""
    tenants = {
        "a": {"api_keys": [{"id": "k1", "key": "sk-shared"}]},
        "b": {"api_keys": [{"id": "k2", "key": "sk-shared"}]},
    }
    problems = _problems(_with(tenants=tenants), env={"KEY": "k"})
    assert problems == ["test.yaml:tenants.b.api_keys[0].key: the same key is configured twice"]


def test_a_plain_key_and_its_own_hash_are_the_same_key() -> None:
    digest = hashlib.sha256(b"sk-shared").hexdigest()
    tenants = {"a": {"api_keys": [{"id": "k1", "key": "sk-shared"}, {"id": "k2", "sha256": digest}]}}
    problems = _problems(_with(tenants=tenants), env={"KEY": "k"})
    assert problems == ["test.yaml:tenants.a.api_keys[1].sha256: the same key is configured twice"]


def test_distinct_keys_are_fine() -> None:
    tenants = {
        "a": {"api_keys": [{"id": "k1", "key": "sk-1"}, {"id": "k2", "sha256": "ab" * 32}]},
        "b": {"api_keys": [{"id": "k3", "key": "sk-2"}, {"id": "k4", "sha256": "cd" * 32}]},
    }
    config = parse_config(_with(tenants=tenants), "test.yaml", env={"KEY": "k"})
    assert [key.id for tenant in config.tenants.values() for key in tenant.api_keys] == ["k1", "k2", "k3", "k4"]


# --- format_loc ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "text"),
    [((), "(top level)"), (("a",), "a"), (("a", "b", 0, "c"), "a.b[0].c"), (("a", 1, 2), "a[1][2]")],
)
def test_format_loc(loc: tuple[str | int, ...], text: str) -> None:
    assert format_loc(loc) == text


# --- load_config: files ----------------------------------------------------------------------


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "store: {url: 'memory://'}\n"
        "upstreams:\n  u: {base_url: 'http://u.test', api_key: '${K:-sk-default}'}\n"
        "models:\n  m: {upstream: u}\n",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    assert config.upstreams["u"].api_key.get_secret_value() == "sk-default"
    assert list(config.models) == ["m"]


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: nope\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems[0].startswith(f"{path}:server.port: ")


def test_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: 1\n  host: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:4:1: invalid YAML: ")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [f"{path}: cannot read the config file: No such file or directory"]


def test_an_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, env={}) == GatewayConfig()


@pytest.mark.parametrize("name", ["gateway.yaml", "demo.yaml"])
def test_the_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "config" / name, env={"GATEWAY_API_KEY": "sk-gw-test"})
    assert config.models
    assert config.tenants


def test_default_config_path() -> None:
    assert default_config_path({}) == "config/gateway.yaml"
    assert default_config_path({"GATEWAY_CONFIG": ""}) == "config/gateway.yaml"
    assert default_config_path({"GATEWAY_CONFIG": "/etc/gw.yaml"}) == "/etc/gw.yaml"


def test_the_default_config_ships_no_usable_key() -> None:
    # A default client key in the shipped file would let anyone in wherever it is deployed.
    with pytest.raises(ConfigError) as raised:
        load_config(REPO / "config" / "gateway.yaml", env={})
    assert "GATEWAY_API_KEY is not set" in str(raised.value)


def test_an_empty_variable_takes_the_default_as_in_the_shell() -> None:
    config = parse_config({"store": {"url": "${STORE:-memory://}"}}, "t.yaml", env={"STORE": ""})
    assert config.store.url == "memory://"
