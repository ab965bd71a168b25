"""The `metrics:` section: opt-in key and user labels on the cost counters, and the bound on users."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config

UNKNOWN = "unknown key (check its spelling; see docs/config.md)"
NOT_BOOL = "Input should be a valid boolean, unable to interpret input"
NOT_INT = "Input should be a valid integer, unable to parse string as an integer"


def _problems(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test.yaml", env=env or {})
    return caught.value.problems


def test_labels_are_off_by_default() -> None:
    for config in (GatewayConfig(), parse_config({}, "test.yaml", env={}), parse_config({"metrics": {}}, "t", env={})):
        assert config.metrics.labels.key is False
        assert config.metrics.labels.user is False
        assert config.metrics.max_users == 1000


def test_the_section_parses() -> None:
    config = parse_config({"metrics": {"labels": {"key": True, "user": True}, "max_users": 50}}, "test.yaml", env={})
    assert (config.metrics.labels.key, config.metrics.labels.user, config.metrics.max_users) == (True, True, 50)


def test_values_may_come_from_the_environment() -> None:
    data = {"metrics": {"labels": {"user": "${PER_USER:-false}"}, "max_users": "${MAX_USERS:-10}"}}
    config = parse_config(data, "test.yaml", env={"PER_USER": "true"})
    assert config.metrics.labels.user is True
    assert config.metrics.max_users == 10
    assert parse_config(data, "test.yaml", env={}).metrics.labels.user is False


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"labels": {"tenant": True}}, f"metrics.labels.tenant: {UNKNOWN}"),
        ({"label": {"key": True}}, f"metrics.label: {UNKNOWN}"),
        (
            {"labels": {"user": "maybe"}},
            f"metrics.labels.user: {NOT_BOOL}",
        ),
        ({"labels": {"key": [True]}}, "metrics.labels.key: Input should be a valid boolean"),
        ({"labels": "key"}, "metrics.labels: Input should be a valid dictionary or instance of MetricsLabelsConfig"),
        ({"max_users": 0}, "metrics.max_users: Input should be greater than or equal to 1"),
        ({"max_users": 100_001}, "metrics.max_users: Input should be less than or equal to 100000"),
        (
            {"max_users": "lots"},
            f"metrics.max_users: {NOT_INT}",
        ),
    ],
)
def test_problems_name_the_key_path(section: dict[str, Any], problem: str) -> None:
    assert _problems({"metrics": section}) == [f"test.yaml:{problem}"]


def test_the_section_must_be_a_mapping() -> None:
    assert _problems({"metrics": ["key"]}) == [
        "test.yaml:metrics: Input should be a valid dictionary or instance of MetricsConfig"
    ]


def test_every_problem_in_the_section_is_reported_at_once() -> None:
    problems = _problems({"metrics": {"labels": {"key": "x", "users": True}, "max_users": -1}})
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        "test.yaml:metrics.labels.key",
        "test.yaml:metrics.labels.users",
        "test.yaml:metrics.max_users",
    ]


def test_a_file_names_itself_in_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("metrics:\n  labels:\n    key: true\n    usr: true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [f"{path}:metrics.labels.usr: {UNKNOWN}"]
    path.write_text("metrics:\n  labels: {key: true, user: true}\n  max_users: 20\n")
    config = load_config(path, env={})
    assert config.metrics.labels.key
    assert config.metrics.labels.user
    assert config.metrics.max_users == 20
