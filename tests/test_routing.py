from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.routing import Router, Target


def _router(models: dict[str, Any]) -> Router:
    config = parse_config(
        {
            "store": {"url": "memory://"},
            "upstreams": {"a": {"base_url": "http://a.test"}, "b": {"base_url": "http://b.test"}},
            "models": models,
        },
        "test.yaml",
        env={},
    )
    return Router(config)


def test_a_model_without_fallbacks_has_one_target() -> None:
    router = _router({"m": {"upstream": "a"}})
    assert router.targets("m") == (Target("m", "a", "m"),)


def test_upstream_model_defaults_to_the_gateway_name_and_can_be_renamed() -> None:
    router = _router({"plain": {"upstream": "a"}, "alias": {"upstream": "b", "upstream_model": "real-name"}})
    assert router.targets("plain")[0].upstream_model == "plain"
    assert router.targets("alias") == (Target("alias", "b", "real-name"),)


def test_fallbacks_follow_the_model_in_order() -> None:
    router = _router(
        {
            "main": {"upstream": "a", "fallbacks": ["second", "third"]},
            "second": {"upstream": "b", "upstream_model": "s2"},
            "third": {"upstream": "a"},
        }
    )
    assert router.targets("main") == (
        Target("main", "a", "main"),
        Target("second", "b", "s2"),
        Target("third", "a", "third"),
    )


def test_fallbacks_of_fallbacks_are_depth_first() -> None:
    router = _router(
        {
            "a1": {"upstream": "a", "fallbacks": ["b1", "c1"]},
            "b1": {"upstream": "b", "fallbacks": ["d1"]},
            "c1": {"upstream": "a"},
            "d1": {"upstream": "b"},
        }
    )
    assert [t.model for t in router.targets("a1")] == ["a1", "b1", "d1", "c1"]
    assert [t.model for t in router.targets("b1")] == ["b1", "d1"]


def test_cycles_end_and_each_model_appears_once() -> None:
    router = _router(
        {
            "x": {"upstream": "a", "fallbacks": ["y"]},
            "y": {"upstream": "b", "fallbacks": ["x", "z"]},
            "z": {"upstream": "a", "fallbacks": ["y", "x"]},
        }
    )
    assert [t.model for t in router.targets("x")] == ["x", "y", "z"]
    assert [t.model for t in router.targets("y")] == ["y", "x", "z"]
    assert [t.model for t in router.targets("z")] == ["z", "y", "x"]


def test_a_model_listed_twice_is_tried_once() -> None:
    router = _router(
        {
            "m": {"upstream": "a", "fallbacks": ["f", "g"]},
            "f": {"upstream": "b", "fallbacks": ["g"]},
            "g": {"upstream": "a"},
        }
    )
    assert [t.model for t in router.targets("m")] == ["m", "f", "g"]


def test_membership_and_model_list() -> None:
    router = _router({"m": {"upstream": "a"}, "n": {"upstream": "b"}})
    assert "m" in router
    assert "n" in router
    assert "unknown" not in router
    assert router.models == ["m", "n"]


def test_an_unknown_model_has_no_targets() -> None:
    router = _router({"m": {"upstream": "a"}})
    with pytest.raises(KeyError):
        router.targets("other")
